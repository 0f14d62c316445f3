"""Step 1 of the watch's commit protocol: one batch of files, one transaction.

:func:`split_duplicates` sets aside the files whose content is already done (under another name: a
``duplicate``; under the same name: nothing new), :func:`image_results` turns the pipeline's output into the
rows to store, and :func:`commit_batch` writes every file's new state, its image row, detections, embeddings,
crop thumbnails and event membership in ONE transaction: after ``kill -9`` a file is wholly done or not
started (see :mod:`fieldreid.watch.runner`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from fieldreid.frames.decode import encode_jpeg
from fieldreid.types import FileState
from fieldreid.watch.loader import Loaded
from fieldreid.watch.state import StateDB

EMBED_DTYPE = "<f2"  # float16 on disk: half the size, cosine changes < 1e-3 (unit vectors)


@dataclass
class ImageResult:
    """What one ready file produced: its size and one ``detections`` row (named columns) per box; ``size``
    None when the pipeline could not process it."""

    loaded: Loaded
    size: tuple[int, int] | None
    detections: list[dict]


def split_duplicates(items: list[Loaded], state: StateDB) -> tuple[list[Loaded], dict[int, str]]:
    """The ready items to process, and ``{index in items: path of the done file with the same content}``
    for the others (their frames are let go)."""
    in_batch: dict[str, str] = {}
    ready: list[Loaded] = []
    dup_of: dict[int, str] = {}
    for i, it in enumerate(items):
        if not it.ready:
            continue
        prior = in_batch.get(it.sha) or state.done_path_for_hash(it.sha)
        if prior is not None:
            dup_of[i] = prior
            if prior != it.cand.rel:
                it.frame = None
            continue  # same path, same content (touched or re-copied): nothing new either
        in_batch[it.sha] = it.cand.rel
        ready.append(it)
    return ready, dup_of


def image_results(ready: list[Loaded], results: list, thumb_size: int) -> list[ImageResult]:
    """The pipeline's results (one per ready item) as rows: every box, with its embedding and thumbnail
    when it is an animal crop."""
    out = []
    for it, res in zip(ready, results, strict=True):
        it.frame = None  # let the pixels go
        if res.failure:
            out.append(ImageResult(it, None, []))
            continue
        det = res.detections
        emb = {int(j): res.embeddings[r] for r, j in enumerate(res.animal_index)}
        crops = {int(j): res.crops[r] for r, j in enumerate(res.animal_index)} if res.crops else {}
        rows = []
        for j in range(len(det)):
            vec = emb.get(j)
            x1, y1, x2, y2 = (float(v) for v in det.xyxy[j])
            rows.append({"sha256": it.sha, "idx": j, "category": int(det.category[j]),
                         "conf": float(det.confidence[j]), "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                         "embedding": None if vec is None else np.asarray(vec, EMBED_DTYPE).tobytes(),
                         "thumb": _thumb(crops[j], thumb_size) if j in crops else None})
        out.append(ImageResult(it, res.size, rows))
    return out


def _thumb(crop: np.ndarray, size: int) -> bytes | None:
    if size <= 0 or crop.size == 0:
        return None
    return encode_jpeg(crop, size, quality=80)


def commit_batch(state: StateDB, items: list[Loaded], dup_of: dict[int, str], results: list[ImageResult],
                 gap: float) -> tuple[int, int]:
    """Write the whole batch in one transaction; returns (files done, files pending)."""
    now = time.time()
    done = pending = 0
    with state.transaction() as con:
        for i, it in enumerate(items):
            c = it.cand
            if it.status is not None:  # pending or failed, with the reason
                pending += it.status == FileState.PENDING
                state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, it.status, it.sha, it.reason)
            elif i in dup_of:
                same = dup_of[i] == c.rel
                state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns,
                                  FileState.DONE if same else FileState.DUPLICATE, it.sha, None,
                                  None if same else dup_of[i])
        for r in results:
            it, c = r.loaded, r.loaded.cand
            if r.size is None:
                state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, FileState.FAILED, it.sha,
                                  "could not be processed")
                continue
            h, w = r.size
            cap = it.capture
            event_id = state.assign_event(con, c.camera, cap.timestamp, gap)
            state.insert(con, "images", [{
                "sha256": it.sha, "path": c.rel, "camera": c.camera, "captured": cap.captured,
                "captured_ts": cap.timestamp, "utc_offset": cap.utc_offset, "time_source": cap.time_source,
                "make": cap.make, "model": cap.model, "width": w, "height": h, "latitude": cap.latitude,
                "longitude": cap.longitude, "event_id": event_id, "processed": now}])
            state.insert(con, "detections", r.detections)
            state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, FileState.DONE, it.sha)
            done += 1
    return done, pending
