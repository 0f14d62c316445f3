"""Identities as the gallery holds them *now*, for reports written after people edited the gallery.

``watch`` records each decision's identity in ``results.db`` when the event closes; later, in the lab, people
merge, rename, split, confirm or delete identities (``fieldreid gallery …``). A report must show the current
state, so :class:`IdentityResolver` reads the gallery (public :class:`~fieldreid.gallery.Gallery` methods only):

* the gallery's **sighting** of a detection (keyed by the photo's sha256 and the box) carries the identity it
  belongs to today: merges, renames and splits move sightings with their identity;
* a decision without a gallery sighting follows the **change log** (renames and merges, oldest first);
* an identity is **human-classified** when a person confirmed it (a ``confirm`` change) or moved the
  sighting to it (a ``merge`` or ``split``): ``classificationMethod = human``, ``classifiedBy`` = who did it,
  ``classificationTimestamp`` = when. A machine match to an identity the lab enrolled stays ``machine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fieldreid.errors import FieldreidError

UNKNOWN_SPECIES = "animal"  # the gallery's species of an animal a device could not tell (gallery.store)


@dataclass(frozen=True)
class Resolved:
    identity: str | None  # current id; None when the identity was deleted
    species: str | None  # the identity's species (None when unknown or "animal")
    name: str | None
    status: str | None  # confirmed / provisional / None (not in the gallery)
    human_by: str | None = None  # who confirmed or assigned it, when a person did
    human_at: str | None = None  # ISO time of that action (UTC, "Z")


def iso_time(at: str | None) -> str | None:
    """A gallery / review time as Camtrap DP wants it: ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); naive times are UTC."""
    if not at:
        return None
    try:
        t = datetime.fromisoformat(str(at).strip().replace(" ", "T"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def review_view(gallery: Path | str | None, frames: set[tuple[str, str]]) -> dict:
    """A person's review verdicts (``fieldreid review``) standing on these (sha256, gallery box) frames:
    :func:`fieldreid.review.verdicts.gallery_view`."""
    if not gallery:
        return {}
    try:
        from fieldreid.review.verdicts import gallery_view
    except ImportError:  # a build without the review app: no verdicts to read
        return {}
    return gallery_view(gallery, frames)


class IdentityResolver:
    """Maps a decision's recorded identity (and its photo + box) to the gallery's current identity."""

    def __init__(self, gallery_path: Path | str | None) -> None:
        self.available = False
        self.error: str | None = None
        self.path = Path(gallery_path) if gallery_path else None
        self._by_sighting: dict[tuple[str, str], str | None] = {}
        self._forward: dict[str, str] = {}
        self._deleted: set[str] = set()
        self._identities: dict[str, tuple] = {}
        self._human: dict[str, tuple[str, str]] = {}  # identity at the time -> (who, at) of a person's confirm
        self._moved_by: dict[str, tuple[str, str]] = {}  # source id of a merge -> (who, at)
        if self.path is None or not self.path.is_file():
            return
        from fieldreid.gallery import Gallery

        try:
            with Gallery(self.path, create=False) as g:
                for s in g.sightings():
                    self._by_sighting[(s.get("source_sha256") or "", s.get("box") or "")] = s.get("identity_id")
                for i in g.identities():
                    self._identities[i.id] = (i.species, i.name, i.status)
                changes = list(reversed(g.log()))  # oldest first
        except FieldreidError as exc:  # unreadable, locked, newer schema: the report still comes out, warned
            self.error = str(exc)
            return
        self.available = True
        for c in changes:
            d = c.details
            if c.action == "rename" and d.get("new_id") and d.get("new_id") != d.get("identity"):
                self._forward[d["identity"]] = d["new_id"]
            elif c.action == "merge":
                for s in d.get("sources", []):
                    self._forward[s] = d.get("target")
                    self._moved_by[s] = (c.who, c.at)
            elif c.action == "confirm" and d.get("identity"):
                self._human[d["identity"]] = (c.who, c.at)
            elif c.action == "delete" and d.get("identity"):
                self._deleted.add(d["identity"])

    def _follow(self, identity: str) -> str:
        seen = {identity}
        while identity in self._forward and identity not in self._identities:
            identity = self._forward[identity]
            if identity in seen:
                break
            seen.add(identity)
        return identity

    def _human_of(self, current: str, recorded: str | None) -> tuple[str, str] | None:
        """The latest person's action that put this observation on ``current``."""
        found: list[tuple[str, str]] = []
        for old, (who, at) in self._human.items():
            if self._follow(old) == current:
                found.append((who, at))
        if recorded and recorded != current and recorded in self._moved_by:
            found.append(self._moved_by[recorded])
        return max(found, key=lambda x: x[1]) if found else None

    def species(self, identity: str | None) -> str | None:
        """The gallery's species of a current identity (None when unknown, ``animal`` or not in the gallery)."""
        row = self._identities.get(identity or "")
        return row[0] if row and row[0] != UNKNOWN_SPECIES else None

    def resolve(self, identity: str | None, sha256: str | None = None, box: str | None = None) -> Resolved:
        """The current identity of a decision that recorded ``identity`` for the detection ``box`` (the gallery's
        box text) of the photo ``sha256``."""
        if not self.available:
            return Resolved(identity, None, None, None)
        current = identity
        key = (sha256 or "", box or "")
        if key in self._by_sighting and self._by_sighting[key]:
            current = self._by_sighting[key]
        elif identity:
            current = self._follow(identity)
        if current is None:
            return Resolved(None, None, None, None)
        if current not in self._identities:
            if current in self._deleted:
                return Resolved(None, None, None, None)
            return Resolved(current, None, None, None)
        species, name, status = self._identities[current]
        human = self._human_of(current, identity) if status == "confirmed" else None
        if human is None and identity and current != identity and identity in self._moved_by:
            human = self._moved_by[identity]
        return Resolved(current, None if species == UNKNOWN_SPECIES else species, name, status,
                        human[0] if human else None, iso_time(human[1]) if human else None)
