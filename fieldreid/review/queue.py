"""What there is to review: the tracks of a watch output folder, matched to their sightings in the gallery.

A *track* is one animal of one event (:mod:`fieldreid.watch.events`), decided once by ``watch`` from all its
frames; the review unit is the same. Its key is ``<event>-<track>``. Every frame of it is a gallery
sighting, found by the gallery's own unique key (the image's content SHA-256 and the box), so the state
shown is the gallery's *now* - after merges, renames and reviews - not what ``watch`` wrote then.

Order (:meth:`ReviewSource.queue`): ``new`` first, then ``uncertain``, then a fixed sample of ``known``
(``qc_percent`` of them, chosen by a hash of the track's first frame, so the sample does not change between
visits) for quality control - a confident false match is the error nobody sees otherwise - then the other
known ones; within each group by camera and time. Only events ``watch`` has closed (their gallery
sightings written) are listed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldreid.errors import FieldreidError

GROUPS = {"new": 0, "uncertain": 1, "known": 2}
STATUSES = ("todo", "reviewed", "all")
MAX_CANDIDATES = 5
PHOTOS_PER_CANDIDATE = 4
EMBED_DTYPE = "<f2"  # how watch stores detection embeddings in results.db (fieldreid.watch: EMBED_DTYPE)


class NotFound(FieldreidError):
    """An id that names nothing (in this output folder or its gallery)."""


@dataclass
class Filters:
    camera: str | None = None
    species: str | None = None
    decision: str | None = None
    status: str = "todo"
    date_from: str | None = None
    date_to: str | None = None
    score_min: float | None = None
    score_max: float | None = None

    @classmethod
    def parse(cls, params) -> Filters:
        def num(name: str) -> float | None:
            v = params.get(name)
            if v in (None, ""):
                return None
            try:
                f = float(v)
            except ValueError:
                raise FieldreidError(f"{name} must be a number, got {v!r}") from None
            if not np.isfinite(f):
                raise FieldreidError(f"{name} must be finite")
            return f

        status = params.get("status") or "todo"
        if status not in STATUSES:
            raise FieldreidError(f"status must be one of {', '.join(STATUSES)}")
        decision = params.get("decision") or None
        if decision is not None and decision not in GROUPS:
            raise FieldreidError(f"decision must be one of {', '.join(GROUPS)}")
        return cls(camera=params.get("camera") or None, species=params.get("species") or None, decision=decision,
                   status=status, date_from=params.get("from") or None, date_to=params.get("to") or None,
                   score_min=num("min"), score_max=num("max"))


def parse_key(key: str) -> tuple[int, int]:
    event, _, track = key.partition("-")
    if not (event.isdigit() and track.isdigit() and len(event) <= 12 and len(track) <= 6):
        raise NotFound(f"No track {key!r}.")
    return int(event), int(track)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


class ReviewSource:
    """A watch output folder (read-only) and the gallery its decisions went to.

    Not thread-safe: the web app serialises calls (one lock around every use).
    """

    def __init__(self, out: str | Path, gallery, qc_percent: float = 20.0) -> None:
        from fieldreid.storage.fsutil import text_path
        from fieldreid.watch import RESULTS_DB, StateDB

        self.out = Path(out)
        self.state = StateDB(self.out / RESULTS_DB, readonly=True)
        self.gallery = gallery
        self.qc_percent = float(qc_percent)
        root = self.state.meta("root")
        self.root = Path(text_path(root)) if root else None
        self.title = Path(root).name if root else self.out.name
        self._block = None  # (versions, row ids, identity ids, matrix)

    def close(self) -> None:
        self.state.close()

    # ------------------------------------------------------------------ tracks
    def _rows(self, where: str = "", args: tuple = ()) -> list[tuple]:
        from fieldreid.report.tables import decision_probability

        return self.state.con.execute(
            "SELECT c.event_id, c.track, c.sha256, c.idx, c.representative, c.decision, c.identity, c.score, "
            "c.n_frames, c.species, c.upper, c.lower, c.calibrated, c.threshold_method, c.model_id, c.top, i.path, "
            "i.camera, i.captured, i.utc_offset, i.width, i.height, d.conf, d.x1, d.y1, d.x2, d.y2, d.embedding, "
            f"{decision_probability(self.state.con)} FROM decisions c JOIN images i ON i.sha256 = c.sha256 JOIN detections d ON d.sha256 = c.sha256 AND "
            "d.idx = c.idx JOIN events e ON e.id = c.event_id WHERE e.status = 'closed'" + where +
            " ORDER BY c.event_id, c.track, i.captured_ts, i.path, c.idx", args).fetchall()

    def _sightings(self, frames: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, str | None]]:
        """(content sha256, box key) -> (gallery sighting id, its identity now)."""
        out: dict = {}
        shas = sorted({f[0] for f in frames})
        for a in range(0, len(shas), 500):
            part = shas[a:a + 500]
            for sid, sha, box, ident in self.gallery.read(
                    f"SELECT id, source_sha256, box, identity_id FROM sightings WHERE source_sha256 IN "
                    f"({', '.join('?' * len(part))})", part):
                out[(sha, box)] = (sid, ident)
        return out

    def _tracks(self, rows: list[tuple]) -> list[dict]:
        from fieldreid.gallery.store import box_key
        from fieldreid.review.actions import standing

        tracks: dict[tuple[int, int], dict] = {}
        for r in rows:
            t = tracks.setdefault((r[0], r[1]), {"key": f"{r[0]}-{r[1]}", "event": r[0], "track": r[1], "frames": []})
            frame = {"sha": r[2], "idx": r[3], "rep": bool(r[4]), "path": r[16], "captured": r[18] + (r[19] or ""),
                     "width": r[20], "height": r[21], "conf": r[22], "xyxy": (r[23], r[24], r[25], r[26]),
                     "box": box_key((r[23], r[24], r[25], r[26])), "embedding": r[27]}
            t["frames"].append(frame)
            if r[4] or "decision" not in t:
                t.update(decision=r[5], machine_identity=r[6], score=r[7], n_frames=r[8], species=r[9], upper=r[10],
                         lower=r[11], calibrated=bool(r[12]), threshold_method=r[13], model_id=r[14],
                         top=json.loads(r[15] or "[]"), camera=r[17], captured=frame["captured"], file=r[16],
                         conf=r[22], rep=frame, probability=r[28])
        found = self._sightings([(f["sha"], f["box"]) for t in tracks.values() for f in t["frames"]])
        all_ids = []
        for t in tracks.values():
            for f in t["frames"]:
                sid, ident = found.get((f["sha"], f["box"]), (None, None))
                f["sighting"] = sid
                if f is t["rep"]:
                    t["identity"] = ident if sid is not None else None
                if sid is not None:
                    all_ids.append(sid)
            t["sighting_ids"] = [f["sighting"] for f in t["frames"] if f["sighting"] is not None]
            t["in_gallery"] = t["rep"]["sighting"] is not None
        verdicts = standing(self.gallery, all_ids)
        for t in tracks.values():
            t["review"] = verdicts.get(t["rep"]["sighting"]) if t["in_gallery"] else None
            h = hashlib.sha256(f"{t['rep']['sha']}:{t['rep']['idx']}".encode()).digest()
            t["qc"] = t["decision"] == "known" and int.from_bytes(h[:4], "big") % 10000 < self.qc_percent * 100
        return list(tracks.values())

    def tracks(self) -> list[dict]:
        """Every closed track of the output folder, with its state in the gallery now."""
        return self._tracks(self._rows())

    def queue(self, filters: Filters | None = None, tracks: list[dict] | None = None) -> list[dict]:
        """Tracks in review order, filtered; each a short summary for the list."""
        f = filters or Filters()
        items = []
        for t in self.tracks() if tracks is None else tracks:
            if f.camera and t["camera"] != f.camera or f.species and t["species"] != f.species:
                continue
            if f.decision and t["decision"] != f.decision:
                continue
            day = t["captured"][:10]
            if f.date_from and day < f.date_from or f.date_to and day > f.date_to:
                continue
            if (f.score_min is not None or f.score_max is not None) and t["score"] is None:
                continue
            if f.score_min is not None and t["score"] < f.score_min or f.score_max is not None and t["score"] > f.score_max:
                continue
            reviewed = t["review"] is not None
            to_review = t["in_gallery"] and not reviewed and (t["decision"] != "known" or t["qc"] or f.decision)
            if f.status == "todo" and not to_review or f.status == "reviewed" and not reviewed:
                continue
            items.append(t)
        items.sort(key=lambda t: (GROUPS[t["decision"]] + (1 if t["decision"] == "known" and not t["qc"] else 0),
                                  t["camera"], t["captured"], t["event"], t["track"]))
        return [self._summary(t) for t in items]

    @staticmethod
    def _summary(t: dict) -> dict:
        rep = t["rep"]
        return {"key": t["key"], "decision": t["decision"], "identity": t["identity"],
                "machine_identity": t["machine_identity"], "score": t["score"], "probability": t["probability"],
                "species": t["species"],
                "camera": t["camera"], "captured": t["captured"], "file": t["file"], "n_frames": t["n_frames"],
                "qc": t["qc"], "in_gallery": t["in_gallery"], "review": t["review"],
                "thumb": f"img/thumb/{rep['sha']}/{rep['idx']}"}

    def counts(self, tracks: list[dict] | None = None) -> dict:
        tracks = self.tracks() if tracks is None else tracks
        todo = sum(1 for t in tracks if t["in_gallery"] and t["review"] is None and (t["decision"] != "known" or t["qc"]))
        return {"tracks": len(tracks), "to_review": todo, "reviewed": sum(1 for t in tracks if t["review"]),
                "by_decision": {d: sum(1 for t in tracks if t["decision"] == d) for d in GROUPS},
                "not_in_gallery": sum(1 for t in tracks if not t["in_gallery"])}

    def options(self) -> dict:
        """Values the filters can take."""
        con = self.state.con
        cams = [r[0] for r in con.execute("SELECT DISTINCT camera FROM images ORDER BY camera")]
        species = [r[0] for r in con.execute("SELECT DISTINCT species FROM decisions ORDER BY species")]
        first, last = con.execute("SELECT min(captured), max(captured) FROM images").fetchone()
        return {"cameras": cams, "species": species, "from": (first or "")[:10], "to": (last or "")[:10]}

    # ------------------------------------------------------------------ one track
    def _one(self, key: str) -> dict:
        event, track = parse_key(key)
        rows = self._rows(" AND c.event_id = ? AND c.track = ?", (event, track))
        if not rows:
            raise NotFound(f"No track {key} in {self.out}.")
        [t] = self._tracks(rows)
        return t

    @staticmethod
    def _fused(t: dict) -> np.ndarray | None:
        vecs = [np.frombuffer(f["embedding"], EMBED_DTYPE).astype(np.float64) for f in t["frames"] if f["embedding"]]
        return _unit(np.sum(vecs, axis=0)) if vecs else None

    def track_ref(self, key: str):
        """What :func:`fieldreid.review.actions.decide` needs about a track."""
        from fieldreid.review.actions import Track

        t = self._one(key)
        if not t["in_gallery"]:
            raise NotFound(f"Track {key} has no sightings in {self.gallery.path}: this output folder was made with "
                           "another gallery (pass it with --gallery).")
        rep = t["rep"]
        return Track(key=key, sighting_ids=tuple(t["sighting_ids"]), representative=rep["sighting"],
                     species=t["species"], model_id=t["model_id"], decision=t["decision"], score=t["score"],
                     source=rep["path"], box=rep["box"], vector=self._fused(t))

    def _vectors(self):
        """The gallery's embeddings as a matrix, reloaded when the gallery changes."""
        versions = self.gallery.versions()
        if self._block is None or self._block[0] != versions:
            block = self.gallery.load_vectors()
            self._block = (versions, block.row_ids, np.array(block.identity_ids, dtype=object),
                           block.matrix.astype(np.float32), self.gallery.identity_species())
        return self._block

    def item(self, key: str) -> dict:
        """Everything the page shows about one track."""
        from fieldreid.review.actions import own_identity

        t = self._one(key)
        g = self.gallery
        current = t["identity"]
        own = own_identity(g, current, t["sighting_ids"]) if t["in_gallery"] else False
        frames = []
        for f in t["frames"]:
            w, h = f["width"] or 1, f["height"] or 1
            x1, y1, x2, y2 = f["xyxy"]
            frames.append({"sha": f["sha"], "idx": f["idx"], "rep": f["rep"], "file": f["path"],
                           "captured": f["captured"], "conf": round(f["conf"], 3), "width": f["width"],
                           "height": f["height"], "sighting": f["sighting"],
                           "box": [x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h],
                           "box_px": [round(x1), round(y1), round(x2), round(y2)],
                           "frame": f"img/frame/{f['sha']}", "crop": f"img/crop/{f['sha']}/{f['idx']}",
                           "thumb": f"img/thumb/{f['sha']}/{f['idx']}"})
        frames.sort(key=lambda f: (not f["rep"], f["captured"], f["file"]))
        info = {k: t[k] for k in ("key", "event", "track", "decision", "machine_identity", "score", "probability",
                                  "n_frames", "species", "upper", "lower", "calibrated", "threshold_method", "model_id",
                                  "camera", "captured", "file", "conf", "qc", "in_gallery", "review")}
        info["top_at_decision"] = t["top"]
        info["frames"] = frames
        info["identity"] = self._identity(current) if current else None
        if info["identity"] is not None:
            info["identity"]["own"] = own
        info["candidates"] = self._candidates(t, current, own)
        return info

    def _identity(self, identity_id: str) -> dict | None:
        from fieldreid.gallery.store import IdentityNotFoundError

        try:
            i = self.gallery.get_identity(identity_id)
        except IdentityNotFoundError:
            return None
        return {"id": i.id, "name": i.name, "species": i.species, "status": i.status, "origin": i.origin,
                "n_embeddings": i.n_embeddings, "n_sightings": i.n_sightings}

    def _candidates(self, t: dict, current: str | None, own: bool) -> list[dict]:
        query = self._fused(t)
        if query is None:
            return []
        _versions, row_ids, ident_ids, matrix, species_of = self._vectors()
        if matrix.shape[0] == 0 or matrix.shape[1] != query.shape[0]:
            return []
        scores = matrix @ query
        best: dict[str, float] = {}
        for iid, s in zip(ident_ids, scores, strict=True):
            if s > best.get(iid, -2.0):
                best[iid] = float(s)
        sp = t["species"]
        skip = {current} if own else set()
        ranked = sorted(((s, i) for i, s in best.items() if i not in skip and (
            sp == "animal" or species_of.get(i) in (sp, "animal"))), key=lambda x: (-x[0], x[1]))
        chosen = [i for _, i in ranked[:MAX_CANDIDATES]]
        if current and not own and current in best and current not in chosen:
            chosen = [current] + chosen[:MAX_CANDIDATES - 1]  # the identity it carries now is always offered
        mine = set(t["sighting_ids"])
        out = []
        for iid in chosen:
            info = self._identity(iid)
            if info is None:
                continue
            rows = [(float(scores[k]), int(row_ids[k])) for k in np.flatnonzero(ident_ids == iid)]
            rows.sort(key=lambda x: (-x[0], x[1]))
            photos = [{"kind": "embedding", "id": r, "score": round(s, 4), "src": f"img/embedding/{r}"}
                      for s, r in rows[:PHOTOS_PER_CANDIDATE]]
            if len(photos) < PHOTOS_PER_CANDIDATE:  # field animals hold one fused embedding: show their sightings too
                shown = {tuple(r) for r in self.gallery.read(
                    f"SELECT source, box FROM embeddings WHERE id IN ({', '.join('?' * len(photos))})",
                    [p["id"] for p in photos])} if photos else set()
                for sid, vec, image, box in self.gallery.read(
                        "SELECT id, vector, image, box FROM sightings WHERE identity_id = ? ORDER BY id DESC LIMIT 12",
                        (iid,)):
                    if sid in mine or (image, box) in shown or len(photos) >= PHOTOS_PER_CANDIDATE:
                        continue
                    s = None if vec is None else round(float(np.frombuffer(vec, "<f4") @ query), 4)
                    photos.append({"kind": "sighting", "id": sid, "score": s, "src": f"img/sighting/{sid}"})
            out.append({**info, "score": round(best[iid], 4), "current": iid == current, "photos": photos})
        return out
