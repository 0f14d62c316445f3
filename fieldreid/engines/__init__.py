"""Inference engines: one protocol over backends (ONNX Runtime, TensorRT, torch).

Backends are imported lazily, so ``import fieldreid`` never pulls in torch or TensorRT.

>>> from fieldreid.engines import load_engine
>>> with load_engine("engines/default/embedder.onnx") as eng:   # doctest: +SKIP
...     out = eng.run(batch)
"""

from fieldreid.engines.base import Engine, EngineIO
from fieldreid.engines.registry import (
    BACKENDS,
    available_backends,
    backend_class,
    cuda_device_count,
    load_engine,
    select_backend,
)

__all__ = [
    "BACKENDS",
    "Engine",
    "EngineIO",
    "available_backends",
    "backend_class",
    "cuda_device_count",
    "load_engine",
    "select_backend",
]
