"""A field device's first sync: its gallery is made from the lab's signed snapshot.

Pulling the lab's gallery is the first thing a new device does, so ``fieldreid sync`` with a gallery path
that does not exist yet creates it - from the pull itself, verified exactly like any other pull (the
pinned ed25519 key is checked before a byte is decoded, then applied in one transaction). The new gallery
is built under a temporary name beside the target and linked into place only once a pull has been
applied: a refused token, a bad signature or a dropped link leaves no file behind, and a gallery that
appeared meanwhile (another process) is never overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

from fieldreid.gallery.openset import Thresholds
from fieldreid.gallery.store import Gallery
from fieldreid.sync.client import PullReport, SyncClient, SyncError


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def create_from_lab(path: str | Path, client: SyncClient) -> list[PullReport]:
    """Create the gallery at ``path`` (which must not exist) from the lab's snapshots; returns the pulls."""
    path = Path(path)
    if path.exists():
        raise SyncError(f"{path} already exists; sync pulls into it instead of creating it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    _remove(tmp)
    try:
        with Gallery(tmp) as g:
            reports = client.pull(g, full=True)
            applied = [r for r in reports if r.error is None and r.details.get("changed")]
            if not applied:
                errors = "; ".join(f"{r.species}: {r.error}" for r in reports if r.error)
                raise SyncError(f"The lab sent no gallery to start {path} from "
                                f"({errors or 'the project has no species gallery yet'}); nothing was created.")
            g.checkpoint()
        try:
            os.link(tmp, path)  # never replaces a gallery that appeared meanwhile
        except FileExistsError as exc:
            raise SyncError(f"{path} appeared while the first pull was running (another sync?); it was left "
                            "alone. Run sync again to pull into it.") from exc
    finally:
        _remove(tmp)
    return reports


def device_model_thresholds(gallery: Gallery, embedder: str | Path | None) -> Thresholds | None:
    """The open-set thresholds the device's embedder carries, if it is the gallery's model (read from its
    metadata only: nothing is loaded to run)."""
    if embedder is None or not Path(embedder).is_file() or gallery.model_id is None:
        return None
    from fieldreid.embed.thresholds import model_thresholds
    from fieldreid.engines.manifest import onnx_metadata, read_manifest
    from fieldreid.errors import FieldreidError

    try:  # an ONNX carries its metadata; a TensorRT plan's manifest holds a copy of its ONNX's
        meta = (onnx_metadata(embedder) if Path(embedder).suffix.lower() == ".onnx"
                else dict(read_manifest(embedder).get("onnx_metadata") or {}))
    except FieldreidError:
        return None
    return model_thresholds(meta) if meta.get("fieldreid.model_id") == gallery.model_id else None
