"""The tool's own advice, end to end: process a camera folder, move the output aside and run again, sync.

Once this doubled every gallery sighting (no unique key), sync pushed each twice, and none of them had a crop:
watch records image paths relative to the camera root and sync read them relative to the current directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import numpy as np
from sync_support import ROOT, ServerProcess

OLD = time.time() - 7200


def _fieldreid(*args: str, cwd, env=None) -> str:
    r = subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_reprocessing_into_a_second_output_never_duplicates_and_sync_sends_crops(
        camtrap, yolov5n_onnx, default_embedder_onnx, tmp_path):
    root = tmp_path / "cards"
    cam = root / "cam1"
    cam.mkdir(parents=True)
    for p in sorted((camtrap / "animl-buow").glob("*.JPG"))[:4]:
        shutil.copy(p, cam / p.name)
        os.utime(cam / p.name, (OLD, OLD))
    gallery = tmp_path / "g.db"
    for out in ("out", "out-again"):
        _fieldreid("watch", str(root), "--gallery", str(gallery), "--out", str(tmp_path / out), "--once",
                   "--detector", str(yolov5n_onnx), "--embedder", str(default_embedder_onnx),
                   "--backend", "onnxruntime", "--settle", "0", "--threads", "2", cwd=ROOT)
        con = sqlite3.connect(gallery)
        rows = con.execute("SELECT source_sha256, box, source_root, vector, model_id FROM sightings").fetchall()
        con.close()
        if out == "out":
            first = rows
    n = len(first)
    assert n > 0, "no animal found in the test images"
    assert rows == first  # the second output folder added nothing
    assert len({(r[0], r[1]) for r in rows}) == n and all(r[2] == str(root.resolve()) for r in rows)
    model_id, dim = rows[0][4], len(rows[0][3]) // 4

    from fieldreid.server import admin
    from fieldreid.server.db import LabDB

    lab = LabDB(None, tmp_path / "lab")
    admin.create_project(lab, "kenya", model_id, dim)
    token = admin.register_device(lab, "cam-a", ["kenya"])
    server = ServerProcess(lab.url, tmp_path / "lab").start()
    try:
        elsewhere = tmp_path / "elsewhere"  # sync runs from another directory than the camera root
        elsewhere.mkdir()
        (elsewhere / "lab.pub").write_text(lab.key.public_b64)
        cfg = elsewhere / "sync.toml"
        cfg.write_text(f'server = "{server.url}"\nlab_public_key_file = "{elsewhere / "lab.pub"}"\n')
        env = {"FIELDREID_TOKEN": token, "PYTHONPATH": str(ROOT)}
        rep = json.loads(_fieldreid("sync", "--gallery", str(gallery), "--config", str(cfg), "--json", cwd=elsewhere,
                                    env=env))["push"]
        assert (rep["accepted"], rep["without_crop"], rep["without_vector"], rep["refused_chunks"]) == (n, 0, 0, [])
        import sqlalchemy as sa

        from fieldreid.server import schema as s

        with lab.read() as con:
            crops = [r[0] for r in con.execute(sa.select(s.sightings.c.crop_sha256))]
            vectors = [r[0] for r in con.execute(sa.select(s.sightings.c.vector))]
        assert len(crops) == n and all(crops) and all(v is not None and len(v) == 4 * dim for v in vectors)
        assert all(np.isfinite(np.frombuffer(v, "<f4")).all() for v in vectors)
    finally:
        server.stop()
        lab.close()
