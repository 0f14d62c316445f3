"""Opening a versioned SQLite file: the one opener behind the gallery and the watch results database.

A fieldreid SQLite file is described by a :class:`Schema`: the ``PRAGMA application_id`` that marks it as
ours, an ordered list of migrations (entry ``i`` takes ``PRAGMA user_version`` from ``i`` to ``i + 1``;
append, never edit) and the words its errors use. :func:`open_db` then

* **checks the file before SQLite touches it** (:func:`check_header`): the 100-byte header's magic, page
  size and page count against the file size. A main file shorter than its header says, next to a
  write-ahead log (a checkpoint cut short by a full disk), is judged by SQLite's own recovery on a
  read-only connection: its pages are in the log. A damaged file raises the schema's error with its bytes
  unchanged;
* refuses a SQLite file of another application and one written by a newer fieldreid (never "upgraded"
  downwards), optionally runs ``PRAGMA quick_check`` (``check="auto"``: files up to
  :data:`QUICK_CHECK_MAX_BYTES`);
* sets the **WAL journal** (readers never block the writer), ``synchronous`` (``FULL`` by default: in WAL
  mode ``NORMAL`` may lose the last commits on a power cut, the normal way a field device stops), a
  **busy timeout** (a second writer waits for the lock) and optionally ``foreign_keys``;
* applies the missing **migrations in one ``BEGIN IMMEDIATE`` transaction** (statements, or callables
  taking the connection), re-reading ``user_version`` under the write lock so two processes opening a new
  file migrate it once.

Connections are in autocommit mode (``isolation_level=None``): owners write through their own
``BEGIN IMMEDIATE`` transactions and undo with :func:`rollback`. Keep these files on a local disk: WAL
needs working file locks (not NFS/SMB).
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fieldreid.errors import FieldreidError

SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_MAGIC = (0x377F0682, 0x377F0683)
#: quick_check reads every page; above this size opening would take seconds, so only the header is checked.
QUICK_CHECK_MAX_BYTES = 256 * 1024 * 1024

#: one migration step: a SQL statement or a callable taking the connection (inside the migration transaction)
Step = str | Callable[[sqlite3.Connection], None]
#: (path, the sqlite3 error, what was being done: "open", "write") -> a clear error about the storage itself
#: (full disk, I/O error, read-only folder), or None when the failure is something else
StorageFailure = Callable[[Path, BaseException, str], FieldreidError | None]


@dataclass(frozen=True)
class Schema:
    """What a versioned fieldreid SQLite file is and how its errors read.

    ``kind`` names the file in messages ("fieldreid gallery"); ``short`` in the schema-version message
    ("gallery"); ``where`` says what to check when the path is wrong ("check the --gallery path");
    ``restore`` what to do with a damaged file.
    """

    kind: str
    short: str
    application_id: int
    migrations: Sequence[Sequence[Step]]
    error: type[FieldreidError]
    where: str
    restore: str
    storage_failure: StorageFailure | None = None

    @property
    def version(self) -> int:
        return len(self.migrations)

    def failure(self, path: Path, exc: BaseException, doing: str) -> FieldreidError | None:
        return self.storage_failure(path, exc, doing) if self.storage_failure is not None else None


def rollback(con: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already: after a failed COMMIT (full disk, I/O error)
    SQLite rolls back by itself, and a second ROLLBACK would raise and hide the cause."""
    if con.in_transaction:
        try:
            con.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the first error is the one to report; an uncommitted transaction never becomes visible


def wal_has_frames(path: Path, page_size: int) -> bool:
    """True if ``path``'s write-ahead log holds at least one frame for pages of this size: the main file's
    own header is then not the whole story (a checkpoint may not have finished)."""
    wal = path.with_name(path.name + "-wal")
    try:
        with wal.open("rb") as fh:
            head = fh.read(32)
        size = wal.stat().st_size
    except OSError:
        return False
    if len(head) < 32:
        return False
    magic, _version, wal_page = struct.unpack(">III", head[:12])
    return magic in WAL_MAGIC and wal_page == page_size and size >= 32 + 24 + page_size


def check_header(path: Path, schema: Schema) -> bool:
    """Refuse files that are not whole SQLite databases, without letting SQLite write anything.

    Returns True when the main file alone looks short but a write-ahead log sits next to it: its pages
    may live in the log (a checkpoint cut short by a full disk), so SQLite's own recovery must judge it
    (:func:`check_with_wal`). An empty file is, as SQLite has it, a new empty database.
    """
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as fh:
        head = fh.read(100)
    if not head.startswith(SQLITE_MAGIC):
        raise schema.error(f"{path} is not a {schema.kind} (not a SQLite database). Nothing was changed; "
                           f"{schema.where}.")
    if len(head) < 100:
        raise schema.error(f"{path} is truncated ({size} bytes, shorter than a SQLite header). Nothing was "
                           f"changed; {schema.restore}.")
    page_size = struct.unpack(">H", head[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise schema.error(f"{path} has a corrupt header (page size {page_size}). Nothing was changed; "
                           f"{schema.restore}.")
    n_pages, change_counter, valid_for = (struct.unpack(">I", head[o:o + 4])[0] for o in (28, 24, 92))
    expected = n_pages * page_size if n_pages and change_counter == valid_for else 0
    if size % page_size or size < expected:
        if wal_has_frames(path, page_size):
            return True
        raise schema.error(f"{path} is truncated or damaged ({size} bytes, expected {expected or 'whole pages'}). "
                           f"Nothing was changed; {schema.restore}.")
    return False


def check_with_wal(path: Path, schema: Schema, timeout: float) -> None:
    """A main file that looks short, with a write-ahead log: let SQLite read it through the log on a
    read-only connection (which never checkpoints into the file) and refuse it only if that fails."""
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    except sqlite3.Error as exc:
        raise schema.failure(path, exc, "open") or schema.error(
            f"Cannot open {schema.short} {path}: {exc}. Nothing was changed.") from exc
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.Error as exc:
        err = schema.failure(path, exc, "open")
        if err is not None:
            raise err from exc
        rows = [str(exc)]
    finally:
        con.close()
    if rows != ["ok"]:
        detail = "; ".join(str(r) for r in rows[:3])
        raise schema.error(f"{path} is damaged even with its write-ahead log ({detail}). Nothing was changed; "
                           f"{schema.restore}.")


def quick_check(con: sqlite3.Connection, path: Path, schema: Schema) -> None:
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        rows = [(str(exc),)]
    if [r[0] for r in rows] != ["ok"]:
        detail = "; ".join(str(r[0]) for r in rows[:3])
        raise schema.error(f"{path} is corrupt ({detail}). Nothing was changed; {schema.restore}.")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def migrate(con: sqlite3.Connection, schema: Schema,
            on_create: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """Apply the missing migrations in one ``BEGIN IMMEDIATE`` transaction; ``on_create`` runs in it right
    after the first step of a new file (initial rows that need the caller's values)."""
    if con.execute("PRAGMA user_version").fetchone()[0] >= schema.version:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        current = con.execute("PRAGMA user_version").fetchone()[0]  # re-read under the write lock
        for version in range(current, schema.version):
            for step in schema.migrations[version]:
                if callable(step):
                    step(con)
                else:
                    con.execute(step)
            if version == 0 and on_create is not None:
                on_create(con)
            con.execute(f"PRAGMA user_version = {version + 1}")
        con.execute("COMMIT")
    except BaseException:
        rollback(con)
        raise


def open_db(path: str | Path, schema: Schema, *, mode: str = "rwc", synchronous: str = "FULL",
            timeout: float = 30.0, check: str = "auto", foreign_keys: bool = False,
            on_create: Callable[[sqlite3.Connection], None] | None = None) -> sqlite3.Connection:
    """Open (``mode`` ``ro``, ``rw`` or ``rwc``), check and migrate a versioned SQLite file.

    ``check``: ``auto`` runs ``PRAGMA quick_check`` on existing files up to :data:`QUICK_CHECK_MAX_BYTES`,
    ``quick`` always, ``none`` never (the header is always checked). A read-only connection is neither
    migrated nor switched to WAL; on a read-only mount (an archived card) a WAL file is read as immutable,
    which is exact since nothing can write there. Errors: ``schema.error`` for files that are not ours,
    newer or damaged; ``schema.storage_failure`` for full disks, I/O errors and read-only folders.
    """
    path = Path(path)
    if mode not in ("ro", "rw", "rwc"):
        raise ValueError(f"mode must be ro, rw or rwc, got {mode!r}")
    synchronous = synchronous.upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
    existed = path.exists()
    if existed and check_header(path, schema):
        check_with_wal(path, schema, timeout)
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise schema.failure(path, exc, "open") or schema.error(f"Cannot open {schema.short} {path}: {exc}.") from exc
    try:
        try:
            _identify(con, path, schema, existed, check, may_retry=mode == "ro")
        except sqlite3.OperationalError:
            if not (mode == "ro" and _read_only_mount(path.parent)):
                raise
            # WAL on read-only media: SQLite cannot create the -shm index there; read the file as immutable
            con.close()
            con = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
            _identify(con, path, schema, existed, check)
        if mode != "ro":
            if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"PRAGMA synchronous={synchronous}")
            if foreign_keys:
                con.execute("PRAGMA foreign_keys=ON")
            migrate(con, schema, on_create)
    except sqlite3.DatabaseError as exc:
        con.close()
        raise schema.failure(path, exc, "open") or schema.error(
            f"Cannot prepare {schema.short} {path}: {exc}.") from exc
    except BaseException:
        con.close()
        raise
    return con


def _identify(con: sqlite3.Connection, path: Path, schema: Schema, existed: bool, check: str,
              may_retry: bool = False) -> None:
    try:
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        user_version = con.execute("PRAGMA user_version").fetchone()[0]
        n_tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if may_retry and isinstance(exc, sqlite3.OperationalError):
            raise  # the caller retries read-only media as immutable
        raise schema.failure(path, exc, "open") or schema.error(
            f"{path} is corrupt or not a {schema.kind} ({exc}). Nothing was changed; {schema.restore}.") from exc
    if (n_tables or user_version) and app_id != schema.application_id:
        raise schema.error(f"{path} is a SQLite database but not a {schema.kind}. Nothing was changed; "
                           f"{schema.where}.")
    if user_version > schema.version:
        raise schema.error(f"{path} was written by a newer fieldreid ({schema.short} schema {user_version}; this "
                           f"version knows up to {schema.version}). Upgrade fieldreid: pip install -U fieldreid.")
    if existed and n_tables and (check == "quick" or (
            check == "auto" and path.stat().st_size <= QUICK_CHECK_MAX_BYTES)):
        quick_check(con, path, schema)
