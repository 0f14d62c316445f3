"""The engine template shared by every backend (Polygraphy's pattern).

Public :meth:`Engine.run` checks state and inputs; subclasses implement ``_load``, ``_run`` and ``_close``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from fieldreid.errors import FieldreidError, InputError


@dataclass(frozen=True)
class EngineIO:
    """One input or output of an engine. ``shape`` uses -1 (or a name string) for dynamic axes."""

    name: str
    shape: tuple
    dtype: np.dtype


class Engine(ABC):
    """A loaded model that maps named numpy arrays to named numpy arrays."""

    #: registry name of the backend ("onnxruntime", "tensorrt", "torch")
    backend: ClassVar[str] = ""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.inputs: list[EngineIO] = []
        self.outputs: list[EngineIO] = []
        #: string key/value metadata (ONNX ``metadata_props``, or the manifest of a TensorRT plan)
        self.metadata: dict[str, str] = {}
        self.device: str = "cpu"
        self._loaded = False
        self._load()
        self._loaded = True

    # -- template ---------------------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model and fill ``inputs``, ``outputs``, ``metadata``, ``device``."""

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; ``feed`` is already checked and contiguous."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources."""

    # -- public -----------------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [io.name for io in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [io.name for io in self.outputs]

    def run(self, inputs: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch. A single array is fed to the only input. Returns ``{output name: array}``."""
        if not self._loaded:
            raise FieldreidError(f"The {self.backend} engine for {self.path} is closed; load it again.")
        if not isinstance(inputs, dict):
            if len(self.inputs) != 1:
                raise InputError(f"This model has inputs {self.input_names}; pass a dict of arrays by name.")
            inputs = {self.inputs[0].name: inputs}
        missing = set(self.input_names) - set(inputs)
        extra = set(inputs) - set(self.input_names)
        if missing or extra:
            raise InputError(f"Model inputs are {self.input_names}; got {sorted(inputs)}.")
        feed: dict[str, np.ndarray] = {}
        for io in self.inputs:
            arr = np.asarray(inputs[io.name])
            if arr.ndim != len(io.shape):
                raise InputError(
                    f"Input {io.name!r} must have {len(io.shape)} dimensions {io.shape}, got shape {arr.shape}."
                )
            for axis, (want, got) in enumerate(zip(io.shape, arr.shape, strict=True)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise InputError(
                        f"Input {io.name!r} axis {axis} must be {want} (model shape {io.shape}), got {arr.shape}."
                    )
            if arr.dtype != io.dtype:
                arr = arr.astype(io.dtype)
            feed[io.name] = np.ascontiguousarray(arr)
        return self._run(feed)

    def close(self) -> None:
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, device={self.device!r})"
