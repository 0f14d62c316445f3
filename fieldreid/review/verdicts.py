"""What a watch output folder's animals are *now*, as the gallery says: for the exports (``fieldreid report``).

``watch`` wrote its decisions into ``results.db`` once; the gallery moves on (a person reviews a track,
merges two identities on the command line, a sync pull renames a provisional animal). The exports read
each detection's sighting back from the gallery - by the gallery's unique key, the image's content SHA-256
and the box - and take its identity from there, with the person's verdict where one stands.

The gallery is opened read-only (never created, migrated or locked for writing); a missing or unreadable
gallery gives an empty view, and the exports fall back to what ``watch`` wrote.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Standing:
    """A detection's sighting in the gallery now."""

    identity: str | None          # the identity the gallery gives it now
    verdict: str | None = None    # a person's verdict (fieldreid.review.actions.VERDICTS), None if unreviewed
    who: str | None = None
    at: str | None = None
    note: str | None = None
    name: str | None = None       # the identity's display name


def gallery_view(gallery: str | Path | None, frames: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Standing]:
    """(content sha256, gallery box key) -> :class:`Standing`, for the frames the gallery has."""
    if not gallery or not Path(gallery).is_file():
        return {}
    try:
        con = sqlite3.connect(f"{Path(gallery).resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return {}
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "sightings" not in tables:
            return {}
        reviewed = "review_sightings" in tables
        names = dict(con.execute("SELECT id, name FROM identities"))
        wanted = set(frames)
        shas = sorted({sha for sha, _ in wanted})
        out: dict[tuple[str, str], Standing] = {}
        cols = ("s.source_sha256, s.box, s.identity_id" +
                (", r.verdict, r.who, r.at, r.note FROM sightings s LEFT JOIN review_sightings r ON r.sighting_id = s.id"
                 if reviewed else ", NULL, NULL, NULL, NULL FROM sightings s"))
        for a in range(0, len(shas), 500):
            part = shas[a:a + 500]
            for sha, box, ident, verdict, who, at, note in con.execute(
                    f"SELECT {cols} WHERE s.source_sha256 IN ({', '.join('?' * len(part))})", part):
                if (sha, box) in wanted:
                    out[(sha, box)] = Standing(ident, verdict, who, at, note, names.get(ident))
        return out
    except sqlite3.Error:
        return {}
    finally:
        con.close()

