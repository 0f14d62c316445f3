"""The lab database: one SQLite file by default, PostgreSQL for a lab that outgrows it.

``LabDB(url, data_dir)`` owns the SQLAlchemy engine, the signing key and the crop store. Both backends
get the same transactional guarantees the sync protocol relies on:

* SQLite: WAL, ``synchronous=FULL``, and every write transaction opened with ``BEGIN IMMEDIATE`` so two
  writers queue on the lock instead of failing half-way (pysqlite's own implicit BEGIN is switched off).
* PostgreSQL: a gallery's version is bumped with ``UPDATE ... SET version = version + 1`` first, which
  row-locks that gallery until commit; pulls read in ``REPEATABLE READ`` so a snapshot never mixes two
  versions.

Crops are stored by content (``crops/ab/<sha256>.jpg``): nothing a device sends becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from fieldreid.errors import FieldreidError, missing_extra
from fieldreid.server import schema as s
from fieldreid.server.fields import species_problem
from fieldreid.server.signing import LabKey
from fieldreid.storage.fsutil import atomic_write_bytes

try:
    import sqlalchemy as sa
    from sqlalchemy import event
except ImportError as exc:  # pragma: no cover - depends on the install
    raise missing_extra("sqlalchemy", "server", "the lab database") from exc

DEFAULT_DATA_DIR = "fieldreid-lab"
#: a delta is sent when it changes at most this fraction of the gallery's rows; else a full snapshot
DELTA_MAX_FRACTION = 0.5


class LabError(FieldreidError):
    """A lab-side operation cannot be done (unknown project, device, identity; inconsistent request)."""


class NotFound(LabError):
    pass


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def normalise_url(url: str | None, data_dir: Path) -> str:
    """``None`` → ``sqlite:///<data_dir>/lab.db``; a plain path → SQLite; ``postgresql://`` → psycopg 3."""
    if not url:
        return f"sqlite:///{(data_dir / 'lab.db').resolve()}"
    if "://" not in url:
        return f"sqlite:///{Path(url).resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _setup_sqlite(engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_con, _record):
        dbapi_con.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_con.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN " + conn.get_execution_options().get("sqlite_begin", "IMMEDIATE"))


def _migrate(con: sa.Connection, version: int) -> None:
    """Inside a write: bring an older lab database up to :data:`schema.SCHEMA_VERSION`."""
    if version < 2:
        have = {c["name"] for c in sa.inspect(con).get_columns("push_chunks")}
        if "fingerprint" not in have:
            con.execute(sa.text("ALTER TABLE push_chunks ADD COLUMN fingerprint VARCHAR(64)"))
    # 3: embedding_features and fusion are new tables, made by create_all before this runs
    con.execute(sa.update(s.meta).where(s.meta.c.key == "schema").values(value=str(s.SCHEMA_VERSION)))


class LabDB:
    """The lab's database, signing key and crop store.

    >>> lab = LabDB("postgresql://lab@127.0.0.1/fieldreid", "/srv/fieldreid")   # doctest: +SKIP
    """

    def __init__(self, url: str | None = None, data_dir: str | Path | None = None, *, create: bool = True) -> None:
        self.data_dir = Path(data_dir or os.environ.get("FIELDREID_LAB_DIR") or DEFAULT_DATA_DIR)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = normalise_url(url or os.environ.get("FIELDREID_LAB_DB"), self.data_dir)
        self.is_sqlite = self.url.startswith("sqlite")
        kw: dict = {"future": True}
        if self.is_sqlite:
            kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kw["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(self.url, **kw)
        except (ImportError, sa.exc.ArgumentError) as exc:
            if "psycopg" in str(exc):
                raise missing_extra("psycopg", "server", "PostgreSQL") from exc
            raise LabError(f"Cannot use database URL {self.url!r}: {exc}") from exc
        if self.is_sqlite:
            _setup_sqlite(self.engine)
        try:
            s.metadata.create_all(self.engine)
            with self.write() as con:
                row = con.execute(sa.select(s.meta.c.value).where(s.meta.c.key == "schema")).first()
                if row is None:
                    con.execute(s.meta.insert().values(key="schema", value=str(s.SCHEMA_VERSION)))
                elif int(row[0]) > s.SCHEMA_VERSION:
                    raise LabError(f"The lab database was made by a newer fieldreid (schema {row[0]}); upgrade.")
                elif int(row[0]) < s.SCHEMA_VERSION:
                    _migrate(con, int(row[0]))
        except sa.exc.OperationalError as exc:
            raise LabError(f"Cannot reach the lab database {self.safe_url}: {exc.orig}") from exc
        self.key = LabKey.load_or_create(self.data_dir / "lab-signing-key.pem")
        self.crop_dir = self.data_dir / "crops"

    @property
    def safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as con:
            with con.begin():
                yield con

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        opts = {"sqlite_begin": "DEFERRED"} if self.is_sqlite else {"isolation_level": "REPEATABLE READ"}
        with self.engine.connect().execution_options(**opts) as con:
            with con.begin():
                yield con

    # ------------------------------------------------------------------ lookups
    def device_for_token_hash(self, token_hash: str) -> tuple[str, bool] | None:
        with self.engine.connect() as con:
            row = con.execute(sa.select(s.devices.c.id, s.devices.c.revoked)
                              .where(s.devices.c.token_hash == token_hash)).first()
            con.rollback()
        return (row[0], bool(row[1])) if row else None

    def device_projects(self, con, device_id: str) -> list[str]:
        return [r[0] for r in con.execute(sa.select(s.device_projects.c.project_id)
                                          .where(s.device_projects.c.device_id == device_id)
                                          .order_by(s.device_projects.c.project_id))]

    def project(self, con, project_id: str) -> sa.Row:
        row = con.execute(sa.select(s.projects).where(s.projects.c.id == project_id)).first()
        if row is None:
            raise NotFound(f"No project '{project_id}'. Create it with `fieldreid server create-project`.")
        return row

    def gallery(self, con, project_id: str, species: str, create: bool = False) -> sa.Row:
        q = sa.select(s.galleries).where(s.galleries.c.project_id == project_id, s.galleries.c.species == species)
        row = con.execute(q).first()
        if row is None and create:
            problem = species_problem(species)
            if problem:  # a gallery name is a URL segment every device pulls: never one outside the pattern
                raise LabError(f"Cannot create a gallery: {problem}.")
            con.execute(s.galleries.insert().values(project_id=project_id, species=species, version=0, floor=0))
            row = con.execute(q).first()
        if row is None:
            raise NotFound(f"No {species} gallery in project '{project_id}'.")
        return row

    def galleries(self, con, project_id: str) -> list[sa.Row]:
        return list(con.execute(sa.select(s.galleries).where(s.galleries.c.project_id == project_id)
                                .order_by(s.galleries.c.species)))

    def bump(self, con, gallery_id: int, action: str, who: str, details: dict) -> int:
        """Inside a write: next version of a gallery (row-locked until commit), logged in ``changes``."""
        con.execute(sa.update(s.galleries).where(s.galleries.c.id == gallery_id)
                    .values(version=s.galleries.c.version + 1))
        version = con.execute(sa.select(s.galleries.c.version).where(s.galleries.c.id == gallery_id)).scalar_one()
        con.execute(s.changes.insert().values(gallery_id=gallery_id, version=version, action=action, who=who,
                                              at=now(), details=json.dumps(details, sort_keys=True)))
        return int(version)

    def resolve(self, con, gallery_id: int, identity_id: str | None) -> str | None:
        """Follow merge records: the identity an old id now lives in."""
        seen = set()
        while identity_id is not None and identity_id not in seen:
            seen.add(identity_id)
            row = con.execute(sa.select(s.merges.c.target).where(s.merges.c.gallery_id == gallery_id,
                                                                s.merges.c.source == identity_id)
                              .order_by(s.merges.c.version.desc()).limit(1)).first()
            if row is None:
                return identity_id
            identity_id = row[0]
        return identity_id

    # ------------------------------------------------------------------ crops
    def store_crop(self, data: bytes) -> str:
        """Write a (validated) JPEG under its SHA-256; returns the hash. Idempotent."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.crop_dir / digest[:2] / f"{digest}.jpg"
        if path.exists():
            return digest
        atomic_write_bytes(path, data)
        return digest

    def crop_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise LabError("not a sha256 digest")
        return self.crop_dir / digest[:2] / f"{digest}.jpg"

    # ------------------------------------------------------------------ pull
    def build_bundle(self, project_id: str, species: str, since: int) -> tuple[bytes, dict]:
        """A signed delta since ``since`` (or a full snapshot); returns (bundle bytes, summary)."""
        with self.read() as con:
            proj = self.project(con, project_id)
            g = self.gallery(con, project_id, species)
            version = int(g.version)
            if since > version:
                raise LabError(f"This device is at version {since} of {project_id}/{species} but the lab is at "
                               f"{version}: the lab database was restored from an older backup. Re-pull with "
                               "--full on the device.")
            dist = sa.not_(sa.and_(s.identities.c.status == "provisional", s.identities.c.origin == "field"))
            ident_q = sa.select(s.identities.c.id, s.identities.c.name, s.identities.c.status,
                                s.identities.c.deleted).where(s.identities.c.gallery_id == g.id, dist)
            emb_join = s.embeddings.join(s.identities, sa.and_(s.identities.c.gallery_id == s.embeddings.c.gallery_id,
                                                             s.identities.c.id == s.embeddings.c.identity_id))
            feat_join = emb_join.outerjoin(s.embedding_features,
                                           s.embedding_features.c.embedding_id == s.embeddings.c.id)
            emb_q = sa.select(s.embeddings.c.id, s.embeddings.c.identity_id, s.embeddings.c.vector,
                              s.embeddings.c.deleted, s.embedding_features.c.kind,
                              s.embedding_features.c.data).select_from(feat_join).where(s.embeddings.c.gallery_id == g.id,
                                                                                 dist)
            kind = "snapshot"
            if since > 0 and since >= int(g.floor):
                total = con.execute(sa.select(sa.func.count()).select_from(emb_q.subquery())).scalar_one()
                changed = con.execute(sa.select(sa.func.count()).select_from(
                    emb_q.where(s.embeddings.c.updated_version > since).subquery())).scalar_one()
                if changed <= DELTA_MAX_FRACTION * max(total, 1) or total == 0:
                    kind = "delta"
            if kind == "delta":
                ident_q = ident_q.where(s.identities.c.updated_version > since)
                emb_q = emb_q.where(s.embeddings.c.updated_version > since)
            else:
                ident_q = ident_q.where(sa.not_(s.identities.c.deleted))
                emb_q = emb_q.where(sa.not_(s.embeddings.c.deleted))
            idents = [[r.id, r.name, r.status, bool(r.deleted)] for r in con.execute(ident_q.order_by(s.identities.c.id))]
            eids, owners, vecs, dropped, feats = [], [], [], [], []
            for r in con.execute(emb_q.order_by(s.embeddings.c.id)):
                if r.deleted:
                    dropped.append(int(r.id))
                else:
                    eids.append(int(r.id))
                    owners.append(r.identity_id)
                    vecs.append(bytes(r.vector))
                    feats.append([r.kind, bytes(r.data)] if r.data is not None else None)
            merges = [[int(r.version), r.source, r.target] for r in con.execute(
                sa.select(s.merges).where(s.merges.c.gallery_id == g.id, s.merges.c.version > since)
                .order_by(s.merges.c.version, s.merges.c.id))]
            th_q = sa.select(s.thresholds).where(s.thresholds.c.gallery_id == g.id,
                                                 s.thresholds.c.model_id == proj.model_id)
            if kind == "delta":
                th_q = th_q.where(s.thresholds.c.version > since)
            th = con.execute(th_q.order_by(s.thresholds.c.id.desc()).limit(1)).first()
            fu_q = sa.select(s.fusion.c.data).where(s.fusion.c.gallery_id == g.id, s.fusion.c.model_id == proj.model_id)
            if kind == "delta":
                fu_q = fu_q.where(s.fusion.c.version > since)
            fusion = con.execute(fu_q.order_by(s.fusion.c.id.desc()).limit(1)).scalar()
        payload = {
            "project": project_id, "species": species, "kind": kind, "base": since if kind == "delta" else 0,
            "since": since, "version": version, "model_id": proj.model_id, "dim": int(proj.dim), "dtype": "<f4",
            "identities": idents, "embedding_ids": eids, "embedding_identities": owners,
            "vectors": b"".join(vecs), "embeddings_deleted": dropped, "merges": merges,
            "thresholds": [th.upper, th.lower, th.method] if th is not None else None, "issued": now(),
            # per embedding [kind, bytes] of its local features, or None; the fusion as JSON text (or None)
            "features": feats, "fusion": fusion,
        }
        summary = {"kind": kind, "version": version, "since": since, "identities": len(idents),
                   "embeddings": len(eids), "deleted": len(dropped), "merges": len(merges),
                   "features": sum(f is not None for f in feats), "fusion": fusion is not None}
        return self.key.sign_bundle(payload), summary
