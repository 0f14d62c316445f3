"""Capture time fallback order, offsets, make/model, on synthesised and real EXIF."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fieldreid.frames.exif import (
    EXIF_IFD,
    FILE_MTIME,
    TAG_DATETIME,
    TAG_DIGITIZED,
    TAG_MAKE,
    TAG_MODEL,
    TAG_OFFSET_ORIGINAL,
    TAG_ORIGINAL,
    parse_exif_datetime,
    parse_offset,
    read_capture_info,
)


def _jpeg(ifd0: dict | None = None, exif_ifd: dict | None = None) -> bytes:
    im = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    exif = Image.Exif()
    for k, v in (ifd0 or {}).items():
        exif[k] = v
    if exif_ifd:
        sub = exif.get_ifd(EXIF_IFD)
        for k, v in exif_ifd.items():
            sub[k] = v
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_fallback_order() -> None:
    data = _jpeg({TAG_DATETIME: "2021:01:01 00:00:03", TAG_MAKE: "RECONYX ", TAG_MODEL: "HC600\x00"},
                 {TAG_ORIGINAL: "2021:01:01 00:00:01", TAG_DIGITIZED: "2021:01:01 00:00:02",
                  TAG_OFFSET_ORIGINAL: "+02:00"})
    info = read_capture_info(data, mtime=0)
    assert (info.captured, info.time_source, info.utc_offset) == ("2021-01-01T00:00:01", "DateTimeOriginal", "+02:00")
    assert (info.make, info.model) == ("RECONYX", "HC600")
    info = read_capture_info(_jpeg({TAG_DATETIME: "2021:01:01 00:00:03"}, {TAG_DIGITIZED: "2021:01:01 00:00:02"}), 0)
    assert (info.captured, info.time_source, info.utc_offset) == ("2021-01-01T00:00:02", "DateTimeDigitized", None)
    info = read_capture_info(_jpeg({TAG_DATETIME: "2021:01:01 00:00:03"}, {TAG_ORIGINAL: "0000:00:00 00:00:00"}), 0)
    assert (info.captured, info.time_source) == ("2021-01-01T00:00:03", "DateTime")


def test_file_time_fallback_is_flagged() -> None:
    for data in (_jpeg(), b"not an image at all", b""):
        info = read_capture_info(data, mtime=1_600_000_000.0)
        assert info.time_source == FILE_MTIME
        assert info.utc_offset is not None and len(info.captured) == 19


@pytest.mark.parametrize("text, ok", [("2020:04:16 10:10:32", True), ("2020-04-16 10:10:32\x00", True),
                                      ("2020:04:16 10:10:32.123", True), ("0000:00:00 00:00:00", False),
                                      ("    :  :     :  :  ", False), ("2020:13:40 10:10:32", False)])
def test_parse_datetime(text: str, ok: bool) -> None:
    assert (parse_exif_datetime(text) is not None) == ok


def test_parse_offset() -> None:
    assert parse_offset("+02:00") == "+02:00"
    assert parse_offset("-0530") == "-05:30"
    assert parse_offset("   :  ") is None


def test_real_camera_trap_exif(camtrap) -> None:
    data = (camtrap / "animl-buow" / "IMG_0708.JPG").read_bytes()
    info = read_capture_info(data, mtime=0)
    assert (info.captured, info.time_source, info.make) == ("2020-04-16T10:10:32", "DateTimeOriginal", "RECONYX")
    jaguar = next((camtrap / "animl-jaguar").glob("*.jpg"))
    assert read_capture_info(jaguar.read_bytes(), mtime=1e9).time_source == FILE_MTIME
