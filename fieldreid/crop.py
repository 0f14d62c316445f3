"""The crop of an animal: one rule for every route that makes an embedding.

An embedding is only comparable with embeddings made the same way. Enrolment (of crops or of frames),
``identify``, ``watch``, ``eval``, ``calibrate``, training data, synced crops and report pictures all cut
their pixels here, so the same photo gives the same vector whichever route it takes.

The rule (:data:`CROP_RULE`):

1. **The box.** On a camera frame, every animal box of the detector. On an image that is a labelled
   animal crop already (a re-id dataset crop, ``--crops``) the detector runs too and the animal is its
   most confident animal box covering at least :data:`MIN_COVER` of the image
   (:func:`choose_animal`); when it finds none, the whole image is the box. A tight dataset crop and the
   detector's box on the same photo in a camera folder therefore meet: both are that box. A labelled
   frame takes the same box, else its most confident animal box of any size (``eval``: else the whole
   image), so a photo enrolled as a crop or as a frame gives one embedding whenever a box covers a quarter.
2. **The margin.** The box grows by :data:`MARGIN` of its width (height) on the left and right (top and
   bottom) and is clipped to the image (:func:`cut`). No padding: the embedder's own preprocessing
   (``stretch`` or ``letterbox``, carried in the model's metadata) turns the crop into the input tensor.
3. **The pixels.** Each box is cut from the coarsest DCT decode at which its shorter side still has the
   embedder's input side (:func:`crop_reduction`), whatever decode the caller happened to hold, so
   resolution does not depend on the route either (a crop from a 1/2-scale decode and one from a full decode
   differ by up to 0.014 in cosine).

Measured with the default ImageNet EfficientNet-Lite0 (one-vs-all top-1 on ``reid/zebra``, all 362 images /
on ``reid/nyala`` test, 729): the old crops route (whole image, stretched) 0.865 / 0.156; the old watch
crop (square around the box, 10 % margin, replicated borders) 0.807 / 0.119; this rule 0.870 / 0.147.
Squaring with padding cost the most (replicated or constant borders fill up to half the input of a wide
flank crop; 10-30 % margins, stretched, gave 0.84-0.87 / 0.14-0.15); requiring a box to cover a quarter of
a labelled crop keeps a small background detection from standing in for the animal. Any box-based rule
gives up some open-set GM to the whole image on these sets (mean of 5 seeds, zebra 0.706 -> 0.680, nyala
0.189 -> 0.181): a photo session's background helps an ImageNet embedder that cannot yet tell the animals
apart. The same photo through ``enroll --crops`` and ``watch`` gives cosine >= 0.9999.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fieldreid.errors import InputError
from fieldreid.frames.decode import Frame, min_reduction, read_image, to_frame_coords

#: version of the rule below; recorded with enrolments and watch results (provenance)
CROP_RULE = "box+20%-clipped/v1"
#: the box grows by this fraction of its width (height) on each side, clipped to the image
MARGIN = 0.2
#: on a labelled crop, an animal box must cover at least this fraction of the image to be "the animal"
MIN_COVER = 0.25
ANIMAL = 1  # MegaDetector category of animals
_REDUCTIONS = (8, 4, 2, 1)


def whole_box(size_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box of a whole image of full-resolution ``(height, width)``."""
    return 0.0, 0.0, float(size_hw[1]), float(size_hw[0])


def cut(image: np.ndarray, box_xyxy: Sequence[float], margin: float = MARGIN) -> np.ndarray:
    """The crop of ``box_xyxy`` (pixel coordinates of ``image``): grown by ``margin`` of its width (height)
    on each side, clipped to the image, never padded.

    >>> cut(np.zeros((100, 200, 3), np.uint8), (50, 40, 90, 60)).shape
    (28, 56, 3)
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        desc = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"A crop needs an HxWxC image, got {desc}.")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    bw, bh = x2 - x1, y2 - y1
    if not (np.isfinite([x1, y1, x2, y2]).all() and bw > 0 and bh > 0):
        raise InputError(f"Box {tuple(box_xyxy)} is empty or not finite; expected x1 < x2 and y1 < y2.")
    ih, iw = image.shape[:2]
    if x2 <= 0 or y2 <= 0 or x1 >= iw or y1 >= ih:
        raise InputError(f"Box {tuple(box_xyxy)} lies outside the {iw}x{ih} image.")
    # 1e-3 px of slack: a box mapped between decode scales in float32 must not gain a row of pixels
    left = max(0, math.floor(x1 - margin * bw + 1e-3))
    top = max(0, math.floor(y1 - margin * bh + 1e-3))
    right = min(iw, max(left + 1, math.ceil(x2 + margin * bw - 1e-3)))
    bottom = min(ih, max(top + 1, math.ceil(y2 + margin * bh - 1e-3)))
    return np.ascontiguousarray(image[top:bottom, left:right])


def _is_jpeg(frame: Frame) -> bool:
    if frame.reduction > 1:
        return True
    head = frame.data[:2] if frame.data is not None else b""
    if not head:
        try:
            with Path(frame.path).open("rb") as fh:
                head = fh.read(2)
        except OSError:
            return False
    return head == b"\xff\xd8"


def crop_reduction(frame: Frame, box_xyxy: Sequence[float], side: int, is_jpeg: bool | None = None) -> int:
    """The DCT reduction (1, 2, 4 or 8) a box's crop is cut from: the coarsest at which the box's shorter
    side (full-resolution pixels) keeps at least ``side`` pixels; never finer than the image's decoded-pixel
    budget allows; always 1 for images that are not JPEGs (only JPEGs decode reduced)."""
    if not (is_jpeg if is_jpeg is not None else _is_jpeg(frame)):
        return 1
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    shortest = max(1.0, min(x2 - x1, y2 - y1))
    r = next((c for c in _REDUCTIONS if shortest / c >= side), 1)
    floor = min_reduction((frame.size[1], frame.size[0]), getattr(frame, "max_pixels", None), True) or 1
    return max(r, floor)


def crops(frame: Frame, boxes_xyxy: np.ndarray | Sequence[Sequence[float]], side: int,
          margin: float = MARGIN) -> list[np.ndarray]:
    """The crop of each box (full-resolution coordinates) of ``frame``, by the one rule (module docstring).

    ``frame`` may be any decode of the image (the detector's reduced one, say); a box whose rule asks for
    another scale is cut from one more decode of the same bytes (``frame.data``) or file, at most one
    per scale and call.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    jpeg = _is_jpeg(frame) if len(boxes) else False
    decoded: dict[int, Frame] = {frame.reduction: frame}
    out = []
    for box in boxes:
        r = crop_reduction(frame, box, side, jpeg)
        src = decoded.get(r)
        if src is None:
            src = decoded[r] = read_image(frame.path, reduction=r, data=frame.data,
                                          max_pixels=getattr(frame, "max_pixels", None))
        out.append(cut(src.pixels, to_frame_coords(src, box[None])[0], margin))
    return out


def choose_animal(confidence: np.ndarray, category: np.ndarray, xyxy: np.ndarray, size_hw: tuple[int, int],
                  min_conf: float = 0.0, min_cover: float = 0.0) -> int | None:
    """Index of "the animal" of an image: the most confident animal box at or above ``min_conf`` covering at
    least ``min_cover`` of the image (first of equals), or None when there is none."""
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    if len(xyxy) == 0:
        return None
    h, w = size_hw
    cover = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]) / max(1.0, float(h) * float(w))
    ok = (np.asarray(category) == ANIMAL) & (np.asarray(confidence) >= min_conf) & (cover >= min_cover)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    return int(idx[np.argmax(np.asarray(confidence)[idx])])
