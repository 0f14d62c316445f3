"""What every published-model loader shares: reading the folder, the weights and config.json, comparing a
state dict with the module it must fill, and the module fieldreid exports and distils from.

Nothing here reaches a network: a folder is read as it lies on disk (a lab downloads it by hand elsewhere).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fieldreid.errors import ModelError, WeightLayoutError
from fieldreid.types import PreprocessSpec

#: weights files a published folder may hold, in the order they are preferred
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: buffers that carry no learned value: a state dict may lack them
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)


def sha256_of(path: Path) -> str:
    from fieldreid.engines.manifest import sha256_file

    return sha256_file(path)


@dataclass(frozen=True)
class PublishedFiles:
    """Where a published model lies: its folder, ``config.json`` (or None) and its one weights file."""

    folder: Path
    config_path: Path | None
    weights_path: Path

    def config(self) -> dict:
        if self.config_path is None:
            return {}
        return read_config(self.config_path)


def read_config(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightLayoutError(f"{path} is not a readable JSON config ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(data, dict):
        raise WeightLayoutError(f"{path} holds a JSON {type(data).__name__}, not the object a model config is.")
    return data


def find_files(path: str | Path) -> PublishedFiles:
    """A folder (``config.json`` + one weights file) or a weights file (its folder's ``config.json``, if any)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise WeightLayoutError(f"{path} is not a weights file ({', '.join(WEIGHT_SUFFIXES)}).")
        config = path.parent / "config.json"
        return PublishedFiles(path.parent, config if config.is_file() else None, path)
    if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise WeightLayoutError(f"{path} holds sharded weights (*.index.json); fieldreid reads one weights file: "
                                "merge the shards into model.safetensors.")
    config = path / "config.json"
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return PublishedFiles(path, config if config.is_file() else None, path / name)
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return PublishedFiles(path, config if config.is_file() else None, found[0])
    if not found:
        raise WeightLayoutError(f"{path} holds no weights file (expected {' or '.join(WEIGHT_NAMES)}).")
    raise WeightLayoutError(f"{path} holds {len(found)} weights files ({', '.join(p.name for p in found[:4])}); "
                            "point fieldreid at the one to use.")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from safetensors or a weights-only torch file; no pickled objects."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise ModelError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}).") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path} is not a weights-only torch file ({type(exc).__name__}: {exc}); fieldreid "
                             "does not unpickle arbitrary objects: save the model's state_dict().") from exc
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightLayoutError(f"{path} does not hold a state dict (parameter name -> tensor).")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_layout(state: dict[str, torch.Tensor], module: nn.Module, source: Path, layout: str) -> None:
    """Refuse ``state`` in one sentence unless it fills ``module`` exactly (names and shapes).

    Non-persistent buffers (recomputed by the module) and BatchNorm's ``num_batches_tracked`` may be absent.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, expected[k], tuple(state[k].shape)) for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} parameter{'s' if len(missing) > 1 else ''} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if shapes:
        listed = "; ".join(f"{k} expected {_shape(e)}, found {_shape(f)}" for k, e, f in shapes[:3])
        parts.append(f"{len(shapes)} with other shapes ({listed}{'; ...' if len(shapes) > 3 else ''})")
    if parts:
        raise WeightLayoutError(f"{source} does not have the layout of {layout}: {', '.join(parts)}.")


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], source: Path, layout: str) -> None:
    check_layout(state, module, source, layout)
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_OPTIONAL_SUFFIXES)]
    if missing or result.unexpected_keys:  # check_layout compared the same keys: never reached
        raise WeightLayoutError(f"{source} does not fit {layout}: missing {_names(missing)}, "
                                f"unexpected {_names(result.unexpected_keys)}.")


def drop_nonpersistent(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Without the buffers ``module`` recomputes itself (older checkpoints saved them, e.g. Swin's
    ``relative_position_index`` and ``attn_mask``)."""
    persistent = set(module.state_dict())
    recomputed = {name for name, _ in module.named_buffers()} - persistent
    return {k: v for k, v in state.items() if k not in recomputed}


def square(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 32:
        raise ModelError(f"Input size {size[0]}x{size[1]} is too small for an embedder (at least 32 px).")
    return size


@dataclass
class Published:
    """What a loader found besides the weights: kind, architecture, preprocessing, licence, files."""

    kind: str
    architecture: str
    preprocess: PreprocessSpec
    licence: str
    files: PublishedFiles
    config: dict = field(default_factory=dict)


class PublishedModel(nn.Module):
    """A published re-id model as fieldreid uses it: ``net`` gives (B, D) features, this module their L2
    normalisation (a monotone rescaling: cosines, the ranking and the teacher's geometry are the published
    model's own).

    It quacks like :class:`fieldreid.embed.model.EmbeddingModel` where export and distillation look
    (``backbone_name``, ``embedding_dim``, ``config()``), and carries ``preprocess``, ``licence``, ``model_id``.
    """

    def __init__(self, net: nn.Module, info: Published, embedding_dim: int) -> None:
        super().__init__()
        self.net = net
        self.kind = info.kind
        self.backbone_name = info.architecture
        self.embedding_dim = int(embedding_dim)
        self.preprocess = info.preprocess
        self.licence = info.licence
        self.files = info.files
        self.source_config = info.config
        self.weights_sha256 = sha256_of(info.files.weights_path)
        self.model_id = f"{info.kind}-{info.architecture}-{self.weights_sha256[:8]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if y.ndim != 2:
            raise ModelError(f"{self.kind} {self.backbone_name} returned shape {tuple(y.shape)}, expected (B, D).")
        return F.normalize(y, p=2.0, dim=1)

    def digest(self) -> str:
        """Identifies the weights, the config and the input size: what a teacher-embedding cache is keyed by."""
        h = hashlib.sha256(self.weights_sha256.encode())
        if self.files.config_path is not None:
            h.update(self.files.config_path.read_bytes())
        h.update(f"|{self.kind}|{self.backbone_name}|{self.preprocess.to_json()}".encode())
        return h.hexdigest()

    def config(self) -> dict:
        return {"kind": self.kind, "architecture": self.backbone_name, "embedding_dim": self.embedding_dim,
                "licence": self.licence, "weights_file": self.files.weights_path.name,
                "weights_sha256": self.weights_sha256, "source_config": self.source_config}
