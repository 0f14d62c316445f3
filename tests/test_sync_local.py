"""Sync pieces without a network: atomic apply, the persistent queue, content checks, config, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sync_support import DIM, MODEL, ROOT, ServerProcess, jpeg, make_lab_gallery, record_sightings, unit

from fieldreid.gallery.store import Gallery, GalleryError
from fieldreid.server import admin
from fieldreid.server.db import LabDB, LabError
from fieldreid.server.ingest import (
    MAX_CROP_BYTES,
    BadChunk,
    KeyConflict,
    check_jpeg,
    check_vector,
    ingest_chunk,
    jpeg_size,
)
from fieldreid.server.signing import verify_bundle
from fieldreid.sync.apply import apply_bundle, pulled_version
from fieldreid.sync.client import AuthError, SyncConfig, SyncError
from fieldreid.sync.queue import Outbox, crop_from_file


@pytest.fixture
def lab(tmp_path):
    make_lab_gallery(tmp_path / "curated.db", np.random.default_rng(0))
    lab = LabDB(None, tmp_path / "labdata")
    admin.create_project(lab, "kenya", MODEL, DIM)
    admin.import_gallery(lab, "kenya", tmp_path / "curated.db")
    yield lab
    lab.close()


def _dump(path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


@pytest.mark.parametrize("step", ["snapshot-clear", "identities", "embeddings", "features", "merges", "state"])
def test_pull_is_atomic(lab, tmp_path, step):
    path = tmp_path / "dev.db"
    with Gallery(path) as g:
        payload = verify_bundle(lab.build_bundle("kenya", "zebra", 0)[0], lab.key.public_raw)
        apply_bundle(g, payload, "kenya", "zebra", "cam-a")
        record_sightings(g, np.random.default_rng(1), unit(np.random.default_rng(2), 2))
    with Gallery(tmp_path / "curated.db") as cur:  # the lab adds local features and a fusion (issue 13)
        cur.set_local_features([(r.id, "test-kind/v1", b"f%d" % r.id) for r in cur.embeddings()[:5]])
        cur.set_fusion("zebra", MODEL, {"k": 5, "pays": True})
    admin.import_gallery(lab, "kenya", tmp_path / "curated.db")
    admin.merge(lab, "kenya", "zebra", ["zebra-0001", "zebra-0002"], "zebra-0003")
    admin.confirm(lab, "kenya", "zebra", "zebra-0004", "zebra-0400")
    before = _dump(path)
    with Gallery(path) as g:
        delta = verify_bundle(lab.build_bundle("kenya", "zebra", pulled_version(g, "kenya", "zebra"))[0],
                              lab.key.public_raw)
        with pytest.raises(GalleryError, match="injected"):
            apply_bundle(g, delta, "kenya", "zebra", "cam-a", _fail_after=step)
    assert _dump(path) == before  # the old version, untouched
    with Gallery(path) as g:
        apply_bundle(g, delta, "kenya", "zebra", "cam-a")
        assert g.has_identity("zebra-0400") and not g.has_identity("zebra-0001")
        assert {i.id for i in g.identities() if i.origin == "field"}  # the device's own animals survived
        assert g.count_sightings() == 2
        assert len(g.local_features([e.id for e in g.embeddings()], "test-kind/v1")) == 5
        assert g.fusion("zebra", MODEL) == {"k": 5, "pays": True}


def test_queue_survives_reopen_and_keeps_chunk_keys(tmp_path):
    path = tmp_path / "dev.db"
    rng = np.random.default_rng(3)
    with Gallery(path) as g:
        record_sightings(g, rng, unit(rng, 10))
        first = Outbox(g).chunks(max_sightings=4)
    with Gallery(path) as g:  # "reboot"
        box = Outbox(g)
        again = box.chunks(max_sightings=4)
        assert [(c.key, c.sighting_ids) for c in again] == [(c.key, c.sighting_ids) for c in first]
        assert box.pending() == 10 and [len(c.sighting_ids) for c in again] == [4, 4, 2]
        body, introduced = box.payload(again[0], "cam-a")
        assert len(body["sightings"]) == 4 and all(s["identity_kind"] == "field" for s in body["sightings"])
        box.ack(again[0], body["identities"])
        assert box.pending() == 6 and box.collect(crop_fn=None) == 0  # acknowledged ones never come back


def test_collect_reads_crop_and_vector_from_gallery(tmp_path):
    import cv2

    img = tmp_path / "cam" / "IMG_0001.JPG"
    img.parent.mkdir()
    cv2.imwrite(str(img), np.random.default_rng(4).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    with Gallery(tmp_path / "dev.db") as g:
        from fieldreid.gallery.openset import Identifier

        v = unit(np.random.default_rng(5), 1)
        Identifier(g, species="zebra").identify(v, MODEL, sources=[str(img)], boxes=[(10, 20, 110, 220)])
        box = Outbox(g)
        assert box.collect() == 1 and box.collect() == 0
        [chunk] = box.chunks()
        body, _ = box.payload(chunk, "cam-a")
        s = body["sightings"][0]
        assert check_jpeg(s["crop"]) is None and np.allclose(np.frombuffer(s["vector"], "<f4"), v[0])
        assert crop_from_file(str(tmp_path / "gone.jpg"), "") is None


def test_collect_reads_crops_under_the_camera_root_and_sighting_vectors(tmp_path, monkeypatch):
    """watch records image paths relative to its camera root: the crop is read there (not under the current
    directory), only if the file still holds the picture the sighting was made from; every sighting that
    has its own query vector (watch, identify) pushes it."""
    import hashlib

    import cv2

    from fieldreid.gallery.openset import Identifier

    root = tmp_path / "cards"
    (root / "cam1").mkdir(parents=True)
    rng = np.random.default_rng(11)
    shas = []
    for name in ("IMG_0001.JPG", "IMG_0002.JPG"):
        cv2.imwrite(str(root / "cam1" / name), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        shas.append(hashlib.sha256((root / "cam1" / name).read_bytes()).hexdigest())
    cv2.imwrite(str(root / "cam1" / "IMG_0002.JPG"), np.zeros((240, 320, 3), np.uint8))  # card reused since
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    v = unit(rng, 3)
    row = {"box": (10, 20, 110, 220), "decision": "uncertain", "upper": 0.8, "lower": 0.6, "threshold_method": "t",
           "model_id": MODEL, "gallery_version": 0, "source_root": str(root)}
    with Gallery(tmp_path / "dev.db") as g:
        g.add_sightings([{**row, "image": "cam1/IMG_0001.JPG", "source_sha256": shas[0], "vector": v[0]},
                         {**row, "image": "cam1/IMG_0002.JPG", "source_sha256": shas[1], "vector": v[1]}])
        Identifier(g, species="zebra", create_provisional=False).identify(
            v[2:], MODEL, sources=[str(root / "cam1" / "IMG_0001.JPG")], boxes=[(5, 5, 60, 60)],
            source_sha256=[shas[0]])
        box = Outbox(g)
        assert box.collect() == 3
        [chunk] = box.chunks()
        sent = box.payload(chunk, "cam-a")[0]["sightings"]
    assert check_jpeg(sent[0]["crop"]) is None and sent[1]["crop"] is None and check_jpeg(sent[2]["crop"]) is None
    for s, vec in zip(sent, v, strict=True):
        assert np.allclose(np.frombuffer(s["vector"], "<f4"), vec)


def test_upload_content_checks(lab, tmp_path):
    """Every pushed field is checked the way the lab checks its own; one bad field refuses the whole chunk,
    with the sighting and the reason, and nothing of it is stored (no row, no gallery, no crop file)."""
    rng = np.random.default_rng(6)
    good = {"uid": "g:1", "species": "zebra", "decision": "new", "model_id": MODEL, "identity": "zebra-P0001",
            "identity_kind": "field", "vector": unit(rng, 1)[0].tobytes(), "crop": jpeg(rng),
            "image": "../../../../etc/passwd", "captured": "2024-05-01T10:00:00+02:00", "box": "1.0,2.0,30.0,40.0"}
    ident = {"local_id": "zebra-P0001", "species": "zebra", "embeddings": []}
    nan = np.full(DIM, np.nan, np.float32).tobytes()
    bad = [
        ({"crop": b"GIF89a" + b"\0" * 100}, "magic"),
        ({"crop": b"\xff\xd8\xff\xe0" + os.urandom(500)}, "decode"),
        ({"vector": unit(rng, 1, DIM + 1)[0].tobytes()}, "float32 values"),
        ({"vector": nan}, "NaN"),
        ({"model_id": "another-model"}, "model"),
        ({"decision": "maybe"}, "decision"),
        ({"score": float("inf")}, "finite"),
        ({"species": "../../x"}, "not a valid species name"),
        ({"species": "zebra (plains)"}, "not a valid species name"),
        ({"species": ".."}, "not a valid species name"),
        ({"camera": "cam\x00"}, "control characters"),
        ({"image": "a\x00b.jpg"}, "control characters"),
        ({"threshold_method": "a\nb"}, "control characters"),
        ({"captured": "yesterday"}, "ISO 8601"),
        ({"box": "1,2,3"}, "four"),
        ({"identity": "zebra@elsewhere"}, "'@'"),
        ({"uid": "u" * 129}, "longer than 128"),
        ({"upper": 0.5, "lower": 0.9}, "lower <= upper"),
    ]
    for i, (patch, why) in enumerate(bad):
        chunk = {"sightings": [good, {**good, "uid": f"b:{i}", **patch}], "identities": [ident]}
        with pytest.raises(BadChunk, match=why) as exc:
            ingest_chunk(lab, "cam-a", "kenya", f"key-bad-{i:04d}", chunk)
        assert "Nothing of this chunk was stored" in str(exc.value)
    for i, patch in enumerate([{"local_id": "P1@cam-b"}, {"species": "../../x"}, {"species": "a (b)"}]):
        with pytest.raises(BadChunk, match="identity rejected"):
            ingest_chunk(lab, "cam-a", "kenya", f"key-idb-{i:04d}", {"sightings": [good],
                                                                    "identities": [{**ident, **patch}]})
    with lab.read() as con:
        import sqlalchemy as sa

        from fieldreid.server import schema as s

        assert con.execute(sa.select(sa.func.count()).select_from(s.sightings)).scalar_one() == 0
        assert [g.species for g in lab.galleries(con, "kenya")] == ["zebra"]
    assert not lab.crop_dir.exists() or not any(p.is_file() for p in lab.crop_dir.rglob("*"))
    chunk = {"sightings": [good], "identities": [ident]}
    ans = ingest_chunk(lab, "cam-a", "kenya", "key-00000001", chunk)
    assert ans["accepted"] == 1 and ans["rejected"] == []
    files = [p for p in lab.data_dir.rglob("*") if p.is_file()]
    assert all(p.parent.parent == lab.crop_dir or p.parent == lab.data_dir for p in files)
    assert ingest_chunk(lab, "cam-a", "kenya", "key-00000001", chunk)["replayed"]
    assert check_vector(b"\0" * (4 * DIM), DIM) is None


def test_reused_idempotency_key_with_other_sightings_is_refused(lab):
    rng = np.random.default_rng(9)
    base = {"species": "zebra", "decision": "known", "model_id": MODEL, "identity": "zebra-0001",
            "vector": unit(rng, 1)[0].tobytes(), "crop": jpeg(rng), "image": "cam/a.jpg"}
    first = {"sightings": [{**base, "uid": "g:1"}, {**base, "uid": "g:2"}]}
    assert ingest_chunk(lab, "cam-a", "kenya", "key-00000042", first)["accepted"] == 2
    other = {"sightings": [{**base, "uid": "g:3"}]}
    with pytest.raises(KeyConflict, match="already used"):
        ingest_chunk(lab, "cam-a", "kenya", "key-00000042", other)
    # an honest retry is the same sightings, even if a pull renamed their identity meanwhile
    retry = {"sightings": [{**d, "identity": "zebra-0009"} for d in reversed(first["sightings"])]}
    assert ingest_chunk(lab, "cam-a", "kenya", "key-00000042", retry)["replayed"]
    assert ingest_chunk(lab, "cam-b", "kenya", "key-00000042", other)["accepted"] == 1  # keys are per device


def test_crop_size_is_capped_from_the_header_before_decoding():
    import cv2

    ok, big = cv2.imencode(".jpg", np.full((2048, 2048, 3), 90, np.uint8))  # smooth: few bytes, many pixels
    assert ok and len(big) < MAX_CROP_BYTES
    assert "2048x2048 pixels" in check_jpeg(big.tobytes())
    # a header claiming 4096 x 4096 pixels in front of a tiny body: refused on the header, nothing decoded
    ok, small = cv2.imencode(".jpg", np.full((64, 48, 3), 90, np.uint8))
    data = bytearray(small.tobytes())
    sof = data.index(b"\xff\xc0")
    assert (int.from_bytes(data[sof + 5:sof + 7], "big"), int.from_bytes(data[sof + 7:sof + 9], "big")) == (64, 48)
    data[sof + 5:sof + 9] = (4096).to_bytes(2, "big") * 2
    assert "4096x4096 pixels" in check_jpeg(bytes(data))
    ok, crop = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (256, 200, 3), dtype=np.uint8))
    assert check_jpeg(crop.tobytes()) is None  # what a device sends
    assert jpeg_size(crop.tobytes()) == (200, 256)


def test_config_token_and_key_sources(tmp_path, monkeypatch):
    from fieldreid.server.signing import LabKey

    key = LabKey.generate().public_b64
    cfg = tmp_path / "sync.toml"
    cfg.write_text(f'server = "http://127.0.0.1:1"\nlab_public_key = "{key}"\ntoken = "frd_dev_secret"\n')
    cfg.chmod(0o644)
    monkeypatch.delenv("FIELDREID_TOKEN", raising=False)
    c = SyncConfig.load(cfg)
    assert c.token == "frd_dev_secret" and any("chmod 600" in w for w in c.warnings)
    monkeypatch.setenv("FIELDREID_TOKEN", "frd_env")
    assert SyncConfig.load(cfg).token == "frd_env"
    monkeypatch.delenv("FIELDREID_TOKEN")
    (tmp_path / "nokey.toml").write_text('server = "http://x"\ntoken = "t"\n')
    with pytest.raises(SyncError, match="public key"):
        SyncConfig.load(tmp_path / "nokey.toml")
    with pytest.raises(AuthError, match="FIELDREID_TOKEN"):
        SyncConfig.load(tmp_path / "missing.toml", server="http://x", lab_key=key)


def test_cli_end_to_end(tmp_path):
    """`fieldreid server ...` on the lab, `fieldreid serve`, `fieldreid sync` on a device (token from env)."""
    rng = np.random.default_rng(7)
    make_lab_gallery(tmp_path / "curated.db", rng)
    env = {**os.environ, "FIELDREID_LAB_DIR": str(tmp_path / "labdata"), "FIELDREID_USER": "tester"}
    env.pop("FIELDREID_LAB_DB", None)

    def fr(*args, extra_env=None):
        r = subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           env={**env, **(extra_env or {})}, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    pub = fr("server", "init")
    fr("server", "create-project", "kenya", "--from-gallery", str(tmp_path / "curated.db"))
    fr("server", "import-gallery", str(tmp_path / "curated.db"), "--project", "kenya")
    token = fr("server", "add-device", "cam-a", "--project", "kenya")
    assert token.startswith("frd_cam-a_")
    (tmp_path / "lab.pub").write_text(pub)
    srv = ServerProcess(f"sqlite:///{tmp_path / 'labdata' / 'lab.db'}", tmp_path / "labdata").start()
    try:
        with Gallery(tmp_path / "dev.db") as g:
            record_sightings(g, rng, unit(rng, 3))
        cfg = tmp_path / "sync.toml"
        cfg.write_text(f'server = "{srv.url}"\nlab_public_key_file = "{tmp_path / "lab.pub"}"\n')
        out = fr("sync", "--gallery", str(tmp_path / "dev.db"), "--config", str(cfg), "--json",
                 extra_env={"FIELDREID_TOKEN": token})
        assert token not in out
        import json

        rep = json.loads(out)
        assert rep["pull"][0]["kind"] == "snapshot" and rep["push"]["accepted"] == 3
        status = json.loads(fr("server", "status"))
        assert status["projects"]["kenya"]["sightings"] == 3
        assert status["projects"]["kenya"]["galleries"]["zebra"]["device_provisional"] == 3
    finally:
        srv.stop()


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    from fieldreid.server.app import client_address, parse_networks

    none = parse_networks("")
    proxies = parse_networks(["127.0.0.1", "10.0.0.0/8, ::1"])
    xff = "198.51.100.9, 203.0.113.7"
    assert client_address("192.0.2.1", xff, none) == "192.0.2.1"  # nobody trusted: the TCP peer
    assert client_address("192.0.2.1", xff, proxies) == "192.0.2.1"  # a direct client making up a header
    assert client_address("127.0.0.1", xff, proxies) == "203.0.113.7"  # the proxy's own entry, not the forged one
    assert client_address("127.0.0.1", "203.0.113.7, 10.1.2.3", proxies) == "203.0.113.7"  # two proxies deep
    assert client_address("::1", "2001:db8::5", proxies) == "2001:db8::5"
    assert client_address("127.0.0.1", "not-an-ip", proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"
    with pytest.raises(LabError, match="not an IP address"):
        parse_networks("lab.example.org")
