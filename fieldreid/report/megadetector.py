"""MegaDetector batch-output JSON (format 1.4), the file Timelapse, AddaxAI and EcoAssist read.

Boxes are ``[x_min, y_min, width, height]`` normalised to [0, 1] with the origin at the top-left of the
upright image; categories are strings ``"1"`` animal, ``"2"`` person, ``"3"`` vehicle; an image that
could not be processed carries ``failure`` instead of ``detections``. A video (fieldreid does not
decode videos: they are always failures) also carries ``frame_rate``, which format 1.4 requires of every
video entry; a failed one gets -1.0, as MegaDetector writes it (its validator accepts a negative rate only
beside a ``failure``).

Individuals (re-identification) travel the way the format carries any classifier's output, which Timelapse
and AddaxAI read: ``classification_categories`` maps an id to each individual (``"1": "zebra-0041"``),
``classification_category_descriptions`` gives its species, and an animal detection that was identified has
``classifications: [[id, conf]]`` (see :func:`fieldreid.report.tables.write_detections_json` for the conf).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import numpy as np

from fieldreid.frames.decode import VIDEO_SUFFIXES
from fieldreid.storage.fsutil import atomic_output, path_text
from fieldreid.types import MD_CATEGORIES, Detections

FORMAT_VERSION = "1.4"
CONF_DIGITS = 3
COORD_DIGITS = 4
#: ``frame_rate`` of a video that could not be read (MegaDetector's own value for that case)
FAILED_FRAME_RATE = -1.0
#: what MegaDetector's tools count as a video (by extension), beside the videos fieldreid itself recognises
MD_VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mpeg", ".mpg", ".mov", ".mkv", ".flv"})


def md_bbox(x1: float, y1: float, x2: float, y2: float, w: float, h: float) -> list[float]:
    """Pixel ``xyxy`` in an image of width ``w`` and height ``h`` → normalised, clipped ``[x, y, w, h]``."""
    x1, x2 = max(0.0, float(x1)), min(float(w), float(x2))
    y1, y2 = max(0.0, float(y1)), min(float(h), float(y2))
    return [round(x1 / w, COORD_DIGITS), round(y1 / h, COORD_DIGITS),
            round((x2 - x1) / w, COORD_DIGITS), round((y2 - y1) / h, COORD_DIGITS)]


def md_detection(category: int, conf: float, xyxy, size_hw: tuple[int, int]) -> dict | None:
    """One ``detections[]`` record, or None for a class outside animal / person / vehicle."""
    if str(int(category)) not in MD_CATEGORIES:
        return None
    h, w = size_hw
    return {"category": str(int(category)), "conf": round(float(conf), CONF_DIGITS), "bbox": md_bbox(*xyxy, w, h)}


def detections_entry(file: str, dets: list[dict]) -> dict:
    return {"file": file, "detections": dets, "max_detection_conf": max((d["conf"] for d in dets), default=0.0)}


def image_entry(file: str, detections: Detections, size_hw: tuple[int, int]) -> dict:
    """One ``images[]`` record; ``detections`` in full-resolution pixels of an image of ``size_hw``."""
    order = np.argsort(-detections.confidence, kind="stable")
    dets = [md_detection(detections.category[i], detections.confidence[i], detections.xyxy[i], size_hw)
            for i in order]
    return detections_entry(file, [d for d in dets if d is not None])


def is_video_name(file: str) -> bool:
    """True when ``file``'s extension makes it a video to fieldreid or to MegaDetector's tools."""
    return PurePosixPath(str(file).replace("\\", "/")).suffix.lower() in VIDEO_SUFFIXES | MD_VIDEO_SUFFIXES


def failure_entry(file: str, reason: str | None) -> dict:
    """One ``images[]`` record for a file that could not be processed (a video also gets ``frame_rate``)."""
    entry = {"file": file, "failure": str(reason or "").strip() or "could not be processed", "detections": None}
    if is_video_name(file):
        entry["frame_rate"] = FAILED_FRAME_RATE
    return entry


def info_block(detector: str, conf_threshold: float, extra_info: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "detector": detector,
        "detection_completion_time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "detector_metadata": {"typical_detection_threshold": 0.2, "conf_digits": CONF_DIGITS,
                              "output_threshold": conf_threshold},
        **(extra_info or {}),
    }


def write_batch_output(path: str | Path, images: Iterable[dict], detector: str, conf_threshold: float,
                       extra_info: dict | None = None, classification_categories: dict[str, str] | None = None,
                       classification_descriptions: dict[str, str] | None = None) -> int:
    """Stream the JSON to a temp file and rename it over ``path`` (a crash never leaves a half-written file;
    memory stays flat however many images there are). Returns the number of image entries."""
    n = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"info": ' + json.dumps(info_block(detector, conf_threshold, extra_info))
                 + ', "detection_categories": ' + json.dumps(MD_CATEGORIES))
        if classification_categories:
            fh.write(', "classification_categories": ' + json.dumps(classification_categories))
            if classification_descriptions:
                fh.write(', "classification_category_descriptions": ' + json.dumps(classification_descriptions))
        fh.write(', "images": [\n')
        for entry in images:
            fh.write((",\n" if n else "") + json.dumps(entry, allow_nan=False))
            n += 1
        fh.write("\n]}\n")
    return n


def relative_name(path: Path, roots: list[Path]) -> str:
    """The path Timelapse expects: relative to the folder that was scanned, with forward slashes, in the
    text form of :func:`fieldreid.storage.fsutil.path_text` (a name that is not UTF-8 gets ``\\xNN`` escapes)."""
    path = path.resolve()
    for root in roots:
        root = root.resolve()
        base = root if root.is_dir() else root.parent
        try:
            return path_text(path.relative_to(base).as_posix())
        except ValueError:
            continue
    return path_text(path.as_posix())
