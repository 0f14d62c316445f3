"""`fieldreid report`: a Camtrap DP package validated by frictionless, and a self-contained HTML page."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fieldreid.report.camtrapdp import SCHEMAS, columns

frictionless = pytest.importorskip("frictionless")
OLD = time.time() - 7200


@pytest.fixture(scope="module")
def watched(camtrap, yolov5n_onnx, default_embedder_onnx, tmp_path_factory) -> Path:
    """A small watch output: two cameras, animals, an empty frame, a corrupt file, a duplicate."""
    from fieldreid.detect import Detector
    from fieldreid.embed.runtime import Embedder
    from fieldreid.watch import WatchConfig, Watcher

    base = tmp_path_factory.mktemp("report")
    root = base / "cards"
    picks = {"owls": ["animl-buow/IMG_0708.JPG", "animl-buow/IMG_0827.JPG", "animl-buow/IMG_0919.JPG"],
             "southwest": ["animl-southwest/IMAG0004_cougar.JPG", "animl-southwest/B013_IMG_0005_empty.jpeg",
                           "animl-southwest/error_img.JPG"]}
    for cam, files in picks.items():
        (root / cam).mkdir(parents=True)
        for f in files:
            shutil.copy(camtrap / f, root / cam / Path(f).name)
    shutil.copy(camtrap / picks["owls"][0], root / "southwest" / "dup.JPG")
    for p in root.rglob("*"):
        os.utime(p, (OLD, OLD))
    det = Detector(yolov5n_onnx, backend="onnxruntime", conf=0.2, threads=2)
    emb = Embedder(default_embedder_onnx, backend="onnxruntime", threads=2)
    cfg = WatchConfig(root=root, out=base / "out", gallery=base / "g.db", settle=0, status_every=1e9)
    with Watcher(cfg, det, emb, log=lambda m: None) as w:
        w.run(once=True)
    (base / "deployments.csv").write_text("deploymentID,latitude,longitude,cameraHeight\nowls,33.1,-117.2,0.5\n"
                                          "southwest,34.05,-111.9,1.2\n")
    return base


def _schema(table: str):
    return frictionless.Schema.from_descriptor(SCHEMAS[table])


def _validate_package(pkg: Path) -> frictionless.Report:
    """The package's three tables against the Camtrap DP 1.0 table schemas (incl. primary/foreign keys)."""
    resources = [frictionless.Resource(path=f"{t}.csv", basepath=str(pkg), name=t, schema=_schema(t))
                 for t in ("deployments", "media", "observations")]
    return frictionless.Package(resources=resources, basepath=str(pkg)).validate()


def test_camtrap_dp_package_validates(watched, tmp_path) -> None:
    pkg = tmp_path / "pkg"
    res = subprocess.run([sys.executable, "-m", "fieldreid.cli", "report", str(watched / "out"), "--camtrap-dp",
                          str(pkg), "--deployments", str(watched / "deployments.csv"), "--utc-offset", "-07:00"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = _validate_package(pkg)
    assert report.valid, report.flatten(["rowNumber", "fieldName", "type", "note"])
    desc = json.loads((pkg / "datapackage.json").read_text())
    assert desc["profile"].endswith("camtrap-dp-profile.json")
    assert [r["name"] for r in desc["resources"]] == ["deployments", "media", "observations"]
    for key in ("name", "id", "created", "contributors", "project", "spatial", "temporal", "taxonomic"):
        assert key in desc
    with (pkg / "observations.csv").open() as fh:
        obs = list(csv.DictReader(fh))
    assert list(obs[0]) == columns("observations")
    animals = [o for o in obs if o["observationType"] == "animal"]
    assert animals and all(o["classificationMethod"] == "machine" for o in obs)
    decided = [o for o in animals if o["observationTags"].startswith("fieldreid:")]
    assert decided and all(o["classifiedBy"].startswith("fieldreid-") for o in decided)
    assert any(o["individualID"] for o in decided)
    assert all(0 <= float(o["classificationProbability"]) <= 1 for o in animals)
    assert all(o["bboxX"] and o["bboxWidth"] for o in animals)
    assert any(o["observationType"] == "blank" for o in obs)
    with (pkg / "media.csv").open() as fh:
        media = list(csv.DictReader(fh))
    # camera clocks without an EXIF offset get --utc-offset; file times carry this machine's own offset
    exif_timed = [m for m in media if json.loads(m["exifData"] or "{}").get("timeSource") == "DateTimeOriginal"]
    assert exif_timed and all(m["timestamp"].endswith("-07:00") for m in exif_timed)
    assert len(media) == 5  # 7 files: one corrupt (no media), one duplicate (the same picture)
    assert all((pkg / m["filePath"]).resolve().is_file() for m in media)


def test_missing_coordinates_warn_and_are_caught_by_the_validator(watched, tmp_path) -> None:
    from fieldreid.report.camtrapdp import write_package

    pkg, warnings = write_package(watched / "out", tmp_path / "pkg")
    assert any("latitude" in w for w in warnings)
    report = _validate_package(pkg.parent)
    assert not report.valid
    assert {row[0] for row in report.flatten(["type"])} == {"constraint-error"}


def test_schemas_accept_the_standards_own_example(camtrap) -> None:
    """Our transcription of the Camtrap DP 1.0 table schemas accepts the TDWG example package's tables.

    Every field, type, enum, range and key of the example passes, except three ``exifData`` cells that are
    not valid JSON in the example itself (an object followed by extra data): the validator is strict."""
    example = camtrap / "camtrapdp-example"
    report = _validate_package(example)
    errors = report.flatten(["rowNumber", "fieldName", "type"])
    assert {(field, kind) for _, field, kind in errors} <= {("exifData", "type-error")}, errors[:5]
    assert len(errors) == 3


def test_html_report_is_self_contained(watched, tmp_path) -> None:
    page = tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "fieldreid.cli", "report", str(watched / "out"), "--html", str(page)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = page.read_text()
    assert "data:image/jpeg;base64," in text
    assert not re.search(r"""(src|href)=["']?(https?:|file:|/)""", text)
    import sqlite3

    con = sqlite3.connect(watched / "out" / "results.db")
    n = con.execute("SELECT count(*) FROM decisions WHERE representative = 1 AND decision IN ('new', 'uncertain')"
                    ).fetchone()[0]
    assert text.count('<div class="animal ') == n and n >= 1
    assert "error_img.JPG" in text  # the failure list
