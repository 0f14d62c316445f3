from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from md_format import check_md_output

from fieldreid.report.megadetector import (
    detections_entry,
    failure_entry,
    image_entry,
    relative_name,
    write_batch_output,
)
from fieldreid.storage.fsutil import OutputWriteError, atomic_write_json, atomic_write_text
from fieldreid.types import Detections


def test_megadetector_entry_normalises_boxes_and_drops_other_categories():
    det = Detections(
        xyxy=np.array([[100, 50, 300, 250], [0, 0, 10, 10], [-5, 900, 50, 1100]], np.float32),
        confidence=np.array([0.5, 0.9, 0.8]),
        class_id=np.array([22, 60, 0]),
        category=np.array([1, 0, 2]),
    )
    e = image_entry("cam/img.jpg", det, (1000, 2000))
    assert e["file"] == "cam/img.jpg"
    assert [d["category"] for d in e["detections"]] == ["2", "1"]  # sorted by confidence, class 0 dropped
    person, animal = e["detections"]
    assert animal["bbox"] == [0.05, 0.05, 0.1, 0.2]
    assert person["bbox"][0] == 0.0 and person["bbox"][1] == 0.9 and person["bbox"][3] == pytest.approx(0.1)
    assert e["max_detection_conf"] == 0.8


def test_batch_output_is_valid_megadetector_json(tmp_path):
    out = tmp_path / "md.json"
    images = [image_entry("a.jpg", Detections.empty(), (10, 10)), failure_entry("b.jpg", "b.jpg: empty file")]
    write_batch_output(out, images, detector="yolov5n-coco", conf_threshold=0.1)
    d = json.loads(out.read_text())
    assert d["info"]["format_version"] == "1.4"
    assert d["detection_categories"] == {"1": "animal", "2": "person", "3": "vehicle"}
    assert d["images"][0]["detections"] == []
    assert d["images"][1]["failure"].startswith("b.jpg") and d["images"][1]["detections"] is None


def md_file(*images, version="1.4", **top) -> dict:
    return {"info": {"format_version": version}, "detection_categories": {"1": "animal", "2": "person"},
            "images": list(images), **top}


def test_md_checker_rules():
    """The checker (tests/md_format.py) enforces MegaDetector's format rules, so it can fail."""
    det = {"category": "1", "conf": 0.5, "bbox": [0.1, 0.2, 0.3, 0.4]}
    good = md_file({"file": "a.jpg", "detections": [det]}, {"file": "b.jpg", "failure": "corrupt", "detections": None},
                   {"file": "c.MP4", "failure": "unreadable", "detections": None, "frame_rate": -1.0},
                   {"file": "d.avi", "frame_rate": 30, "detections": [{**det, "frame_number": 0}]})
    assert check_md_output(good) == ([], [])
    bad = {
        "failed video without frame_rate": md_file({"file": "v/x.mp4", "failure": "video", "detections": None}),
        "negative frame_rate without failure": md_file({"file": "x.mov", "frame_rate": -1.0, "detections": []}),
        "video detection without frame_number": md_file({"file": "x.mp4", "frame_rate": 25.0, "detections": [det]}),
        "1.5 video without frames_processed": md_file({"file": "x.mp4", "frame_rate": 25.0, "detections": []},
                                                      version="1.5"),
        "failure beside a detections list": md_file({"file": "a.jpg", "failure": "x", "detections": []}),
        "no failure and no detections": md_file({"file": "a.jpg", "detections": None}),
        "int conf": md_file({"file": "a.jpg", "detections": [{**det, "conf": 1}]}),
        "unmapped category": md_file({"file": "a.jpg", "detections": [{**det, "category": "3"}]}),
        "pixel bbox": md_file({"file": "a.jpg", "detections": [{**det, "bbox": [10, 20, 30, 40]}]}),
        "numeric format_version": {**md_file(), "info": {"format_version": 1.4}},
        "old format_version": md_file(version="1.2"),
        "non-integer category id": {**md_file(), "detection_categories": {"animal": "animal"}},
        "classification not in classification_categories": md_file(
            {"file": "a.jpg", "detections": [{**det, "classifications": [["7", 0.9]]}]},
            classification_categories={"1": "zebra-0041"}),
        "classifications out of order": md_file(
            {"file": "a.jpg", "detections": [{**det, "classifications": [["1", 0.2], ["2", 0.9]]}]},
            classification_categories={"1": "zebra-0041", "2": "zebra-0042"}),
        "descriptions with other ids": md_file(classification_categories={"1": "zebra-0041"},
                                               classification_category_descriptions={"2": "zebra"}),
    }
    for what, d in bad.items():
        errors, _ = check_md_output(d)
        assert errors, f"checker accepted: {what}"
    assert check_md_output(md_file(extra=1))[1]  # an unknown top-level key is a warning


def test_real_megadetector_file_passes_the_checker(camtrap):
    path = camtrap / "animl-southwest" / "md_output_example.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    errors, warnings = check_md_output(json.loads(path.read_text()))
    assert errors == [] and warnings == []


def test_failed_video_entry_is_valid(tmp_path):
    """Format 1.4: every video needs frame_rate; MegaDetector writes -1.0 beside a failure."""
    out = tmp_path / "md.json"
    images = [failure_entry("cam/clip.MP4", "video files are not processed"), failure_entry("cam/a.mkv", None),
              failure_entry("cam/b.jpg", "empty file (0 bytes)"), detections_entry("cam/c.jpg", [])]
    write_batch_output(out, images, detector="yolov5n-coco", conf_threshold=0.1)
    d = json.loads(out.read_text())
    assert check_md_output(d) == ([], [])
    clip, mkv, jpg, _ = d["images"]
    assert clip["frame_rate"] == -1.0 and clip["detections"] is None and clip["failure"]
    assert mkv["failure"] and mkv["frame_rate"] == -1.0  # no reason still gives a failure string
    assert "frame_rate" not in jpg


def test_detect_output_on_real_folder_is_valid_megadetector_json(camtrap, yolov5n_onnx, tmp_path):
    """`fieldreid detect` over the folder with a corrupt image and a video, as `make demo` runs it."""
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, "-m", "fieldreid.cli", "detect", str(camtrap / "animl-southwest"),
                           "--detector", str(yolov5n_onnx), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(out.read_text())
    assert check_md_output(d) == ([], [])
    assert any("failure" in im and im["file"].endswith(".mp4") for im in d["images"])
    assert sum(bool(im.get("detections")) for im in d["images"]) >= 5


def test_relative_names_use_forward_slashes(tmp_path):
    (tmp_path / "cam1").mkdir()
    f = tmp_path / "cam1" / "x.jpg"
    f.write_bytes(b"")
    assert relative_name(f, [tmp_path]) == "cam1/x.jpg"
    assert relative_name(f, [f]) == "x.jpg"


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"good": 1})

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputWriteError, match="disk is full"):
        atomic_write_json(target, {"good": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_write_into_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputWriteError, match="Cannot write"):
        atomic_write_text(blocker / "sub" / "out.json", "{}")
