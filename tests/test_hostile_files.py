"""A hostile camera folder (issue 12): names that are not UTF-8, FIFOs, links to devices, to `/` and in loops,
decompression bombs, decoder errors, a blocked read at stop time, two writers on one output folder, and a
read-only output folder. Each case stops no run, never hangs, and ends as a clear per-file record or message."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import PngImagePlugin

from fieldreid.errors import ImageReadError
from fieldreid.frames.decode import frame_for_boxes, read_image
from fieldreid.frames.exif import read_capture_info
from fieldreid.storage.fsutil import (
    FileChangedError,
    FileRefusedError,
    FolderLock,
    OutputLockedError,
    OutputWriteError,
    ReadInterrupted,
    path_text,
    read_regular_file,
    text_path,
)
from fieldreid.types import Detections
from fieldreid.watch import WatchConfig, Watcher
from fieldreid.watch import loader as loader_mod
from fieldreid.watch.scanner import ScanStats, candidate_at, scan
from fieldreid.watch.state import StateDB

OLD = time.time() - 7200
BAD_NAME = b"IMG_\xff\xfe_0001.JPG"  # not UTF-8: what a damaged FAT card shows
BAD_TEXT = "IMG_\\xff\\xfe_0001.JPG"  # its recorded text form


# ------------------------------------------------------------------------------------------------ helpers
class FakeDetector:
    """Finds nothing: enough for everything the reader side decides (no model needed)."""

    model_id = "fake-detector"
    input_size = (64, 64)

    def detect(self, images):
        return [Detections.empty() for _ in images]


class FakeEmbedder:
    model_id = "fake-embedder"
    dim = 4
    preprocess_spec = SimpleNamespace(size=(8, 8))

    def embed(self, crops):
        return np.tile(np.array([1, 0, 0, 0], np.float32), (len(crops), 1))


def _watcher(root: Path, tmp: Path, **kw) -> Watcher:
    cfg = dict(settle=0.0, grace=60.0, status_every=1e9, batch=2)
    cfg.update(kw)
    return Watcher(WatchConfig(root=root, out=tmp / "out", gallery=tmp / "g.db", **cfg), FakeDetector(),
                   FakeEmbedder(), log=lambda m: None)


def _files(out: Path) -> dict[str, tuple]:
    con = sqlite3.connect(out / "results.db")
    try:
        return {r[0]: r[1:] for r in con.execute("SELECT path, status, reason, attempts FROM files")}
    finally:
        con.close()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height (RGB) but carries almost no data: its header is all a budget
    check needs, and a decoder that trusted it would allocate width * height * 3 bytes first."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _age(*paths: Path) -> None:
    for p in paths:
        os.utime(p, (OLD, OLD), follow_symlinks=False)


@pytest.fixture
def owl(camtrap) -> Path:
    return camtrap / "animl-buow" / "IMG_0708.JPG"


# ------------------------------------------------------------------------------------------------ names
def test_path_text_is_utf8_reversible_and_collision_free() -> None:
    names = [BAD_NAME, b"cam1/IMG_0001.JPG", "câmera/ü.jpg".encode(), b"a\\b.jpg", b"a\\xff.jpg", b"a\xff.jpg",
             b"\xed\xb3\xbf.jpg", b"trail\\", b"x\\\\xffy"]
    texts = [path_text(n) for n in names]
    for name, text in zip(names, texts, strict=True):
        text.encode("utf-8")  # storable in SQLite, JSON and CSV
        assert os.fsencode(text_path(text)) == name
    assert len(set(texts)) == len(names), "two different names got one text"
    assert texts[0] == BAD_TEXT and texts[1] == "cam1/IMG_0001.JPG" and texts[2] == "câmera/ü.jpg"


def test_watch_records_an_undecodable_name_and_restarts(owl, tmp_path) -> None:
    """Before: UnicodeEncodeError (surrogates not allowed) in the files row, on every restart."""
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    bad = os.path.join(os.fsencode(cam), BAD_NAME)
    shutil.copy(owl, bad)
    shutil.copy(owl, cam / "same_picture.JPG")  # same content: a duplicate of whichever is recorded first
    os.utime(bad, (OLD, OLD))
    _age(cam / "same_picture.JPG")
    for _ in range(2):  # the restart sees the same name again
        with _watcher(tmp_path / "cards", tmp_path) as w:
            counts = w.run(once=True)
        assert counts["done"] == 1 and counts["duplicate"] == 1 and counts["failed"] == 0
    files = _files(tmp_path / "out")
    assert files[f"cam1/{BAD_TEXT}"][0] == "done" and files[f"cam1/{BAD_TEXT}"][2] == 1  # attempts: read once
    raw = {p: (tmp_path / "out" / p).read_bytes().decode("utf-8") for p in ("images.csv", "detections.json")}
    assert f"cam1/{BAD_TEXT}" in raw["images.csv"]
    md = json.loads(raw["detections.json"])
    assert f"cam1/{BAD_TEXT}" in {im["file"] for im in md["images"]}
    assert "\\udc" not in raw["detections.json"]  # no lone-surrogate escapes
    # the recorded text leads back to the file on disk
    assert os.path.isfile(os.path.join(tmp_path / "cards", text_path(f"cam1/{BAD_TEXT}")))


# ------------------------------------------------------------------------------------------------ special files
@pytest.fixture
def hostile(tmp_path, owl) -> Path:
    """cards/cam1: one real image plus a FIFO, a link to /dev/zero, a link to a file outside, a link to a
    folder outside (holding an image), and a link loop back up the tree."""
    root = tmp_path / "cards"
    cam = root / "cam1"
    cam.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(owl, cam / "real.JPG")
    shutil.copy(owl, outside / "private.JPG")
    os.mkfifo(cam / "trap.jpg")
    os.symlink("/dev/zero", cam / "zero.jpg")
    os.symlink(outside / "private.JPG", cam / "outside.jpg")
    os.symlink(outside, cam / "everything")  # stands in for a link to /
    os.symlink("..", cam / "loop")
    _age(cam / "real.JPG", cam / "trap.jpg", cam / "zero.jpg", cam / "outside.jpg")
    return root


def test_scan_lists_only_regular_files_and_follows_no_link(hostile) -> None:
    """Before: the FIFO, /dev/zero and the outside file were plain candidates, the folder link was walked
    and the loop multiplied the image."""
    stats = ScanStats()
    cands = {c.rel: c for c in scan(hostile, lambda rel: None, settle=0.0, stats=stats)}
    assert set(cands) == {"cam1/real.JPG", "cam1/trap.jpg", "cam1/zero.jpg", "cam1/outside.jpg"}
    assert cands["cam1/real.JPG"].refused is None
    assert "FIFO" in cands["cam1/trap.jpg"].refused
    assert "symbolic link" in cands["cam1/zero.jpg"].refused and "symbolic link" in cands["cam1/outside.jpg"].refused
    assert stats.links == 4 and stats.refused == 3


def test_file_events_follow_the_same_rules(hostile) -> None:
    def at(p: Path):
        return candidate_at(hostile, p, lambda rel: None, 0.0, ScanStats())

    assert at(hostile / "cam1" / "real.JPG").refused is None
    assert "FIFO" in at(hostile / "cam1" / "trap.jpg").refused
    assert at(hostile / "cam1" / "everything" / "private.JPG") is None  # reached through a folder link
    assert at(hostile / "cam1" / "loop" / "cam1" / "real.JPG") is None
    assert at(hostile.parent / "elsewhere" / "private.JPG") is None  # outside the root


def _in_thread(fn):
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "the read blocked"
    return box


def test_reads_never_block_on_or_read_from_special_files(hostile, tmp_path) -> None:
    cam = hostile / "cam1"
    fifo = _in_thread(lambda: read_regular_file(cam / "trap.jpg"))
    assert isinstance(fifo["error"], FileRefusedError) and "FIFO" in fifo["error"].reason
    dev = _in_thread(lambda: read_regular_file(cam / "zero.jpg"))  # following the link: a device
    assert isinstance(dev["error"], FileRefusedError) and "character device" in dev["error"].reason
    link = _in_thread(lambda: read_regular_file(cam / "outside.jpg", follow_symlinks=False))
    assert isinstance(link["error"], FileRefusedError) and "symbolic link" in link["error"].reason
    # read_image (the detect / enrol path) has the same protection
    img = _in_thread(lambda: read_image(cam / "trap.jpg"))
    assert isinstance(img["error"], ImageReadError) and "FIFO" in img["error"].reason
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (3 << 20))
    with pytest.raises(FileRefusedError, match="too large"):
        read_regular_file(big, max_bytes=1 << 20)
    data, st = read_regular_file(cam / "real.JPG", follow_symlinks=False)
    assert data == (cam / "real.JPG").read_bytes() and st.st_size == len(data)
    with pytest.raises(FileChangedError):
        read_regular_file(cam / "real.JPG", identity=(st.st_dev, st.st_ino + 1))
    stop = threading.Event()
    stop.set()
    with pytest.raises(ReadInterrupted):
        read_regular_file(big, stop=stop)


def test_watch_records_special_files_once_and_never_hangs(hostile, tmp_path) -> None:
    for _ in range(2):
        with _watcher(hostile, tmp_path) as w:
            box = _in_thread(lambda w=w: w.run(once=True))
        assert "error" not in box, box.get("error")
    files = _files(tmp_path / "out")
    assert set(files) == {"cam1/real.JPG", "cam1/trap.jpg", "cam1/zero.jpg", "cam1/outside.jpg"}
    assert files["cam1/real.JPG"][0] == "done"
    for name in ("trap.jpg", "zero.jpg", "outside.jpg"):
        status, reason, attempts = files[f"cam1/{name}"]
        assert status == "failed" and attempts == 1, (name, files[f"cam1/{name}"])
    assert "FIFO" in files["cam1/trap.jpg"][1]


# ------------------------------------------------------------------------------------------------ huge images
def test_pixel_budget_is_checked_before_decoding(tmp_path, owl, monkeypatch) -> None:
    """Before: a 13,000 x 13,000 PNG (under PIL's bomb limit) went to the decoder, which allocated ~500 MB."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(13_000, 13_000))
    calls, pil_loads = [], []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(a) or real(*a))
    # PIL's PNG getexif() decodes every pixel to look for EXIF after them: the header reads must not
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pil_loads.append(self.size))
    with pytest.raises(ImageReadError, match="decoded-pixel budget of 100 MP") as exc:
        read_image(bomb)
    assert "13000 x 13000" in exc.value.reason and calls == []
    assert read_capture_info(bomb.read_bytes(), OLD).time_source == "file_mtime"
    assert pil_loads == []
    # a JPEG over the budget is decoded reduced to fit it, also when crops would ask for more pixels
    frame = read_image(owl, max_pixels=200_000, keep_data=True)
    h, w = frame.pixels.shape[:2]
    assert h * w <= 200_000 and frame.reduction > 1 and calls
    finer = frame_for_boxes(frame, np.array([[0, 0, 40, 40]], np.float32), 224)
    assert finer.pixels.shape[0] * finer.pixels.shape[1] <= 200_000
    # any other format over the budget is refused
    ok, png = cv2.imencode(".png", np.zeros((300, 400, 3), np.uint8))
    small = tmp_path / "small.png"
    small.write_bytes(png.tobytes())
    with pytest.raises(ImageReadError, match="budget"):
        read_image(small, max_pixels=100_000)
    assert read_image(small, max_pixels=None).pixels.shape == (300, 400, 3)


def test_decoder_errors_are_per_file_failures(tmp_path, owl, monkeypatch) -> None:
    """Before: only MemoryError was caught; a cv2.error stopped the run, and every restart, on one file."""
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    shutil.copy(owl, cam / "a.JPG")
    (cam / "b.JPG").write_bytes(owl.read_bytes() + b"other")
    _age(cam / "a.JPG", cam / "b.JPG")

    def broken(buf, flags):
        raise cv2.error("OpenCV(4.x) ... error: (-4:Insufficient memory) Failed to allocate 507000000 bytes")

    monkeypatch.setattr(cv2, "imdecode", broken)
    with pytest.raises(ImageReadError, match="decoder failed"):
        read_image(owl)
    with _watcher(tmp_path / "cards", tmp_path) as w:
        counts = w.run(once=True)
    assert counts["failed"] == 2
    # anything else a decoder or plugin throws is a per-file failure too
    monkeypatch.undo()
    (cam / "c.JPG").write_bytes(owl.read_bytes() + b"third")
    _age(cam / "c.JPG")

    def odd(*a, **k):
        raise RuntimeError("plugin bug")

    monkeypatch.setattr(loader_mod, "read_image", odd)
    with _watcher(tmp_path / "cards", tmp_path) as w:
        counts = w.run(once=True)
    files = _files(tmp_path / "out")
    assert files["cam1/c.JPG"][:2] == ("failed", "the decoder failed (RuntimeError: plugin bug)")
    assert all(f[2] == 1 for f in files.values()), "a failed file was tried again"


# ------------------------------------------------------------------------------------------------ stop
def test_stop_request_interrupts_a_blocked_read(tmp_path, owl, monkeypatch) -> None:
    """Before: the main thread waited for the reader forever (SIGTERM acknowledged, never honoured)."""
    cam = tmp_path / "cards" / "cam1"
    cam.mkdir(parents=True)
    shutil.copy(owl, cam / "a.JPG")
    _age(cam / "a.JPG")
    entered, never = threading.Event(), threading.Event()

    def stuck_load(self, c):
        entered.set()
        never.wait()  # a read the kernel does not return from (a dead network mount)

    monkeypatch.setattr(Watcher, "_load", stuck_load)
    try:
        with _watcher(tmp_path / "cards", tmp_path) as w:
            t = threading.Thread(target=w.run, kwargs={"once": True}, daemon=True)
            t.start()
            assert entered.wait(20)
            w.request_stop()  # what the SIGTERM handler does
            t.join(timeout=20)
            assert not t.is_alive(), "stop was not honoured while a read was blocked"
    finally:
        never.set()
    assert _files(tmp_path / "out") == {}  # nothing half-recorded: the restart reads it


# ------------------------------------------------------------------------------------------------ output folder
def test_second_writer_on_one_output_folder_is_refused(tmp_path) -> None:
    """Before: no lock; two watch processes on one OUT ended in IntegrityError (UNIQUE images.sha256)."""
    out = tmp_path / "out"
    code = ("import sys; from fieldreid.watch.state import StateDB; s = StateDB(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / "results.db")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(OutputLockedError) as exc:
            StateDB(out / "results.db")
        msg = str(exc.value)
        assert f"pid {holder.pid} on host " in msg and "another --out" in msg
        StateDB(out / "results.db", readonly=True).close()  # readers (report) are not blocked
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    StateDB(out / "results.db").close()  # the lock went with the process
    with FolderLock(out):  # and one process cannot take it twice either
        with pytest.raises(OutputLockedError):
            FolderLock(out)


@pytest.fixture
def read_only_out(tmp_path):
    """An output folder with a results database in it, then made read-only: chmod for a normal user, a
    read-only tmpfs for root (who writes through permissions)."""
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:
        StateDB(out / "results.db").close()
        out.chmod(0o555)
        yield out
        out.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        StateDB(out / "results.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True, capture_output=True)
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def test_read_only_output_folder_is_a_permission_problem(read_only_out) -> None:
    """Before: reported as a corrupt results database ("move it aside")."""
    with pytest.raises(OutputWriteError) as exc:
        StateDB(read_only_out / "results.db")
    msg = str(exc.value)
    assert "permission problem" in msg and "corrupt" not in msg
    assert "read-only" in msg or "permission denied" in msg
    StateDB(read_only_out / "results.db", readonly=True).close()


# ------------------------------------------------------------------------------------------------ the real CLI
def _cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], capture_output=True, timeout=timeout,
                          env=env, **kw)


@pytest.mark.slow
def test_watch_cli_on_a_hostile_camera_folder(camtrap, yolov5n_onnx, default_embedder_onnx, tmp_path) -> None:
    """`fieldreid watch --once` on real images plus every hostile file, twice; a second writer meanwhile;
    then `detect` and `report --camtrap-dp` on the same folder: all valid UTF-8, nothing hangs."""
    root = tmp_path / "cards"
    imgs = sorted((camtrap / "animl-buow").glob("*.JPG"))[:3] + sorted((camtrap / "animl-southwest").glob("*.JPG"))[:2]
    for p in imgs:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    cam = root / "animl-buow"
    shutil.copy(imgs[0], os.path.join(os.fsencode(cam), BAD_NAME.replace(b"0001", b"0002")))
    (cam / "IMG_\\xff.JPG").write_bytes(imgs[1].read_bytes() + b"x")  # a literal backslash name: no collision
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(imgs[2], outside / "private.JPG")
    os.mkfifo(cam / "trap.jpg")
    os.symlink("/dev/zero", cam / "zero.jpg")
    os.symlink(outside, cam / "everything")
    os.symlink("..", cam / "loop")
    (cam / "bomb.png").write_bytes(_png_header_only(13_000, 13_000))
    for p in cam.iterdir():
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    for p in (root / "animl-southwest").iterdir():
        os.utime(p, (OLD, OLD))
    out = tmp_path / "out"
    watch = ["watch", str(root), "--gallery", str(tmp_path / "g.db"), "--out", str(out), "--detector",
             str(yolov5n_onnx), "--embedder", str(default_embedder_onnx), "--backend", "onnxruntime", "--settle", "0",
             "--threads", "2", "--batch", "4"]
    first = _cli(*watch, "--once", timeout=240)
    assert first.returncode == 0, first.stderr.decode(errors="replace")[-3000:]
    files = _files(out)
    bad = "animl-buow/" + BAD_TEXT.replace("0001", "0002")
    assert len(files) == 5 + 2 + 2 + 1, files  # 5 images, 2 odd names, FIFO + link to a device, bomb
    assert files[bad][0] == "duplicate" and files["animl-buow/IMG_\\\\xff.JPG"][0] == "done"
    assert files["animl-buow/trap.jpg"][0] == files["animl-buow/zero.jpg"][0] == "failed"
    assert "budget" in files["animl-buow/bomb.png"][1]
    assert not any("private" in k or "loop" in k or "everything/" in k for k in files)
    for name in ("images.csv", "sightings.csv", "detections.json"):
        (out / name).read_bytes().decode("utf-8")
    assert bad in {im["file"] for im in json.loads((out / "detections.json").read_text())["images"]}
    again = _cli(*watch, "--once", timeout=240)  # the restart: nothing re-read, no crash
    assert again.returncode == 0, again.stderr.decode(errors="replace")[-3000:]
    assert _files(out) == files

    # a second writer on the same folder is refused with a message naming the first
    holder = subprocess.Popen([sys.executable, "-m", "fieldreid.cli", *watch, "--rescan", "600"],
                              stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while f'"pid": {holder.pid},' not in (out / ".lock").read_text():
            assert holder.poll() is None and time.time() < deadline, "the first watch did not start"
            time.sleep(0.1)
        second = _cli(*watch, "--once", timeout=120)
        assert second.returncode == 2
        err = second.stderr.decode()
        assert "in use by another fieldreid watch" in " ".join(err.split()) and f"pid {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=60)
    assert holder.returncode == 0

    det = _cli("detect", str(root), "--detector", str(yolov5n_onnx), "--backend", "onnxruntime", "--out",
               str(tmp_path / "det.json"), timeout=240)
    assert det.returncode == 0, det.stderr.decode(errors="replace")[-3000:]
    md = json.loads((tmp_path / "det.json").read_bytes().decode("utf-8"))
    by_file = {im["file"]: im for im in md["images"]}
    assert bad in by_file and by_file[bad]["detections"] is not None
    assert "FIFO" in by_file["animl-buow/trap.jpg"]["failure"]
    assert not any("private" in k for k in by_file)

    rep = _cli("report", str(out), "--camtrap-dp", str(tmp_path / "pkg"), timeout=120)
    assert rep.returncode == 0, rep.stderr.decode(errors="replace")[-3000:]
    media = (tmp_path / "pkg" / "media.csv").read_bytes().decode("utf-8")
    assert "IMG_\\\\xff.JPG" in media
