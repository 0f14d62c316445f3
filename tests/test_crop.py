"""The one crop rule (fieldreid.crop): geometry, resolution independent of the decode at hand, box choice."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fieldreid.crop import MARGIN, MIN_COVER, choose_animal, crop_reduction, crops, cut, whole_box
from fieldreid.embed.pipeline import Pipeline
from fieldreid.errors import InputError
from fieldreid.frames.decode import read_image
from fieldreid.types import Detections


def test_cut_grows_by_the_margin_and_clips_without_padding():
    img = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    np.testing.assert_array_equal(cut(img, (50, 40, 90, 60), margin=0.0), img[40:60, 50:90])
    np.testing.assert_array_equal(cut(img, (50, 40, 90, 60), margin=0.25), img[35:65, 40:100])
    assert cut(img, (50, 40, 90, 60)).shape == (int(20 * (1 + 2 * MARGIN)), int(40 * (1 + 2 * MARGIN)), 3)
    # at the image's edge the crop stops there: no replicated or constant borders, aspect kept as it is
    np.testing.assert_array_equal(cut(img, (0, 0, 60, 20)), img[0:24, 0:72])
    np.testing.assert_array_equal(cut(img, whole_box((100, 200))), img)
    for bad in [(10, 10, 10, 20), (300, 0, 400, 50), (0, 0, float("nan"), 5)]:
        with pytest.raises(InputError):
            cut(img, bad)


@pytest.fixture()
def big_jpeg(tmp_path):
    """A 1600 x 1200 JPEG with texture at every scale (DCT-reduced decodes differ from resized ones)."""
    rng = np.random.default_rng(0)
    img = cv2.resize(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8), (1600, 1200), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "frame.jpg"
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return path


def test_crop_pixels_do_not_depend_on_the_decode_the_caller_holds(big_jpeg):
    """watch holds the detector's reduced decode, enrolment of a crop another one: the crop must be the same."""
    boxes = np.array([[100, 100, 1500, 1100],   # large: its rule asks for a 1/4 decode (short side 1000/4 >= 224)
                      [700, 500, 1000, 800],    # 300 px: full resolution
                      [0, 0, 1600, 1200]], np.float32)
    got = [crops(read_image(big_jpeg, reduction=r, keep_data=keep), boxes, 224)
           for r in (1, 2, 4, 8) for keep in (True, False)]
    for other in got[1:]:
        for a, b in zip(got[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    frame = read_image(big_jpeg, reduction=2)
    assert [crop_reduction(frame, b, 224) for b in boxes] == [4, 1, 4]
    assert min(got[0][0].shape[:2]) >= 224 and min(got[0][1].shape[:2]) >= 224
    assert crop_reduction(frame, boxes[0], 224, is_jpeg=False) == 1  # PNGs are never decoded reduced


def test_crop_reduction_respects_the_pixel_budget(big_jpeg):
    frame = read_image(big_jpeg, max_pixels=500_000)  # 1.92 MP: decoded at 1/2 at the finest
    assert frame.reduction == 2
    assert crop_reduction(frame, (700, 500, 1000, 800), 224) == 2
    [c] = crops(frame, [(700, 500, 1000, 800)], 224)
    assert c.shape[:2] == (int(np.ceil(800 / 2 + 0.2 * 150)) - int(np.floor(500 / 2 - 0.2 * 150)),) * 2


def test_choose_animal_wants_a_confident_animal_covering_a_quarter():
    size = (100, 100)
    xyxy = np.array([[0, 0, 30, 30], [0, 0, 60, 60], [0, 0, 90, 90], [10, 10, 95, 95]], np.float32)
    conf = np.array([0.9, 0.5, 0.6, 0.95])
    cat = np.array([1, 1, 1, 2])  # the most confident box is a person
    assert choose_animal(conf, cat, xyxy, size, min_cover=MIN_COVER) == 2
    assert choose_animal(conf, cat, xyxy, size) == 0  # any size: the 9 % box is the most confident animal
    assert choose_animal(conf, cat, xyxy, size, min_conf=0.7, min_cover=MIN_COVER) is None
    assert choose_animal(np.zeros(0), np.zeros(0), np.zeros((0, 4)), size) is None


class _Boxes:
    """A detector returning fixed boxes (pixel coordinates of the image it is given) for every image."""

    input_size = (64, 64)
    model_id = "fixed"

    def __init__(self, xyxy, conf):
        self.xyxy, self.conf = np.asarray(xyxy, np.float32).reshape(-1, 4), np.asarray(conf, np.float32)

    def detect(self, images):
        return [Detections(self.xyxy, self.conf, np.zeros(len(self.conf)), np.ones(len(self.conf))) for _ in images]


def _png(tmp_path, name="a.png", size=(100, 100)):
    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return tmp_path / name


@pytest.mark.parametrize(("xyxy", "conf", "select", "expect"), [
    # a small, more confident box and a large one: crops and frames both take the large one
    ([[0, 0, 20, 20], [10, 10, 90, 90]], [0.9, 0.5], "crop", (1, False)),
    ([[0, 0, 20, 20], [10, 10, 90, 90]], [0.9, 0.5], "best", (1, False)),
    # only small boxes: a labelled crop is its own box, a labelled frame takes the most confident animal
    ([[0, 0, 20, 20], [50, 50, 70, 70]], [0.4, 0.9], "crop", (None, True)),
    ([[0, 0, 20, 20], [50, 50, 70, 70]], [0.4, 0.9], "best", (1, False)),
    ([], [], "best", (None, False)),
])
def test_pipeline_picks_the_animal_of_a_labelled_image(tmp_path, xyxy, conf, select, expect):
    path = _png(tmp_path)
    [res] = Pipeline(_Boxes(xyxy, conf), None, select=select, keep_crops=True, crop_side=32).run([path])
    idx, whole = expect
    assert res.whole_image is whole
    assert list(res.animal_index) == ([] if idx is None else [idx])
    img = cv2.imread(str(path))
    want = [img] if whole else [] if idx is None else [cut(img, xyxy[idx])]
    assert len(res.crops) == len(want) and len(res.boxes) == len(want)
    for a, b in zip(res.crops, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pipeline_best_falls_back_to_the_whole_image_only_when_asked(tmp_path):
    path = _png(tmp_path)
    [res] = Pipeline(_Boxes([], []), None, select="best", whole_if_none=True, keep_crops=True, crop_side=32).run([path])
    assert res.whole_image and res.boxes.tolist() == [list(whole_box((100, 100)))]
    [res] = Pipeline(None, None, select="crop", keep_crops=True, crop_side=32).run([path])  # no detector at all
    assert res.whole_image and len(res.crops) == 1
    with pytest.raises(ValueError):
        Pipeline(None, None, select="all")


def test_training_images_are_cut_by_the_crop_rule(tmp_path):
    from fieldreid.train.data import LabelledImages

    for i in range(2):
        _png(tmp_path, f"{i}.png", size=(100, 120))
    (tmp_path / "metadata.csv").write_text("image_id,identity,path,species,split\n"
                                           "a,z1,0.png,zebra,train\nb,z2,1.png,zebra,train\n")
    det = _Boxes([[10, 20, 60, 90]], [0.8])  # covers 29 % of the image: the animal
    data = LabelledImages.from_metadata(tmp_path / "metadata.csv", detector=det)
    img = cv2.imread(str(tmp_path / "0.png"))
    np.testing.assert_array_equal(data.images[0], cut(img, (10, 20, 60, 90)))
    whole = LabelledImages.from_metadata(tmp_path / "metadata.csv")  # no detector: the image is its own box
    np.testing.assert_array_equal(whole.images[0], img)
