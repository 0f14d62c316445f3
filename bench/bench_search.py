"""Gallery search speed and memory vs gallery size: is exact numpy search enough, or does an ANN index pay?

Times the whole ``Searcher.search`` path (matrix product, per-identity max, top-k) for one query at a time
(what ``identify``/``watch`` do per crop) and for batches of 32, at float32 and float16 storage, on
synthetic unit vectors (search cost does not depend on the values). At the smallest size it also times the
SQLite side: enrolling the vectors, a full cache load, and an incremental append of one new animal.

    .venv/bin/python bench/bench_search.py                      # D from the default embedder, else 1280
    .venv/bin/python bench/bench_search.py --dim 1280 --sizes 10000 100000 --out bench/search_results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fieldreid.gallery.search import Searcher  # noqa: E402
from fieldreid.gallery.store import Gallery, VectorBlock  # noqa: E402
from fieldreid.storage.fsutil import atomic_write_json  # noqa: E402


class MemoryGallery:
    """The part of :class:`Gallery` a Searcher uses, held in memory (100k x 1280 vectors need no disk)."""

    def __init__(self, vectors: np.ndarray, identity_ids: list[str], storage: str) -> None:
        self.storage = storage
        self.dim = vectors.shape[1]
        self._mat = vectors.astype(np.float16 if storage == "float16" else np.float32)
        self._ids = identity_ids

    def versions(self) -> tuple[int, int]:
        return 1, 1

    def load_vectors(self, after_id: int = 0) -> VectorBlock:
        if after_id:
            return VectorBlock(np.zeros(0, np.int64), [], self._mat[:0])
        return VectorBlock(np.arange(1, len(self._ids) + 1), self._ids, self._mat)

    def identity_species(self) -> dict[str, str]:
        return dict.fromkeys(self._ids, "s")

    def check_model(self, model_id: str, dim: int | None = None) -> None:
        pass


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for a in range(0, n, 20000):  # in chunks: float64 normals for 100k x 1280 would need 1 GB
        b = min(a + 20000, n)
        x = rng.standard_normal((b - a, d), dtype=np.float32)
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def time_search(searcher: Searcher, queries: np.ndarray, batch: int, min_seconds: float = 1.0,
                repeats: int = 3) -> dict:
    """Median ms/query over >= min_seconds of calls; the best of ``repeats`` such medians, because this
    machine is shared and a neighbour's burst should not be reported as our speed."""
    runs = [_time_search(searcher, queries, batch, min_seconds) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["ms_per_query_median"])
    best["medians_of_repeats"] = [r["ms_per_query_median"] for r in runs]
    return best


def _time_search(searcher: Searcher, queries: np.ndarray, batch: int, min_seconds: float) -> dict:
    searcher.search(queries[:batch], k=5)  # warm-up (first load, BLAS threads)
    times = []
    i = 0
    t_end = time.perf_counter() + min_seconds
    while time.perf_counter() < t_end or len(times) < 5:
        q = queries[(i * batch) % len(queries):][:batch]
        if len(q) < batch:
            q = queries[:batch]
        t0 = time.perf_counter()
        searcher.search(q, k=5)
        times.append((time.perf_counter() - t0) / batch)
        i += 1
    t = np.array(times) * 1000
    return {"batch": batch, "ms_per_query_median": round(float(np.median(t)), 4),
            "ms_per_query_p90": round(float(np.percentile(t, 90)), 4), "runs": len(times)}


def sqlite_side(vectors: np.ndarray, ids: list[str], storage: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.db"
        with Gallery(path, storage=storage, synchronous="NORMAL") as g:
            t0 = time.perf_counter()
            for a in range(0, len(ids), 1000):
                g.add_embeddings(ids[a:a + 1000], vectors[a:a + 1000], "bench", [f"img{i}.jpg" for i in
                                                                                  range(a, min(a + 1000, len(ids)))],
                                 species="s")
            enrol = time.perf_counter() - t0
            s = Searcher(g)
            t0 = time.perf_counter()
            s.refresh()
            load = time.perf_counter() - t0
            g.add_provisional("s", vectors[0], "bench", "new.jpg")
            t0 = time.perf_counter()
            s.search(vectors[:1], k=5)
            append = time.perf_counter() - t0
            size = path.stat().st_size
        return {"n": len(ids), "storage": storage, "enrol_s": round(enrol, 3), "full_load_ms": round(load * 1000, 2),
                "append_one_and_search_ms": round(append * 1000, 3), "file_mib": round(size / 2**20, 1),
                "full_reloads": s.loads}


def default_dim() -> int:
    try:
        from fieldreid.defaults import default_model
        from fieldreid.embed.runtime import Embedder

        return Embedder(default_model("embedder")).dim
    except Exception:
        return 1280


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=None, help="embedding dimension (default: the default embedder's, "
                                                          "else 1280)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--photos-per-animal", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "search_results.json")
    args = ap.parse_args()
    dim = args.dim or default_dim()
    rng = np.random.default_rng(0)
    queries = unit_rows(rng, 256, dim)
    results = []
    sqlite = []
    for n in args.sizes:
        vec = unit_rows(rng, n, dim)
        ids = [f"a{i // args.photos_per_animal:05d}" for i in range(n)]
        for storage in ("float32", "float16"):
            s = Searcher(MemoryGallery(vec, ids, storage), memory_dtype=storage)
            s.refresh()
            row = {"n_embeddings": n, "n_identities": len(set(ids)), "dim": dim, "memory_dtype": storage,
                   "matrix_mib": round(s.matrix_nbytes / 2**20, 1),
                   "single": time_search(s, queries, 1), "batch32": time_search(s, queries, 32)}
            results.append(row)
            print(f"n={n:>7} {storage}: {row['matrix_mib']:>7.1f} MiB  single {row['single']['ms_per_query_median']:.3f}"
                  f" ms/query  batch32 {row['batch32']['ms_per_query_median']:.3f} ms/query", flush=True)
            del s
        if n == min(args.sizes):
            for storage in ("float32", "float16"):
                sqlite.append(sqlite_side(vec, ids, storage))
                print(f"sqlite n={n} {storage}: {sqlite[-1]}", flush=True)
        del vec
    doc = {
        "what": "Searcher.search (matmul + per-identity max + top-5) on synthetic unit vectors; memory_dtype is "
                "the cached matrix (a float16 gallery file is loaded into float32 by default)",
        "machine": {"cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__},
        "results": results,
        "sqlite": sqlite,
    }
    atomic_write_json(args.out, doc)
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
