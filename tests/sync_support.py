"""Helpers for the server and sync tests: a lab, a real `fieldreid serve` subprocess, device galleries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("FIELDREID_TEST_PG", "postgresql://fieldreid:fieldreid@127.0.0.1:5432/fieldreid")
MODEL = "test-embedder-v1"
DIM = 32


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def jpeg(rng: np.random.Generator, side: int = 48) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def pg_reachable() -> str | None:
    """None if PostgreSQL answers at PG_URL, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(PG_URL.replace("postgresql://", "postgresql://", 1), connect_timeout=3):
            return None
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_URL} ({type(exc).__name__}); .ci/run starts one"


def fresh_pg_database() -> str:
    """A new, empty database on the test server; returns its URL."""
    import psycopg

    name = f"frtest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return PG_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    try:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`fieldreid serve` as a real subprocess on a free loopback port; restartable on the same port."""

    def __init__(self, db_url: str, data_dir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.db_url, self.data_dir = db_url, data_dir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "fieldreid.cli", "serve", "--db", self.db_url, "--data-dir", str(self.data_dir),
               "--port", str(self.port), "--log-level", "warning", *self.extra]
        self.log = open(self.data_dir / f"server-{time.time_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fieldreid serve exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("fieldreid serve did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def make_lab_gallery(path: Path, rng: np.random.Generator, species: str = "zebra", n_ids: int = 10,
                     per_id: int = 3, dim: int = DIM) -> np.ndarray:
    """A lab gallery file with ``n_ids`` confirmed animals; returns their centre vectors."""
    from fieldreid.gallery.store import Gallery

    centres = unit(rng, n_ids, dim)
    ids, vecs, srcs = [], [], []
    for i in range(n_ids):
        for j in range(per_id):
            v = centres[i] + 0.05 * rng.standard_normal(dim).astype(np.float32)
            vecs.append(v / np.linalg.norm(v))
            ids.append(f"{species}-{i:04d}")
            srcs.append(f"lab/{species}/{i}/{j}.jpg")
    with Gallery(path, synchronous="NORMAL") as g:
        g.add_embeddings(ids, np.array(vecs), MODEL, srcs, species=species)
        g.set_thresholds(species, MODEL, 0.8, 0.6, "test")
    return centres


def record_sightings(gallery, rng: np.random.Generator, vectors: np.ndarray, species: str = "zebra",
                     prefix: str = "cam/img") -> list[int]:
    """Identify ``vectors`` on a device gallery (new animals become provisional ids) and queue each
    sighting with its vector and a JPEG crop, as a watch loop would."""
    from fieldreid.gallery.openset import Identifier
    from fieldreid.sync.queue import Outbox

    ident = Identifier(gallery, species=species)
    decisions = ident.identify(vectors, MODEL, sources=[f"{prefix}-{uuid.uuid4().hex[:8]}.jpg" for _ in vectors])
    Outbox(gallery).add_many([(d.sighting_id, vectors[i], jpeg(rng)) for i, d in enumerate(decisions)])
    return [d.sighting_id for d in decisions]
