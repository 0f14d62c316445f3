"""Where default models live, so every command works with no model option.

``make models`` writes ``engines/default/{detector,embedder}.onnx`` in a source checkout. An installed
package uses ``$FIELDREID_MODELS`` or ``$XDG_DATA_HOME/fieldreid/engines/default``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fieldreid.errors import ModelError

DETECTOR_NAME = "detector.onnx"
EMBEDDER_NAME = "embedder.onnx"
#: watch: a frame with no animal at the detector threshold keeps its best animal box at this confidence
DEFAULT_RESCUE_CONF = 0.1


def source_root() -> Path | None:
    """The repository root when running from a source checkout, else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").exists() and (root / "engines").is_dir() else None


def models_dir() -> Path:
    env = os.environ.get("FIELDREID_MODELS")
    if env:
        return Path(env)
    root = source_root()
    if root is not None:
        return root / "engines" / "default"
    data_home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return data_home / "fieldreid" / "engines" / "default"


def default_model(kind: str) -> Path:
    """Path of the default ``detector`` or ``embedder``, or a ModelError saying how to create it."""
    name = {"detector": DETECTOR_NAME, "embedder": EMBEDDER_NAME}[kind]
    path = models_dir() / name
    if not path.exists():
        hint = (
            f"convert a MegaDetector/YOLO checkpoint with `fieldreid export CHECKPOINT.pt --out {path}`"
            if kind == "detector"
            else "build the default embedder with `fieldreid models`"
        )
        raise ModelError(
            f"No default {kind} at {path}. Run `make models` in the source tree, {hint}, "
            f"or pass --{kind} PATH."
        )
    return path
