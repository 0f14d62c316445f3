"""ONNX Runtime backend: CPU everywhere, the CUDA execution provider where present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fieldreid.engines.base import Engine, EngineIO
from fieldreid.errors import ModelError, missing_extra

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def default_threads() -> int:
    """Cores this process may use. ORT's own default ignores cgroup/affinity limits and oversubscribes."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cpu_int8_flags() -> dict[str, object]:
    """The CPU model and its INT8 dot-product instructions (what decides whether INT8 can pay on ORT CPU).

    Recorded beside every benchmark figure; empty flags off Linux (no /proc/cpuinfo).
    """
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
    return {"cpu": model, **{n: n in flags for n in names}}


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 low_memory: bool = False) -> None:
        self._want_device = device
        self._threads = threads
        #: ``low_memory``: no CPU memory arena and no memory-pattern planning, so freed tensors go back to the
        #: allocator at once (peak RSS of ``watch`` ~halves; see README *Measured*), at some throughput.
        self.low_memory = bool(low_memory)
        super().__init__(path)

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - core dependency
            raise missing_extra("onnxruntime", "core") from exc
        opts = ort.SessionOptions()
        # One intra-op pool sized to the cores we own; a second (inter-op) pool only adds contention
        # on a 2-core box or a Jetson, since these graphs are sequential chains.
        opts.intra_op_num_threads = self._threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.low_memory:
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if self._want_device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif self._want_device == "cuda":
            raise ModelError(
                "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu or use --device cpu."
            )
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelError(f"ONNX Runtime could not load {self.path}: {exc}") from exc
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        unsupported = [f"{i.name} ({i.type})" for i in self.session.get_inputs() if i.type not in _ORT_DTYPES]
        if unsupported:
            raise ModelError(
                f"{self.path} has inputs of a type fieldreid cannot feed: {', '.join(unsupported)}. "
                "Export the model with float32 inputs."
            )
        self.inputs = [
            EngineIO(i.name, tuple(d if isinstance(d, int) else -1 for d in i.shape), np.dtype(_ORT_DTYPES[i.type]))
            for i in self.session.get_inputs()
        ]
        self.outputs = [
            EngineIO(o.name, tuple(d if isinstance(d, int) else -1 for d in o.shape),
                     np.dtype(_ORT_DTYPES.get(o.type, np.float32)))
            for o in self.session.get_outputs()
        ]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def _close(self) -> None:
        del self.session
