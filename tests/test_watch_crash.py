"""`fieldreid watch` as a subprocess: kill -9 mid-run then restart, and SIGTERM: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

OLD = time.time() - 7200


@pytest.fixture(scope="module")
def cards(camtrap, tmp_path_factory) -> tuple[Path, int]:
    """Two cameras of real images (24 files), aged so nothing waits for the settle time."""
    root = tmp_path_factory.mktemp("crash") / "cards"
    files = sorted((camtrap / "animl-buow").glob("*.JPG"))[:14] + sorted((camtrap / "animl-southwest").glob("*.JPG"))[:10]
    for p in files:
        cam = root / p.parent.name
        cam.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, cam / p.name)
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (OLD, OLD))
            n += 1
    return root, n


def _cmd(root: Path, out: Path, models: tuple[Path, Path], *extra: str) -> list[str]:
    det, emb = models
    return [sys.executable, "-m", "fieldreid.cli", "watch", str(root), "--gallery", str(out.parent / "g.db"),
            "--out", str(out), "--detector", str(det), "--embedder", str(emb), "--backend", "onnxruntime",
            "--settle", "0", "--batch", "2", "--threads", "2", *extra]


def _done(out: Path) -> int:
    db = out / "results.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM files WHERE status != 'pending'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _wait_for(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = _done(out)
        if done >= n:
            return done
        if proc.poll() is not None:
            pytest.fail(f"watch exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("watch made no progress")


def _check_exactly_once(out: Path, n_files: int) -> None:
    con = sqlite3.connect(out / "results.db")
    states = dict(con.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
    assert sum(states.values()) == n_files and states.get("pending", 0) == 0
    n_images = con.execute("SELECT count(*) FROM images").fetchone()[0]
    assert n_images == states.get("done", 0)
    assert con.execute("SELECT count(*) FROM events WHERE status != 'closed'").fetchone()[0] == 0
    n_decisions = con.execute("SELECT count(*) FROM decisions").fetchone()[0]
    assert n_decisions == con.execute("SELECT count(*) FROM detections WHERE embedding IS NOT NULL").fetchone()[0]
    g = sqlite3.connect(out.parent / "g.db")
    total, distinct = g.execute("SELECT count(*), count(DISTINCT image || '|' || box) FROM sightings").fetchone()
    assert total == distinct == n_decisions, "a sighting was written twice (or lost)"
    sources = g.execute("SELECT count(*), count(DISTINCT source || '|' || box) FROM embeddings").fetchone()
    assert sources[0] == sources[1]
    md = json.loads((out / "detections.json").read_text())
    assert len(md["images"]) == n_files
    con.close()
    g.close()


def test_kill_9_mid_run_then_restart(cards, yolov5n_onnx, default_embedder_onnx, tmp_path) -> None:
    root, n = cards
    out = tmp_path / "out"
    models = (yolov5n_onnx, default_embedder_onnx)
    proc = subprocess.Popen(_cmd(root, out, models, "--once"), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    done = _wait_for(proc, out, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert done < n, "the run finished before it could be killed; use more images"
    res = subprocess.run(_cmd(root, out, models, "--once"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_exactly_once(out, n)


def test_sigterm_finishes_batch_and_exits_0(cards, yolov5n_onnx, default_embedder_onnx, tmp_path) -> None:
    root, n = cards
    out = tmp_path / "out"
    models = (yolov5n_onnx, default_embedder_onnx)
    proc = subprocess.Popen(_cmd(root, out, models, "--rescan", "5"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    _wait_for(proc, out, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err
    con = sqlite3.connect(out / "results.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done = con.execute("SELECT count(*) FROM files WHERE status = 'done'").fetchone()[0]
    assert done == con.execute("SELECT count(*) FROM images").fetchone()[0]
    con.close()
    # outputs were flushed on the way out and describe exactly the committed state
    md = json.loads((out / "detections.json").read_text())
    assert len(md["images"]) == _done(out)
    res = subprocess.run(_cmd(root, out, models, "--once"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_exactly_once(out, n)
