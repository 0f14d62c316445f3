"""Enrolment: labelled images → embeddings in a gallery, idempotent, with bad files reported not fatal.

A *source* is either

* a ``metadata.csv`` in the AnimalCLEF / wildlife-datasets shape: ``image_id, identity, path, species,
  split[, orientation]`` with ``path`` relative to the CSV's folder (``split`` selects rows), or
* a folder with one sub-folder per identity (``root/<identity>/*.jpg``).

Every image is cut by the one crop rule (:mod:`fieldreid.crop`), as ``watch`` cuts camera frames. With
``crops=True`` each image is already an animal crop: the detector finds the animal's box in it (the whole
image when it finds none, or without a detector); otherwise the same box, else the highest-confidence
animal box of each image is embedded (an image with no animal is reported). The box is recorded with the
embedding ('' = whole image).
A source image already in the gallery for this embedder is skipped without being decoded, so re-running an
interrupted enrolment only does the remaining work.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.crop import CROP_RULE
from fieldreid.errors import FieldreidError, ImageReadError, InputError
from fieldreid.gallery.openset import FALLBACK_SPECIES
from fieldreid.gallery.store import EmbeddingInfo, GalleryError, parse_box
from fieldreid.storage.fsutil import path_text, text_path

REQUIRED_COLUMNS = ("identity", "path")
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class Item:
    """One labelled image: where it is, who it shows, which species."""

    path: Path
    identity: str | None
    species: str
    image_id: str = ""


def read_metadata(csv_path: str | Path, split: str | None = None, species: str | None = None,
                  require_identity: bool = True) -> list[Item]:
    """Rows of a wildlife-datasets ``metadata.csv`` (``split`` selects rows; paths relative to the CSV)."""
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise InputError(f"Cannot read {csv_path}: {exc.strerror or exc}.") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InputError(f"{csv_path} is not a readable CSV file ({exc}).") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{csv_path} lacks the column(s) {', '.join(missing)}; expected the wildlife-datasets "
                         f"shape image_id, identity, path, species, split (found: {', '.join(columns) or 'none'}).")
    if split is not None:
        if "split" not in columns:
            raise InputError(f"{csv_path} has no 'split' column, so --split {split} cannot select rows.")
        available = sorted({r["split"] for r in rows})
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise InputError(f"No rows with split '{split}' in {csv_path}; its splits are: {', '.join(available)}.")
    root = csv_path.parent
    items = []
    for r in rows:
        ident = (r.get("identity") or "").strip() or None
        if ident is None and require_identity:
            continue  # unlabelled query rows (AnimalCLEF's test split) cannot be enrolled or evaluated
        items.append(Item(root / r["path"], ident, (r.get("species") or "").strip() or species or FALLBACK_SPECIES,
                          (r.get("image_id") or "").strip()))
    return items


def read_folder(root: str | Path, species: str | None = None) -> list[Item]:
    """``root/<identity>/<images>``: one sub-folder per identity (hidden folders and files skipped)."""
    from fieldreid.frames.files import iter_files

    root = Path(root)
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in iter_files([sub]):
            items.append(Item(f, sub.name, species or FALLBACK_SPECIES, f"{sub.name}/{f.name}"))
    if not items:
        raise InputError(f"No images under {root}/<identity>/; a folder source needs one sub-folder per animal.")
    return items


def load_source(source: str | Path, split: str | None = None, species: str | None = None) -> list[Item]:
    source = Path(source)
    if source.is_dir():
        if split is not None:
            raise InputError("--split applies to a metadata.csv source, not to a folder.")
        return read_folder(source, species)
    if source.is_file():
        return read_metadata(source, split, species)
    raise InputError(f"{source} does not exist; give a metadata.csv or a folder with one sub-folder per identity.")


@dataclass
class EmbeddedItems:
    """Embeddings of the items that could be read, with the box used (None = whole image).

    ``n_whole_image``: how many of them were embedded whole because no animal box was found (a labelled
    crop always is then; a labelled frame only with ``whole_frame_fallback``)."""

    items: list[Item]
    vectors: np.ndarray
    boxes: list[tuple[float, float, float, float] | None]
    failures: list[tuple[str, str]] = field(default_factory=list)
    n_whole_image: int = 0


def embed_items(items: Sequence[Item], embedder, detector=None, crops: bool = False, batch_size: int = 16,
                on_progress: ProgressFn | None = None, whole_frame_fallback: bool = False,
                min_conf: float = 0.0) -> EmbeddedItems:
    """Embed each item's animal, cut by the one crop rule (:mod:`fieldreid.crop`).

    ``crops=True``: each image is a labelled animal crop; the detector (when given) finds the animal's box
    in it, else the whole image is the box. ``crops=False``: each image is a labelled frame; the same box
    is embedded, else its most confident animal box of any size, and an image without one is reported as a
    failure, or embedded whole with ``whole_frame_fallback`` (``eval``). See
    :class:`fieldreid.embed.pipeline.Pipeline` (``select``). Unreadable images are reported, never fatal.
    """
    if not crops and detector is None:
        raise InputError("Whole images need a detector to find the animal; pass one, or crops=True for crops.")
    from fieldreid.embed.pipeline import Pipeline

    kept: list[Item] = []
    boxes: list = []
    vectors: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    n_whole = 0
    by_path: dict[Path, list[Item]] = {}
    for it in items:
        by_path.setdefault(it.path, []).append(it)
    pipe = Pipeline(detector, embedder, batch_size=max(1, min(batch_size, 8)), min_crop_conf=min_conf,
                    select="crop" if crops else "best", whole_if_none=whole_frame_fallback)
    done = 0
    for res in pipe.run(list(by_path)):
        its = by_path[res.path]
        done += len(its)
        if on_progress:
            on_progress(done)
        if res.failure:
            failures.extend((path_text(it.path), f"{res.path.name}: {res.failure}") for it in its)
            continue
        if res.embeddings is None or len(res.embeddings) == 0:
            failures.extend((path_text(it.path), f"{res.path.name}: no animal detected") for it in its)
            continue
        box = None if res.whole_image else tuple(float(v) for v in res.boxes[0])
        n_whole += len(its) * res.whole_image
        for it in its:
            vectors.append(res.embeddings[:1])
            kept.append(it)
            boxes.append(box)
    mat = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    return EmbeddedItems(kept, mat.astype(np.float32), boxes, failures, n_whole)


@dataclass
class EnrollReport:
    model_id: str
    added: int = 0
    already_present: int = 0
    identities_created: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    reembedded: int = 0
    whole_image: int = 0  # crops embedded whole: the detector found no animal box in them
    features_indexed: int = 0  # embeddings given local features (enroll(features=True))


def source_key(path: Path) -> str:
    """How a source image is recorded: its absolute path (re-embedding reads it back from there), in the
    text form of :func:`fieldreid.storage.fsutil.path_text` (a name that is not UTF-8 gets ``\\xNN`` escapes)."""
    return path_text(Path(path).resolve())


def enroll(source: str | Path | Sequence[Item], gallery, embedder, detector=None, split: str | None = None,
           crops: bool = False, species: str | None = None, batch_size: int = 16, origin: str = "lab",
           on_progress: ProgressFn | None = None, features: bool = False) -> EnrollReport:
    """Enrol labelled images (a metadata.csv, an identity-per-folder tree, or :class:`Item` s) into ``gallery``.

    Identities are created as needed (id = the dataset's identity label, status confirmed). Returns an
    :class:`EnrollReport`; files that are missing or corrupt are listed in ``failures``, the rest enrolled.
    """
    if not crops and detector is None:
        raise InputError("Whole images need a detector to find the animal; pass one, or crops=True for crops.")
    gallery.check_model(embedder.model_id, embedder.dim)  # fail before spending minutes embedding
    items = list(source) if isinstance(source, list | tuple) else load_source(source, split, species)
    done = gallery.enrolled_sources(embedder.model_id)
    todo = [it for it in items if source_key(it.path) not in done]
    report = EnrollReport(model_id=embedder.model_id, already_present=len(items) - len(todo))
    before = {i.id for i in gallery.identities()}
    chunk = max(64, batch_size)
    for a in range(0, len(todo), chunk):  # commit as we go: an interrupted run keeps what it did
        part = todo[a:a + chunk]
        emb = embed_items(part, embedder, detector, crops, batch_size,
                          (lambda n, a=a: on_progress(a + n)) if on_progress else None)
        report.failures.extend(emb.failures)
        report.whole_image += emb.n_whole_image
        if emb.items:
            added, present = gallery.add_embeddings(
                [it.identity for it in emb.items], emb.vectors, embedder.model_id,
                [source_key(it.path) for it in emb.items], emb.boxes, [it.species for it in emb.items],
                status="confirmed", origin=origin, crop_rule=CROP_RULE)
            report.added += added
            report.already_present += present
    report.identities_created = len({i.id for i in gallery.identities()} - before)
    if features:  # local features for verification, from the same crops (fieldreid.verify)
        report.features_indexed, lost = index_features(gallery)
        report.failures.extend(lost)
    return report


def feature_caps(gallery) -> list[int]:
    """The keypoint caps the gallery's verification needs: those its fusions were fitted on
    (``calibrate --verify``), else the default cap (features for a calibration yet to come)."""
    import json

    from fieldreid.verify.features import MAX_KEYPOINTS, keypoints_of

    caps = set()
    for (data,) in gallery.read("SELECT data FROM fusion"):
        f = json.loads(data)
        if f.get("uses_inliers"):
            try:
                caps.add(keypoints_of(f.get("feature_kind", "")))
            except FieldreidError:
                pass  # another recipe's fusion: verification is off for it until calibrated again
    return sorted(caps) or [MAX_KEYPOINTS]


def missing_features(gallery, max_keypoints: int | None = None) -> list[tuple[int, EmbeddingInfo]]:
    """(keypoint cap, embedding) of every embedding without local features of that cap: ``max_keypoints``,
    or else each cap of :func:`feature_caps` (what :func:`index_features` computes)."""
    from fieldreid.verify.features import kind_for

    caps = [max_keypoints] if max_keypoints else feature_caps(gallery)
    return [(cap, r) for cap in caps for r in gallery.missing_local_features(kind_for(cap))]


def index_features(gallery, max_keypoints: int | None = None, on_progress: ProgressFn | None = None,
                   chunk: int = 64) -> tuple[int, list[tuple[str, str]]]:
    """Compute and store the local features (:mod:`fieldreid.verify.features`) of every embedding that has
    none of the kind ``max_keypoints`` makes (default: each cap of :func:`feature_caps`; the rows are
    :func:`missing_features`), reading each source image and box again (``enroll`` with features and
    ``gallery reindex``). Returns (rows indexed, failures); an unreadable source is listed and its embedding
    keeps no features (verification then treats it as zero inliers)."""
    from fieldreid.verify.features import features_of

    done, failures = 0, []
    rows = missing_features(gallery, max_keypoints)
    for a in range(0, len(rows), chunk):
        batch = []
        for cap, r in rows[a:a + chunk]:
            try:
                f = features_of(text_path(r.source), parse_box(r.box), cap)
            except FieldreidError as exc:
                failures.append((r.source, str(exc)))
                continue
            batch.append((r.id, f.kind, f.to_bytes()))
        done += gallery.set_local_features(batch)
        if on_progress:
            on_progress(min(a + chunk, len(rows)))
    return done, failures


def reembed(gallery, embedder, drop_missing: bool = False, batch_size: int = 16,
            on_progress: ProgressFn | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Replace every stored vector with one from ``embedder``, reading each source image (and box) again.

    All vectors switch model in one transaction, so the gallery is never half old, half new. Sources that
    cannot be read are listed; unless ``drop_missing``, nothing changes then (their identities would lose
    embeddings). Returns (re-embedded rows, failures).
    """
    from fieldreid.crop import crops, whole_box
    from fieldreid.frames.decode import read_image

    rows = gallery.embeddings()
    if not rows:
        return 0, []
    side = int(min(embedder.preprocess_spec.size))
    ok_ids: list[int] = []
    vectors: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    cache: dict = {}
    for a in range(0, len(rows), batch_size):
        pixels, ids = [], []
        for r in rows[a:a + batch_size]:
            box = parse_box(r.box)
            try:
                if r.source not in cache:
                    cache.clear()
                    cache[r.source] = read_image(text_path(r.source), min_side=side, keep_data=True)
                frame = cache[r.source]
                [px] = crops(frame, [box if box is not None else whole_box(frame.size)], side)
            except (ImageReadError, FieldreidError) as exc:
                failures.append((r.source, str(exc)))
                continue
            pixels.append(px)
            ids.append(r.id)
        if pixels:
            vectors.append(embedder.embed(pixels))
            ok_ids.extend(ids)
        if on_progress:
            on_progress(min(a + batch_size, len(rows)))
    if failures and not drop_missing:
        raise GalleryError(f"{len(failures)} of {len(rows)} gallery images cannot be read again (first: "
                           f"{failures[0][0]}: {failures[0][1]}); nothing was changed. Restore them, or re-embed "
                           "with --drop-missing to remove those embeddings.")
    if not ok_ids:
        raise GalleryError("No gallery image could be read again; nothing was changed.")
    gallery.replace_vectors(ok_ids, np.concatenate(vectors), embedder.model_id)
    return len(ok_ids), failures
