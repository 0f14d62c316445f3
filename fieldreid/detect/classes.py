"""Class names: parsing them from model metadata and mapping them to MegaDetector categories.

MegaDetector models name their classes ``animal``, ``person``, ``vehicle``; those map directly. A COCO
model (yolov5n-coco, yolo11n) maps its animal classes to ``animal``, ``person`` to ``person`` and its
road/air/water vehicles to ``vehicle``; everything else (chairs, bottles...) is category 0, which the
:class:`~fieldreid.detect.Detector` drops unless asked to keep it.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence

import numpy as np

from fieldreid.errors import ModelError
from fieldreid.types import CATEGORY_IDS

#: COCO class names that count as animals for camera-trap purposes.
COCO_ANIMALS = frozenset({"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"})
COCO_VEHICLES = frozenset({"bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"})

#: Other spellings seen in detector class lists (MegaDetector releases and ecosystem fine-tunes).
_ALIASES = {
    "animals": "animal",
    "people": "person",
    "human": "person",
    "humans": "person",
    "vehicles": "vehicle",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
}


def md_category(name: str) -> int:
    """MegaDetector category id for one class name: 1 animal, 2 person, 3 vehicle, 0 anything else.

    >>> md_category("animal"), md_category("zebra"), md_category("truck"), md_category("chair")
    (1, 1, 3, 0)
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in CATEGORY_IDS:
        return CATEGORY_IDS[key]
    if key in COCO_ANIMALS:
        return CATEGORY_IDS["animal"]
    if key in COCO_VEHICLES:
        return CATEGORY_IDS["vehicle"]
    return 0


def category_lookup(names: Sequence[str]) -> np.ndarray:
    """``(C,)`` int64 array: class index -> MegaDetector category (index with the detector's class ids)."""
    return np.array([md_category(n) for n in names], dtype=np.int64)


def nms_groups(names: Sequence[str]) -> np.ndarray:
    """``(C,)`` int64 NMS group per class: the MegaDetector category (1 animal, 2 person, 3 vehicle) for
    classes that map to one, so that all the animal classes of a COCO model suppress each other (one box
    per animal: a bobcat scored as both ``cat`` and ``dog`` keeps only its best box); a class that maps to
    none is a group of its own (``4 + index``), so a ``chair`` never suppresses a ``bottle``.

    >>> nms_groups(["person", "cat", "dog", "car", "chair", "bottle"]).tolist()
    [2, 1, 1, 3, 8, 9]
    """
    cats = category_lookup(names)
    return np.where(cats > 0, cats, 4 + np.arange(cats.size, dtype=np.int64))


def _names_from_container(obj: object, source: str) -> list[str]:
    if isinstance(obj, Mapping):
        try:
            items = sorted((int(k), str(v)) for k, v in obj.items())
        except (TypeError, ValueError) as exc:
            raise ModelError(f"Class names in {source} have non-integer keys: {exc}") from exc
        if [k for k, _ in items] != list(range(len(items))):
            raise ModelError(f"Class names in {source} must be numbered 0..C-1, got keys {[k for k, _ in items]}.")
        return [v for _, v in items]
    if isinstance(obj, list | tuple):
        return [str(v) for v in obj]
    raise ModelError(f"Class names in {source} must be a list or a dict, got {type(obj).__name__}.")


def parse_names(text: str, source: str = "model metadata") -> list[str]:
    """Parse class names from metadata text: a JSON list/dict, or the Python-literal dict that YOLOv5 and
    ultralytics exports write (``{0: 'person', 1: 'bicycle'}``). Uses ``ast.literal_eval``, never ``eval``.

    >>> parse_names("{0: 'animal', 1: 'person', 2: 'vehicle'}")
    ['animal', 'person', 'vehicle']
    """
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        try:
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise ModelError(f"Could not parse the class names in {source}: {str(text)[:80]!r}") from exc
    return _names_from_container(obj, source)


def names_from_metadata(metadata: Mapping[str, str]) -> list[str] | None:
    """Class names from ``fieldreid.names`` (ours) or ``names`` (YOLOv5/ultralytics exports); None if absent."""
    for key in ("fieldreid.names", "names"):
        if key in metadata and str(metadata[key]).strip():
            return parse_names(metadata[key], f"metadata key {key!r}")
    return None
