"""The scan streams: memory does not grow with the number of files; done files are skipped by (size, mtime)."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

from fieldreid.watch.scanner import ScanStats, camera_of, scan


def test_scan_streams_with_flat_memory(tmp_path) -> None:
    root = tmp_path / "cards"
    old = time.time() - 3600
    for c in range(40):
        cam = root / f"cam{c:02d}"
        cam.mkdir(parents=True)
        for i in range(500):
            p = cam / f"IMG_{i:05d}.JPG"
            p.touch()
            os.utime(p, (old, old))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.JPG").touch()
    (root / "cam00" / "notes.txt").touch()
    done = {f"cam00/IMG_{i:05d}.JPG" for i in range(100)}
    st = (root / "cam00" / "IMG_00000.JPG").stat()

    def lookup(rel: str):
        return ("done", st.st_size, st.st_mtime_ns, 1) if rel in done else None

    stats = ScanStats()
    tracemalloc.start()
    n, cameras = 0, set()
    for cand in scan(root, lookup, settle=2.0, stats=stats):
        n += 1
        cameras.add(cand.camera)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 20_000 - 100 and stats.skipped == 100 and len(cameras) == 40
    # Holding all 20k candidates would take several MB; the stream keeps one folder's listing at most.
    assert peak < 1_500_000, f"scan peak {peak / 1e6:.1f} MB"


def test_fresh_files_are_deferred_and_camera_names(tmp_path) -> None:
    root = tmp_path / "cards"
    (root / "camA").mkdir(parents=True)
    (root / "camA" / "new.JPG").write_bytes(b"x")
    stats = ScanStats()
    assert list(scan(root, lambda rel: None, settle=60.0, stats=stats)) == []
    assert stats.fresh == 1
    assert camera_of("camA/sub/x.JPG", root) == "camA"
    assert camera_of("x.JPG", Path("/media/card1")) == "card1"
