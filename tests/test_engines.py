"""ONNX Runtime backend, backend registry, manifests and export profiles (no GPU, no TensorRT needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from fieldreid.engines import (  # noqa: E402
    BACKENDS,
    Engine,
    EngineIO,
    available_backends,
    backend_class,
    cuda_device_count,
    load_engine,
    registry,
    select_backend,
)
from fieldreid.engines.manifest import (  # noqa: E402
    PLAN_PRECISIONS,
    find_plan,
    manifest_path,
    onnx_metadata,
    plan_candidates,
    plan_path,
    plan_precision,
    plan_source_onnx,
    read_manifest,
    sha256_file,
    write_manifest,
)
from fieldreid.engines.ort import OnnxRuntimeEngine, default_threads  # noqa: E402
from fieldreid.errors import (  # noqa: E402
    BackendUnavailableError,
    FieldreidError,
    InputError,
    ModelError,
)
from fieldreid.export.profiles import (  # noqa: E402
    ExportProfile,
    ProfileError,
    default_profile_dir,
    list_profiles,
    load_profile,
    parse_profile,
)
from fieldreid.types import PreprocessSpec  # noqa: E402

OPSET = 17
SPEC = PreprocessSpec(size=(32, 32))
META = {"fieldreid.preprocess": SPEC.to_json(), "fieldreid.model_id": "affine-test"}


# -- tiny models -----------------------------------------------------------------------------------------
def _save(graph, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.18
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_affine(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """y = x * 2 + 1, x: (N, 3) float32 with a dynamic batch axis."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return _save(graph, path, metadata)


def make_two_input(path: Path) -> Path:
    """sum = a + b and diff = a - b, a and b: (N, 4) float32."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "two_input",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("sum", "diff")],
    )
    return _save(graph, path)


@pytest.fixture()
def affine(tmp_path: Path) -> Path:
    return make_affine(tmp_path / "affine.onnx", META)


@pytest.fixture()
def two_input(tmp_path: Path) -> Path:
    return make_two_input(tmp_path / "two.onnx")


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """Make the registry see no TensorRT, whatever is installed on the machine running the tests."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "tensorrt" or name.startswith("tensorrt."):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# -- ONNX Runtime engine -----------------------------------------------------------------------------------
def test_ort_runs_affine_with_dynamic_batch(affine):
    with OnnxRuntimeEngine(affine, threads=1) as eng:
        for n in (1, 5):
            x = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
            out = eng.run(x)
            assert list(out) == ["y"]
            assert out["y"].dtype == np.float32
            np.testing.assert_allclose(out["y"], x * 2 + 1)


def test_ort_low_memory_turns_the_arena_off(affine):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with OnnxRuntimeEngine(affine, threads=1) as normal, \
            load_engine(affine, backend="onnxruntime", threads=1, low_memory=True) as small:
        assert not normal.low_memory and small.low_memory
        assert normal.session.get_session_options().enable_cpu_mem_arena
        opts = small.session.get_session_options()
        assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
        np.testing.assert_array_equal(small.run(x)["y"], normal.run(x)["y"])


def test_ort_describes_io_and_device(affine):
    with OnnxRuntimeEngine(affine, device="cpu") as eng:
        assert isinstance(eng, Engine) and eng.backend == "onnxruntime"
        assert eng.inputs == [EngineIO("x", (-1, 3), np.dtype(np.float32))]
        assert eng.outputs == [EngineIO("y", (-1, 3), np.dtype(np.float32))]
        assert eng.input_names == ["x"] and eng.output_names == ["y"]
        assert eng.device == "cpu"
        assert "affine.onnx" in repr(eng)


def test_ort_reads_metadata_props(affine):
    with OnnxRuntimeEngine(affine) as eng:
        assert eng.metadata["fieldreid.model_id"] == "affine-test"
        assert PreprocessSpec.from_json(eng.metadata["fieldreid.preprocess"]) == SPEC


def test_ort_two_inputs_by_name(two_input):
    a = np.ones((2, 4), np.float32)
    b = np.full((2, 4), 3.0, np.float32)
    with load_engine(two_input, backend="onnxruntime") as eng:
        out = eng.run({"a": a, "b": b})
        assert set(out) == {"sum", "diff"}
        np.testing.assert_allclose(out["sum"], 4.0)
        np.testing.assert_allclose(out["diff"], -2.0)
        with pytest.raises(InputError, match="pass a dict"):
            eng.run(a)
        with pytest.raises(InputError, match="inputs are"):
            eng.run({"a": a})


def test_close_and_context_manager(affine):
    eng = OnnxRuntimeEngine(affine)
    eng.close()
    eng.close()  # idempotent
    with pytest.raises(FieldreidError, match="closed"):
        eng.run(np.zeros((1, 3), np.float32))
    with OnnxRuntimeEngine(affine) as eng2:
        pass
    with pytest.raises(FieldreidError, match="closed"):
        eng2.run(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize(
    ("feed", "match"),
    [
        (np.zeros(3, np.float32), "2 dimensions"),
        (np.zeros((1, 3, 1), np.float32), "2 dimensions"),
        (np.zeros((2, 4), np.float32), "axis 1 must be 3"),
        ({"z": np.zeros((1, 3), np.float32)}, "inputs are"),
        ({"x": np.zeros((1, 3), np.float32), "z": np.zeros(1)}, "inputs are"),
    ],
)
def test_input_checks(affine, feed, match):
    with OnnxRuntimeEngine(affine) as eng, pytest.raises(InputError, match=match):
        eng.run(feed)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint8, np.float16])
def test_input_dtype_is_cast(affine, dtype):
    x = np.array([[0, 1, 2]], dtype=dtype)
    with OnnxRuntimeEngine(affine) as eng:
        out = eng.run(x)["y"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1, 3, 5]])


def test_non_contiguous_input(affine):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)[:, :3]  # a strided view
    with OnnxRuntimeEngine(affine) as eng:
        np.testing.assert_allclose(eng.run(x)["y"], x * 2 + 1)


def test_corrupt_onnx_is_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf \x00\xff" * 10)
    with pytest.raises(ModelError, match="bad.onnx"):
        load_engine(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError):
        OnnxRuntimeEngine(empty)


def test_unsupported_input_type_is_model_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "int16",
        [helper.make_tensor_value_info("x", TensorProto.INT16, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, ["N", 3])],
    )
    path = _save(graph, tmp_path / "int16.onnx")
    with pytest.raises(ModelError, match=r"x \(tensor\(int16\)\)"):
        OnnxRuntimeEngine(path)


def test_cuda_device_without_cuda_provider(affine):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(ModelError, match="CUDA execution provider"):
        OnnxRuntimeEngine(affine, device="cuda")


def test_default_threads_positive():
    assert default_threads() >= 1


# -- registry --------------------------------------------------------------------------------------------
def test_backends_table():
    assert set(BACKENDS) == {"onnxruntime", "tensorrt", "torch"}
    assert BACKENDS["tensorrt"][3] == "trt"


def test_auto_picks_onnxruntime_without_tensorrt(affine, no_tensorrt):
    assert select_backend(affine) == ("onnxruntime", affine)
    # A plan beside the ONNX does not matter when TensorRT cannot run.
    affine.with_suffix(".engine").write_bytes(b"plan")
    assert select_backend(affine) == ("onnxruntime", affine)


def test_auto_plan_falls_back_to_sibling_onnx(affine, no_tensorrt):
    plan = affine.with_suffix(".engine")
    plan.write_bytes(b"plan")
    assert select_backend(plan, "auto") == ("onnxruntime", affine)
    with load_engine(plan) as eng:  # and it actually loads the ONNX
        assert eng.backend == "onnxruntime" and eng.path == affine


def test_auto_plan_without_onnx_names_the_extra(tmp_path, no_tensorrt):
    plan = tmp_path / "lonely.plan"
    plan.write_bytes(b"plan")
    with pytest.raises(BackendUnavailableError, match=r"fieldreid\[trt\]") as info:
        select_backend(plan)
    assert "lonely.onnx" in str(info.value)


def test_auto_prefers_plan_when_tensorrt_runs(affine, monkeypatch):
    plan = affine.with_suffix(".engine")
    plan.write_bytes(b"plan")
    monkeypatch.setattr(registry, "available_backends", lambda: {"tensorrt": "ok", "onnxruntime": "ok"})
    assert select_backend(affine) == ("tensorrt", plan)
    assert select_backend(plan) == ("tensorrt", plan)


def test_explicit_tensorrt_without_plan_names_export_command(affine):
    with pytest.raises(ModelError, match=r"fieldreid export .*affine\.onnx --fp16") as info:
        select_backend(affine, "tensorrt")
    # the exact files it looked for, the one `fieldreid export --fp16` writes first
    assert f"looked for {affine.with_name('affine.fp16.engine')}, {affine.with_name('affine.fp32.engine')}" \
        in str(info.value)


# -- plan names: one function names them for the writer (export) and the reader (backend selection) ---------
def test_plan_names_round_trip_every_precision(tmp_path):
    names = {"fp32": "embedder.fp32.engine", "fp16": "embedder.fp16.engine", "int8": "embedder.int8.engine"}
    for precision in PLAN_PRECISIONS:
        plan = plan_path(tmp_path / "embedder.onnx", precision)
        assert plan == tmp_path / names[precision]
        assert plan_precision(plan) == precision
    # the INT8 model export writes is m.int8.onnx: its plan is m.int8.engine, not m.int8.int8.engine
    assert plan_path(tmp_path / "m.int8.onnx", "int8") == tmp_path / "m.int8.engine"
    assert plan_precision(tmp_path / "m.engine") is None
    with pytest.raises(ModelError, match="precision"):
        plan_path(tmp_path / "m.onnx", "bf16")


@pytest.mark.parametrize("precision", PLAN_PRECISIONS)
def test_backend_selection_finds_the_plan_export_writes(tmp_path, monkeypatch, precision):
    """For each precision: the path the writer uses is the path selection finds, and back to its ONNX."""
    monkeypatch.setattr(registry, "available_backends", lambda: {"tensorrt": "ok", "onnxruntime": "ok"})
    fp32 = make_affine(tmp_path / "m.onnx")
    # an INT8 plan is built from the QDQ model export writes beside the FP32 one (its manifest says int8-qdq)
    source = fp32 if precision != "int8" else make_affine(tmp_path / "m.int8.onnx")
    plan = plan_path(source, precision)
    plan.write_bytes(b"plan")
    write_manifest(plan, {"source_onnx": source.name, "precision": precision})
    assert find_plan(source) == plan
    assert select_backend(source) == ("tensorrt", plan)
    assert select_backend(source, "tensorrt") == ("tensorrt", plan)
    assert plan_source_onnx(plan) == source
    if precision == "int8":  # the FP32 model does not silently run as INT8
        assert find_plan(fp32) is None
    monkeypatch.setattr(registry, "available_backends", lambda: {"tensorrt": "no GPU", "onnxruntime": "ok"})
    assert select_backend(plan) == ("onnxruntime", source)  # no TensorRT here: the plan's own ONNX


def test_plan_selection_prefers_fp16_and_reads_the_int8_manifest(tmp_path):
    onnx_path = make_affine(tmp_path / "m.onnx")
    for precision in ("fp32", "fp16"):
        plan_path(onnx_path, precision).write_bytes(b"plan")
    assert find_plan(onnx_path) == tmp_path / "m.fp16.engine"
    # an INT8 QDQ model written under any name (--out q.onnx) is known by its manifest
    q = make_affine(tmp_path / "q.onnx")
    write_manifest(q, {"precision": "int8-qdq"})
    assert plan_candidates(q)[0] == tmp_path / "q.int8.engine"
    with pytest.raises(ModelError, match=r"q\.int8\.engine.*fieldreid export .*q\.onnx --int8"):
        select_backend(q, "tensorrt")
    # without a manifest, a plan's ONNX comes from its name
    assert plan_source_onnx(tmp_path / "x.fp16.engine") == tmp_path / "x.onnx"
    assert plan_source_onnx(tmp_path / "x.int8.engine") == tmp_path / "x.int8.onnx"
    assert plan_source_onnx(tmp_path / "x.plan") == tmp_path / "x.onnx"


def test_explicit_tensorrt_finds_plan_beside_onnx(affine):
    for suffix in (".plan", ".trt", ".engine"):
        plan = affine.with_suffix(suffix)
        plan.write_bytes(b"plan")
        assert select_backend(affine, "tensorrt") == ("tensorrt", plan)
        plan.unlink()


def test_explicit_onnxruntime_refuses_plan(affine):
    plan = affine.with_suffix(".engine")
    plan.write_bytes(b"plan")
    with pytest.raises(ModelError, match="ONNX Runtime needs the .onnx"):
        select_backend(plan, "onnxruntime")


def test_select_backend_errors(tmp_path, affine):
    with pytest.raises(ModelError, match="does not exist"):
        select_backend(tmp_path / "missing.onnx")
    with pytest.raises(BackendUnavailableError, match="Unknown backend 'openvino'"):
        select_backend(affine, "openvino")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"")
    assert select_backend(pt) == ("torch", pt)


def test_available_backends_reports_tensorrt_reason(no_tensorrt):
    status = available_backends()
    assert set(status) == set(BACKENDS)
    assert status["onnxruntime"] == "ok"
    assert status["tensorrt"] != "ok"
    assert "fieldreid[trt]" in status["tensorrt"]


def test_available_backends_imports_nothing(no_tensorrt):
    before = set(sys.modules)
    available_backends()
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("tensorrt", "torch")}


def test_backend_class_tensorrt_missing_names_extra(no_tensorrt):
    with pytest.raises(BackendUnavailableError, match=r"pip install 'fieldreid\[trt\]'") as info:
        backend_class("tensorrt")
    assert "JetPack" in str(info.value)


def test_backend_class_known_and_unknown():
    assert backend_class("onnxruntime") is OnnxRuntimeEngine
    with pytest.raises(BackendUnavailableError, match="Unknown backend"):
        backend_class("nope")


def test_cuda_device_count_respects_hidden_devices(monkeypatch):
    cuda_device_count.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    try:
        assert cuda_device_count() == 0
    finally:
        cuda_device_count.cache_clear()


def test_load_engine_passes_options(affine):
    with load_engine(affine, backend="onnxruntime", threads=1, device="cpu") as eng:
        np.testing.assert_allclose(eng.run(np.zeros((2, 3), np.float32))["y"], 1.0)


# -- manifests -----------------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path):
    art = tmp_path / "model.engine"
    art.write_bytes(b"\x00plan bytes" * 100)
    data = {"precision": "fp16", "batch": {"min": 1, "opt": 8, "max": 32}, "onnx_metadata": META}
    path = write_manifest(art, data)
    assert path == tmp_path / "model.engine.json" == manifest_path(art)
    assert "artefact_sha256" not in data  # caller's dict untouched
    back = read_manifest(art)
    assert back["precision"] == "fp16" and back["batch"] == data["batch"] and back["onnx_metadata"] == META
    assert back["artefact"] == "model.engine"
    assert back["artefact_sha256"] == sha256_file(art) == hashlib.sha256(art.read_bytes()).hexdigest()
    assert back["fieldreid_version"]
    assert back["created"].endswith("+00:00")
    assert read_manifest(art, verify_sha256=True) == back
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_manifest_detects_changed_artefact(tmp_path):
    art = tmp_path / "model.engine"
    art.write_bytes(b"original")
    write_manifest(art, {})
    art.write_bytes(b"truncat")
    with pytest.raises(ModelError, match="does not match its manifest"):
        read_manifest(art, verify_sha256=True)


def _previous(tmp_path: Path) -> tuple[Path, str]:
    art = tmp_path / "model.engine"
    art.write_bytes(b"plan")
    write_manifest(art, {"precision": "fp16"})
    return art, manifest_path(art).read_text()


def test_manifest_write_failing_at_replace_keeps_previous(tmp_path, monkeypatch):
    art, before = _previous(tmp_path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(FieldreidError, match="previous file is unchanged"):
        write_manifest(art, {"precision": "int8"})
    monkeypatch.undo()
    assert manifest_path(art).read_text() == before
    assert read_manifest(art)["precision"] == "fp16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine", "model.engine.json"]


def test_manifest_write_failing_at_serialisation_keeps_previous(tmp_path, monkeypatch):
    art, before = _previous(tmp_path)

    def broken_dumps(*args, **kwargs):
        raise ValueError("simulated serialisation failure")

    monkeypatch.setattr(json, "dumps", broken_dumps)
    with pytest.raises(ModelError, match="simulated"):
        write_manifest(art, {"precision": "int8"})
    monkeypatch.undo()
    assert manifest_path(art).read_text() == before


def test_manifest_rejects_nan(tmp_path):
    art, before = _previous(tmp_path)
    with pytest.raises(ModelError, match="JSON"):
        write_manifest(art, {"score": float("nan")})
    assert manifest_path(art).read_text() == before


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "missing"), ('{"precision": "fp16"', "corrupt"), ("[1, 2]", "not a JSON object"), (b"\xff\xfe\x00", "Cannot read")],
)
def test_bad_manifest_is_model_error(tmp_path, content, match):
    art = tmp_path / "model.engine"
    art.write_bytes(b"plan")
    if isinstance(content, str):
        manifest_path(art).write_text(content)
    elif isinstance(content, bytes):
        manifest_path(art).write_bytes(content)
    with pytest.raises(ModelError, match=match) as info:
        read_manifest(art)
    assert "model.engine.json" in str(info.value)


def test_sha256_file_missing_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="nothing.bin"):
        sha256_file(tmp_path / "nothing.bin")


def test_onnx_metadata_with_onnx_and_with_onnxruntime_only(affine, monkeypatch):
    assert onnx_metadata(affine) == META
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on a field device without the onnx package
    assert onnx_metadata(affine) == META


def test_onnx_metadata_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist"):
        onnx_metadata(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08garbage" * 7)
    with pytest.raises(ModelError, match="bad.onnx"):
        onnx_metadata(bad)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ModelError, match="bad.onnx"):
        onnx_metadata(bad)


# -- export profiles ---------------------------------------------------------------------------------------
SHIPPED = ["cpu-fp32", "cpu-int8", "desktop-fp16", "jetson-orin-fp16", "jetson-orin-int8"]

GOOD = {
    "backend": "tensorrt",
    "precision": "fp16",
    "input": {"height": 224, "width": 224},
    "batch": {"min": 1, "opt": 8, "max": 16},
}


def _with(base: dict, **changes) -> dict:
    out = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        table, _, key = dotted.rpartition("__")
        target = out.setdefault(table, {}) if table else out
        if value is _DROP:
            target.pop(key, None)
        else:
            target[key] = value
    return out


_DROP = object()


def test_shipped_profiles_all_load(monkeypatch):
    import fieldreid

    monkeypatch.delenv("FIELDREID_EXPORT_DIR", raising=False)
    # package data, so an installed wheel has them; one copy only (the top-level export/ is documentation)
    assert Path(str(default_profile_dir())) == Path(fieldreid.__file__).parent / "export" / "default_profiles"
    assert list_profiles() == sorted(SHIPPED)
    assert not list((Path(__file__).parents[1] / "export").glob("*.toml"))
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name
        assert p.input_size == (224, 224)
        assert 1 <= p.min_batch <= p.opt_batch <= p.max_batch
        assert (p.calibration_crops > 0) == (p.precision == "int8")
        assert (p.backend == "tensorrt") == ("fp16" in name or "jetson" in name)
        assert 0 < p.min_cosine <= 1 and 0 <= p.max_top1_drop <= 1


def test_profile_values_and_build_kwargs():
    p = load_profile("jetson-orin-int8")
    assert (p.backend, p.precision, p.per_channel, p.calibration_method) == ("tensorrt", "int8", True, "minmax")
    assert (p.min_cosine, p.min_cosine_p05, p.max_top1_drop) == (0.98, 0.95, 0.02)
    assert parse_profile(GOOD).min_cosine_p05 == 0.95  # the default when a profile leaves it out
    assert p.build_kwargs() == {"precision": "int8", "min_batch": 1, "opt_batch": 8, "max_batch": 16,
                                "workspace_mib": 1024}
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.precision = "fp32"  # type: ignore[misc]


def test_profile_by_path_and_env_dir(tmp_path, monkeypatch):
    f = tmp_path / "mine.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "fp32"\n[input]\nheight = 64\nwidth = 96\n'
                 "[batch]\nmin = 1\nopt = 2\nmax = 4\n")
    p = load_profile(f)
    assert (p.name, p.input_size, p.workspace_mib, p.calibration_crops) == ("mine", (64, 96), 1024, 0)
    assert p.source == str(f)
    monkeypatch.setenv("FIELDREID_EXPORT_DIR", str(tmp_path))
    assert load_profile("mine") == p
    assert list_profiles() == sorted(["mine", *SHIPPED])  # the user's folder adds to the packaged defaults
    assert load_profile("cpu-int8").source.endswith(str(Path("export") / "default_profiles" / "cpu-int8.toml"))
    (tmp_path / "cpu-int8.toml").write_text(f.read_text())  # and overrides one of the same name
    assert load_profile("cpu-int8").source == str(tmp_path / "cpu-int8.toml")
    with pytest.raises(ProfileError, match=r"'nope' does not exist in .*Known profiles: cpu-fp32.*mine"):
        load_profile("nope")


def test_profile_missing_lists_known(tmp_path):
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ProfileError, match="does not exist.*a") as info:
        load_profile("nope", directory=tmp_path)
    assert isinstance(info.value, FieldreidError)


def test_profile_invalid_toml(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("precision = \n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile(f)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"max_bacth": 3}, "unknown key 'max_bacth'"),
        ({"batch__maximum": 3}, "unknown key 'batch.maximum'"),
        ({"engine__x": 1}, r"unknown table \[engine\]"),
        ({"input": 5}, "must be a table"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"backend": "openvino"}, "backend must be one of"),
        ({"precision": _DROP}, "required key precision"),
        ({"batch__opt": _DROP}, r"required key \[batch\] opt"),
        ({"batch__min": True}, "batch.min must be int"),
        ({"batch__min": 1.0}, "batch.min must be int"),
        ({"input__height": "224"}, "input.height must be int"),
        ({"batch__min": 9}, "1 <= min <= opt <= max"),
        ({"batch__min": 0}, "1 <= min <= opt <= max"),
        ({"batch__max": 4096}, "unreasonably large"),
        ({"input__width": 8}, "between 16 and 4096"),
        ({"tensorrt__workspace_mib": 0}, "workspace_mib"),
        ({"backend": "onnxruntime"}, "fp16 is a TensorRT precision"),
        ({"precision": "int8"}, "needs .calibration. crops"),
        ({"calibration__crops": 10}, r"\[calibration\] table only applies"),
        ({"gate__min_cosine": 1.5}, "min_cosine"),
        ({"gate__min_cosine": float("nan")}, "min_cosine"),
        ({"gate__max_top1_drop": -0.1}, "max_top1_drop"),
        ({"gate__min_cosine_p05": 0.0}, "min_cosine_p05"),
        ({"gate__min_cosine_p05": "high"}, "min_cosine_p05 must be int or float"),
    ],
)
def test_profile_validation(changes, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile(_with(GOOD, **changes), source="test.toml")


def test_profile_int8_calibration_checks():
    base = _with(GOOD, precision="int8", calibration__crops=256)
    p = parse_profile(base)
    assert (p.calibration_crops, p.calibration_method, p.per_channel) == (256, "minmax", True)
    with pytest.raises(ProfileError, match="calibration.method"):
        parse_profile(_with(base, calibration__method="kl"))
    with pytest.raises(ProfileError, match="per_channel must be bool"):
        parse_profile(_with(base, calibration__per_channel=1))
    cpu = _with(base, backend="onnxruntime")
    with pytest.raises(ProfileError, match=r"\[tensorrt\] table only applies"):
        parse_profile(_with(cpu, tensorrt__workspace_mib=64))
    assert isinstance(parse_profile(cpu), ExportProfile)


# -- the built wheel carries the default profiles --------------------------------------------------------
@pytest.mark.slow
def test_built_wheel_contains_export_profiles(tmp_path):
    """Build the wheel from a copy of the source (so the checkout gets no build/ folder) and look inside."""
    import shutil
    import subprocess
    import zipfile

    pytest.importorskip("setuptools", minversion="70.1")  # bdist_wheel built in: no network, no `wheel` package
    root = Path(__file__).parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "fieldreid", src / "fieldreid", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("fieldreid-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        inside = {n for n in zf.namelist() if n.startswith("fieldreid/export/default_profiles/")}
        assert inside == {f"fieldreid/export/default_profiles/{name}.toml" for name in SHIPPED}
        for name in SHIPPED:  # the same bytes as the source, so one copy
            assert zf.read(f"fieldreid/export/default_profiles/{name}.toml") == \
                (root / "fieldreid" / "export" / "default_profiles" / f"{name}.toml").read_bytes()
