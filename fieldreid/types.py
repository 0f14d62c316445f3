"""Central data types passed between pipeline stages: plain numpy, validated on construction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fieldreid.errors import InputError, ModelError

#: MegaDetector's detection categories; the JSON output uses these string ids.
MD_CATEGORIES: dict[str, str] = {"1": "animal", "2": "person", "3": "vehicle"}
CATEGORY_IDS: dict[str, int] = {"animal": 1, "person": 2, "vehicle": 3}


class DecisionKind(StrEnum):
    """The open-set answer for one animal. A member equals its bare string (``DecisionKind.NEW == "new"``),
    so the values stored in galleries, results databases and CSV files are the plain words."""

    KNOWN = "known"          # best score >= upper: that identity
    NEW = "new"              # best score < lower (or an empty gallery): an animal not in the gallery
    UNCERTAIN = "uncertain"  # in between: a curator decides


class FileState(StrEnum):
    """What ``fieldreid watch`` did with a camera file (``files.status`` in the results database)."""

    PENDING = "pending"      # not yet readable (still being copied): tried again on every pass
    DONE = "done"            # read, hashed, decoded; its results are stored with it
    FAILED = "failed"        # unreadable, with the reason
    DUPLICATE = "duplicate"  # the same content (sha256) as a done image


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image, in pixel coordinates of the (EXIF-rotated) original image.

    One numpy array per field: ``xyxy (N, 4) float32``, ``confidence (N,) float32``,
    ``class_id (N,) int64`` (the detector's own class index) and ``category (N,) int64``
    (MegaDetector category: 1 animal, 2 person, 3 vehicle, 0 for classes outside those three).

    >>> d = Detections.empty()
    >>> len(d)
    0
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    category: np.ndarray

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise InputError(f"Detections.xyxy must have shape (N, 4), got {xyxy.shape}")
        n = xyxy.shape[0]
        object.__setattr__(self, "xyxy", xyxy)
        for name, dtype in (("confidence", np.float32), ("class_id", np.int64), ("category", np.int64)):
            arr = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            if arr.shape != (n,):
                raise InputError(f"Detections.{name} must have shape ({n},), got {arr.shape}")
            object.__setattr__(self, name, arr)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0), np.zeros(0))

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index: int | slice | np.ndarray) -> Detections:
        if isinstance(index, int | np.integer):
            index = slice(int(index), int(index) + 1) if index != -1 else slice(-1, None)
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index], self.category[index])

    def __iter__(self) -> Iterator[Detections]:
        for i in range(len(self)):
            yield self[i]


@dataclass(frozen=True)
class Crop:
    """Pixels of one detected animal (BGR uint8, HxWx3) and where they came from."""

    pixels: np.ndarray
    source: str
    box_xyxy: tuple[float, float, float, float]
    confidence: float
    category: int = 1

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] != 3 or self.pixels.dtype != np.uint8:
            raise InputError(f"Crop.pixels must be an HxWx3 uint8 array, got {self.pixels.shape} {self.pixels.dtype}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input tensor; stored in the ONNX metadata, never retyped by hand.

    ``size`` is (height, width); ``mean``/``std`` apply to pixel values scaled to [0, 1];
    ``color`` is the channel order the model expects (``RGB`` or ``BGR``); ``layout`` is ``NCHW``.
    ``resize`` is ``stretch`` (plain resize to size) or ``letterbox`` (keep aspect ratio, pad).
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = "RGB"
    layout: str = "NCHW"
    resize: str = "stretch"
    interpolation: str = "bilinear"
    pad_value: int = 114
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "BGR"):
            raise InputError(f"PreprocessSpec.color must be RGB or BGR, got {self.color!r}")
        if self.layout != "NCHW":
            raise InputError(f"PreprocessSpec.layout must be NCHW, got {self.layout!r}")
        if self.resize not in ("stretch", "letterbox"):
            raise InputError(f"PreprocessSpec.resize must be stretch or letterbox, got {self.resize!r}")
        if len(self.size) != 2 or min(self.size) <= 0:
            raise InputError(f"PreprocessSpec.size must be (height, width) > 0, got {self.size!r}")

    def to_json(self) -> str:
        return json.dumps(
            {
                "size": list(self.size),
                "mean": list(self.mean),
                "std": list(self.std),
                "color": self.color,
                "layout": self.layout,
                "resize": self.resize,
                "interpolation": self.interpolation,
                "pad_value": self.pad_value,
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        try:
            d = json.loads(text)
            return cls(
                size=(int(d["size"][0]), int(d["size"][1])),
                mean=tuple(float(x) for x in d["mean"]),
                std=tuple(float(x) for x in d["std"]),
                color=d["color"],
                layout=d.get("layout", "NCHW"),
                resize=d.get("resize", "stretch"),
                interpolation=d.get("interpolation", "bilinear"),
                pad_value=int(d.get("pad_value", 114)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"The model's preprocessing metadata is malformed ({exc}): re-export the model.") from exc
