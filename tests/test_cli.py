"""The command line on real camera-trap images, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def fieldreid(*args: str, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fieldreid {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_detect_finishes_on_bad_input_and_records_failures(camtrap, yolov5n_onnx, tmp_path):
    folder = camtrap / "animl-southwest"
    out = tmp_path / "md.json"
    fieldreid("detect", str(folder), "--detector", str(yolov5n_onnx), "--out", str(out))
    d = json.loads(out.read_text())
    by_file = {im["file"]: im for im in d["images"]}
    on_disk = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".mp4"))
    assert sorted(by_file) == on_disk
    assert "empty" in by_file["error_img.JPG"]["failure"]
    assert "video" in by_file["error_vid.mp4"]["failure"]
    ok = [im for name, im in by_file.items() if not name.startswith("error_")]
    assert all("failure" not in im for im in ok)
    assert all(isinstance(im["detections"], list) for im in ok)
    deer = by_file["IMAG0107_deer.JPG"]["detections"]
    assert any(det["category"] == "1" and det["conf"] >= 0.1 for det in deer)  # yolov5n: "horse" ~0.2
    for im in ok:
        for det in im["detections"]:
            x, y, w, h = det["bbox"]
            assert 0 <= x <= 1 and 0 <= y <= 1 and 0 < w <= 1 and 0 < h <= 1 and x + w <= 1.0001 and y + h <= 1.0001
            assert det["category"] in d["detection_categories"]


def test_detect_boxes_agree_with_megadetector_on_animals(camtrap, yolov5n_onnx, tmp_path):
    """yolov5n-coco is not MegaDetector, but on clear animals its boxes overlap MDv5a's."""
    import csv

    folder = camtrap / "animl-southwest"
    out = tmp_path / "md.json"
    fieldreid("detect", str(folder), "--detector", str(yolov5n_onnx), "--out", str(out), "--conf", "0.3")
    ours = {im["file"]: im["detections"] for im in json.loads(out.read_text())["images"] if im.get("detections")}
    with (folder / "megadetector_v5a_boxes.csv").open() as fh:
        md = [r for r in csv.DictReader(fh) if r["conf"] and float(r["conf"]) >= 0.8 and r["category"] == "1"]
    matched = 0
    compared = 0
    for r in md:
        if r["FileName"] not in ours:
            continue
        compared += 1
        bx, by, bw, bh = (float(r[f"bbox{i}"]) for i in range(1, 5))
        for det in ours[r["FileName"]]:
            x, y, w, h = det["bbox"]
            ix = max(0, min(x + w, bx + bw) - max(x, bx))
            iy = max(0, min(y + h, by + bh) - max(y, by))
            inter = ix * iy
            if inter / (w * h + bw * bh - inter) > 0.5:
                matched += 1
                break
    assert compared >= 5
    assert matched / compared >= 0.5, f"only {matched}/{compared} confident MDv5a animal boxes found"


def test_embed_writes_vectors_per_animal(camtrap, yolov5n_onnx, default_embedder_onnx, tmp_path):
    out = tmp_path / "v.npz"
    fieldreid("embed", str(camtrap / "animl-southwest"), "--detector", str(yolov5n_onnx), "--embedder",
              str(default_embedder_onnx), "--out", str(out))
    z = np.load(out)
    assert z["vectors"].shape[0] == len(z["files"]) == len(z["boxes"]) >= 3
    assert np.allclose(np.linalg.norm(z["vectors"], axis=1), 1.0, atol=1e-4)
    assert str(z["model_id"]).startswith("fieldreid-")
    assert {"error_img.JPG", "error_vid.mp4"} <= set(z["failures"][:, 0])


def test_embed_crops_gives_one_vector_per_image(default_embedder_onnx, zebra, tmp_path):
    files = sorted(zebra.rglob("*.jpg"))[:6]
    out = tmp_path / "v.npz"
    # the crop rule: the detector (the default one, when built) finds each crop's animal, else it is whole
    fieldreid("embed", *map(str, files), "--crops", "--embedder", str(default_embedder_onnx), "--out", str(out))
    z = np.load(out)
    assert z["vectors"].shape == (len(files), z["vectors"].shape[1]) and len(z["boxes"]) == len(files)
    assert ((z["boxes"][:, 2:] > 0) & (z["boxes"][:, 2:] <= 1)).all()


def test_missing_default_model_is_a_clear_error(tmp_path, camtrap):
    proc = fieldreid("detect", str(camtrap / "animl-buow"), "--out", str(tmp_path / "x.json"),
                     env_extra={"FIELDREID_MODELS": str(tmp_path / "nothing")}, check=False)
    assert proc.returncode == 2
    assert "No default detector" in proc.stderr and "make models" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_doctor_reports_backends(tmp_path):
    # a table lays itself out to the width: give it room, so neither $COLUMNS nor the temp path's length
    # (shown in the models rows) can fold "backend onnxruntime" over two lines
    proc = fieldreid("doctor", env_extra={"FIELDREID_MODELS": str(tmp_path), "COLUMNS": "1000"})
    assert "backend onnxruntime" in proc.stdout and "backend tensorrt" in proc.stdout
    assert "missing" in proc.stdout  # no default models in an empty folder
