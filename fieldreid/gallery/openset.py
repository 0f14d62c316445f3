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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from fieldreid.errors import InputError
from fieldreid.gallery.search import Searcher
from fieldreid.gallery.store import UNKNOWN_SPECIES
from fieldreid.types import DecisionKind

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box) if self.box is not None else None
        d["top"] = [{"identity": i, "score": round(s, 6)} for i, s in self.top]
        return d


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

    def _verified(self, vector: np.ndarray, features, species: str, model_id: str, restrict: str | None
                  ) -> tuple[Thresholds, list[tuple[str, float]]] | None:
        """Fused-probability ranking of the top-K gallery images and its threshold, or None where the gallery
        has no fusion for (species, model), calibration found verification does not pay, or no features."""
        from fieldreid.verify.features import LocalFeatures
        from fieldreid.verify.fuse import Fusion
        from fieldreid.verify.rerank import rerank

        stored = self.gallery.fusion(species, model_id)
        if not stored or not stored.get("pays") or not stored.get("uses_inliers"):
            return None
        fusion = Fusion.from_dict(stored)
        threshold = float(fusion.evidence.get("threshold", 0.5))
        rows, idents, cos = self.searcher.top_images(vector, max(1, fusion.k), restrict)
        if not len(rows):
            return None
        blobs = self.gallery.local_features(rows, features.kind)
        if not blobs:
            return None  # a gallery not indexed yet (`fieldreid gallery reindex`): cosine decides
        cand = [LocalFeatures.from_bytes(blobs[int(r)]) if int(r) in blobs else None for r in rows]
        ranked = rerank(features, idents, cos, cand, fusion)
        th = Thresholds(threshold, threshold, f"fused probability, verification K={fusion.k}", True, "gallery")
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

        ``query_features`` (:class:`fieldreid.verify.features.LocalFeatures` per vector, or None): where the
        gallery holds a fusion for the species and model that calibration found pays, the top-K gallery
        images are re-scored by local verification and the decision is made on the fused probability
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
        for i in range(n):
            [res] = self.searcher.search(vec[i], k=self.k, species=species or self.species)
            best, second = res.best, res.runner_up
            version = self.searcher.version  # the gallery state this decision was made against
            sp = self._species_for(best[0] if best else None, species)
            th = thresholds_for(self.gallery, sp, model_id, self.model_thresholds)
            verified = None
            if best and query_features is not None and query_features[i] is not None:
                verified = self._verified(vec[i], query_features[i], sp, model_id, species or self.species)
            if verified is not None:
                th, top = verified
                best, second = top[0], (top[1] if len(top) > 1 else None)
            decision = th.decide(best[1] if best else None)
            identity = best[0] if best and decision != DecisionKind.NEW else None
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
                box=box, top=verified[1][:5] if verified else res.top(5), created_identity=created,
                threshold_source=th.source))
        if self.record and out:
            ids = self.gallery.add_sightings([{
                "image": d.source, "box": d.box, "captured": captured[j], "camera": camera[j],
                "decision": d.decision, "identity_id": d.identity, "score": d.score, "runner_up_id": d.runner_up,
                "runner_up_score": d.runner_up_score, "upper": d.upper, "lower": d.lower,
                "threshold_method": d.threshold_method, "model_id": d.model_id,
                "gallery_version": d.gallery_version, "vector": vec[j],
                "source_sha256": source_sha256[j] if source_sha256 is not None else None} for j, d in enumerate(out)])
            for d, sid in zip(out, ids, strict=True):
                d.sighting_id = sid
        return out
