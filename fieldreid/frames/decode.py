"""Reading camera-trap images: EXIF orientation, reduced-size JPEG decoding, clear failure reasons.

Full-resolution camera-trap JPEGs (5-30 MP) cost more to decode than a nano detector costs to run.
libjpeg can decode at 1/2, 1/4 or 1/8 size by scaling the DCT (OpenCV's ``IMREAD_REDUCED_*``), which
skips most of the work, so the detector gets a decode that is just large enough for its input size.
Crops for the embedder are re-cut from a larger decode only when a box would otherwise be too small.

Hostile files are bounded before they cost anything: only regular files are read (never a FIFO or a
device), at most ``max_bytes`` of them, and an image's header dimensions are checked against a
decoded-pixel budget (``max_pixels``, default 100 MP) before the decoder allocates its pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fieldreid.errors import ImageReadError
from fieldreid.frames.exif import header_exif
from fieldreid.frames.files import IMAGE_SUFFIXES, VIDEO_SUFFIXES, iter_files  # noqa: F401 (re-exported)
from fieldreid.storage.fsutil import (
    DEFAULT_MAX_FILE_BYTES,
    FileChangedError,
    FileRefusedError,
    read_regular_file,
)

JPEG_SUFFIXES = {".jpg", ".jpeg"}
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}
_EXIF_ORIENTATION = 0x0112
#: decoded-pixel budget per image (width x height as stored), checked in the header before decoding;
#: a JPEG above it is decoded at the DCT reduction that fits, anything else is refused (``--max-pixels``)
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Frame:
    """A decoded image. ``pixels`` is BGR uint8, upright (EXIF orientation applied).

    ``size`` is the upright full-resolution (height, width); ``reduction`` the DCT scale factor used
    (1, 2, 4 or 8), so ``pixels`` is about ``size / reduction``.
    """

    path: Path
    pixels: np.ndarray
    size: tuple[int, int]
    reduction: int
    orientation: int = 1
    data: bytes | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx) that map ``pixels`` coordinates to full-resolution coordinates."""
        h, w = self.pixels.shape[:2]
        return self.size[0] / h, self.size[1] / w


def _header(data: bytes, path: Path) -> tuple[tuple[int, int], int]:
    """(width, height) as stored, and EXIF orientation, read from the header only (no decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Only the formats we decode: other plugins (HEIF, registered by some libraries) must not be tried.
        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "TIFF", "BMP", "WEBP"]) as im:
            size = im.size
            try:
                exif = header_exif(im)  # never decodes pixels (PIL's PNG getexif() would)
                orientation = int(exif.get(_EXIF_ORIENTATION, 1) or 1) if exif is not None else 1
            except Exception:  # a broken EXIF block must not lose the image
                orientation = 1
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not an image file, or its header is corrupt") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"image too large to decode ({exc})") from exc
    except Exception as exc:
        # Some libraries patch Image.open (ultralytics adds a HEIF fallback) and fail differently.
        raise ImageReadError(path, f"not an image file, or its header is corrupt ({exc})") from exc
    return size, orientation if 1 <= orientation <= 8 else 1


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip stored pixels to upright according to the EXIF orientation tag (1-8)."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.flip(cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE), 1)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE), 1)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """``(marker, offset)`` of each length-carrying marker segment of a JPEG's header, in order, without
    decoding: SOI, TEM, RSTn and fill bytes are stepped over; the walk ends after yielding SOS (start of
    scan) or EOI, or at bytes that are not a marker or a segment length below 2 (a damaged header).
    The one header walker: :func:`_jpeg_complete` here and the lab's crop-size check use it."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # SOI, TEM, RSTn: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: no header segment follows
            yield marker, i
            return
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return
        yield marker, i
        i += 2 + length


def _jpeg_complete(data: bytes) -> bool:
    """True when the JPEG's main image has its end-of-image marker.

    A JPEG still being copied (or cut short on the SD card) lacks it, and libjpeg would "decode" it
    anyway with grey rows at the bottom. The EXIF thumbnail has an EOI of its own and many cameras append
    a trailer after the real EOI, so the marker is looked for after the first start-of-scan, found by
    walking the header segments (an EOI byte pair cannot occur inside entropy-coded data).
    """
    for marker, pos in jpeg_segments(data):
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) != -1
    return False


def choose_reduction(size_hw: tuple[int, int], min_side: int | None, is_jpeg: bool = True) -> int:
    """The largest DCT reduction (1, 2, 4, 8) that keeps the longer side >= ``min_side``."""
    if not min_side or not is_jpeg:
        return 1
    longest = max(size_hw)
    r = 1
    for cand in (2, 4, 8):
        if longest / cand >= min_side:
            r = cand
    return r


def min_reduction(size_wh: tuple[int, int], max_pixels: int | None, is_jpeg: bool) -> int | None:
    """The smallest decode reduction whose pixels fit ``max_pixels`` (1 when there is no budget), or None
    when none does (only JPEGs can be decoded reduced: 1/2, 1/4, 1/8 by DCT scaling)."""
    w, h = size_wh
    if not max_pixels or w * h <= max_pixels:
        return 1
    if is_jpeg:
        for r in (2, 4, 8):
            if -(-w // r) * -(-h // r) <= max_pixels:
                return r
    return None


def read_image(path: str | Path, min_side: int | None = None, reduction: int | None = None,
               data: bytes | None = None, keep_data: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = DEFAULT_MAX_FILE_BYTES) -> Frame:
    """Decode an image upright. With ``min_side``, JPEGs are decoded at the smallest DCT scale that keeps
    the longer side at least ``min_side`` pixels (e.g. 640 for a 640-input detector).

    Bounded: only a regular file of at most ``max_bytes`` is read (never a FIFO or device), and the
    header's dimensions are checked against ``max_pixels`` before anything is decoded - a JPEG above it is
    decoded at the reduction that fits, any other image is refused. Raises :class:`ImageReadError` with a
    reason for empty, truncated, corrupt, too large, non-image, non-regular and video files, and for any
    error of the decoders (OpenCV, PIL), so one file can never stop a run.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        raise ImageReadError(path, "video files are not processed (extract frames first)")
    if data is None:
        try:
            data, _ = read_regular_file(path, max_bytes)
        except FileNotFoundError as exc:
            raise ImageReadError(path, "file disappeared before it could be read") from exc
        except (FileRefusedError, FileChangedError) as exc:
            raise ImageReadError(path, getattr(exc, "reason", None) or str(exc)) from exc
        except OSError as exc:
            raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if len(data) == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    (w, h), orientation = _header(data, path)
    is_jpeg = data[:2] == b"\xff\xd8"
    if is_jpeg and not _jpeg_complete(data):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker; still being copied?)")
    upright = (w, h) if orientation < 5 else (h, w)
    size_hw = (upright[1], upright[0])
    floor = min_reduction((w, h), max_pixels, is_jpeg)
    if floor is None:
        raise ImageReadError(path, f"image too large: {w} x {h} = {w * h / 1e6:.0f} MP is over the decoded-pixel "
                                   f"budget of {max_pixels / 1e6:g} MP per image (--max-pixels); not decoded")
    r = reduction if reduction is not None else choose_reduction(size_hw, min_side, is_jpeg)
    if r not in _REDUCED_FLAGS:
        raise ValueError(f"reduction must be 1, 2, 4 or 8, got {r}")
    r = max(r, floor)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buf, _REDUCED_FLAGS[r] | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is None:
            raise ImageReadError(path, "corrupt image data (the decoder rejected it)")
        if pixels.ndim == 2:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
        elif pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ImageReadError(path, f"unexpected pixel layout {pixels.shape} from the decoder")
        pixels = apply_orientation(pixels, orientation)
    except cv2.error as exc:
        raise ImageReadError(path, f"the decoder failed ({_first_line(exc)})") from exc
    except MemoryError as exc:
        raise ImageReadError(path, "image too large to decode in the memory available") from exc
    return Frame(path=path, pixels=np.ascontiguousarray(pixels), size=size_hw, reduction=r,
                 orientation=orientation, data=data if keep_data else None, max_pixels=max_pixels)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def reduction_for_boxes(frame: Frame, boxes_xyxy: np.ndarray, min_side: int) -> int:
    """The DCT reduction at which every box (full-resolution coordinates) keeps at least ``min_side``
    pixels on its shorter side, or the frame's own reduction if that is already fine."""
    r = frame.reduction
    if len(boxes_xyxy) == 0:
        return r
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    shortest = float(max(1.0, np.min(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))))
    # never finer than the decoded-pixel budget allows (only JPEGs are ever decoded reduced)
    floor = min_reduction((frame.size[1], frame.size[0]), frame.max_pixels, True) or frame.reduction
    while r > floor and shortest / r < min_side:
        r //= 2
    return r


def frame_for_boxes(frame: Frame, boxes_xyxy: np.ndarray, min_side: int) -> Frame:
    """``frame`` itself, or one decode at a finer scale when a box would give the embedder too few pixels.

    One extra decode per image at most, and only for images whose animals are small at the detector's scale.
    """
    r = reduction_for_boxes(frame, boxes_xyxy, min_side)
    if r == frame.reduction:
        return frame
    return read_image(frame.path, reduction=r, data=frame.data, keep_data=frame.data is not None,
                      max_pixels=frame.max_pixels)


def to_frame_coords(frame: Frame, boxes_xyxy: np.ndarray) -> np.ndarray:
    """Full-resolution boxes mapped into ``frame.pixels`` coordinates."""
    sy, sx = frame.scale
    return np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4) / np.array([sx, sy, sx, sy], np.float32)


def encode_jpeg(pixels: np.ndarray, max_side: int, quality: int = 80) -> bytes | None:
    """BGR pixels → JPEG bytes with the longer side at most ``max_side`` (area-averaged shrink; never
    enlarged). None when OpenCV cannot encode them. Used for thumbnails, report pictures and synced crops."""
    h, w = pixels.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return buf.tobytes() if ok else None
