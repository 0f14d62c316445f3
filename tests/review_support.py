"""A real watch output to review, built once per test session from the shared data (read in place).

Camera folder ``cards/``: ``zebra-cam`` holds six zebra query photos (z10 x2, z13, z22, and two of z41, an
animal the gallery does not know), ``southwest`` a bobcat and a coyote camera-trap frame. The gallery is
enrolled from four database crops of each of z10, z11, z13, z14, z19 and z22 (``fieldreid enroll --crops``),
with fixed open-set thresholds for plains_zebra (upper 0.93, lower 0.85) so the run gives every kind of
decision: known, uncertain and new. Then ``fieldreid watch --once``. Each photo is its own event (file
times ten minutes apart; the zebra photos carry no EXIF time).

Tests get a fresh copy (:func:`fresh_copy`): they change the gallery.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENROLLED = ("z10", "z11", "z13", "z14", "z19", "z22")
UPPER, LOWER = 0.93, 0.85
_BUILT: dict[str, Path] = {}


def fieldreid(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True
              ) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "fieldreid.cli", *map(str, args)], cwd=cwd or ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def build(base: Path, zebra: Path, camtrap: Path, detector: Path, embedder: Path) -> Path:
    rows = list(csv.DictReader((zebra / "metadata.csv").open(encoding="utf-8")))
    per: dict[str, int] = {}
    chosen = []
    for r in rows:
        if r["split"] == "database" and r["identity"] in ENROLLED and per.get(r["identity"], 0) < 4:
            per[r["identity"]] = per.get(r["identity"], 0) + 1
            chosen.append({**r, "path": str(zebra / r["path"])})
    with (base / "enrol.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(chosen)
    query: dict[str, list[Path]] = {}
    for r in rows:
        if r["split"] == "query":
            query.setdefault(r["identity"], []).append(zebra / r["path"])
    picks = [("zebra-cam", query["z10"][0]), ("zebra-cam", query["z10"][3]), ("zebra-cam", query["z13"][0]),
             ("zebra-cam", query["z22"][1]), ("zebra-cam", query["z41"][0]), ("zebra-cam", query["z41"][2]),
             ("southwest", camtrap / "animl-southwest" / "IMAG0046_bobcat.JPG"),
             ("southwest", camtrap / "animl-southwest" / "2021-07-24_SYFR0655_coyote.JPG")]
    t0 = time.time() - 40 * 86400
    for i, (cam, src) in enumerate(picks):
        (base / "cards" / cam).mkdir(parents=True, exist_ok=True)
        dst = base / "cards" / cam / src.name
        shutil.copy(src, dst)
        os.utime(dst, (t0 + 600 * i, t0 + 600 * i))
    gallery = base / "g.db"
    models = ["--detector", detector, "--embedder", embedder, "--backend", "onnxruntime"]
    fieldreid("enroll", base / "enrol.csv", "--split", "database", "--crops", "--gallery", gallery, *models)
    from fieldreid.gallery.store import Gallery

    with Gallery(gallery) as g:
        g.set_thresholds("plains_zebra", g.model_id, UPPER, LOWER, "tests: fixed")
    # --conf 0.3: one animal per photo (each 0.40-0.74), clear of boxes scored near 0.2 (a partial second zebra
    # at the edge of z41's photo), whose scores move by a few hundredths with the letterbox (square or rectangle)
    fieldreid("watch", base / "cards", "--gallery", gallery, "--out", base / "out", "--once", "--settle", "0",
              "--threads", "2", "--conf", "0.3", *models)
    return base


def built(tmp_path_factory, zebra: Path, camtrap: Path, detector: Path, embedder: Path) -> Path:
    """The session's one build (several test modules share it)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = build(tmp_path_factory.mktemp("review-base"), zebra, camtrap, detector, embedder)
    return _BUILT[key]


def fresh_copy(base: Path, dest: Path) -> tuple[Path, Path]:
    """(output folder, gallery) copied from the session's build, the copy's results.db naming the copied
    gallery (as if watch had used it); the camera folder is shared (read only)."""
    import sqlite3

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base / "out", dest / "out")
    for p in base.glob("g.db*"):
        shutil.copy(p, dest / p.name)
    con = sqlite3.connect(dest / "out" / "results.db")
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'gallery'", (str((dest / "g.db").resolve()),))
    con.close()
    return dest / "out", dest / "g.db"
