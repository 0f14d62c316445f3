"""A timm architecture and its weights: a lab's own model (architecture name + state-dict file), or a folder
in timm's Hugging Face hub layout (``config.json`` with ``architecture``, ``num_features``, ``pretrained_cfg``
and ``model.safetensors`` or ``pytorch_model.bin``), which is how MegaDescriptor is published.

The network is ``timm.create_model(architecture, num_classes=0)``: its output is the globally pooled feature
vector, the embedding. A classifier in the weights is dropped; every other parameter must be there with
its shape. Swin checkpoints in the original Microsoft layout (each stage's patch merging at its end, as the
MegaDescriptor files have it) are renamed to timm's (at the start of the next stage).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from fieldreid.errors import InputError, WeightLayoutError
from fieldreid.teachers.common import (
    Published,
    PublishedFiles,
    PublishedModel,
    drop_nonpersistent,
    find_files,
    load_exact,
    read_weights,
    square,
)
from fieldreid.types import PreprocessSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAB_LICENCE = "not stated: a lab's own weights (set by whoever trained them)"


def build_timm(arch: str, model_args: dict | None = None) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **(model_args or {}))
    except Exception as exc:  # unknown name (RuntimeError) or arguments the architecture does not take
        raise WeightLayoutError(f"timm {timm.__version__} cannot build the architecture {arch!r} ({exc}).") from exc


def _swin_original_layout(state: dict) -> dict:
    """Microsoft's Swin layout -> timm's: ``layers.i.downsample`` -> ``layers.{i+1}.downsample`` and a plain
    ``head`` -> ``head.fc``. The original layout is recognised by stage 0 having a patch merging."""
    if not any(k.startswith("layers.0.downsample.") for k in state):
        return state
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        if key.startswith("head.") and not key.startswith("head.fc."):
            key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def embedding_width(net: nn.Module) -> int:
    """The width of ``net``'s output with ``num_classes=0``: its pre-logits width where the head has a hidden
    layer (MobileNetV3's ``conv_head``: 1024), else its feature width."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def _classifier_prefixes(net: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(n + "." for n in names if n)


def load_timm_state(net: nn.Module, files: PublishedFiles, arch: str, layout: str) -> None:
    state = read_weights(files.weights_path)
    if arch.startswith("swin"):
        state = _swin_original_layout(state)
    state = drop_nonpersistent(state, net)
    expected = set(net.state_dict())
    heads = _classifier_prefixes(net)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}
    load_exact(net, state, files.weights_path, layout)


def _input_size(net: nn.Module, cfg: dict, image_size, what: str) -> tuple[int, int]:
    published = cfg.get("input_size") or (3, 224, 224)
    native = (int(published[-2]), int(published[-1]))
    if image_size is None:
        return native
    size = square(image_size)
    if size != native and cfg.get("fixed_input_size", False):
        raise InputError(f"{what} takes fixed {native[0]}x{native[1]} inputs (its window and position tables are "
                         f"sized for them); {size[0]}x{size[1]} cannot be used.")
    return size


def hub_config(files: PublishedFiles) -> dict:
    """The timm hub ``config.json`` of a folder, checked for what fieldreid reads from it."""
    if files.config_path is None:
        raise WeightLayoutError(f"{files.folder} has no config.json: a timm hub folder holds config.json "
                                "(architecture, num_features, pretrained_cfg) beside its weights.")
    config = files.config()
    arch = config.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise WeightLayoutError(f"{files.config_path} has no 'architecture' (the timm model name), which a timm "
                                "hub config carries.")
    if not isinstance(config.get("pretrained_cfg", {}), dict) or not isinstance(config.get("model_args", {}), dict):
        raise WeightLayoutError(f"{files.config_path}: pretrained_cfg and model_args must be JSON objects.")
    return config


def load_hub_folder(files: PublishedFiles, kind: str, licence: str | None, image_size=None,
                    mean: tuple | None = None, std: tuple | None = None) -> PublishedModel:
    """A timm hub folder -> :class:`PublishedModel` (``mean``/``std`` override the config's)."""
    config = hub_config(files)
    arch = config["architecture"]
    net = build_timm(arch, config.get("model_args"))
    width = embedding_width(net)
    declared = config.get("num_features")
    if declared is not None and int(declared) != int(net.num_features):
        raise WeightLayoutError(f"{files.config_path} says num_features {declared}, but timm's {arch} has "
                                f"{net.num_features}: the config does not describe this architecture.")
    load_timm_state(net, files, arch, f"timm {arch} ({width}-d embedding)")
    cfg = config.get("pretrained_cfg") or {}
    spec = PreprocessSpec(size=_input_size(net, cfg, image_size, f"{kind} {arch}"),
                          mean=tuple(mean or cfg.get("mean") or IMAGENET_MEAN),
                          std=tuple(std or cfg.get("std") or IMAGENET_STD), color="RGB", interpolation="bilinear")
    info = Published(kind=kind, architecture=arch, preprocess=spec,
                     licence=licence or str(cfg.get("license") or LAB_LICENCE), files=files, config=config)
    return PublishedModel(net, info, width).eval()


def load_timm(path: str | Path, arch: str | None = None, image_size=None) -> PublishedModel:
    """``arch`` + a state-dict file, or a timm hub folder (``arch``, if given, must match its config)."""
    files = find_files(path)
    config = files.config()
    if arch is None:
        if "architecture" not in config and Path(path).is_file():
            raise InputError(f"{path} is a weights file without a timm config.json beside it: name its timm "
                             "architecture (--arch for export, --teacher-arch for distill).")
        return load_hub_folder(files, "timm", None, image_size)  # refuses a folder without a timm config
    if "architecture" in config:
        if config["architecture"] != arch:
            raise WeightLayoutError(f"{files.config_path} says architecture {config['architecture']!r}, not "
                                    f"{arch!r}.")
        return load_hub_folder(files, "timm", None, image_size)
    net = build_timm(arch)
    width = embedding_width(net)
    load_timm_state(net, files, arch, f"timm {arch} ({width}-d embedding)")
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    spec = PreprocessSpec(size=_input_size(net, cfg, image_size, f"timm {arch}"),
                          mean=tuple(cfg.get("mean") or IMAGENET_MEAN), std=tuple(cfg.get("std") or IMAGENET_STD),
                          color="RGB", interpolation="bilinear")
    info = Published(kind="timm", architecture=arch, preprocess=spec, licence=LAB_LICENCE,
                     files=PublishedFiles(files.folder, None, files.weights_path), config={"architecture": arch})
    return PublishedModel(net, info, width).eval()
