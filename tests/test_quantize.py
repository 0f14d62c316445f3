"""INT8 QDQ export and its accuracy gate: too few crops refused, a broken model fails with numbers, the
fallback keeps sensitive layers in FP32 and says which, detector box agreement, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from fieldreid.errors import InputError  # noqa: E402
from fieldreid.quantize import (  # noqa: E402
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
    from fieldreid.export_cmd import ExportOptions, run_export

    model = _broken_embedder(tmp_path / "m.onnx")
    folder = tmp_path / "crops"
    folder.mkdir()
    crops, _ = _crops(40)
    for i, c in enumerate(crops):
        cv2.imwrite(str(folder / f"{i}.png"), c)
    res = run_export(model, ExportOptions(int8=True, calib=folder, calib_count=40))
    out = tmp_path / "m.int8.onnx"
    assert out in res.written
    manifest = json.loads((tmp_path / "m.int8.onnx.json").read_text())
    assert manifest["precision"] == "int8-qdq" and manifest["quantization"]["calibration_crops"] == 40
    assert manifest["quantization"]["fp32_nodes"] == ["conv_stem", "conv_head", "pool", "scale"]
    assert manifest["source"]["sha256"] and manifest["gate"]["passed"]
    assert manifest["gate"]["top1_fp32"] is None  # a folder has no labels: cosine-only gate
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
    folder = tmp_path / "crops"
    folder.mkdir()
    crops, _ = _crops(40)
    for i, c in enumerate(crops[:12]):
        cv2.imwrite(str(folder / f"{i}.png"), c)
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder)])
    assert r.exit_code == 2 and "at least 32 real crops, got 12" in r.output.replace("\n", " ")
    for i, c in enumerate(crops[12:], start=12):
        cv2.imwrite(str(folder / f"{i}.png"), c)
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder), "--no-fallback"])
    assert r.exit_code == 2 and "INT8 export refused" in r.output
    r = CliRunner().invoke(app, ["export", str(model), "--int8", "--calib", str(folder)])
    assert r.exit_code == 0, r.output
    assert "first 1 conv(s) and the head" in r.output and (tmp_path / "m.int8.onnx").is_file()
