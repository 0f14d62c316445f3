"""The identity gallery: one SQLite file holding identities, their embeddings, sightings and thresholds.

This module is the core store (opening, transactions, identities, embeddings, thresholds, sightings);
the file's tables and migrations are in :mod:`fieldreid.gallery.schema`, the curator's logged changes
(rename/merge/split/confirm/delete/log) in :mod:`fieldreid.gallery.curation` (mixed into :class:`Gallery`).
The file is opened by :func:`fieldreid.storage.sqlite.open_db`, as the watch results database is.

Why SQLite, and how it is set up:

* **WAL journal**: readers (a ``watch`` loop searching) never block the writer (``enroll`` or a curator
  merging identities) and vice versa; a crash mid-write leaves the last committed state.
* **synchronous=FULL** (not NORMAL): in WAL mode NORMAL keeps the file consistent but may lose the last
  few committed transactions on a *power cut* - the normal way a solar/battery field device stops. A lost
  commit here is a curator's merge or a provisional animal that the CSV output already names, so we pay
  one fsync per transaction instead. Writes are batched (one transaction per enrol batch, per
  provisional identity, per management command), so the cost is small. Pass ``synchronous="NORMAL"``
  for throw-away galleries (benchmarks, evaluation).
* **busy_timeout** (30 s): a second process that wants to write waits for the lock instead of failing;
  every write is one ``BEGIN IMMEDIATE`` transaction, so two writers serialise and no row is lost.
* **schema version** in ``PRAGMA user_version`` and ``PRAGMA application_id`` marking the file as a
  fieldreid gallery; :data:`MIGRATIONS` are applied in one transaction each. A file from a newer
  fieldreid is refused, never "upgraded" downwards.
* **opening is read-only until the file is known good**: the 100-byte SQLite header is checked by hand
  (magic, page size, page count against the file size) before SQLite touches the file, then
  ``PRAGMA quick_check`` runs; a truncated or corrupt file raises :class:`GalleryError` with the file's
  bytes unchanged. A main file shorter than its header says, next to a write-ahead log (a checkpoint cut
  short by a full disk), is judged by SQLite's own recovery on a read-only connection first: its pages
  are in the log. Keep galleries on a local disk: WAL needs working file locks (not NFS/SMB).
* **a full disk is a full disk**: a write that fails for lack of space (or an I/O error) raises
  :class:`DiskFullError` / :class:`GalleryError` saying so; SQLite has kept the last commit, nothing changed.
* **sightings are unique by (source content SHA-256, box)** (schema 2): recording the same photo again
  returns the first sighting.

Versions: ``meta.version`` increases on every change that can alter a decision (enrol, provisional
identity, rename/merge/split/confirm/delete, thresholds); sightings do not bump it. ``meta.structure``
increases only on changes that move or remove embeddings, so a search cache can append new rows
cheaply and reload fully only when it must.

>>> g = Gallery("nyala.db")                         # doctest: +SKIP
>>> g.add_identity("nyala-0042", species="nyala")   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldreid.errors import GalleryError, IdentityNotFoundError, InputError, ModelMismatchError
from fieldreid.gallery.curation import Change, Curation
from fieldreid.gallery.schema import (
    APPLICATION_ID,
    DECISIONS,
    MIGRATIONS,
    ORIGINS,
    SCHEMA_VERSION,
    STATUSES,
    UNKNOWN_SPECIES,
    box_key,
    default_who,
    parse_box,
    utc_now,
)
from fieldreid.storage.sqlite import QUICK_CHECK_MAX_BYTES, Schema, open_db, rollback

# names other modules import from here (the gallery's public face), defined in schema / curation / errors
__all__ = [
    "APPLICATION_ID", "DECISIONS", "GALLERY_SCHEMA", "MIGRATIONS", "ORIGINS", "QUICK_CHECK_MAX_BYTES", "SCHEMA_VERSION", "STATUSES",
    "UNKNOWN_SPECIES", "Change", "DiskFullError", "EmbeddingInfo", "Gallery", "GalleryError", "Identity",
    "IdentityNotFoundError", "ModelMismatchError", "StoredThresholds", "VectorBlock", "box_key", "default_who",
    "free_bytes", "parse_box", "storage_error", "utc_now",
]


@dataclass(frozen=True)
class Identity:
    id: str
    name: str | None
    species: str
    status: str
    origin: str
    created: str
    updated: str
    n_embeddings: int = 0
    n_sightings: int = 0


@dataclass(frozen=True)
class EmbeddingInfo:
    id: int
    identity_id: str
    model_id: str
    source: str
    box: str
    created: str


@dataclass(frozen=True)
class StoredThresholds:
    species: str
    model_id: str
    upper: float
    lower: float
    method: str
    created: str


@dataclass(frozen=True)
class VectorBlock:
    """Embeddings loaded for search: row ids, identity ids, and an (N, D) matrix (float32 or float16)."""

    row_ids: np.ndarray
    identity_ids: list[str]
    matrix: np.ndarray


SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY = 13, 10, 8  # primary result codes
#: an I/O error on a file system with less free space than this is reported as a full disk
LOW_SPACE_BYTES = 1024 * 1024


class DiskFullError(GalleryError):
    """A gallery write failed because the disk is full; the gallery is as it was before the write."""


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the file system holding ``path`` (None if unknown)."""
    try:
        st = os.statvfs(path if path.is_dir() else path.parent)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def storage_error(path: Path, exc: BaseException, doing: str = "write") -> GalleryError | None:
    """A clear error for a SQLite failure caused by the storage (full disk, I/O error, read-only file
    system); None when ``exc`` is something else. Only for failures where SQLite kept the last commit."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    msg = str(exc).lower()
    free = free_bytes(path)
    if primary == SQLITE_FULL or "disk is full" in msg or (
            (primary == SQLITE_IOERR or "disk i/o error" in msg) and free is not None and free < LOW_SPACE_BYTES):
        room = f"{free} bytes free" if free is not None else "no space"
        return DiskFullError(f"Cannot {doing} gallery {path}: the disk is full ({room}). Nothing was changed: the "
                             "gallery holds its last saved state. Free some space and run the command again.")
    if primary == SQLITE_IOERR or "disk i/o error" in msg:
        return GalleryError(f"Cannot {doing} gallery {path}: the disk reported an I/O error ({exc}). Nothing was "
                            "changed; check the disk (dmesg), then run the command again.")
    if primary == SQLITE_READONLY or "readonly database" in msg:
        return GalleryError(f"Cannot {doing} gallery {path}: the file or its folder is read-only ({exc}). Give "
                            "this user write permission on the file and its folder (SQLite writes -wal and "
                            "-shm files next to it).")
    return None


#: what a gallery file is, for :func:`fieldreid.storage.sqlite.open_db`
GALLERY_SCHEMA = Schema(
    kind="fieldreid gallery", short="gallery", application_id=APPLICATION_ID, migrations=MIGRATIONS,
    error=GalleryError, where="check the --gallery path",
    restore="restore it from a backup or sync it again from the lab", storage_failure=storage_error)


class Gallery(Curation):
    """An identity gallery in one SQLite file. Use as a context manager or call :meth:`close`.

    ``storage`` (``float32`` or ``float16``) applies to a new gallery; an existing one keeps its own.
    float16 halves disk and memory; cosine scores change by < 1e-3 (unit vectors, float32 accumulation).
    """

    def __init__(self, path: str | Path, *, create: bool = True, storage: str = "float32",
                 synchronous: str = "FULL", timeout: float = 30.0, who: str | None = None,
                 check: str = "auto") -> None:
        self.path = Path(path)
        self.who = who or default_who()
        self._depth = 0  # nesting of transaction(): calls inside an open one join it
        if storage not in ("float32", "float16"):
            raise InputError(f"storage must be float32 or float16, got {storage!r}")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InputError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        if self.path.exists():
            if not self.path.is_file():
                raise GalleryError(f"{self.path} is not a file; pass the gallery's .db file with --gallery.")
        elif not create:
            raise GalleryError(f"No gallery at {self.path}. Create one with `fieldreid enroll SOURCE --gallery "
                               f"{self.path}`.")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

        def first_rows(con: sqlite3.Connection) -> None:
            now = utc_now()
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                ("version", "0"), ("structure", "0"), ("storage", storage), ("created", now)])
            con.execute("INSERT INTO changes (action, who, at, details, gallery_version) "
                        "VALUES ('create', ?, ?, ?, 0)", (self.who, now, json.dumps({"storage": storage})))

        # header, WAL, synchronous, busy timeout, application id, quick check, migrations: one opener
        self._con = open_db(self.path, GALLERY_SCHEMA, mode="rwc" if create else "rw", synchronous=synchronous,
                            timeout=timeout, check=check, foreign_keys=True, on_create=first_rows)

    def check(self) -> list[str]:
        """Full ``PRAGMA integrity_check``: ``[]`` when the file is sound, else SQLite's problem list."""
        rows = [r[0] for r in self._con.execute("PRAGMA integrity_check").fetchall()]
        return [] if rows == ["ok"] else rows

    def _rollback(self) -> None:
        rollback(self._con)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transactions and meta
    @contextmanager
    def transaction(self, action: str | None = None, details: dict | None = None, structural: bool = False
               ) -> Iterator[sqlite3.Connection]:
        """One write transaction. With ``action``: bump the version (and ``structure``) and log the change.

        Calls made inside an open transaction (``merge``, ``confirm``, ``add_embeddings``, ...) join it: each
        logs its own change, and all of them commit together with the outer block, or none does
        (``fieldreid review`` makes each decision this way).
        """
        con = self._con
        if self._depth:  # joined: the outermost block commits or rolls back
            self._depth += 1
            try:
                yield con
                self._log_change(action, details, structural)
            finally:
                self._depth -= 1
            return
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            err = storage_error(self.path, exc)
            if err is not None:
                raise err from exc
            raise GalleryError(f"Gallery {self.path} is locked by another process for too long ({exc}). Try again "
                               "when the other command has finished.") from exc
        self._depth = 1
        try:
            yield con
            self._log_change(action, details, structural)
            con.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            err = storage_error(self.path, exc)
            if err is not None:
                raise err from exc
            raise
        finally:
            self._depth = 0

    def _log_change(self, action: str | None, details: dict | None, structural: bool) -> None:
        """Inside a transaction: bump the version (and ``structure``) and append the change to the log."""
        if action is not None and details is not None and details.pop("_unchanged", False):
            action = None  # e.g. a re-run enrolment that found everything present: nothing to log
        if action is not None:
            version = int(self.meta("version")) + 1
            self.set_meta("version", str(version))
            if structural:
                self.set_meta("structure", str(int(self.meta("structure")) + 1))
            self._con.execute("INSERT INTO changes (action, who, at, details, gallery_version) VALUES (?, ?, ?, ?, ?)",
                              (action, self.who, utc_now(), json.dumps(details or {}, sort_keys=True), version))

    def meta(self, key: str) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def read(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        """One read statement on the gallery's connection (writes go through :meth:`transaction`)."""
        return self._con.execute(sql, args)

    def checkpoint(self) -> None:
        """Fold the write-ahead log into the main file (before the file is copied or linked elsewhere)."""
        self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def set_meta(self, key: str, value: str) -> None:
        self._con.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                          "excluded.value", (key, value))

    @property
    def version(self) -> int:
        """Counter bumped by every change that can alter a decision (read fresh, other processes count)."""
        return int(self.meta("version") or 0)

    def versions(self) -> tuple[int, int]:
        """(version, structure) read in one statement, for cache invalidation."""
        rows = dict(self._con.execute("SELECT key, value FROM meta WHERE key IN ('version', 'structure')"))
        return int(rows.get("version", 0)), int(rows.get("structure", 0))

    @property
    def schema_version(self) -> int:
        return int(self._con.execute("PRAGMA user_version").fetchone()[0])

    @property
    def model_id(self) -> str | None:
        """The embedder every stored vector came from (None while the gallery holds no embeddings)."""
        return self.meta("model_id")

    @property
    def dim(self) -> int | None:
        d = self.meta("dim")
        return int(d) if d else None

    @property
    def storage(self) -> str:
        return self.meta("storage") or "float32"

    def check_model(self, model_id: str, dim: int | None = None) -> None:
        """Raise :class:`ModelMismatchError` if ``model_id`` is not the gallery's model."""
        mine = self.model_id
        if mine is not None and mine != model_id:
            raise ModelMismatchError(
                f"Gallery {self.path} holds embeddings from model '{mine}', but these come from model "
                f"'{model_id}'; scores across models are meaningless. Use the embedder the gallery was built "
                f"with, or re-embed the gallery with the new one: fieldreid enroll SOURCE --gallery {self.path} "
                f"--reembed --embedder NEW_MODEL.onnx")
        gdim = self.dim
        if dim is not None and gdim is not None and gdim != dim:
            raise ModelMismatchError(f"Gallery {self.path} stores {gdim}-d embeddings but got {dim}-d ones from "
                                     f"model '{model_id}'. Re-embed with --reembed.")

    # ------------------------------------------------------------------ identities
    def _identity_row(self, identity_id: str) -> tuple:
        row = self._con.execute("SELECT id, name, species, status, origin, created, updated FROM identities "
                                "WHERE id = ?", (identity_id,)).fetchone()
        if row is None:
            raise IdentityNotFoundError(f"No identity '{identity_id}' in {self.path}. List them with `fieldreid "
                                        f"gallery list --gallery {self.path}`.")
        return row

    def get_identity(self, identity_id: str) -> Identity:
        row = self._identity_row(identity_id)
        n_emb = self._con.execute("SELECT count(*) FROM embeddings WHERE identity_id = ?", (identity_id,)).fetchone()[0]
        n_sig = self._con.execute("SELECT count(*) FROM sightings WHERE identity_id = ?", (identity_id,)).fetchone()[0]
        return Identity(*row, n_embeddings=n_emb, n_sightings=n_sig)

    def has_identity(self, identity_id: str) -> bool:
        return self._con.execute("SELECT 1 FROM identities WHERE id = ?", (identity_id,)).fetchone() is not None

    def identities(self, species: str | None = None, status: str | None = None) -> list[Identity]:
        sql = ("SELECT i.id, i.name, i.species, i.status, i.origin, i.created, i.updated, "
               "(SELECT count(*) FROM embeddings e WHERE e.identity_id = i.id), "
               "(SELECT count(*) FROM sightings s WHERE s.identity_id = i.id) FROM identities i")
        where, args = [], []
        if species:
            where.append("i.species = ?")
            args.append(species)
        if status:
            where.append("i.status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._con.execute(sql + " ORDER BY i.species, i.id", args).fetchall()
        return [Identity(*r[:7], n_embeddings=r[7], n_sightings=r[8]) for r in rows]

    def species(self) -> list[str]:
        return [r[0] for r in self._con.execute("SELECT DISTINCT species FROM identities ORDER BY species")]

    def identity_species(self) -> dict[str, str]:
        return dict(self._con.execute("SELECT id, species FROM identities"))

    def _insert_identity(self, identity_id: str, species: str, name: str | None, status: str, origin: str) -> None:
        if not identity_id or not species:
            raise InputError("An identity needs a non-empty id and species.")
        if status not in STATUSES:
            raise InputError(f"status must be one of {STATUSES}, got {status!r}")
        if origin not in ORIGINS:
            raise InputError(f"origin must be one of {ORIGINS}, got {origin!r}")
        now = utc_now()
        self._con.execute("INSERT INTO identities (id, name, species, status, origin, created, updated) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)", (identity_id, name, species, status, origin, now, now))

    def add_identity(self, identity_id: str, species: str, name: str | None = None, status: str = "confirmed",
                     origin: str = "lab") -> bool:
        """Create an identity; returns False (and changes nothing) if the id already exists."""
        if self.has_identity(identity_id):
            return False
        details = {"identity": identity_id, "species": species, "status": status, "origin": origin}
        with self.transaction("create", details):
            created = not self.has_identity(identity_id)  # another process may have made it meanwhile
            if created:
                self._insert_identity(identity_id, species, name, status, origin)
            else:
                details["already_present"] = True
        return created

    def next_provisional(self, species: str) -> str:
        """Next ``<species>-P0001`` id; the counter lives in the file so numbering never repeats."""
        con = self._con
        row = con.execute("SELECT next FROM provisional_counters WHERE species = ?", (species,)).fetchone()
        n = row[0] if row else 1
        while True:
            candidate = f"{species}-P{n:04d}"
            n += 1
            if not self.has_identity(candidate):
                break
        con.execute("INSERT INTO provisional_counters (species, next) VALUES (?, ?) ON CONFLICT(species) DO UPDATE "
                    "SET next = excluded.next", (species, n))
        return candidate

    def add_provisional(self, species: str, vector: np.ndarray, model_id: str, source: str,
                        box: Sequence[float] | str | None = None) -> str:
        """Create a provisional identity (``<species>-P0001``, origin field) holding one embedding."""
        vec = self._vectors(vector, model_id)
        key = box if isinstance(box, str) else box_key(box)
        row = self._con.execute("SELECT identity_id FROM embeddings WHERE model_id = ? AND source = ? AND box = ?",
                                (model_id, source, key)).fetchone()
        if row is not None:  # this very crop is already in the gallery (a re-run): never a second identity
            return row[0]
        details: dict = {"species": species, "source": source, "box": key}
        with self.transaction("create-provisional", details) as con:
            new_id = self.next_provisional(species)
            details["identity"] = new_id
            self._insert_identity(new_id, species, None, "provisional", "field")
            self._claim_model(model_id, vec.shape[1])
            con.execute("INSERT OR IGNORE INTO embeddings (identity_id, model_id, dim, dtype, vector, source, box, "
                        "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (new_id, model_id, vec.shape[1], self.storage, vec[0].tobytes(), source, key, utc_now()))
        return new_id

    # ------------------------------------------------------------------ embeddings
    def _vectors(self, vectors: np.ndarray, model_id: str) -> np.ndarray:
        vec = np.asarray(vectors, dtype=np.float32)
        if vec.ndim == 1:
            vec = vec[None, :]
        if vec.ndim != 2 or vec.shape[1] == 0:
            raise InputError(f"Embeddings must have shape (N, D), got {vec.shape}")
        if not np.all(np.isfinite(vec)):
            raise InputError("Embeddings contain NaN or infinity; the embedder output is broken.")
        self.check_model(model_id, vec.shape[1])
        return vec.astype("<f2" if self.storage == "float16" else "<f4")

    def _claim_model(self, model_id: str, dim: int) -> None:
        """Inside a write: set the gallery's model on first use, re-check it under the lock otherwise."""
        mine = self.meta("model_id")
        if mine is None:
            self.set_meta("model_id", model_id)
            self.set_meta("dim", str(dim))
        else:
            self.check_model(model_id, dim)

    def add_embeddings(self, identity_ids: Sequence[str], vectors: np.ndarray, model_id: str,
                       sources: Sequence[str], boxes: Sequence[Sequence[float] | str | None] | None = None,
                       species: Sequence[str] | str | None = None, status: str = "confirmed",
                       origin: str = "lab", crop_rule: str | None = None) -> tuple[int, int]:
        """Enrol vectors in one transaction; missing identities are created (``species`` needed then).

        Re-enrolling the same (model, source, box) is a no-op. Returns (added, already_present).
        ``crop_rule`` (:data:`fieldreid.crop.CROP_RULE`) is recorded in the change log with the enrolment.
        """
        vec = self._vectors(vectors, model_id)
        n = vec.shape[0]
        boxes = [None] * n if boxes is None else list(boxes)
        if not (len(identity_ids) == len(sources) == len(boxes) == n):
            raise InputError(f"add_embeddings needs one identity, source and box per vector ({n} vectors, "
                             f"{len(identity_ids)} identities, {len(sources)} sources, {len(boxes)} boxes)")
        if isinstance(species, str) or species is None:
            species = [species] * n
        keys = [b if isinstance(b, str) else box_key(b) for b in boxes]
        if n == 0:
            return 0, 0
        added = 0
        new_ids: set[str] = set()
        now = utc_now()
        details = {"model_id": model_id, "n": n, **({"crop_rule": crop_rule} if crop_rule else {})}
        with self.transaction("enrol", details) as con:
            self._claim_model(model_id, vec.shape[1])
            for i in range(n):
                iid = str(identity_ids[i])
                if iid not in new_ids and not self.has_identity(iid):
                    if not species[i]:
                        raise InputError(f"Identity '{iid}' is new: give its species.")
                    self._insert_identity(iid, str(species[i]), iid, status, origin)
                    new_ids.add(iid)
                cur = con.execute("INSERT OR IGNORE INTO embeddings (identity_id, model_id, dim, dtype, vector, "
                                  "source, box, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (iid, model_id, vec.shape[1], self.storage, vec[i].tobytes(), str(sources[i]),
                                   keys[i], now))
                added += cur.rowcount
            details.update(added=added, identities_created=sorted(new_ids))
            if added == 0 and not new_ids:
                details["_unchanged"] = True
        return added, n - added

    def has_source(self, source: str, model_id: str, box: Sequence[float] | str | None = None,
                   any_box: bool = False) -> bool:
        if any_box:
            sql, args = "SELECT 1 FROM embeddings WHERE model_id = ? AND source = ? LIMIT 1", (model_id, source)
        else:
            key = box if isinstance(box, str) else box_key(box)
            sql, args = "SELECT 1 FROM embeddings WHERE model_id = ? AND source = ? AND box = ?", (model_id, source, key)
        return self._con.execute(sql, args).fetchone() is not None

    def enrolled_sources(self, model_id: str) -> set[str]:
        return {r[0] for r in self._con.execute("SELECT DISTINCT source FROM embeddings WHERE model_id = ?",
                                                 (model_id,))}

    def embeddings(self, identity_id: str | None = None) -> list[EmbeddingInfo]:
        sql = "SELECT id, identity_id, model_id, source, box, created FROM embeddings"
        args: tuple = ()
        if identity_id is not None:
            self._identity_row(identity_id)
            sql += " WHERE identity_id = ?"
            args = (identity_id,)
        return [EmbeddingInfo(*r) for r in self._con.execute(sql + " ORDER BY id", args)]

    def count_embeddings(self) -> int:
        return int(self._con.execute("SELECT count(*) FROM embeddings").fetchone()[0])

    def load_vectors(self, after_id: int = 0) -> VectorBlock:
        """Embeddings with row id > ``after_id``, as one matrix in the gallery's storage dtype."""
        dim = self.dim
        dtype = np.dtype("<f2") if self.storage == "float16" else np.dtype("<f4")
        rows = self._con.execute("SELECT id, identity_id, vector, dtype FROM embeddings WHERE id > ? ORDER BY id",
                                 (after_id,)).fetchall()
        if not rows or dim is None:
            return VectorBlock(np.zeros(0, np.int64), [], np.zeros((0, dim or 0), dtype))
        mat = np.empty((len(rows), dim), dtype.newbyteorder("="))
        for i, (_, _, blob, dt) in enumerate(rows):
            vec = np.frombuffer(blob, "<f2" if dt == "float16" else "<f4")  # rows of either dtype convert
            if vec.size != dim:
                raise GalleryError(f"{self.path} holds embeddings of mixed sizes; re-embed it with --reembed.")
            mat[i] = vec
        return VectorBlock(np.array([r[0] for r in rows], np.int64), [r[1] for r in rows], mat)

    def replace_vectors(self, row_ids: Sequence[int], vectors: np.ndarray, model_id: str) -> None:
        """Re-embedding: swap every listed row's vector for one from ``model_id`` and make that the gallery's
        model, in one transaction. Rows not listed (their source images are gone) are deleted, since their
        old-model vectors cannot be compared with the new ones."""
        vec = np.asarray(vectors, dtype=np.float32)
        if vec.ndim != 2 or vec.shape[0] != len(row_ids):
            raise InputError(f"replace_vectors needs one vector per row ({len(row_ids)} rows, {vec.shape})")
        dtype = "<f2" if self.storage == "float16" else "<f4"
        old = self.model_id
        keep = {int(r) for r in row_ids}
        all_ids = [r[0] for r in self._con.execute("SELECT id FROM embeddings")]
        dropped = [i for i in all_ids if i not in keep]
        with self.transaction("reembed", {"from": old, "to": model_id, "rows": len(keep), "dropped": len(dropped)},
                         structural=True) as con:
            self.set_meta("model_id", model_id)
            self.set_meta("dim", str(vec.shape[1]))
            con.executemany("UPDATE embeddings SET model_id = ?, dim = ?, dtype = ?, vector = ? WHERE id = ?",
                            [(model_id, vec.shape[1], self.storage, vec[i].astype(dtype).tobytes(), int(r))
                             for i, r in enumerate(row_ids)])
            con.executemany("DELETE FROM embeddings WHERE id = ?", [(i,) for i in dropped])

    # ------------------------------------------------------------------ thresholds
    def set_thresholds(self, species: str, model_id: str, upper: float, lower: float, method: str) -> None:
        """Store open-set thresholds for (species, model); ``species='*'`` applies to every species."""
        if not (np.isfinite(upper) and np.isfinite(lower)) or lower > upper:
            raise InputError(f"Thresholds need lower <= upper (got lower={lower}, upper={upper}).")
        with self.transaction("thresholds", {"species": species, "model_id": model_id, "upper": upper, "lower": lower,
                                        "method": method}) as con:
            con.execute("INSERT INTO thresholds (species, model_id, upper, lower, method, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (species, model_id, float(upper), float(lower), method, utc_now()))

    def thresholds(self, species: str, model_id: str) -> StoredThresholds | None:
        """Latest thresholds for (species, model), falling back to the '*' entry; None if uncalibrated."""
        for sp in (species, "*"):
            row = self._con.execute("SELECT species, model_id, upper, lower, method, created FROM thresholds WHERE "
                                    "species = ? AND model_id = ? ORDER BY id DESC LIMIT 1", (sp, model_id)).fetchone()
            if row:
                return StoredThresholds(*row)
        return None

    def all_thresholds(self) -> list[StoredThresholds]:
        return [StoredThresholds(*r) for r in self._con.execute(
            "SELECT species, model_id, upper, lower, method, created FROM thresholds t WHERE id = (SELECT max(id) "
            "FROM thresholds u WHERE u.species = t.species AND u.model_id = t.model_id) ORDER BY species")]

    # ------------------------------------------------------------------ local features (verification)
    def set_local_features(self, rows: Sequence[tuple[int, str, bytes]]) -> int:
        """Store (embedding id, kind, bytes) of each embedding's local features, replacing older ones; rows
        of embeddings that no longer exist are skipped. Not a curation change (the version is unchanged)."""
        if not rows:
            return 0
        with self.transaction() as con:
            before = con.total_changes
            con.executemany("INSERT OR REPLACE INTO local_features (embedding_id, kind, data) SELECT ?, ?, ? "
                            "WHERE EXISTS (SELECT 1 FROM embeddings WHERE id = ?)",
                            [(int(i), str(k), bytes(d), int(i)) for i, k, d in rows])
            return con.total_changes - before

    def local_features(self, embedding_ids: Sequence[int], kind: str) -> dict[int, bytes]:
        """Stored feature bytes of ``kind`` by embedding id (ids without them are absent)."""
        out: dict[int, bytes] = {}
        ids = [int(i) for i in embedding_ids]
        for a in range(0, len(ids), 500):
            part = ids[a:a + 500]
            out.update({int(r[0]): bytes(r[1]) for r in self._con.execute(
                f"SELECT embedding_id, data FROM local_features WHERE kind = ? AND embedding_id IN "
                f"({', '.join('?' * len(part))})", (kind, *part))})
        return out

    def missing_local_features(self, kind: str) -> list[EmbeddingInfo]:
        """Embeddings without local features of ``kind`` (what ``gallery reindex`` computes)."""
        return [EmbeddingInfo(*r) for r in self._con.execute(
            "SELECT id, identity_id, model_id, source, box, created FROM embeddings e WHERE NOT EXISTS (SELECT 1 "
            "FROM local_features f WHERE f.embedding_id = e.id AND f.kind = ?) ORDER BY id", (kind,))]

    def set_fusion(self, species: str, model_id: str, fusion: dict) -> None:
        """Store the fitted fusion of cosine and inliers for (species, model) (``'*'`` = every species)."""
        with self.transaction("fusion", {"species": species, "model_id": model_id,
                                         "pays": fusion.get("pays")}) as con:
            con.execute("INSERT OR REPLACE INTO fusion (species, model_id, data, created) VALUES (?, ?, ?, ?)",
                        (species, model_id, json.dumps(fusion, sort_keys=True), utc_now()))

    def fusion(self, species: str, model_id: str) -> dict | None:
        """The fusion stored for (species, model), falling back to '*'; None when there is none."""
        for sp in (species, "*"):
            row = self._con.execute("SELECT data FROM fusion WHERE species = ? AND model_id = ?",
                                    (sp, model_id)).fetchone()
            if row:
                return json.loads(row[0])
        return None

    # ------------------------------------------------------------------ sightings
    def add_sightings(self, rows: Sequence[dict]) -> list[int]:
        """Record decisions with full provenance (keys as in the ``sightings`` table). Not a 'change'.

        ``source_sha256`` (the source image's content hash) makes a sighting unique by (source content,
        box): recording it again - the same photo processed twice, into another output folder or by another
        command - stores nothing and returns the first sighting's id. ``source_root`` is the folder a
        relative ``image`` path is relative to; ``vector`` the query embedding (stored as float32);
        ``probability`` the decision's calibrated probability (in [0, 1], or None) and ``probability_source``
        the fit that gave it.
        """
        cols = ("image", "box", "captured", "camera", "decision", "identity_id", "score", "runner_up_id",
                "runner_up_score", "upper", "lower", "threshold_method", "model_id", "gallery_version",
                "source_sha256", "source_root", "vector", "probability", "probability_source")
        ids = []
        now = utc_now()
        sql = (f"INSERT INTO sightings ({', '.join(cols)}, created) VALUES ({', '.join('?' * len(cols))}, ?) "
               "ON CONFLICT (source_sha256, box) DO NOTHING")
        with self.transaction() as con:
            for r in rows:
                if r.get("decision") not in DECISIONS:
                    raise InputError(f"decision must be one of {DECISIONS}, got {r.get('decision')!r}")
                vals = [r.get(c) for c in cols]
                vals[1] = vals[1] if isinstance(vals[1], str) else box_key(vals[1])
                sha = vals[14]
                if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                                        or sha.strip("0123456789abcdef")):
                    raise InputError(f"source_sha256 must be 64 lower-case hex digits, got {sha!r}")
                if vals[16] is not None:
                    vec = np.asarray(vals[16], dtype="<f4").reshape(-1)
                    if vec.size == 0 or not np.all(np.isfinite(vec)):
                        raise InputError("A sighting's vector must be non-empty and finite.")
                    vals[16] = vec.tobytes()
                if vals[17] is not None:
                    prob = float(vals[17])
                    if not 0.0 <= prob <= 1.0:  # also refuses NaN
                        raise InputError(f"A sighting's probability must lie in [0, 1], got {vals[17]!r}")
                    vals[17] = prob
                cur = con.execute(sql, (*vals, now))
                if cur.rowcount == 1:
                    ids.append(int(cur.lastrowid))
                else:  # this photo and box are already recorded: the first record stands
                    ids.append(int(con.execute("SELECT id FROM sightings WHERE source_sha256 = ? AND box = ?",
                                               (sha, vals[1])).fetchone()[0]))
        return ids

    def sighting_vector(self, sighting_id: int) -> np.ndarray | None:
        """The query embedding a sighting was decided from (None when it was recorded without one)."""
        row = self._con.execute("SELECT vector FROM sightings WHERE id = ?", (int(sighting_id),)).fetchone()
        return None if row is None or row[0] is None else np.frombuffer(row[0], "<f4").copy()

    def sightings(self, identity_id: str | None = None, limit: int | None = None) -> list[dict]:
        """Recorded sightings, oldest first (every column but the vector: see :meth:`sighting_vector`)."""
        names = [r[1] for r in self._con.execute("PRAGMA table_info(sightings)") if r[1] != "vector"]
        sql = f"SELECT {', '.join(names)} FROM sightings"
        args: list = []
        if identity_id is not None:
            sql += " WHERE identity_id = ?"
            args.append(identity_id)
        sql += " ORDER BY id"
        if limit:
            sql += " LIMIT ?"
            args.append(int(limit))
        cur = self._con.execute(sql, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def sighting_keys(self, images: set[str] | Sequence[str]) -> set[tuple[str, str]]:
        """(image, box) of the sightings recorded for these images (a watch replaying after a crash)."""
        out: set[tuple[str, str]] = set()
        imgs = sorted(set(images))
        for a in range(0, len(imgs), 500):
            chunk = imgs[a:a + 500]
            out.update(self._con.execute(f"SELECT image, box FROM sightings WHERE image IN ({', '.join('?' * len(chunk))})",
                                         chunk).fetchall())
        return out

    def count_sightings(self) -> int:
        return int(self._con.execute("SELECT count(*) FROM sightings").fetchone()[0])
