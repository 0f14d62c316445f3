"""Decoders for the output layouts of YOLO-family detectors, and a greedy NMS, in plain numpy.

Layouts (``LAYOUTS``):

- ``yolov5``: one output ``[B, N, 5 + C]`` of ``(cx, cy, w, h, objectness, class probs...)`` in input
  pixels: YOLOv5's own ONNX export and MegaDetector v5 ONNX files. Score = objectness * class prob.
- ``yolov5-raw``: the YOLOv5 head *before* its Detect layer decodes, one output per stride
  ``[B, na, ny, nx, 5 + C]`` of logits; decoded here with the anchors and strides from the metadata.
- ``ultralytics``: one output ``[B, 4 + C, N]`` of ``(cx, cy, w, h, class scores...)`` (YOLOv8/9/11,
  MegaDetector v1000); no objectness.
- ``end2end``: one output ``[B, K, 6]`` of ``(x1, y1, x2, y2, score, class)`` from NMS-free heads
  (YOLOv10, YOLO26, MegaDetector v6-yolov10): thresholding only.

Every decoder returns, per image, an ``(n, 6)`` float32 array ``[x1, y1, x2, y2, score, class]`` in the
model's input pixels, sorted by score (highest first). Mapping back to the original image is
:func:`fieldreid.detect.letterbox.scale_boxes`'s job.

NMS is class-aware by default (YOLOv5's and ultralytics' rule). ``groups`` widens it: ``groups[c]`` is the
NMS group of class ``c`` and boxes of one group suppress each other whatever their classes. The
:class:`~fieldreid.detect.Detector` passes :func:`fieldreid.detect.classes.nms_groups`, so a COCO model's
``cat`` and ``dog`` boxes on one bobcat (IoU 0.94) become one ``animal`` box, as MegaDetector output means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fieldreid.errors import InputError, ModelError

LAYOUTS = ("yolov5", "yolov5-raw", "ultralytics", "end2end")

#: at most this many candidates enter NMS per image, highest scores first (as YOLOv5/ultralytics do):
#: with a near-zero threshold an untrained or noisy model can otherwise make NMS quadratic.
MAX_NMS = 30000


def _check_thresholds(conf: float, iou: float, max_det: int) -> None:
    if not 0.0 <= conf <= 1.0:
        raise InputError(f"conf must be between 0 and 1, got {conf}")
    if not 0.0 <= iou <= 1.0:
        raise InputError(f"iou must be between 0 and 1, got {iou}")
    if int(max_det) < 1:
        raise InputError(f"max_det must be at least 1, got {max_det}")


def xywh2xyxy(xywh: np.ndarray) -> np.ndarray:
    """Centre/size boxes ``(..., 4)`` to corner boxes."""
    out = np.empty_like(xywh)
    half_w, half_h = xywh[..., 2] / 2, xywh[..., 3] / 2
    out[..., 0] = xywh[..., 0] - half_w
    out[..., 1] = xywh[..., 1] - half_h
    out[..., 2] = xywh[..., 0] + half_w
    out[..., 3] = xywh[..., 1] + half_h
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``(N, 4)`` and ``(M, 4)`` xyxy boxes, ``(N, M)`` float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = iw.clip(0) * ih.clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS, the same rule as ``torchvision.ops.nms``: visit boxes by descending score, drop every
    later box whose IoU with a kept box is *greater* than ``iou_thres``. Returns kept indices, best first.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores).reshape(-1)
    if boxes.shape[0] != scores.shape[0]:
        raise InputError(f"nms: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    if boxes.shape[0] == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[order, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    alive = np.ones(order.size, bool)
    keep: list[int] = []
    limit = order.size if max_keep is None else int(max_keep)
    for i in range(order.size):
        if not alive[i]:
            continue
        keep.append(i)
        if len(keep) >= limit:
            break
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if rest.size == 0:
            break
        iw = (np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])).clip(0)
        ih = (np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])).clip(0)
        inter = iw * ih
        union = areas[i] + areas[rest] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        alive[rest[iou > iou_thres]] = False
    return order[np.asarray(keep, np.int64)]


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_thres: float, max_keep: int | None = None
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Uses the coordinate-offset trick (each class shifted beyond every other class's boxes), in float64
    so the shift costs no precision; the result equals running :func:`nms` per class and merging by score.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, np.int64)
    classes = np.asarray(classes).reshape(-1)
    span = float(max(boxes.max() - min(boxes.min(), 0.0), 0.0)) + 1.0
    offset = (classes.astype(np.float64) * span)[:, None]
    return nms(boxes + offset, scores, iou_thres, max_keep)


def nms_keys(cls: np.ndarray, groups: np.ndarray | Sequence[int] | None) -> np.ndarray:
    """The NMS key of each box: ``groups[cls]``, or the class itself without ``groups``. A class beyond the
    end of ``groups`` (a model with more classes than names) is a group of its own."""
    cls = np.asarray(cls, np.int64)
    if groups is None:
        return cls
    groups = np.asarray(groups, np.int64).reshape(-1)
    if groups.size == 0:
        return cls
    inside = (cls >= 0) & (cls < groups.size)
    return np.where(inside, groups[np.where(inside, cls, 0)], int(groups.max()) + 1 + np.abs(cls))


def _select(
    xyxy: np.ndarray, score: np.ndarray, cls: np.ndarray, conf: float, iou: float, max_det: int, agnostic: bool,
    groups: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Threshold, cap at MAX_NMS, NMS (per class, per group of classes, or agnostic), cap at max_det ->
    ``(n, 6)`` float32 with the boxes' own classes."""
    mask = score > conf
    xyxy, score, cls = xyxy[mask], score[mask], cls[mask]
    if score.size == 0:
        return np.zeros((0, 6), np.float32)
    if score.size > MAX_NMS:
        top = np.argsort(-score, kind="stable")[:MAX_NMS]
        xyxy, score, cls = xyxy[top], score[top], cls[top]
    if agnostic:
        keep = nms(xyxy, score, iou, max_det)
    else:
        keep = batched_nms(xyxy, score, nms_keys(cls, groups), iou, max_det)
    keep = keep[:max_det]
    out = np.empty((keep.size, 6), np.float32)
    out[:, :4] = xyxy[keep]
    out[:, 4] = score[keep]
    out[:, 5] = cls[keep]
    return out


def _check_3d(pred: np.ndarray, what: str) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.ndim == 2:
        pred = pred[None]
    if pred.ndim != 3:
        raise ModelError(f"A {what} detector output must be 3-D, got shape {pred.shape}; is this the right layout?")
    if not np.issubdtype(pred.dtype, np.floating):
        raise ModelError(f"A {what} detector output must be floating point, got {pred.dtype}.")
    return pred.astype(np.float32, copy=False)


def decode_yolov5(
    pred: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 300, agnostic: bool = False,
    groups: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Decode ``[B, N, 5 + C]`` (xywh, objectness, class probs) into per-image ``(n, 6)`` detections.

    Same rule as YOLOv5's ``non_max_suppression`` (best class only): score = obj * cls prob; with
    ``groups``, NMS keys on the class's group instead of the class (see the module docstring).
    """
    _check_thresholds(conf, iou, max_det)
    pred = _check_3d(pred, "yolov5")
    if pred.shape[2] < 6:
        raise ModelError(f"A yolov5 output needs 5 + classes values per box, got shape {pred.shape}.")
    results = []
    for x in pred:
        x = x[x[:, 4] > conf]  # objectness bounds the score, so this pre-filter loses nothing
        cls_scores = x[:, 5:] * x[:, 4:5]
        cls = cls_scores.argmax(1) if x.shape[0] else np.zeros(0, np.int64)
        score = cls_scores[np.arange(x.shape[0]), cls]
        results.append(_select(xywh2xyxy(x[:, :4]), score, cls, conf, iou, max_det, agnostic, groups))
    return results


def raw_to_yolov5(
    outputs: Sequence[np.ndarray], anchors: np.ndarray | Sequence, strides: Sequence[float]
) -> np.ndarray:
    """Decode raw YOLOv5 head logits (one ``[B, na, ny, nx, 5 + C]`` array per stride) to ``[B, N, 5 + C]``.

    What YOLOv5's ``Detect`` layer does in inference: sigmoid everything, then
    ``xy = (2 s - 0.5 + grid) * stride`` and ``wh = (2 s)^2 * anchor``; ``anchors`` are in input pixels,
    shape ``(levels, na, 2)``. Boxes come out in the same order as YOLOv5's own export.
    """
    anchors = np.asarray(anchors, np.float32)
    if anchors.ndim != 3 or anchors.shape[-1] != 2 or anchors.shape[0] != len(outputs) or len(strides) != len(outputs):
        raise ModelError(
            f"Raw YOLOv5 head: {len(outputs)} outputs but anchors of shape {anchors.shape} and "
            f"{len(strides)} strides; the anchors metadata must be (levels, anchors per level, 2)."
        )
    parts = []
    for level, x in enumerate(outputs):
        x = np.asarray(x, np.float32)
        if x.ndim != 5 or x.shape[1] != anchors.shape[1] or x.shape[4] < 6:
            raise ModelError(
                f"Raw YOLOv5 head output {level} must be [B, {anchors.shape[1]}, ny, nx, 5 + classes], got {x.shape}."
            )
        b, na, ny, nx, no = x.shape
        s = 1.0 / (1.0 + np.exp(-x))
        gy, gx = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
        grid = np.stack((gx, gy), -1)[None, None] - 0.5  # (1, 1, ny, nx, 2)
        out = s.copy()
        out[..., 0:2] = (s[..., 0:2] * 2 + grid) * np.float32(strides[level])
        out[..., 2:4] = (s[..., 2:4] * 2) ** 2 * anchors[level][None, :, None, None, :]
        parts.append(out.reshape(b, na * ny * nx, no))
    return np.concatenate(parts, axis=1)


def decode_yolov5_raw(
    outputs: Sequence[np.ndarray],
    anchors: np.ndarray | Sequence,
    strides: Sequence[float],
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    agnostic: bool = False,
    groups: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Decode a raw YOLOv5 head (see :func:`raw_to_yolov5`), then as :func:`decode_yolov5`."""
    return decode_yolov5(raw_to_yolov5(outputs, anchors, strides), conf, iou, max_det, agnostic, groups)


def decode_ultralytics(
    pred: np.ndarray, conf: float = 0.25, iou: float = 0.45, max_det: int = 300, agnostic: bool = False,
    groups: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Decode ``[B, 4 + C, N]`` (xywh, class scores; no objectness) into per-image ``(n, 6)`` detections;
    ``groups`` as in :func:`decode_yolov5`."""
    _check_thresholds(conf, iou, max_det)
    pred = _check_3d(pred, "ultralytics")
    if pred.shape[1] < 5:
        raise ModelError(f"An ultralytics output needs 4 + classes rows, got shape {pred.shape}.")
    results = []
    for x in pred:
        cls_scores = x[4:]  # (C, N)
        score = cls_scores.max(0)
        keep = np.flatnonzero(score > conf)
        cls = cls_scores[:, keep].argmax(0)
        xyxy = xywh2xyxy(x[:4, keep].T)
        results.append(_select(xyxy, score[keep], cls, conf, iou, max_det, agnostic, groups))
    return results


def decode_end2end(
    pred: np.ndarray, conf: float = 0.25, max_det: int = 300,
    groups: np.ndarray | Sequence[int] | None = None, iou: float = 0.45,
) -> list[np.ndarray]:
    """Threshold ``[B, K, 6]`` (x1, y1, x2, y2, score, class) from an NMS-free head.

    Such a head picks its top K over (anchor, class) pairs, so one animal can come out as a ``cat`` and a
    ``dog`` box: with ``groups``, boxes of one group overlapping by more than ``iou`` are suppressed too.
    """
    _check_thresholds(conf, iou, max_det)
    pred = _check_3d(pred, "end2end")
    if pred.shape[2] != 6:
        raise ModelError(f"An end2end output must be [B, K, 6] (x1, y1, x2, y2, score, class), got {pred.shape}.")
    results = []
    for x in pred:
        x = x[x[:, 4] > conf]
        x = x[np.argsort(-x[:, 4], kind="stable")]
        if groups is not None and len(x) > 1:
            x = x[batched_nms(x[:, :4], x[:, 4], nms_keys(x[:, 5].astype(np.int64), groups), iou)]
        results.append(np.ascontiguousarray(x[:max_det], np.float32))
    return results


def decode(
    outputs: Sequence[np.ndarray],
    layout: str,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    agnostic: bool = False,
    anchors: np.ndarray | None = None,
    strides: Sequence[float] | None = None,
    groups: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Decode a model's outputs (in output order) for ``layout``; see the module docstring. ``groups``
    (class -> NMS group) makes NMS suppress across the classes of a group (``end2end`` heads: only then)."""
    if layout not in LAYOUTS:
        raise ModelError(f"Unknown detector layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if len(outputs) == 0:
        raise ModelError("The detector produced no outputs.")
    if layout == "yolov5-raw":
        if anchors is None or strides is None:
            raise ModelError("A raw YOLOv5 head needs anchors and strides in its metadata; re-export with convert.")
        return decode_yolov5_raw(outputs, anchors, strides, conf, iou, max_det, agnostic, groups)
    if layout == "yolov5":
        return decode_yolov5(outputs[0], conf, iou, max_det, agnostic, groups)
    if layout == "ultralytics":
        return decode_ultralytics(outputs[0], conf, iou, max_det, agnostic, groups)
    return decode_end2end(outputs[0], conf, max_det, groups, iou)
