"""Open-set decisions: known / new / uncertain, with provisional identities for new animals.

For the best-matching identity's score ``s`` and the thresholds of its species and the embedder:

* ``s >= upper`` → **known**: the crop is that animal.
* ``s < lower`` → **new**: no animal in the gallery; a provisional identity ``<species>-P0001`` is created
  holding this crop's embedding, so later crops of the same animal match it (a *known* decision naming
  the provisional id) instead of creating more.
* otherwise → **uncertain**: ``identity`` names the best candidate for a person to review; nothing is
  created.

Thresholds come from ``fieldreid calibrate`` (stored per species and model in the gallery). Until then
the defaults below apply and every decision says ``calibrated: False``: cosine scores depend on the
embedder, so an uncalibrated decision is a guess and is flagged as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from fieldreid.errors import InputError
from fieldreid.gallery.search import Searcher

#: Used while a gallery has no calibrated thresholds for a species/model. Chosen for fine-tuned re-ID
#: embedders (AnimalCLEF 2025 entries report best single thresholds of 0.6-0.7); ImageNet features score
#: unrelated animals higher, which is why uncalibrated decisions are flagged.
DEFAULT_UPPER = 0.70
DEFAULT_LOWER = 0.55
DEFAULT_METHOD = "default (uncalibrated)"
FALLBACK_SPECIES = "animal"


@dataclass(frozen=True)
class Thresholds:
    upper: float = DEFAULT_UPPER
    lower: float = DEFAULT_LOWER
    method: str = DEFAULT_METHOD
    calibrated: bool = False

    def __post_init__(self) -> None:
        if self.lower > self.upper:
            raise InputError(f"Thresholds need lower <= upper (got lower={self.lower}, upper={self.upper}).")

    def decide(self, score: float | None) -> str:
        """``known`` / ``new`` / ``uncertain`` for a best score (None: empty gallery → new)."""
        if score is None or not np.isfinite(score) or score < self.lower:
            return "new"
        return "known" if score >= self.upper else "uncertain"


def thresholds_for(gallery, species: str, model_id: str) -> Thresholds:
    stored = gallery.thresholds(species, model_id)
    if stored is None:
        return Thresholds()
    return Thresholds(stored.upper, stored.lower, stored.method, True)


@dataclass
class Decision:
    """One crop's outcome, with everything needed to audit it later."""

    decision: str
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
                 create_provisional: bool = True, record: bool = True, k: int = 5) -> None:
        self.gallery = gallery
        self.searcher = searcher or Searcher(gallery)
        self.species = species
        self.create_provisional = create_provisional
        self.record = record
        self.k = max(2, k)

    def _species_for(self, best: str | None) -> str:
        if self.species:
            return self.species
        if best is not None:
            sp = self.searcher.species_of(best)
            if sp:
                return sp
        known = self.gallery.species()
        return known[0] if len(known) == 1 else FALLBACK_SPECIES

    def identify(self, vectors: np.ndarray, model_id: str, sources: Sequence[str] | None = None,
                 boxes: Sequence[Sequence[float] | None] | None = None, captured: Sequence[str | None] | None = None,
                 camera: Sequence[str | None] | None = None) -> list[Decision]:
        vec = np.asarray(vectors, dtype=np.float32)
        if vec.ndim == 1:
            vec = vec[None, :]
        n = vec.shape[0]
        sources = list(sources) if sources is not None else [""] * n
        boxes = list(boxes) if boxes is not None else [None] * n
        captured = list(captured) if captured is not None else [None] * n
        camera = list(camera) if camera is not None else [None] * n
        if not (len(sources) == len(boxes) == len(captured) == len(camera) == n):
            raise InputError("identify needs one source, box, capture time and camera per vector.")
        self.gallery.check_model(model_id, vec.shape[1])
        out: list[Decision] = []
        for i in range(n):
            [res] = self.searcher.search(vec[i], k=self.k, species=self.species)
            best, second = res.best, res.runner_up
            version = self.searcher.version  # the gallery state this decision was made against
            species = self._species_for(best[0] if best else None)
            th = thresholds_for(self.gallery, species, model_id)
            decision = th.decide(best[1] if best else None)
            identity = best[0] if best and decision != "new" else None
            created = False
            if decision == "new" and self.create_provisional:
                identity = self.gallery.add_provisional(species, vec[i], model_id, sources[i] or f"crop-{i}",
                                                        boxes[i])
                created = True
            box = tuple(float(v) for v in boxes[i]) if boxes[i] is not None else None
            out.append(Decision(
                decision=decision, identity=identity, score=best[1] if best else None,
                runner_up=second[0] if second else None, runner_up_score=second[1] if second else None,
                upper=th.upper, lower=th.lower, calibrated=th.calibrated, threshold_method=th.method,
                model_id=model_id, gallery_version=version, species=species, source=sources[i],
                box=box, top=res.top(5), created_identity=created))
        if self.record and out:
            ids = self.gallery.add_sightings([{
                "image": d.source, "box": d.box, "captured": captured[j], "camera": camera[j],
                "decision": d.decision, "identity_id": d.identity, "score": d.score, "runner_up_id": d.runner_up,
                "runner_up_score": d.runner_up_score, "upper": d.upper, "lower": d.lower,
                "threshold_method": d.threshold_method, "model_id": d.model_id,
                "gallery_version": d.gallery_version} for j, d in enumerate(out)])
            for d, sid in zip(out, ids, strict=True):
                d.sighting_id = sid
        return out
