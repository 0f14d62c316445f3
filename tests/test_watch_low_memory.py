"""`fieldreid watch --low-memory`: ONNX Runtime without its arena, small batches, the same results."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np

OLD = time.time() - 7200


def _run(models, root, out, *extra: str) -> subprocess.CompletedProcess:
    det, emb = models / "detector.onnx", models / "embedder.onnx"
    cmd = [sys.executable, "-m", "fieldreid.cli", "watch", str(root), "--gallery", str(out / "g.db"), "--out",
           str(out), "--detector", str(det), "--embedder", str(emb), "--backend", "onnxruntime", "--settle", "0",
           "--once", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _results(out):
    con = sqlite3.connect(out / "results.db")
    try:
        dets = con.execute("SELECT sha256, idx, category, conf, x1, y1, x2, y2, embedding FROM detections "
                           "ORDER BY sha256, idx").fetchall()
        decisions = con.execute("SELECT sha256, idx, decision FROM decisions ORDER BY sha256, idx").fetchall()
    finally:
        con.close()
    return dets, decisions


def test_low_memory_gives_the_same_results(camtrap, models_folder, tmp_path):
    root = tmp_path / "cards" / "cam"
    root.mkdir(parents=True)
    for p in sorted((camtrap / "animl-southwest").glob("*.JPG"))[:7]:
        shutil.copy(p, root / p.name)
        os.utime(root / p.name, (OLD, OLD))
    normal, small = tmp_path / "normal", tmp_path / "small"
    # the rescue of weak boxes is off by default with --low-memory: asked for on both sides, only memory differs
    for out, extra in ((normal, ("--rescue-conf", "0.1")), (small, ("--low-memory", "--rescue-conf", "0.1"))):
        res = _run(models_folder, root.parent, out, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
    (d1, k1), (d2, k2) = _results(normal), _results(small)
    assert k1 == k2 and len(d1) == len(d2) > 0 and any(r[-1] is not None for r in d1)
    for a, b in zip(d1, d2, strict=True):
        assert a[:3] == b[:3]
        np.testing.assert_allclose(a[3:8], b[3:8], atol=1e-3)  # batch 2 vs 8: float rounding only
        if a[-1] is not None:
            va, vb = (np.frombuffer(v, "<f2").astype(np.float32) for v in (a[-1], b[-1]))  # watch stores float16
            assert float(va @ vb) >= 0.999


def test_low_memory_with_explicit_batch_is_refused_when_invalid(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fieldreid.cli", "watch", str(tmp_path), "--gallery",
                          str(tmp_path / "g.db"), "--out", str(tmp_path / "o"), "--once", "--low-memory",
                          "--batch", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--batch must be at least 1" in res.stderr
