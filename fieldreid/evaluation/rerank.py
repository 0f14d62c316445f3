"""Does local-feature verification pay? Re-ranking the global top-K by the fused probability, measured.

Protocols (as :mod:`fieldreid.evaluation.metrics`, so the numbers compare):

* **one-vs-all top-1**: each query's K most similar other images (global cosine) are re-scored by the fused
  probability (:mod:`fieldreid.verify.fuse`: cosine + RANSAC inliers); the answer is the identity of the
  most probable candidate (max over its candidate images). Before = the nearest image's identity.
* **open set**: the :func:`~fieldreid.evaluation.metrics.open_set_split` of the tested identities; each
  query's best gallery identity and score are the cosine ones (before) or the fused-probability ones
  (after, the gallery's top-K re-scored). The threshold is *calibrated* on the fit identities (open-set
  simulation there, maximising sqrt(BAKS·BAUS)), never on the tested ones; the best single threshold on
  the tested ones is reported beside it as the ceiling.

The fusion is fitted on (query, top-K candidate) pairs of identities that are not tested: a separate split
(``folds`` with the fit rows), or, on a set with no such split, two folds of identities, each tested with the
fusion fitted on the other (cross-fitting; results pooled over both). Pairs are matched once and cached.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fieldreid.errors import InputError
from fieldreid.evaluation.metrics import _best_threshold, _metrics_at, _pool, _queries, open_set_split
from fieldreid.verify.features import LocalFeatures
from fieldreid.verify.fuse import VERIFY_K, Fusion, fit_fusion, fit_ranked_fusion, pays
from fieldreid.verify.match import METHOD, RATIO, THRESHOLD_PX, match_many


class PairScorer:
    """Inlier counts of (query image, candidate image) pairs, matched once each."""

    def __init__(self, features: Sequence[LocalFeatures], ratio: float = RATIO, method: str = METHOD,
                 threshold: float = THRESHOLD_PX) -> None:
        self.features = list(features)
        self.ratio, self.method, self.threshold = ratio, method, threshold
        self.cache: dict[tuple[int, int], int] = {}
        self.seconds = 0.0
        self.matched = 0

    def inliers(self, q: int, cands: np.ndarray) -> np.ndarray:
        todo = [int(c) for c in cands if (int(q), int(c)) not in self.cache]
        if todo:
            t = time.perf_counter()
            found = match_many(self.features[q], [self.features[c] for c in todo], self.ratio, self.method,
                               self.threshold)
            self.seconds += time.perf_counter() - t
            self.matched += len(todo)
            self.cache.update({(int(q), c): m.n_inliers for c, m in zip(todo, found, strict=True)})
        return np.array([self.cache[(int(q), int(c))] for c in cands], np.float64)


@dataclass(frozen=True)
class Candidates:
    """Per query (rows): the K candidate image indices, their cosines and inlier counts."""

    queries: np.ndarray
    index: np.ndarray
    cos: np.ndarray
    inliers: np.ndarray


def top_k_cosines(emb: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int, chunk: int = 256
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's top-``k`` images of ``pool`` by cosine, never itself (ties: pool order): (queries that have
    ``k`` candidates, their candidate indices, their cosines); ``k`` shrinks to the pool size less one."""
    queries, pool = np.asarray(queries, np.int64), np.asarray(pool, np.int64)
    kk = min(k, len(pool) - 1 if len(pool) > 1 else len(pool))  # the query itself may be in the pool
    idx = np.zeros((len(queries), kk), np.int64)
    cos = np.zeros((len(queries), kk))
    for a in range(0, len(queries), chunk):
        q = queries[a:a + chunk]
        s = (emb[q] @ emb[pool].T).astype(np.float64)
        s[q[:, None] == pool[None, :]] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :kk]
        idx[a:a + chunk], cos[a:a + chunk] = pool[top], np.take_along_axis(s, top, axis=1)
    ok = np.isfinite(cos).all(axis=1)  # a pool of one (the query itself) leaves no candidate
    return queries[ok], idx[ok], cos[ok]


def candidates(emb: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int, scorer: PairScorer) -> Candidates:
    """Each query's top-``k`` images of ``pool`` by cosine (never itself), with their inlier counts."""
    queries, idx, cos = top_k_cosines(emb, queries, pool, k)
    inl = np.zeros(cos.shape)
    for r, q in enumerate(queries):
        inl[r] = scorer.inliers(q, idx[r])
    return Candidates(queries, idx, cos, inl)


def _fit(c: Candidates, labels: np.ndarray, k: int, kind: str) -> Fusion:
    same = labels[c.index] == labels[c.queries][:, None]
    return fit_ranked_fusion(c.cos, c.inliers, same, feature_kind=kind, k=k)


def _answers(c: Candidates, labels: np.ndarray, fusion: Fusion | None) -> tuple[np.ndarray, np.ndarray]:
    """Best identity and its score per query: cosine (fusion None) or fused probability."""
    if fusion is None:
        score = c.cos
    else:  # below the fusion's floor the product matches nothing: zero inliers, as it scores them
        matched = np.array([fusion.verifies(m) for m in c.cos.max(axis=1, initial=-1.0)], bool)
        inl = np.where(matched[:, None], c.inliers, 0.0)
        score = fusion.probability(c.cos.ravel(), inl.ravel()).reshape(c.cos.shape)
    j = np.argmax(score, axis=1)
    rows = np.arange(len(j))
    return labels[c.index[rows, j]], score[rows, j]


def _sample(idx: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is None or len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))


def _answerable(labels: np.ndarray, queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Queries whose identity has another image in the pool."""
    in_pool = np.zeros(len(labels), bool)
    in_pool[pool] = True
    names, counts = np.unique(labels[pool], return_counts=True)
    count = dict(zip(names.tolist(), counts.tolist(), strict=True))
    return np.array([count.get(labels[q], 0) - in_pool[q] >= 1 for q in queries], bool)


def _open_set_scores(emb, labels, ids: np.ndarray, k: int, scorer: PairScorer, fusion: Fusion, seed: int,
                     unknown_fraction: float, enrol_fraction: float, max_queries: int | None):
    """Open-set queries of the identities ``ids`` (indices): before/after answers as metrics' query facts."""
    split = open_set_split(labels[ids], unknown_fraction, enrol_fraction, seed)
    gal = ids[split.gallery]
    kq, uq = ids[split.known_queries], ids[split.unknown_queries]
    kq, uq = _sample(kq, max_queries and max_queries // 2, seed), _sample(uq, max_queries and max_queries // 2, seed)
    q = np.r_[kq, uq]
    unknown = np.r_[np.zeros(len(kq), bool), np.ones(len(uq), bool)]
    c = candidates(emb, q, gal, k, scorer)
    out = {}
    for name, f in (("global", None), ("fused", fusion)):
        pred, score = _answers(c, labels, f)
        out[name] = _queries(pred.astype(str), score, labels[q].astype(str), unknown)
    return out


def evaluate_fold(emb: np.ndarray, labels: np.ndarray, scorer: PairScorer, fit_ids: np.ndarray,
                  test_ids: np.ndarray, test_pool: np.ndarray, k: int, seed: int = 0,
                  unknown_fraction: float = 0.3, enrol_fraction: float = 0.5,
                  max_fit_queries: int | None = 400) -> dict:
    """Fit on ``fit_ids`` (image indices), test one-vs-all on ``test_ids`` against ``test_pool`` and open set
    within ``test_ids``. Returns raw per-query facts for pooling (see :func:`verify_eval`)."""
    kind = scorer.features[int(test_ids[0])].kind
    fq = _sample(fit_ids, max_fit_queries, seed)
    fit_c = candidates(emb, fq, fit_ids, k, scorer)
    fusion = _fit(fit_c, labels, k, kind)
    # thresholds calibrated on the fit identities (open-set simulation there)
    fit_os = _open_set_scores(emb, labels, fit_ids, k, scorer, fusion, seed, unknown_fraction, enrol_fraction,
                              max_fit_queries)
    thresholds = {name: _best_threshold(q) for name, q in fit_os.items()}
    # one-vs-all on the tested identities
    tq = test_ids[_answerable(labels, test_ids, test_pool)]
    n_before = scorer.matched
    t0 = scorer.seconds
    c = candidates(emb, tq, test_pool, k, scorer)
    truth = labels[c.queries]
    before, _ = _answers(c, labels, None)
    after, _ = _answers(c, labels, fusion)
    in_top_k = (labels[c.index] == truth[:, None]).any(axis=1)
    test_os = _open_set_scores(emb, labels, test_ids, k, scorer, fusion, seed, unknown_fraction, enrol_fraction,
                               None)
    return {"fusion": fusion, "thresholds": thresholds, "correct_before": before == truth,
            "correct_after": after == truth, "true_in_top_k": in_top_k, "open_set": test_os,
            "match_s": scorer.seconds - t0, "pairs_matched": scorer.matched - n_before}


def identity_folds(labels: np.ndarray, n_folds: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Image indices of ``n_folds`` disjoint groups of identities (seeded)."""
    ids = np.unique(labels.astype(str))
    if len(ids) < 2 * n_folds:
        raise InputError(f"Cross-fitting needs at least {2 * n_folds} identities, got {len(ids)}.")
    perm = np.random.default_rng(seed).permutation(len(ids))
    groups = [set(ids[perm[f::n_folds]]) for f in range(n_folds)]
    lab = labels.astype(str)
    return [np.flatnonzero([x in g for x in lab]) for g in groups]


def verify_eval(emb: np.ndarray, labels: Sequence, features: Sequence[LocalFeatures],
                ks: Sequence[int] = (VERIFY_K, VERIFY_K // 2), fit_mask: np.ndarray | None = None, seed: int = 0,
                unknown_fraction: float = 0.3, enrol_fraction: float = 0.5, max_fit_queries: int | None = 400, scorer: PairScorer | None = None,
                timing_queries: int = 30) -> dict:
    """Top-1 and open-set GM before/after re-ranking the top-K by the fused probability, per K.

    ``fit_mask`` marks images of identities used only to fit the fusion and calibrate thresholds (they must
    not share identities with the rest, which are tested); without it, two identity folds cross-fit.
    """
    emb = np.asarray(emb, np.float32)
    lab = np.asarray(labels, dtype=object).astype(str)
    if not (len(emb) == len(lab) == len(features)):
        raise InputError("Need one embedding, label and feature set per image.")
    scorer = scorer or PairScorer(features)
    if fit_mask is not None:
        fit_mask = np.asarray(fit_mask, bool)
        shared = set(lab[fit_mask]) & set(lab[~fit_mask])
        if shared:
            raise InputError(f"The fit images share {len(shared)} identities with the tested ones (e.g. "
                             f"{sorted(shared)[0]}); fit on animals that are not tested.")
        fit, test = np.flatnonzero(fit_mask), np.flatnonzero(~fit_mask)
        folds = [(fit, test, test)]
        protocol = "fit on separate identities"
    else:
        a, b = identity_folds(lab, 2, seed)
        everyone = np.arange(len(lab))
        folds = [(a, b, everyone), (b, a, everyone)]
        protocol = "2-fold identity cross-fit (each fold tested with the fusion fitted on the other)"
    result: dict = {"protocol": protocol, "method": scorer.method, "ratio": scorer.ratio,
                    "ransac_threshold_px": scorer.threshold, "per_k": {}}
    for k in sorted(ks, reverse=True):  # larger K first: smaller K reuses its matches
        parts = [evaluate_fold(emb, lab, scorer, f, t, p, k, seed, unknown_fraction, enrol_fraction,
                               max_fit_queries) for f, t, p in folds]
        cat = lambda key, parts=parts: np.concatenate([p[key] for p in parts])  # noqa: E731
        before, after = float(np.mean(cat("correct_before"))), float(np.mean(cat("correct_after")))
        os_out = {}
        for name in ("global", "fused"):
            at_cal = [_metrics_at(p["open_set"][name], p["thresholds"][name], p["thresholds"][name]) for p in parts]
            pooled = _pool([p["open_set"][name] for p in parts])
            t_best = _best_threshold(pooled)
            os_out[name] = {"calibrated_thresholds": [p["thresholds"][name] for p in parts],
                            "GM_at_calibrated": float(np.mean([m["geometric_mean"] for m in at_cal])),
                            "BAKS_at_calibrated": float(np.mean([m["BAKS"] for m in at_cal])),
                            "BAUS_at_calibrated": float(np.mean([m["BAUS"] for m in at_cal])),
                            "GM_best_threshold": _metrics_at(pooled, t_best, t_best)["geometric_mean"]}
        result["per_k"][str(k)] = {
            "n_queries": int(len(cat("correct_before"))), "top1_before": before, "top1_after": after,
            "true_identity_in_top_k": float(np.mean(cat("true_in_top_k"))),
            "pays": pays(before, after), "open_set": os_out,
            "fusion": [p["fusion"].to_dict() for p in parts],
            "ms_per_query": _time_queries(emb, lab, features, scorer, k, folds[0][1], folds[0][2], timing_queries),
        }
    result["pairs_matched"] = scorer.matched
    return result


def _time_queries(emb, lab, features, scorer: PairScorer, k: int, test_ids, pool, n: int) -> float:
    """Verification time per query at ``k`` (matching + RANSAC of its top-k, nothing cached)."""
    fresh = PairScorer(features, scorer.ratio, scorer.method, scorer.threshold)
    q = test_ids[:n]
    t = time.perf_counter()
    candidates(emb, q, pool, k, fresh)
    return 1e3 * (time.perf_counter() - t) / max(1, len(q))


def calibrate_fusion(emb: np.ndarray, labels: Sequence, features: Sequence[LocalFeatures], k: int = VERIFY_K,
                     seed: int = 0, unknown_fraction: float = 0.3, enrol_fraction: float = 0.5,
                     max_fit_queries: int | None = 400, repeats: int = 5) -> tuple[Fusion, float]:
    """The fusion a gallery stores for one species: fitted on all these (labelled, calibration) animals'
    top-``k`` pairs, with ``pays`` decided by 2-fold identity cross-fitting on them (held-out top-1 gain),
    and the open-set threshold on the fused probability chosen by open-set simulation (max GM), pooled over
    ``repeats`` simulations (seeds ``seed ..``) as the cosine thresholds are: on a lab's few photos one
    simulation is noise (zebra enrolment of bench_e2e, 26 animals: 0.17, 0.49, 0.76, 0.81, 0.61 for seeds
    0-4; pooled 0.72). Pairs are matched once for all simulations."""
    emb = np.asarray(emb, np.float32)
    lab = np.asarray(labels, dtype=object).astype(str)
    scorer = PairScorer(features)
    held_out = verify_eval(emb, lab, features, ks=(k,), seed=seed, unknown_fraction=unknown_fraction,
                           enrol_fraction=enrol_fraction, max_fit_queries=max_fit_queries, scorer=scorer,
                           timing_queries=0)["per_k"][str(k)]
    everyone = np.arange(len(lab))
    fusion = _fit(candidates(emb, _sample(everyone, max_fit_queries, seed), everyone, k, scorer), lab, k,
                  scorer.features[0].kind)
    sims = [_open_set_scores(emb, lab, everyone, k, scorer, fusion, s, unknown_fraction, enrol_fraction,
                             max_fit_queries)["fused"] for s in range(seed, seed + max(1, repeats))]
    threshold = _best_threshold(_pool(sims))
    evidence = {"top1_without": held_out["top1_before"], "top1_with": held_out["top1_after"],
                "gm_without": held_out["open_set"]["global"]["GM_at_calibrated"],
                "gm_with": held_out["open_set"]["fused"]["GM_at_calibrated"], "threshold": threshold,
                "n_identities": int(len(np.unique(lab))), "protocol": "2-fold identity cross-fit",
                "threshold_simulations": max(1, repeats)}
    return Fusion(fusion.coef, True, fusion.feature_kind, k, fusion.n_pairs, fusion.n_positive,
                  held_out["pays"], evidence, floor=fusion.floor, fit=fusion.fit), threshold


def _open_set_best(emb: np.ndarray, lab: np.ndarray, ids: np.ndarray, unknown_fraction: float,
                   enrol_fraction: float, seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Open-set simulations of the images ``ids`` (one per seed, as threshold calibration runs them): each
    query's best gallery cosine and whether that candidate is the query's animal (never, for an unknown one)."""
    cos, right = [], []
    for s in seeds:
        split = open_set_split(lab[ids], unknown_fraction, enrol_fraction, s)
        q = ids[np.r_[split.known_queries, split.unknown_queries].astype(np.int64)]
        q, idx, c = top_k_cosines(emb, q, ids[split.gallery], 1)
        cos.append(c[:, 0])
        right.append(lab[idx[:, 0]] == lab[q])
    return np.concatenate(cos), np.concatenate(right)


def calibrate_cosine(emb: np.ndarray, labels: Sequence, unknown_fraction: float = 0.3, enrol_fraction: float = 0.5,
                     seed: int = 0, repeats: int = 5) -> Fusion:
    """The cosine-only fit a gallery stores for one species (``fieldreid calibrate``, with or without
    ``--verify``): P(the best candidate is the animal) as a logistic function of its cosine, fitted on the
    pair each decision is made on - a query and its best gallery candidate - in the open-set simulations
    that calibrate the thresholds (``unknown_fraction`` of the animals not in the gallery, ``enrol_fraction``
    of each known one's images enrolled; seeds ``seed .. seed + repeats - 1``). So it holds for the mix of
    known and new animals the thresholds assume. (A fit on every image's top-K pairs, as the fused fit
    ranks with, says too little for the best candidate: zebra, held out, 0.68 where 0.91 were right.)

    Its evidence says how well it holds on animals it was not fitted on (2-fold identity cross-fit, each
    fold's simulation scored with the fit of the other): ``top1_predicted`` the mean probability of the
    queries' best candidates, ``top1_observed`` the fraction of them that are right, ``top1_brier`` the
    Brier score (absent with fewer than 4 animals)."""
    emb = np.asarray(emb, np.float32)
    lab = np.asarray(labels, dtype=object).astype(str)
    if len(emb) != len(lab):
        raise InputError("Need one embedding and label per image.")
    seeds = range(seed, seed + max(1, repeats))
    everyone = np.arange(len(lab))
    cos, right = _open_set_best(emb, lab, everyone, unknown_fraction, enrol_fraction, seeds)
    fusion = fit_fusion(cos, None, right, k=1)
    evidence: dict = {"pairs": "each open-set query and its best gallery candidate", "n_queries": int(len(cos)),
                      "n_identities": int(len(np.unique(lab))), "unknown_fraction": float(unknown_fraction),
                      "enrol_fraction": float(enrol_fraction), "repeats": len(seeds)}
    if len(np.unique(lab)) >= 4:
        predicted, observed = [], []
        a, b = identity_folds(lab, 2, seed)
        try:
            for fit, test in ((a, b), (b, a)):
                fc, fy = _open_set_best(emb, lab, fit, unknown_fraction, enrol_fraction, seeds)
                f = fit_fusion(fc, None, fy, k=1)
                c, y = _open_set_best(emb, lab, test, unknown_fraction, enrol_fraction, seeds)
                predicted.append(f.probability(c))
                observed.append(y)
        except InputError:  # a fold where no best candidate is right (or every one is): no held-out check
            predicted = []
        if predicted:
            p, y = np.concatenate(predicted), np.concatenate(observed).astype(np.float64)
            evidence.update(top1_predicted=float(p.mean()), top1_observed=float(y.mean()),
                            top1_brier=float(np.mean((p - y) ** 2)), protocol="2-fold identity cross-fit")
    return Fusion(fusion.coef, False, "", 1, fusion.n_pairs, fusion.n_positive, None, evidence)
