"""Gallery files under storage faults: a full disk during a write, a checkpoint cut short, old duplicates.

A full disk is produced three ways: SQLite's own SQLITE_FULL (``PRAGMA max_page_count``, which makes SQLite
roll the transaction back by itself exactly as it does on ENOSPC), a file state built byte for byte (main
file short, its pages in the write-ahead log), and a real ENOSPC on a tiny tmpfs mounted in a user
namespace (skipped where unprivileged namespaces are not allowed).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_gallery_helpers import clusters

from fieldreid.errors import InputError
from fieldreid.gallery.store import DiskFullError, Gallery, GalleryError

ROOT = Path(__file__).resolve().parents[1]


def _filled(path, n_ids=20, per_id=5, dim=64):
    vec, labels = clusters(n_ids, per_id, dim=dim)
    with Gallery(path) as g:
        g.add_embeddings(list(labels), vec, "m1", [f"img{i}.jpg" for i in range(len(labels))], species="zebra")
    return vec, labels


def _limit_pages(g: Gallery, extra: int = 1) -> None:
    """Let the file grow by at most ``extra`` pages: the next big write fails with SQLITE_FULL."""
    n = g._con.execute("PRAGMA page_count").fetchone()[0]
    g._con.execute(f"PRAGMA max_page_count = {n + extra}")


def test_full_disk_during_write_says_so_and_changes_nothing(tmp_path):
    path = tmp_path / "g.db"
    _filled(path)
    vec, _ = clusters(40, 5, dim=64, seed=1)
    with Gallery(path) as g:
        before = (g.count_embeddings(), g.versions(), [c.id for c in g.log()])
        _limit_pages(g)
        with pytest.raises(DiskFullError, match="disk is full.*Nothing was changed") as exc:
            g.add_embeddings([f"new{i}" for i in range(len(vec))], vec, "m1", [f"n{i}.jpg" for i in range(len(vec))],
                             species="zebra")
        assert "rollback" not in str(exc.value).lower()
        assert (g.count_embeddings(), g.versions(), [c.id for c in g.log()]) == before
        g._con.execute("PRAGMA max_page_count = 1073741823")  # space freed: the same write now succeeds
        added, _ = g.add_embeddings(["new0"], vec[:1], "m1", ["n0.jpg"], species="zebra")
        assert added == 1
    with Gallery(path) as g:
        assert g.count_embeddings() == before[0] + 1 and g.check() == []


def _wal_frames(wal: bytes, page_size: int):
    """(page number, page bytes) of each frame of a write-ahead log."""
    pos = 32
    while pos + 24 + page_size <= len(wal):
        pgno = struct.unpack(">I", wal[pos:pos + 4])[0]
        yield pgno, wal[pos + 24:pos + 24 + page_size]
        pos += 24 + page_size


def _checkpoint_cut_short(src, dst_dir):
    """The files a checkpoint leaves when the disk fills after it wrote page 1: the main file holds one
    page whose header counts every page, the rest of the pages are still in the log only."""
    dst_dir.mkdir()
    vec, labels = clusters(20, 5, dim=64)
    g = Gallery(src)
    g._con.execute("PRAGMA wal_autocheckpoint = 0")
    g.add_embeddings(list(labels), vec, "m1", [f"img{i}.jpg" for i in range(len(labels))], species="zebra")
    # copy while the connection is open: closing it would checkpoint the log into the main file
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{src}{suffix}", dst_dir / f"g.db{suffix}")
    g.close()
    main = (dst_dir / "g.db").read_bytes()
    wal = (dst_dir / "g.db-wal").read_bytes()
    page_size = struct.unpack(">H", main[16:18])[0]
    page1 = [page for pgno, page in _wal_frames(wal, page_size) if pgno == 1][-1]
    (dst_dir / "g.db").write_bytes(page1)
    return dst_dir / "g.db", len(labels)


def test_gallery_whose_pages_are_in_the_wal_opens_through_sqlite_recovery(tmp_path):
    path, n = _checkpoint_cut_short(tmp_path / "src.db", tmp_path / "dev")
    head = path.read_bytes()[:100]
    assert struct.unpack(">I", head[28:32])[0] * 4096 > path.stat().st_size  # the header counts more pages
    con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)  # read-only: closing it does not checkpoint
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]  # SQLite reads it through the log
    con.close()
    assert path.stat().st_size == 4096
    with Gallery(path) as g:  # before: "truncated or damaged (4096 bytes, expected ...)"
        assert g.count_embeddings() == n and g.check() == []
        g.add_identity("extra", "zebra")
    with Gallery(path) as g:
        assert g.has_identity("extra") and g.count_embeddings() == n


def test_short_main_file_whose_wal_does_not_hold_the_pages_is_refused_untouched(tmp_path):
    path, _ = _checkpoint_cut_short(tmp_path / "src.db", tmp_path / "dev")
    wal = path.with_name("g.db-wal")
    wal.write_bytes(wal.read_bytes()[:32 + 2 * (24 + 4096)])  # the commit frames are gone
    before = (path.read_bytes(), wal.read_bytes())
    with pytest.raises(GalleryError, match="Nothing was changed"):
        Gallery(path)
    assert (path.read_bytes(), wal.read_bytes()) == before


def test_v1_gallery_migrates_dedupes_sightings_and_keeps_queued_ones(tmp_path):
    """Sightings recorded twice before v2 (a folder processed into two output folders) are deduped, except a
    copy already in a push chunk; from v2 on a sighting is unique by (source content, box)."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path, isolation_level=None)
    from fieldreid.gallery import store

    for stmt in store.MIGRATIONS[0]:
        con.execute(stmt)
    con.execute("PRAGMA user_version = 1")
    con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("version", "0"), ("structure", "0"), ("storage", "float32"), ("created", "x")])
    row = ("cam1/IMG_1.JPG", "1.0,2.0,30.0,40.0", "2024-05-01T10:00:00", "cam1", "known", "zebra-1", 0.9, None, None,
           0.8, 0.6, "t", "m1", 3, "x")
    cols = ("image, box, captured, camera, decision, identity_id, score, runner_up_id, runner_up_score, upper, lower, "
            "threshold_method, model_id, gallery_version, created")
    for r in [row, row, row, (*row[:2], "2024-05-02T10:00:00", *row[3:]), ("cam1/IMG_2.JPG", *row[1:]), row]:
        con.execute(f"INSERT INTO sightings ({cols}) VALUES ({', '.join('?' * 15)})", r)
    con.execute("CREATE TABLE sync_outbox (sighting_id INTEGER PRIMARY KEY, vector BLOB, crop BLOB, chunk TEXT, "
                "created TEXT)")
    con.executemany("INSERT INTO sync_outbox (sighting_id, chunk) VALUES (?, ?)", [(2, "-"), (3, None), (6, None)])
    con.close()
    with Gallery(path) as g:
        assert g.schema_version == store.SCHEMA_VERSION
        assert [s["id"] for s in g.sightings()] == [1, 2, 4, 5]  # 2 was pushed already; 3 and 6 were repeats
        assert [r[0] for r in g._con.execute("SELECT sighting_id FROM sync_outbox ORDER BY 1")] == [2]
        sha = "ab" * 32
        new = {**dict(zip(("image", "box", "decision", "upper", "lower", "threshold_method", "model_id",
                           "gallery_version"), ("/out2/cam1/IMG_1.JPG", (1, 2, 30, 40), "known", 0.8, 0.6, "t", "m1",
                                                3), strict=True)), "source_sha256": sha, "vector": np.ones(4)}
        first = g.add_sightings([new, {**new, "box": (5, 5, 9, 9)}])
        again = g.add_sightings([{**new, "image": "elsewhere/copy.jpg", "decision": "new"}])
        assert again == first[:1] and g.count_sightings() == 6
        assert g.sighting_vector(first[0]).tolist() == [1.0] * 4
        with pytest.raises(InputError, match="hex"):
            g.add_sightings([{**new, "source_sha256": "not-a-hash"}])


_ENOSPC_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from fieldreid.gallery.store import Gallery, DiskFullError
    d = sys.argv[1]
    p = os.path.join(d, "g.db")
    rng = np.random.default_rng(0)
    def vecs(n):
        v = rng.standard_normal((n, 1280)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    def fill(leave):
        fd = os.open(os.path.join(d, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        os.close(fd)
        size = os.path.getsize(os.path.join(d, "filler"))
        os.truncate(os.path.join(d, "filler"), max(0, size - leave))
    out = {}
    # 1. a write that meets ENOSPC
    with Gallery(p) as g:
        g.add_embeddings([f"z{i}" for i in range(5)], vecs(5), "m", [f"s{i}" for i in range(5)], species="zebra")
    fill(40960)
    try:
        with Gallery(p) as g:
            for k in range(20):
                g.add_embeddings([f"y{k}{i}" for i in range(5)], vecs(5), "m", [f"t{k}{i}" for i in range(5)],
                                 species="zebra")
        out["write"] = "no error"
    except Exception as exc:
        out["write"] = f"{type(exc).__name__}: {exc}"
    with Gallery(p) as g:
        out["after_write"] = [g.count_embeddings(), g.check()]
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    # 2. a checkpoint that meets ENOSPC: the main file is left short, its pages in the log
    g = Gallery(p)
    g.add_embeddings([f"w{i}" for i in range(10)], vecs(10), "m", [f"u{i}" for i in range(10)], species="zebra")
    n = g.count_embeddings()
    fill(0)
    try:
        g.close()
    except Exception:
        pass
    out["sizes"] = {f: os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)}
    os.remove(os.path.join(d, "filler"))
    try:
        with Gallery(p) as g:
            out["reopen"] = [g.count_embeddings() == n, g.check()]
    except Exception as exc:
        out["reopen"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
''')


def _user_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _user_namespaces(), reason="no unprivileged user namespaces (unshare -rm) for a tmpfs")
def test_real_enospc_on_a_tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "enospc.py"
    script.write_text(_ENOSPC_SCRIPT)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m none "$1" && exec "$2" "$3" "$1"',
                        "sh", str(mnt), sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path), env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0 and "mount" in r.stderr and "Traceback" not in r.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["write"].startswith("DiskFullError") and "Nothing was changed" in out["write"], out
    assert out["after_write"] == [5, []]
    assert out["sizes"]["g.db-wal"] > 0 and out["sizes"]["g.db"] < 61440  # the checkpoint was cut short
    assert out["reopen"] == [True, []], out
