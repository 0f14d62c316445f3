"""Open-set decisions: known / new / uncertain, with provisional identities for new animals.

For the best-matching identity's score ``s`` and the thresholds of its species and the embedder:

* ``s >= upper`` → **known**: the crop is that animal.
* ``s < lower`` → **new**: no animal in the gallery; a provisional identity ``<species>-P0001`` is created
  holding this crop's embedding, so later crops of the same animal match it (a *known* decision naming
  the provisional id) instead of creating more.
* otherwise → **uncertain**: ``identity`` names the best candidate for a person to review; nothing is
  created.

Thresholds come from, in this order: ``fieldreid calibrate`` for the population (stored per species and
model in the gallery: source ``gallery``); the embedder's own thresholds, chosen when it was built on
identities it was not trained on and carried in its metadata (source ``model``, see
:mod:`fieldreid.embed.thresholds`); else the defaults below (source ``default``), and then every decision
says ``calibrated: False``: cosine scores depend on the embedder, so an uncalibrated decision is a guess
and is flagged as one. Each decision records its source and the method that chose its thresholds.

Each decision also carries a calibrated **probability** where the gallery holds one for (species, model)
(:class:`fieldreid.verify.fuse.Fusion`, stored by ``fieldreid calibrate``): for *known* and *uncertain*,
P(the crop is the named identity) = the fusion's probability of the best candidate - the fused probability
(cosine + inliers) where verification pays and ran, else the cosine-only fit's; for *new*, P(a new animal)
= 1 - P(best candidate) (1 when the gallery has no candidate at all). ``probability_source`` says which fit
(``fused`` / ``cosine``). Without a stored fusion the probability is None: a cosine is never passed off as
one. ``score`` stays the number the thresholds compare (the cosine, or the fused probability where
verification decided).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from fieldreid.errors import InputError
from fieldreid.gallery.search import Searcher
from fieldreid.gallery.store import UNKNOWN_SPECIES
from fieldreid.types import DecisionKind

if TYPE_CHECKING:
    from fieldreid.verify.fuse import Fusion

#: Used while a gallery has no calibrated thresholds for a species/model. Chosen for fine-tuned re-ID
#: embedders (AnimalCLEF 2025 entries report best single thresholds of 0.6-0.7); ImageNet features score
#: unrelated animals higher, which is why uncalibrated decisions are flagged.
DEFAULT_UPPER = 0.70
DEFAULT_LOWER = 0.55
DEFAULT_METHOD = "default (uncalibrated)"
FALLBACK_SPECIES = UNKNOWN_SPECIES  # "animal": the species could not be told


@dataclass(frozen=True)
class Thresholds:
    upper: float = DEFAULT_UPPER
    lower: float = DEFAULT_LOWER
    method: str = DEFAULT_METHOD
    calibrated: bool = False
    source: str = "default"  # gallery (calibrated for the population) | model (the embedder's) | default

    def __post_init__(self) -> None:
        if self.lower > self.upper:
            raise InputError(f"Thresholds need lower <= upper (got lower={self.lower}, upper={self.upper}).")

    def decide(self, score: float | None) -> DecisionKind:
        """``known`` / ``new`` / ``uncertain`` for a best score (None: empty gallery → new)."""
        if score is None or not np.isfinite(score) or score < self.lower:
            return DecisionKind.NEW
        return DecisionKind.KNOWN if score >= self.upper else DecisionKind.UNCERTAIN


def thresholds_for(gallery, species: str, model_id: str, model: Thresholds | None = None) -> Thresholds:
    """The gallery's calibrated thresholds for (species, model), else the model's own, else the defaults."""
    stored = gallery.thresholds(species, model_id)
    if stored is None:
        return model if model is not None else Thresholds()
    return Thresholds(stored.upper, stored.lower, stored.method, True, "gallery")


@dataclass
class Decision:
    """One crop's outcome, with everything needed to audit it later."""

    decision: DecisionKind
    identity: str | None
    score: float | None
    runner_up: str | None
    runner_up_score: float | None
    upper: float
    lower: float
    calibrated: bool
    threshold_method: str
    model_id: str
    gallery_version: int
    species: str
    source: str = ""
    box: tuple[float, float, float, float] | None = None
    top: list[tuple[str, float]] = field(default_factory=list)
    created_identity: bool = False
    sighting_id: int | None = None
    threshold_source: str = "default"
    #: calibrated P(the decision is right): P(crop is ``identity``) for known / uncertain, P(new animal) for new;
    #: None where the gallery holds no calibration for (species, model)
    probability: float | None = None
    #: which stored fit gave it: ``fused`` (cosine + inliers) or ``cosine``; None without a probability
    probability_source: str | None = None
    #: P(crop is that identity) for each entry of ``top`` (empty without a calibration)
    top_probability: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        probs = d.pop("top_probability")
        d["top"] = [{"identity": i, "score": round(s, 6),
                     "probability": round(probs[j], 6) if j < len(probs) else None}
                    for j, (i, s) in enumerate(self.top)]
        return d

    def reassigned(self, alt: tuple[str, float] | None) -> Decision:
        """This decision moved to ``alt`` - an entry (identity, score) of ``top``, the best candidate still
        open - or None (none is), decided again with its own thresholds (*new* below the lower one), with
        the probability that goes with it. Used where two tracks of one frame name the same animal."""
        decision = Thresholds(self.upper, self.lower, self.threshold_method).decide(alt[1] if alt else None)
        prob = None
        if self.probability_source is not None:
            p_of = dict(zip((i for i, _ in self.top), self.top_probability, strict=False))
            # with no open candidate left in ``top``, its lowest probability bounds every one not listed
            p_alt = p_of.get(alt[0]) if alt else (min(self.top_probability) if self.top_probability else 0.0)
            if p_alt is not None:
                prob = 1.0 - p_alt if decision == DecisionKind.NEW else p_alt
        return replace(self, decision=decision, identity=alt[0] if alt and decision != DecisionKind.NEW else None,
                       score=alt[1] if alt else None, probability=prob,
                       probability_source=self.probability_source if prob is not None else None)


class Identifier:
    """Search, decide, create provisional identities and record sightings, one crop at a time.

    Crops are processed in order, each against the gallery as left by the previous one, so two crops of
    one new animal in the same batch give one provisional identity (the second is a *known* match to it).

    >>> ident = Identifier(Gallery("g.db"))                              # doctest: +SKIP
    >>> ident.identify(vectors, embedder.model_id, sources=["a.jpg"])  # doctest: +SKIP
    """

    def __init__(self, gallery, searcher: Searcher | None = None, species: str | None = None,
                 create_provisional: bool = True, record: bool = True, k: int = 5,
                 model_thresholds: Thresholds | None = None) -> None:
        self.gallery = gallery
        self.model_thresholds = model_thresholds  # the embedder's own (Embedder.thresholds), if it has any
        self.searcher = searcher or Searcher(gallery)
        self.species = species
        self.create_provisional = create_provisional
        self.record = record
        self.k = max(2, k)

    def _species_for(self, best: str | None, species: str | None = None) -> str:
        """The decision's species: the one given, else that of the identity the match was found in (the
        search then covered every species in the gallery), else the gallery's only species, else 'animal'."""
        if species or self.species:
            return species or self.species
        if best is not None:
            sp = self.searcher.species_of(best)
            if sp:
                return sp
        known = self.gallery.species()
        return known[0] if len(known) == 1 else FALLBACK_SPECIES

    def _fusion(self, species: str, model_id: str, cache: dict) -> Fusion | None:
        """The gallery's stored fusion for (species, model), read once per :meth:`identify` call."""
        from fieldreid.verify.fuse import Fusion

        if species not in cache:
            stored = self.gallery.fusion(species, model_id)
            cache[species] = Fusion.from_dict(stored) if stored else None
        return cache[species]

    def _verified(self, vector: np.ndarray, features, fusion: Fusion | None, restrict: str | None
                  ) -> tuple[Thresholds, list[tuple[str, float]]] | None:
        """Fused-probability ranking of the top-K gallery images and its threshold, or None where the gallery
        has no fusion for (species, model), calibration found verification does not pay, or no features.

        ``features`` may be a callable that extracts them with a given keypoint cap (the one the fusion was
        fitted on, :func:`fieldreid.verify.features.keypoints_of`): it is called only when the query is
        matched, so a query below the fusion's floor (:meth:`Fusion.verifies`) costs no extraction; it is
        scored by the fusion with zero inliers, and the decision's threshold method says it was not matched.
        Features of another kind than the fusion's (another keypoint cap or recipe) are never scored by it:
        cosine decides."""
        from fieldreid.verify.features import LocalFeatures, keypoints_of
        from fieldreid.verify.rerank import rerank

        if fusion is None or not fusion.pays or not fusion.uses_inliers:
            return None
        try:
            cap = keypoints_of(fusion.feature_kind)
        except InputError:
            return None  # a fusion from another fieldreid's recipe: cosine decides until `calibrate --verify`
        threshold = float(fusion.evidence.get("threshold", 0.5))
        rows, idents, cos = self.searcher.top_images(vector, max(1, fusion.k), restrict)
        if not len(rows):
            return None
        method = f"fused probability, verification K={fusion.k}"
        if not fusion.verifies(max(cos)):
            ranked = rerank(None, idents, cos, [None] * len(rows), fusion)
            th = Thresholds(threshold, threshold, f"{method}; below its floor {fusion.floor:.3f}: not matched",
                            True, "gallery")
            return th, ranked.top()
        if callable(features):
            features = features(cap)
            if features is None:
                return None  # the crop could not be read again: cosine decides
        if features.kind != fusion.feature_kind:
            return None  # fitted on other features: its probabilities would not hold for these
        blobs = self.gallery.local_features(rows, features.kind)
        if not blobs:
            return None  # a gallery not indexed yet (`fieldreid gallery reindex`): cosine decides
        cand = [LocalFeatures.from_bytes(blobs[int(r)]) if int(r) in blobs else None for r in rows]
        ranked = rerank(features, idents, cos, cand, fusion)
        th = Thresholds(threshold, threshold, method, True, "gallery")
        return th, ranked.top()

    def identify(self, vectors: np.ndarray, model_id: str, sources: Sequence[str] | None = None,
                 boxes: Sequence[Sequence[float] | None] | None = None, captured: Sequence[str | None] | None = None,
                 camera: Sequence[str | None] | None = None,
                 source_sha256: Sequence[str | None] | None = None, species: str | None = None,
                 query_features: Sequence | None = None) -> list[Decision]:
        """Decide each vector; recorded sightings carry their vector and, with ``source_sha256`` (the source
        file's content hash), are unique by (source content, box): identifying a photo again records nothing new.

        ``species`` (e.g. the camera's) restricts this call's search to that species, overriding the
        identifier's own; with neither, every species in the gallery is searched and each decision carries
        the species of the identity it was matched to.

        ``query_features`` (:class:`fieldreid.verify.features.LocalFeatures` per vector, a callable that
        extracts them when needed, or None): where the gallery holds a fusion for the species and model that
        calibration found pays, the top-K gallery images are re-scored by local verification and the decision is made on the fused probability
        (:meth:`_verified`)."""
        vec = np.asarray(vectors, dtype=np.float32)
        if vec.ndim == 1:
            vec = vec[None, :]
        n = vec.shape[0]
        sources = list(sources) if sources is not None else [""] * n
        boxes = list(boxes) if boxes is not None else [None] * n
        captured = list(captured) if captured is not None else [None] * n
        camera = list(camera) if camera is not None else [None] * n
        if not (len(sources) == len(boxes) == len(captured) == len(camera) == n) or (
                source_sha256 is not None and len(source_sha256) != n):
            raise InputError("identify needs one source, box, capture time, camera (and hash) per vector.")
        if query_features is not None and len(query_features) != n:
            raise InputError(f"identify needs one feature set (or None) per vector ({n} vectors, "
                             f"{len(query_features)} feature sets).")
        self.gallery.check_model(model_id, vec.shape[1])
        out: list[Decision] = []
        fusions: dict = {}
        for i in range(n):
            [res] = self.searcher.search(vec[i], k=self.k, species=species or self.species)
            best, second = res.best, res.runner_up
            version = self.searcher.version  # the gallery state this decision was made against
            sp = self._species_for(best[0] if best else None, species)
            th = thresholds_for(self.gallery, sp, model_id, self.model_thresholds)
            fusion = self._fusion(sp, model_id, fusions)
            verified = None
            if best and query_features is not None and query_features[i] is not None:
                verified = self._verified(vec[i], query_features[i], fusion, species or self.species)
            top = res.top(5)
            if verified is not None:
                th, ranked = verified
                best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
                top = ranked[:5]
                top_p, p_source = [s for _, s in top], "fused"  # the fused scores are the probabilities
            else:
                cos_fit = fusion.for_cosine() if fusion is not None else None
                p_source = "cosine" if cos_fit is not None else None
                top_p = [float(v) for v in cos_fit.probability([s for _, s in top])] if cos_fit and top else []
            decision = th.decide(best[1] if best else None)
            identity = best[0] if best and decision != DecisionKind.NEW else None
            probability = None
            if p_source is not None:
                # top[0] is the best candidate (search and re-ranking both list best first)
                p_best = top_p[0] if top_p else 0.0
                probability = 1.0 - p_best if decision == DecisionKind.NEW else p_best
            created = False
            if decision == DecisionKind.NEW and self.create_provisional:
                identity = self.gallery.add_provisional(sp, vec[i], model_id, sources[i] or f"crop-{i}",
                                                        boxes[i])
                created = True
            box = tuple(float(v) for v in boxes[i]) if boxes[i] is not None else None
            out.append(Decision(
                decision=decision, identity=identity, score=best[1] if best else None,
                runner_up=second[0] if second else None, runner_up_score=second[1] if second else None,
                upper=th.upper, lower=th.lower, calibrated=th.calibrated, threshold_method=th.method,
                model_id=model_id, gallery_version=version, species=sp, source=sources[i],
                box=box, top=top, created_identity=created, threshold_source=th.source,
                probability=probability, probability_source=p_source, top_probability=top_p))
        if self.record and out:
            ids = self.gallery.add_sightings([{
                "image": d.source, "box": d.box, "captured": captured[j], "camera": camera[j],
                "decision": d.decision, "identity_id": d.identity, "score": d.score, "runner_up_id": d.runner_up,
                "runner_up_score": d.runner_up_score, "upper": d.upper, "lower": d.lower,
                "threshold_method": d.threshold_method, "model_id": d.model_id,
                "gallery_version": d.gallery_version, "vector": vec[j], "probability": d.probability,
                "probability_source": d.probability_source,
                "source_sha256": source_sha256[j] if source_sha256 is not None else None} for j, d in enumerate(out)])
            for d, sid in zip(out, ids, strict=True):
                d.sighting_id = sid
        return out
