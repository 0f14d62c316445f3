"""`fieldreid watch` in-process: bad files, slow copies, vanished files, duplicates, bursts, restarts, full disks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import pytest

from fieldreid.errors import FieldreidError
from fieldreid.gallery.store import Gallery
from fieldreid.storage.fsutil import OutputWriteError
from fieldreid.watch import WatchConfig, Watcher
from fieldreid.watch import runner as runner_mod
from fieldreid.watch.state import StateDB

OLD = time.time() - 7200  # files copied off a card two hours ago


@pytest.fixture(scope="module")
def models(yolov5n_onnx, default_embedder_onnx):
    from fieldreid.detect import Detector
    from fieldreid.embed.runtime import Embedder

    det = Detector(yolov5n_onnx, backend="onnxruntime", conf=0.2, threads=2)
    emb = Embedder(default_embedder_onnx, backend="onnxruntime", threads=2)
    return det, emb


@pytest.fixture(scope="module")
def owl(camtrap) -> Path:
    return camtrap / "animl-buow" / "IMG_0708.JPG"  # one burrowing owl, found by yolov5n (as a bird)


def _watcher(models, root: Path, tmp: Path, **kw) -> Watcher:
    cfg = dict(settle=0.0, grace=60.0, status_every=1e9, batch=4)
    cfg.update(kw)
    det, emb = models
    return Watcher(WatchConfig(root=root, out=tmp / "out", gallery=tmp / "g.db", **cfg), det, emb, log=lambda m: None)


def _age(*paths: Path, when: float = OLD) -> None:
    for p in paths:
        os.utime(p, (when, when))


def _files(out: Path) -> dict[str, tuple]:
    con = sqlite3.connect(out / "results.db")
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT path, status, reason, duplicate_of, attempts FROM files")}
    finally:
        con.close()


def test_bad_files_get_failure_records_and_never_stop_the_run(models, owl, camtrap, tmp_path) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    shutil.copy(owl, cam / "good.JPG")
    (cam / "zero.JPG").write_bytes(b"")
    (cam / "garbage.jpg").write_bytes(os.urandom(5000))
    (cam / "notes.jpg").write_text("this is a text file with a .jpg name\n")
    (cam / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    data = owl.read_bytes()
    (cam / "cut.JPG").write_bytes(data[: len(data) // 2])
    _age(*cam.iterdir())
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        counts = w.run(once=True)
    files = _files(tmp_path / "out")
    assert files["cam1/good.JPG"][0] == "done"
    reasons = {k.split("/")[1]: v[1] for k, v in files.items() if v[0] == "failed"}
    assert set(reasons) == {"zero.JPG", "garbage.jpg", "notes.jpg", "clip.mp4", "cut.JPG"}
    assert "empty" in reasons["zero.JPG"] and "video" in reasons["clip.mp4"] and "truncated" in reasons["cut.JPG"]
    assert counts["done"] == 1 and counts["failed"] == 5
    md = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert sum("failure" in im for im in md["images"]) == 5
    # a second run touches nothing
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        w.run(once=True)
    assert _files(tmp_path / "out") == files


def test_slow_copy_is_pending_then_processed(models, owl, tmp_path) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    data = owl.read_bytes()
    part = cam / "IMG_0001.JPG"
    part.write_bytes(data[: len(data) // 2])  # the copy is half way; its mtime is "now"
    with _watcher(models, tmp_path / "cards", tmp_path, grace=60.0) as w:
        w.run(once=True)
    status, reason, *_ = _files(tmp_path / "out")["cam1/IMG_0001.JPG"]
    assert status == "pending" and "truncated" in reason
    with open(part, "ab") as fh:  # the copy finishes
        fh.write(data[len(data) // 2:])
    with _watcher(models, tmp_path / "cards", tmp_path, grace=60.0) as w:
        counts = w.run(once=True)
    assert _files(tmp_path / "out")["cam1/IMG_0001.JPG"][0] == "done"
    assert counts["done"] == 1 and counts["pending"] == 0 and counts["failed"] == 0


def test_file_deleted_before_it_is_read(models, owl, camtrap, tmp_path, monkeypatch) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    for name in ("a.JPG", "b.JPG", "c.JPG"):
        shutil.copy(owl if name != "b.JPG" else camtrap / "animl-buow" / "IMG_0827.JPG", cam / name)
    (cam / "c.JPG").write_bytes(owl.read_bytes() + b"distinct")
    _age(*cam.iterdir())
    real_scan = runner_mod.scan

    def scan_then_delete(*args, **kw):
        for cand in real_scan(*args, **kw):
            if cand.rel.endswith("b.JPG"):
                cand.path.unlink()  # gone between the listing and the read
            yield cand

    monkeypatch.setattr(runner_mod, "scan", scan_then_delete)
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        w.run(once=True)
    files = _files(tmp_path / "out")
    assert files["cam1/a.JPG"][0] == files["cam1/c.JPG"][0] == "done"
    assert files["cam1/b.JPG"][0] == "failed" and "disappeared" in files["cam1/b.JPG"][1]


def test_duplicates_are_recorded_not_recounted(models, owl, tmp_path) -> None:
    root = tmp_path / "cards"
    for cam in ("cam1", "cam2"):
        (root / cam).mkdir(parents=True)
    shutil.copy(owl, root / "cam1" / "IMG_0708.JPG")
    shutil.copy(owl, root / "cam2" / "copy of IMG_0708.JPG")
    shutil.copy(owl, root / "cam1" / "IMG_0708 (1).JPG")
    _age(*root.rglob("*.JPG"))
    with _watcher(models, root, tmp_path) as w:
        counts = w.run(once=True)
    assert counts["done"] == 1 and counts["duplicate"] == 2
    files = _files(tmp_path / "out")
    original = next(k for k, v in files.items() if v[0] == "done")
    assert all(v[2] == original for v in files.values() if v[0] == "duplicate")
    st = StateDB(tmp_path / "out" / "results.db", readonly=True)
    assert st.con.execute("SELECT count(*) FROM images").fetchone()[0] == 1
    st.close()
    with Gallery(tmp_path / "g.db") as g:
        n_animals = sqlite3.connect(tmp_path / "out" / "results.db").execute(
            "SELECT count(*) FROM detections WHERE embedding IS NOT NULL").fetchone()[0]
        assert n_animals >= 1 and g.count_sightings() == n_animals


def _burst(owl: Path, cam: Path, n: int, t0: float, start: int = 0) -> list[Path]:
    """Frames of one burst: the owl re-encoded (no EXIF: the file time is the capture time), 2 s apart."""
    img = cv2.imread(str(owl))
    out = []
    for k in range(start, start + n):
        p = cam / f"burst_{k:02d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90 - k])
        p.write_bytes(buf.tobytes())
        _age(p, when=t0 + 2 * k)
        out.append(p)
    return out


def test_burst_fused_into_one_decision_and_open_event_survives_restart(models, owl, tmp_path) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    t0 = OLD
    _burst(owl, cam, 2, t0)
    w = _watcher(models, tmp_path / "cards", tmp_path, idle_close=1e6)
    w.run_pass()  # processed, event still open (as if stopped now)
    w.close()
    st = StateDB(tmp_path / "out" / "results.db", readonly=True)
    assert st.con.execute("SELECT count(*), min(status) FROM events").fetchone() == (1, "open")
    st.close()
    _burst(owl, cam, 2, t0, start=2)  # the rest of the burst arrives after the restart
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        w.run(once=True)
    con = sqlite3.connect(tmp_path / "out" / "results.db")
    assert con.execute("SELECT count(*), sum(n_images), min(status) FROM events").fetchone() == (1, 4, "closed")
    tracks = con.execute("SELECT track, count(*), count(DISTINCT decision), count(DISTINCT identity), max(n_frames) "
                         "FROM decisions GROUP BY track").fetchall()
    owl_track = max(tracks, key=lambda t: t[1])
    assert owl_track[1] == 4 and owl_track[2] == 1 and owl_track[3] == 1 and owl_track[4] == 4
    assert con.execute("SELECT count(*) FROM decisions WHERE representative = 1").fetchone()[0] == len(tracks)
    with Gallery(tmp_path / "g.db") as g:
        provisional = [i for i in g.identities() if i.status == "provisional"]
        assert len(provisional) == len(tracks)  # one new identity per animal, not per frame
        assert g.count_sightings() == con.execute("SELECT count(*) FROM decisions").fetchone()[0]


def test_output_disk_full_keeps_previous_outputs_and_state(models, owl, camtrap, tmp_path, monkeypatch) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    shutil.copy(owl, cam / "a.JPG")
    _age(cam / "a.JPG")
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        w.run(once=True)
    before = (tmp_path / "out" / "detections.json").read_bytes()
    shutil.copy(camtrap / "animl-buow" / "IMG_0827.JPG", cam / "b.JPG")
    _age(cam / "b.JPG")

    # 1. the results database cannot commit: the batch is rolled back, nothing recorded
    real = StateDB.upsert_file

    def full_db(self, *a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(StateDB, "upsert_file", full_db)
    with _watcher(models, tmp_path / "cards", tmp_path) as w, pytest.raises(OutputWriteError, match="disk is full"):
        w.run(once=True)
    assert "cam1/b.JPG" not in _files(tmp_path / "out")
    assert sqlite3.connect(tmp_path / "out" / "results.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    monkeypatch.setattr(StateDB, "upsert_file", real)

    # 2. the output files cannot be written: clear error, previous files intact, state committed
    def enospc(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner_mod.os, "fsync", enospc)  # where a full disk surfaces with delayed allocation
    with _watcher(models, tmp_path / "cards", tmp_path) as w, pytest.raises(OutputWriteError, match="disk is full"):
        w.run(once=True)
    monkeypatch.undo()
    assert (tmp_path / "out" / "detections.json").read_bytes() == before
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert _files(tmp_path / "out")["cam1/b.JPG"][0] == "done"
    with _watcher(models, tmp_path / "cards", tmp_path) as w:  # space freed: outputs catch up, nothing redone
        counts = w.run(once=True)
    assert counts["done"] == 2
    assert len(json.loads((tmp_path / "out" / "detections.json").read_text())["images"]) == 2


def test_folder_gone(models, tmp_path) -> None:
    (tmp_path / "cards").mkdir()
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        (tmp_path / "cards").rmdir()
        with pytest.raises(FieldreidError, match="not there"):
            w.run(once=True)


def test_watch_mode_new_camera_folder_and_idle_wakeups(models, owl, tmp_path) -> None:
    root = tmp_path / "cards"
    root.mkdir()
    logs: list[str] = []
    det, emb = models
    w = Watcher(WatchConfig(root=root, out=tmp_path / "out", gallery=tmp_path / "g.db", settle=0.3, rescan=30.0,
                            idle_close=0.5, status_every=1e9), det, emb, log=logs.append)
    th = threading.Thread(target=w.run, kwargs={"once": False}, daemon=True)
    th.start()
    try:
        time.sleep(1.0)
        # idle = blocked in its wait: the watcher's own loop must not wake (no polling) while nothing happens;
        # counted wake-ups, not CPU time, so other threads and a loaded machine cannot change the result
        woke = w.wakeups
        time.sleep(2.0)
        idle_wakeups = w.wakeups - woke
        assert idle_wakeups <= 1, f"idle watch woke {idle_wakeups} times in 2 s"
        woke = w.wakeups
        (root / "newcam").mkdir()  # a new camera folder appears, then a file in it
        shutil.copy(owl, root / "newcam" / "IMG_1.JPG")
        deadline = time.time() + 30
        while time.time() < deadline:
            row = StateDB(tmp_path / "out" / "results.db", readonly=True).file_row("newcam/IMG_1.JPG")
            if row and row[0] == "done":
                break
            time.sleep(0.2)
        assert row and row[0] == "done"
        assert w.wakeups > woke  # file events wake it (the counter sees the loop's wake-ups)
    finally:
        w.request_stop()
        th.join(timeout=30)
        w.close()
    assert not th.is_alive()
    assert (tmp_path / "out" / "images.csv").exists()


def test_stage_times_cover_every_stage_of_a_pass(models, owl, tmp_path) -> None:
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    shutil.copy(owl, cam / "a.JPG")
    _age(*cam.iterdir())
    with _watcher(models, tmp_path / "cards", tmp_path) as w:
        w.run_pass()
        ms = w.pipe.times.per_image_ms(1)
    assert list(ms) == ["decode", "detect", "crop", "embed", "database"]  # the owl is an animal: all five
    assert all(v > 0 for v in ms.values())
