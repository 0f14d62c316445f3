"""Suggested matches: which lab identity a device's own provisional animal probably is.

A field device may run ``fieldreid watch`` before it ever pulls the lab's gallery: every animal it sees is
then *new* and gets a provisional id (``<species>-P0001``). When the lab's identities arrive (``fieldreid
sync``), each provisional animal is searched against them - every species the lab sent, since a device that
could not tell the species filed it under ``animal`` - and decided with the open-set thresholds in force
(the gallery's for the candidate's species, else the embedder's own, else the defaults). A *known* or
*uncertain* outcome is stored as a suggestion in the gallery's ``suggestions`` table and shown by
``fieldreid gallery list`` / ``show``; nothing is merged behind anyone's back: ``fieldreid gallery merge
P --into LAB_ID`` accepts one. Suggestions are recomputed after every pull that changed the gallery.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fieldreid.gallery.openset import Thresholds, thresholds_for
from fieldreid.gallery.store import Gallery, utc_now
from fieldreid.types import DecisionKind


@dataclass(frozen=True)
class Suggestion:
    identity_id: str
    candidate_id: str
    candidate_species: str
    score: float
    decision: str
    runner_up_id: str | None
    runner_up_score: float | None
    upper: float
    lower: float
    threshold_method: str
    gallery_version: int
    created: str


def suggest_matches(gallery: Gallery, model_thresholds: Thresholds | None = None) -> list[Suggestion]:
    """Match every provisional animal this device made (origin ``field``) against the lab's identities and
    store the known/uncertain outcomes as suggestions (replacing earlier ones, in one transaction)."""
    con = gallery._con
    model_id = gallery.model_id
    field_ids = [r[0] for r in con.execute("SELECT id FROM identities WHERE origin = 'field' AND status = "
                                           "'provisional' ORDER BY id")]
    lab = {r[0]: r[1] for r in con.execute("SELECT id, species FROM identities WHERE origin = 'lab'")}
    found: list[Suggestion] = []
    if field_ids and lab and model_id is not None:
        block = gallery.load_vectors()
        mat = block.matrix.astype(np.float32)
        owners = np.array(block.identity_ids, dtype=object)
        lab_rows = np.flatnonzero(np.isin(owners, list(lab)))
        lab_ids = sorted(lab)
        col = {iid: k for k, iid in enumerate(lab_ids)}
        version = gallery.version
        for fid in field_ids:
            mine = np.flatnonzero(owners == fid)
            if len(mine) == 0 or len(lab_rows) == 0:
                continue
            sims = mat[mine] @ mat[lab_rows].T  # (own embeddings, lab embeddings)
            best = np.full(len(lab_ids), -np.inf, np.float32)  # per-identity max, as the search does
            np.maximum.at(best, [col[owners[r]] for r in lab_rows], sims.max(axis=0))
            order = np.argsort(-best, kind="stable")
            top = lab_ids[order[0]]
            score = float(best[order[0]])
            th = thresholds_for(gallery, lab[top], model_id, model_thresholds)
            decision = th.decide(score)
            if decision == DecisionKind.NEW:
                continue
            second = lab_ids[order[1]] if len(order) > 1 else None
            found.append(Suggestion(fid, top, lab[top], score, decision, second,
                                    float(best[order[1]]) if second else None, th.upper, th.lower, th.method,
                                    version, utc_now()))
    with gallery.transaction() as wcon:
        wcon.execute("DELETE FROM suggestions")
        wcon.executemany(f"INSERT INTO suggestions VALUES ({', '.join('?' * 12)})",
                         [tuple(s.__dict__.values()) for s in found])
    return found


def suggestions(gallery: Gallery, identity_id: str | None = None) -> dict[str, Suggestion]:
    """Stored suggestions by provisional identity (only those whose animal still exists)."""
    sql = ("SELECT s.* FROM suggestions s JOIN identities i ON i.id = s.identity_id JOIN identities c ON "
           "c.id = s.candidate_id")
    args: tuple = ()
    if identity_id is not None:
        sql += " WHERE s.identity_id = ?"
        args = (identity_id,)
    return {r[0]: Suggestion(*r) for r in gallery.read(sql, args)}
