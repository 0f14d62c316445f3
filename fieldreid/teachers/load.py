"""Which kind of published model a path is, loading it, and exporting it to an embedder ONNX.

>>> model = load_published("downloads/miewid-msv3")                               # doctest: +SKIP
>>> export_published("downloads/MegaDescriptor-T-224", "engines/md-t.onnx")       # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from fieldreid.errors import InputError, WeightLayoutError
from fieldreid.teachers.common import PublishedModel, find_files

KINDS = ("miewid", "megadescriptor", "timm")


def detect_kind(path: str | Path) -> str | None:
    """``miewid`` | ``megadescriptor`` | ``timm`` from a folder's layout (its ``config.json``), or None for a
    path that is not a published folder (an ONNX file, a fieldreid checkpoint, a weights file without a config
    beside it). A folder whose config is neither MiewID's nor timm's is refused."""
    from fieldreid.teachers.megadescriptor import looks_like_megadescriptor
    from fieldreid.teachers.miewid import is_miewid_config

    path = Path(path)
    if path.is_file() and (path.suffix.lower() == ".onnx" or not (path.parent / "config.json").is_file()):
        return None
    if not path.exists():
        return None
    files = find_files(path)
    if files.config_path is None:
        raise WeightLayoutError(f"{files.folder} has no config.json, so fieldreid cannot tell what model it holds: "
                                "a MiewID or timm hub folder as published has one (or give a weights file with "
                                "its timm architecture).")
    config = files.config()
    if is_miewid_config(config):
        return "miewid"
    if "architecture" in config:
        return "megadescriptor" if looks_like_megadescriptor(files, config) else "timm"
    raise WeightLayoutError(f"{files.config_path} is neither MiewID's config (model_type miewid, model_name) nor a "
                            "timm hub config (architecture): fieldreid does not know this layout.")


def load_published(path: str | Path, kind: str | None = None, arch: str | None = None,
                   image_size: int | tuple[int, int] | None = None) -> PublishedModel:
    """Load a published model from local files (never a download), in eval mode on the CPU.

    ``kind`` defaults to :func:`detect_kind`; ``arch`` is the timm architecture of a ``timm`` weights file;
    ``image_size`` replaces the published input size (fixed-size models refuse another).
    """
    if kind is None:
        kind = detect_kind(path)
        if kind is None:
            if arch is None:
                raise InputError(f"{path} is not a published model folder (no config.json beside it): name its "
                                 "timm architecture (--arch for export, --teacher-arch for distill).")
            kind = "timm"
    if kind not in KINDS:
        raise InputError(f"Unknown kind {kind!r}: use one of {', '.join(KINDS)}.")
    if arch is not None and kind != "timm":
        raise InputError(f"--arch names the timm architecture of a plain weights file (--kind timm); a {kind} "
                         "folder names its own in config.json.")
    if kind == "miewid":
        from fieldreid.teachers.miewid import load_miewid

        return load_miewid(path, image_size)
    if kind == "megadescriptor":
        from fieldreid.teachers.megadescriptor import load_megadescriptor

        return load_megadescriptor(path, image_size)
    from fieldreid.teachers.timm_file import load_timm

    return load_timm(path, arch, image_size)


def export_published(path: str | Path, out: str | Path, kind: str | None = None, arch: str | None = None,
                     image_size: int | tuple[int, int] | None = None) -> tuple[Path, PublishedModel]:
    """Published model -> embedder ONNX (FP32, dynamic batch) with its preprocessing and licence in the
    metadata and the manifest, behind the torch-vs-ONNX Runtime parity gate (cosine >= 0.9999)."""
    from fieldreid.export.embedder_onnx import export_embedder_onnx

    model = load_published(path, kind, arch, image_size)
    files = model.files
    extra = {"published.kind": model.kind, "published.architecture": model.backbone_name,
             "published.weights": files.weights_path.name, "published.weights_sha256": model.weights_sha256}
    if files.config_path is not None:
        from fieldreid.teachers.common import sha256_of

        extra["published.config_sha256"] = sha256_of(files.config_path)
    written = export_embedder_onnx(model, out, model.preprocess, model.model_id, source_path=files.weights_path,
                                   extra=extra, licence=model.licence)
    return written, model


__all__ = ["KINDS", "detect_kind", "load_published", "export_published", "find_files"]
