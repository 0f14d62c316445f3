"""Plain outputs of a watch folder, streamed from the results database and written atomically.

* ``detections.json`` — MegaDetector batch output (format 1.4) that Timelapse and AddaxAI read; a
  duplicate file carries its original's detections (it is the same picture), an unreadable one a
  ``failure``; files still being written are left out until they are done.
* ``images.csv`` — one row per file: state, failure reason, capture time and its source, camera, event.
* ``sightings.csv`` — one row per animal detection with its (event-fused) decision: ``score`` is what the
  thresholds compared (the cosine, or the fused probability where verification decided), ``probability``
  the decision's calibrated probability (empty without a calibration).

File names are the text form of :func:`fieldreid.storage.fsutil.path_text`, as the results database stores them:
a name that is not valid UTF-8 (a damaged FAT card) keeps its readable part and gets ``\\xNN`` for each
undecodable byte, ``\\\\`` for a backslash, so every output is valid UTF-8 and the name can be turned
back into the bytes on disk (:func:`fieldreid.storage.fsutil.text_path`).

Each file is written to a temp file beside it, fsynced and renamed over the old one, row by row from a
database cursor, so a folder of 100k images never needs its results in memory, and a crash or a full
disk leaves the previous good file in place.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import IO

from fieldreid.report.megadetector import detections_entry, failure_entry, md_detection, write_batch_output
from fieldreid.storage.fsutil import atomic_output

DETECTIONS_JSON = "detections.json"
IMAGES_CSV = "images.csv"
SIGHTINGS_CSV = "sightings.csv"


@contextmanager
def atomic_text(path: str | Path) -> Iterator[IO[str]]:
    """Write a text file atomically (:func:`fieldreid.storage.fsutil.atomic_output`): a handle on a temp file that
    is fsynced and renamed over ``path``; an ``OSError`` becomes :class:`OutputWriteError` and the previous
    ``path`` is untouched."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        yield fh


def decision_probability(con) -> str:
    """SQL for the decisions' calibrated probability (table alias ``c``): ``NULL`` in a results database
    decided before it had the column (a report opens it read-only, unmigrated)."""
    cols = {r[1] for r in con.execute("PRAGMA table_info(decisions)")}
    return "c.probability" if "probability" in cols else "NULL"


def _md_individual(decision: str | None, identity: str | None, score: float | None,
                   probability: float | None = None) -> tuple[str, float] | None:
    """(individual, conf) of an animal for the MegaDetector JSON. ``conf`` is the decision's calibrated
    probability where the gallery held a calibration (known: P(that animal); new: P(a new animal); uncertain:
    P(the best candidate), low, so a threshold in Timelapse hides it). Without one - the format needs a number
    - it is the old ranking value: the cosine for known / uncertain, 1.0 for new (the identity was made from
    this animal); ``info.classification_conf`` says which (see :func:`write_detections_json`)."""
    if not identity or decision not in ("known", "new", "uncertain"):
        return None
    if probability is not None:
        conf = min(1.0, max(0.0, float(probability)))
    else:
        conf = 1.0 if decision == "new" else min(1.0, max(0.0, float(score or 0.0)))
    return identity, round(conf, 3)


def write_detections_json(con, path: Path, detector: str, conf_threshold: float, extra_info: dict | None = None,
                          resolver=None) -> int:
    """MegaDetector batch output from the results database; returns the number of image entries.

    An identified animal carries its individual as a classification (``classification_categories``: one id per
    individual, its species in ``classification_category_descriptions``). ``resolver``
    (:class:`fieldreid.report.identities.IdentityResolver`) maps recorded identities to the gallery's current ones.
    """
    from fieldreid.gallery.store import box_key

    def current(decision, identity, score, sha, box, prob) -> tuple[tuple[str, float] | None, str | None]:
        if resolver is not None and identity:
            res = resolver.resolve(identity, sha, box_key(box))
            identity = res.identity
            return _md_individual(decision, identity, score, prob), resolver.species(identity)
        return _md_individual(decision, identity, score, prob), None

    prob_sql = decision_probability(con)
    species_of: dict[str, str] = {}
    n_prob = n_ids = 0
    for decision, identity, score, sha, searched, x1, y1, x2, y2, prob in con.execute(
            "SELECT c.decision, c.identity, c.score, c.sha256, c.species, d.x1, d.y1, d.x2, d.y2, "
            f"{prob_sql} FROM decisions c JOIN detections d ON d.sha256 = c.sha256 AND d.idx = c.idx"):
        ind, sp = current(decision, identity, score, sha, (x1, y1, x2, y2), prob)
        if ind is not None:
            species_of.setdefault(ind[0], sp or searched or "animal")
            n_ids += 1
            n_prob += prob is not None
    cat_id = {name: str(i) for i, name in enumerate(sorted(species_of), start=1)}
    rows = con.execute(
        "SELECT f.path, f.status, f.reason, i.width, i.height, d.category, d.conf, d.x1, d.y1, d.x2, d.y2, "
        f"c.decision, c.identity, c.score, i.sha256, {prob_sql} "
        "FROM files f LEFT JOIN images i ON i.sha256 = f.sha256 AND f.status IN ('done', 'duplicate') "
        "LEFT JOIN detections d ON d.sha256 = i.sha256 LEFT JOIN decisions c ON c.sha256 = d.sha256 AND c.idx = d.idx "
        "WHERE f.status != 'pending' ORDER BY f.path, d.conf DESC")

    def entries() -> Iterator[dict]:
        for (file, status, reason), group in groupby(rows, key=lambda r: r[:3]):
            if status == "failed":
                yield failure_entry(file, reason)
                continue
            dets = []
            for r in group:
                w, h, cat = r[3], r[4], r[5]
                if cat is not None and w:
                    det = md_detection(cat, r[6], (r[7], r[8], r[9], r[10]), (h, w))
                    if det is not None:
                        ind = current(r[11], r[12], r[13], r[14], (r[7], r[8], r[9], r[10]), r[15])[0]
                        if ind is not None and ind[0] in cat_id:
                            det["classifications"] = [[cat_id[ind[0]], ind[1]]]
                        dets.append(det)
            yield detections_entry(file, dets)

    info = dict(extra_info or {})
    if cat_id:
        info.setdefault("classifier", "fieldreid re-identification (individuals)")
        info.setdefault("classification_conf", "calibrated probability" if n_prob == n_ids else
                        "calibrated probability where the gallery held a calibration "
                        f"({n_prob} of {n_ids} animals), else the cosine (known, uncertain) or 1.0 (new)")
    return write_batch_output(path, entries(), detector, conf_threshold, info,
                              {v: k for k, v in cat_id.items()} or None,
                              {cat_id[k]: v for k, v in species_of.items()} or None)


def write_megadetector(out: Path, path: Path, gallery: Path | None = None) -> int:
    """``fieldreid report --megadetector``: the batch output of watch output folder ``out`` with identities as the
    gallery holds them now."""
    from fieldreid import __version__
    from fieldreid.report.identities import IdentityResolver
    from fieldreid.watch.state import StateDB

    db = StateDB(Path(out) / "results.db", readonly=True)
    try:
        g = gallery or (Path(db.meta("gallery")) if db.meta("gallery") else None)
        conf = float(db.meta("conf") or 0.2)
        return write_detections_json(db.con, Path(path), db.meta("detector") or "detector", conf,
                                     {"fieldreid_version": __version__, "embedder": db.meta("embedder") or ""},
                                     resolver=IdentityResolver(g))
    finally:
        db.close()


IMAGE_COLUMNS = ["file", "camera", "status", "reason", "duplicate_of", "sha256", "captured", "utc_offset",
                 "time_source", "make", "model", "width", "height", "event_id", "detections", "animals"]


def write_images_csv(con, path: Path, animal_conf: float = 0.0) -> int:
    rows = con.execute(
        "SELECT f.path, f.camera, f.status, f.reason, f.duplicate_of, f.sha256, i.captured, i.utc_offset, "
        "i.time_source, i.make, i.model, i.width, i.height, i.event_id, "
        "(SELECT count(*) FROM detections d WHERE d.sha256 = i.sha256), "
        "(SELECT count(*) FROM detections d WHERE d.sha256 = i.sha256 AND d.category = 1 AND d.conf >= ?) "
        "FROM files f LEFT JOIN images i ON i.sha256 = f.sha256 AND f.status IN ('done', 'duplicate') "
        "ORDER BY f.path", (animal_conf,))
    n = 0
    with atomic_text(path) as fh:
        w = csv.writer(fh)
        w.writerow(IMAGE_COLUMNS)
        for r in rows:
            w.writerow(["" if v is None else v for v in r])
            n += 1
    return n


SIGHTING_COLUMNS = ["file", "camera", "captured", "utc_offset", "event_id", "track", "box_index", "conf",
                    "bbox_x", "bbox_y", "bbox_w", "bbox_h", "decision", "identity", "score", "runner_up",
                    "runner_up_score", "calibrated", "frames_fused", "model_id", "gallery_version", "probability"]


def sighting_rows(con) -> Iterator[tuple]:
    """Animal detections that were embedded, with their decision (empty while the event is open)."""
    yield from con.execute(
        "SELECT i.path, i.camera, i.captured, i.utc_offset, i.event_id, c.track, d.idx, d.conf, d.x1, d.y1, d.x2, "
        "d.y2, i.width, i.height, c.decision, c.identity, c.score, c.runner_up, c.runner_up_score, c.calibrated, "
        f"c.n_frames, c.model_id, c.gallery_version, {decision_probability(con)} FROM detections d "
        "JOIN images i ON i.sha256 = d.sha256 "
        "LEFT JOIN decisions c ON c.sha256 = d.sha256 AND c.idx = d.idx WHERE d.embedding IS NOT NULL "
        "ORDER BY i.captured, i.path, d.idx")


def _r(v, digits: int = 6):
    return "" if v is None else round(float(v), digits)


def write_sightings_csv(con, path: Path) -> int:
    n = 0
    with atomic_text(path) as fh:
        w = csv.writer(fh)
        w.writerow(SIGHTING_COLUMNS)
        for r in sighting_rows(con):
            (file, camera, captured, offset, event, track, idx, conf, x1, y1, x2, y2, iw, ih, decision, identity,
             score, runner, runner_score, calibrated, n_frames, model_id, gv, prob) = r
            w.writerow([file, camera, captured, offset or "", event, "" if track is None else track, idx,
                        _r(conf, 4), _r(x1 / iw), _r(y1 / ih), _r((x2 - x1) / iw), _r((y2 - y1) / ih),
                        decision or "pending", identity or "", _r(score), runner or "", _r(runner_score),
                        "" if calibrated is None else bool(calibrated), n_frames or "", model_id or "",
                        "" if gv is None else gv, _r(prob)])
            n += 1
    return n


def write_all(con, out: Path, detector: str, conf_threshold: float, extra_info: dict | None = None) -> list[Path]:
    """All three plain outputs; each atomic on its own."""
    write_detections_json(con, out / DETECTIONS_JSON, detector, conf_threshold, extra_info)
    write_images_csv(con, out / IMAGES_CSV)
    write_sightings_csv(con, out / SIGHTINGS_CSV)
    return [out / DETECTIONS_JSON, out / IMAGES_CSV, out / SIGHTINGS_CSV]


def read_csv(path: Path) -> list[dict]:
    """Small helper for tests and the report: rows of a CSV written here."""
    return list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
