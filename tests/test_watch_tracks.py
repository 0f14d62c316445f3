"""Tracks on real photos: different zebras given one capture time must not become one animal (issue 11)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from fieldreid.gallery.store import Gallery
from fieldreid.watch import WatchConfig, Watcher


@pytest.fixture(scope="module")
def models(yolov5n_onnx, default_embedder_onnx):
    from fieldreid.detect import Detector
    from fieldreid.embed.runtime import Embedder

    return (Detector(yolov5n_onnx, backend="onnxruntime", conf=0.2, threads=2),
            Embedder(default_embedder_onnx, backend="onnxruntime", threads=2))


def _with_capture_time(src: Path, dst: Path, when: str) -> None:
    from PIL import Image

    with Image.open(src) as im:
        exif = im.getexif()
        exif.get_ifd(0x8769)[0x9003] = when  # Exif IFD: DateTimeOriginal
        im.save(dst, quality=95, exif=exif)


def test_different_zebras_with_one_capture_time_stay_apart(models, zebra, tmp_path) -> None:
    """The lab enrols and calibrates zebras from crops; a camera folder then holds one photo each of six of
    them, all stamped with the same second. Before issue 11 they became one track and one identity."""
    from fieldreid.evaluation.metrics import calibrate
    from fieldreid.gallery.enroll import embed_items, enroll, read_metadata

    det, emb = models
    items = read_metadata(zebra / "metadata.csv")
    ids = sorted({it.identity for it in items})[:8]
    lab = [it for it in items if it.identity in ids and "database" in str(it.path)]
    queries = {i: sorted(it.path for it in items if it.identity == i and "query" in str(it.path)) for i in ids}
    photos = [(i, q[0]) for i, q in queries.items() if q][:6]
    assert len(photos) == 6
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        enroll(lab, g, emb, None, crops=True)
        res = embed_items(lab, emb, None, crops=True)
        calibrate(res.vectors, [it.identity for it in res.items], gallery=g, species=lab[0].species,
                  model_id=emb.model_id)
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    truth = {}
    for k, (ident, src) in enumerate(photos):
        name = f"IMG_{k:04d}.JPG"
        _with_capture_time(src, cam / name, "2024:05:01 10:00:00")
        old = time.time() - 3600
        os.utime(cam / name, (old, old))
        truth[f"cam1/{name}"] = ident
    cfg = WatchConfig(root=tmp_path / "cards", out=tmp_path / "out", gallery=tmp_path / "g.db", settle=0.0,
                      status_every=1e9, batch=8)
    with Watcher(cfg, det, emb, log=lambda m: None) as w:
        w.run(once=True)
    con = sqlite3.connect(tmp_path / "out" / "results.db")
    try:
        assert con.execute("SELECT count(*), max(n_images) FROM events").fetchone() == (1, 6)  # one event
        rows = con.execute("SELECT i.path, c.track FROM decisions c JOIN images i ON i.sha256 = c.sha256").fetchall()
    finally:
        con.close()
    assert {p for p, _ in rows} == set(truth)  # yolov5n finds a zebra in each photo
    animals_per_track: dict[int, set[str]] = {}
    for path, track in rows:
        animals_per_track.setdefault(track, set()).add(truth[path])
    assert all(len(a) == 1 for a in animals_per_track.values()), animals_per_track
