"""A person's decisions about a track, written to the gallery: one transaction each, logged, undoable, queued for sync.

Verdicts (:data:`VERDICTS`) about one *track* (an animal of one event, seen in one or more frames; its frames
are gallery sightings):

* ``same`` - it is identity X. If the track made a provisional identity of its own (a ``new`` decision),
  that identity is merged into X (its embedding joins X); otherwise the track's sightings are assigned to
  X and the track's embedding is enrolled under X, so the gallery learns the view a person confirmed.
  ``whole_identity=True`` merges the track's *current identity* (all its sightings, every track) into X:
  the fix for two identities that are one animal.
* ``new`` - a new individual, named: its own provisional identity is confirmed (with the name, and a
  permanent id if given); a track that was matched to somebody else is split off into a new identity
  holding its embedding.
* ``other_species`` / ``not_animal`` - no individual of this gallery: its own provisional identity is
  deleted (so it never attracts another animal), its sightings name no identity.

Each decision runs the gallery's own management calls (``merge``, ``confirm``, ``delete``,
``add_provisional``, ``add_embeddings``, ``assign_sightings``) inside one :meth:`Gallery.transaction`,
so it lands whole or not at all; each call logs its own change and the decision logs a ``review`` change
(who, when, what it replaced). The rows it touched are recorded before and after in ``review_log``;
:func:`undo` puts the *before* rows back in one transaction, and refuses (naming why) when anything has
changed those rows since. The track's sightings are queued in the sync outbox with their crops, so the
next ``fieldreid sync`` pushes them with the identity a person gave them.

Tables (in the gallery file, next to the ``sync_`` ones; the gallery schema does not know them):

* ``review_log`` - one row per decision: who, when, the track, the verdict, the identity, what the
  gallery said before, the rows changed (for undo), and when/who undid it.
* ``review_sightings`` - the verdict currently standing for each reviewed sighting (what exports read).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fieldreid.errors import FieldreidError, InputError

VERDICTS = ("same", "new", "other_species", "not_animal")
#: verdicts that leave the track without an individual of this gallery
NO_INDIVIDUAL = ("other_species", "not_animal")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:-]{0,63}$")
MAX_TEXT = 200


class ReviewError(FieldreidError):
    """A decision that cannot be made as asked (already reviewed, stale, conflicting with later changes)."""


class AlreadyReviewed(ReviewError):
    pass


class UndoConflict(ReviewError):
    pass


@dataclass(frozen=True)
class Track:
    """What a decision needs to know about a track (built by :mod:`fieldreid.review.queue`)."""

    key: str
    sighting_ids: tuple[int, ...]
    representative: int            # its representative sighting
    species: str
    model_id: str
    decision: str                  # the machine's
    score: float | None
    source: str                    # the representative's image, as the gallery records it
    box: str                       # the representative's box (gallery box key)
    vector: np.ndarray | None = field(default=None, repr=False, compare=False)  # the track's fused embedding


@dataclass(frozen=True)
class Review:
    id: int
    at: str
    who: str
    out: str
    track: str
    verdict: str
    identity: str | None
    note: str | None
    replaced: dict
    sightings: list[int]
    gallery_version: int
    undone_at: str | None = None
    undone_by: str | None = None
    already_sent: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("id", "at", "who", "out", "track", "verdict", "identity", "note",
                                              "replaced", "sightings", "gallery_version", "undone_at", "undone_by",
                                              "already_sent")}


def clean_text(value: object, what: str, pattern: re.Pattern | None = None, limit: int = MAX_TEXT) -> str | None:
    """A person's text (a name, a note): trimmed, bounded, free of control characters; None if empty."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{what} must be text.")
    text = value.strip()
    if not text:
        return None
    if len(text) > limit or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{what} must be at most {limit} characters, without control characters.")
    if pattern is not None and not pattern.match(text):
        raise InputError(f"{what} {text!r} may hold letters, digits, space, '_', '.', ':' and '-' (at most 64, "
                         "starting with a letter or digit).")
    return text


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def standing(gallery, sighting_ids: Sequence[int]) -> dict[int, dict]:
    """The verdict standing for each of these sightings (only reviewed ones appear)."""
    ids = [int(i) for i in sighting_ids]
    if not ids:
        return {}
    out: dict[int, dict] = {}
    for a in range(0, len(ids), 500):
        part = ids[a:a + 500]
        for sid, rid, verdict, who, at, note in gallery.read(
                f"SELECT sighting_id, review_id, verdict, who, at, note FROM review_sightings WHERE sighting_id IN "
                f"({_marks(len(part))})", part):
            out[sid] = {"review": rid, "verdict": verdict, "who": who, "at": at, "note": note}
    return out


# ---------------------------------------------------------------------------------------- row snapshots
def _snapshot(con, identity_ids: set[str], sighting_ids: Sequence[int], full: set[str], extra: dict | None = None
              ) -> dict:
    """The rows a decision may touch: identities, their embeddings (whole rows for ``full`` identities, which
    may be deleted; else the identity they belong to), sightings (identity, runner-up) and standing verdicts."""
    ids = sorted(identity_ids)
    extra = extra or {}
    snap: dict = {"identities": {}, "embeddings": {}, "sightings": {}, "review_sightings": {}}
    if ids:
        for r in con.execute(f"SELECT id, name, species, status, origin, created, updated FROM identities WHERE id IN "
                             f"({_marks(len(ids))})", ids):
            snap["identities"][r[0]] = list(r[1:])
    emb_keys = [int(k) for k in extra.get("embeddings", ())]
    where = []
    args: list = []
    if ids:
        where.append(f"identity_id IN ({_marks(len(ids))})")
        args += ids
    if emb_keys:
        where.append(f"id IN ({_marks(len(emb_keys))})")
        args += emb_keys
    if where:
        for eid, iid, model, dim, dtype, vec, source, box, created in con.execute(
                "SELECT id, identity_id, model_id, dim, dtype, vector, source, box, created FROM embeddings WHERE "
                + " OR ".join(where), args):
            value: dict = {"identity_id": iid}
            if iid in full:
                value["row"] = [model, dim, dtype, base64.b64encode(vec).decode("ascii"), source, box, created]
            snap["embeddings"][str(eid)] = value
    sids = sorted({int(s) for s in sighting_ids} | {int(k) for k in extra.get("sightings", ())})
    where, args = [], []
    if sids:
        where.append(f"id IN ({_marks(len(sids))})")
        args += sids
    if ids:
        where.append(f"identity_id IN ({_marks(len(ids))}) OR runner_up_id IN ({_marks(len(ids))})")
        args += ids + ids
    if where:
        for sid, iid, runner in con.execute("SELECT id, identity_id, runner_up_id FROM sightings WHERE "
                                            + " OR ".join(where), args):
            snap["sightings"][str(sid)] = [iid, runner]
    rs = sorted({int(s) for s in sighting_ids})
    if rs:
        for sid, *rest in con.execute(f"SELECT sighting_id, review_id, verdict, who, at, note FROM review_sightings "
                                      f"WHERE sighting_id IN ({_marks(len(rs))})", rs):
            snap["review_sightings"][str(sid)] = rest
    return snap


def _same(table: str, a, b) -> bool:
    if table == "embeddings":
        return (a is None) == (b is None) and (a is None or a["identity_id"] == b["identity_id"])
    return a == b


def _diff(before: dict, after: dict) -> dict:
    out: dict = {}
    for table in before:
        changed = {}
        for key in sorted(set(before[table]) | set(after[table])):
            b, a = before[table].get(key), after[table].get(key)
            if not _same(table, b, a):
                changed[key] = [b, a]
        out[table] = changed
    return out


# ---------------------------------------------------------------------------------------- decisions
def _current_identity(gallery, sighting_id: int) -> str | None:
    row = gallery.read("SELECT identity_id FROM sightings WHERE id = ?", (int(sighting_id),)).fetchone()
    if row is None:
        raise ReviewError(f"Sighting {sighting_id} is no longer in {gallery.path}; reload the page.")
    return row[0]


def own_identity(gallery, identity_id: str | None, sighting_ids: Sequence[int]) -> bool:
    """True if ``identity_id`` is a provisional animal made for this track alone: every sighting of it is one
    of the track's, and every embedding of it was cut from one of the track's frames."""
    if identity_id is None:
        return False
    row = gallery.read("SELECT status, origin FROM identities WHERE id = ?", (identity_id,)).fetchone()
    if row is None or row[0] != "provisional" or row[1] != "field":
        return False
    mine = {int(s) for s in sighting_ids}
    theirs = {r[0] for r in gallery.read("SELECT id FROM sightings WHERE identity_id = ?", (identity_id,))}
    if not theirs or not theirs <= mine:
        return False
    ids = sorted(mine)
    frames = set(gallery.read(f"SELECT image, box FROM sightings WHERE id IN ({_marks(len(ids))})", ids).fetchall())
    embs = gallery.read("SELECT source, box FROM embeddings WHERE identity_id = ?", (identity_id,)).fetchall()
    return all((s, b) in frames for s, b in embs)


def _record(row) -> Review:
    (rid, at, who, out, track, verdict, identity, note, replaced, sightings, version, undone_at, undone_by) = row
    return Review(rid, at, who, out, track, verdict, identity, note, json.loads(replaced), json.loads(sightings),
                  version, undone_at, undone_by)


_COLS = ("id, at, who, out, track, verdict, identity, note, replaced, sightings, gallery_version, undone_at, "
         "undone_by")


def get_review(gallery, review_id: int) -> Review:
    row = gallery.read(f"SELECT {_COLS} FROM review_log WHERE id = ?", (int(review_id),)).fetchone()
    if row is None:
        raise ReviewError(f"No review decision #{review_id} in {gallery.path}.")
    return _record(row)


def history(gallery, limit: int = 50, who: str | None = None) -> list[Review]:
    """Decisions, newest first."""
    sql, args = f"SELECT {_COLS} FROM review_log", []
    if who is not None:
        sql += " WHERE who = ?"
        args.append(who)
    return [_record(r) for r in gallery.read(sql + " ORDER BY id DESC LIMIT ?", (*args, int(limit)))]


def _queued(gallery, sighting_ids: Sequence[int]) -> dict[int, str | None]:
    """Sightings already in the sync outbox, with their chunk (``SENT``: the lab has acknowledged them)."""
    ids = sorted({int(s) for s in sighting_ids})
    if not ids or not gallery.read("SELECT count(*) FROM sqlite_master WHERE name = 'sync_outbox'").fetchone()[0]:
        return {}
    return dict(gallery.read(f"SELECT sighting_id, chunk FROM sync_outbox WHERE sighting_id IN ({_marks(len(ids))})",
                             ids).fetchall())


def _sent(gallery, sighting_ids: Sequence[int]) -> list[int]:
    from fieldreid.sync.queue import SENT

    return sorted(s for s, chunk in _queued(gallery, sighting_ids).items() if chunk == SENT)


def _sync_items(gallery, sighting_ids: Sequence[int], crop_fn: Callable | None) -> tuple[list, list[int]]:
    """(outbox items - sighting, vector, crop - for the sightings not queued yet, sightings the lab already has)."""
    from fieldreid.sync.queue import crop_from_file, image_path

    crop_fn = crop_fn or crop_from_file
    ids = sorted({int(s) for s in sighting_ids})
    queued = _queued(gallery, ids)
    sent = _sent(gallery, ids)
    items = []
    for sid, image, box, root, sha in gallery.read(
            f"SELECT id, image, box, source_root, source_sha256 FROM sightings WHERE id IN ({_marks(len(ids))})", ids):
        if sid in queued:
            continue
        items.append((sid, gallery.sighting_vector(sid), crop_fn(image_path(image, root), box, sha)))
    return items, sorted(sent)


def decide(gallery, track: Track, verdict: str, *, identity: str | None = None, name: str | None = None,
           new_id: str | None = None, note: str | None = None, whole_identity: bool = False, out: str = "",
           crop_fn: Callable | None = None) -> Review:
    """Write a person's verdict about ``track`` to ``gallery`` (module docstring); returns the logged decision.

    ``gallery.who`` is recorded as the reviewer. A track that already has a standing verdict is refused
    (:class:`AlreadyReviewed`): undo that decision first, so every change has exactly one way back.
    """
    if verdict not in VERDICTS:
        raise InputError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    identity = clean_text(identity, "identity")
    name = clean_text(name, "name", limit=64)
    new_id = clean_text(new_id, "new id", _ID_RE)
    note = clean_text(note, "note")
    if verdict == "same" and identity is None:
        raise InputError("'same' needs the identity the animal is.")
    if verdict == "new" and name is None and new_id is None:
        raise InputError("A new individual needs a name (or an id).")
    sids = [int(s) for s in track.sighting_ids]
    if not sids:
        raise ReviewError(f"Track {track.key} has no sightings in {gallery.path}; it cannot be decided there.")

    def refuse_if_reviewed() -> None:
        done = standing(gallery, sids)
        if done:
            first = next(iter(done.values()))
            raise AlreadyReviewed(f"Track {track.key} was already decided ({first['verdict']}) by {first['who']} at "
                                  f"{first['at']} (decision #{first['review']}); undo that decision first.")

    refuse_if_reviewed()
    items, sent = _sync_items(gallery, sids, crop_fn)  # file reads happen before the write lock is taken
    details: dict = {"track": track.key, "out": out, "verdict": verdict, "sightings": sids}
    with gallery.transaction("review", details) as con:
        refuse_if_reviewed()  # again, under the lock: another reviewer may have been quicker
        current = _current_identity(gallery, track.representative)
        own = current if own_identity(gallery, current, sids) else None
        if identity is not None and not gallery.has_identity(identity):
            raise ReviewError(f"Identity '{identity}' is no longer in {gallery.path} (merged or deleted meanwhile); "
                              "reload the page.")
        touched = {i for i in (current, identity, own) if i}
        before = _snapshot(con, touched, sids, {own} if own else set())
        target: str | None = None
        if verdict == "same":
            target = identity
            if whole_identity:
                if current is None or current == identity:
                    raise InputError("Merging needs the track's identity and another one to merge it into.")
                gallery.merge([current], identity)
            elif own is not None:
                if own == identity:
                    raise InputError(f"{own} is the identity made for this animal itself: name it as a new "
                                     "individual instead.")
                gallery.merge([own], identity)
            else:
                gallery.assign_sightings(sids, identity)
                if track.vector is not None:
                    gallery.add_embeddings([identity], np.asarray(track.vector, np.float32)[None], track.model_id,
                                           [track.source], [track.box])
        elif verdict == "new":
            if new_id is not None and new_id != own and gallery.has_identity(new_id):
                raise ReviewError(f"Identity '{new_id}' already exists; choose another id, or say the animal is "
                                  f"the same as {new_id}.")
            if own is not None:
                target = gallery.confirm(own, new_id, name)
            else:
                if track.vector is None:
                    raise ReviewError(f"Track {track.key} has no embedding to start a new identity from.")
                holder = gallery.read("SELECT identity_id FROM embeddings WHERE model_id = ? AND source = ? AND "
                                      "box = ?", (track.model_id, track.source, track.box)).fetchone()
                if holder is not None:
                    raise ReviewError(f"This crop is already an embedding of '{holder[0]}'; say it is the same "
                                      f"as {holder[0]}, or split it off with `fieldreid gallery split`.")
                provisional = gallery.add_provisional(track.species, np.asarray(track.vector, np.float32),
                                                      track.model_id, track.source, track.box)
                target = gallery.confirm(provisional, new_id, name)
                gallery.assign_sightings(sids, target)
        else:
            if own is not None:
                gallery.delete(own)
            gallery.assign_sightings(sids, None)
        who, at = gallery.who, _now()
        rid = int(con.execute("SELECT coalesce(max(id), 0) + 1 FROM review_log").fetchone()[0])
        con.executemany("INSERT OR REPLACE INTO review_sightings (sighting_id, review_id, verdict, who, at, note) "
                        "VALUES (?, ?, ?, ?, ?, ?)", [(s, rid, verdict, who, at, note) for s in sids])
        created = {target} if target else set()
        after = _snapshot(con, touched | created, sids, set(),
                          {"embeddings": before["embeddings"], "sightings": before["sightings"]})
        changes = _diff(before, after)
        replaced = {"identity": current, "machine_decision": track.decision, "machine_score": track.score,
                    "own_provisional": own}
        version = gallery.version + 1  # the 'review' change logged when this block ends takes this version
        con.execute(f"INSERT INTO review_log ({_COLS}, changes) VALUES ({_marks(14)})",
                    (rid, at, who, out, track.key, verdict, target, note, json.dumps(replaced), json.dumps(sids),
                     version, None, None, json.dumps(changes)))
        if items:
            from fieldreid.sync.queue import Outbox

            Outbox(gallery).add_many(items)
        details.update(review=rid, identity=target, name=name, note=note, replaced=replaced,
                       already_sent_to_lab=sent)
    return replace(get_review(gallery, rid), already_sent=sent)


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------- undo
def _current(con, table: str, key: str):
    if table == "identities":
        row = con.execute("SELECT name, species, status, origin, created, updated FROM identities WHERE id = ?",
                          (key,)).fetchone()
        return None if row is None else list(row)
    if table == "embeddings":
        row = con.execute("SELECT identity_id FROM embeddings WHERE id = ?", (int(key),)).fetchone()
        return None if row is None else {"identity_id": row[0]}
    if table == "sightings":
        row = con.execute("SELECT identity_id, runner_up_id FROM sightings WHERE id = ?", (int(key),)).fetchone()
        return None if row is None else list(row)
    row = con.execute("SELECT review_id, verdict, who, at, note FROM review_sightings WHERE sighting_id = ?",
                      (int(key),)).fetchone()
    return None if row is None else list(row)


def undo(gallery, review_id: int | None = None, who: str | None = None) -> Review:
    """Put back what decision ``review_id`` changed (default: the latest one standing, of ``who`` if given).

    Refused with :class:`UndoConflict` when any row it changed has changed again since (a later decision,
    a merge on the command line, a sync pull): undo those first. Sightings the lab already received keep
    the decision there; the result's ``already_sent`` lists them.
    """
    details: dict = {}
    with gallery.transaction("review-undo", details, structural=True) as con:
        if review_id is None:
            sql, args = "SELECT id FROM review_log WHERE undone_at IS NULL", []
            if who is not None:
                sql += " AND who = ?"
                args.append(who)
            row = con.execute(sql + " ORDER BY id DESC LIMIT 1", args).fetchone()
            if row is None:
                raise ReviewError("Nothing to undo" + (f" by {who}." if who else "."))
            review_id = row[0]
        row = con.execute(f"SELECT {_COLS}, changes FROM review_log WHERE id = ?", (int(review_id),)).fetchone()
        if row is None:
            raise ReviewError(f"No review decision #{review_id} in {gallery.path}.")
        review = _record(row[:13])
        if review.undone_at:
            raise ReviewError(f"Decision #{review_id} was already undone by {review.undone_by} at {review.undone_at}.")
        changes = json.loads(row[13])
        for table, rows in changes.items():
            for key, (_before, after) in rows.items():
                if not _same(table, _current(con, table, key), after):
                    raise UndoConflict(
                        f"Decision #{review_id} ({review.verdict} for track {review.track}) cannot be undone: "
                        f"{table[:-1].replace('_', ' ')} {key} has changed since. Undo the later decisions first "
                        "(see the review log).")
        ident, emb = changes.get("identities", {}), changes.get("embeddings", {})
        gone = [k for k, (b, _a) in ident.items() if b is None]  # identities the decision created
        for key in gone:
            extra_emb = con.execute(f"SELECT count(*) FROM embeddings WHERE identity_id = ? AND id NOT IN "
                                    f"({_marks(len(emb)) or 'NULL'})", (key, *[int(k) for k in emb])).fetchone()[0]
            sig = changes.get("sightings", {})
            extra_sig = con.execute(f"SELECT count(*) FROM sightings WHERE (identity_id = ? OR runner_up_id = ?) AND "
                                    f"id NOT IN ({_marks(len(sig)) or 'NULL'})",
                                    (key, key, *[int(k) for k in sig])).fetchone()[0]
            if extra_emb or extra_sig:
                raise UndoConflict(f"Decision #{review_id} cannot be undone: identity '{key}' it created has been "
                                   "used since (more photos or sightings). Undo those decisions first.")
        model = gallery.model_id
        for key, (before, _after) in ident.items():  # identities back first: embeddings point at them
            if before is None:
                continue
            if con.execute("SELECT 1 FROM identities WHERE id = ?", (key,)).fetchone():
                con.execute("UPDATE identities SET name = ?, species = ?, status = ?, origin = ?, created = ?, "
                            "updated = ? WHERE id = ?", (*before, key))
            else:
                con.execute("INSERT INTO identities (id, name, species, status, origin, created, updated) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?)", (key, *before))
        for key, (before, _after) in emb.items():
            if before is None:
                con.execute("DELETE FROM embeddings WHERE id = ?", (int(key),))
            elif _after is None:
                m, dim, dtype, vec, source, box, created = before["row"]
                if m != model:
                    raise UndoConflict(f"Decision #{review_id} cannot be undone: the gallery was re-embedded with "
                                       f"another model since.")
                con.execute("INSERT INTO embeddings (id, identity_id, model_id, dim, dtype, vector, source, box, "
                            "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (int(key), before["identity_id"], m, dim, dtype, base64.b64decode(vec), source, box,
                             created))
            else:
                con.execute("UPDATE embeddings SET identity_id = ? WHERE id = ?", (before["identity_id"], int(key)))
        for key, (before, _after) in changes.get("sightings", {}).items():
            if before is not None:
                con.execute("UPDATE sightings SET identity_id = ?, runner_up_id = ? WHERE id = ?", (*before, int(key)))
        for key, (before, _after) in changes.get("review_sightings", {}).items():
            con.execute("DELETE FROM review_sightings WHERE sighting_id = ?", (int(key),))
            if before is not None:
                con.execute("INSERT INTO review_sightings (sighting_id, review_id, verdict, who, at, note) VALUES "
                            "(?, ?, ?, ?, ?, ?)", (int(key), *before))
        for key in gone:
            con.execute("DELETE FROM identities WHERE id = ?", (key,))
        at = _now()
        con.execute("UPDATE review_log SET undone_at = ?, undone_by = ? WHERE id = ?", (at, gallery.who, review_id))
        details.update(review=review_id, track=review.track, verdict=review.verdict, identity=review.identity)
    return replace(get_review(gallery, review_id), already_sent=_sent(gallery, review.sightings))
