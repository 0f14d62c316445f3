"""Letterbox resizing (keep aspect ratio, pad to the model's input size) and the way back.

The arithmetic follows YOLOv5/ultralytics ``LetterBox`` so that a model trained with their
dataloaders sees the same pixels here: scale by ``min(new/old)``, round the resized size, split the
padding in two halves (the odd pixel goes bottom/right via the ``± 0.1`` rounding trick).

Square or rectangular: a model with a fixed input size gets every image padded to that size (a 4:3 frame
to 640 x 640, a quarter of it grey). A model whose spatial axes are dynamic can take the smallest
rectangle that holds the resized image, each side rounded up to a multiple of the stride (YOLOv5's
"rect"/``auto`` letterbox): 4:3 -> 640 x 480, 16:9 -> 640 x 384, a portrait 3:4 -> 480 x 640
(:func:`rect_shape`). The scale is the same as the square's, so boxes map back the same way; only the
padding (and the work on it) goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fieldreid.errors import InputError, ModelError
from fieldreid.types import PreprocessSpec

#: ``PreprocessSpec.interpolation`` -> the OpenCV resize flag used for the letterbox
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST, "bicubic": cv2.INTER_CUBIC,
                  "area": cv2.INTER_AREA}


@dataclass(frozen=True)
class LetterboxInfo:
    """How one image was letterboxed: enough to map boxes back to its pixels."""

    ratio: tuple[float, float]  # (width gain, height gain) original -> resized; both r, see letterbox()
    pad: tuple[float, float]  # (pad width, pad height) added on the left / top, in input pixels
    orig_shape: tuple[int, int]  # (height, width) of the original image


def _as_hw(shape: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(shape, int | np.integer):
        return int(shape), int(shape)
    if len(shape) != 2:
        raise InputError(f"new_shape must be an int or (height, width), got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_image(image: np.ndarray, index: int | None = None) -> np.ndarray:
    """Return ``image`` as HxWx3 uint8 BGR; grayscale and BGRA are converted, anything else is an InputError."""
    where = "" if index is None else f" (image {index})"
    if not isinstance(image, np.ndarray):
        raise InputError(f"Expected a numpy image array{where}, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        raise InputError(f"Expected a uint8 image{where}, got dtype {image.dtype}; read it with cv2.imread.")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"Expected an HxWx3 BGR image{where}, got shape {image.shape}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"Image{where} is empty (shape {image.shape}).")
    return image


def _gain_and_size(orig_hw: tuple[int, int], new_shape: int | Sequence[int], scaleup: bool = True
                   ) -> tuple[float, int, int]:
    """The one gain ``r`` (``min(new / old)``, at most 1 without ``scaleup``) and the resized (w, h)."""
    new_h, new_w = _as_hw(new_shape)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if h <= 0 or w <= 0:
        raise InputError(f"An image needs a positive height and width, got {(h, w)}.")
    r = min(new_h / h, new_w / w)
    if not scaleup:
        r = min(r, 1.0)
    return r, int(round(w * r)), int(round(h * r))


def rect_shape(orig_hw: tuple[int, int], new_shape: int | Sequence[int] = (640, 640), stride: int = 32,
               scaleup: bool = True) -> tuple[int, int]:
    """The smallest model input (h, w) for an image of ``orig_hw`` under ``letterbox(..., auto=True)``: the image
    resized as for ``new_shape``, each side padded up to a multiple of ``stride`` (never beyond ``new_shape``
    when that is a multiple of ``stride``).

    >>> rect_shape((1536, 2048)), rect_shape((1080, 1920)), rect_shape((4032, 3024)), rect_shape((1000, 333))
    ((480, 640), (384, 640), (640, 480), (640, 224))
    """
    if int(stride) < 1:
        raise InputError(f"stride must be at least 1, got {stride}")
    new_h, new_w = _as_hw(new_shape)
    _, unpad_w, unpad_h = _gain_and_size(orig_hw, (new_h, new_w), scaleup)
    return unpad_h + (new_h - unpad_h) % stride, unpad_w + (new_w - unpad_w) % stride


def letterbox(
    image: np.ndarray,
    new_shape: int | tuple[int, int] = (640, 640),
    stride: int = 32,
    auto: bool = False,
    scaleup: bool = True,
    color: int | tuple[int, int, int] = 114,
    interpolation: int = cv2.INTER_LINEAR,
    pad_to: tuple[int, int] | None = None,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize ``image`` (HxWx3 BGR uint8) keeping its aspect ratio and pad it to ``new_shape`` (h, w).

    ``auto=True`` pads only to the next multiple of ``stride`` (:func:`rect_shape`: a smaller, non-square
    input for models with dynamic spatial axes); ``pad_to`` (h, w) instead pads the image, resized as for
    ``new_shape``, to that size (a batch of different rectangles padded to the batch's largest);
    ``scaleup=False`` never enlarges small images.
    Returns ``(padded, (ratio_w, ratio_h), (pad_w, pad_h))`` where pad is the left/top offset.

    >>> img = np.zeros((480, 640, 3), np.uint8)
    >>> out, ratio, pad = letterbox(img, 640)
    >>> out.shape, ratio, pad
    ((640, 640, 3), (1.0, 1.0), (0.0, 80.0))
    >>> letterbox(img, 640, auto=True)[0].shape
    (480, 640, 3)
    """
    image = check_image(image)
    new_h, new_w = _as_hw(new_shape)
    h, w = image.shape[:2]
    r, unpad_w, unpad_h = _gain_and_size((h, w), (new_h, new_w), scaleup)
    if pad_to is not None:
        if auto:
            raise InputError("letterbox: pass auto=True or pad_to, not both.")
        out_h, out_w = _as_hw(pad_to)
        if out_h < unpad_h or out_w < unpad_w:
            raise InputError(f"letterbox: pad_to {(out_h, out_w)} is smaller than the resized image "
                             f"{(unpad_h, unpad_w)}.")
    elif auto:
        out_h, out_w = rect_shape((h, w), (new_h, new_w), stride, scaleup)
    else:
        out_h, out_w = new_h, new_w
    dw, dh = out_w - unpad_w, out_h - unpad_h
    dw, dh = dw / 2, dh / 2
    if (w, h) != (unpad_w, unpad_h):
        image = cv2.resize(image, (unpad_w, unpad_h), interpolation=interpolation)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    if isinstance(color, int | np.integer):
        color = (int(color),) * 3
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    # Ratio: the one gain r, as YOLOv5/ultralytics/MegaDetector use it to map boxes back (the resized
    # size was rounded, so the exact per-axis gain differs by < 0.5 input px; matching the ecosystem
    # keeps our boxes identical to theirs). Pad: what was actually added on the left/top.
    return image, (r, r), (float(left), float(top))


def scale_boxes(
    boxes: np.ndarray,
    ratio: tuple[float, float] | float,
    pad: tuple[float, float],
    orig_shape: tuple[int, int],
    clip: bool = True,
) -> np.ndarray:
    """Map ``(N, 4)`` xyxy boxes from letterboxed input pixels back to the original image and clip.

    >>> scale_boxes(np.array([[0, 80, 640, 560.]]), (1.0, 1.0), (0.0, 80.0), (480, 640))
    array([[  0.,   0., 640., 480.]], dtype=float32)
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InputError(f"boxes must have shape (N, 4), got {boxes.shape}")
    rw, rh = (ratio, ratio) if np.isscalar(ratio) else ratio
    out = boxes.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / rw
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / rh
    if clip:
        h, w = orig_shape[:2]
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
    return out


def preprocess(
    images: Sequence[np.ndarray],
    new_shape: int | tuple[int, int] = (640, 640),
    stride: int = 32,
    color: int = 114,
    spec: PreprocessSpec | None = None,
    rect: bool = False,
) -> tuple[np.ndarray, list[LetterboxInfo]]:
    """Letterbox a list of BGR images into one ``(B, 3, H, W)`` float32 RGB tensor scaled to [0, 1].

    All images go to the same fixed ``new_shape`` so they stack into one batch. With ``rect`` (models with
    dynamic spatial axes) the batch is the smallest stride-multiple rectangle instead: each image's
    :func:`rect_shape`, and for images of different shapes the largest of them (each image centred in it,
    at the same scale as alone). With ``spec`` (the model's :class:`~fieldreid.types.PreprocessSpec`,
    ``resize="letterbox"``) its size, padding value, interpolation, channel order and ``mean``/``std`` (on
    [0, 1] pixels) are used instead.
    """
    rgb, mean, std, interpolation = True, None, None, cv2.INTER_LINEAR
    if spec is not None:
        if spec.resize != "letterbox":
            raise ModelError(f"A detector's input is letterboxed; its preprocessing says resize={spec.resize!r}.")
        if spec.interpolation not in INTERPOLATIONS:
            raise ModelError(f"Unknown interpolation {spec.interpolation!r} in the detector's preprocessing "
                             f"(known: {', '.join(INTERPOLATIONS)}).")
        new_shape, color, rgb = spec.size, spec.pad_value, spec.color == "RGB"
        interpolation = INTERPOLATIONS[spec.interpolation]
        if tuple(spec.mean) != (0.0, 0.0, 0.0) or tuple(spec.std) != (1.0, 1.0, 1.0):
            mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
    if len(images) == 0:
        h, w = _as_hw(new_shape)
        return np.zeros((0, 3, h, w), np.float32), []
    new_hw = _as_hw(new_shape)
    images = [check_image(img, i) for i, img in enumerate(images)]
    if rect:
        shapes = [rect_shape(img.shape[:2], new_hw, stride) for img in images]
        h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    else:
        h, w = new_hw
    batch = np.empty((len(images), 3, h, w), np.float32)
    infos: list[LetterboxInfo] = []
    for i, img in enumerate(images):
        boxed, ratio, pad = letterbox(img, new_hw, stride=stride, color=color, interpolation=interpolation,
                                      pad_to=(h, w))
        # BGR HWC uint8 -> RGB (or BGR) CHW float32 in one pass over the pixels.
        batch[i] = (boxed[:, :, ::-1] if rgb else boxed).transpose(2, 0, 1)
        infos.append(LetterboxInfo(ratio, pad, (img.shape[0], img.shape[1])))
    batch /= np.float32(255.0)  # divide (not multiply by 1/255) to match the reference pipelines bit for bit
    if mean is not None:
        batch -= mean
        batch /= std
    return batch, infos
