"""Rectangular letterboxing for detectors with dynamic height/width (issue 17).

- The arithmetic: :func:`rect_shape` / ``letterbox(auto=True)`` / ``preprocess(rect=True)`` for 4:3, 16:9,
  portrait and odd sizes, and boxes mapped back to the original pixels.
- The Detector on a stub engine whose output reports the input shape it was given: each image runs at its own
  rectangle, batches are grouped by shape, results keep the input order; a fixed-size model keeps the square.
- The real YOLOv5n converted with dynamic spatial axes (skipped without the checkpoint and camera-trap images):
  ONNX Runtime agrees with eager torch at the square and at rectangles on real frames; the rectangle route
  finds what the ``yolov5`` package's own rectangle route (AutoShape ``predict``) finds; and rectangle vs
  square boxes agree for confident boxes.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import camtrap_images

from fieldreid.detect import Detector, box_iou, decode, letterbox, preprocess, scale_boxes
from fieldreid.detect.letterbox import rect_shape
from fieldreid.engines import Engine, EngineIO
from fieldreid.errors import InputError

# (original h, w) -> the rectangle at 640, stride 32
CASES = {
    "4:3 landscape": ((1536, 2048), (480, 640)),
    "16:9 landscape": ((1080, 1920), (384, 640)),
    "3:4 portrait": ((4032, 3024), (640, 480)),
    "9:16 portrait": ((1920, 1080), (640, 384)),
    "odd 333 wide": ((1000, 333), (640, 224)),  # 213 px wide resized, padded 11 px to 224
    "odd 777 x 1001": ((777, 1001), (512, 640)),  # 497 px high resized, padded 15 px to 512
    "tiny 75x100 (enlarged)": ((75, 100), (480, 640)),
    "square": ((640, 640), (640, 640)),
    "wider than 16:9": ((700, 2500), (192, 640)),  # 179 px high resized
}


# -- arithmetic ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_rect_shape_and_letterbox(name: str) -> None:
    (h, w), want = CASES[name]
    assert rect_shape((h, w), 640, 32) == want
    img = np.full((h, w, 3), 200, np.uint8)
    out, ratio, pad = letterbox(img, 640, stride=32, auto=True)
    assert out.shape[:2] == want
    r = min(640 / h, 640 / w)
    assert ratio == (r, r)  # the same gain as the square letterbox: only the padding differs
    _, sq_ratio, sq_pad = letterbox(img, 640)
    assert sq_ratio == ratio
    # the image sits between the pads, which are under one stride in total on each axis
    rows = np.flatnonzero(out[:, :, 0].max(1) == 200)
    cols = np.flatnonzero(out[:, :, 0].max(0) == 200)
    assert (rows[0], cols[0]) == (pad[1], pad[0])
    assert out.shape[0] - rows.size < 32 and out.shape[1] - cols.size < 32
    assert rows.size == round(h * r) and cols.size == round(w * r)
    # the rectangle is the square's middle: the offsets differ by the square's extra padding
    assert sq_pad[0] - pad[0] == pytest.approx((640 - want[1]) / 2, abs=0.5)
    assert sq_pad[1] - pad[1] == pytest.approx((640 - want[0]) / 2, abs=0.5)
    # boxes in the original image -> rectangle input -> back again
    box = np.array([[0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]], np.float32)
    lb = box.copy()
    lb[:, [0, 2]] = lb[:, [0, 2]] * ratio[0] + pad[0]
    lb[:, [1, 3]] = lb[:, [1, 3]] * ratio[1] + pad[1]
    np.testing.assert_allclose(scale_boxes(lb, ratio, pad, (h, w)), box, rtol=1e-5, atol=1e-3)


def test_rect_shape_is_a_stride_multiple_within_the_square() -> None:
    rng = np.random.default_rng(0)
    for h, w in rng.integers(1, 5000, (300, 2)):
        for stride, size in ((32, 640), (64, 1280), (32, (384, 640))):
            rh, rw = rect_shape((int(h), int(w)), size, stride)
            sh, sw = (size, size) if isinstance(size, int) else size
            assert rh % stride == 0 and rw % stride == 0 and rh <= sh and rw <= sw
            assert max(rh / sh, rw / sw) == 1.0  # one side is the full size


def test_rect_shape_rejects_bad_input() -> None:
    with pytest.raises(InputError):
        rect_shape((0, 10))
    with pytest.raises(InputError):
        rect_shape((10, 10), 640, 0)
    with pytest.raises(InputError, match="not both"):
        letterbox(np.zeros((10, 10, 3), np.uint8), 32, auto=True, pad_to=(32, 32))
    with pytest.raises(InputError, match="smaller"):
        letterbox(np.zeros((10, 20, 3), np.uint8), 32, pad_to=(32, 16))


def test_preprocess_rect_pads_mixed_shapes_to_the_largest() -> None:
    """A batch of different rectangles is padded to the largest of them; each image keeps the gain it has
    alone and sits centred, so its boxes map back exactly as when it runs alone."""
    images = [np.full((1536, 2048, 3), 10, np.uint8), np.full((1920, 1080, 3), 20, np.uint8)]
    batch, infos = preprocess(images, rect=True)
    assert batch.shape == (2, 3, 640, 640)  # 480x640 and 640x384 -> 640x640
    for img, info, k in zip(images, infos, range(2), strict=True):
        alone, [solo] = preprocess([img], rect=True)
        assert alone.shape[2:] == rect_shape(img.shape[:2])
        assert info.ratio == solo.ratio
        # the same pixels, offset by half the extra padding
        dy, dx = int(info.pad[1] - solo.pad[1]), int(info.pad[0] - solo.pad[0])
        h, w = alone.shape[2:]
        np.testing.assert_array_equal(batch[k, :, dy:dy + h, dx:dx + w], alone[0])
    same, _ = preprocess([images[0], images[0]], rect=True)
    assert same.shape == (2, 3, 480, 640)
    square, _ = preprocess(images)
    assert square.shape == (2, 3, 640, 640)
    empty, _ = preprocess([], rect=True)
    assert empty.shape == (0, 3, 640, 640)


# -- the Detector on a stub engine -----------------------------------------------------------------------------
class ShapeEngine(Engine):
    """An end2end 'detector' that reports the input it was given: one box per image with score = H / 1000 and
    class = W / 32, so each result says which input shape its image ran at."""

    backend = "stub"

    def __init__(self, dynamic: bool = True) -> None:
        self._dynamic = dynamic
        self.calls: list[tuple] = []
        super().__init__(None)

    def _load(self) -> None:
        hw = ("height", "width") if self._dynamic else (640, 640)
        self.inputs = [EngineIO("images", ("batch", 3, *hw), np.dtype(np.float32))]
        self.outputs = [EngineIO("output0", ("batch", 1, 6), np.dtype(np.float32))]
        self.metadata = {"fieldreid.kind": "detector", "fieldreid.layout": "end2end", "fieldreid.imgsz": "[640, 640]",
                         "fieldreid.stride": "[8, 16, 32]",
                         "fieldreid.names": str([f"c{i}" for i in range(21)]).replace("'", '"')}

    def _run(self, feed):
        x = feed["images"]
        self.calls.append(x.shape)
        b, _, h, w = x.shape
        row = np.array([[[x.shape[3] * 0.25, x.shape[2] * 0.25, w * 0.75, h * 0.75, h / 1000, w / 32]]], np.float32)
        return {"output0": np.repeat(row, b, 0)}


def test_detector_runs_each_image_at_its_rectangle_grouped_by_shape() -> None:
    eng = ShapeEngine()
    det = Detector(eng, conf=0.1, batch_size=2, keep_other=True)
    assert det.dynamic_shape and det.rect and det.input_size == (640, 640) and det.stride == 32
    shapes = [(1536, 2048), (1080, 1920), (1536, 2048), (4032, 3024), (1536, 2048), (640, 640)]
    images = [np.zeros((*hw, 3), np.uint8) for hw in shapes]
    res = det.detect(images)
    got = [(round(float(d.confidence[0]) * 1000), int(d.class_id[0]) * 32) for d in res]
    assert got == [rect_shape(hw) for hw in shapes]  # every image at its own rectangle, in input order
    # one run per shape and batch: 3 x 4:3 in batches of 2, then 16:9, portrait, square
    assert sorted(eng.calls) == sorted([(2, 3, 480, 640), (1, 3, 480, 640), (1, 3, 384, 640), (1, 3, 640, 480),
                                        (1, 3, 640, 640)])
    # the box (a quarter in from each side of the input) maps back inside each original image
    for d, (h, w) in zip(res, shapes, strict=True):
        x1, y1, x2, y2 = d.xyxy[0]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert det.input_shape((1080, 1920)) == (384, 640)


def test_detector_square_when_the_model_is_fixed_or_rect_is_off() -> None:
    images = [np.zeros((1080, 1920, 3), np.uint8), np.zeros((4032, 3024, 3), np.uint8)]
    fixed = Detector(ShapeEngine(dynamic=False), conf=0.1, keep_other=True)
    assert not fixed.dynamic_shape and not fixed.rect
    assert [(round(float(d.confidence[0]) * 1000), int(d.class_id[0]) * 32) for d in fixed.detect(images)] \
        == [(640, 640)] * 2
    assert fixed.engine.calls == [(2, 3, 640, 640)]  # one batch, as before
    off = Detector(ShapeEngine(), conf=0.1, keep_other=True, rect=False)
    assert off.dynamic_shape and not off.rect and off.input_shape((1080, 1920)) == (640, 640)
    assert [int(d.class_id[0]) * 32 for d in off.detect(images)] == [640, 640]
    with pytest.raises(InputError, match="dynamic height and width"):
        Detector(ShapeEngine(dynamic=False), rect=True)
    assert "rect=False" in repr(off)


# -- the real YOLOv5n, dynamic spatial axes --------------------------------------------------------------------
CONF = 0.1
IOU = 0.45
#: a "confident" box, for rectangle vs square: the default decision threshold range sits below it
CONFIDENT = 0.5


@pytest.fixture(scope="module")
def real_frames(camtrap) -> list[tuple[str, np.ndarray]]:
    out = [(p.name, img) for p in camtrap_images() if (img := cv2.imread(str(p))) is not None]
    if not out:
        pytest.skip("no readable camera-trap images")
    return out


def test_default_conversion_is_dynamic_and_recorded(yolov5n_onnx) -> None:
    import json

    from fieldreid.engines.manifest import manifest_path

    manifest = json.loads(manifest_path(yolov5n_onnx).read_text())
    assert manifest["dynamic_shape"] is True and manifest["letterbox"].startswith("rect")
    assert manifest["parity"]["ok"] and manifest["parity"]["shapes"] == [[640, 640], [480, 640], [640, 384]]
    with Detector(yolov5n_onnx) as det:
        assert det.metadata["fieldreid.dynamic_shape"] == "true" and det.rect and det.input_size == (640, 640)


def test_dynamic_onnx_matches_eager_torch_at_square_and_rectangles(yolov5n_checkpoint, yolov5n_onnx,
                                                                   real_frames) -> None:
    """The dynamic ONNX against the checkpoint in eager torch on real frames, at 640 x 640 and at each frame's
    rectangle (4:3 and 16:9 among the camera-trap sizes, and a frame turned to portrait); the converter's own
    gate uses random input."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("yolov5")
    from yolov5.models.experimental import attempt_load

    from fieldreid.engines import load_engine

    model = attempt_load(str(yolov5n_checkpoint), device="cpu", fuse=True).eval()
    seen: set[tuple[int, int]] = set()
    with load_engine(yolov5n_onnx, "onnxruntime", threads=2) as engine:
        portrait = cv2.rotate(real_frames[0][1], cv2.ROTATE_90_CLOCKWISE)
        for img in [portrait] + [img for _, img in real_frames]:
            for rect in (True, False):
                x, _ = preprocess([img], rect=rect)
                if x.shape[2:] in seen:  # one frame per input shape
                    continue
                seen.add(x.shape[2:])
                with torch.inference_mode():
                    ref = model(torch.from_numpy(x))[0].numpy()
                got = engine.run(x)["output0"]
                assert got.shape == ref.shape
                scale = float(np.abs(ref).max())
                assert float(np.abs(got - ref).max()) <= 1e-3 + 1e-4 * scale, x.shape
    assert {(640, 640), (480, 640), (384, 640)} <= seen and any(h > w for h, w in seen)


def test_rect_route_matches_the_reference_rect_route(yolov5n_checkpoint, yolov5n_onnx, real_frames) -> None:
    """Our rectangles are YOLOv5's: the ``yolov5`` package's AutoShape ``predict`` (its own rectangle letterbox,
    eager torch, its NMS) finds the same boxes as our rectangle input + decoder, one to one."""
    pytest.importorskip("torch")
    yolov5 = pytest.importorskip("yolov5")
    ref = yolov5.load(str(yolov5n_checkpoint), device="cpu")
    ref.conf, ref.iou = CONF, IOU
    matched, worst_iou, worst_dconf, borderline = 0, 1.0, 0.0, 0
    with Detector(yolov5n_onnx, conf=CONF, threads=2) as det:
        for name, img in real_frames[::2]:
            r = ref(np.ascontiguousarray(img[:, :, ::-1]), size=640).xyxy[0].numpy()
            x, [info] = preprocess([img], stride=det.stride, spec=det.preprocess_spec, rect=True)
            out = det.engine.run(x)
            o = decode([out[k] for k in det.engine.output_names], "yolov5", CONF, IOU, 1000)[0]
            o[:, :4] = scale_boxes(o[:, :4], info.ratio, info.pad, info.orig_shape)
            iou = box_iou(r[:, :4], o[:, :4])
            used = np.zeros(len(o), bool)
            for i in np.argsort(-r[:, 4], kind="stable"):
                cand = np.flatnonzero(~used & (o[:, 5] == r[i, 5]))
                j = cand[np.argmax(iou[i, cand])] if cand.size else -1
                if j < 0 or iou[i, j] < 0.98:
                    assert abs(r[i, 4] - CONF) <= 1e-3, f"{name}: reference box {r[i]} not found"
                    borderline += 1
                    continue
                used[j] = True
                matched += 1
                worst_iou, worst_dconf = min(worst_iou, iou[i, j]), max(worst_dconf, abs(r[i, 4] - o[j, 4]))
            assert all(abs(o[j, 4] - CONF) <= 1e-3 for j in np.flatnonzero(~used)), f"{name}: extra boxes"
    print(f"\nrect vs yolov5 AutoShape: {matched} boxes, worst IoU {worst_iou:.4f}, worst dconf {worst_dconf:.1e}, "
          f"{borderline} borderline")
    assert matched > 50 and worst_dconf <= 1e-3


def _one_to_one(a, b) -> tuple[int, int, float]:
    """Confident boxes of ``a`` matched one to one to boxes of ``b`` (same category, best IoU first):
    (confident, matched at IoU >= 0.9, worst IoU)."""
    keep = np.flatnonzero(a.confidence >= CONFIDENT)
    iou = box_iou(a.xyxy, b.xyxy) if len(a.xyxy) and len(b.xyxy) else np.zeros((len(a.xyxy), len(b.xyxy)))
    iou = np.where(a.category[:, None] == b.category[None, :], iou, 0.0)
    used: set[int] = set()
    matched, worst = 0, 1.0
    for i in keep:
        cand = [j for j in range(iou.shape[1]) if j not in used]
        j = max(cand, key=lambda k: iou[i, k]) if cand else None
        best = float(iou[i, j]) if j is not None else 0.0
        worst = min(worst, best)
        if best >= 0.9:
            used.add(j)
            matched += 1
    return len(keep), matched, worst


def test_rect_and_square_agree_on_real_frames(yolov5n_onnx, real_frames) -> None:
    """Same frames, same model, rectangle vs square input: every confident box (>= 0.5) on either side is
    found again on the other, one to one, same category, IoU >= 0.9 (at the detector's floor, conf 0.1).

    Why not "the same count at 0.5": moving the image by the square's extra padding (80 px for 4:3, not a
    multiple of the 32 px stride) shifts it against the anchor grid and moves single scores by up to ~0.2
    (0.36 -> 0.57 on one deer), so a box near a threshold crosses it either way. The reference does the same:
    its square route equals ours (test_detect_parity) and its rectangle route (AutoShape) equals ours (above).
    """
    totals = {"square": [0, 0], "rect": [0, 0]}
    worst = 1.0
    counts_differ = []
    with Detector(yolov5n_onnx, conf=CONF, rect=False, threads=2) as sq, \
            Detector(yolov5n_onnx, conf=CONF, threads=2) as rc:
        for name, img in real_frames:
            a, b = sq.detect_one(img), rc.detect_one(img)
            for key, x, y in (("square", a, b), ("rect", b, a)):
                n, m, w = _one_to_one(x, y)
                totals[key][0] += n
                totals[key][1] += m
                worst = min(worst, w)
                assert m == n, f"{name}: {n - m} confident {key} box(es) not found on the other side (IoU {w:.3f})"
            if (a.confidence >= CONFIDENT).sum() != (b.confidence >= CONFIDENT).sum():
                counts_differ.append(name)
    print(f"\nrect vs square, confident boxes (>= {CONFIDENT}) found again: {totals}, worst IoU {worst:.3f}; "
          f"{len(counts_differ)} of {len(real_frames)} frames have a box crossing {CONFIDENT}: {counts_differ}")
    assert totals["square"][0] > 20 and totals["rect"][0] > 20


def test_make_models_converts_a_fixed_size_default_detector_again(tmp_path, monkeypatch) -> None:
    """`make models` (build_defaults) keeps a detector that records its shape choice, and converts again one made
    before height/width became dynamic (no ``fieldreid.dynamic_shape``): the default letterboxes to rectangles."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    import fieldreid.export.detector_onnx as detector_onnx
    from fieldreid.defaults import DETECTOR_NAME, EMBEDDER_NAME
    from fieldreid.export.run import build_defaults

    def model(path, meta: dict[str, str]) -> None:
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        for k, v in meta.items():
            p = m.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(m, str(path))

    calls = []
    monkeypatch.setattr(detector_onnx, "convert_detector", lambda *a, **k: calls.append((a, k)))
    checkpoint = tmp_path / "yolov5n.pt"
    checkpoint.write_bytes(b"not read: the converter is replaced")
    model(tmp_path / EMBEDDER_NAME, {"fieldreid.kind": "embedder"})
    model(tmp_path / DETECTOR_NAME, {"fieldreid.kind": "detector", "fieldreid.dynamic_shape": "true"})
    build_defaults(checkpoint, out_dir=tmp_path)
    assert calls == []  # current: kept
    model(tmp_path / DETECTOR_NAME, {"fieldreid.kind": "detector"})  # made before the choice existed
    build_defaults(checkpoint, out_dir=tmp_path)
    [(args, kwargs)] = calls
    assert args[1] == tmp_path / DETECTOR_NAME and kwargs["dynamic_shape"] is True and kwargs["imgsz"] == 640
