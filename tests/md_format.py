"""A checker for MegaDetector batch-output JSON, written from the format's published rules.

Sources (read, not copied): MegaDetector's ``megadetector-output-format.md`` (https://lila.science/
megadetector-output-format) and the rules its ``postprocessing/validate_batch_results.py`` enforces:

- top level: an object with ``info``, ``detection_categories`` and ``images``; the only other keys it
  knows are ``classification_categories`` and ``classification_category_descriptions``;
- ``info.format_version``: a string-formatted float, at least 1.3; other ``info`` fields are optional;
- category maps: keys are non-negative integers written as strings, names non-blank strings;
- ``images``: a list of objects, each with a ``file`` string;
- a processed file has a ``detections`` list (empty when nothing was found); each detection has a
  ``category`` listed in ``detection_categories``, a float ``conf`` and a 4-number normalised ``bbox``
  ``[x_min, y_min, width, height]``; ``classifications`` are ``[category-id string, number]``
  pairs in descending order of confidence, ids from ``classification_categories``;
  ``classification_category_descriptions`` has the same ids;
- a failed file has a string ``failure`` and ``detections`` null (missing is tolerated, with a warning;
  a list is an error);
- a video (by file extension) in format >= 1.4 must carry ``frame_rate``: greater than zero, or negative
  (MegaDetector writes -1.0) only beside a ``failure``; its detections need an int ``frame_number`` >= 0;
  in format >= 1.5 it must also carry ``frames_processed``, a list of ints.

``check_md_output(data)`` returns ``(errors, warnings)``; a file is valid when ``errors`` is empty.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath

#: The extensions MegaDetector's validator treats as videos (its ``video_utils.VIDEO_EXTENSIONS``).
MD_VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mpeg", ".mpg", ".mov", ".mkv", ".flv"})
KNOWN_TOP_LEVEL = {"info", "detection_categories", "images",
                   "classification_categories", "classification_category_descriptions"}
BBOX_SLACK = 1e-3  # rounding to 4 digits may push x + w a hair past 1


def is_md_video(file: str) -> bool:
    return PurePosixPath(str(file).replace("\\", "/")).suffix.lower() in MD_VIDEO_EXTENSIONS


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_categories(d: dict, key: str, errors: list[str]) -> None:
    cats = d.get(key)
    if not isinstance(cats, dict):
        errors.append(f"{key} must be an object")
        return
    for k, v in cats.items():
        if not (isinstance(k, str) and k.isdigit()):
            errors.append(f"{key}: id {k!r} is not a non-negative integer string")
        if not (isinstance(v, str) and v.strip()):
            errors.append(f"{key}: name of {k!r} is blank or not a string")


def _check_detection(det, where: str, cats: dict, classes: dict | None, video: bool, errors: list[str]) -> None:
    if not isinstance(det, dict):
        errors.append(f"{where}: a detection is not an object")
        return
    if det.get("category") not in cats:
        errors.append(f"{where}: detection category {det.get('category')!r} not in detection_categories")
    conf = det.get("conf")
    if not (isinstance(conf, float) and 0.0 <= conf <= 1.0):
        errors.append(f"{where}: conf {conf!r} is not a float in [0, 1]")
    bbox = det.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        errors.append(f"{where}: bbox {bbox!r} is not 4 numbers")
    else:
        x, y, w, h = bbox
        if min(x, y, w, h) < 0 or x + w > 1 + BBOX_SLACK or y + h > 1 + BBOX_SLACK:
            errors.append(f"{where}: bbox {bbox} is not normalised [x_min, y_min, width, height]")
    confs = [c[1] for c in det.get("classifications") or []
             if isinstance(c, list | tuple) and len(c) == 2 and _is_number(c[1])]
    if confs != sorted(confs, reverse=True):
        errors.append(f"{where}: classifications are not in descending order of confidence")
    for c in det.get("classifications") or []:
        ok = (isinstance(c, list | tuple) and len(c) == 2 and isinstance(c[0], str) and c[0].isdigit()
              and _is_number(c[1]))
        if not ok:
            errors.append(f"{where}: illegal classification {c!r}")
        elif classes is not None and c[0] not in classes:
            errors.append(f"{where}: classification {c[0]!r} not in classification_categories")
    if video:
        fn = det.get("frame_number")
        if not (isinstance(fn, int) and not isinstance(fn, bool) and fn >= 0):
            errors.append(f"{where}: video detection without an int frame_number >= 0 (got {fn!r})")


def check_md_output(d) -> tuple[list[str], list[str]]:
    """Check parsed MegaDetector batch output; returns ``(errors, warnings)``."""
    errors: list[str] = []
    warnings: list[str] = []
    if not isinstance(d, dict):
        return ["top level is not an object"], warnings
    for key in ("info", "detection_categories", "images"):
        if key not in d:
            errors.append(f"missing required key {key!r}")
    warnings += [f"non-standard top-level key {k!r}" for k in d if k not in KNOWN_TOP_LEVEL]
    if errors:
        return errors, warnings

    info = d["info"]
    version = None
    if not isinstance(info, dict):
        errors.append("info must be an object")
    elif not isinstance(info.get("format_version"), str):
        errors.append(f"info.format_version must be a string, got {info.get('format_version')!r}")
    else:
        try:
            version = float(info["format_version"])
        except ValueError:
            errors.append(f"info.format_version {info['format_version']!r} is not a number")
        else:
            if version < 1.3:
                errors.append(f"format_version {version} is older than 1.3")
    _check_categories(d, "detection_categories", errors)
    classes = None
    if "classification_categories" in d:
        _check_categories(d, "classification_categories", errors)
        classes = d["classification_categories"] if isinstance(d["classification_categories"], dict) else None
    if "classification_category_descriptions" in d:
        _check_categories(d, "classification_category_descriptions", errors)
        descs = d["classification_category_descriptions"]
        if classes is None or not isinstance(descs, dict) or set(descs) != set(classes):
            errors.append("classification_category_descriptions must have the ids of classification_categories")
    cats = d["detection_categories"] if isinstance(d["detection_categories"], dict) else {}

    images = d["images"]
    if not isinstance(images, list):
        return errors + ["images must be a list"], warnings
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("file"), str):
            errors.append(f"images[{i}] is not an object with a file string")
            continue
        file = im["file"]
        failure = im.get("failure")
        video = is_md_video(file) and version is not None and version >= 1.4
        if failure is not None:
            if not (isinstance(failure, str) and failure.strip()):
                errors.append(f"{file}: failure must be a non-blank string, got {failure!r}")
            if "detections" not in im:
                warnings.append(f"{file}: failure without a null detections field")
            elif im["detections"] is not None:
                errors.append(f"{file}: failure beside a non-null detections field")
        elif not isinstance(im.get("detections"), list):
            errors.append(f"{file}: neither a failure nor a detections list")
        for det in im.get("detections") or []:
            _check_detection(det, file, cats, classes, video, errors)
        if "max_detection_conf" in im and not _is_number(im["max_detection_conf"]):
            errors.append(f"{file}: max_detection_conf {im['max_detection_conf']!r} is not a number")
        if not video:
            continue
        if "frame_rate" not in im:
            errors.append(f"{file}: video without frame_rate")
        elif not _is_number(im["frame_rate"]):
            errors.append(f"{file}: frame_rate {im['frame_rate']!r} is not a number")
        elif im["frame_rate"] <= 0 and (im["frame_rate"] == 0 or failure is None):
            errors.append(f"{file}: frame_rate {im['frame_rate']} (negative only beside a failure)")
        if version >= 1.5:
            fp = im.get("frames_processed")
            if not (isinstance(fp, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in fp)):
                errors.append(f"{file}: format >= 1.5 video without a frames_processed list of ints")
    return errors, warnings
