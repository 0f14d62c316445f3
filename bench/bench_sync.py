"""Sync benchmark: bytes on the wire (pull delta vs full, push per sighting) and push time on loopback.

Runs a real `fieldreid serve` subprocess on 127.0.0.1 (SQLite, and PostgreSQL when one answers at
$FIELDREID_TEST_PG), a master gallery of 200 animals x 5 embeddings of D=1280 (EfficientNet-Lite0's size),
and 1,000 sightings with real zebra crops (256 px JPEG, quality 85) when ../shared is present.

    .venv/bin/python bench/bench_sync.py --out bench/sync_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sync_support import (  # noqa: E402
    ServerProcess,
    drop_pg_database,
    fresh_pg_database,
    pg_reachable,
)

from fieldreid.gallery.openset import Identifier  # noqa: E402
from fieldreid.gallery.store import Gallery  # noqa: E402
from fieldreid.server import admin  # noqa: E402
from fieldreid.server.db import LabDB  # noqa: E402
from fieldreid.sync.client import SyncClient, SyncConfig  # noqa: E402
from fieldreid.sync.queue import Outbox, encode_crop  # noqa: E402

DIM = 1280
MODEL = "bench-lite0-1280"


def unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def real_crops(shared: Path, n: int, rng) -> list[bytes]:
    import cv2

    files = sorted((shared / "data" / "reid" / "zebra" / "images").rglob("*.jpg"))[:200]
    crops = [encode_crop(img) for f in files if (img := cv2.imread(str(f))) is not None]
    if not crops:  # no shared data: noise crops are the worst case for JPEG size
        crops = [encode_crop(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(20)]
    return [crops[i % len(crops)] for i in range(n)]


def run(db_url: str, tmp: Path, shared: Path, n_sightings: int) -> dict:
    rng = np.random.default_rng(0)
    curated = tmp / "curated.db"
    centres = unit(rng, 200)
    with Gallery(curated, synchronous="NORMAL") as g:
        ids = [f"zebra-{i:04d}" for i in range(200) for _ in range(5)]
        vec = np.repeat(centres, 5, axis=0) + 0.01 * rng.standard_normal((1000, DIM)).astype(np.float32)
        g.add_embeddings(ids, vec / np.linalg.norm(vec, axis=1, keepdims=True), MODEL,
                         [f"lab/{k}.jpg" for k in range(1000)], species="zebra")
        g.set_thresholds("zebra", MODEL, 0.8, 0.6, "bench")
    lab = LabDB(db_url, tmp / "labdata")
    admin.create_project(lab, "bench", MODEL, DIM)
    admin.import_gallery(lab, "bench", curated)
    token = admin.register_device(lab, "cam-01", ["bench"])
    server = ServerProcess(lab.url, tmp / "labdata").start()
    out: dict = {"backend": "postgresql" if db_url.startswith("postgres") else "sqlite"}
    try:
        cfg = SyncConfig(server=server.url, token=token, lab_key=lab.key.public_raw, timeout=120)
        dev = tmp / "device.db"
        with Gallery(dev) as g, SyncClient(cfg) as c:
            t0 = time.perf_counter()
            [full] = c.pull(g)
            out["pull_full"] = {"bytes": full.bytes, "embeddings": g.count_embeddings(), "identities": 200,
                                "seconds": round(time.perf_counter() - t0, 3)}
            # a typical curation round at the lab: 5 new animals (5 photos each), 2 merges, 1 confirmation
            more = tmp / "more.db"
            with Gallery(more, synchronous="NORMAL") as m:
                m.add_embeddings([f"zebra-{200 + i:04d}" for i in range(5) for _ in range(5)], unit(rng, 25), MODEL,
                                 [f"new/{k}.jpg" for k in range(25)], species="zebra")
            admin.import_gallery(lab, "bench", more)
            admin.merge(lab, "bench", "zebra", ["zebra-0001"], "zebra-0002")
            admin.merge(lab, "bench", "zebra", ["zebra-0003"], "zebra-0004")
            t0 = time.perf_counter()
            [delta] = c.pull(g)
            out["pull_delta"] = {"kind": delta.kind, "bytes": delta.bytes, "versions": delta.to_version -
                                 delta.from_version, "embeddings_changed": 25 + 10,
                                 "seconds": round(time.perf_counter() - t0, 3)}
            # 1,000 sightings: 90 % known animals, 10 % new ones (provisional ids), each with crop + vector
            crops = real_crops(shared, n_sightings, rng)
            known = centres[rng.integers(0, 200, n_sightings)] + 0.01 * rng.standard_normal(
                (n_sightings, DIM)).astype(np.float32)
            new_mask = rng.random(n_sightings) < 0.1
            known[new_mask] = unit(rng, int(new_mask.sum()))
            known /= np.linalg.norm(known, axis=1, keepdims=True)
            t0 = time.perf_counter()
            decisions = Identifier(g, species="zebra").identify(known, MODEL,
                                                                sources=[f"cam/{k}.jpg" for k in range(n_sightings)])
            Outbox(g).add_many([(d.sighting_id, known[k], crops[k]) for k, d in enumerate(decisions)])
            out["identify_and_queue_seconds"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            rep = c.push(g, collect=False)
            dt = time.perf_counter() - t0
            out["push"] = {"sightings": n_sightings, "accepted": rep.accepted, "chunks": rep.chunks,
                           "bytes": rep.bytes_sent, "bytes_per_sighting": round(rep.bytes_sent / n_sightings),
                           "crop_bytes_mean": round(float(np.mean([len(x) for x in crops]))),
                           "vector_bytes": DIM * 4, "new_animals": int(sum(d.decision == "new" for d in decisions)),
                           "seconds": round(dt, 2), "sightings_per_s": round(n_sightings / dt, 1)}
            t0 = time.perf_counter()
            again = c.push(g, collect=False)
            out["push_nothing_left_seconds"] = round(time.perf_counter() - t0, 3)
            assert again.accepted == 0 and rep.accepted == n_sightings
    finally:
        server.stop()
        lab.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "sync_results.json")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FIELDREID_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--sightings", type=int, default=1000)
    args = ap.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU, Python {platform.python_version()}",
               "dim": DIM, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        results["runs"].append(run(f"sqlite:///{Path(tmp) / 'lab.db'}", Path(tmp), args.shared, args.sightings))
    why = pg_reachable()
    if why:
        results["postgresql_skipped"] = why
    else:
        url = fresh_pg_database()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                results["runs"].append(run(url, Path(tmp), args.shared, args.sightings))
        finally:
            drop_pg_database(url)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
