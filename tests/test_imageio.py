from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from fieldreid.errors import ImageReadError
from fieldreid.frames.decode import (
    apply_orientation,
    choose_reduction,
    frame_for_boxes,
    iter_files,
    read_image,
    to_frame_coords,
)


def _jpeg(w: int, h: int, orientation: int | None = None, quality: int = 92) -> bytes:
    rng = np.random.default_rng(0)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (240, 0, 0)  # red block top-left (RGB)
    arr += rng.integers(0, 10, arr.shape, dtype=np.uint8)
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def test_reduced_decode_picks_largest_factor_that_keeps_min_side(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(_jpeg(2600, 1400))
    f = read_image(p, min_side=640)
    assert f.reduction == 4 and f.size == (1400, 2600)
    assert f.pixels.shape[:2] == (350, 650)
    full = read_image(p)
    assert full.reduction == 1 and full.pixels.shape[:2] == (1400, 2600)
    assert choose_reduction((1400, 2600), 640) == 4
    assert choose_reduction((1400, 2600), 2000) == 1
    assert choose_reduction((1400, 2600), 640, is_jpeg=False) == 1


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_gives_upright_pixels(tmp_path, orientation):
    p = tmp_path / f"o{orientation}.jpg"
    p.write_bytes(_jpeg(400, 200, orientation))
    f = read_image(p)
    stored = cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert np.array_equal(f.pixels, apply_orientation(stored, orientation))
    expect_hw = (200, 400) if orientation in (1, 3) else (400, 200)
    assert f.size == expect_hw and f.pixels.shape[:2] == expect_hw
    # The red block (stored top-left) moves where the rotation puts it.
    red = f.pixels[..., 2] > 200
    ys, xs = np.nonzero(red)
    cy, cx = ys.mean() / expect_hw[0], xs.mean() / expect_hw[1]
    corner = {1: (0.25, 0.25), 3: (0.75, 0.75), 6: (0.25, 0.75), 8: (0.75, 0.25)}[orientation]
    assert abs(cy - corner[0]) < 0.05 and abs(cx - corner[1]) < 0.05
    # reduced decode is rotated the same way
    r = read_image(p, reduction=2)
    assert r.pixels.shape[:2] == (expect_hw[0] // 2, expect_hw[1] // 2)


def test_bad_files_give_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    data = _jpeg(800, 600)
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    garbage = bytearray(data)
    garbage[400:4000] = b"\x00" * 3600
    (tmp_path / "garbled.jpg").write_bytes(bytes(garbage))
    reasons = {}
    for name in ("empty.jpg", "text.jpg", "half.jpg", "clip.mp4", "missing.jpg"):
        with pytest.raises(ImageReadError) as exc:
            read_image(tmp_path / name)
        reasons[name] = str(exc.value)
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["half.jpg"]
    assert "video" in reasons["clip.mp4"]
    assert "disappeared" in reasons["missing.jpg"]


def test_trailer_after_end_of_image_is_not_truncation(tmp_path):
    # Many trail cameras append data after the JPEG's end-of-image marker.
    p = tmp_path / "trailer.jpg"
    p.write_bytes(_jpeg(320, 240) + b"\t255" * 2000 + b"\r\n")
    assert read_image(p).pixels.shape == (240, 320, 3)


def test_iter_files_walks_recursively_skips_hidden_and_keeps_videos(tmp_path):
    (tmp_path / "camA" / "sub").mkdir(parents=True)
    (tmp_path / ".trash").mkdir()
    for rel in ("camA/b.JPG", "camA/a.jpg", "camA/sub/c.png", "camA/v.MP4", "camA/notes.txt", ".trash/x.jpg",
                "camA/._a.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])]
    assert got == ["camA/a.jpg", "camA/b.JPG", "camA/v.MP4", "camA/sub/c.png"]
    with pytest.raises(ImageReadError):
        list(iter_files([tmp_path / "nope"]))


def test_small_boxes_get_a_finer_decode(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(_jpeg(3200, 2400))
    f = read_image(p, min_side=640, keep_data=True)
    assert f.reduction == 4
    big_box = np.array([[0, 0, 1600, 1600]], np.float32)
    small_box = np.array([[100, 100, 400, 500]], np.float32)  # 300 px short side: /4 gives 75 px
    assert frame_for_boxes(f, big_box, 224) is f
    finer = frame_for_boxes(f, small_box, 224)
    assert finer.reduction == 1 and finer.size == f.size
    mapped = to_frame_coords(f, small_box)
    assert np.allclose(mapped, small_box / 4)


def test_real_camtrap_images_decode_reduced(camtrap):
    files = [p for p in iter_files([camtrap]) if p.stat().st_size > 0 and p.suffix.lower() != ".mp4"]
    assert len(files) >= 100
    for p in files[:40]:
        f = read_image(p, min_side=640)
        assert max(f.pixels.shape[:2]) >= 640 or f.reduction == 1
        sy, sx = f.scale
        assert abs(sy - f.reduction) < 0.02 * f.reduction + 0.01 and abs(sx - f.reduction) < 0.02 * f.reduction + 0.01
