"""Re-ranking one query's global candidates by the fused probability (what ``identify`` and ``watch`` use).

The global search proposes the K most similar gallery *images*; each is matched with local features
(:func:`fieldreid.verify.match.match_many`) and scored by the calibrated :class:`~fieldreid.verify.fuse.Fusion`;
an identity's probability is that of its best candidate image. A candidate without stored features keeps
the probability of its cosine alone with zero inliers, so a half-indexed gallery still answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fieldreid.errors import InputError
from fieldreid.verify.features import LocalFeatures
from fieldreid.verify.fuse import Fusion
from fieldreid.verify.match import Match, match_many


@dataclass(frozen=True)
class Reranked:
    """Identities best first with their probabilities, and each candidate image's evidence."""

    identities: list[str]
    probabilities: np.ndarray
    candidate_inliers: np.ndarray
    candidate_probabilities: np.ndarray
    matches: list[Match | None]

    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        return [(i, float(p)) for i, p in list(zip(self.identities, self.probabilities, strict=True))[:k]]


def rerank(query: LocalFeatures | None, identities: Sequence[str], cosines: Sequence[float],
           features: Sequence[LocalFeatures | None], fusion: Fusion) -> Reranked:
    """Fused probability of each candidate image (``identities[i]``, ``cosines[i]``, ``features[i]``),
    aggregated per identity by max, best first (ties: the global order). ``query`` None (a query below the
    fusion's floor, :meth:`Fusion.verifies`) matches nothing: every candidate is scored with zero inliers."""
    n = len(identities)
    if not (len(cosines) == len(features) == n):
        raise InputError("rerank needs one identity, cosine and feature set per candidate.")
    if not fusion.uses_inliers:
        raise InputError("This fusion was fitted without inliers; there is nothing to re-rank with.")
    have = [] if query is None else [i for i, f in enumerate(features) if f is not None and f.kind == query.kind]
    matches: list[Match | None] = [None] * n
    for i, m in zip(have, match_many(query, [features[i] for i in have]), strict=True):
        matches[i] = m
    inliers = np.array([m.n_inliers if m is not None else 0 for m in matches], np.float64)
    prob = fusion.probability(np.asarray(cosines, np.float64), inliers) if n else np.zeros(0)
    best: dict[str, float] = {}
    for ident, p in zip(identities, prob, strict=True):
        if ident not in best or p > best[ident]:
            best[ident] = float(p)
    first = {ident: i for i, ident in reversed(list(enumerate(identities)))}
    order = sorted(best, key=lambda k: (-best[k], first[k]))
    return Reranked(order, np.array([best[k] for k in order]), inliers, prob, matches)
