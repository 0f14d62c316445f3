"""Backend registry: names map to lazily imported engine classes; ``auto`` picks the best one present."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from fieldreid.engines.base import Engine
from fieldreid.engines.manifest import (
    PLAN_SUFFIXES,
    find_plan,
    is_int8_onnx,
    plan_candidates,
    plan_source_onnx,
)
from fieldreid.errors import BackendUnavailableError, ModelError

#: backend name -> (module, class, python package it needs, extra that installs it)
BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "onnxruntime": ("fieldreid.engines.ort", "OnnxRuntimeEngine", "onnxruntime", "core"),
    "tensorrt": ("fieldreid.engines.tensorrt.runner", "TensorRTEngine", "tensorrt", "trt"),
    "torch": ("fieldreid.engines.torch", "TorchEngine", "torch", "train"),
}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        return False


def _cuda_bindings() -> bool:
    # torch's CUDA wheels bring a bare ``cuda`` namespace (cuda-pathfinder) without the runtime bindings.
    return _installed("cuda.bindings") or _installed("cuda.cudart")


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of NVIDIA GPUs visible, without importing torch or TensorRT (``nvidia-smi``, then /dev)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    # Jetson has no nvidia-smi; its integrated GPU shows up as a device node.
    return 1 if Path("/dev/nvhost-gpu").exists() or Path("/dev/nvgpu/igpu0").exists() else 0


def available_backends() -> dict[str, str]:
    """``{backend: "ok" | reason it is unavailable}`` without importing any backend."""
    status = {}
    for name, (_module, _cls, package, extra) in BACKENDS.items():
        if not _installed(package):
            status[name] = f"not installed (pip install 'fieldreid[{extra}]')"
        elif name == "tensorrt" and (not _cuda_bindings() or cuda_device_count() == 0):
            status[name] = "no NVIDIA GPU visible" if cuda_device_count() == 0 else "cuda-python not installed"
        else:
            status[name] = "ok"
    return status


def backend_class(name: str) -> type[Engine]:
    """The engine class for a backend name, importing it now; a clear error if it is missing."""
    if name not in BACKENDS:
        raise BackendUnavailableError(f"Unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}.")
    module, cls, package, extra = BACKENDS[name]
    if not _installed(package):
        raise BackendUnavailableError(
            f"The {name} backend needs the Python package {package!r}, which is not installed. "
            f"Install it with: pip install 'fieldreid[{extra}]'"
            + (" (on a Jetson, TensorRT comes with JetPack: create the venv with --system-site-packages)"
               if name == "tensorrt" else "")
        )
    return getattr(importlib.import_module(module), cls)


def plan_for(onnx_path: Path) -> Path | None:
    """The best TensorRT plan built from ``onnx_path`` beside it (:func:`fieldreid.engines.manifest.find_plan`)."""
    return find_plan(onnx_path)


def _no_plan_message(onnx_path: Path) -> str:
    looked = plan_candidates(onnx_path)
    precision = "int8" if is_int8_onnx(onnx_path) else "fp16"
    return (f"No TensorRT plan for {onnx_path}: looked for {', '.join(str(p) for p in looked)}. Build one on this "
            f"device with: fieldreid export {onnx_path} --{precision}")


def select_backend(path: str | Path, backend: str = "auto") -> tuple[str, Path]:
    """Resolve ``auto`` and the file to load: TensorRT where a plan and a GPU exist, else ONNX Runtime."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"Model file {path} does not exist. Run `make models` or pass the path of an ONNX model.")
    is_plan = path.suffix in PLAN_SUFFIXES
    if backend == "auto":
        trt_ok = available_backends()["tensorrt"] == "ok"
        if is_plan:
            if trt_ok:
                return "tensorrt", path
            onnx = plan_source_onnx(path)
            if onnx.exists():
                return "onnxruntime", onnx
            raise BackendUnavailableError(
                f"{path} is a TensorRT plan but TensorRT cannot run here ({available_backends()['tensorrt']}), "
                f"and no {onnx.name} lies beside it for ONNX Runtime."
            )
        plan = plan_for(path) if trt_ok else None
        if plan is not None:
            return "tensorrt", plan
        if path.suffix == ".pt":
            return "torch", path
        return "onnxruntime", path
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"Unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}.")
    if backend == "tensorrt" and not is_plan:
        plan = plan_for(path)
        if plan is None:
            raise ModelError(_no_plan_message(path))
        path = plan
    if backend == "onnxruntime" and is_plan:
        raise ModelError(f"{path} is a TensorRT plan; ONNX Runtime needs the .onnx file it was built from.")
    return backend, path


def load_engine(path: str | Path, backend: str = "auto", **options) -> Engine:
    """Load a model file with the named backend (or the best available one for ``auto``)."""
    name, resolved = select_backend(path, backend)
    return backend_class(name)(resolved, **options)
