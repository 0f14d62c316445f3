"""torch backend: the reference for parity tests and the training side. Never needed on a field device."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fieldreid.engines.base import Engine, EngineIO
from fieldreid.errors import ModelError, missing_extra


class TorchEngine(Engine):
    """Runs a ``torch.nn.Module`` (or a fieldreid ``.pt`` embedder checkpoint) in eager mode.

    The module takes one NCHW float tensor and returns one tensor (or a tuple whose first item is used).
    """

    backend = "torch"

    def __init__(self, path: str | Path | None = None, module=None, metadata: dict[str, str] | None = None,
                 input_shape: tuple = (-1, 3, -1, -1), device: str = "cpu") -> None:
        self._module = module
        self._meta = dict(metadata or {})
        self._input_shape = input_shape
        self._want_device = device
        super().__init__(path)

    def _load(self) -> None:
        try:
            import torch
        except ImportError as exc:
            raise missing_extra("torch", "train") from exc
        self._torch = torch
        if self._module is None:
            if self.path is None:
                raise ModelError("TorchEngine needs a module or the path of a fieldreid .pt checkpoint.")
            from fieldreid.embed.model import load_checkpoint

            self._module, meta = load_checkpoint(self.path)
            self._meta = {**meta, **self._meta}
        self.device = "cuda" if self._want_device == "cuda" and torch.cuda.is_available() else "cpu"
        self._module = self._module.eval().to(self.device)
        self.inputs = [EngineIO("input", tuple(self._input_shape), np.dtype(np.float32))]
        self.outputs = [EngineIO("output", (-1, -1), np.dtype(np.float32))]
        self.metadata = self._meta

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self._module(torch.from_numpy(feed["input"]).to(self.device))
        if isinstance(out, tuple | list):
            out = out[0]
        return {"output": out.float().cpu().numpy()}

    def _close(self) -> None:
        self._module = None
