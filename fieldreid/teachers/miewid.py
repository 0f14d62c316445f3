"""MiewID (Wild Me / Conservation X Labs) as published on Hugging Face, e.g. ``conservationxlabs/miewid-msv3``.

The folder holds ``config.json`` (transformers style: ``model_type: "miewid"``, ``model_name`` = the timm
backbone, ``efficientnetv2_rw_m`` for msv2/msv3, ``use_fc: false``, the training head ``loss_module`` /
``n_classes``) and ``model.safetensors`` with the parameters

- ``backbone.*``: the timm model without its classifier and global pooling (``forward_features``),
- ``pooling.p``: generalised-mean pooling exponent,
- ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``: the BatchNorm1d neck over the
  backbone's features (2152 for ``efficientnetv2_rw_m``),
- ``final.*``: the training head (softmax or ArcFace over the training identities): not part of the
  embedding, ignored.

The embedding is the neck's output; its model card resizes to 440 x 440 and normalises with the ImageNet
mean and std. The python files beside the weights (``modeling_miewid.py``...) are never imported: this
module builds the same network from timm and checks every parameter name and shape against the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fieldreid.embed.model import GeM
from fieldreid.errors import WeightLayoutError
from fieldreid.teachers.common import (
    Published,
    PublishedModel,
    find_files,
    load_exact,
    read_weights,
    square,
)
from fieldreid.types import PreprocessSpec

IMAGE_SIZE = 440
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
#: The model card gives no licence (checked on Hugging Face: no licence field and no LICENSE file), and Conservation
#: X Labs objected on Hugging Face when a mirror relabelled the weights MIT: ask them before redistributing.
LICENCE = ("not stated by Conservation X Labs (no licence on the Hugging Face model card); ask them before "
           "redistributing the weights or models derived from them")
#: the training head's parameters: not part of the embedding
HEAD_PREFIX = "final."


class MiewIDNet(nn.Module):
    """timm backbone (features) -> GeM -> BatchNorm1d, with MiewID's parameter names."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        import timm

        try:
            self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="")
        except Exception as exc:  # timm raises RuntimeError for an unknown name
            raise WeightLayoutError(f"config.json names the backbone {model_name!r}, which timm "
                                    f"{timm.__version__} cannot build ({exc}).") from exc
        self.model_name = model_name
        self.num_features = int(self.backbone.num_features)
        self.pooling = GeM(p=3.0)
        self.bn = nn.BatchNorm1d(self.num_features)

    def check_features(self) -> None:
        """Refuse a backbone whose features are not a (B, C, H, W) map (a ViT's tokens, a Swin's channels-last
        map), which GeM would pool over the wrong axes: one 64 px forward pass."""
        try:
            with torch.no_grad():
                shape = tuple(self.backbone.eval().forward_features(torch.zeros(1, 3, 64, 64)).shape)
        except Exception as exc:  # fixed-size transformers refuse the probe
            shape = f"no map at 64 px: {type(exc).__name__}"
        if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] == self.num_features):
            raise WeightLayoutError(f"MiewID backbone {self.model_name} does not give a convolutional "
                                    f"(B, {self.num_features}, H, W) feature map ({shape}); fieldreid reads the "
                                    "EfficientNetV2 layout the published MiewID models have.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pooling(self.backbone.forward_features(x)))


def is_miewid_config(config: dict) -> bool:
    return config.get("model_type") == "miewid" or ("model_name" in config and "architecture" not in config)


def load_miewid(path: str | Path, image_size: int | tuple[int, int] | None = None) -> PublishedModel:
    """A MiewID folder (or its weights file) -> :class:`PublishedModel` in eval mode."""
    files = find_files(path)
    if files.config_path is None:
        raise WeightLayoutError(f"{files.folder} has no config.json: a MiewID folder as published holds "
                                "config.json (model_type miewid, model_name) beside model.safetensors.")
    config = files.config()
    if config.get("model_type", "miewid") != "miewid":
        raise WeightLayoutError(f"{files.config_path} says model_type {config.get('model_type')!r}, not 'miewid'.")
    name = config.get("model_name")
    if not isinstance(name, str) or not name:
        raise WeightLayoutError(f"{files.config_path} has no model_name (the timm backbone, e.g. "
                                "efficientnetv2_rw_m), which a MiewID config carries.")
    if config.get("use_fc"):
        raise WeightLayoutError(f"{files.config_path} sets use_fc: true; the published MiewID models have no fc "
                                "layer and fieldreid reads only that layout.")
    net = MiewIDNet(name)
    net.check_features()
    state = read_weights(files.weights_path)
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    load_exact(net, state, files.weights_path, f"MiewID with backbone {name} ({net.num_features}-d embedding)")
    size = square(image_size or IMAGE_SIZE)
    spec = PreprocessSpec(size=size, mean=MEAN, std=STD, color="RGB", interpolation="bilinear",
                          extra={"published_size": IMAGE_SIZE})
    info = Published(kind="miewid", architecture=name, preprocess=spec, licence=LICENCE, files=files, config=config)
    return PublishedModel(net, info, net.num_features).eval()
