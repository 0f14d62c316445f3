"""MegaDetector batch-output JSON (format 1.4), the file Timelapse, AddaxAI and EcoAssist read.

Boxes are ``[x_min, y_min, width, height]`` normalised to [0, 1] with the origin at the top-left of the
upright image; categories are strings ``"1"`` animal, ``"2"`` person, ``"3"`` vehicle; an image that
could not be processed carries ``failure`` instead of ``detections``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from fieldreid.fsutil import atomic_write_json
from fieldreid.types import MD_CATEGORIES, Detections

FORMAT_VERSION = "1.4"
CONF_DIGITS = 3
COORD_DIGITS = 4


def image_entry(file: str, detections: Detections, size_hw: tuple[int, int]) -> dict:
    """One ``images[]`` record; ``detections`` in full-resolution pixels of an image of ``size_hw``."""
    h, w = size_hw
    dets = []
    order = np.argsort(-detections.confidence, kind="stable")
    for i in order:
        cat = int(detections.category[i])
        if str(cat) not in MD_CATEGORIES:
            continue
        x1, y1, x2, y2 = (float(v) for v in detections.xyxy[i])
        x1, x2 = max(0.0, x1), min(float(w), x2)
        y1, y2 = max(0.0, y1), min(float(h), y2)
        bbox = [round(x1 / w, COORD_DIGITS), round(y1 / h, COORD_DIGITS),
                round((x2 - x1) / w, COORD_DIGITS), round((y2 - y1) / h, COORD_DIGITS)]
        dets.append({"category": str(cat), "conf": round(float(detections.confidence[i]), CONF_DIGITS), "bbox": bbox})
    return {"file": file, "detections": dets, "max_detection_conf": max((d["conf"] for d in dets), default=0.0)}


def failure_entry(file: str, reason: str) -> dict:
    return {"file": file, "failure": reason, "detections": None}


def batch_output(images: list[dict], detector: str, conf_threshold: float,
                 extra_info: dict | None = None) -> dict:
    return {
        "info": {
            "format_version": FORMAT_VERSION,
            "detector": detector,
            "detection_completion_time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "detector_metadata": {"typical_detection_threshold": 0.2, "conf_digits": CONF_DIGITS,
                                  "output_threshold": conf_threshold},
            **(extra_info or {}),
        },
        "detection_categories": dict(MD_CATEGORIES),
        "images": images,
    }


def write_batch_output(path: str | Path, images: list[dict], detector: str, conf_threshold: float,
                       extra_info: dict | None = None) -> Path:
    """Write the JSON atomically (temp file + rename): a crash never leaves a half-written file."""
    return atomic_write_json(path, batch_output(images, detector, conf_threshold, extra_info))


def relative_name(path: Path, roots: list[Path]) -> str:
    """The path Timelapse expects: relative to the folder that was scanned, with forward slashes."""
    path = path.resolve()
    for root in roots:
        root = root.resolve()
        base = root if root.is_dir() else root.parent
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.as_posix()
