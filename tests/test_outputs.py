from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fieldreid.fsutil import OutputWriteError, atomic_write_json, atomic_write_text
from fieldreid.megadetector import failure_entry, image_entry, relative_name, write_batch_output
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
