"""Capture time, camera make/model and position from a camera-trap image's EXIF block.

Capture time, in this order (the first tag that holds a plausible date wins):

1. ``DateTimeOriginal`` (0x9003, Exif IFD): when the shutter fired - what every camera-trap tool uses.
2. ``DateTimeDigitized`` (0x9004): the same on a camera trap; some firmwares fill only this one.
3. ``DateTime`` (0x0132, IFD0): last modification; edited or re-saved files may have only this.
4. the file's modification time, converted to this machine's local time: ``time_source = "file_mtime"``
   flags it, since copying a card with a tool that does not keep times gives the copy time instead.

The matching ``OffsetTime*`` tag (EXIF 2.31: ``OffsetTimeOriginal`` 0x9011, ``OffsetTimeDigitized`` 0x9012,
``OffsetTime`` 0x9010) gives the UTC offset when the camera wrote one; most camera traps do not, and
their clocks run on local time, so the offset is then ``None`` and the report asks for one.
Values such as ``0000:00:00 00:00:00`` (clock never set) or unparsable ones are skipped, not trusted.

>>> info = read_capture_info(Path("IMG_0001.JPG").read_bytes(), mtime=1.7e9)   # doctest: +SKIP
>>> info.captured, info.time_source                                           # doctest: +SKIP
('2020-04-16T10:10:32', 'DateTimeOriginal')
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

EXIF_IFD = 0x8769
GPS_IFD = 0x8825
TAG_MAKE, TAG_MODEL, TAG_DATETIME = 0x010F, 0x0110, 0x0132
TAG_ORIGINAL, TAG_DIGITIZED = 0x9003, 0x9004
TAG_OFFSET, TAG_OFFSET_ORIGINAL, TAG_OFFSET_DIGITIZED = 0x9010, 0x9011, 0x9012
#: (name, IFD, date tag, offset tag) in fallback order
TIME_TAGS = (("DateTimeOriginal", EXIF_IFD, TAG_ORIGINAL, TAG_OFFSET_ORIGINAL),
             ("DateTimeDigitized", EXIF_IFD, TAG_DIGITIZED, TAG_OFFSET_DIGITIZED),
             ("DateTime", None, TAG_DATETIME, TAG_OFFSET))
FILE_MTIME = "file_mtime"
_DATE_RE = re.compile(r"^\s*(\d{4})[:\-/](\d{2})[:\-/](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET_RE = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


@dataclass(frozen=True)
class CaptureInfo:
    """What the image says about itself. ``captured`` is local camera time ``YYYY-MM-DDTHH:MM:SS``."""

    captured: str
    time_source: str
    utc_offset: str | None = None
    make: str | None = None
    model: str | None = None
    latitude: float | None = None
    longitude: float | None = None

    @property
    def timestamp(self) -> float:
        """Seconds since 1970 of the camera's local clock (naive: for gaps between images of one camera)."""
        return (datetime.fromisoformat(self.captured) - datetime(1970, 1, 1)).total_seconds()


def parse_exif_datetime(value: object) -> datetime | None:
    """``2020:04:16 10:10:32`` (also with ``-`` separators, trailing NULs or sub-seconds) → datetime."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    if not isinstance(value, str):
        return None
    m = _DATE_RE.match(value.replace("\x00", ""))
    if not m:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    if y < 1990 or y > 2100:  # camera clock never set (0000:00:00) or garbage
        return None
    try:
        return datetime(y, mo, d, h, mi, min(s, 59))
    except ValueError:
        return None


def parse_offset(value: object) -> str | None:
    """``+02:00`` / ``-0500`` → ``+02:00``; anything else → None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    if not isinstance(value, str):
        return None
    m = _OFFSET_RE.match(value.replace("\x00", ""))
    if not m:
        return None
    sign, hh, mm = m.groups()
    if int(hh) > 14 or int(mm) > 59:
        return None
    return f"{sign}{hh}:{mm}"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "ignore")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _gps_degrees(values: object, ref: object) -> float | None:
    try:
        d, m, s = (float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    deg = d + m / 60.0 + s / 3600.0
    ref = _text(ref)
    return -deg if ref in ("S", "W") else deg


def local_mtime(mtime: float) -> tuple[str, str]:
    """A file time (epoch seconds) as this machine's local time and its UTC offset."""
    local = datetime.fromtimestamp(mtime).astimezone()
    off = local.utcoffset() or timedelta(0)
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return local.replace(tzinfo=None).isoformat(timespec="seconds"), f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def header_exif(im) -> object | None:
    """The EXIF of an open PIL image, read without decoding its pixels; None when it has none there.

    PIL's PNG ``getexif()`` decodes the whole image to look for an ``eXIf`` chunk after the pixel data,
    which turns a 500 KB PNG of 13,000 x 13,000 pixels into a 500 MB allocation before any size check;
    only the chunks before the pixel data are used here (where cameras and editors write it).
    """
    if im.format == "PNG" and "exif" not in im.info:
        return None
    return im.getexif()


def read_capture_info(data: bytes, mtime: float) -> CaptureInfo:
    """Capture time (fallback order in the module docstring), make/model and GPS; never raises."""
    make = model = None
    lat = lon = None
    exif = None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "TIFF", "WEBP"]) as im:
            exif = header_exif(im)
    except Exception:  # not an image, or a broken EXIF block: fall back to the file time
        exif = None
    if exif is not None:
        try:
            ifds = {None: exif, EXIF_IFD: exif.get_ifd(EXIF_IFD)}
        except Exception:
            ifds = {None: exif, EXIF_IFD: {}}
        make, model = _text(exif.get(TAG_MAKE)), _text(exif.get(TAG_MODEL))
        try:
            gps = exif.get_ifd(GPS_IFD)
            if gps and 2 in gps and 4 in gps:
                lat, lon = _gps_degrees(gps[2], gps.get(1)), _gps_degrees(gps[4], gps.get(3))
                if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == lon == 0):
                    lat = lon = None
        except Exception:
            lat = lon = None
        for name, ifd, tag, offset_tag in TIME_TAGS:
            tags = ifds.get(ifd) or {}
            when = parse_exif_datetime(tags.get(tag))
            if when is not None:
                offset = parse_offset((ifds.get(EXIF_IFD) or {}).get(offset_tag))
                return CaptureInfo(when.isoformat(timespec="seconds"), name, offset, make, model, lat, lon)
    captured, offset = local_mtime(mtime)
    return CaptureInfo(captured, FILE_MTIME, offset, make, model, lat, lon)
