"""The lab database's tables (SQLAlchemy Core): the same schema on SQLite and PostgreSQL.

Versions: each master gallery (one per project and species) has an integer ``version`` bumped by every
curation change. Rows carry ``updated_version`` (the version that last touched them) and are
*tombstoned* (``deleted``) rather than removed, so a delta since version V is "every row with
``updated_version > V``". ``galleries.floor`` is the oldest version a delta can start from; compaction
purges tombstones and raises it, and devices older than the floor get a full snapshot.

Identities pushed by devices (their provisional animals) live here as ``status='provisional',
origin='field'`` with id ``<local id>@<device>``; they are not sent to devices until the lab confirms
them or merges them into a distributed identity (``merges`` records each such move).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Table as _Table

SCHEMA_VERSION = 3  # 2: push_chunks.fingerprint; 3: embedding_features, fusion
metadata = MetaData()


def Table(name: str, *cols, **kw) -> _Table:  # noqa: N802 - mirrors sqlalchemy.Table
    return _Table(name, metadata, *cols, **kw)


meta = Table("lab_meta", Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

projects = Table(
    "projects",
    Column("id", String(63), primary_key=True),
    Column("model_id", Text, nullable=False),
    Column("dim", Integer, nullable=False),
    Column("created", String(32), nullable=False),
)

devices = Table(
    "devices",
    Column("id", String(63), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created", String(32), nullable=False),
    Column("revoked_at", String(32)),
    Column("last_seen", String(32)),
)

device_projects = Table(
    "device_projects",
    Column("device_id", String(63), nullable=False),
    Column("project_id", String(63), nullable=False),
    PrimaryKeyConstraint("device_id", "project_id"),
)

galleries = Table(
    "galleries",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", String(63), nullable=False),
    Column("species", String(64), nullable=False),
    Column("version", Integer, nullable=False, default=0),
    Column("floor", Integer, nullable=False, default=0),
    UniqueConstraint("project_id", "species"),
)

identities = Table(
    "identities",
    Column("gallery_id", Integer, nullable=False),
    Column("id", String(200), nullable=False),
    Column("name", Text),
    Column("status", String(16), nullable=False),
    Column("origin", String(16), nullable=False),
    Column("device_id", String(63)),
    Column("local_id", String(128)),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("updated_version", Integer, nullable=False),
    Column("created", String(32), nullable=False),
    PrimaryKeyConstraint("gallery_id", "id"),
)
Index("identities_updated", identities.c.gallery_id, identities.c.updated_version)

embeddings = Table(
    "embeddings",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gallery_id", Integer, nullable=False),
    Column("identity_id", String(200), nullable=False),
    Column("source", Text, nullable=False),
    Column("box", String(100), nullable=False, default=""),
    Column("vector", LargeBinary),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("updated_version", Integer, nullable=False),
)
Index("embeddings_updated", embeddings.c.gallery_id, embeddings.c.updated_version)
Index("embeddings_identity", embeddings.c.gallery_id, embeddings.c.identity_id)

#: schema 3: each embedding's local features (RootSIFT bytes of :mod:`fieldreid.verify.features`), sent with the
#: embedding (a change to them bumps the embedding's ``updated_version``); removed with it (tombstones keep them
#: until compaction, harmlessly)
embedding_features = Table(
    "embedding_features",
    Column("embedding_id", Integer, primary_key=True),
    Column("kind", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
)

#: schema 3: the fitted fusion of cosine and inliers per gallery and model (``fieldreid calibrate --verify``, as
#: JSON); the latest row is sent with the thresholds, in a delta only when its version is newer
fusion = Table(
    "fusion",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gallery_id", Integer, nullable=False),
    Column("model_id", Text, nullable=False),
    Column("data", Text, nullable=False),
    Column("version", Integer, nullable=False),
)

merges = Table(
    "merges",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gallery_id", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("source", String(200), nullable=False),
    Column("target", String(200), nullable=False),
)
Index("merges_gallery", merges.c.gallery_id, merges.c.version)

thresholds = Table(
    "thresholds",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gallery_id", Integer, nullable=False),
    Column("model_id", Text, nullable=False),
    Column("upper", Float, nullable=False),
    Column("lower", Float, nullable=False),
    Column("method", Text, nullable=False),
    Column("version", Integer, nullable=False),
)

changes = Table(
    "changes",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("gallery_id", Integer),
    Column("version", Integer),
    Column("action", String(32), nullable=False),
    Column("who", Text, nullable=False),
    Column("at", String(32), nullable=False),
    Column("details", Text, nullable=False),
)

sightings = Table(
    "sightings",
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", String(63), nullable=False),
    Column("device_id", String(63), nullable=False),
    Column("uid", String(128), nullable=False),
    Column("species", String(64), nullable=False),
    Column("device_identity", String(200)),
    Column("identity_id", String(200)),
    Column("decision", String(16), nullable=False),
    Column("score", Float),
    Column("runner_up", String(200)),
    Column("runner_up_score", Float),
    Column("upper", Float),
    Column("lower", Float),
    Column("threshold_method", Text),
    Column("model_id", Text, nullable=False),
    Column("gallery_version", Integer),
    Column("captured", String(40)),
    Column("camera", String(200)),
    Column("image", Text),
    Column("box", String(100)),
    Column("vector", LargeBinary),
    Column("crop_sha256", String(64)),
    Column("received", String(32), nullable=False),
    UniqueConstraint("device_id", "uid", name="sightings_device_uid"),
)
Index("sightings_identity", sightings.c.project_id, sightings.c.identity_id)

push_chunks = Table(
    "push_chunks",
    Column("device_id", String(63), nullable=False),
    Column("key", String(64), nullable=False),
    Column("received", String(32), nullable=False),
    Column("response", Text, nullable=False),
    # sha256 of what the chunk carried: a reused key with other sightings is refused (NULL: before schema 2)
    Column("fingerprint", String(64)),
    PrimaryKeyConstraint("device_id", "key"),
)
