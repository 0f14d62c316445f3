"""TensorRT backend.

Three layers of tests:

* pure logic that needs neither TensorRT nor a GPU (INT8 needs QDQ, plan/device compatibility, the
  missing-extra errors, Q/DQ detection on a model quantised here with ONNX Runtime);
* the build and run plumbing against small fakes of ``tensorrt`` and cuda-python's runtime that follow
  the TensorRT 10 name-based API (checks the code around TensorRT: flags, profiles, buffers, manifests);
* ``@pytest.mark.tensorrt`` tests on a real GPU, skipped where TensorRT or a GPU is absent.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import fieldreid.engines.tensorrt.runner as trt_backend  # noqa: E402
from fieldreid.engines.manifest import has_qdq, manifest_path, read_manifest, write_manifest  # noqa: E402
from fieldreid.engines.ort import OnnxRuntimeEngine  # noqa: E402
from fieldreid.engines.registry import cuda_device_count  # noqa: E402
from fieldreid.engines.tensorrt.runner import (  # noqa: E402
    TensorRTEngine,
    build_plan,
    check_plan_compatible,
    rebuild_command,
)
from fieldreid.errors import BackendUnavailableError, FieldreidError, InputError, ModelError  # noqa: E402
from fieldreid.types import PreprocessSpec  # noqa: E402

OPSET = 17
META = {"fieldreid.model_id": "affine-test", "fieldreid.kind": "embedder"}


# -- tiny models -----------------------------------------------------------------------------------------
def _save(graph, path: Path, metadata: dict[str, str] | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))
    return path


def make_affine(path: Path, batch: int | str = "N") -> Path:
    """y = x * 2 + 1, x: (batch, 3) float32."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return _save(graph, path, META)


def make_conv(path: Path) -> Path:
    """A tiny CNN embedder: (N, 3, 16, 16) → Conv 3x3 → Relu → GlobalAveragePool → Flatten → (N, 8)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")],
    )
    return _save(graph, path, META)


def make_qdq(fp32_path: Path, out_path: Path) -> Path:
    """Static INT8 QDQ quantisation with ONNX Runtime, as TensorRT wants it: symmetric, per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.random((2, 3, 16, 16), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(fp32_path), str(out_path), Reader(),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": True},
    )
    return out_path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("trt-models")
    conv = make_conv(folder / "conv.onnx")
    return {
        "affine": make_affine(folder / "affine.onnx"),
        "conv": conv,
        "qdq": make_qdq(conv, folder / "conv.int8.onnx"),
    }


# -- pure logic: no TensorRT, no GPU ---------------------------------------------------------------------
def test_module_imports_without_tensorrt_or_cuda():
    code = (
        "import sys; import fieldreid.engines.tensorrt.runner; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'cuda', 'onnx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_has_qdq(models):
    assert has_qdq(models["qdq"]) is True
    assert has_qdq(models["conv"]) is False
    assert has_qdq(models["affine"]) is False
    ops = {n.op_type for n in onnx.load(str(models["qdq"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_has_qdq_errors(tmp_path, monkeypatch, models):
    with pytest.raises(ModelError, match="does not exist"):
        has_qdq(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08junk" * 9)
    with pytest.raises(ModelError, match="bad.onnx"):
        has_qdq(bad)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendUnavailableError, match=r"fieldreid\[trt\]"):
        has_qdq(models["qdq"])


def test_qdq_model_runs_on_onnxruntime_close_to_fp32(models):
    x = np.random.default_rng(2).random((3, 3, 16, 16), dtype=np.float32)
    with OnnxRuntimeEngine(models["conv"]) as fp32, OnnxRuntimeEngine(models["qdq"]) as int8:
        a, b = fp32.run(x)["y"], int8.run(x)["y"]
        assert META.items() <= int8.metadata.items()  # quantisation keeps metadata_props (and adds its own)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


@pytest.fixture()
def tensorrt_must_not_load(monkeypatch):
    def forbidden():
        raise AssertionError("tensorrt was imported before the arguments were checked")

    monkeypatch.setattr(trt_backend, "_import_trt", forbidden)
    monkeypatch.setattr(trt_backend, "_import_cudart", forbidden)


def test_int8_on_plain_onnx_requires_explicit_quantisation(models, tmp_path, tensorrt_must_not_load):
    with pytest.raises(ModelError) as info:
        build_plan(models["conv"], tmp_path / "conv.engine", precision="int8")
    text = str(info.value)
    assert "QuantizeLinear/DequantizeLinear" in text
    assert "fieldreid export MODEL --int8 --calib CROPS" in text
    assert "deprecated" in text and "removed in 11" in text
    assert not (tmp_path / "conv.engine").exists()


def test_fp16_on_qdq_onnx_is_refused(models, tmp_path, tensorrt_must_not_load):
    with pytest.raises(ModelError, match="INT8 \\(QDQ\\) model; build it with --int8"):
        build_plan(models["qdq"], tmp_path / "q.engine", precision="fp16")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": "int4"}, "precision must be one of"),
        ({"precision": "FP16"}, "precision must be one of"),
        ({"min_batch": 4, "opt_batch": 2}, "1 <= min <= opt <= max"),
        ({"min_batch": 0}, "1 <= min <= opt <= max"),
        ({"opt_batch": 64, "max_batch": 32}, "1 <= min <= opt <= max"),
        ({"max_batch": True}, "max_batch must be an int"),
        ({"workspace_mib": 0}, "workspace_mib"),
    ],
)
def test_build_plan_argument_checks(models, tmp_path, tensorrt_must_not_load, kwargs, match):
    with pytest.raises(InputError, match=match):
        build_plan(models["affine"], tmp_path / "a.engine", **kwargs)


def test_build_plan_missing_onnx(tmp_path, tensorrt_must_not_load):
    with pytest.raises(ModelError, match="does not exist"):
        build_plan(tmp_path / "nothing.onnx", tmp_path / "nothing.engine")


def test_build_plan_without_tensorrt_names_extra(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError, installed or not
    with pytest.raises(BackendUnavailableError, match=r"pip install 'fieldreid\[trt\]'") as info:
        build_plan(models["affine"], tmp_path / "a.engine")
    assert "JetPack" in str(info.value)


def test_engine_without_tensorrt_names_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = tmp_path / "model.engine"
    plan.write_bytes(b"plan")
    with pytest.raises(BackendUnavailableError, match=r"tensorrt is not installed.*fieldreid\[trt\]"):
        TensorRTEngine(plan)


def test_missing_cuda_python_names_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(BackendUnavailableError, match=r"cuda-python is not installed.*fieldreid\[trt\]"):
        trt_backend._import_cudart()


def test_gpu_info_without_a_gpu_is_backend_unavailable():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    if cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match="No usable NVIDIA GPU 0"):
        trt_backend.gpu_info(0)


@pytest.mark.parametrize(
    ("device", "index"), [(0, 0), (2, 2), ("auto", 0), ("cuda", 0), ("cuda:1", 1), ("3", 3)]
)
def test_device_index(device, index):
    assert trt_backend._device_index(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:x", -1, True])
def test_device_index_rejects(device):
    with pytest.raises(InputError, match="onnxruntime"):
        trt_backend._device_index(device)


BUILT = {
    "source_onnx": "embedder.onnx",
    "precision": "fp16",
    "tensorrt_version": "10.3.0",
    "gpu_name": "Orin (nvgpu)",
}


def test_compatible_plan_passes():
    check_plan_compatible(BUILT, "10.3.0", "Orin (nvgpu)")
    check_plan_compatible(BUILT, " 10.3.0", "orin (NVGPU) ")  # whitespace / case in the driver's name


def test_plan_for_another_gpu_is_refused():
    with pytest.raises(ModelError) as info:
        check_plan_compatible(BUILT, "10.3.0", "NVIDIA GeForce RTX 4090", "engines/embedder.engine")
    text = str(info.value)
    assert "'Orin (nvgpu)'" in text and "NVIDIA GeForce RTX 4090" in text
    assert "TensorRT 10.3.0 (" not in text  # the version matched, so it is not blamed
    assert text.endswith("fieldreid export engines/embedder.onnx --fp16")


def test_plan_for_another_tensorrt_is_refused():
    with pytest.raises(ModelError, match=r"TensorRT 10\.3\.0 \(this device has 10\.7\.0\.23\)") as info:
        check_plan_compatible(BUILT, "10.7.0.23", "Orin (nvgpu)")
    assert "GPU" not in str(info.value).split("A TensorRT plan")[0]
    assert "fieldreid export embedder.onnx --fp16" in str(info.value)


def test_plan_for_other_tensorrt_and_gpu_names_both():
    with pytest.raises(ModelError, match=r"TensorRT 10\.3\.0 .* and GPU 'Orin \(nvgpu\)'"):
        check_plan_compatible(BUILT, "8.6.1", "Tesla T4")


@pytest.mark.parametrize("missing", ["tensorrt_version", "gpu_name"])
def test_manifest_without_versions_is_refused(missing):
    manifest = {k: v for k, v in BUILT.items() if k != missing}
    with pytest.raises(ModelError, match="does not record"):
        check_plan_compatible(manifest, "10.3.0", "Orin (nvgpu)")


def test_rebuild_command():
    assert rebuild_command({}) == "fieldreid export MODEL.onnx --fp16"
    assert rebuild_command({"source_onnx": "e.int8.onnx", "precision": "int8"}) == "fieldreid export e.int8.onnx --int8"
    assert rebuild_command(BUILT, Path("/data/engines/e.engine")) == "fieldreid export /data/engines/embedder.onnx --fp16"


# -- fakes of tensorrt and cuda-python: the code around TensorRT, without TensorRT ----------------------------
class FakeCudart:
    """cuda-python's runtime API shape: every call returns (err, *values). Device memory is a dict."""

    class cudaMemcpyKind:  # noqa: N801 - mirrors cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, gpu_name: str = "Fake GPU") -> None:
        self.gpu_name = gpu_name
        self.device: dict[int, bytearray] = {}
        self.host: dict[int, ctypes.Array] = {}
        self.next_ptr = 0x1000
        self.streams: set[int] = set()
        self.malloc_sizes: list[int] = []
        self.fail_malloc = False

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        props = types.SimpleNamespace(name=self.gpu_name.encode() + b"\x00\x00", major=8, minor=7,
                                      totalGlobalMem=8 << 30)
        return (0, props)

    def cudaGetErrorString(self, err):  # noqa: N802
        return (0, b"out of memory" if err == 2 else b"fake error")

    def cudaSetDevice(self, device):  # noqa: N802
        return (0,)

    def cudaMalloc(self, size):  # noqa: N802
        if self.fail_malloc:
            return (2, None)
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + size + 0x100
        self.device[ptr] = bytearray(size)
        self.malloc_sizes.append(size)
        return (0, ptr)

    def cudaFree(self, ptr):  # noqa: N802
        del self.device[ptr]
        return (0,)

    def cudaMallocHost(self, size):  # noqa: N802
        buf = (ctypes.c_uint8 * size)()
        self.host[ctypes.addressof(buf)] = buf
        return (0, ctypes.addressof(buf))

    def cudaFreeHost(self, ptr):  # noqa: N802
        del self.host[ptr]
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        stream = 77 + len(self.streams)
        self.streams.add(stream)
        return (0, stream)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.remove(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        assert stream in self.streams
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        assert stream in self.streams
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert len(self.device[dst]) >= count, "copy overruns the device buffer"
            self.device[dst][:count] = ctypes.string_at(src, count)
        else:
            assert len(self.device[src]) >= count, "copy overruns the device buffer"
            ctypes.memmove(dst, bytes(self.device[src][:count]), count)
        return (0,)


def make_fake_trt(cudart: FakeCudart, version: str = "10.3.0") -> types.SimpleNamespace:
    """Enough of the TensorRT 10 Python API to build and run y = x * 2 + 1 on (N, 3) float32."""
    calls: dict = {"flags": [], "cleared": [], "profiles": [], "network_flags": None, "workspace": None,
                   "timing_cache_in": None, "ignore_mismatch": None}
    enum = types.SimpleNamespace
    BuilderFlag = enum(FP16="FP16", TF32="TF32")  # noqa: N806
    TensorIOMode = enum(INPUT="INPUT", OUTPUT="OUTPUT")  # noqa: N806

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            model = onnx.load(path)
            for vi in model.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(vi.name, dims))
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+tuned"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def clear_flag(self, flag):
            calls["cleared"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile.shapes)

        def create_timing_cache(self, blob):
            calls["timing_cache_in"] = bytes(blob)
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            calls["ignore_mismatch"] = ignore_mismatch

        def get_timing_cache(self):
            return getattr(self, "cache", None)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"FAKEPLAN" + json.dumps([t.name for t in network.inputs]).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            ok = len(shape) == 2 and lo[0] <= shape[0] <= hi[0] and shape[1] == 3
            if ok:
                self.shapes[name] = tuple(shape)
            return ok

        def get_tensor_shape(self, name):
            return self.shapes["x"]

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int) and stream_handle in cudart.streams
            n = self.shapes["x"][0]
            x = np.frombuffer(bytes(cudart.device[self.addresses["x"]][: n * 12]), np.float32)
            y = (x * 2 + 1).astype(np.float32).tobytes()
            cudart.device[self.addresses["y"]][: len(y)] = y
            calls.setdefault("runs", []).append(n)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "x" else TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return (-1, 3)

        def get_tensor_dtype(self, name):
            return np.float32

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3), (4, 3), (8, 3)]

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if bytes(data).startswith(b"FAKEPLAN") else None

    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        BuilderFlag=BuilderFlag, TensorIOMode=TensorIOMode, nptype=lambda t: t,
        MemoryPoolType=enum(WORKSPACE="WORKSPACE"),
        NetworkDefinitionCreationFlag=enum(STRONGLY_TYPED=5),
        calls=calls,
    )


@pytest.fixture()
def fake(monkeypatch):
    cudart = FakeCudart()
    trt = make_fake_trt(cudart)
    monkeypatch.setattr(trt_backend, "_import_trt", lambda: trt)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    return types.SimpleNamespace(trt=trt, cudart=cudart)


def test_fake_build_fp16_writes_plan_and_manifest(fake, models, tmp_path):
    onnx_path = tmp_path / "affine.onnx"
    onnx_path.write_bytes(models["affine"].read_bytes())
    plan = build_plan(onnx_path, tmp_path / "affine.engine", precision="fp16", min_batch=1, opt_batch=4,
                      max_batch=8, workspace_mib=256)
    calls = fake.trt.calls
    assert calls["network_flags"] == 0  # not strongly typed: precision flags are allowed
    assert calls["flags"] == ["FP16"] and calls["cleared"] == []
    assert calls["workspace"] == ("WORKSPACE", 256 << 20)
    assert calls["profiles"] == [{"x": ((1, 3), (4, 3), (8, 3))}]
    assert plan.read_bytes().startswith(b"FAKEPLAN")  # the serialized engine as is: no header
    m = read_manifest(plan, verify_sha256=True)
    assert m["tensorrt_version"] == "10.3.0" and m["gpu_name"] == "Fake GPU"
    assert m["gpu_compute_capability"] == "8.7"
    assert m["precision"] == "fp16" and m["strongly_typed"] is False
    assert m["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert m["input_shapes"] == {"x": [[1, 3], [4, 3], [8, 3]]}
    assert m["source_onnx"] == "affine.onnx"
    assert m["source_onnx_sha256"] == trt_backend.sha256_file(onnx_path)
    assert m["onnx_metadata"] == META
    assert m["kind"] == "tensorrt-plan" and m["workspace_mib"] == 256


def test_fake_build_int8_is_strongly_typed_without_flags(fake, models, tmp_path):
    build_plan(models["qdq"], tmp_path / "q.engine", precision="int8")
    calls = fake.trt.calls
    assert calls["network_flags"] == 1 << 5
    assert calls["flags"] == []  # precision flags are not allowed in a strongly typed network
    assert calls["profiles"] == [{"x": ((1, 3, 16, 16), (8, 3, 16, 16), (32, 3, 16, 16))}]
    assert read_manifest(tmp_path / "q.engine")["strongly_typed"] is True


def test_fake_build_fp32_disables_tf32(fake, models, tmp_path):
    build_plan(models["affine"], tmp_path / "a.engine", precision="fp32")
    assert fake.trt.calls["flags"] == [] and fake.trt.calls["cleared"] == ["TF32"]


def test_fake_build_timing_cache_loaded_and_saved(fake, models, tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    build_plan(models["affine"], tmp_path / "a.engine", timing_cache=cache)
    assert fake.trt.calls["timing_cache_in"] == b"" and fake.trt.calls["ignore_mismatch"] is False
    assert cache.read_bytes() == b"+tuned"
    build_plan(models["affine"], tmp_path / "a.engine", timing_cache=cache)
    assert fake.trt.calls["timing_cache_in"] == b"+tuned"
    assert cache.read_bytes() == b"+tuned+tuned"


def test_fake_build_fixed_batch(fake, tmp_path):
    fixed = make_affine(tmp_path / "fixed.onnx", batch=4)
    with pytest.raises(ModelError, match="fixed batch of 4"):
        build_plan(fixed, tmp_path / "f.engine")
    build_plan(fixed, tmp_path / "f.engine", min_batch=4, opt_batch=4, max_batch=4)
    assert fake.trt.calls["profiles"] == []  # nothing dynamic, no profile needed
    assert read_manifest(tmp_path / "f.engine")["batch"] == {"min": 4, "opt": 4, "max": 4}


def test_fake_build_dynamic_spatial_axes_refused(fake, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    path = _save(graph, tmp_path / "dyn.onnx")
    with pytest.raises(ModelError, match="only the batch axis may be dynamic"):
        build_plan(path, tmp_path / "dyn.engine")


def _dynamic_hw_model(path: Path, batch: int | str = "N") -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["y"])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, "height", "width"])],
    )
    spec = PreprocessSpec(size=(640, 480), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="RGB",
                          resize="letterbox", pad_value=114)
    return _save(graph, path, {"fieldreid.kind": "detector", "fieldreid.preprocess": spec.to_json(),
                               "fieldreid.dynamic_shape": "true"})


@pytest.mark.parametrize("batch", ["N", 2])
def test_fake_build_dynamic_hw_detector_is_fixed_at_its_declared_size(fake, tmp_path, batch):
    """A detector exported with dynamic height/width (rectangles on ONNX Runtime) builds a plan fixed at the size
    its metadata declares: only the batch ranges, and a fixed-batch file still gets the profile TensorRT needs
    for its dynamic axes."""
    path = _dynamic_hw_model(tmp_path / "det.onnx", batch)
    kwargs = {} if batch == "N" else {"min_batch": 2, "opt_batch": 2, "max_batch": 2}
    build_plan(path, tmp_path / "det.engine", **kwargs)
    lo = (1 if batch == "N" else 2, 3, 640, 480)
    hi = (32 if batch == "N" else 2, 3, 640, 480)
    assert fake.trt.calls["profiles"] == [{"images": (lo, (8 if batch == "N" else 2, 3, 640, 480), hi)}]
    assert read_manifest(tmp_path / "det.engine")["input_shapes"]["images"][2] == list(hi)


def test_fake_engine_reports_profile_pinned_axes_as_fixed(fake, fake_plan, monkeypatch):
    """An engine axis that is dynamic in the network but pinned by the profile (min = max) is reported as fixed,
    so a Detector on such a plan letterboxes to the square it was built for; the batch axis stays dynamic."""
    engine_cls = type(fake.trt.Runtime(None).deserialize_cuda_engine(b"FAKEPLAN"))
    monkeypatch.setattr(engine_cls, "get_tensor_shape", lambda self, name: (-1, -1))
    with TensorRTEngine(fake_plan) as eng:
        assert eng.inputs[0].shape == (-1, 3) and eng.outputs[0].shape == (-1, -1)


def test_fake_build_replaces_stale_manifest(fake, models, tmp_path):
    plan = tmp_path / "a.engine"
    plan.write_bytes(b"old plan")
    write_manifest(plan, {"precision": "fp32", "tensorrt_version": "8.6"})
    build_plan(models["affine"], plan)
    assert read_manifest(plan, verify_sha256=True)["tensorrt_version"] == "10.3.0"


@pytest.fixture()
def fake_plan(fake, models, tmp_path) -> Path:
    return build_plan(models["affine"], tmp_path / "affine.engine", min_batch=1, opt_batch=4, max_batch=8)


@pytest.mark.parametrize("pinned", [False, True])
def test_fake_engine_runs_like_onnxruntime(fake, fake_plan, models, pinned):
    with TensorRTEngine(fake_plan, pinned=pinned) as eng, OnnxRuntimeEngine(models["affine"]) as ref:
        assert eng.backend == "tensorrt" and eng.device == "cuda:0"
        assert eng.input_names == ["x"] and eng.output_names == ["y"]
        assert eng.inputs[0].shape == (-1, 3) and eng.inputs[0].dtype == np.float32
        assert eng.metadata == META and eng.manifest["precision"] == "fp16"
        for n in (1, 3, 8, 2):
            x = np.random.default_rng(n).random((n, 3), dtype=np.float32)
            out = eng.run(x)
            np.testing.assert_allclose(out["y"], ref.run(x)["y"], rtol=1e-6)
            assert out["y"].shape == (n, 3)
        out_int = eng.run(np.ones((2, 3), np.int64))  # cast by the Engine template
        np.testing.assert_allclose(out_int["y"], 3.0)
    assert fake.cudart.device == {} and fake.cudart.host == {} and fake.cudart.streams == set()


def test_fake_engine_reallocates_only_when_batch_grows(fake, fake_plan):
    eng = TensorRTEngine(fake_plan)
    eng.run(np.zeros((2, 3), np.float32))
    assert eng._pool.allocations == 2  # x and y
    eng.run(np.zeros((1, 3), np.float32))
    eng.run(np.zeros((2, 3), np.float32))
    assert eng._pool.allocations == 2
    eng.run(np.zeros((6, 3), np.float32))
    assert eng._pool.allocations == 4
    assert len(fake.cudart.device) == 2  # the smaller buffers were freed
    assert fake.cudart.malloc_sizes == [24, 24, 72, 72]
    eng.close()
    assert fake.cudart.device == {}


def test_fake_engine_batch_outside_profile(fake, fake_plan):
    with TensorRTEngine(fake_plan) as eng:
        with pytest.raises(InputError, match=r"outside this engine's profile .*batch 1\.\.8") as info:
            eng.run(np.zeros((9, 3), np.float32))
        assert "fieldreid export" in str(info.value)
        with pytest.raises(InputError, match="axis 1 must be 3"):
            eng.run(np.zeros((2, 4), np.float32))
        empty = eng.run(np.zeros((0, 3), np.float32))
        assert empty["y"].shape == (0, 3)


def test_fake_engine_out_of_gpu_memory(fake, fake_plan):
    with TensorRTEngine(fake_plan) as eng:
        fake.cudart.fail_malloc = True
        with pytest.raises(FieldreidError, match="cudaMalloc.*out of memory.*Lower the batch size"):
            eng.run(np.zeros((2, 3), np.float32))


def test_fake_engine_refuses_plan_for_another_gpu(fake, fake_plan):
    fake.cudart.gpu_name = "NVIDIA GeForce RTX 4090"
    with pytest.raises(ModelError, match=r"'Fake GPU' \(this device has 'NVIDIA GeForce RTX 4090'\)") as info:
        TensorRTEngine(fake_plan)
    assert "fieldreid export" in str(info.value) and "affine.onnx --fp16" in str(info.value)


def test_fake_engine_refuses_plan_for_another_tensorrt(fake, fake_plan, monkeypatch):
    monkeypatch.setattr(fake.trt, "__version__", "10.8.0")
    with pytest.raises(ModelError, match=r"TensorRT 10\.3\.0 \(this device has 10\.8\.0\)"):
        TensorRTEngine(fake_plan)


@pytest.mark.parametrize("precision", ["fp16", "fp32", "int8"])
def test_export_writes_the_plan_that_auto_selection_loads(fake, models, tmp_path, monkeypatch, precision):
    """`fieldreid export X.onnx --fp16` (or --fp32-plan, or --int8 on the QDQ model) names its plan with the
    same function that backend selection uses, so the plan it wrote is the plan `auto` loads."""
    import shutil

    from fieldreid.engines import load_engine, registry
    from fieldreid.engines.manifest import plan_path
    from fieldreid.export import run as export_cmd

    monkeypatch.setattr(export_cmd, "_tensorrt_available", lambda: True)
    monkeypatch.setattr(registry, "_installed", lambda package: True)
    monkeypatch.setattr(registry, "available_backends", lambda: {"tensorrt": "ok", "onnxruntime": "ok"})
    src = models["qdq"] if precision == "int8" else models["affine"]
    onnx_path = Path(shutil.copy(src, tmp_path / src.name))
    flag = {"fp16": "fp16", "fp32": "fp32_plan", "int8": "int8"}[precision]
    res = export_cmd.run_export(onnx_path, export_cmd.ExportOptions(**{flag: True}))
    plan = plan_path(onnx_path, precision)
    assert res.written == [plan, manifest_path(plan)] and read_manifest(plan)["precision"] == precision
    with load_engine(onnx_path) as eng:
        assert isinstance(eng, TensorRTEngine) and eng.path == plan


def test_fake_engine_plan_problems(fake, fake_plan, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        TensorRTEngine(tmp_path / "missing.engine")
    with pytest.raises(ModelError, match=r"Build it with: fieldreid export \S*gone\.int8\.onnx --int8"):
        TensorRTEngine(tmp_path / "gone.int8.engine")
    manifest = manifest_path(fake_plan)
    saved = manifest.read_text()
    manifest.unlink()
    with pytest.raises(ModelError, match="affine.engine.json is missing"):
        TensorRTEngine(fake_plan)
    manifest.write_text("{broken")
    with pytest.raises(ModelError, match="corrupt"):
        TensorRTEngine(fake_plan)
    manifest.write_text(saved)
    fake_plan.write_bytes(b"FAKEPLAN truncated")
    with pytest.raises(ModelError, match="changed or truncated"):
        TensorRTEngine(fake_plan)
    fake_plan.write_bytes(b"not a plan")
    write_manifest(fake_plan, json.loads(saved))
    with pytest.raises(ModelError, match="could not deserialize"):
        TensorRTEngine(fake_plan)
    assert fake.cudart.streams == set()  # nothing leaked by the failed loads


def test_fake_engine_through_registry(fake, fake_plan, monkeypatch):
    from fieldreid.engines import load_engine, registry

    monkeypatch.setattr(registry, "_installed", lambda package: True)
    monkeypatch.setattr(registry, "available_backends", lambda: {"tensorrt": "ok", "onnxruntime": "ok"})
    onnx_beside = fake_plan.with_suffix(".onnx")
    onnx_beside.write_bytes(b"")
    with load_engine(onnx_beside, threads=2) as eng:  # auto: the plan beside the ONNX, options shared
        assert isinstance(eng, TensorRTEngine)
        np.testing.assert_allclose(eng.run(np.zeros((1, 3), np.float32))["y"], 1.0)


# -- real TensorRT on a real GPU ---------------------------------------------------------------------------
def _real_trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'fieldreid[trt]')")
    pytest.importorskip("cuda", reason="cuda-python is not installed (pip install 'fieldreid[trt]')")
    if cuda_device_count() == 0:
        pytest.skip("no NVIDIA GPU visible")
    return trt


@pytest.mark.tensorrt
def test_real_fp16_plan_matches_onnxruntime(models, tmp_path):
    _real_trt()
    plan = build_plan(models["conv"], tmp_path / "conv.engine", precision="fp16", min_batch=1, opt_batch=4,
                      max_batch=8, workspace_mib=256, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    x = np.random.default_rng(3).random((5, 3, 16, 16), dtype=np.float32)
    with TensorRTEngine(plan) as eng, OnnxRuntimeEngine(models["conv"]) as ref:
        assert eng.metadata == META
        got, want = eng.run(x)["y"], ref.run(x)["y"]
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
        assert eng.run(x[:1])["y"].shape == (1, 8)
        with pytest.raises(InputError):
            eng.run(np.zeros((9, 3, 16, 16), np.float32))
    with TensorRTEngine(plan, pinned=True) as eng:
        np.testing.assert_allclose(eng.run(x)["y"], want, rtol=2e-2, atol=2e-2)


@pytest.mark.tensorrt
def test_real_int8_plan_from_qdq(models, tmp_path):
    _real_trt()
    plan = build_plan(models["qdq"], tmp_path / "q.engine", precision="int8", max_batch=8, opt_batch=4)
    assert read_manifest(plan)["strongly_typed"] is True
    x = np.random.default_rng(4).random((4, 3, 16, 16), dtype=np.float32)
    with TensorRTEngine(plan) as eng, OnnxRuntimeEngine(models["conv"]) as ref:
        a, b = eng.run(x)["y"], ref.run(x)["y"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.97
