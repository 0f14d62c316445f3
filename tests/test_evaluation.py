"""Evaluation: hand-computed tiny cases, and properties that must hold for any embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_gallery_helpers import clusters, unit

from fieldreid.errors import InputError
from fieldreid.evaluation.metrics import (
    best_single_threshold,
    calibrate,
    evaluate,
    one_vs_all,
    open_set,
    open_set_metrics,
    open_set_split,
)
from fieldreid.gallery import Gallery


def test_one_vs_all_by_hand():
    # A1·A2 = 0.6, A1·B = 0.8, A2·B = 0.96, C orthogonal to all. B and C have one image: not queries.
    e = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.8, 0.6, 0], [0, 0, 1]], np.float32)
    r = one_vs_all(e, ["A", "A", "B", "C"], ks=(1, 2))
    assert (r["n_queries"], r["n_excluded_single_image"]) == (2, 2)
    assert r["top1"] == 0.0 and r["top2"] == 1.0  # for both A queries, B outranks the other A image
    assert r["mAP"] == pytest.approx(0.5)  # the positive is second of three for both queries


def test_one_vs_all_mixed_hits_by_hand():
    # Query a1: a2 (0.9) first → AP 1, rank 1. a2: b1 (0.95) beats a1 (0.9) → AP 1/2, rank 2.
    # b1: a2 (0.95), then b2 at 0.5 → AP 1/2; b2: b1 (0.5) vs a1 (0.0), a2 (0.25): rank 1, AP 1.
    # Only off-diagonal products matter (a query never meets itself), so the diagonal is set to 3 to make
    # the matrix positive definite and realisable as a Gram matrix of (non-unit) vectors.
    g = np.array([[3, 0.9, 0.3, 0.0], [0.9, 3, 0.95, 0.25], [0.3, 0.95, 3, 0.5], [0.0, 0.25, 0.5, 3]])
    w, v = np.linalg.eigh(g)  # embeddings with exactly this Gram matrix
    e = (v * np.sqrt(np.clip(w, 0, None))).astype(np.float32)
    np.testing.assert_allclose(e @ e.T, g, atol=1e-5)
    r = one_vs_all(e, ["a", "a", "b", "b"], ks=(1,))
    assert r["top1"] == pytest.approx(0.5)
    assert r["mAP"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)


def test_ties_count_against_the_query():
    e = unit([[1, 0], [0.8, 0.6], [0.8, 0.6]])  # a2 and b tie for query a1
    r = one_vs_all(e, ["a", "a", "b"], ks=(1, 2))
    assert r["top1"] == 0.0 and r["top2"] == 1.0


def test_a_query_never_matches_itself():
    e = np.eye(8, dtype=np.float32)  # every image orthogonal to every other: nothing can be found
    r = one_vs_all(e, np.repeat(["a", "b", "c", "d"], 2), ks=(1, 3, 4))
    assert r["top1"] == 0.0 and r["top3"] == 0.0 and r["top4"] == 1.0
    assert r["mAP"] == pytest.approx(1 / 7)  # the positive ranks last of 7 (pessimistic ties)


def test_perfect_embeddings_score_one_everywhere():
    labels = np.repeat([f"id{i}" for i in range(12)], 4)
    e = np.eye(16, dtype=np.float32)[np.repeat(np.arange(12), 4)]
    r = evaluate(e, labels, lower=0.5, upper=0.5)
    ova, osr = r["one_vs_all"], r["open_set"]
    assert ova["top1"] == ova["top5"] == ova["top10"] == ova["mAP"] == 1.0
    for m in (osr["at_thresholds"], osr["best"]):
        assert m["BAKS"] == m["BAUS"] == m["geometric_mean"] == 1.0


def test_open_set_metrics_by_hand():
    # known X: right @0.9, wrong @0.95; known Y: right @0.4. unknown U1 @0.3; U2 @0.6, @0.2.
    pred = ["X", "Y", "Y", "X", "X", "Y"]
    score = [0.9, 0.95, 0.4, 0.3, 0.6, 0.2]
    true = ["X", "X", "Y", "U1", "U2", "U2"]
    unknown = [False, False, False, True, True, True]
    m = open_set_metrics(pred, score, true, unknown, 0.5)
    assert m["BAKS"] == pytest.approx((0.5 + 0) / 2) and m["BAUS"] == pytest.approx((1 + 0.5) / 2)
    assert m["geometric_mean"] == pytest.approx(math.sqrt(0.25 * 0.75))
    assert m["unknown_called_known_rate"] == pytest.approx(0.25)
    best = best_single_threshold(pred, score, true, unknown)
    assert best["lower"] == best["upper"] == pytest.approx(0.35)  # any t in (0.3, 0.4] gives 0.75 / 0.75
    assert best["BAKS"] == pytest.approx(0.75) and best["BAUS"] == pytest.approx(0.75)
    band = open_set_metrics(pred, score, true, unknown, lower=0.35, upper=0.5)  # Y @0.4 is now uncertain
    assert band["BAKS"] == pytest.approx(0.25) and band["BAUS"] == pytest.approx(0.75)
    assert band["uncertain_rate"] == pytest.approx(1 / 6)


def test_open_set_split_properties():
    labels = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 1 + ["d"] * 4 + ["e"] * 3 + ["f"] * 6)
    s = open_set_split(labels, unknown_fraction=0.34, enrol_fraction=0.5, seed=3)
    allidx = np.r_[s.gallery, s.known_queries, s.unknown_queries]
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    assert len(s.unknown_identities) == 2
    assert set(labels[s.unknown_queries]) == set(s.unknown_identities)
    assert not set(labels[s.gallery]) & set(s.unknown_identities)
    for ident in set(labels) - set(s.unknown_identities):
        n = (labels == ident).sum()
        assert (labels[s.gallery] == ident).sum() >= 1
        if n >= 2:
            assert (labels[s.known_queries] == ident).sum() >= 1
    again = open_set_split(labels, unknown_fraction=0.34, enrol_fraction=0.5, seed=3)
    assert again.unknown_identities == s.unknown_identities and np.array_equal(again.gallery, s.gallery)
    with pytest.raises(InputError):
        open_set_split(["a", "a"])


def test_open_set_on_clusters_reports_thresholds_and_best():
    vec, labels = clusters(30, 6, dim=32, noise=0.05)
    r = open_set(vec, labels, lower=0.2, upper=0.2, seed=1)
    assert r["n_unknown_identities"] == 9 and r["closed_set_top1"] == 1.0
    assert r["at_thresholds"]["BAKS"] == 1.0 and r["at_thresholds"]["BAUS"] < 0.5  # too low: unknowns accepted
    assert r["best"]["geometric_mean"] > 0.95


def test_calibrate_max_gm_and_target_far(tmp_path):
    vec, labels = clusters(40, 5, dim=16, noise=0.6, seed=2)  # hard enough that thresholds trade off
    free = calibrate(vec, labels, seed=0, repeats=3)
    assert free.lower == free.upper == free.best_single_threshold
    strict = calibrate(vec, labels, target_far=0.02, seed=0, repeats=3)
    assert strict.unknown_called_known_rate <= 0.02
    assert strict.lower <= strict.upper and strict.upper >= free.upper
    assert strict.lower == pytest.approx(min(free.best_single_threshold, strict.upper))
    with Gallery(tmp_path / "g.db") as g:
        calibrate(vec, labels, target_far=0.02, repeats=3, gallery=g, species="zebra", model_id="m")
        t = g.thresholds("zebra", "m")
        assert (t.lower, t.upper) == (pytest.approx(strict.lower), pytest.approx(strict.upper))
        assert "0.02" in t.method


def test_bad_inputs():
    with pytest.raises(InputError):
        one_vs_all(np.ones((3, 4)), ["a", "b"])
    with pytest.raises(InputError):
        one_vs_all(np.full((2, 2), np.nan), ["a", "b"])
    with pytest.raises(InputError, match="at least 3"):
        calibrate(np.eye(4), ["a", "a", "b", "b"])
