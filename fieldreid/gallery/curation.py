"""Curating a gallery: rename, merge, split, confirm and delete identities, and read the change log.

Every method here is one logged change (:meth:`Gallery.transaction` with an action): it bumps the
gallery's version, and ``structure`` when embeddings move, so searches and caches see it. Mixed into
:class:`fieldreid.gallery.store.Gallery`; ``from fieldreid.gallery.store import Gallery`` is the way in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from fieldreid.errors import GalleryError, InputError
from fieldreid.gallery.schema import UNKNOWN_SPECIES, utc_now


@dataclass(frozen=True)
class Change:
    id: int
    action: str
    who: str
    at: str
    details: dict
    gallery_version: int


def _strings(obj) -> set[str]:
    """Every string in a change's details (values, list items, dict keys): the ids a change names."""
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        return set().union(*(_strings(k) | _strings(v) for k, v in obj.items()))
    if isinstance(obj, list | tuple):
        return set().union(*(_strings(v) for v in obj))
    return set()


class Curation:
    """The curator's operations on a :class:`~fieldreid.gallery.store.Gallery` (which provides the
    connection, :meth:`transaction`, identity lookups and embeddings)."""

    # ------------------------------------------------------------------ management (each logged)
    def rename(self, identity_id: str, new_id: str | None = None, name: str | None = None) -> str:
        """Change an identity's id (embeddings and sightings follow) and/or its display name."""
        old = self._identity_row(identity_id)
        target = new_id or identity_id
        if new_id and new_id != identity_id and self.has_identity(new_id):
            raise GalleryError(f"Identity '{new_id}' already exists; use `fieldreid gallery merge` to combine them.")
        with self.transaction("rename", {"identity": identity_id, "new_id": target, "old_name": old[1], "name": name},
                         structural=target != identity_id) as con:
            if target != identity_id:
                # ON UPDATE CASCADE moves the embeddings; sightings are provenance, updated explicitly
                con.execute("UPDATE identities SET id = ?, updated = ? WHERE id = ?", (target, utc_now(), identity_id))
                con.execute("UPDATE sightings SET identity_id = ? WHERE identity_id = ?", (target, identity_id))
                con.execute("UPDATE sightings SET runner_up_id = ? WHERE runner_up_id = ?", (target, identity_id))
            if name is not None:
                con.execute("UPDATE identities SET name = ?, updated = ? WHERE id = ?", (name, utc_now(), target))
        return target

    def merge(self, sources: Sequence[str], target: str) -> int:
        """Move every embedding and sighting of ``sources`` to ``target`` and delete the sources.

        Returns the number of embeddings moved. Species must agree, except that an animal filed under
        ``animal`` (a device that could not tell the species) may join an identity of any species.
        """
        tgt = self._identity_row(target)
        srcs = [s for s in dict.fromkeys(sources) if s != target]
        if not srcs:
            raise InputError("merge needs at least one source identity other than the target.")
        for s in srcs:
            row = self._identity_row(s)
            if row[2] != tgt[2] and row[2] != UNKNOWN_SPECIES:
                raise GalleryError(f"Cannot merge '{s}' ({row[2]}) into '{target}' ({tgt[2]}): different species.")
        details: dict = {"sources": srcs, "target": target}
        with self.transaction("merge", details, structural=True) as con:
            moved = 0
            for s in srcs:
                moved += con.execute("UPDATE embeddings SET identity_id = ? WHERE identity_id = ?",
                                     (target, s)).rowcount
                con.execute("UPDATE sightings SET identity_id = ? WHERE identity_id = ?", (target, s))
                con.execute("UPDATE sightings SET runner_up_id = ? WHERE runner_up_id = ?", (target, s))
                con.execute("DELETE FROM identities WHERE id = ?", (s,))
            con.execute("UPDATE identities SET updated = ? WHERE id = ?", (utc_now(), target))
            details["embeddings_moved"] = moved
        return moved

    def split(self, identity_id: str, embedding_ids: Sequence[int], new_id: str | None = None,
              name: str | None = None) -> str:
        """Move the given embeddings (and the sightings of the same image+box) to a new identity.

        Without ``new_id`` the new identity is provisional (``<species>-P0001``); with one it is confirmed.
        """
        row = self._identity_row(identity_id)
        species = row[2]
        emb = {e.id: e for e in self.embeddings(identity_id)}
        ids = [int(i) for i in dict.fromkeys(embedding_ids)]
        missing = [i for i in ids if i not in emb]
        if not ids or missing:
            raise InputError(f"split needs embedding ids of '{identity_id}'; not its embeddings: {missing or 'none given'}. "
                             f"See them with `fieldreid gallery show {identity_id}`.")
        if new_id and self.has_identity(new_id):
            raise GalleryError(f"Identity '{new_id}' already exists; choose another id or use merge.")
        details: dict = {"identity": identity_id, "embeddings": ids}
        with self.transaction("split", details, structural=True) as con:
            if new_id:
                target = new_id
                self._insert_identity(target, species, name or new_id, "confirmed", row[4])
            else:
                target = self.next_provisional(species)
                self._insert_identity(target, species, name, "provisional", row[4])
            for i in ids:
                con.execute("UPDATE embeddings SET identity_id = ? WHERE id = ?", (target, i))
                con.execute("UPDATE sightings SET identity_id = ? WHERE identity_id = ? AND image = ? AND box = ?",
                            (target, identity_id, emb[i].source, emb[i].box))
            details["new_identity"] = target
        return target

    def confirm(self, identity_id: str, new_id: str | None = None, name: str | None = None) -> str:
        """Provisional → confirmed, optionally giving it a permanent id (e.g. ``nyala-0042``) and a name."""
        row = self._identity_row(identity_id)
        target = identity_id
        if new_id and new_id != identity_id:
            target = self.rename(identity_id, new_id, name)
            name = None
        with self.transaction("confirm", {"identity": target, "previous_id": identity_id, "was": row[3]}) as con:
            con.execute("UPDATE identities SET status = 'confirmed', updated = ? WHERE id = ?", (utc_now(), target))
            if name is not None:
                con.execute("UPDATE identities SET name = ? WHERE id = ?", (name, target))
        return target

    def delete(self, identity_id: str) -> int:
        """Delete an identity and its embeddings. Sightings stay (they are history) and still name it."""
        row = self._identity_row(identity_id)
        details: dict = {"identity": identity_id, "species": row[2], "status": row[3]}
        with self.transaction("delete", details, structural=True) as con:
            n = con.execute("DELETE FROM embeddings WHERE identity_id = ?", (identity_id,)).rowcount
            con.execute("DELETE FROM identities WHERE id = ?", (identity_id,))
            details["embeddings_deleted"] = n
        return n

    def assign_sightings(self, sighting_ids: Sequence[int], identity_id: str | None) -> int:
        """Say which identity these sightings are (None: no identity of this gallery), e.g. after a person
        reviewed them. Returns how many changed; the log keeps what each one was before."""
        ids = sorted({int(i) for i in sighting_ids})
        if not ids:
            return 0
        if identity_id is not None:
            self._identity_row(identity_id)
        marks = ", ".join("?" * len(ids))
        rows = self._con.execute(f"SELECT id, identity_id FROM sightings WHERE id IN ({marks})", ids).fetchall()
        missing = sorted(set(ids) - {r[0] for r in rows})
        if missing:
            raise InputError(f"No sighting(s) {missing} in {self.path}.")
        replaced = {str(i): prev for i, prev in rows if prev != identity_id}
        details: dict = {"sightings": ids, "identity": identity_id, "replaced": replaced}
        if not replaced:
            details["_unchanged"] = True
        with self.transaction("assign", details) as con:
            con.execute(f"UPDATE sightings SET identity_id = ? WHERE id IN ({marks})", (identity_id, *ids))
        return len(replaced)

    def log(self, limit: int | None = None, identity_id: str | None = None) -> list[Change]:
        """The change log, newest first."""
        rows = self._con.execute("SELECT id, action, who, at, details, gallery_version FROM changes ORDER BY id DESC"
                                 ).fetchall()
        out = []
        for r in rows:
            details = json.loads(r[4])
            if identity_id is not None and identity_id not in _strings(details):
                continue  # whole ids only: nyala-1's log must not show nyala-10
            out.append(Change(r[0], r[1], r[2], r[3], details, r[5]))
            if limit and len(out) >= limit:
                break
        return out
