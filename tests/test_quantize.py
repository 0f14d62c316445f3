"""INT8 QDQ export and its accuracy gate: too few crops refused, a broken model fails with numbers, the
fallback keeps sensitive layers in FP32 and says which, detector box agreement, CLI wiring."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from fieldreid.errors import InputError  # noqa: E402
from fieldreid.export.quantize import (  # noqa: E402
    QuantizationGateError,
    box_agreement,
    embedding_gate,
    fallback_ladder,
    quantize_embedder,
)
from fieldreid.types import Detections, PreprocessSpec  # noqa: E402

SIZE = 16


def _broken_embedder(path: Path, outlier: float = 1000.0) -> Path:
    """Conv stem -> Conv -> Conv head (channel 0 spans +-`outlier`) -> mean -> x[0, 1, 2, 0.5].

    The embedding ignores channel 0, but with one INT8 scale per activation tensor (what TensorRT needs)
    channel 0 sets the step of the head's output to ~outlier/40 and channels 1-3 (values ~1) round to 0:
    a model that only works in FP32 at its head, as a trained BN neck makes real re-id models.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 3, 1, 1)).astype(np.float32)
    w1 = rng.normal(size=(3, 3, 1, 1)).astype(np.float32)
    w2 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    w2[0] = outlier
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv_stem"),
             helper.make_node("Conv", ["c0", "w1"], ["c1"], name="conv_mid"),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv_head"),
             helper.make_node("ReduceMean", ["c2", "axes"], ["pooled"], keepdims=0, name="pool"),
             helper.make_node("Mul", ["pooled", "scale"], ["embedding"], name="scale")]
    graph = helper.make_graph(
        nodes, "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array([0.0, 1.0, 2.0, 0.5], np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec = PreprocessSpec(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
    for k, v in {"fieldreid.kind": "embedder", "fieldreid.model_id": "broken-test", "fieldreid.preprocess":
                 spec.to_json(), "fieldreid.embedding_dim": "4"}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _write_crops(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(_crops(n, seed)[0]):
        cv2.imwrite(str(folder / f"{i}.png"), c)
    return folder


def _crops(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, size=(4, 3))
    crops, labels = [], []
    for i in range(n):
        k = i % 4
        img = np.clip(colours[k] + rng.normal(0, 25, size=(20, 20, 3)), 0, 255).astype(np.uint8)
        crops.append(img)
        labels.append(f"id{k}")
    return crops, labels


def test_too_few_calibration_crops_are_refused(tmp_path):
    model = _broken_embedder(tmp_path / "m.onnx")
    crops, labels = _crops(10)
    with pytest.raises(InputError, match=r"at least 32 real crops, got 10"):
        quantize_embedder(model, tmp_path / "m.int8.onnx", crops, crops, labels)
    assert not (tmp_path / "m.int8.onnx").exists()


def test_gate_fails_a_broken_model_with_numbers(tmp_path):
    model = _broken_embedder(tmp_path / "m.onnx")
    calib, _ = _crops(40)
    val, labels = _crops(24, seed=1)
    with pytest.raises(QuantizationGateError, match=r"cosine is .* mean") as info:
        quantize_embedder(model, tmp_path / "m.int8.onnx", calib, val, labels, fallback=False)
    gate = info.value.report["attempts"][0]["gate"]
    assert gate["cosine_mean"] < 0.9 and not gate["passed"]
    assert not (tmp_path / "m.int8.onnx").exists()


def test_fallback_keeps_sensitive_layers_in_fp32_and_says_which(tmp_path):
    from fieldreid.engines.manifest import has_qdq

    model = _broken_embedder(tmp_path / "m.onnx")
    assert [s for s, _ in fallback_ladder(model)][:2] == ["all layers int8", "first 1 conv(s) and the head (last conv, pooling, neck) in fp32"]
    calib, _ = _crops(40)
    val, labels = _crops(24, seed=1)
    out = tmp_path / "m.int8.onnx"
    report = quantize_embedder(model, out, calib, val, labels, fallback=True)
    assert report.excluded_nodes == ["conv_stem", "conv_head", "pool", "scale"]
    assert report.gate.passed and report.gate.cosine_mean > 0.98
    assert not report.attempts[0]["gate"]["passed"]
    assert has_qdq(out)  # conv_mid is still INT8

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["fieldreid.model_id"] == "broken-test" and meta["fieldreid.int8.excluded_nodes"] == "conv_stem,conv_head,pool,scale"


def test_export_command_int8_writes_manifest_and_refuses_few_crops(tmp_path):
    from fieldreid.export.run import ExportOptions, run_export

    model = _broken_embedder(tmp_path / "m.onnx")
    folder = _write_crops(tmp_path / "crops", 64)
    res = run_export(model, ExportOptions(int8=True, calib=folder, calib_count=40))
    out = tmp_path / "m.int8.onnx"
    assert out in res.written
    manifest = json.loads((tmp_path / "m.int8.onnx.json").read_text())
    assert manifest["precision"] == "int8-qdq" and manifest["quantization"]["calibration_crops"] == 40
    assert manifest["quantization"]["fp32_nodes"] == ["conv_stem", "conv_head", "pool", "scale"]
    assert manifest["source"]["sha256"] and manifest["gate"]["passed"]
    assert manifest["gate"]["top1_fp32"] is None  # a folder has no labels: cosine-only gate
    # validated on the 19 of 64 files held out from calibration, with mean, 5th percentile and min reported
    gate = manifest["gate"]
    assert gate["n"] == 19 and "19 of 64 files" in gate["held_out"] and gate["validation_source"] == str(folder)
    assert gate["cosine_min"] <= gate["cosine_p05"] <= gate["cosine_mean"] and gate["min_cosine_p05"] == 0.95
    with pytest.raises(InputError, match="got 40"):
        run_export(model, ExportOptions(int8=True, calib=folder, calib_count=40, min_calibration=64))
    with pytest.raises(InputError, match="--calib"):
        run_export(model, ExportOptions(int8=True))
    with pytest.raises(InputError, match="profile"):
        run_export(model, ExportOptions(int8=True, calib=folder, profile="cpu-int8"))  # 224 vs 16 px


def test_embedding_gate_numbers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 8)).astype(np.float32)
    labels = [f"id{i % 3}" for i in range(12)]
    ok = embedding_gate(a, a + 1e-4, labels)
    assert ok.passed and ok.cosine_min > 0.999 and ok.top1_drop == pytest.approx(0.0)
    bad = embedding_gate(a, rng.normal(size=(12, 8)).astype(np.float32), labels)
    assert not bad.passed and bad.cosine_mean < 0.9


def test_detector_box_agreement():
    def det(boxes, cls=None):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        n = len(boxes)
        return Detections(boxes, np.linspace(0.9, 0.5, n), np.zeros(n) if cls is None else cls, np.ones(n))

    ref = [det([[0, 0, 10, 10], [20, 20, 40, 40]]), det([])]
    same = box_agreement(ref, [det([[0, 0, 10, 10], [20, 20, 40, 40]]), det([])])
    assert same["matched_fraction"] == 1.0 and same["mean_iou"] == pytest.approx(1.0)
    shifted = box_agreement(ref, [det([[1, 0, 11, 10]]), det([[0, 0, 5, 5]])])
    assert shifted["matched"] == 1 and shifted["matched_fraction"] == 0.5
    assert shifted["extra_fraction"] == 0.5 and 0.6 < shifted["mean_iou"] < 0.9
    other_class = box_agreement(ref[:1], [det([[0, 0, 10, 10], [20, 20, 40, 40]], cls=np.array([1, 1]))])
    assert other_class["matched"] == 0


def test_cli_export_int8(tmp_path):
    from typer.testing import CliRunner

    from fieldreid.cli import app

    model = _broken_embedder(tmp_path / "m.onnx")
    folder = _write_crops(tmp_path / "crops", 12)
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder)])
    # 12 crops: 4 held out for the gate, 8 left to calibrate on
    assert r.exit_code == 2 and "at least 32 real crops, got 8" in r.output.replace("\n", " ")
    folder = _write_crops(tmp_path / "crops", 64)
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder), "--no-fallback"])
    assert r.exit_code == 2 and "INT8 export refused" in r.output
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder)])
    assert r.exit_code == 0, r.output
    assert "first 1 conv(s) and the head" in r.output and (tmp_path / "m.int8.onnx").is_file()
    flat = " ".join(r.output.split())
    assert "calibration: 45 images" in flat and "validation: 19 images" in flat
    assert re.search(r"INT8 gate PASS on 19 held-out crops: cosine mean [\d.]+, 5th percentile [\d.]+, min [\d.]+",
                     flat)


# -- validation never on calibration images; 5th-percentile cosine ----------------------------------------
def test_holdout_split_is_disjoint_deterministic_and_by_name(tmp_path):
    from fieldreid.export.quantize import holdout_split, list_crops

    folder = _write_crops(tmp_path / "a" / "crops", 50)
    (folder / "cam2").mkdir()
    shutil.copy(folder / "0.png", folder / "cam2" / "0.png")  # same file name in another folder: its own file
    refs = list_crops(folder)
    calib, val = holdout_split(refs)
    assert len(refs) == 51 and len(val) == round(51 * 0.3) and len(calib) == 51 - len(val)
    assert {r.path for r in calib}.isdisjoint({r.path for r in val})
    assert {r.path for r in calib} | {r.path for r in val} == {r.path for r in refs}
    # the same files split the same way in any listing order and wherever the folder lies
    again = holdout_split(list(reversed(refs)))
    assert sorted(r.key for r in again[1]) == sorted(r.key for r in val)
    moved = shutil.copytree(folder, tmp_path / "somewhere" / "else" / "crops")
    assert sorted(r.key for r in holdout_split(list_crops(moved))[1]) == sorted(r.key for r in val)
    two = holdout_split(refs[:2])
    assert len(two[0]) == len(two[1]) == 1  # at least one held out, at least one left to calibrate
    assert holdout_split(refs[:1]) == (refs[:1], [])


def test_held_out_sets_remove_calibration_files_from_val(tmp_path):
    from fieldreid.export.quantize import held_out_sets

    folder = _write_crops(tmp_path / "crops", 40)
    one = held_out_sets(folder, calib_limit=32)
    assert len(one.calib) == 28 and len(one.val) == 12  # limit 32 > the 28 calibration files
    assert {r.path for r in one.calib}.isdisjoint({r.path for r in one.val})
    same = held_out_sets(folder, val_source=folder, calib_limit=32)  # --val names the --calib folder
    assert len(same.calib) == 32 and len(same.val) == 8 and "32 calibration file(s) removed" in \
        same.info["validation"]["held_out"]
    assert {r.path for r in same.calib}.isdisjoint({r.path for r in same.val})
    with pytest.raises(InputError, match="never validated on its calibration images"):
        held_out_sets(folder, val_source=folder, calib_limit=40)
    with pytest.raises(InputError, match="selects rows of a metadata.csv"):
        held_out_sets(folder, calib_split="train")


def test_held_out_sets_from_metadata_csv_splits(zebra):
    from fieldreid.export.quantize import held_out_sets

    meta = zebra / "metadata.csv"
    rows = held_out_sets(meta, "database", val_split="query", val_source=meta, calib_limit=64, val_limit=30)
    assert len(rows.calib) == 64 and len(rows.val) == 30 and all(r.label for r in rows.val)
    with pytest.raises(InputError, match="never validated"):  # the same rows on both sides
        held_out_sets(meta, "query", val_source=meta, val_split="query", calib_limit=None)


def test_embedding_gate_checks_the_5th_percentile():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 8)).astype(np.float32)
    b = a.copy()
    # 10 of 100 crops far off (cosine ~0.8), the rest exact: the mean still clears 0.98, the tail does not
    for i in range(10):
        other = rng.normal(size=8).astype(np.float32)
        other -= other @ a[i] / (a[i] @ a[i]) * a[i]
        b[i] = 0.8 * a[i] / np.linalg.norm(a[i]) + 0.6 * other / np.linalg.norm(other)
    gate = embedding_gate(a, b, min_cosine=0.98, min_cosine_p05=0.95)
    assert gate.cosine_mean == pytest.approx(0.98, abs=1e-4) and gate.cosine_mean >= 0.98 - 1e-4
    assert gate.cosine_min == pytest.approx(0.8, abs=1e-4) and gate.cosine_p05 == pytest.approx(0.8, abs=1e-4)
    assert not gate.passed
    assert embedding_gate(a, b, min_cosine=0.97, min_cosine_p05=0.75).passed
    assert "5th percentile 0.8000, min 0.8000" in gate.cosine_text()


def _one_conv_embedder(path: Path) -> Path:
    """input -> 1x1 Conv (identity on RGB plus their sum) -> spatial mean: the embedding is the mean colour."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((4, 3, 1, 1), np.float32)
    w[:3, :, 0, 0] = np.eye(3)
    w[3] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
         helper.make_node("ReduceMean", ["c", "axes"], ["embedding"], keepdims=0, name="pool")],
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec = PreprocessSpec(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
    for k, v in {"fieldreid.kind": "embedder", "fieldreid.model_id": "colour-test",
                 "fieldreid.preprocess": spec.to_json(), "fieldreid.embedding_dim": "4"}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))
    return path


def test_gate_refuses_int8_that_is_fine_on_calibration_crops_but_not_on_held_out_ones(tmp_path):
    """One --calib folder: dull colours where the name hash puts calibration, vivid ones where it holds crops
    out. INT8 ranges calibrated on dull crops clip vivid ones. Calibrated and validated on all the crops
    (what the gate used to do without --val) it passes; validated on held-out crops it is refused."""
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.export.quantize import holdout_split, list_crops, quantize_embedder

    model = _one_conv_embedder(tmp_path / "m.onnx")
    folder = tmp_path / "crops"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):  # placeholders, to learn which names the split holds out
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.zeros((20, 20, 3), np.uint8))
    calib_refs, val_refs = holdout_split(list_crops(folder))
    for refs, (lo, hi) in ((calib_refs, (112, 145)), (val_refs, (0, 256))):
        for ref in refs:
            px = rng.integers(lo, hi, 3) + rng.normal(0, 4, (20, 20, 3))
            cv2.imwrite(str(ref.path), np.clip(px, 0, 255).astype(np.uint8))
    every = [cv2.imread(str(r.path)) for r in calib_refs + val_refs]
    old_way = quantize_embedder(model, tmp_path / "all.int8.onnx", every, every, fallback=False)
    assert old_way.gate.passed and old_way.gate.cosine_mean > 0.99

    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    m = re.search(r"INT8 export refused: against FP32 on 24 validation crops the embedding cosine is ([\d.]+) mean "
                  r"/ ([\d.]+) 5th percentile / ([\d.]+) worst", flat)
    assert m and float(m[2]) < 0.95, flat
    assert not (tmp_path / "m.int8.onnx").exists()


def _activation_zero_points(path: Path) -> list[np.ndarray]:
    """Zero points of the QuantizeLinear nodes fed by activations (not by initialisers: weights)."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return [inits[n.input[2]] for n in m.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits and len(n.input) > 2]


def test_uint8_activations_are_asymmetric_and_int8_stays_symmetric(tmp_path):
    from fieldreid.embed.runtime import preprocess_images
    from fieldreid.export.quantize import quantize_qdq

    model = _broken_embedder(tmp_path / "m.onnx", outlier=1.0)
    calib = preprocess_images(_crops(16)[0], PreprocessSpec(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.5,) * 3))
    quantize_qdq(model, tmp_path / "s8.onnx", calib)
    quantize_qdq(model, tmp_path / "u8.onnx", calib, activations="uint8")
    s8, u8 = _activation_zero_points(tmp_path / "s8.onnx"), _activation_zero_points(tmp_path / "u8.onnx")
    assert s8 and all(z.dtype == np.int8 and not z.any() for z in s8)  # TensorRT's form: zero point 0
    assert u8 and all(z.dtype == np.uint8 for z in u8) and any(z.any() for z in u8)
    with pytest.raises(InputError, match="activations"):
        quantize_qdq(model, tmp_path / "x.onnx", calib, activations="int4")


def test_profiles_choose_activation_types_and_tensorrt_refuses_uint8(tmp_path):
    from fieldreid.export.profiles import ProfileError, load_profile, parse_profile

    assert load_profile("cpu-int8").activations == "uint8"
    assert load_profile("jetson-orin-int8").activations == "int8"
    base = {"backend": "tensorrt", "precision": "int8", "input": {"height": 224, "width": 224},
            "batch": {"min": 1, "opt": 4, "max": 8}, "calibration": {"crops": 64, "activations": "uint8"}}
    with pytest.raises(ProfileError, match="TensorRT needs symmetric int8"):
        parse_profile(base)
    with pytest.raises(ProfileError, match="calibration.activations must be one of"):
        parse_profile({**base, "backend": "onnxruntime", "calibration": {"crops": 64, "activations": "u8"}})


def test_export_with_uint8_profile_records_activations_and_speed(tmp_path):
    from fieldreid.export.run import ExportOptions, run_export

    model = _broken_embedder(tmp_path / "m.onnx")
    folder = _write_crops(tmp_path / "crops", 64)
    profile = tmp_path / "cpu-int8-16.toml"
    profile.write_text('backend = "onnxruntime"\nprecision = "int8"\n[input]\nheight = 16\nwidth = 16\n'
                       '[batch]\nmin = 1\nopt = 4\nmax = 16\n[calibration]\ncrops = 40\nactivations = "uint8"\n'
                       '[gate]\nmin_cosine = 0.98\n')
    lines: list[str] = []
    run_export(model, ExportOptions(calib=folder, profile=str(profile)), log=lines.append)
    manifest = json.loads((tmp_path / "m.int8.onnx.json").read_text())
    assert manifest["quantization"]["activations"] == "uint8 asymmetric per-tensor"
    assert manifest["runs_on"] == ["onnxruntime (CPU)"]
    speed = manifest["speed_vs_fp32_here"]
    assert speed["speedup"] > 0 and {"avx512_vnni", "avx_vnni", "cpu"} <= set(speed)
    assert sum("x FP32 throughput" in line for line in lines) == 1
    with pytest.raises(InputError, match="uint8 activations"):  # never handed to TensorRT
        run_export(tmp_path / "m.int8.onnx", ExportOptions(int8=True))


# -- detectors: FP32 nodes, shape groups, the gate and its verdict (issue 17) ---------------------------------
def _dynamic_yolo_like(path: Path) -> Path:
    """A tiny detector-shaped graph with dynamic height/width: Conv+SiLU backbone, an upsample whose size is
    computed as float(dim) * 2 (how torch exports nn.Upsample for dynamic inputs), a concat, a head Conv and an
    in-graph 'decode' (sigmoid, scale, concat)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.normal(0, 0.5, (6, 8, 1, 1)).astype(np.float32), "wh"),
            numpy_helper.from_array(np.array([2], np.int64), "i2"), numpy_helper.from_array(np.array([3], np.int64), "i3"),
            numpy_helper.from_array(np.array([0], np.int64), "i0"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(640.0, np.float32), "scale")]
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        n("Sigmoid", ["c1"], ["s1"], name="sig1"), n("Mul", ["c1", "s1"], ["a1"], name="silu1"),
        n("Conv", ["a1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        n("Sigmoid", ["c2"], ["s2"], name="sig2"), n("Mul", ["c2", "s2"], ["a2"], name="silu2"),
        # sizes = shape[:2] ++ floor(float(shape[2:]) * 2)
        n("Shape", ["a2"], ["shp"], name="shape"), n("Slice", ["shp", "i0", "i2"], ["nc"], name="slice"),
        n("Slice", ["shp", "i2", "i3"], ["h"], name="slice_h"), n("Gather", ["shp", "i3"], ["w"], name="gather_w"),
        n("Concat", ["h", "w"], ["hw"], name="hw", axis=0), n("Cast", ["hw"], ["hwf"], name="cast", to=1),
        n("Mul", ["hwf", "two"], ["hw2"], name="times2"), n("Floor", ["hw2"], ["hw2f"], name="floor"),
        n("Cast", ["hw2f"], ["hw2i"], name="cast_back", to=7),
        n("Concat", ["nc", "hw2i"], ["sizes"], name="sizes", axis=0),
        n("Resize", ["a2", "", "", "sizes"], ["up"], name="resize", mode="nearest"),
        n("Concat", ["a1", "up"], ["cat"], name="cat", axis=1),
        n("Conv", ["cat", "wh"], ["head"], name="head_conv"),
        n("Sigmoid", ["head"], ["hs"], name="decode_sig"), n("Mul", ["hs", "scale"], ["box"], name="decode_scale"),
        n("Concat", ["box", "hs"], ["output0"], name="decode_cat", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "yolo-like", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["b", 12, "h", "w"])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_detector_fp32_nodes_keep_decode_and_shape_arithmetic(tmp_path):
    """Quantising every op of a dynamic-shape detector also quantised its upsampling size (float(dim) * 2), so
    15 * 2 became 29: the quantised model failed at 480 x 640 (QLinearConcat: 30 vs 29). The decode and the shape
    arithmetic stay FP32 and the INT8 model runs at square and rectangular inputs."""
    from fieldreid.export.quantize import detector_fallback_ladder, detector_fp32_nodes, quantize_qdq

    model = _dynamic_yolo_like(tmp_path / "m.onnx")
    keep = detector_fp32_nodes(model)
    assert keep["decode"] == ["head_conv", "decode_sig", "decode_scale", "decode_cat"]
    assert {"shape", "gather_w", "hw", "cast", "times2", "floor", "cast_back", "sizes"} <= set(keep["shape"])
    assert not {"conv1", "silu1", "resize", "cat"} & set(keep["shape"] + keep["decode"])
    ladder = detector_fallback_ladder(model)
    assert ladder[0] == ("all layers int8 but the decode", keep["decode"] + keep["shape"])
    rng = np.random.default_rng(1)
    calib = [rng.random((2, 3, 30, 40), dtype=np.float32), rng.random((2, 3, 40, 40), dtype=np.float32)]
    import onnxruntime as ort

    def runs(path: Path) -> bool:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        try:
            for hw in ((30, 40), (40, 40), (30, 20)):
                sess.run(None, {"images": rng.random((1, 3, *hw), dtype=np.float32)})
        except Exception:  # noqa: BLE001 - onnxruntime's Fail
            return False
        return True

    quantize_qdq(model, tmp_path / "all.onnx", calib, activations="uint8", nodes_to_exclude=keep["decode"])
    assert not runs(tmp_path / "all.onnx")  # the defect: shape arithmetic quantised
    quantize_qdq(model, tmp_path / "ok.onnx", calib, activations="uint8", nodes_to_exclude=ladder[0][1])
    assert runs(tmp_path / "ok.onnx")
    assert _activation_zero_points(tmp_path / "ok.onnx")


def test_calibration_reader_takes_groups_of_shapes():
    from fieldreid.export.quantize import _Reader

    groups = [np.zeros((5, 3, 8, 16), np.float32), np.ones((2, 3, 16, 8), np.float32)]
    reader = _Reader("x", groups, batch_size=4)
    shapes = []
    while (item := reader.get_next()) is not None:
        shapes.append(item["x"].shape)
    assert shapes == [(4, 3, 8, 16), (1, 3, 8, 16), (2, 3, 16, 8)]
    reader.rewind()
    assert reader.get_next()["x"].shape == (4, 3, 8, 16)
    assert _Reader("x", np.zeros((3, 3, 4, 4), np.float32), 2).get_next()["x"].shape == (2, 3, 4, 4)


def test_detector_int8_verdict_is_one_sentence():
    from fieldreid.export.quantize import detector_int8_verdict

    slow = detector_int8_verdict({"speedup": 0.54, "int8_ms_per_item": 134.4, "fp32_ms_per_item": 73.0,
                                  "avx512_vnni": True}, "int8")
    assert slow.count(". ") == 0 and slow.endswith(".") and "keep the FP32 detector" in slow and "TensorRT" in slow
    fast = detector_int8_verdict({"speedup": 1.2, "int8_ms_per_item": 50.0, "fp32_ms_per_item": 60.0}, "uint8")
    assert "1.20x FP32" in fast and "keep" not in fast and "no VNNI" in fast


@pytest.fixture(scope="module")
def camtrap_frames(camtrap):
    from fieldreid.export.quantize import held_out_sets, read_crops

    sets = held_out_sets(camtrap, calib_limit=40, val_limit=16)
    calib, _ = read_crops(sets.calib, max_side=1600)  # unreadable files (the set has some on purpose) skipped
    val, _ = read_crops(sets.val, max_side=1600)
    if len(calib) < 32:
        pytest.skip("fewer than 32 readable camera-trap frames")
    return calib, val


def test_quantize_detector_uint8_on_real_frames(yolov5n_onnx, camtrap_frames, tmp_path):
    """The real YOLOv5n with dynamic height/width, uint8 activations, calibrated at each frame's rectangle: a gate
    it cannot meet refuses in one sentence and leaves no file; a gate it meets writes a model that runs at the
    square and at rectangles, times itself against FP32 and says whether that pays."""
    from fieldreid.detect import Detector
    from fieldreid.export.quantize import QuantizationGateError, quantize_detector

    calib, val = camtrap_frames
    out = tmp_path / "det.int8.onnx"
    with pytest.raises(QuantizationGateError) as info:
        quantize_detector(yolov5n_onnx, out, calib, val, min_matched=1.01, activations="uint8", fallback=False)
    msg = str(info.value)
    assert msg.startswith("INT8 detector refused: against FP32 on 16 frames") and msg.endswith(
        "keep the FP32 detector.") and msg.count(". ") == 0
    assert info.value.report["attempts"][0]["step"] == "all layers int8 but the decode" and not out.exists()
    report = quantize_detector(yolov5n_onnx, out, calib, val, min_matched=0.0, min_iou=0.0, activations="uint8",
                               fallback=False)
    assert report["passed"] and out.is_file() and report["activations"] == "uint8"
    assert {tuple(s) for s in report["calibration_shapes"]} >= {(480, 640)}  # rectangles, not only the square
    speed = report["speed_vs_fp32_here"]
    assert speed["speedup"] > 0 and "avx512_vnni" in speed and report["verdict"].startswith("INT8 detector on ONNX")
    with Detector(out, conf=0.2) as det:
        assert det.rect and det.metadata["fieldreid.int8.activations"] == "uint8"
        for hw in ((1536, 2048), (1080, 1920), (640, 640)):
            det.detect_one(cv2.resize(val[0], hw[::-1]))
