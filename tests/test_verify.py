"""Local-feature verification (fieldreid.verify): features, storage, matching, fusion, re-ranking, CLI.

Synthetic animals are random blob textures ("coats"); a photo of one is a random similarity warp of its
coat plus noise, so two photos of one animal share geometry and two animals do not.
"""

from __future__ import annotations

import importlib
from unittest.mock import patch

import cv2
import numpy as np
import pytest

from fieldreid.errors import InputError
from fieldreid.verify.features import (
    KIND,
    MAX_KEYPOINTS,
    LocalFeatures,
    extract,
    keypoints_of,
    kind_for,
    prepare,
)
from fieldreid.verify.fuse import Fusion, fit_fusion, fit_ranked_fusion, pays
from fieldreid.verify.match import draw_matches, match, match_many, ratio_matches

match_module = importlib.import_module("fieldreid.verify.match")  # the package's `match` is the function


def coat(seed: int, size: int = 320) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 90, np.uint8)
    for _ in range(70):
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(4, 22, 2))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, c, -1)
    return img


def photo(base: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = base.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-12, 12)), float(rng.uniform(0.85, 1.1)))
    m[:, 2] += rng.uniform(-15, 15, 2)
    img = cv2.warpAffine(base, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    noise = rng.normal(0, 4, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ features
def test_features_capped_rootsift_and_round_trip_bytes():
    f = extract(photo(coat(1), 0), max_keypoints=150)
    assert 50 <= len(f) <= 150
    assert f.size == (384, 384)  # longer side resized to FEATURE_SIDE
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape == (len(f), 128)
    # RootSIFT: unit L2 norm before quantisation
    norms = np.linalg.norm(f.descriptors.astype(np.float32) / 255.0, axis=1)
    assert np.all(np.abs(norms - 1.0) < 0.02)
    blob = f.to_bytes()
    assert len(blob) < len(f) * (128 + 4) + 64
    g = LocalFeatures.from_bytes(blob)
    assert g.kind == f.kind and g.size == f.size
    assert np.array_equal(g.descriptors, f.descriptors)
    assert np.abs(g.xy - f.xy).max() <= 0.25  # float16 keypoints: sub-pixel at 384 px


def test_features_bad_input_and_damaged_bytes_are_clear_errors():
    with pytest.raises(InputError, match="uint8"):
        extract(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError, match="max_keypoints"):
        extract(coat(0), max_keypoints=0)
    blob = extract(coat(2), max_keypoints=40).to_bytes()
    with pytest.raises(InputError, match="truncated"):
        LocalFeatures.from_bytes(blob[:-3])
    with pytest.raises(InputError, match="format"):
        LocalFeatures.from_bytes(b"JUNK" + blob[4:])


def test_flat_crop_has_no_keypoints_and_matches_nothing():
    flat = extract(np.full((100, 60, 3), 128, np.uint8), max_keypoints=100)
    assert len(flat) == 0 and flat.size == (384, 230)
    other = extract(coat(3), max_keypoints=100)
    assert match(flat, other).n_inliers == 0 and match(other, flat).n_inliers == 0
    assert LocalFeatures.from_bytes(flat.to_bytes()).size == flat.size


def test_keypoint_cap_is_part_of_the_kind_and_mixed_caps_are_never_compared():
    assert kind_for(1000) == "rootsift-clahe/v1"  # the name galleries indexed before the cap was in it carry
    assert kind_for(2000) == "rootsift-clahe-2000/v1" and KIND == kind_for(MAX_KEYPOINTS)
    for cap in (1, 300, 1000, 2000, 99999):
        assert keypoints_of(kind_for(cap)) == cap
    for bad in ("rootsift-clahe-0/v1", "rootsift-clahe-02000/v1", "orb/v1", "rootsift-clahe/v2", "", "a-b-c"):
        with pytest.raises(InputError, match="cannot be extracted"):
            keypoints_of(bad)
    with pytest.raises(InputError, match="between 1 and"):
        kind_for(100000)
    a, b = extract(coat(4), max_keypoints=100), extract(coat(4), max_keypoints=120)
    assert a.kind == "rootsift-clahe-100/v1" and LocalFeatures.from_bytes(a.to_bytes()).kind == a.kind
    with pytest.raises(InputError, match="different kinds"):
        match(a, b)
    with pytest.raises(InputError, match="different kinds"):
        match_many(a, [a, b])


def test_prepare_is_grey_fixed_size_whatever_the_input():
    assert prepare(np.zeros((50, 200, 3), np.uint8)).shape == (96, 384)
    assert prepare(np.zeros((500, 100), np.uint8)).shape == (384, 77)
    assert prepare(np.zeros((40, 40, 4), np.uint8)).dtype == np.uint8


# ------------------------------------------------------------------------------------------ matching
def test_same_animal_has_many_inliers_other_animal_few():
    a = extract(photo(coat(10), 1), 400)
    same = extract(photo(coat(10), 2), 400)
    other = extract(photo(coat(11), 3), 400)
    m_same, m_other = match(a, same), match(a, other)
    assert m_same.n_inliers >= 40
    assert m_other.n_inliers <= 15
    assert m_same.pairs.shape == (m_same.n_inliers, 2)
    assert m_same.pairs[:, 0].max() < len(a) and m_same.pairs[:, 1].max() < len(same)
    # deterministic, and batched matching gives the same answer
    assert match(a, same).n_inliers == m_same.n_inliers
    assert [m.n_inliers for m in match_many(a, [same, other])] == [m_same.n_inliers, m_other.n_inliers]
    # a similarity budget smaller than one candidate's matrix: one candidate per product, same answers
    with patch.object(match_module, "SIM_BUDGET", 10):
        assert [m.n_inliers for m in match_many(a, [same, other, same])] == [m_same.n_inliers, m_other.n_inliers,
                                                                             m_same.n_inliers]
    for method in ("fundamental-usac", "homography-ransac", "homography-usac"):
        assert match(a, same, method=method).n_inliers > match(a, other, method=method).n_inliers


def test_ratio_test_and_method_are_checked():
    a = extract(coat(4), 100)
    with pytest.raises(InputError, match="ratio"):
        ratio_matches(a, a, 1.5)
    with pytest.raises(InputError, match="method"):
        match(a, a, method="affine")
    strict, loose = ratio_matches(a, extract(photo(coat(4), 1), 100), 0.5), ratio_matches(
        a, extract(photo(coat(4), 1), 100), 0.9)
    assert len(strict) < len(loose)


def test_draw_matches_puts_both_crops_and_lines_side_by_side():
    ca, cb = photo(coat(20), 1), photo(coat(20), 2)
    a, b = extract(ca, 200), extract(cb, 200)
    m = match(a, b)
    pic = draw_matches(ca, a, cb, b, m, title="x")
    assert pic.shape == (28 + 384, 768, 3) and pic.dtype == np.uint8
    bare = draw_matches(ca, a, cb, b, type(m)(m.n_tentative, 0, np.zeros((0, 2), np.int32)))
    assert np.abs(pic[28:].astype(int) - bare.astype(int)).sum() > 0  # the lines are drawn


# ------------------------------------------------------------------------------------------ fusion
def test_fusion_learns_that_inliers_matter_and_round_trips():
    rng = np.random.default_rng(0)
    n = 400
    same = rng.random(n) < 0.2
    cos = np.where(same, rng.normal(0.8, 0.05, n), rng.normal(0.75, 0.05, n))
    inl = np.where(same, rng.poisson(40, n), rng.poisson(8, n))
    f = fit_fusion(cos, inl, same)
    assert f.uses_inliers and f.coef[2] > 0 and f.n_positive == int(same.sum())
    p = f.probability([0.78, 0.78], [5, 60])
    assert p[1] > 0.9 > 0.1 > p[0]
    # calibrated on its pairs: mean probability ~ the rate of same pairs
    assert abs(float(np.mean(f.probability(cos, inl))) - same.mean()) < 0.02
    g = Fusion.from_dict(f.to_dict())
    assert np.allclose(g.probability(cos, inl), f.probability(cos, inl))
    only_cos = fit_fusion(cos, None, same)
    assert not only_cos.uses_inliers and only_cos.probability([0.9])[0] > only_cos.probability([0.7])[0]


def test_fusion_floor_is_the_lowest_same_animal_cosine_and_round_trips():
    cos = np.array([0.95, 0.90, 0.62, 0.70, 0.85, 0.60])
    same = np.array([True, True, False, True, False, False])
    f = fit_fusion(cos, [50, 40, 3, 30, 5, 2], same)
    assert f.floor == pytest.approx(0.70)  # below it no pair of one animal was ever seen
    assert f.verifies(0.70) and f.verifies(0.9) and not f.verifies(0.69)
    assert Fusion.from_dict(f.to_dict()).floor == pytest.approx(0.70)
    old = {k: v for k, v in f.to_dict().items() if k != "floor"}  # stored before floors: verify everything
    assert Fusion.from_dict(old).floor is None and Fusion.from_dict(old).verifies(-1.0)
    assert fit_fusion(cos, None, same).floor is None and not fit_fusion(cos, None, same).verifies(0.99)
    with pytest.raises(InputError, match="floor is malformed"):
        Fusion.from_dict({**f.to_dict(), "floor": "high"})


def test_fusion_refuses_one_class_bad_shapes_and_malformed_dicts():
    with pytest.raises(InputError, match="same and of different"):
        fit_fusion([0.5, 0.6], [1, 2], [True, True])
    with pytest.raises(InputError, match="one inlier count"):
        fit_fusion([0.5, 0.6], [1], [True, False])
    with pytest.raises(InputError, match="malformed"):
        Fusion.from_dict({"coef": "x"})
    with pytest.raises(InputError, match="weights"):
        Fusion.from_dict({"coef": [1, 2], "uses_inliers": True})
    f = fit_fusion([0.5, 0.6, 0.7, 0.8], [1, 2, 30, 40], [False, False, True, True])
    with pytest.raises(InputError, match="inlier"):
        f.probability([0.5])


def _queries(rng, n=300, k=20):
    """Fit queries with K candidates, one of them the query's animal. Cosine ranks it first only now and
    then; inliers always do within a query, but their scale follows the photo's quality, so across queries
    the inlier count of a true pair says little (a sharp photo's wrong candidate beats a dim photo's right one)."""
    same = np.zeros((n, k), bool)
    same[np.arange(n), rng.integers(0, k, n)] = True
    cos = np.where(same, rng.normal(0.60, 0.05, (n, k)), rng.normal(0.50, 0.05, (n, k)))
    quality = np.exp(rng.normal(0, 1.5, (n, 1)))
    inl = np.round(np.where(same, 10 * quality, 4.5 * quality * rng.random((n, k))))
    return cos, inl, same


def _top1(f: Fusion, cos, inl, same) -> float:
    p = f.probability(cos.ravel(), inl.ravel()).reshape(cos.shape)
    return float(same[np.arange(len(p)), np.argmax(p, axis=1)].mean())


def test_ranked_fusion_orders_each_querys_candidates_where_a_pair_fit_does_not():
    rng = np.random.default_rng(0)
    fit, held_out = _queries(rng), _queries(rng)
    ranked = fit_ranked_fusion(*fit, feature_kind="rootsift", k=20)
    pairs = fit_fusion(*(a.ravel() for a in fit))
    # the pair fit leans on cosine (it separates pairs across queries); the ranker on inliers
    assert pairs.coef[1] / max(pairs.coef[2], 1e-9) > 10 > ranked.coef[1] / ranked.coef[2]
    assert _top1(ranked, *held_out) > 0.9 and _top1(pairs, *held_out) < 0.8
    assert ranked.fit == "ranking" and ranked.uses_inliers and min(ranked.coef[1:]) >= 0
    assert (ranked.k, ranked.n_pairs, ranked.n_positive) == (20, 6000, 300)
    assert ranked.floor == pytest.approx(float(fit[0][fit[2]].min()))
    # still a probability: on its pairs the mean equals the rate of same pairs
    assert abs(float(np.mean(ranked.probability(fit[0].ravel(), fit[1].ravel()))) - fit[2].mean()) < 0.01
    back = Fusion.from_dict(ranked.to_dict())
    assert back.fit == "ranking" and back.coef == ranked.coef
    old = {k: v for k, v in pairs.to_dict().items() if k != "fit"}  # stored before ranking fits
    assert pairs.fit == "pairs" and Fusion.from_dict(old).fit == "pairs"


def test_ranked_fusion_among_equal_rankers_keeps_the_one_that_separates_pairs_and_refuses_bad_input():
    # both signals put the true candidate first in every query, but only inliers separate same from
    # different across queries (the second query's true cosine, 0.45, is below the first's wrong 0.5):
    # the open-set threshold needs that, so the inlier-heavy direction is kept
    cos = np.array([[0.9, 0.5, 0.4], [0.45, 0.3, 0.2]])
    inl = np.array([[40, 2, 1], [30, 3, 0]])
    same = np.array([[True, False, False], [True, False, False]])
    f = fit_ranked_fusion(cos, inl, same)
    assert f.coef[2] > 0
    p = f.probability(cos.ravel(), inl.ravel()).reshape(cos.shape)
    assert p[same].min() > p[~same].max()
    # where inliers say nothing and cosine separates everything, cosine is kept
    g = fit_ranked_fusion(np.array([[0.9, 0.5, 0.4], [0.8, 0.3, 0.2]]), np.full((2, 3), 5.0), same)
    assert g.coef[1] > 0 and g.coef[2] == 0.0
    with pytest.raises(InputError, match="one shape"):
        fit_ranked_fusion(cos.ravel(), inl.ravel(), same.ravel())
    with pytest.raises(InputError, match="one shape"):
        fit_ranked_fusion(cos, inl[:, :2], same)
    with pytest.raises(InputError, match="same and of different"):
        fit_ranked_fusion(cos, inl, np.zeros_like(same))
    with pytest.raises(InputError, match="negative"):
        fit_ranked_fusion(cos, -inl, same)


def test_pays_needs_a_real_gain():
    assert pays(0.50, 0.52) and not pays(0.50, 0.505) and not pays(0.5, 0.4) and not pays(float("nan"), 0.9)


def test_rerank_puts_the_geometrically_consistent_animal_first():
    from fieldreid.verify.rerank import rerank

    q = extract(photo(coat(30), 0), 300)
    cands = [extract(photo(coat(31), 1), 300), extract(photo(coat(30), 2), 300), None]
    fusion = Fusion((-8.0, 2.0, 2.5), True)
    r = rerank(q, ["b", "a", "c"], [0.9, 0.8, 0.95], cands, fusion)
    assert r.identities[0] == "a"  # second by cosine, first by evidence
    assert r.candidate_inliers[2] == 0 and r.matches[2] is None  # no stored features: cosine alone
    assert list(r.probabilities) == sorted(r.probabilities, reverse=True)
    with pytest.raises(InputError, match="without inliers"):
        rerank(q, ["a"], [0.5], [cands[0]], Fusion((0.0, 1.0), False))


def test_fusion_weighs_a_narrow_cosine_by_its_information_not_its_units():
    # among top-K candidates cosines differ by hundredths; a ridge on raw units would erase them
    rng = np.random.default_rng(1)
    n = 4000
    same = rng.random(n) < 0.1
    cos = np.where(same, rng.normal(0.86, 0.02, n), rng.normal(0.83, 0.02, n))
    inl = rng.poisson(10, n)  # uninformative here
    f = fit_fusion(cos, inl, same)
    assert f.coef[1] > 30  # a 0.03 shift in cosine is 1.5 standard deviations: a strong signal
    p = f.probability([0.80, 0.90], [10, 10])
    assert p[1] > 5 * p[0]


def test_fusion_stays_monotone_when_one_signal_separates_the_pairs():
    # inliers separate same from different; cosine is noise that happens to run the wrong way
    rng = np.random.default_rng(2)
    n = 600
    same = rng.random(n) < 0.2
    inl = np.where(same, rng.integers(40, 80, n), rng.integers(0, 12, n))
    cos = np.where(same, 0.80, 0.82) + rng.normal(0, 0.01, n)
    f = fit_fusion(cos, inl, same)
    assert f.coef[1] == 0.0 and f.coef[2] > 0
    p = f.probability([0.70, 0.95], [50, 50])
    assert p[0] == p[1]  # a higher cosine never lowers the probability
