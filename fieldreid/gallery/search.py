"""Exact cosine search over a gallery, in numpy, with scores aggregated per identity.

Vectors are unit length, so cosine similarity is a dot product: one BLAS matrix product per query batch.
Scores are then aggregated per identity so the top-k lists *animals*, not photos - an animal with 40
photos cannot fill the list and push out one with 2.

Aggregation (``aggregate=``):

* ``max`` (default): an identity's score is its best-matching photo. This is the 1-nearest-neighbour
  rule the re-ID literature evaluates (MiewID, MegaDescriptor), it needs no per-identity count, and
  one good photo of a rarely seen animal is enough to find it. Its bias: an animal with many photos has
  more chances of one lucky high score.
* ``mean-top3``: mean of an identity's 3 best scores (fewer if it has fewer photos). Damps that bias, but
  penalises animals with one good photo and two poor ones. Offered for comparison; not the default.

Memory: the cached matrix is float32 (4·D bytes per embedding) by default, whatever the gallery stores
on disk: BLAS multiplies float32 fast, while numpy has no float16 BLAS and converting float16 chunks per
query costs ~20x the product itself (bench/search_results.json). ``memory_dtype="float16"`` halves the
memory for devices that need it and multiplies in float32 chunks (float32 accumulation); it suits batched
queries, not one crop at a time. A float16 *gallery file* (``Gallery(storage="float16")``) halves disk and
sync size at no search cost. Exact search costs ~2 ms per query at 10^4 embeddings (D=1280, 2 cores) and
~20 ms at 10^5, against ~20-50 ms for embedding one crop on the same CPU: an approximate index would
only pay above ~10^5 embeddings (see the benchmark notes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fieldreid.errors import InputError

AGGREGATES = ("max", "mean-top3")
#: rows multiplied at once when the matrix is float16 (float32 copy of one chunk: chunk × D × 4 bytes)
CHUNK_ROWS = 8192


def group_bounds(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, starts, group_labels): ``labels[order]`` is sorted and group ``g`` starts at ``starts[g]``."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    if len(sorted_labels) == 0:
        return order, np.zeros(0, np.int64), sorted_labels
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    return order, starts, sorted_labels[starts]


def aggregate_scores(scores: np.ndarray, order: np.ndarray, starts: np.ndarray, how: str = "max") -> np.ndarray:
    """Per-identity scores (Q, G) from per-embedding scores (Q, N), groups given by :func:`group_bounds`.

    ``-inf`` entries (e.g. a query excluded from matching itself) are ignored by ``mean-top3`` and give
    ``-inf`` for a group that has nothing else.
    """
    if how not in AGGREGATES:
        raise InputError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape[1] == 0:
        return np.zeros((scores.shape[0], 0), np.float32)
    s = scores[:, order]
    if how == "max":
        return np.maximum.reduceat(s, starts, axis=1)
    ends = np.r_[starts[1:], s.shape[1]]
    out = np.empty((s.shape[0], len(starts)), np.float32)
    for g, (a, b) in enumerate(zip(starts, ends, strict=True)):
        seg = s[:, a:b]
        k = min(3, b - a)
        top = -np.partition(-seg, k - 1, axis=1)[:, :k] if b - a > k else seg
        finite = np.isfinite(top)
        n = finite.sum(axis=1)
        total = np.where(finite, top, 0.0).sum(axis=1)
        out[:, g] = np.where(n > 0, total / np.maximum(n, 1), -np.inf)
    return out


def top_k(agg: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest entries per row, best first (ties: lower index first)."""
    q, g = agg.shape
    k = min(k, g)
    if k <= 0:
        return np.zeros((q, 0), np.int64), np.zeros((q, 0), np.float32)
    if k < g:
        part = np.argpartition(-agg, k - 1, axis=1)[:, :k]
    else:
        part = np.tile(np.arange(g), (q, 1))
    vals = np.take_along_axis(agg, part, axis=1)
    o = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, o, axis=1)
    return idx, np.take_along_axis(agg, idx, axis=1)


@dataclass(frozen=True)
class SearchResult:
    """Top identities for one query, best first, with their aggregated cosine scores."""

    identities: list[str]
    scores: np.ndarray

    @property
    def best(self) -> tuple[str, float] | None:
        return (self.identities[0], float(self.scores[0])) if self.identities else None

    @property
    def runner_up(self) -> tuple[str, float] | None:
        return (self.identities[1], float(self.scores[1])) if len(self.identities) > 1 else None

    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        return [(i, float(s)) for i, s in list(zip(self.identities, self.scores, strict=True))[:k]]


class Searcher:
    """An in-memory copy of a gallery's embeddings, refreshed when the gallery's version changes.

    New embeddings (enrolment, provisional animals, from this or another process) are appended to the
    cached matrix; merges, splits, renames and deletions trigger a full reload.

    >>> searcher = Searcher(gallery)                           # doctest: +SKIP
    >>> [r] = searcher.search(vector[None], k=5, model_id=embedder.model_id)  # doctest: +SKIP
    >>> r.best, r.runner_up                                    # doctest: +SKIP
    """

    def __init__(self, gallery, aggregate: str = "max", memory_dtype: str = "float32") -> None:
        if aggregate not in AGGREGATES:
            raise InputError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if memory_dtype not in ("float32", "float16"):
            raise InputError(f"memory_dtype must be float32 or float16, got {memory_dtype!r}")
        self.gallery = gallery
        self.aggregate = aggregate
        self.memory_dtype = np.dtype(memory_dtype)
        self._versions: tuple[int, int] | None = None
        self._buf = np.zeros((0, 0), np.float32)
        self._n = 0
        self._max_row = 0
        self._codes = np.zeros(0, np.int64)
        self._row_ids = np.zeros(0, np.int64)  # the gallery's embedding id of each cached row
        self._names: list[str] = []
        self._code_of: dict[str, int] = {}
        self._species: dict[str, str] = {}
        self._groups: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.loads = 0  # full reloads so far (tests and benchmarks look at it)

    # ---------------------------------------------------------------- cache
    @property
    def matrix(self) -> np.ndarray:
        return self._buf[: self._n]

    @property
    def matrix_nbytes(self) -> int:
        return int(self.matrix.nbytes)

    @property
    def version(self) -> int:
        """The gallery version the cache reflects (-1 before the first refresh)."""
        return self._versions[0] if self._versions else -1

    @property
    def n_embeddings(self) -> int:
        return self._n

    def refresh(self) -> bool:
        """Bring the cache up to date with the gallery; True if anything was (re)loaded."""
        versions = self.gallery.versions()
        if versions == self._versions:
            return False
        if self._versions is None or versions[1] != self._versions[1]:
            self._reset()
            self.loads += 1
        block = self.gallery.load_vectors(after_id=self._max_row)
        if len(block.row_ids):
            self._append(block.matrix, block.identity_ids, block.row_ids)
            self._max_row = int(block.row_ids[-1])
        self._species = self.gallery.identity_species()
        self._versions = versions
        return True

    def _reset(self) -> None:
        self._buf = np.zeros((0, self.gallery.dim or 0), self.memory_dtype)
        self._n = 0
        self._max_row = 0
        self._codes = np.zeros(0, np.int64)
        self._row_ids = np.zeros(0, np.int64)
        self._names, self._code_of = [], {}
        self._groups = None

    def _append(self, mat: np.ndarray, identity_ids: Sequence[str], row_ids: Sequence[int] | None = None) -> None:
        n_new = mat.shape[0]
        if self._buf.shape[1] != mat.shape[1]:
            self._buf = np.zeros((0, mat.shape[1]), self.memory_dtype)
        if self._n + n_new > self._buf.shape[0]:
            # Grow with headroom so appends (new provisional animals) stay O(1) amortised. np.empty does
            # not touch the spare rows, so they cost address space, not resident memory.
            cap = max(int((self._n + n_new) * 1.25) + 64, int(self._buf.shape[0] * 1.5))
            buf = np.empty((cap, mat.shape[1]), self._buf.dtype)
            buf[: self._n] = self._buf[: self._n]
            self._buf = buf
        self._buf[self._n: self._n + n_new] = mat
        codes = np.empty(n_new, np.int64)
        for i, name in enumerate(identity_ids):
            code = self._code_of.get(name)
            if code is None:
                code = self._code_of[name] = len(self._names)
                self._names.append(name)
            codes[i] = code
        self._codes = np.concatenate([self._codes, codes])
        rows = np.full(n_new, -1, np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
        self._row_ids = np.concatenate([self._row_ids, rows])
        self._n += n_new
        self._groups = None

    # ---------------------------------------------------------------- scoring
    def embedding_scores(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) cosine scores against every cached embedding (float32 accumulation)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        m = self.matrix
        if m.dtype == np.float32:
            return q @ m.T
        out = np.empty((q.shape[0], self._n), np.float32)
        for a in range(0, self._n, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, self._n)
            out[:, a:b] = q @ m[a:b].astype(np.float32).T
        return out

    def identity_scores(self, queries: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Identity ids and (Q, G) aggregated scores."""
        if self._groups is None:
            self._groups = group_bounds(self._codes[: self._n])
        order, starts, group_codes = self._groups
        agg = aggregate_scores(self.embedding_scores(queries), order, starts, self.aggregate)
        return [self._names[c] for c in group_codes], agg

    def search(self, queries: np.ndarray, k: int = 5, species: str | None = None,
               model_id: str | None = None) -> list[SearchResult]:
        """Top-k identities per query row. ``model_id`` (the query embedder's) is checked against the gallery;
        ``species`` restricts the search to identities of that species."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if model_id is not None:
            self.gallery.check_model(model_id, q.shape[1])
        self.refresh()
        if self._n == 0:
            return [SearchResult([], np.zeros(0, np.float32)) for _ in range(q.shape[0])]
        if q.shape[1] != self._buf.shape[1]:
            raise InputError(f"Query vectors have {q.shape[1]} dimensions, the gallery's have {self._buf.shape[1]}.")
        names, agg = self.identity_scores(q)
        if species is not None:
            keep = np.array([self._species.get(n) == species for n in names])
            agg = np.where(keep[None, :], agg, -np.inf)
        idx, vals = top_k(agg, k)
        out = []
        for row_idx, row_vals in zip(idx, vals, strict=True):
            finite = np.isfinite(row_vals)
            out.append(SearchResult([names[i] for i in row_idx[finite]], row_vals[finite].astype(np.float32)))
        return out

    def top_images(self, query: np.ndarray, k: int, species: str | None = None
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The ``k`` most similar gallery *images* of one query: (embedding ids, identity ids, cosines), best
        first (ties: lower row first); ``species`` restricts them to identities of that species. What local
        verification re-scores (:mod:`fieldreid.verify.rerank`)."""
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        self.refresh()
        if self._n == 0 or k < 1:
            return np.zeros(0, np.int64), [], np.zeros(0, np.float32)
        s = self.embedding_scores(q)[0]
        if species is not None:
            ok = np.array([self._species.get(n) == species for n in self._names])
            s = np.where(ok[self._codes[: self._n]], s, -np.inf)
        top = np.argsort(-s, kind="stable")[:k]
        top = top[np.isfinite(s[top])]
        return self._row_ids[: self._n][top], [self._names[c] for c in self._codes[top]], s[top].astype(np.float32)

    def species_of(self, identity_id: str) -> str | None:
        return self._species.get(identity_id)
