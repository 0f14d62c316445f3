"""Matching two crops' local features: ratio test, then geometric verification.

Tentative matches are mutual-free nearest neighbours in RootSIFT space that pass Lowe's ratio test
(nearest distance < ``ratio`` × second nearest). They are verified with a fundamental matrix (an animal's
flank is not a plane and bends between photos; a fundamental matrix allows that, a homography does not)
estimated robustly with OpenCV's USAC (MAGSAC++) or classic RANSAC; the inliers are the matches that
agree with it. The inlier count is the evidence; the inlier pairs are kept so a person can see them
(:func:`draw_matches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fieldreid.errors import InputError
from fieldreid.verify.features import LocalFeatures

RATIO = 0.8
#: geometric models: fundamental matrix (default) or homography, each by MAGSAC++ (usac) or RANSAC
METHODS = ("fundamental-ransac", "fundamental-usac", "homography-ransac", "homography-usac")
METHOD = "fundamental-ransac"
#: reprojection / epipolar distance (pixels of the FEATURE_SIDE crop) that makes a match an inlier
THRESHOLD_PX = 3.0
CONFIDENCE = 0.999
MAX_ITERS = 2000
_MIN_MATCHES = {"fundamental": 8, "homography": 4}


@dataclass(frozen=True)
class Match:
    """The outcome of verifying two crops: tentative matches (after the ratio test), inliers, and the
    inlier pairs as indices into the keypoints of ``a`` and ``b`` ((M, 2) int32)."""

    n_tentative: int
    n_inliers: int
    pairs: np.ndarray

    @property
    def inliers(self) -> int:
        return self.n_inliers


def _ratio_from_sim(sim: np.ndarray, ratio: float) -> np.ndarray:
    """Ratio-test matches from a (Na, Nb) matrix of unit-descriptor dot products (Nb >= 2)."""
    rows = np.arange(sim.shape[0])
    best = np.argmax(sim, axis=1)
    s1 = sim[rows, best].copy()
    sim[rows, best] = -2.0  # below any dot product of unit vectors: the next max is the second nearest
    s2 = sim.max(axis=1)
    # unit vectors: squared distance = 2 - 2 cos
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * s1, 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))
    ok = d1 < ratio * d2
    return np.stack([rows[ok], best[ok]], axis=1).astype(np.int32)


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise InputError(f"The ratio test needs 0 < ratio <= 1, got {ratio}.")


def ratio_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO) -> np.ndarray:
    """(M, 2) indices (into ``a``, into ``b``) of the nearest neighbours in ``b`` of ``a``'s descriptors that
    pass the ratio test (nearest distance < ``ratio`` × second nearest)."""
    _check_ratio(ratio)
    if len(a) == 0 or len(b) < 2:
        return np.zeros((0, 2), np.int32)
    return _ratio_from_sim(a.unit_descriptors() @ b.unit_descriptors().T, ratio)


def verify(a: LocalFeatures, b: LocalFeatures, tentative: np.ndarray, method: str = METHOD,
           threshold: float = THRESHOLD_PX) -> Match:
    """Geometric verification of tentative matches ``(M, 2)``; deterministic (OpenCV's RNG reseeded)."""
    if method not in METHODS:
        raise InputError(f"Unknown verification method {method!r}; choose one of {', '.join(METHODS)}.")
    model, robust = method.split("-")
    n = len(tentative)
    if n < _MIN_MATCHES[model]:
        return Match(n, 0, np.zeros((0, 2), np.int32))
    pa = a.xy[tentative[:, 0]].astype(np.float64)
    pb = b.xy[tentative[:, 1]].astype(np.float64)
    flag = {"usac": cv2.USAC_MAGSAC, "ransac": cv2.RANSAC if model == "homography" else cv2.FM_RANSAC}[robust]
    cv2.setRNGSeed(0)
    try:
        if model == "fundamental":
            _, mask = cv2.findFundamentalMat(pa, pb, flag, threshold, CONFIDENCE, MAX_ITERS)
        else:
            _, mask = cv2.findHomography(pa, pb, flag, threshold, maxIters=MAX_ITERS, confidence=CONFIDENCE)
    except cv2.error:  # degenerate configurations (all points on a line, duplicates)
        mask = None
    if mask is None:
        return Match(n, 0, np.zeros((0, 2), np.int32))
    keep = mask.ravel().astype(bool)[:n]
    pairs = np.ascontiguousarray(tentative[keep], np.int32)
    return Match(n, int(len(pairs)), pairs)


def match(a: LocalFeatures, b: LocalFeatures, ratio: float = RATIO, method: str = METHOD,
          threshold: float = THRESHOLD_PX) -> Match:
    """Ratio-test matches of ``a`` against ``b``, verified geometrically (see the module docstring)."""
    if a.kind != b.kind:
        raise InputError(f"Cannot compare local features of different kinds ({a.kind} vs {b.kind}).")
    return verify(a, b, ratio_matches(a, b, ratio), method, threshold)


#: largest similarity matrix :func:`match_many` holds at once (float32 elements; 8 M = 32 MB): a query of
#: 2,000 keypoints against 40 candidates of 2,000 would otherwise need 640 MB
SIM_BUDGET = 8_000_000


def match_many(a: LocalFeatures, others: list[LocalFeatures], ratio: float = RATIO, method: str = METHOD,
               threshold: float = THRESHOLD_PX) -> list[Match]:
    """:func:`match` of ``a`` against each of ``others`` (a query's candidates): one matrix product per group
    of candidates, each group's matrix within :data:`SIM_BUDGET`."""
    _check_ratio(ratio)
    for b in others:
        if a.kind != b.kind:
            raise InputError(f"Cannot compare local features of different kinds ({a.kind} vs {b.kind}).")
    if not others:
        return []
    da = a.unit_descriptors()
    out: list[Match] = []
    i = 0
    while i < len(others):
        group, cells = [], 0
        while i < len(others) and (not group or cells + len(da) * len(others[i]) <= SIM_BUDGET):
            group.append(others[i])
            cells += len(da) * len(others[i])
            i += 1
        sizes = [len(b) for b in group]
        sim = da @ np.concatenate([b.unit_descriptors() for b in group]).T if len(da) and sum(sizes) else None
        start = 0
        for b, n in zip(group, sizes, strict=True):
            if sim is None or n < 2:
                tentative = np.zeros((0, 2), np.int32)
            else:
                tentative = _ratio_from_sim(sim[:, start:start + n], ratio)
            out.append(verify(a, b, tentative, method, threshold))
            start += n
    return out


def draw_matches(crop_a: np.ndarray, a: LocalFeatures, crop_b: np.ndarray, b: LocalFeatures, m: Match,
                 side: int | None = None, title: str | None = None) -> np.ndarray:
    """The two crops side by side (BGR, each resized to the features' size, or to height ``side``) with a
    line for every inlier pair and, with ``title``, a caption bar above."""
    def fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)

    ia, ib = fit(crop_a, a.size), fit(crop_b, b.size)
    h = max(ia.shape[0], ib.shape[0])
    canvas = np.zeros((h, ia.shape[1] + ib.shape[1], 3), np.uint8)
    canvas[:ia.shape[0], :ia.shape[1]] = ia
    canvas[:ib.shape[0], ia.shape[1]:] = ib
    rng = np.random.default_rng(0)  # same colours for the same picture
    for i, j in m.pairs:
        colour = tuple(int(c) for c in rng.integers(64, 256, 3))
        p = (int(round(a.xy[i, 0])), int(round(a.xy[i, 1])))
        q = (int(round(b.xy[j, 0])) + ia.shape[1], int(round(b.xy[j, 1])))
        cv2.line(canvas, p, q, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, p, 2, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, 2, colour, -1, cv2.LINE_AA)
    if side is not None and side != h:
        canvas = cv2.resize(canvas, (max(1, round(canvas.shape[1] * side / h)), side), interpolation=cv2.INTER_AREA)
    if title:
        bar = np.full((28, canvas.shape[1], 3), 32, np.uint8)
        cv2.putText(bar, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        canvas = np.vstack([bar, canvas])
    return canvas
