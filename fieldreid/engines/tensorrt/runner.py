"""TensorRT backend (Jetson / desktop NVIDIA GPU): build a plan from ONNX, and run one.

Written against the TensorRT 10 Python API and its name-based tensor I/O (``num_io_tensors``,
``get_tensor_name``/``mode``/``shape``/``dtype``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``); the binding-index API of TensorRT 8 is gone in 10.

Device memory comes from NVIDIA's **cuda-python** (``cuda.bindings.runtime``, or ``cuda.cudart`` in
cuda-python < 12.8) rather than pycuda: cuda-python is maintained by NVIDIA alongside CUDA, ships
prebuilt wheels for x86_64 *and* aarch64 (Jetson), and needs no compiler or CUDA headers at install
time, whereas pycuda builds from source against the local toolkit. TensorRT's own samples use it.

Plans are plain serialized engines (no custom header), so ``trtexec --loadEngine=model.engine`` reads
them. What the plan is lives beside it in ``model.engine.json`` (see :mod:`fieldreid.engines.manifest`):
source ONNX sha256, precision, batch profile, TensorRT version and GPU. A plan only runs on the TensorRT
version and GPU model it was built with, so a mismatch is refused with the command that rebuilds it.

INT8 is explicit quantisation only: the ONNX must carry QuantizeLinear/DequantizeLinear nodes and the
network is built STRONGLY_TYPED. TensorRT's implicit INT8 calibrator (``IInt8Calibrator``) is deprecated
in TensorRT 10 (TRT_DEPRECATED in the 10.x API) and removed in TensorRT 11; in a strongly typed network
the precision builder flags (FP16/INT8) are not allowed, since tensor types come from the network itself.
TensorRT 11 also removes ``BuilderFlag.FP16``; :func:`build_plan` then says so instead of failing obscurely.

Nothing here imports tensorrt or cuda at module level: this module imports (and its pure helpers are
tested) on machines without either.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from fieldreid.engines.base import Engine, EngineIO
from fieldreid.engines.manifest import (
    has_qdq,
    manifest_path,
    onnx_metadata,
    plan_precision,
    plan_source_onnx,
    read_manifest,
    sha256_file,
)
from fieldreid.engines.manifest import write_manifest as _write_manifest
from fieldreid.errors import BackendUnavailableError, FieldreidError, InputError, ModelError, missing_extra
from fieldreid.storage.fsutil import atomic_write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
_JETSON_HINT = "on a Jetson it comes with JetPack: create the venv with --system-site-packages"

_LOGGER: Any = None  # one trt.Logger per process: TensorRT warns when builders/runtimes get different ones


# -- lazy imports --------------------------------------------------------------------------------------
def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise missing_extra("tensorrt", "trt", f"needed to build and run TensorRT engines; {_JETSON_HINT}") from exc
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise missing_extra("cuda-python", "trt", "the CUDA runtime bindings TensorRT buffers are made with") from exc
    return cudart


def _trt_logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


# -- CUDA helpers --------------------------------------------------------------------------------------
def _cuda(cudart, result, what: str):
    """Unpack a cuda-python ``(err, *values)`` tuple; a FieldreidError naming the call if err != 0."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        try:
            text = cudart.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001 - the original error matters more than its description
            text = str(err)
        hint = ""
        if int(err) == 2:  # cudaErrorMemoryAllocation
            hint = " Lower the batch size, or close other programs using the GPU."
        raise FieldreidError(f"CUDA call {what} failed: {text}.{hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info(device: int = 0) -> dict[str, Any]:
    """``{"name", "compute_capability", "total_memory_mib"}`` of a CUDA device, via cuda-python.

    :class:`BackendUnavailableError` when no usable GPU/driver is present.
    """
    cudart = _import_cudart()
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        try:
            text = cudart.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001
            text = str(err)
        raise BackendUnavailableError(
            f"No usable NVIDIA GPU {device} for TensorRT ({text}). Check the driver with nvidia-smi "
            "(tegrastats on a Jetson), or run on the CPU with --backend onnxruntime."
        )
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return {
        "name": name.split("\x00", 1)[0].strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_mib": int(props.totalGlobalMem) >> 20,
    }


# -- plan / manifest compatibility (pure, testable without TensorRT) ------------------------------------
def rebuild_command(manifest: dict, plan_path: str | Path | None = None) -> str:
    """The command that rebuilds a plan on this device, from what its manifest says it was built from."""
    source = manifest.get("source_onnx") or "MODEL.onnx"
    if plan_path is not None:
        source = str(Path(plan_path).with_name(Path(source).name))
    precision = manifest.get("precision") if manifest.get("precision") in PRECISIONS else "fp16"
    return f"fieldreid export {source} --{precision}"


def check_plan_compatible(manifest: dict, trt_version: str, gpu_name: str,
                          plan_path: str | Path | None = None) -> None:
    """Raise :class:`ModelError` unless the plan's manifest names this TensorRT version and GPU model.

    TensorRT plans are tied to the exact TensorRT version and to the GPU they were tuned on; loading one
    elsewhere fails inside TensorRT with an obscure message, or worse, runs kernels tuned for another GPU.
    """
    what = str(plan_path) if plan_path is not None else "This TensorRT plan"
    built_trt = manifest.get("tensorrt_version")
    built_gpu = manifest.get("gpu_name")
    command = rebuild_command(manifest, plan_path)
    if not built_trt or not built_gpu:
        raise ModelError(
            f"{what}: its manifest does not record the TensorRT version and GPU it was built for, so it "
            f"cannot be checked. Rebuild it on this device with: {command}"
        )
    same_trt = str(built_trt).strip() == str(trt_version).strip()
    same_gpu = str(built_gpu).strip().casefold() == str(gpu_name).strip().casefold()
    if same_trt and same_gpu:
        return
    differences = []
    if not same_trt:
        differences.append(f"TensorRT {built_trt} (this device has {trt_version})")
    if not same_gpu:
        differences.append(f"GPU {built_gpu!r} (this device has {gpu_name!r})")
    raise ModelError(
        f"{what} was built for {' and '.join(differences)}. A TensorRT plan only runs with the TensorRT "
        f"version and GPU model it was built with. Rebuild it on this device with: {command}"
    )


# -- build -------------------------------------------------------------------------------------------
def _check_build_args(precision: str, min_batch: int, opt_batch: int, max_batch: int, workspace_mib: int) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    for name, value in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch),
                        ("workspace_mib", workspace_mib)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name} must be an int, got {value!r}.")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(
            f"Batch sizes must satisfy 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}."
        )
    if workspace_mib < 1:
        raise InputError(f"workspace_mib must be >= 1, got {workspace_mib}.")


def _require_qdq_for_int8(onnx_path: Path, precision: str) -> None:
    """Explicit quantisation check, done with ``onnx`` before TensorRT is touched."""
    if precision == "int8":
        if not has_qdq(onnx_path):
            raise ModelError(
                f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so it cannot be built as INT8. "
                "fieldreid builds INT8 TensorRT engines only from explicitly quantised (QDQ) ONNX models, as a "
                "strongly typed network: TensorRT's implicit INT8 calibrator is deprecated in TensorRT 10 and "
                "removed in 11. Make the QDQ model first with: fieldreid export MODEL --int8 --calib CROPS"
            )
        return
    try:
        import onnx  # noqa: F401
    except ImportError:
        return  # nothing to check with; TensorRT reports Q/DQ in a weakly typed network itself
    if has_qdq(onnx_path):
        raise ModelError(
            f"{onnx_path} is an INT8 (QDQ) model; build it with --int8, or pass the FP32 ONNX for --{precision}."
        )


def _declared_hw(metadata: dict[str, str]) -> tuple[int, int] | None:
    """The (h, w) input size a fieldreid model declares (``fieldreid.preprocess``), if any."""
    import json

    try:
        size = json.loads(metadata.get("fieldreid.preprocess", "{}")).get("size")
        return (int(size[0]), int(size[1])) if size and len(size) == 2 else None
    except (ValueError, TypeError, AttributeError):
        return None


def _batch_profile(network, min_batch: int, opt_batch: int, max_batch: int,
                   declared_hw: tuple[int, int] | None = None) -> dict[str, tuple]:
    """``{input: (min, opt, max shapes)}`` over axis 0; other axes must be fixed in the ONNX, except the
    height and width of an NCHW image input whose model declares its size (``declared_hw``, e.g. a detector
    exported with dynamic spatial axes for rectangular letterboxing on ONNX Runtime): the plan fixes them
    there (min = opt = max), so it is a fixed-size engine like one built from a fixed-size ONNX."""
    shapes: dict[str, tuple] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        if not shape:
            raise ModelError(f"Input {tensor.name!r} is a scalar; fieldreid engines take batched tensors.")
        rest = shape[1:]
        if declared_hw is not None and len(shape) == 4 and rest[0] > 0 and any(d < 0 for d in rest[1:]):
            rest = (rest[0], *(d if d > 0 else s for d, s in zip(rest[1:], declared_hw, strict=True)))
            shape = (shape[0], *rest)
        if any(d < 0 for d in rest):
            raise ModelError(
                f"Input {tensor.name!r} has shape {shape}: only the batch axis may be dynamic. Export the ONNX "
                "with a fixed input size (the export profile's [input] height/width)."
            )
        batch = shape[0]
        if batch >= 0:
            if not min_batch == opt_batch == max_batch == batch:
                raise ModelError(
                    f"Input {tensor.name!r} has a fixed batch of {batch}, but a batch profile "
                    f"{min_batch}/{opt_batch}/{max_batch} was asked for. Export the ONNX with a dynamic batch "
                    f"axis, or build with min = opt = max = {batch}."
                )
            shapes[tensor.name] = (shape, shape, shape)
        else:
            shapes[tensor.name] = ((min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    return shapes


def build_plan(
    onnx_path: str | Path,
    plan_path: str | Path,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    timing_cache: Path | None = None,
    device: int = 0,
) -> Path:
    """Build a TensorRT plan from an ONNX file on this device and write ``plan_path`` + its manifest.

    ``precision``: ``fp16`` (BuilderFlag.FP16 on a normal network), ``fp32`` (TF32 disabled, so FP32 means
    FP32), or ``int8`` (the ONNX must be QDQ; built STRONGLY_TYPED, no precision flags). ``timing_cache``
    is loaded if it exists and saved after the build (speeds up rebuilds on the same device).

    >>> build_plan("engines/default/embedder.onnx", "engines/default/embedder.fp16.engine")  # doctest: +SKIP
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    _check_build_args(precision, min_batch, opt_batch, max_batch, workspace_mib)
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model {onnx_path} does not exist.")
    _require_qdq_for_int8(onnx_path, precision)

    trt = _import_trt()
    gpu = gpu_info(device)  # fail early (no GPU) before minutes of building
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if precision == "int8":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no details"
        raise ModelError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise BackendUnavailableError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11, where every network "
                "is strongly typed). Use TensorRT 10, or export an ONNX whose tensors are already FP16."
            )
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default on Ampere+ (Orin): not FP32 numerics

    shapes = _batch_profile(network, min_batch, opt_batch, max_batch, _declared_hw(onnx_metadata(onnx_path)))
    dynamic_inputs = {network.get_input(i).name for i in range(network.num_inputs)
                      if any(int(d) < 0 for d in network.get_input(i).shape)}
    if any(lo != hi for lo, _, hi in shapes.values()) or dynamic_inputs:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FieldreidError(
            f"TensorRT could not build {onnx_path.name} ({precision}); see the TensorRT messages above. If they "
            f"mention memory, raise the workspace (now {workspace_mib} MiB) or lower the max batch ({max_batch})."
        )
    # A manifest left from an older plan must not describe the new one, even for a moment.
    manifest_path(plan_path).unlink(missing_ok=True)
    atomic_write_bytes(plan_path, memoryview(serialized))
    if timing_cache is not None:
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write_bytes(timing_cache, memoryview(cache.serialize()))

    batches = {name: [int(lo[0]), int(opt[0]), int(hi[0])] for name, (lo, opt, hi) in shapes.items()}
    first = next(iter(batches.values()), [min_batch, opt_batch, max_batch])
    _write_manifest(
        plan_path,
        {
            "kind": "tensorrt-plan",
            "source_onnx": onnx_path.name,
            "source_onnx_sha256": sha256_file(onnx_path),
            "precision": precision,
            "strongly_typed": precision == "int8",
            "tensorrt_version": str(trt.__version__),
            "gpu_name": gpu["name"],
            "gpu_compute_capability": gpu["compute_capability"],
            "batch": {"min": first[0], "opt": first[1], "max": first[2]},
            "input_shapes": {name: [list(s) for s in triple] for name, triple in shapes.items()},
            "workspace_mib": workspace_mib,
            "onnx_metadata": onnx_metadata(onnx_path),
        },
    )
    return plan_path


# -- run ---------------------------------------------------------------------------------------------
class _Buffer:
    """One device allocation (and an optional pinned host staging area) that only ever grows."""

    __slots__ = ("device_ptr", "host_ptr", "nbytes")

    def __init__(self) -> None:
        self.device_ptr = 0
        self.host_ptr = 0
        self.nbytes = 0


class _BufferPool:
    """Per-tensor device buffers, reallocated only when a batch needs more bytes than they hold."""

    def __init__(self, cudart, pinned: bool) -> None:
        self.cudart = cudart
        self.pinned = pinned
        self.buffers: dict[str, _Buffer] = {}
        self.allocations = 0  # for tests and diagnostics

    def get(self, name: str, nbytes: int) -> _Buffer:
        buf = self.buffers.setdefault(name, _Buffer())
        nbytes = max(int(nbytes), 1)
        if buf.nbytes < nbytes:
            self._free(buf)
            buf.device_ptr = int(_cuda(self.cudart, self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
            buf.nbytes = nbytes  # set before the host allocation so a failure there still frees the device part
            if self.pinned:
                buf.host_ptr = int(_cuda(self.cudart, self.cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
            self.allocations += 1
        return buf

    def host_view(self, buf: _Buffer, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of a pinned staging area as a uint8 numpy array (no copy)."""
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(buf.host_ptr))

    def _free(self, buf: _Buffer) -> None:
        if buf.device_ptr:
            _cuda(self.cudart, self.cudart.cudaFree(buf.device_ptr), "cudaFree")
            buf.device_ptr = 0
        if buf.host_ptr:
            _cuda(self.cudart, self.cudart.cudaFreeHost(buf.host_ptr), "cudaFreeHost")
            buf.host_ptr = 0
        buf.nbytes = 0

    def free_all(self) -> None:
        for buf in self.buffers.values():
            self._free(buf)
        self.buffers.clear()


def _device_index(device: int | str) -> int:
    """0 for ``"auto"``/``"cuda"``, N for ``"cuda:N"`` or N; ``"cpu"`` is an error (TensorRT needs a GPU)."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    text = str(device).strip().lower()
    if text in ("auto", "cuda", "gpu"):
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text.isdigit():
        return int(text)
    raise InputError(
        f"TensorRT runs on an NVIDIA GPU: device must be auto, cuda, cuda:N or a GPU index, got {device!r}. "
        "For the CPU use --backend onnxruntime."
    )


class TensorRTEngine(Engine):
    """Runs a TensorRT plan built by :func:`build_plan` on this device.

    ``device``: CUDA device (index, ``"cuda:N"`` or ``"auto"``). ``pinned``: stage host↔device copies through page-locked buffers
    (faster transfers on a desktop GPU; little gain on a Jetson, whose memory is shared).
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, device: int | str = 0, pinned: bool = False,
                 threads: int | None = None, low_memory: bool = False) -> None:
        # ``threads`` and ``low_memory`` are accepted so that ``load_engine(path, "auto", threads=2,
        # low_memory=True)`` works whichever backend ``auto`` picks; TensorRT has no CPU thread pool to size and
        # no CPU memory arena to turn off (its host memory is the I/O buffers, allocated once per shape).
        self._device_index = _device_index(device)
        self._pinned = bool(pinned)
        self._runtime = self._engine = self._context = None
        self._stream = None
        self._pool: _BufferPool | None = None
        self._profiles: dict[str, tuple[tuple, tuple]] = {}
        self.manifest: dict = {}
        super().__init__(path)

    # -- template ------------------------------------------------------------------------------------
    def _load(self) -> None:
        trt = _import_trt()
        cudart = _import_cudart()
        self._trt, self._cudart = trt, cudart
        if not self.path.is_file():
            raise ModelError(f"TensorRT plan {self.path} does not exist. Build it with: fieldreid export "
                             f"{plan_source_onnx(self.path)} --{plan_precision(self.path) or 'fp16'}")
        manifest = read_manifest(self.path)
        gpu = gpu_info(self._device_index)
        check_plan_compatible(manifest, str(trt.__version__), gpu["name"], self.path)
        data = self.path.read_bytes()
        recorded = manifest.get("artefact_sha256")
        if recorded and hashlib.sha256(data).hexdigest() != recorded:
            raise ModelError(
                f"{self.path} does not match the checksum in its manifest: the file was changed or truncated. "
                f"Rebuild it with: {rebuild_command(manifest, self.path)}"
            )
        try:
            _cuda(cudart, cudart.cudaSetDevice(self._device_index), f"cudaSetDevice({self._device_index})")
            self._runtime = trt.Runtime(_trt_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise ModelError(
                    f"TensorRT could not deserialize {self.path} (see the TensorRT messages above). "
                    f"Rebuild it with: {rebuild_command(manifest, self.path)}"
                )
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise FieldreidError(
                    f"TensorRT could not create an execution context for {self.path}: usually out of GPU memory."
                )
            self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._pool = _BufferPool(cudart, self._pinned)
            self._describe_io(trt)
        except BaseException:
            self._release()
            raise
        self.manifest = manifest
        self.metadata = {str(k): str(v) for k, v in (manifest.get("onnx_metadata") or {}).items()}
        self.device = f"cuda:{self._device_index}"

    def _describe_io(self, trt) -> None:
        engine = self._engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            try:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            except TypeError as exc:
                raise ModelError(
                    f"Tensor {name!r} of {self.path} has type {engine.get_tensor_dtype(name)}, which numpy cannot "
                    "hold; export the ONNX with float32/float16/int inputs and outputs."
                ) from exc
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if any(d < 0 for d in shape):
                    lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
                    lo, hi = tuple(int(d) for d in lo), tuple(int(d) for d in hi)
                    self._profiles[name] = (lo, hi)
                    # An axis the profile pins (min = max: the height and width of a plan built from a
                    # dynamic-shape detector) is fixed for this engine: say so, as a fixed ONNX axis would.
                    shape = tuple(a if k > 0 and d < 0 and a == b else d
                                  for k, (d, a, b) in enumerate(zip(shape, lo, hi, strict=False)))
                self.inputs.append(EngineIO(name, shape, dtype))
            else:
                self.outputs.append(EngineIO(name, shape, dtype))

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, context, pool = self._cudart, self._context, self._pool
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if any(arr.shape[0] == 0 for arr in feed.values() if arr.ndim):
            return {io.name: np.zeros(tuple(max(d, 0) for d in io.shape), io.dtype) for io in self.outputs}
        for io in self.inputs:
            arr = feed[io.name]
            self._check_profile(io.name, arr.shape)
            if not context.set_input_shape(io.name, arr.shape):
                raise InputError(f"TensorRT rejected shape {arr.shape} for input {io.name!r} of {self.path}.")
            buf = pool.get(io.name, arr.nbytes)
            src = arr.ctypes.data
            if pool.pinned:
                pool.host_view(buf, arr.nbytes)[:] = arr.reshape(-1).view(np.uint8)
                src = buf.host_ptr
            _cuda(cudart, cudart.cudaMemcpyAsync(buf.device_ptr, src, arr.nbytes, h2d, self._stream),
                  f"cudaMemcpyAsync({io.name} to GPU)")
            context.set_tensor_address(io.name, buf.device_ptr)
        results: dict[str, np.ndarray] = {}
        staged: list[tuple[str, np.ndarray, _Buffer]] = []
        for io in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(io.name))
            if any(d < 0 for d in shape):
                raise ModelError(
                    f"Output {io.name!r} of {self.path} has a data-dependent shape {shape}, which this backend does "
                    "not support; run the model with --backend onnxruntime."
                )
            nbytes = math.prod(shape) * io.dtype.itemsize
            buf = pool.get(io.name, nbytes)
            context.set_tensor_address(io.name, buf.device_ptr)
            out = np.empty(shape, io.dtype)
            results[io.name] = out
            staged.append((io.name, out, buf))
        if not context.execute_async_v3(int(self._stream)):
            raise FieldreidError(f"TensorRT failed to run {self.path} (see the TensorRT messages above).")
        for name, out, buf in staged:
            dst = buf.host_ptr if pool.pinned else out.ctypes.data
            _cuda(cudart, cudart.cudaMemcpyAsync(dst, buf.device_ptr, out.nbytes, d2h, self._stream),
                  f"cudaMemcpyAsync({name} from GPU)")
        # Pageable source arrays in ``feed`` stay alive until here, so the async copies read valid memory.
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        if pool.pinned:
            for _name, out, buf in staged:
                out.reshape(-1).view(np.uint8)[:] = pool.host_view(buf, out.nbytes)
        return results

    def _check_profile(self, name: str, shape: tuple) -> None:
        bounds = self._profiles.get(name)
        if bounds is None:
            return
        lo, hi = bounds
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=False)):
            raise InputError(
                f"Input {name!r} shape {tuple(shape)} is outside this engine's profile {lo}..{hi} (batch "
                f"{lo[0]}..{hi[0]}): split the batch, or rebuild with a larger max batch: "
                f"{rebuild_command(self.manifest or {}, self.path)}"
            )

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
        # Buffers and stream first, then context before engine before runtime (TensorRT's required order).
        if self._pool is not None:
            self._pool.free_all()
            self._pool = None
        if self._stream is not None:
            _cuda(self._cudart, self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None
