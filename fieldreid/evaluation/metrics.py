"""Re-identification metrics you can trust, in numpy only.

Two protocols, both on one set of embeddings with identity labels:

**One-vs-all** (MiewID, Otarashvili et al. 2024, §3.4): every image is a query against *all other*
images of the set, never itself. Per query:

* top-k: the rank of the first correct *identity* in the list of identities ordered by their aggregated
  score (max over the identity's other images, as the gallery search does). Ties count against the
  query (a wrong identity with the same score ranks first), so a degenerate embedder cannot score well.
* average precision over the *image-level* ranking of all other images (positives: same identity), ties
  again pessimistic; mAP is its mean.

Queries whose identity has no other image cannot be answered and are left out (their number is reported).

**Open set** (AnimalCLEF 2025): identities are split, with a seed, into *known* ones, of which a
fraction of each identity's images is enrolled in a gallery and the rest are queries, and *unknown* ones,
all of whose images are queries. Each query gets the best gallery identity and its score; with thresholds
``lower <= upper``, score >= upper → that identity, score < lower → "new", in between → uncertain.

* BAKS, balanced accuracy on known samples: for each known identity, the fraction of its queries given
  exactly that identity; averaged over identities (the competition's metric: ``BAKS`` in the
  wildlife-datasets / Kaggle AnimalCLEF 2025 scoring code groups by true identity and averages).
* BAUS, balanced accuracy on unknown samples: for each unknown identity, the fraction of its queries
  called new; averaged over identities.
* score: the geometric mean sqrt(BAKS · BAUS), so neither "everything is new" nor "nothing is new" scores.

An *uncertain* answer is neither the right identity nor "new", so it counts as wrong in both (the
competition has no uncertain answer; with ``lower == upper`` there is none). The best single threshold is
found by an exact sweep over every distinct query score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fieldreid.errors import InputError
from fieldreid.gallery.search import aggregate_scores, group_bounds

NEW = "new"
CHUNK = 1024


def _prepare(embeddings: np.ndarray, labels: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise InputError(f"embeddings must have shape (N, D), got {emb.shape}")
    labels_arr = np.asarray(labels, dtype=object)
    if labels_arr.shape != (emb.shape[0],):
        raise InputError(f"need one label per embedding ({emb.shape[0]} embeddings, {labels_arr.shape} labels)")
    if not np.all(np.isfinite(emb)):
        raise InputError("embeddings contain NaN or infinity")
    names, codes = np.unique(labels_arr.astype(str), return_inverse=True)
    return emb, codes.astype(np.int64), names


# --------------------------------------------------------------------------------------- one-vs-all
def one_vs_all(embeddings: np.ndarray, labels: Sequence, ks: Sequence[int] = (1, 5, 10),
               aggregate: str = "max") -> dict:
    """Top-k identity accuracy and image-level mAP, each image a query against all the others.

    >>> e = np.eye(3, dtype=np.float32)[[0, 0, 1, 1]]
    >>> one_vs_all(e, ["a", "a", "b", "b"])["top1"]
    1.0
    """
    emb, codes, names = _prepare(embeddings, labels)
    n = emb.shape[0]
    order, starts, group_codes = group_bounds(codes)
    group_of_code = np.empty(len(names), np.int64)
    group_of_code[group_codes] = np.arange(len(group_codes))
    counts = np.bincount(codes, minlength=len(names))
    answerable = counts[codes] >= 2
    ranks = np.zeros(n, np.int64)
    aps = np.zeros(n, np.float64)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        s = emb[a:b] @ emb.T
        rows = np.arange(b - a)
        s[rows, a + rows] = -np.inf  # never match a query with itself
        agg = aggregate_scores(s, order, starts, aggregate)
        true = agg[rows, group_of_code[codes[a:b]]]
        ranks[a:b] = (agg >= true[:, None]).sum(axis=1)
        for r in rows:
            if answerable[a + r]:
                aps[a + r] = _average_precision(s[r], codes == codes[a + r], a + r)
    q = answerable
    out: dict = {"n_images": n, "n_identities": int(len(names)), "n_queries": int(q.sum()),
                 "n_excluded_single_image": int((~q).sum()), "aggregate": aggregate}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks[q] <= k)) if q.any() else float("nan")
    out["mAP"] = float(np.mean(aps[q])) if q.any() else float("nan")
    return out


def _average_precision(scores: np.ndarray, positive: np.ndarray, self_index: int) -> float:
    """AP of one query over the other images; tied scores rank negatives first (pessimistic)."""
    keep = np.ones(len(scores), bool)
    keep[self_index] = False
    s, pos = scores[keep], positive[keep]
    s_sorted = np.sort(s)
    p_sorted = np.sort(s[pos])
    v = s[pos]
    rank = len(s) - np.searchsorted(s_sorted, v, side="left")       # items with score >= v
    hits = len(p_sorted) - np.searchsorted(p_sorted, v, side="left")  # positives with score >= v
    return float(np.mean(hits / rank))


# --------------------------------------------------------------------------------------- open set
@dataclass(frozen=True)
class OpenSetSplit:
    """Indices into the evaluated set: gallery images, queries of known and of unknown identities."""

    gallery: np.ndarray
    known_queries: np.ndarray
    unknown_queries: np.ndarray
    unknown_identities: tuple[str, ...]
    seed: int


def open_set_split(labels: Sequence, unknown_fraction: float = 0.3, enrol_fraction: float = 0.5,
                   seed: int = 0) -> OpenSetSplit:
    """Seeded split of identities into known and unknown (see the module docstring).

    Of a known identity with ``m`` images, ``max(1, round(enrol_fraction * m))`` are enrolled but at least
    one is kept as a query when ``m >= 2``. At least one identity is known and, with two or more
    identities, at least one is unknown.
    """
    if not 0 <= unknown_fraction <= 1 or not 0 < enrol_fraction < 1:
        raise InputError("unknown_fraction must be in [0, 1] and enrol_fraction in (0, 1).")
    lab = np.asarray(labels, dtype=object).astype(str)
    ids = np.unique(lab)
    if len(ids) < 2:
        raise InputError(f"An open-set split needs at least 2 identities, got {len(ids)}.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ids))
    n_unknown = min(max(1, int(round(unknown_fraction * len(ids)))), len(ids) - 1) if unknown_fraction > 0 else 0
    unknown = set(ids[perm[:n_unknown]])
    gallery, known_q, unknown_q = [], [], []
    for ident in ids:
        idx = np.flatnonzero(lab == ident)
        if ident in unknown:
            unknown_q.extend(idx)
            continue
        idx = idx[rng.permutation(len(idx))]
        m = len(idx)
        n_enrol = max(1, int(round(enrol_fraction * m)))
        if m >= 2:
            n_enrol = min(n_enrol, m - 1)
        gallery.extend(idx[:n_enrol])
        known_q.extend(idx[n_enrol:])
    as_idx = lambda v: np.sort(np.asarray(v, np.int64))  # noqa: E731
    return OpenSetSplit(as_idx(gallery), as_idx(known_q), as_idx(unknown_q), tuple(sorted(unknown)), seed)


def best_matches(gallery_emb: np.ndarray, gallery_labels: Sequence, query_emb: np.ndarray,
                 aggregate: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Best gallery identity (object array) and its aggregated score for each query."""
    g, codes, names = _prepare(gallery_emb, gallery_labels)
    q = np.asarray(query_emb, dtype=np.float32).reshape(-1, g.shape[1])
    order, starts, group_codes = group_bounds(codes)
    pred = np.empty(q.shape[0], dtype=object)
    score = np.empty(q.shape[0], np.float64)
    for a in range(0, q.shape[0], CHUNK):
        b = min(a + CHUNK, q.shape[0])
        agg = aggregate_scores(q[a:b] @ g.T, order, starts, aggregate)
        j = np.argmax(agg, axis=1)
        pred[a:b] = names[group_codes[j]]
        score[a:b] = agg[np.arange(b - a), j]
    return pred, score


@dataclass(frozen=True)
class _Queries:
    """Per-query facts for threshold sweeps: score, whether top-1 is right, weight for balanced means."""

    known_score: np.ndarray
    known_correct: np.ndarray
    known_weight: np.ndarray  # 1 / (n_known_identities * queries of that identity)
    unknown_score: np.ndarray
    unknown_weight: np.ndarray


def _balanced_weights(labels: np.ndarray) -> np.ndarray:
    if len(labels) == 0:
        return np.zeros(0)
    _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inv])


def _queries(pred: np.ndarray, score: np.ndarray, true: np.ndarray, unknown: np.ndarray) -> _Queries:
    k, u = ~unknown, unknown
    return _Queries(score[k], pred[k] == true[k], _balanced_weights(true[k]), score[u], _balanced_weights(true[u]))


def _pool(parts: Sequence[_Queries]) -> _Queries:
    r = len(parts)
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
    return _Queries(cat("known_score"), cat("known_correct").astype(bool), cat("known_weight") / r,
                    cat("unknown_score"), cat("unknown_weight") / r)


def _metrics_at(q: _Queries, lower: float, upper: float) -> dict:
    known_ok = q.known_correct & (q.known_score >= upper)
    baks = float(np.sum(q.known_weight * known_ok)) if len(q.known_score) else float("nan")
    baus = float(np.sum(q.unknown_weight * (q.unknown_score < lower))) if len(q.unknown_score) else float("nan")
    all_scores = np.r_[q.known_score, q.unknown_score]
    uncertain = float(np.mean((all_scores >= lower) & (all_scores < upper))) if len(all_scores) else 0.0
    far = float(np.sum(q.unknown_weight * (q.unknown_score >= upper))) if len(q.unknown_score) else float("nan")
    # weights are 1/(identities * images): round away the last-bit noise of summing them
    baks, baus, far = (round(v, 12) for v in (baks, baus, far))
    return {"lower": float(lower), "upper": float(upper), "BAKS": baks, "BAUS": baus,
            "geometric_mean": round(float(np.sqrt(baks * baus)), 12), "uncertain_rate": uncertain,
            "unknown_called_known_rate": far}


def _candidates(q: _Queries) -> np.ndarray:
    u = np.unique(np.r_[q.known_score, q.unknown_score])
    if len(u) == 0:
        return np.array([0.0])
    return np.r_[u[0] - 1e-6, (u[1:] + u[:-1]) / 2, u[-1] + 1e-6]


def _sweep(q: _Queries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, BAKS, BAUS) at every threshold that changes a decision (lower == upper)."""
    t = _candidates(q)
    ko = np.argsort(q.known_score)
    ks, kw = q.known_score[ko], (q.known_weight * q.known_correct)[ko]
    suffix = np.r_[np.cumsum(kw[::-1])[::-1], 0.0]
    baks = suffix[np.searchsorted(ks, t, side="left")]  # known queries with score >= t and right
    uo = np.argsort(q.unknown_score)
    us, uw = q.unknown_score[uo], q.unknown_weight[uo]
    prefix = np.r_[0.0, np.cumsum(uw)]
    baus = prefix[np.searchsorted(us, t, side="left")]  # unknown queries with score < t
    return t, baks, baus


def _best_threshold(q: _Queries) -> float:
    t, baks, baus = _sweep(q)
    gm = np.sqrt(baks * baus)
    best = np.flatnonzero(gm >= gm.max() - 1e-12)
    return float(t[best[len(best) // 2]])  # middle of the best plateau: furthest from the edges


def open_set_metrics(pred: Sequence, scores: Sequence[float], true_labels: Sequence, unknown: Sequence[bool],
                     lower: float, upper: float | None = None) -> dict:
    """BAKS, BAUS and geometric mean from per-query best identity, best score and truth.

    ``unknown[i]`` says query ``i`` shows an animal that is not in the gallery.
    """
    q = _queries_from(pred, scores, true_labels, unknown)
    return _metrics_at(q, lower, lower if upper is None else upper)


def best_single_threshold(pred: Sequence, scores: Sequence[float], true_labels: Sequence,
                          unknown: Sequence[bool]) -> dict:
    """Metrics at the threshold maximising sqrt(BAKS · BAUS) (exact sweep; middle of the best plateau)."""
    q = _queries_from(pred, scores, true_labels, unknown)
    t = _best_threshold(q)
    return _metrics_at(q, t, t)


def _queries_from(pred, scores, true_labels, unknown) -> _Queries:
    pred = np.asarray(pred, dtype=object).astype(str)
    true = np.asarray(true_labels, dtype=object).astype(str)
    score = np.asarray(scores, dtype=np.float64)
    unk = np.asarray(unknown, dtype=bool)
    if not (pred.shape == true.shape == score.shape == unk.shape) or pred.ndim != 1:
        raise InputError("pred, scores, true_labels and unknown need one entry per query.")
    return _queries(pred, score, true, unk)


def open_set(embeddings: np.ndarray, labels: Sequence, lower: float | None = None, upper: float | None = None,
             unknown_fraction: float = 0.3, enrol_fraction: float = 0.5, seed: int = 0,
             aggregate: str = "max") -> dict:
    """BAKS, BAUS and their geometric mean at the given thresholds and at the best single threshold."""
    emb, _, _ = _prepare(embeddings, labels)
    lab = np.asarray(labels, dtype=object).astype(str)
    split = open_set_split(lab, unknown_fraction, enrol_fraction, seed)
    qidx = np.r_[split.known_queries, split.unknown_queries]
    pred, score = best_matches(emb[split.gallery], lab[split.gallery], emb[qidx], aggregate)
    unknown = np.r_[np.zeros(len(split.known_queries), bool), np.ones(len(split.unknown_queries), bool)]
    q = _queries(pred, score, lab[qidx], unknown)
    out: dict = {
        "seed": seed, "unknown_fraction": unknown_fraction, "enrol_fraction": enrol_fraction,
        "n_gallery_images": int(len(split.gallery)), "n_known_queries": int(len(split.known_queries)),
        "n_unknown_queries": int(len(split.unknown_queries)),
        "n_known_identities": int(len(np.unique(lab)) - len(split.unknown_identities)),
        "n_unknown_identities": len(split.unknown_identities),
        "closed_set_top1": float(np.mean(q.known_correct)) if len(q.known_correct) else float("nan"),
    }
    if lower is not None or upper is not None:
        lo = lower if lower is not None else upper
        up = upper if upper is not None else lower
        out["at_thresholds"] = _metrics_at(q, lo, up)
    t = _best_threshold(q)
    out["best"] = _metrics_at(q, t, t)
    return out


# --------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class Calibration:
    """Chosen thresholds and what they achieve on the calibration queries."""

    lower: float
    upper: float
    method: str
    best_single_threshold: float
    BAKS: float
    BAUS: float
    geometric_mean: float
    uncertain_rate: float
    unknown_called_known_rate: float
    target_far: float | None
    n_identities: int
    n_queries: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(embeddings: np.ndarray, labels: Sequence, target_far: float | None = None,
              unknown_fraction: float = 0.3, enrol_fraction: float = 0.5, seed: int = 0, repeats: int = 5,
              aggregate: str = "max", gallery=None, species: str = "*", model_id: str | None = None) -> Calibration:
    """Choose open-set thresholds (lower, upper) from labelled embeddings, optionally storing them.

    The open-set protocol is simulated ``repeats`` times (seeds ``seed, seed+1, ...``) and the queries
    pooled, so the thresholds do not hinge on which identities one split happened to hide.

    * ``target_far=None``: ``lower = upper =`` the single threshold that maximises sqrt(BAKS · BAUS).
    * ``target_far=f``: ``upper`` is the lowest threshold at which at most ``f`` of unknown animals
      (balanced per identity) would be called known; ``lower`` is the geometric-mean threshold if that is
      lower, else ``upper``. Scores in between are *uncertain* and go to a person, instead of a new
      animal being silently merged into a known one.

    With ``gallery`` (and ``model_id``), the result is stored for ``species`` (``'*'`` = all species).
    """
    emb, _, _ = _prepare(embeddings, labels)
    lab = np.asarray(labels, dtype=object).astype(str)
    if target_far is not None and not 0 <= target_far <= 1:
        raise InputError(f"target_far must be between 0 and 1, got {target_far}")
    n_ids = len(np.unique(lab))
    if n_ids < 3:
        raise InputError(f"Calibration needs labelled images of at least 3 animals, got {n_ids}.")
    parts = []
    for r in range(max(1, repeats)):
        split = open_set_split(lab, unknown_fraction, enrol_fraction, seed + r)
        qidx = np.r_[split.known_queries, split.unknown_queries]
        pred, score = best_matches(emb[split.gallery], lab[split.gallery], emb[qidx], aggregate)
        unknown = np.r_[np.zeros(len(split.known_queries), bool), np.ones(len(split.unknown_queries), bool)]
        parts.append(_queries(pred, score, lab[qidx], unknown))
    q = _pool(parts)
    t_gm = _best_threshold(q)
    if target_far is None:
        lower = upper = t_gm
        method = f"max-geometric-mean (open-set simulation, {len(parts)} splits)"
    else:
        t, _, baus = _sweep(q)
        far = 1.0 - baus  # unknown queries scoring >= t, balanced per identity
        ok = np.flatnonzero(far <= target_far + 1e-12)
        upper = float(t[ok[0]]) if len(ok) else float(t[-1])
        lower = min(t_gm, upper)
        method = f"unknown-called-known<={target_far:g} (open-set simulation, {len(parts)} splits)"
    m = _metrics_at(q, lower, upper)
    cal = Calibration(lower=float(lower), upper=float(upper), method=method, best_single_threshold=t_gm,
                      BAKS=m["BAKS"], BAUS=m["BAUS"], geometric_mean=m["geometric_mean"],
                      uncertain_rate=m["uncertain_rate"], unknown_called_known_rate=m["unknown_called_known_rate"],
                      target_far=target_far, n_identities=n_ids,
                      n_queries=int(len(q.known_score) + len(q.unknown_score)) // len(parts), repeats=len(parts))
    if gallery is not None:
        if not model_id:
            raise InputError("Storing thresholds needs the embedder's model_id.")
        gallery.set_thresholds(species, model_id, cal.upper, cal.lower, method)
    return cal


def evaluate(embeddings: np.ndarray, labels: Sequence, ks: Sequence[int] = (1, 5, 10),
             lower: float | None = None, upper: float | None = None, unknown_fraction: float = 0.3,
             enrol_fraction: float = 0.5, seed: int = 0, aggregate: str = "max") -> dict:
    """Both protocols on one set of embeddings."""
    return {"one_vs_all": one_vs_all(embeddings, labels, ks, aggregate),
            "open_set": open_set(embeddings, labels, lower, upper, unknown_fraction, enrol_fraction, seed,
                                 aggregate)}
