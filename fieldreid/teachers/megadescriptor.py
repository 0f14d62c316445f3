"""MegaDescriptor (BVRA, WildlifeDatasets) as published on Hugging Face, e.g. ``BVRA/MegaDescriptor-T-224``
(timm ``swin_tiny_patch4_window7_224``, 768-d) or ``BVRA/MegaDescriptor-L-384``
(``swin_large_patch4_window12_384``, 1536-d).

Each is a timm hub folder: ``config.json`` (``architecture``, ``num_classes: 0``, ``num_features``,
``pretrained_cfg``) and ``pytorch_model.bin`` (Swin weights in the original Microsoft layout) or
``model.safetensors``. The embedding is timm's pooled output with ``num_classes=0``. The model cards
resize to the model's input size and normalise with mean = std = 0.5, which is what fieldreid uses whatever
the config's ``pretrained_cfg`` says. Weights: CC BY-NC 4.0 (non-commercial; models derived from them
carry the same terms).
"""

from __future__ import annotations

from pathlib import Path

from fieldreid.errors import WeightLayoutError
from fieldreid.teachers.common import PublishedFiles, PublishedModel, find_files
from fieldreid.teachers.timm_file import hub_config, load_hub_folder

MEAN = STD = (0.5, 0.5, 0.5)
LICENCE = ("CC BY-NC 4.0 (BVRA MegaDescriptor weights: non-commercial use only; ONNX files and students "
           "distilled from them are derived works under the same terms)")


def looks_like_megadescriptor(files: PublishedFiles, config: dict) -> bool:
    """A timm hub folder that names MegaDescriptor: in its config, or in its folder path (a hand download
    named after the model, or the hub cache's ``models--BVRA--MegaDescriptor-*`` folders)."""
    cfg = config.get("pretrained_cfg") or {}
    words = [str(cfg.get("hf_hub_id", "")), str(cfg.get("tag", "")), str(config.get("model_id", ""))]
    words += [p.name for p in (files.folder, *list(files.folder.parents)[:3])]
    return any("megadescriptor" in w.lower() for w in words)


def load_megadescriptor(path: str | Path, image_size=None) -> PublishedModel:
    files = find_files(path)
    if files.config_path is None:
        raise WeightLayoutError(f"{files.folder} has no config.json: a MegaDescriptor folder as published holds "
                                "config.json (architecture, num_features, pretrained_cfg) beside its weights.")
    hub_config(files)
    return load_hub_folder(files, "megadescriptor", LICENCE, image_size, mean=MEAN, std=STD)
