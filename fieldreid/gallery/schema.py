"""The gallery file's schema: its ``application_id`` and its migrations, in order.

Entry ``i`` of :data:`MIGRATIONS` takes ``PRAGMA user_version`` from ``i`` to ``i + 1``: SQL statements or
callables taking the connection, applied in one transaction by :func:`fieldreid.storage.sqlite.open_db`.
Append, never edit. Every table in a gallery file is created here - the sync queue's included (v3) - so
the gallery is the only owner of its tables.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime

from fieldreid.errors import InputError
from fieldreid.types import DecisionKind

#: "FRID" - marks a SQLite file as a fieldreid gallery (PRAGMA application_id).
APPLICATION_ID = 0x46524944

# ---- the values stored: statuses, decisions, timestamps, box text
STATUSES = ("confirmed", "provisional")
ORIGINS = ("lab", "field")
DECISIONS = tuple(DecisionKind)
#: the species of an animal whose species nobody could tell (what a generic detector says)
UNKNOWN_SPECIES = "animal"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_who() -> str:
    """Who is making a change: ``$FIELDREID_USER``, else the login name, else ``unknown``."""
    who = os.environ.get("FIELDREID_USER")
    if who:
        return who
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def box_key(box: Sequence[float] | None) -> str:
    """Canonical text of a box (full-resolution pixels, x1,y1,x2,y2 rounded to 0.1 px); '' = whole image."""
    if box is None or len(box) == 0:
        return ""
    if len(box) != 4:
        raise InputError(f"A box needs 4 numbers (x1, y1, x2, y2), got {len(box)}")
    return ",".join(f"{float(v):.1f}" for v in box)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    x1, y1, x2, y2 = (float(v) for v in text.split(","))
    return x1, y1, x2, y2


# ---- the tables

_V1 = [
    """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE identities (
        id TEXT PRIMARY KEY,
        name TEXT,
        species TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('confirmed', 'provisional')),
        origin TEXT NOT NULL CHECK (origin IN ('lab', 'field')),
        created TEXT NOT NULL,
        updated TEXT NOT NULL)""",
    """CREATE TABLE embeddings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        identity_id TEXT NOT NULL REFERENCES identities(id) ON UPDATE CASCADE ON DELETE CASCADE,
        model_id TEXT NOT NULL,
        dim INTEGER NOT NULL,
        dtype TEXT NOT NULL CHECK (dtype IN ('float32', 'float16')),
        vector BLOB NOT NULL,
        source TEXT NOT NULL,
        box TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL,
        UNIQUE (model_id, source, box))""",
    "CREATE INDEX embeddings_identity ON embeddings(identity_id)",
    """CREATE TABLE sightings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image TEXT NOT NULL,
        box TEXT NOT NULL DEFAULT '',
        captured TEXT,
        camera TEXT,
        decision TEXT NOT NULL CHECK (decision IN ('known', 'new', 'uncertain')),
        identity_id TEXT,
        score REAL,
        runner_up_id TEXT,
        runner_up_score REAL,
        upper REAL NOT NULL,
        lower REAL NOT NULL,
        threshold_method TEXT NOT NULL,
        model_id TEXT NOT NULL,
        gallery_version INTEGER NOT NULL,
        created TEXT NOT NULL)""",
    "CREATE INDEX sightings_identity ON sightings(identity_id)",
    """CREATE TABLE thresholds (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        species TEXT NOT NULL,
        model_id TEXT NOT NULL,
        upper REAL NOT NULL,
        lower REAL NOT NULL,
        method TEXT NOT NULL,
        created TEXT NOT NULL)""",
    """CREATE TABLE changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        action TEXT NOT NULL,
        who TEXT NOT NULL,
        at TEXT NOT NULL,
        details TEXT NOT NULL,
        gallery_version INTEGER NOT NULL)""",
    """CREATE TABLE provisional_counters (species TEXT PRIMARY KEY, next INTEGER NOT NULL)""",
    f"PRAGMA application_id = {APPLICATION_ID}",
]



def _dedupe_sightings(con: sqlite3.Connection) -> None:
    """v2: sightings recorded twice before they had a unique key (one folder processed into two output
    folders, an ``identify`` run repeated) - same image, box, capture time, camera and model - keep the
    first. A copy already handed to a push chunk stays (the lab may hold it); unsent queue rows go with
    their sighting."""
    queue = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sync_outbox'").fetchone()
    keep_sent = " AND id NOT IN (SELECT sighting_id FROM sync_outbox WHERE chunk IS NOT NULL)" if queue else ""
    con.execute("DELETE FROM sightings WHERE id NOT IN (SELECT min(id) FROM sightings GROUP BY image, box, "
                f"coalesce(captured, ''), coalesce(camera, ''), model_id){keep_sent}")
    if queue:
        con.execute("DELETE FROM sync_outbox WHERE sighting_id NOT IN (SELECT id FROM sightings)")


_V2: list = [
    # the source image's content hash: a sighting is unique by (source content, box) from now on
    "ALTER TABLE sightings ADD COLUMN source_sha256 TEXT",
    # the folder a relative ``image`` path is relative to (a watch camera root), so the crop can be read back
    "ALTER TABLE sightings ADD COLUMN source_root TEXT",
    # the query embedding (float32) the decision was made from; sync pushes it with the sighting
    "ALTER TABLE sightings ADD COLUMN vector BLOB",
    _dedupe_sightings,
    "CREATE UNIQUE INDEX sightings_source_box ON sightings(source_sha256, box)",
]


def _sync_tables(con: sqlite3.Connection) -> None:
    """v3: the sync queue's tables (:mod:`fieldreid.sync.queue`), created with the gallery. A gallery that
    synced before v3 has them already (sync made them itself), perhaps without ``sync_chunks.rejected``."""
    for stmt in SYNC_TABLES:
        con.execute(stmt)
    if "rejected" not in {r[1] for r in con.execute("PRAGMA table_info(sync_chunks)")}:
        con.execute("ALTER TABLE sync_chunks ADD COLUMN rejected TEXT")


#: the device side of sync: ``sync_state`` (key/value: gallery uid, pull cursor, queue mark),
#: ``sync_outbox`` (sightings queued for the lab with their vector and crop; ``chunk`` = the push chunk,
#: ``-`` once acknowledged), ``sync_chunks`` (formed chunks, ``rejected`` = the lab's reason),
#: ``sync_field_ids`` (this device's provisional identities already sent)
SYNC_TABLES = [
    "CREATE TABLE IF NOT EXISTS sync_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS sync_outbox (
        sighting_id INTEGER PRIMARY KEY,
        vector BLOB,
        crop BLOB,
        chunk TEXT,
        created TEXT NOT NULL DEFAULT (datetime('now')))""",
    "CREATE INDEX IF NOT EXISTS sync_outbox_chunk ON sync_outbox(chunk)",
    """CREATE TABLE IF NOT EXISTS sync_chunks (
        key TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        n INTEGER NOT NULL,
        created TEXT NOT NULL DEFAULT (datetime('now')),
        rejected TEXT)""",
    """CREATE TABLE IF NOT EXISTS sync_field_ids (
        local_id TEXT PRIMARY KEY,
        embedding_ids TEXT NOT NULL)""",
]

_V3: list = [_sync_tables]

#: v4: local features of each embedding's crop (:mod:`fieldreid.verify.features` bytes; ``kind`` names the
#: recipe) and, per species and model, the fitted fusion of cosine and inliers (:class:`fieldreid.verify.fuse.Fusion`
#: as JSON, with whether verification pays). Galleries from before v4 get features on ``gallery reindex``.
_V4: list = [
    """CREATE TABLE local_features (
        embedding_id INTEGER PRIMARY KEY REFERENCES embeddings(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        data BLOB NOT NULL)""",
    """CREATE TABLE fusion (
        species TEXT NOT NULL,
        model_id TEXT NOT NULL,
        data TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (species, model_id))""",
]

#: v5: the tables other stages keep in a gallery, created here so that only the gallery makes its tables:
#: ``suggestions`` (:mod:`fieldreid.gallery.suggest`: which lab identity a device's provisional animal probably
#: is) and the review app's decision log (:mod:`fieldreid.review.actions`: ``review_log``, one row per decision
#: with what it replaced; ``review_sightings``, the verdict standing per sighting). ``IF NOT EXISTS``: galleries
#: written by the versions that created these tables themselves already have them.
_V5: list = [
    """CREATE TABLE IF NOT EXISTS suggestions (
        identity_id TEXT PRIMARY KEY,
        candidate_id TEXT NOT NULL,
        candidate_species TEXT NOT NULL,
        score REAL NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('known', 'uncertain')),
        runner_up_id TEXT,
        runner_up_score REAL,
        upper REAL NOT NULL,
        lower REAL NOT NULL,
        threshold_method TEXT NOT NULL,
        gallery_version INTEGER NOT NULL,
        created TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS review_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        who TEXT NOT NULL,
        out TEXT NOT NULL,
        track TEXT NOT NULL,
        verdict TEXT NOT NULL,
        identity TEXT,
        note TEXT,
        replaced TEXT NOT NULL,
        sightings TEXT NOT NULL,
        changes TEXT NOT NULL,
        gallery_version INTEGER NOT NULL,
        undone_at TEXT,
        undone_by TEXT)""",
    """CREATE TABLE IF NOT EXISTS review_sightings (
        sighting_id INTEGER PRIMARY KEY,
        review_id INTEGER NOT NULL,
        verdict TEXT NOT NULL,
        who TEXT NOT NULL,
        at TEXT NOT NULL,
        note TEXT)""",
]

#: v6: each sighting's calibrated probability that its decision is right (:attr:`fieldreid.gallery.openset.
#: Decision.probability`: P(that identity) for known / uncertain, P(a new animal) for new) and which stored fit
#: gave it (``fused`` / ``cosine``). Sightings recorded before v6, or without a calibration, have NULL: their
#: probability was never computed, and a cosine is not one.
_V6: list = [
    "ALTER TABLE sightings ADD COLUMN probability REAL",
    "ALTER TABLE sightings ADD COLUMN probability_source TEXT",
]

#: Schema migrations: entry ``i`` takes ``user_version`` from ``i`` to ``i + 1``. Append, never edit.
MIGRATIONS: list[list] = [_V1, _V2, _V3, _V4, _V5, _V6]
SCHEMA_VERSION = len(MIGRATIONS)
