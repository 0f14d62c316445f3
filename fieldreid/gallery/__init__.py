"""Identity galleries: SQLite storage, numpy search, open-set decisions, enrolment.

>>> from fieldreid.gallery import Gallery, Identifier
>>> with Gallery("nyala.db") as g:                                   # doctest: +SKIP
...     decisions = Identifier(g).identify(vectors, embedder.model_id, sources=paths)

Importing this package needs only numpy and the standard library (sqlite3); the enrolment helpers
import the embedder runtime lazily.
"""

from fieldreid.gallery.enroll import EnrollReport, Item, enroll, load_source, read_metadata, reembed
from fieldreid.gallery.openset import (
    DEFAULT_LOWER,
    DEFAULT_UPPER,
    Decision,
    Identifier,
    Thresholds,
    thresholds_for,
)
from fieldreid.gallery.search import Searcher, SearchResult
from fieldreid.gallery.store import (
    SCHEMA_VERSION,
    Change,
    EmbeddingInfo,
    Gallery,
    GalleryError,
    Identity,
    IdentityNotFoundError,
    ModelMismatchError,
    StoredThresholds,
)

__all__ = [
    "DEFAULT_LOWER",
    "DEFAULT_UPPER",
    "SCHEMA_VERSION",
    "Change",
    "Decision",
    "EmbeddingInfo",
    "EnrollReport",
    "Gallery",
    "GalleryError",
    "Identifier",
    "Identity",
    "IdentityNotFoundError",
    "Item",
    "ModelMismatchError",
    "SearchResult",
    "Searcher",
    "StoredThresholds",
    "Thresholds",
    "enroll",
    "load_source",
    "read_metadata",
    "reembed",
    "thresholds_for",
]
