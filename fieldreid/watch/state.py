"""The results database (``OUT/results.db``): what was seen, what was done, and everything it produced.

One SQLite file (WAL, ``synchronous=FULL``) holds both the *state* of the watch (which file is pending,
done, failed or a duplicate) and its *results* (images, detections, embeddings, events, decisions). That
is what makes the commit protocol simple: a batch's results and its files' ``done`` state go in **one
transaction**, so after a crash (``kill -9``, power cut, full disk) a file is either wholly done or not
started, never half; a restart re-does exactly the batches that were not committed.

File states (``files.status``)::

    (unseen) --scan--> candidate --read+hash+decode--> done        results stored with it
                                                 \\--> duplicate   same sha256 as a done image
                                                 \\--> failed      unreadable, with the reason
                                                 \\--> pending     still being written: retried

A done / failed / duplicate file is skipped while its (size, mtime) stay the same; ``pending`` ones are
tried again on every pass. Events: ``open`` → ``decided`` (decisions written here, gallery side effects
not yet applied) → ``closed`` (provisional identities and gallery sightings written). See
:mod:`fieldreid.watch.runner` for why the gallery step is replayable.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fieldreid.errors import FieldreidError
from fieldreid.storage.fsutil import FolderLock, OutputWriteError, folder_write_problem, path_text
from fieldreid.storage.sqlite import Schema, open_db, rollback
from fieldreid.types import DecisionKind, FileState

APPLICATION_ID = 0x46525752  # "FRWR": fieldreid watch results
STATUSES = tuple(FileState)

_V1 = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE files (
        path TEXT PRIMARY KEY,
        camera TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sha256 TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'duplicate')),
        reason TEXT,
        duplicate_of TEXT,
        attempts INTEGER NOT NULL DEFAULT 1,
        first_seen REAL NOT NULL,
        updated REAL NOT NULL)""",
    "CREATE INDEX files_status ON files(status)",
    "CREATE INDEX files_sha ON files(sha256)",
    """CREATE TABLE images (
        sha256 TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        camera TEXT NOT NULL,
        captured TEXT NOT NULL,
        captured_ts REAL NOT NULL,
        utc_offset TEXT,
        time_source TEXT NOT NULL,
        make TEXT,
        model TEXT,
        width INTEGER,
        height INTEGER,
        latitude REAL,
        longitude REAL,
        event_id INTEGER,
        processed REAL NOT NULL)""",
    "CREATE INDEX images_event ON images(event_id)",
    "CREATE INDEX images_path ON images(path)",
    """CREATE TABLE detections (
        sha256 TEXT NOT NULL REFERENCES images(sha256),
        idx INTEGER NOT NULL,
        category INTEGER NOT NULL,
        conf REAL NOT NULL,
        x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
        embedding BLOB,
        thumb BLOB,
        PRIMARY KEY (sha256, idx))""",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        camera TEXT NOT NULL,
        start_ts REAL NOT NULL,
        end_ts REAL NOT NULL,
        n_images INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('open', 'decided', 'closed')),
        last_added REAL NOT NULL)""",
    "CREATE INDEX events_open ON events(status, camera)",
    """CREATE TABLE decisions (
        sha256 TEXT NOT NULL,
        idx INTEGER NOT NULL,
        event_id INTEGER NOT NULL,
        track INTEGER NOT NULL,
        n_frames INTEGER NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('known', 'new', 'uncertain')),
        identity TEXT,
        score REAL,
        runner_up TEXT,
        runner_up_score REAL,
        upper REAL NOT NULL,
        lower REAL NOT NULL,
        calibrated INTEGER NOT NULL,
        threshold_method TEXT NOT NULL,
        model_id TEXT NOT NULL,
        gallery_version INTEGER NOT NULL,
        species TEXT NOT NULL,
        top TEXT NOT NULL,
        representative INTEGER NOT NULL,
        decided REAL NOT NULL,
        PRIMARY KEY (sha256, idx))""",
    "CREATE INDEX decisions_event ON decisions(event_id)",
    f"PRAGMA application_id = {APPLICATION_ID}",
]
#: v2: each track's calibrated probability that its decision is right and the fit that gave it
#: (:attr:`fieldreid.gallery.openset.Decision.probability`); NULL in results decided before v2
_V2 = [
    "ALTER TABLE decisions ADD COLUMN probability REAL",
    "ALTER TABLE decisions ADD COLUMN probability_source TEXT",
]
MIGRATIONS: list[list[str]] = [_V1, _V2]
SCHEMA_VERSION = len(MIGRATIONS)


class StateError(FieldreidError):
    """The results database is unusable (not ours, from a newer fieldreid, corrupt)."""


#: what a results database is, for :func:`fieldreid.storage.sqlite.open_db`
RESULTS_SCHEMA = Schema(
    kind="fieldreid results database", short="results database", application_id=APPLICATION_ID,
    migrations=MIGRATIONS, error=StateError, where="choose another --out folder",
    restore="move it aside and run again (the images will be processed afresh)")


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, sqlite3.Error) and ("disk is full" in str(exc) or "disk I/O" in str(exc))


def _is_read_only(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(exc, sqlite3.Error) and "readonly" in str(exc)


def write_error(path: Path, exc: BaseException) -> OutputWriteError:
    hint = " The disk is full: free space and run again." if _is_disk_full(exc) else ""
    if not hint and _is_read_only(exc):
        hint = (" The output folder or file is not writable (a card remounted read-only after errors, or a "
                "permission change): a permission problem, not damaged results.")
    return OutputWriteError(f"Cannot write the results database {path}: {exc}.{hint} The last committed batch "
                            "is intact; nothing of the failed batch was recorded, so a restart redoes it.")


class StateDB:
    """The results database. Writes go through :meth:`transaction` (one ``BEGIN IMMEDIATE`` each).

    ``readonly=True`` opens a second connection for the scanner thread or the report command. The writer
    holds ``OUT/.lock`` (:class:`~fieldreid.storage.fsutil.FolderLock`) from open to :meth:`close`: a second writer
    on the same folder is refused with a message naming the first (pid, host, start time), and a folder
    it cannot write into is reported as a permission problem, never as a damaged database.
    """

    def __init__(self, path: str | Path, readonly: bool = False, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._lock: FolderLock | None = None
        if readonly:
            if not self.path.exists():
                raise StateError(f"No results database at {self.path}; run `fieldreid watch` first.")
        else:
            self._lock = FolderLock(self.path.parent)  # one writer per output folder; permission errors say so
        schema = replace(RESULTS_SCHEMA, storage_failure=None if readonly else self._not_writable)
        try:
            self.con = open_db(self.path, schema, mode="ro" if readonly else "rwc", synchronous=synchronous,
                               check="none")
        except BaseException:
            self._release_lock()
            raise

    def _not_writable(self, path: Path, exc: BaseException, doing: str = "open") -> OutputWriteError | None:
        """A write that failed because the folder or the database files cannot be written: say so."""
        why = folder_write_problem(self.path.parent)
        if why is None:
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                try:
                    os.close(os.open(p, os.O_RDWR))
                except FileNotFoundError:
                    continue
                except OSError as err:
                    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                        why = f"{p.name}: {(err.strerror or str(err)).lower()}"
                        break
        if why is None:
            return None
        return OutputWriteError(f"Cannot write the results database {path_text(self.path)}: {why}. This is a "
                                "permission problem, not damaged results: make the output folder and its files "
                                "writable (a read-only mount, or files of another user?) or choose another --out.")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write. Disk-full and I/O errors become :class:`OutputWriteError`; nothing is kept."""
        con = self.con
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise write_error(self.path, exc) from exc
        try:
            yield con
            con.execute("COMMIT")
        except BaseException as exc:
            rollback(con)
            if isinstance(exc, sqlite3.OperationalError | OSError) and not isinstance(exc, OutputWriteError):
                raise write_error(self.path, exc) from exc
            raise

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            self._release_lock()

    # ---------------------------------------------------------------- named rows
    def rows(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        """A read whose rows are addressed by column name (``row["sha256"]``)."""
        cur = self.con.cursor()
        cur.row_factory = sqlite3.Row
        return cur.execute(sql, args).fetchall()

    @staticmethod
    def insert(con: sqlite3.Connection, table: str, rows: list[dict], or_replace: bool = False) -> None:
        """Inside a transaction: insert rows given as ``{column: value}`` (all with the same columns)."""
        if not rows:
            return
        cols = list(rows[0])
        verb = "INSERT OR REPLACE" if or_replace else "INSERT"
        con.executemany(f"{verb} INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", rows)

    # ---------------------------------------------------------------- meta
    def meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, con: sqlite3.Connection, key: str, value: str) -> None:
        con.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                    "excluded.value", (key, value))

    # ---------------------------------------------------------------- files
    def file_row(self, rel: str) -> tuple | None:
        """(status, size, mtime_ns, attempts) of a file, or None if never recorded."""
        return self.con.execute("SELECT status, size, mtime_ns, attempts FROM files WHERE path = ?",
                                (rel,)).fetchone()

    def done_path_for_hash(self, sha: str) -> str | None:
        row = self.con.execute("SELECT path FROM images WHERE sha256 = ?", (sha,)).fetchone()
        return row[0] if row else None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        out.update(dict(self.con.execute("SELECT status, count(*) FROM files GROUP BY status")))
        return out

    def decision_counts(self) -> dict[str, int]:
        """Animals (tracks) per decision: one per track, not per frame."""
        out = dict.fromkeys(DecisionKind, 0)
        out.update(dict(self.con.execute(
            "SELECT decision, count(*) FROM decisions WHERE representative = 1 GROUP BY decision")))
        return out

    def upsert_file(self, con: sqlite3.Connection, rel: str, camera: str, size: int, mtime_ns: int, status: str,
                    sha: str | None = None, reason: str | None = None, duplicate_of: str | None = None) -> None:
        now = time.time()
        con.execute(
            "INSERT INTO files (path, camera, size, mtime_ns, sha256, status, reason, duplicate_of, attempts, "
            "first_seen, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, status = excluded.status, "
            "reason = excluded.reason, duplicate_of = excluded.duplicate_of, attempts = files.attempts + 1, "
            "updated = excluded.updated",
            (rel, camera, size, mtime_ns, sha, status, reason, duplicate_of, now, now))

    # ---------------------------------------------------------------- events
    def assign_event(self, con: sqlite3.Connection, camera: str, ts: float, gap: float) -> int:
        """Inside a batch transaction: the open event of ``camera`` within ``gap`` seconds of ``ts`` (extended
        to include it), or a new open event. With several candidates the nearest one wins."""
        row = con.execute(
            "SELECT id, start_ts, end_ts FROM events WHERE status = 'open' AND camera = ? AND start_ts - ? <= ? "
            "AND end_ts + ? >= ? ORDER BY min(abs(start_ts - ?), abs(end_ts - ?)) LIMIT 1",
            (camera, gap, ts, gap, ts, ts, ts)).fetchone()
        now = time.time()
        if row is None:
            cur = con.execute("INSERT INTO events (camera, start_ts, end_ts, n_images, status, last_added) "
                              "VALUES (?, ?, ?, 1, 'open', ?)", (camera, ts, ts, now))
            return int(cur.lastrowid)
        eid, start, end = row
        con.execute("UPDATE events SET start_ts = ?, end_ts = ?, n_images = n_images + 1, last_added = ? WHERE id = ?",
                    (min(start, ts), max(end, ts), now, eid))
        return int(eid)

    def events_to_close(self, gap: float, idle_close: float, force: bool = False) -> list[int]:
        """Open events whose gap has passed: the camera's clock moved on by more than ``gap`` (a later image
        arrived), or nothing joined them for ``idle_close`` wall-clock seconds; every open event if ``force``."""
        if force:
            return [r[0] for r in self.con.execute("SELECT id FROM events WHERE status = 'open' ORDER BY id")]
        now = time.time()
        rows = self.con.execute(
            "SELECT e.id FROM events e WHERE e.status = 'open' AND (e.last_added + ? <= ? OR e.end_ts + ? < "
            "(SELECT max(f.end_ts) FROM events f WHERE f.camera = e.camera)) ORDER BY e.id",
            (idle_close, now, gap)).fetchall()
        return [r[0] for r in rows]

    def next_idle_deadline(self, idle_close: float) -> float | None:
        row = self.con.execute("SELECT min(last_added) FROM events WHERE status = 'open'").fetchone()
        return None if row[0] is None else float(row[0]) + idle_close

    def event_ids(self, status: str) -> list[int]:
        return [r[0] for r in self.con.execute("SELECT id FROM events WHERE status = ? ORDER BY id", (status,))]
