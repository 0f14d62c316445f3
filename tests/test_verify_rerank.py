"""Re-ranking the global top-K by the fused probability (fieldreid.evaluation.rerank), on synthetic animals
whose global embeddings cannot tell them apart but whose coats can."""

from __future__ import annotations

import numpy as np
import pytest
from test_verify import coat, photo

from fieldreid.errors import InputError
from fieldreid.evaluation.rerank import PairScorer, candidates, identity_folds, verify_eval
from fieldreid.verify.features import extract


@pytest.fixture(scope="module")
def animals():
    n_ids, per = 10, 3
    labels = np.repeat([f"a{i}" for i in range(n_ids)], per)
    feats = [extract(photo(coat(100 + i // per), i), 200) for i in range(n_ids * per)]
    rng = np.random.default_rng(0)
    # global embeddings: a weak identity signal drowned in noise
    centre = rng.normal(size=(n_ids, 16))
    emb = centre[np.arange(n_ids * per) // per] * 0.3 + rng.normal(size=(n_ids * per, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels, feats


def test_verification_lifts_top1_and_open_set(animals):
    emb, labels, feats = animals
    r = verify_eval(emb, labels, feats, ks=(8,), timing_queries=3)
    v = r["per_k"]["8"]
    assert r["protocol"].startswith("2-fold")
    assert v["n_queries"] == len(labels)
    assert v["top1_after"] >= v["true_identity_in_top_k"] - 0.05  # verification finds the animal when offered
    assert v["top1_after"] > v["top1_before"] + 0.2 and v["pays"]
    assert v["open_set"]["fused"]["GM_at_calibrated"] > v["open_set"]["global"]["GM_at_calibrated"]
    assert all(f["uses_inliers"] and f["coef"][2] > 0 for f in v["fusion"])
    assert v["ms_per_query"] > 0 and r["pairs_matched"] > 0


def test_fit_split_must_be_other_animals(animals):
    emb, labels, feats = animals
    mask = np.zeros(len(labels), bool)
    mask[:4] = True  # a0 (3 images) and one image of a1: a1 is on both sides
    with pytest.raises(InputError, match="share 1 identities"):
        verify_eval(emb, labels, feats, ks=(5,), fit_mask=mask)
    mask[4:6] = True  # all of a0 and a1 fit, the rest tested
    r = verify_eval(emb, labels, feats, ks=(5,), fit_mask=mask, timing_queries=2)
    assert r["per_k"]["5"]["n_queries"] == len(labels) - 6


def test_candidates_never_the_query_and_matches_cached(animals):
    emb, labels, feats = animals
    scorer = PairScorer(feats)
    c = candidates(emb, np.arange(6), np.arange(len(labels)), 4, scorer)
    assert c.index.shape == (6, 4) and not (c.index == c.queries[:, None]).any()
    n = scorer.matched
    candidates(emb, np.arange(6), np.arange(len(labels)), 4, scorer)
    assert scorer.matched == n == 24


def test_identity_folds_are_disjoint_and_cover():
    labels = np.repeat(list("abcdef"), 2)
    a, b = identity_folds(labels, 2, seed=3)
    assert set(labels[a]).isdisjoint(labels[b]) and len(a) + len(b) == len(labels)
    with pytest.raises(InputError, match="at least 4"):
        identity_folds(np.array(list("abc")), 2)


def test_calibrate_fusion_decides_it_pays_and_gives_a_threshold(animals):
    from fieldreid.evaluation.rerank import calibrate_fusion

    emb, labels, feats = animals
    fusion, threshold = calibrate_fusion(emb, labels, feats, k=6)
    assert fusion.pays is True and fusion.k == 6 and fusion.uses_inliers
    assert fusion.evidence["top1_with"] > fusion.evidence["top1_without"]
    assert 0.0 < threshold < 1.0
    # embeddings that already separate the animals perfectly: verification cannot add 0.01 of top-1
    perfect = np.eye(len(set(labels)), dtype=np.float32)[np.arange(len(labels)) // 3]
    fusion2, _ = calibrate_fusion(perfect, labels, feats, k=6)
    assert fusion2.pays is False and fusion2.evidence["top1_without"] == 1.0


def test_the_fused_threshold_pools_the_open_set_simulations(animals):
    """One simulation of a few animals is noise: the threshold is chosen on ``repeats`` of them pooled (the
    sweep of the pooled queries), as the cosine thresholds are."""
    from fieldreid.evaluation.metrics import _best_threshold, _pool
    from fieldreid.evaluation.rerank import _open_set_scores, calibrate_fusion

    emb, labels, feats = animals
    lab = np.asarray(labels).astype(str)
    fusion, pooled = calibrate_fusion(emb, labels, feats, k=6, seed=2, repeats=3)
    assert fusion.evidence["threshold_simulations"] == 3 and fusion.evidence["threshold"] == pooled
    scorer, everyone = PairScorer(feats), np.arange(len(lab))
    sims = [_open_set_scores(np.asarray(emb, np.float32), lab, everyone, 6, scorer, fusion, s, 0.3, 0.5, 400)["fused"]
            for s in (2, 3, 4)]
    assert pooled == _best_threshold(_pool(sims))
    _, single = calibrate_fusion(emb, labels, feats, k=6, seed=2, repeats=1)
    assert single == _best_threshold(sims[0])


def test_evaluation_scores_queries_below_the_floor_as_the_product_does(animals):
    from fieldreid.evaluation.rerank import _answers
    from fieldreid.verify.fuse import Fusion

    emb, labels, feats = animals
    c = candidates(emb, np.arange(len(labels)), np.arange(len(labels)), 5, PairScorer(feats))
    assert c.inliers.max() > 0
    top = c.cos.max(axis=1)
    floor = float(np.median(top))
    fused = Fusion((-4.0, 1.0, 2.0), True, "k", 5, 10, 2, True, {}, None, floor)
    _, score = _answers(c, labels, fused)
    below = top < floor
    assert below.any() and (~below).any()
    # below the floor: zero inliers everywhere, so the best score is the fused probability of the best cosine
    assert np.allclose(score[below], fused.probability(top[below], np.zeros(below.sum())))
    # above it: the matched inliers count as before
    full = fused.probability(c.cos.ravel(), c.inliers.ravel()).reshape(c.cos.shape).max(axis=1)
    assert np.allclose(score[~below], full[~below])
