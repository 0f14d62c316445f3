"""Steps 2 and 3 of the watch's commit protocol: an event's decisions, then their gallery side effects.

* :func:`event_sightings` reads an event's animal detections; the runner links them into tracks and
  decides each track against the gallery *without writing to it*; :func:`commit_decisions` stores every
  member's decision (:func:`decision_row`) and ``events.status = 'decided'`` in one transaction.
* :func:`apply_gallery` replays that record until done: a provisional identity per new track (the gallery
  returns the existing one on a replay), the sightings (those already in the gallery skipped when
  recovering), then ``status = 'closed'``. See :mod:`fieldreid.watch.runner`.

Rows are read and written by column name (``sqlite3.Row``, ``{column: value}``).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from fieldreid.gallery.openset import Decision
from fieldreid.gallery.store import Gallery, box_key
from fieldreid.types import DecisionKind
from fieldreid.watch.commit import EMBED_DTYPE
from fieldreid.watch.events import Sighting
from fieldreid.watch.state import StateDB


def event_sightings(state: StateDB, event_id: int) -> list[Sighting]:
    """The event's detections that have an embedding (animals), as :class:`Sighting` s."""
    rows = state.rows(
        "SELECT d.sha256, d.idx, i.captured_ts, i.path, d.conf, d.embedding, d.x1, d.y1, d.x2, d.y2, i.width, "
        "i.height FROM detections d JOIN images i ON i.sha256 = d.sha256 WHERE i.event_id = ? AND d.embedding "
        "IS NOT NULL", (event_id,))
    return [Sighting(r["sha256"], r["idx"], (r["captured_ts"], r["path"]), r["conf"],
                     np.frombuffer(r["embedding"], EMBED_DTYPE).astype(np.float32),
                     (r["x1"], r["y1"], r["x2"], r["y2"]), r["path"],
                     (r["width"], r["height"]) if r["width"] and r["height"] else None)
            for r in rows]


def decision_row(d: Decision, s: Sighting, event_id: int, track: int, n_frames: int, representative: bool,
                 now: float) -> dict:
    """The ``decisions`` row of one track member: the track's decision, recorded against this detection
    (its probability too: one per track, from the track's fused embedding, not one per frame)."""
    return {"sha256": s.sha256, "idx": s.idx, "event_id": event_id, "track": track, "n_frames": n_frames,
            "decision": d.decision, "identity": d.identity, "score": d.score, "runner_up": d.runner_up,
            "probability": d.probability, "probability_source": d.probability_source,
            "runner_up_score": d.runner_up_score, "upper": d.upper, "lower": d.lower,
            "calibrated": int(d.calibrated), "threshold_method": d.threshold_method, "model_id": d.model_id,
            "gallery_version": d.gallery_version, "species": d.species,
            "top": json.dumps([[i, round(sc, 6)] for i, sc in d.top]), "representative": int(representative),
            "decided": now}


def commit_decisions(state: StateDB, event_id: int, rows: list[dict]) -> None:
    """Step 2's write: the decisions and the event's new status (``closed`` at once when it has none)."""
    with state.transaction() as con:
        state.insert(con, "decisions", rows, or_replace=True)
        con.execute("UPDATE events SET status = ? WHERE id = ?", ("decided" if rows else "closed", event_id))


def _box(r: sqlite3.Row) -> tuple[float, float, float, float]:
    return r["x1"], r["y1"], r["x2"], r["y2"]


def apply_gallery(state: StateDB, gallery: Gallery, event_id: int, root: Path, recovering: bool = False) -> None:
    """Step 3: provisional identities and gallery sightings, idempotent; then ``closed``."""
    rows = state.rows(
        "SELECT c.sha256, c.idx, c.track, c.decision, c.identity, c.score, c.runner_up, c.runner_up_score, "
        "c.upper, c.lower, c.threshold_method, c.model_id, c.gallery_version, c.species, c.representative, "
        "c.probability, c.probability_source, "
        "i.path, i.captured, i.utc_offset, i.camera, d.x1, d.y1, d.x2, d.y2, d.embedding FROM decisions c "
        "JOIN images i ON i.sha256 = c.sha256 JOIN detections d ON d.sha256 = c.sha256 AND d.idx = c.idx "
        "WHERE c.event_id = ? ORDER BY c.track, i.captured_ts, i.path, c.idx", (event_id,))
    by_track: dict[int, list[sqlite3.Row]] = {}
    for r in rows:
        by_track.setdefault(r["track"], []).append(r)
    identity_of: dict[int, str | None] = {}
    for track, members in by_track.items():
        rep = next(m for m in members if m["representative"])
        identity_of[track] = rep["identity"]
        if rep["decision"] == DecisionKind.NEW and rep["identity"] is None:
            vecs = np.stack([np.frombuffer(m["embedding"], EMBED_DTYPE).astype(np.float64) for m in members])
            fused = vecs.sum(0)
            fused = (fused / max(float(np.linalg.norm(fused)), 1e-12)).astype(np.float32)
            identity_of[track] = gallery.add_provisional(rep["species"], fused, rep["model_id"], rep["path"],
                                                         _box(rep))
    existing: set[tuple[str, str]] = set()
    if recovering and rows:
        existing = gallery.sighting_keys({r["path"] for r in rows})
    sightings = []
    source_root = str(Path(root).resolve())
    for r in rows:
        if (r["path"], box_key(_box(r))) in existing:
            continue
        sightings.append({"image": r["path"], "box": _box(r), "captured": r["captured"] + (r["utc_offset"] or ""),
                          "camera": r["camera"], "decision": r["decision"], "identity_id": identity_of[r["track"]],
                          "score": r["score"], "runner_up_id": r["runner_up"], "runner_up_score": r["runner_up_score"],
                          "upper": r["upper"], "lower": r["lower"], "threshold_method": r["threshold_method"],
                          "model_id": r["model_id"], "gallery_version": r["gallery_version"],
                          "probability": r["probability"], "probability_source": r["probability_source"],
                          # unique by (content, box) in the gallery; the crop is read back under the root
                          "source_sha256": r["sha256"], "source_root": source_root,
                          "vector": None if r["embedding"] is None else np.frombuffer(r["embedding"], EMBED_DTYPE)})
    if sightings:
        gallery.add_sightings(sightings)
    with state.transaction() as con:
        for track, ident in identity_of.items():
            con.execute("UPDATE decisions SET identity = ? WHERE event_id = ? AND track = ?", (ident, event_id, track))
        con.execute("UPDATE events SET status = 'closed' WHERE id = ?", (event_id,))
