"""One calibrated probability from the global cosine and the local inlier count.

For a query and one candidate gallery image, ``p(same animal) = sigmoid(w0 + w1·cos + w2·log(1 + inliers))``.
The weights are fitted on (query, candidate) pairs of identities that are *not* used for testing, taken
exactly as they occur at identification time: each query's top-K global candidates. So the output is a
probability on the pairs the decision actually sees, and the relative weight of cosine and inliers is
learnt, not guessed. Without verification (``inliers=None``, or a species where it does not pay) a
logistic regression on the cosine alone gives a calibrated probability too.

**Fitted as a ranker** (:func:`fit_ranked_fusion`, what calibration and evaluation use). Verification
decides *which* of one query's K candidates is its animal, so the direction of (cosine, inliers) is chosen
for that: the one that puts a candidate of the query's own animal first for the most fit queries. Only then
are intercept and scale fitted as a logistic regression of same/different on the combined score, which
keeps the output a probability. A plain logistic regression over all pairs (:func:`fit_fusion`, the fit
before 2026-12-01) answers another question - is *this pair* the same animal, across queries - and there a
fine-tuned embedder's cosine wins, because it separates pairs well across queries even where it cannot
order one query's candidates: nyala test, the 320-px fine-tune, 2-fold cross-fit, K = 40, that fit weighted
cosine 7.0 against log-inliers 0.3 and re-ranking reached top-1 0.276; the ranking fit 0.346 (open-set GM
0.343 -> 0.453). Ranking alone is not enough for open-set decisions: among directions that rank about as
well (:data:`RANK_TOLERANCE`) the one that also separates pairs across queries is kept, or zebra's open-set
GM falls from 0.993 to 0.871. On the ImageNet embedder top-1 is unchanged (nyala 0.326, zebra 0.994).

:class:`Fusion` is plain data (``to_dict``/``from_dict``): it is stored with the gallery's thresholds, per
species and model, with the decision whether verification pays for that species (:attr:`Fusion.pays`).
``fieldreid calibrate`` stores a cosine-only fit for every species it calibrates; ``calibrate --verify``
stores the fit with inliers and, inside it (:attr:`Fusion.cosine_only`), the cosine-only fit, which gives
the probability of a crop that was not verified (verification off for the species, no local features).
:meth:`Fusion.for_cosine` picks the fit for a cosine alone.

**Where local matching is consulted.** A fit with inliers records :attr:`Fusion.floor`, the lowest global
cosine at which its pairs ever showed the *same* animal. A query whose best global candidate lies below it
is outside what the fit saw of matches: its candidates are scored by the fusion with zero inliers (the same
score a candidate without stored features gets), and no local features are extracted or matched for it.
On a camera trap this skips the animals that look nothing like any enrolled one (a jaguar against a zebra
gallery), which is most of verification's cost in ``watch``; evaluation applies the same rule, so the
measured gain is the gain the product gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from fieldreid.errors import InputError

RIDGE = 1e-3
#: verification must raise held-out top-1 by at least this much to be switched on
PAYS_MARGIN = 0.01
#: gallery images re-scored per query by default (``calibrate --verify``; ``eval --verify`` measures it and
#: half of it). Nyala test, 2-fold cross-fit, RootSIFT-1000: top-1 0.140 -> 0.214 / 0.243 / 0.263 / 0.285 /
#: 0.287 at K = 10 / 20 / 30 / 40 / 50 (the true animal is among the top 40 for 86 % of queries, top 20 for
#: 71 %); matching costs grow linearly with K (~75 ms per query at 20 on 2 cores).
VERIFY_K = 40
#: directions of (cosine, log(1 + inliers)) the ranking fit tries, evenly spaced from cosine alone (0 deg)
#: to inliers alone (90 deg) in units standardised over the fit pairs (0.5 deg apart)
RANK_ANGLES = 181
#: directions whose fit top-1 is within this of the best count as equally good rankers; of those the one whose
#: score separates same from different pairs best across queries (logistic likelihood) is kept, which is what
#: the open-set threshold needs. Zebra (35 animals, cross-fit, K = 40): the best ranker alone put top-1 at
#: 0.986 and open-set GM at 0.871; with this rule 0.994 and 0.993, as the pair fit. Nyala, 320-px fine-tune:
#: top-1 0.350 -> 0.346, GM 0.464 -> 0.453.
RANK_TOLERANCE = 0.01


def _design(cos: np.ndarray, inliers: np.ndarray | None) -> np.ndarray:
    cos = np.asarray(cos, np.float64).reshape(-1)
    cols = [np.ones_like(cos), cos]
    if inliers is not None:
        inl = np.asarray(inliers, np.float64).reshape(-1)
        if inl.shape != cos.shape:
            raise InputError(f"Need one inlier count per cosine ({cos.shape[0]} cosines, {inl.shape[0]} counts).")
        if np.any(inl < 0):
            raise InputError("Inlier counts cannot be negative.")
        cols.append(np.log1p(inl))
    x = np.stack(cols, axis=1)
    if not np.all(np.isfinite(x)):
        raise InputError("Cosines and inlier counts must be finite.")
    return x


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


@dataclass(frozen=True)
class Fusion:
    """Logistic weights ``coef`` = (intercept, cosine[, log(1 + inliers)]) and what the fit was made of."""

    coef: tuple[float, ...]
    uses_inliers: bool
    feature_kind: str = ""
    k: int = 0
    n_pairs: int = 0
    n_positive: int = 0
    pays: bool | None = None
    evidence: dict = field(default_factory=dict)
    #: on a fit with inliers: the cosine-only fit, for crops that are not verified (None: fitted before
    #: there was one, and on a cosine-only fit, which is its own)
    cosine_only: Fusion | None = None
    #: on a fit with inliers: the lowest cosine of a same-animal pair it was fitted on (None: no floor,
    #: every query is verified - a fit stored before floors existed)
    floor: float | None = None
    #: how the weights were fitted: "ranking" (:func:`fit_ranked_fusion`) or "pairs" (:func:`fit_fusion`;
    #: every fit stored before 2026-12-01)
    fit: str = "pairs"

    def __post_init__(self) -> None:
        if self.cosine_only is not None and self.cosine_only.uses_inliers:
            raise InputError("A fusion's cosine-only fallback must be fitted without inlier counts.")

    def for_cosine(self) -> Fusion | None:
        """The fit that turns a cosine alone into a probability: this one when it has no inlier weight,
        else its :attr:`cosine_only` fallback (None when there is none)."""
        return self if not self.uses_inliers else self.cosine_only

    def verifies(self, best_cosine: float) -> bool:
        """Whether a query whose best global candidate has this cosine is matched locally (see the module
        docstring); below the floor its candidates are scored with zero inliers."""
        return self.uses_inliers and (self.floor is None or float(best_cosine) >= self.floor)

    def probability(self, cos, inliers=None) -> np.ndarray:
        """P(same animal) for each (cosine, inlier count) pair; inliers are ignored by a cosine-only fit."""
        x = _design(cos, inliers if self.uses_inliers else None)
        if self.uses_inliers and inliers is None:
            raise InputError("This fusion was fitted with inlier counts; pass them.")
        return _sigmoid(x @ np.asarray(self.coef, np.float64))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coef"] = list(self.coef)
        d["cosine_only"] = self.cosine_only.to_dict() if self.cosine_only is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        try:
            coef = tuple(float(v) for v in d["coef"])
            uses = bool(d["uses_inliers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"Stored fusion weights are malformed ({exc}); run `fieldreid calibrate` again.") from exc
        if len(coef) != 2 + uses:
            raise InputError(f"Stored fusion has {len(coef)} weights, expected {2 + uses}.")
        inner = d.get("cosine_only")
        if inner is not None and not isinstance(inner, dict):
            raise InputError("Stored fusion's cosine-only fit is malformed; run `fieldreid calibrate` again.")
        floor = d.get("floor")
        try:
            floor = None if floor is None else float(floor)
        except (TypeError, ValueError) as exc:
            raise InputError(f"Stored fusion's floor is malformed ({exc}); run `fieldreid calibrate` again.") from exc
        return cls(coef, uses, str(d.get("feature_kind", "")), int(d.get("k", 0)), int(d.get("n_pairs", 0)),
                   int(d.get("n_positive", 0)), d.get("pays"), dict(d.get("evidence") or {}),
                   cls.from_dict(inner) if inner is not None else None, floor, str(d.get("fit") or "pairs"))


def fit_fusion(cos: Sequence[float], inliers: Sequence[float] | None, same: Sequence[bool], ridge: float = RIDGE,
               feature_kind: str = "", k: int = 0, iterations: int = 50) -> Fusion:
    """Logistic regression of ``same`` on cosine (and log(1 + inliers)); needs both classes.

    The fusion is kept monotone: a higher cosine or more inliers never lowers the probability. Where the
    unconstrained fit gives a negative weight (one signal nearly separates the pairs and the other only
    soaks up noise), that signal's weight is 0 and the rest is fitted again."""
    x = _design(cos, None if inliers is None else np.asarray(inliers))
    coef = _logistic(x, same, ridge, iterations)
    free = np.ones(x.shape[1], bool)
    while np.any(coef[1:][free[1:]] < 0):
        free[1:] &= coef[1:] >= 0
        sub = _logistic(x[:, free], same, ridge, iterations)
        coef = np.zeros(x.shape[1])
        coef[free] = sub
    y = np.asarray(same, bool).reshape(-1)
    floor = float(x[y, 1].min()) if inliers is not None else None  # _logistic made sure some are the same
    return Fusion(tuple(float(v) for v in coef), inliers is not None, feature_kind, int(k), int(len(y)), int(y.sum()),
                  floor=floor)


def fit_ranked_fusion(cos, inliers, same, ridge: float = RIDGE, feature_kind: str = "", k: int = 0,
                      iterations: int = 50) -> Fusion:
    """The fusion fitted as a ranker (see the module docstring) on fit queries' candidates.

    ``cos``, ``inliers`` and ``same`` are (queries, K) arrays: row r holds query r's K global candidates
    (any order). Of :data:`RANK_ANGLES` directions (both weights >= 0), those under which the most queries
    have a candidate of their own animal scored highest (first candidate in the row on ties, as
    identification picks; within :data:`RANK_TOLERANCE` of the best) are the candidates; of them the one
    whose score a logistic regression fits best over all pairs is kept (ties: nearer cosine alone).
    Intercept and scale are that ridge logistic regression of ``same`` on the combined score. Needs same
    and different pairs, like :func:`fit_fusion`; the floor is the lowest cosine of a same-animal pair, as
    there."""
    c = np.asarray(cos, np.float64)
    inl = np.asarray(inliers, np.float64)
    y = np.asarray(same, bool)
    if c.ndim != 2 or inl.shape != c.shape or y.shape != c.shape:
        raise InputError(f"Need (queries, K) arrays of cosines, inlier counts and same/different labels of one "
                         f"shape; got {c.shape}, {inl.shape} and {y.shape}.")
    x = _design(c.ravel(), inl.ravel())[:, 1:].reshape(*c.shape, 2)  # checks finite, non-negative
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise InputError(f"Fitting the fusion needs pairs of the same and of different animals; got {n_pos} same "
                         f"of {y.size}. Use labelled images of more animals, with 2+ images each.")
    sd = x.reshape(-1, 2).std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    rows = np.arange(len(c))
    dirs = [np.array([np.cos(t), np.sin(t)]) / sd for t in np.linspace(0.0, np.pi / 2, RANK_ANGLES)]
    top1 = np.array([y[rows, np.argmax(x @ w, axis=1)].mean() for w in dirs])
    best_w, best_ab, best_ll = None, None, -np.inf
    for i in np.flatnonzero(top1 >= top1.max() - RANK_TOLERANCE - 1e-12):
        z = (x @ dirs[i]).ravel()
        ab = _logistic(np.c_[np.ones_like(z), z], y.ravel(), ridge, iterations)
        p = np.clip(_sigmoid(ab[0] + ab[1] * z), 1e-12, 1 - 1e-12)
        ll = float(np.mean(np.where(y.ravel(), np.log(p), np.log1p(-p))))
        if ll > best_ll + 1e-12:  # strictly better: ties keep the direction nearer cosine
            best_w, best_ab, best_ll = dirs[i], ab, ll
    a, b = best_ab
    if b <= 0:  # the combined score does not rise with same-animal pairs: nothing to rank by, fit pairs
        return fit_fusion(c.ravel(), inl.ravel(), y.ravel(), ridge, feature_kind, k, iterations)
    floor = float(c[y].min())
    return Fusion((float(a), float(b * best_w[0]), float(b * best_w[1])), True, feature_kind, int(k), int(y.size),
                  n_pos, floor=floor, fit="ranking")


def _logistic(x: np.ndarray, same: Sequence[bool], ridge: float, iterations: int) -> np.ndarray:
    """Ridge logistic regression (Newton) of ``same`` on ``x`` (first column the intercept), raw-unit weights."""
    y = np.asarray(same, bool).reshape(-1).astype(np.float64)
    if y.shape[0] != x.shape[0]:
        raise InputError(f"Need one same/different label per pair ({x.shape[0]} pairs, {y.shape[0]} labels).")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise InputError(f"Fitting the fusion needs pairs of the same and of different animals; got {n_pos} same "
                         f"of {len(y)}. Use labelled images of more animals, with 2+ images each.")
    # the ridge acts on standardised columns, so it shrinks cosine (spread ~0.05 among candidates) no more
    # than inliers (spread ~1 in log units); the weights are mapped back to raw units at the end
    mu, sd = x[:, 1:].mean(axis=0), x[:, 1:].std(axis=0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = np.c_[x[:, :1], (x[:, 1:] - mu) / sd]
    w = np.zeros(x.shape[1])
    w[0] = np.log(n_pos / (len(y) - n_pos))
    reg = ridge * len(y) * np.eye(x.shape[1])
    reg[0, 0] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + reg @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + reg + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return np.r_[w[0] - np.sum(w[1:] * mu / sd), w[1:] / sd]


def pays(top1_without: float, top1_with: float, margin: float = PAYS_MARGIN) -> bool:
    """Verification is worth its cost when it raises held-out top-1 by at least ``margin``."""
    return bool(np.isfinite(top1_with) and np.isfinite(top1_without) and top1_with >= top1_without + margin)
