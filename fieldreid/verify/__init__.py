"""Local-feature verification: a second opinion on a global-embedding match that needs no weights.

* :mod:`~fieldreid.verify.features` — RootSIFT on the CLAHE-equalised grey crop at a fixed size, with a
  keypoint cap, stored compactly (uint8 descriptors, float16 keypoints) as bytes.
* :mod:`~fieldreid.verify.match` — ratio-test matching and geometric verification (OpenCV USAC/RANSAC);
  the inlier pairs are kept so a person can see them (:func:`~fieldreid.verify.match.draw_matches`).
* :mod:`~fieldreid.verify.fuse` — global cosine + inlier count → one calibrated probability that two crops
  show the same animal (logistic fit on pairs of held-out identities), and whether verification pays.
"""
from fieldreid.verify.features import FEATURE_SIDE, MAX_KEYPOINTS, LocalFeatures, extract
from fieldreid.verify.fuse import Fusion, fit_fusion
from fieldreid.verify.match import Match, draw_matches, match

__all__ = ["FEATURE_SIDE", "MAX_KEYPOINTS", "LocalFeatures", "extract", "Fusion", "fit_fusion", "Match",
           "draw_matches", "match"]
