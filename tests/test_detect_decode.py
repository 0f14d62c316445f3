"""Unit tests of the detector runtime on synthetic arrays: decoders, NMS, letterbox, layout, classes.

No torch, no model files: these run in a second or two.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fieldreid.detect import (
    Detector,
    batched_nms,
    box_iou,
    category_lookup,
    decode,
    decode_end2end,
    decode_ultralytics,
    decode_yolov5,
    decode_yolov5_raw,
    infer_layout,
    letterbox,
    md_category,
    nms,
    nms_groups,
    parse_names,
    preprocess,
    raw_to_yolov5,
    scale_boxes,
)
from fieldreid.detect.classes import names_from_metadata
from fieldreid.detect.decode import nms_keys
from fieldreid.engines import Engine, EngineIO
from fieldreid.errors import InputError, ModelError


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Textbook greedy NMS, one pair at a time."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    keep: list[int] = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


# -- NMS ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thr", [0.3, 0.45, 0.7])
def test_nms_matches_brute_force(seed: int, thr: float) -> None:
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 150)
    scores = rng.random(150)  # continuous: no ties, so the order is unique
    assert nms(boxes, scores, thr).tolist() == brute_force_nms(boxes, scores, thr)


def test_nms_max_keep_and_empty() -> None:
    rng = np.random.default_rng(1)
    boxes, scores = random_boxes(rng, 80), rng.random(80)
    full = nms(boxes, scores, 0.5)
    assert nms(boxes, scores, 0.5, max_keep=3).tolist() == full[:3].tolist()
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)
    with pytest.raises(InputError):
        nms(boxes, scores[:-1], 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_is_per_class_nms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 200), rng.random(200)
    classes = rng.integers(0, 4, 200)
    got = batched_nms(boxes, scores, classes, 0.45)
    expected = []
    for c in range(4):
        idx = np.flatnonzero(classes == c)
        expected += idx[nms(boxes[idx], scores[idx], 0.45)].tolist()
    expected.sort(key=lambda i: -scores[i])
    assert got.tolist() == expected


def test_box_iou() -> None:
    a = np.array([[0, 0, 10, 10.0]])
    b = np.array([[0, 0, 10, 10.0], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])


# -- yolov5 layout ------------------------------------------------------------------------------------------
def yolov5_row(cx, cy, w, h, obj, cls, nc=3, p=1.0):
    row = np.zeros(5 + nc, np.float32)
    row[:5] = cx, cy, w, h, obj
    row[5 + cls] = p
    return row


def test_yolov5_class_aware_nms() -> None:
    # Two nearly identical boxes: same class -> one survives; different classes -> both (unless agnostic).
    same = np.stack([yolov5_row(50, 50, 20, 20, 0.9, 0), yolov5_row(51, 50, 20, 20, 0.8, 0)])[None]
    diff = np.stack([yolov5_row(50, 50, 20, 20, 0.9, 0), yolov5_row(51, 50, 20, 20, 0.8, 1)])[None]
    assert len(decode_yolov5(same, conf=0.1)[0]) == 1
    out = decode_yolov5(diff, conf=0.1)[0]
    assert out.shape == (2, 6) and out[:, 5].tolist() == [0, 1]
    assert len(decode_yolov5(diff, conf=0.1, agnostic=True)[0]) == 1
    np.testing.assert_allclose(out[0], [40, 40, 60, 60, 0.9, 0], atol=1e-6)


#: names of a small COCO-like model: two animal classes, a person, two classes outside every category
GROUP_NAMES = ["person", "cat", "dog", "chair", "bottle"]


def one_bobcat_rows() -> np.ndarray:
    """yolov5 rows like a COCO model on a bobcat (IMAG0046_bobcat.JPG): ``cat`` 0.6 and ``dog`` 0.3 on
    nearly the same box (IoU 0.95), a person beside it, and a chair and a bottle on one spot."""
    nc = len(GROUP_NAMES)
    return np.stack([yolov5_row(50, 50, 40, 40, 0.6, 1, nc), yolov5_row(50.5, 50, 40, 40, 0.3, 2, nc),
                     yolov5_row(55, 50, 40, 40, 0.5, 0, nc), yolov5_row(150, 50, 20, 20, 0.4, 3, nc),
                     yolov5_row(150, 50, 20, 20, 0.35, 4, nc)])


def test_nms_groups_follow_megadetector_categories() -> None:
    assert nms_groups(GROUP_NAMES).tolist() == [2, 1, 1, 7, 8]
    assert nms_groups(["animal", "person", "vehicle"]).tolist() == [1, 2, 3]
    coco_like = ["person", "car", "truck", "bird", "cat", "dog", "zebra", "giraffe", "kite"]
    assert nms_groups(coco_like).tolist() == [2, 3, 3, 1, 1, 1, 1, 1, 12]
    # classes beyond the table are groups of their own, never merged into a table group
    assert nms_keys(np.array([1, 2, 5, 6]), np.array([2, 1, 1])).tolist() == [1, 1, 8, 9]
    assert nms_keys(np.array([0, 3]), None).tolist() == [0, 3]


def test_grouped_nms_keeps_one_box_per_animal() -> None:
    """Defect 8: per-class NMS left a cat box and a dog box on one animal (two new individuals)."""
    pred = one_bobcat_rows()[None]
    per_class = decode_yolov5(pred, conf=0.1)[0]
    assert per_class[:, 5].tolist() == [1, 0, 3, 4, 2]  # the old rule: the dog box survives the cat box
    out = decode_yolov5(pred, conf=0.1, groups=nms_groups(GROUP_NAMES))[0]
    # one animal box (the best one, keeping its own class and score); the person overlaps it (IoU 0.78)
    # but is another category; the chair and the bottle are each their own group
    assert out[:, 5].tolist() == [1, 0, 3, 4]
    np.testing.assert_allclose(out[0], [30, 30, 70, 70, 0.6, 1], atol=1e-6)
    # the same rule in every layout that runs NMS, and on the end2end head that has none of its own
    ul = np.concatenate([pred[0][:, :4], pred[0][:, 5:] * pred[0][:, 4:5]], 1).T[None]
    np.testing.assert_array_equal(decode_ultralytics(ul, 0.1, groups=nms_groups(GROUP_NAMES))[0], out)
    e2e = per_class.copy()[None]
    assert len(decode_end2end(e2e, conf=0.1)[0]) == 5
    np.testing.assert_array_equal(decode_end2end(e2e, conf=0.1, groups=nms_groups(GROUP_NAMES))[0], out)
    assert decode([pred], "yolov5", 0.1, groups=nms_groups(GROUP_NAMES))[0][:, 5].tolist() == [1, 0, 3, 4]
    assert len(decode_yolov5(pred, conf=0.1, agnostic=True)[0]) == 2  # agnostic: the best box per spot


def test_yolov5_score_is_obj_times_cls_and_threshold_is_strict() -> None:
    pred = np.stack([yolov5_row(50, 50, 20, 20, 0.5, 2, p=0.6), yolov5_row(150, 50, 20, 20, 0.9, 1, p=0.2)])[None]
    out = decode_yolov5(pred, conf=0.1)[0]
    np.testing.assert_allclose(out[:, 4], [0.3, 0.18], rtol=1e-6)
    assert out[:, 5].tolist() == [2, 1]
    assert len(decode_yolov5(pred, conf=0.3)[0]) == 0  # 0.5 * 0.6 is not > 0.3 (float32 rounding aside)
    assert len(decode_yolov5(pred, conf=0.29)[0]) == 1


def test_yolov5_max_det_and_batch() -> None:
    rows = [yolov5_row(20 + 30 * i, 20, 10, 10, 0.9 - 0.01 * i, 0) for i in range(20)]  # disjoint boxes
    second = np.stack(rows)
    second[5:, 4] = 0.01  # below conf
    pred = np.stack([np.stack(rows), second])
    out = decode_yolov5(pred, conf=0.1, max_det=7)
    assert [len(o) for o in out] == [7, 5]
    assert np.all(np.diff(out[0][:, 4]) <= 0)  # best first


def test_empty_outputs() -> None:
    for out in (decode_yolov5(np.zeros((2, 0, 8), np.float32)), decode_yolov5(np.zeros((1, 100, 8), np.float32)),
                decode_ultralytics(np.zeros((1, 7, 0), np.float32)), decode_end2end(np.zeros((1, 0, 6), np.float32))):
        assert all(o.shape == (0, 6) and o.dtype == np.float32 for o in out)


def test_bad_shapes_and_arguments() -> None:
    with pytest.raises(ModelError):
        decode_yolov5(np.zeros((1, 2, 3, 8), np.float32))
    with pytest.raises(ModelError):
        decode_yolov5(np.zeros((1, 10, 5), np.float32))  # no class columns
    with pytest.raises(ModelError):
        decode_end2end(np.zeros((1, 10, 7), np.float32))
    with pytest.raises(ModelError):
        decode_ultralytics(np.zeros((1, 4, 10), np.float32))
    with pytest.raises(ModelError):
        decode_yolov5(np.zeros((1, 10, 8), np.int32))
    with pytest.raises(ModelError):
        decode([np.zeros((1, 10, 8), np.float32)], "yolov7")
    with pytest.raises(ModelError):
        decode([np.zeros((1, 3, 2, 2, 8), np.float32)], "yolov5-raw")  # no anchors
    with pytest.raises(InputError):
        decode_yolov5(np.zeros((1, 10, 8), np.float32), conf=1.5)
    with pytest.raises(InputError):
        decode_yolov5(np.zeros((1, 10, 8), np.float32), max_det=0)
    with pytest.raises(ModelError):
        raw_to_yolov5([np.zeros((1, 3, 2, 2, 8), np.float32)], np.ones((2, 3, 2)), [8, 16])


# -- other layouts ------------------------------------------------------------------------------------------
def test_ultralytics_equals_yolov5_with_unit_objectness() -> None:
    rng = np.random.default_rng(0)
    n, nc = 500, 4
    xywh = np.concatenate([rng.uniform(0, 640, (n, 2)), rng.uniform(5, 120, (n, 2))], 1)
    cls = rng.random((n, nc)) ** 3
    v5 = np.concatenate([xywh, np.ones((n, 1)), cls], 1).astype(np.float32)[None]
    ul = np.concatenate([xywh, cls], 1).T.astype(np.float32)[None]
    a, b = decode_yolov5(v5, 0.2, 0.45)[0], decode_ultralytics(ul, 0.2, 0.45)[0]
    assert len(a) > 10
    np.testing.assert_array_equal(a, b)


def test_end2end_threshold_sort_max_det() -> None:
    pred = np.array([[[0, 0, 10, 10, 0.3, 1], [5, 5, 20, 20, 0.9, 0], [1, 1, 2, 2, 0.1, 2], [0, 0, 9, 9, 0.5, 1]]],
                    np.float32)
    out = decode_end2end(pred, conf=0.2)[0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.5, 0.3])  # no NMS: overlapping boxes stay
    assert len(decode_end2end(pred, conf=0.2, max_det=2)[0]) == 2


def test_raw_head_matches_detect_formula() -> None:
    rng = np.random.default_rng(0)
    strides = [8.0, 16.0]
    anchors = np.array([[[10, 13], [16, 30]], [[30, 61], [62, 45]]], np.float32)
    outs = [rng.normal(size=(2, 2, 640 // s, 320 // s, 7)).astype(np.float32) for s in (8, 16)]
    flat = raw_to_yolov5(outs, anchors, strides)
    assert flat.shape == (2, 2 * 80 * 40 + 2 * 40 * 20, 7)

    def sig(v):
        return 1 / (1 + np.exp(-v))

    b, a, y, x, level = 1, 1, 7, 13, 1
    logit = outs[level][b, a, y, x]
    idx = 2 * 80 * 40 + (a * 40 + y) * 20 + x
    expected_xy = (sig(logit[:2]) * 2 - 0.5 + np.array([x, y])) * strides[level]
    expected_wh = (sig(logit[2:4]) * 2) ** 2 * anchors[level, a]
    np.testing.assert_allclose(flat[b, idx, :2], expected_xy, rtol=1e-5)
    np.testing.assert_allclose(flat[b, idx, 2:4], expected_wh, rtol=1e-5)
    np.testing.assert_allclose(flat[b, idx, 4:], sig(logit[4:]), rtol=1e-5)
    assert len(decode_yolov5_raw(outs, anchors, strides, conf=0.3)) == 2


# -- letterbox ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(480, 640), (1920, 2560), (75, 100), (1000, 333), (640, 640), (1232, 1824)])
def test_letterbox_and_scale_back(hw: tuple[int, int]) -> None:
    h, w = hw
    img = np.full((h, w, 3), 200, np.uint8)
    out, ratio, pad = letterbox(img, 640)
    assert out.shape == (640, 640, 3)
    r = min(640 / h, 640 / w)
    assert ratio == (r, r)
    # The image content sits exactly between the pads.
    rows = np.flatnonzero(out[:, :, 0].max(1) == 200)
    cols = np.flatnonzero(out[:, :, 0].max(0) == 200)
    assert rows[0] == pad[1] and cols[0] == pad[0]
    assert out[0, 0, 0] in (114, 200)
    # Boxes in the original image -> letterbox -> back again.
    box = np.array([[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]], np.float32)
    lb = box.copy()
    lb[:, [0, 2]] = lb[:, [0, 2]] * ratio[0] + pad[0]
    lb[:, [1, 3]] = lb[:, [1, 3]] * ratio[1] + pad[1]
    np.testing.assert_allclose(scale_boxes(lb, ratio, pad, (h, w)), box, rtol=1e-5, atol=1e-3)


def test_letterbox_auto_and_clip() -> None:
    out, _, pad = letterbox(np.zeros((480, 640, 3), np.uint8), 640, stride=32, auto=True)
    assert out.shape == (480, 640, 3) and pad == (0.0, 0.0)
    clipped = scale_boxes(np.array([[-10, -5, 700, 500.0]]), (1.0, 1.0), (0.0, 0.0), (480, 640))
    np.testing.assert_array_equal(clipped, [[0, 0, 640, 480]])
    assert scale_boxes(np.zeros((0, 4)), (1, 1), (0, 0), (10, 10)).shape == (0, 4)


def test_letterbox_rejects_bad_images() -> None:
    with pytest.raises(InputError):
        letterbox(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError):
        letterbox(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(InputError):
        letterbox(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InputError):
        letterbox("image.jpg")  # type: ignore[arg-type]
    gray, _, _ = letterbox(np.zeros((10, 20), np.uint8), 32)
    assert gray.shape == (32, 32, 3)


def test_preprocess_is_rgb_nchw_unit_range() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 255  # blue in BGR
    batch, infos = preprocess([img, img[:32]], (64, 64))
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert batch[0, 2].max() == 1.0 and batch[0, 0].max() == 0.0  # blue is channel 2 in RGB
    assert infos[1].orig_shape == (32, 64) and infos[1].pad == (0.0, 16.0)
    assert preprocess([], 64)[0].shape == (0, 3, 64, 64)


# -- classes and metadata -----------------------------------------------------------------------------------
def test_md_categories() -> None:
    assert [md_category(n) for n in ("animal", "person", "vehicle")] == [1, 2, 3]
    coco_animals = ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"]
    assert {md_category(n) for n in coco_animals} == {1}
    assert {md_category(n) for n in ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"]} == {3}
    assert md_category("chair") == 0 and md_category("teddy bear") == 0
    assert category_lookup(["person", "Animal", "kite"]).tolist() == [2, 1, 0]


def test_parse_names_is_safe() -> None:
    assert parse_names("{0: 'animal', 1: 'person', 2: 'vehicle'}") == ["animal", "person", "vehicle"]
    assert parse_names('["a", "b"]') == ["a", "b"]
    assert parse_names('{"1": "b", "0": "a"}') == ["a", "b"]
    with pytest.raises(ModelError):
        parse_names("__import__('os').system('true')")
    with pytest.raises(ModelError):
        parse_names("{0: 'a', 2: 'c'}")
    assert names_from_metadata({"names": "{0: 'x'}", "fieldreid.names": '["y"]'}) == ["y"]
    assert names_from_metadata({}) is None


def test_infer_layout() -> None:
    assert infer_layout([(1, 10, 6)], {"fieldreid.layout": "yolov5"}, 1) == "yolov5"
    with pytest.raises(ModelError):
        infer_layout([(1, 10, 6)], {"fieldreid.layout": "nope"}, 1)
    # yolov5 export.py: names + stride, [1, 25200, 85]
    assert infer_layout([(1, 25200, 85)], {"names": "...", "stride": "32"}, 80) == "yolov5"
    assert infer_layout([(1, 100800, 8)], {}, 3) == "yolov5"  # MegaDetector v5 at 1280
    assert infer_layout([(1, 84, 8400)], {"task": "detect", "imgsz": "[640, 640]"}, 80) == "ultralytics"
    assert infer_layout([(-1, 7, -1)], {"task": "detect"}, 3) == "ultralytics"  # MDv1000, dynamic anchors axis
    assert infer_layout([(1, 300, 6)], {"task": "detect", "end2end": "True"}, 80) == "end2end"
    assert infer_layout([(1, 300, 6)], {}, 80) == "end2end"
    assert infer_layout([(1, 300, 6)], {"task": "detect"}, 1) == "end2end"  # ultralytics never writes yolov5
    assert infer_layout([(1, 3, 80, 80, 85)] * 3, {}, 80) == "yolov5-raw"
    assert infer_layout([(-1, -1, -1)], {}, None) is None
    with pytest.raises(ModelError, match="layout="):
        infer_layout([(1, 25200, 6)], {}, 1)  # a 1-class YOLOv5 or an end2end head?
    with pytest.raises(ModelError, match="layout="):
        infer_layout([(1, 300, 6)], {}, None)
    with pytest.raises(ModelError):
        infer_layout([(1, 25200, 85)], {}, 3)  # shape fits no layout for 3 classes
    with pytest.raises(ModelError):
        infer_layout([(1, 85)], {}, 80)


# -- Detector on a stub engine ------------------------------------------------------------------------------
class StubEngine(Engine):
    """Returns a fixed yolov5-layout prediction for every image in the batch."""

    backend = "stub"

    def __init__(self, pred: np.ndarray, metadata: dict[str, str], batch: int = -1) -> None:
        self._pred, self._meta, self._batch = pred, metadata, batch
        self.calls: list[tuple] = []
        super().__init__(None)

    def _load(self) -> None:
        self.inputs = [EngineIO("images", (self._batch, 3, 64, 64), np.dtype(np.float32))]
        self.outputs = [EngineIO("output0", (self._batch, self._pred.shape[0], self._pred.shape[1]),
                                 np.dtype(np.float32))]
        self.metadata = self._meta

    def _run(self, feed):
        b = feed["images"].shape[0]
        self.calls.append(feed["images"].shape)
        return {"output0": np.repeat(self._pred[None], b, 0)}


def stub_prediction() -> np.ndarray:
    # names: person, chair, dog. A dog, a person, a chair (category 0).
    return np.stack([yolov5_row(16, 16, 8, 8, 0.9, 2), yolov5_row(48, 48, 8, 8, 0.8, 0),
                     yolov5_row(32, 32, 8, 8, 0.7, 1), yolov5_row(40, 10, 4, 4, 0.05, 2)])


def test_detector_on_stub_engine() -> None:
    meta = {"names": "{0: 'person', 1: 'chair', 2: 'dog'}", "stride": "32"}
    eng = StubEngine(stub_prediction(), meta)
    det = Detector(eng, conf=0.2, batch_size=2)
    assert det.layout == "yolov5" and det.names == ["person", "chair", "dog"] and det.input_size == (64, 64)
    images = [np.zeros((128, 256, 3), np.uint8), np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32), np.uint8)]
    res = det.detect(images)
    assert [s[0] for s in eng.calls] == [2, 1]  # dynamic batch: chunks of batch_size, no padding
    assert len(res) == 3
    d = res[0]  # 128x256 image into 64x64: gain 0.25, 32x64 resized, pad 16 px top
    assert d.category.tolist() == [1, 2] and d.class_id.tolist() == [2, 0]
    # input box (12, 12, 20, 20) -> minus pad (0, 16) -> / 0.25 gain; y1 = -16 is clipped to the top edge
    np.testing.assert_allclose(d.xyxy[0], [48, 0, 80, 16], atol=1e-4)
    assert len(Detector(eng, conf=0.2, keep_other=True).detect_one(images[1])) == 3
    assert len(det.detect([])) == 0
    with pytest.raises(InputError):
        det.detect_one(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError):
        det.detect(np.zeros((10, 10, 3), np.uint8))  # one image, not a list


def test_detector_keeps_one_box_per_animal() -> None:
    """A Detector on a COCO-like model: one animal box for one bobcat, not a cat box and a dog box."""
    names = "{" + ", ".join(f"{i}: '{n}'" for i, n in enumerate(GROUP_NAMES)) + "}"
    det = Detector(StubEngine(one_bobcat_rows(), {"names": names}), conf=0.1)
    d = det.detect_one(np.zeros((64, 64, 3), np.uint8))
    assert d.category.tolist() == [1, 2] and d.class_id.tolist() == [1, 0]
    assert (d.category == 1).sum() == 1


def test_detector_fixed_batch_pads() -> None:
    eng = StubEngine(stub_prediction(), {"fieldreid.names": '["person", "chair", "dog"]'}, batch=4)
    det = Detector(eng)
    assert det.batch == 4 and not det.dynamic_batch
    res = det.detect([np.zeros((64, 64, 3), np.uint8)] * 5)
    assert [s[0] for s in eng.calls] == [4, 4] and len(res) == 5


def test_detector_rejects_other_models() -> None:
    with pytest.raises(ModelError, match="embedder"):
        Detector(StubEngine(stub_prediction(), {"fieldreid.kind": "embedder"}))
    with pytest.raises(InputError):
        Detector(StubEngine(stub_prediction(), {}), layout="yolov7")
    with pytest.raises(InputError):
        Detector(StubEngine(stub_prediction(), {}), imgsz=640)  # the stub's input is fixed at 64


def test_import_does_not_pull_torch() -> None:
    code = textwrap.dedent("""
        import sys
        import fieldreid.detect
        import fieldreid.export.detector_onnx  # lazy too: torch is imported inside the functions
        heavy = [m for m in ("torch", "ultralytics", "yolov5", "onnx", "torchvision") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"importing fieldreid.detect imported {out.stdout.strip()}"


class RecordingEngine(StubEngine):
    """A stub engine that keeps the input tensors it was given."""

    def _run(self, feed):
        self.tensors = [*getattr(self, "tensors", []), feed["images"].copy()]
        return super()._run(feed)


def test_detector_reads_its_preprocessing_from_the_model() -> None:
    """The detector follows ``fieldreid.preprocess`` (channel order, normalisation, padding); a model without
    it gets the YOLO convention (RGB, pad 114, [0, 1])."""
    from fieldreid.types import PreprocessSpec

    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :, 0] = 200  # blue in BGR
    names = '["person", "chair", "dog"]'
    plain = Detector(RecordingEngine(stub_prediction(), {"fieldreid.names": names}))
    plain.detect_one(image)
    [t] = plain.engine.tensors
    assert plain.preprocess_spec.color == "RGB" and plain.preprocess_spec.pad_value == 114
    np.testing.assert_allclose(t[0, :, 32, 32], [0.0, 0.0, 200 / 255], atol=1e-6)  # RGB: blue is the last plane
    np.testing.assert_allclose(t[0, :, 0, 32], [114 / 255] * 3, atol=1e-6)  # the letterbox padding above it
    spec = PreprocessSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), color="BGR",
                          resize="letterbox", pad_value=0)
    own = Detector(RecordingEngine(stub_prediction(), {"fieldreid.names": names,
                                                       "fieldreid.preprocess": spec.to_json()}))
    own.detect_one(image)
    [t] = own.engine.tensors
    np.testing.assert_allclose(t[0, :, 32, 32], [(200 / 255 - 0.5) / 0.25, -2.0, -2.0], atol=1e-5)  # BGR, normalised
    np.testing.assert_allclose(t[0, :, 0, 32], [-2.0] * 3, atol=1e-6)  # padded with 0, then normalised
    stretch = PreprocessSpec(size=(64, 64), resize="stretch")
    with pytest.raises(ModelError, match="letterboxed"):
        Detector(RecordingEngine(stub_prediction(), {"fieldreid.names": names,
                                                     "fieldreid.preprocess": stretch.to_json()}))
