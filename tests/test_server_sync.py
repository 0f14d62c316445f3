"""Lab server + device sync against a real `fieldreid serve` subprocess on loopback.

The key scenarios run on both database backends: SQLite (always) and PostgreSQL (skipped, with the
reason, when no server answers at $FIELDREID_TEST_PG; `.ci/run` starts one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from sync_support import (
    DIM,
    MODEL,
    ServerProcess,
    drop_pg_database,
    fresh_pg_database,
    jpeg,
    make_lab_gallery,
    pg_reachable,
    record_sightings,
    unit,
)

from fieldreid.gallery.store import Gallery
from fieldreid.server import admin
from fieldreid.server.db import LabDB
from fieldreid.server.signing import LabKey, SignatureError, packb, verify_bundle
from fieldreid.sync.apply import BundleError, apply_bundle, pulled_version
from fieldreid.sync.client import AuthError, SyncClient, SyncConfig, SyncError

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lab.db'}"
        return
    why = pg_reachable()
    if why:
        pytest.skip(why)
    url = fresh_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'lab.db'}"


@dataclass
class Lab:
    lab: LabDB
    server: ServerProcess
    tokens: dict[str, str]
    centres: np.ndarray
    tmp: Path

    def config(self, device: str, **kw) -> SyncConfig:
        return SyncConfig(server=self.server.url, token=self.tokens[device], lab_key=self.lab.key.public_raw,
                          retries=kw.pop("retries", 2), backoff=0.05, timeout=20, **kw)

    def client(self, device: str, **kw) -> SyncClient:
        return SyncClient(self.config(device, **kw))


def _make_lab(url: str, tmp: Path, rng) -> Lab:
    centres = make_lab_gallery(tmp / "curated.db", rng, n_ids=30)
    lab = LabDB(url, tmp / "labdata")
    admin.create_project(lab, "kenya", MODEL, DIM)
    admin.create_project(lab, "other", MODEL, DIM)
    admin.import_gallery(lab, "kenya", tmp / "curated.db")
    tokens = {d: admin.register_device(lab, d, ["kenya"]) for d in ("cam-a", "cam-b")}
    tokens["cam-x"] = admin.register_device(lab, "cam-x", ["other"])
    server = ServerProcess(lab.url, tmp / "labdata").start()
    return Lab(lab, server, tokens, centres, tmp)


@pytest.fixture
def lab_env(db_url, tmp_path):
    env = _make_lab(db_url, tmp_path, np.random.default_rng(1))
    yield env
    env.server.stop()
    env.lab.close()


def lab_sightings(lab: LabDB) -> list[tuple]:
    import sqlalchemy as sa

    from fieldreid.server import schema as s

    with lab.read() as con:
        return list(con.execute(sa.select(s.sightings.c.device_id, s.sightings.c.uid, s.sightings.c.identity_id,
                                          s.sightings.c.crop_sha256)))


# ------------------------------------------------------------------------------------------- security
def test_tokens_refused_and_projects_isolated(lab_env):
    url = lab_env.server.url
    assert httpx.get(f"{url}/v1/me").status_code == 401
    bad = httpx.get(f"{url}/v1/me", headers={"Authorization": "Bearer frd_cam-a_" + "x" * 43})
    assert bad.status_code == 401
    with lab_env.client("cam-a") as c:
        assert c.me()["device"] == "cam-a" and list(c.me()["projects"]) == ["kenya"]
        with pytest.raises(AuthError):  # another project's gallery: 404, its existence not revealed
            c._request("GET", "/v1/projects/other/galleries/zebra/bundle")
    admin.revoke_device(lab_env.lab, "cam-a")
    with lab_env.client("cam-a") as c, Gallery(lab_env.tmp / "a.db") as g:
        with pytest.raises(AuthError, match="refused"):
            c.pull(g)
        assert g.count_embeddings() == 0
    with lab_env.client("cam-x") as c, Gallery(lab_env.tmp / "x.db") as g:
        with pytest.raises(AuthError):
            SyncClient(lab_env.config("cam-x", project="kenya")).pull(g)


# ------------------------------------------------------------------------------------------- push
def test_server_killed_mid_push_retry_has_no_duplicate_and_no_loss(lab_env):
    rng = np.random.default_rng(2)
    vectors = np.concatenate([lab_env.centres[rng.integers(0, 10, 100)], unit(rng, 20)])
    with Gallery(lab_env.tmp / "a.db") as g:
        with lab_env.client("cam-a", chunk_sightings=16) as c:
            c.pull(g)
        record_sightings(g, rng, vectors)
        n = g.count_sightings()

        def cut_link(i, key, answer):
            if i == 3:  # the lab committed chunk 3; its answer never reaches the device
                lab_env.server.kill()
                raise httpx.ConnectError("link dropped")

        with lab_env.client("cam-a", chunk_sightings=16) as c, pytest.raises(httpx.ConnectError):
            c.push(g, on_response=cut_link)
        assert len(lab_sightings(lab_env.lab)) == 4 * 16
        with lab_env.client("cam-a", chunk_sightings=16, retries=0) as c, pytest.raises(SyncError):
            c.push(g)  # server still down: the queue keeps everything
        lab_env.server.start()
        with lab_env.client("cam-a", chunk_sightings=16) as c:
            rep = c.push(g)
        assert rep.replayed == 1 and rep.pending == 0  # chunk 3 answered from the lab's record
        assert rep.accepted == n - 4 * 16
    rows = lab_sightings(lab_env.lab)
    uids = [r[1] for r in rows]
    assert len(rows) == n and len(set(uids)) == n
    assert all(r[3] is not None for r in rows)  # every crop arrived
    crops = {r[3] for r in rows}
    assert all((lab_env.lab.crop_dir / h[:2] / f"{h}.jpg").is_file() for h in crops)


def test_two_devices_sync_at_once(lab_env):
    results, errors = {}, []

    def run(device, seed):
        try:
            rng = np.random.default_rng(seed)
            with Gallery(lab_env.tmp / f"{device}.db") as g, lab_env.client(device, chunk_sightings=8) as c:
                c.pull(g)
                record_sightings(g, rng, np.concatenate([lab_env.centres[rng.integers(0, 10, 40)], unit(rng, 8)]))
                pulled, pushed = c.sync(g)
                results[device] = (g.count_sightings(), pushed.accepted, pushed.pending)
                results[device + "-new"] = len([i for i in g.identities() if i.origin == "field"])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d, i)) for i, d in enumerate(("cam-a", "cam-b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    rows = lab_sightings(lab_env.lab)
    assert len(rows) == 96 and len(set((r[0], r[1]) for r in rows)) == 96
    assert results["cam-a"] == (48, 48, 0) and results["cam-b"] == (48, 48, 0)
    pending = [i for i in admin.identities(lab_env.lab, "kenya", "zebra") if i["origin"] == "field"]
    assert {i["device"] for i in pending} == {"cam-a", "cam-b"}
    assert len(pending) == results["cam-a-new"] + results["cam-b-new"] > 0


# ------------------------------------------------------------------------------------------- pull
def _lab_state(g: Gallery) -> tuple:
    """What the lab owns on a device gallery: identities and embedding vectors by lab source."""
    ids = sorted((i.id, i.status) for i in g.identities() if i.origin == "lab")
    rows = g._con.execute("SELECT identity_id, source, vector FROM embeddings WHERE source LIKE 'lab:%' "
                          "ORDER BY source").fetchall()
    return ids, [(r[0], r[1], bytes(r[2])) for r in rows]


def test_offline_device_catches_up_over_many_versions(lab_env):
    lab, rng = lab_env.lab, np.random.default_rng(3)
    with Gallery(lab_env.tmp / "old.db") as old:
        with lab_env.client("cam-a") as c:
            c.pull(old)
        record_sightings(old, rng, lab_env.centres[:3])  # sightings of zebra-0000..2, made at version 1
        start = pulled_version(old, "kenya", "zebra")
        for k in range(12):  # 36 versions: new animals, merges, deletions, confirmations
            more = lab_env.tmp / f"more{k}.db"
            with Gallery(more, synchronous="NORMAL") as g:
                g.add_embeddings([f"zebra-1{k:03d}"] * 2, unit(rng, 2), MODEL, [f"m{k}a", f"m{k}b"], species="zebra")
            admin.import_gallery(lab, "kenya", more)
            admin.merge(lab, "kenya", "zebra", [f"zebra-1{k:03d}"], "zebra-0009" if k % 2 else "zebra-0008")
            admin.merge(lab, "kenya", "zebra", ["zebra-0000"] if k == 0 else [f"zebra-1{k - 1:03d}x"],
                        f"zebra-1{k:03d}x", new=True)
        admin.delete_identity(lab, "kenya", "zebra", "zebra-0005")
        with lab_env.client("cam-a") as c:
            [rep] = c.pull(old)
        assert rep.kind == "delta" and rep.from_version == start and rep.to_version == start + 37
        with Gallery(lab_env.tmp / "fresh.db") as fresh, lab_env.client("cam-b") as c:
            [full] = c.pull(fresh)
            assert full.kind == "snapshot" and full.bytes > rep.bytes
            assert _lab_state(old) == _lab_state(fresh)
        # the chain zebra-0000 -> zebra-1000x -> ... -> zebra-1011x reached the old sightings
        assert old.sightings()[0]["identity_id"] == "zebra-1011x"
        assert not old.has_identity("zebra-0005") and not old.has_identity("zebra-0000")
        # after compaction a device behind the floor gets a snapshot, with the same result
        admin.merge(lab, "kenya", "zebra", ["zebra-0007"], "zebra-0006")
        admin.compact(lab, "kenya", "zebra")
        admin.merge(lab, "kenya", "zebra", ["zebra-0004"], "zebra-0003")
        with lab_env.client("cam-a") as c:
            [rep2] = c.pull(old)
        assert rep2.kind == "snapshot"
        with Gallery(lab_env.tmp / "fresh2.db") as fresh, lab_env.client("cam-b") as c:
            c.pull(fresh)
            assert _lab_state(old) == _lab_state(fresh)


def test_tampered_or_foreign_bundle_is_rejected_and_gallery_unchanged(sqlite_url, tmp_path):
    env = _make_lab(sqlite_url, tmp_path, np.random.default_rng(4))
    try:
        g_path = tmp_path / "dev.db"
        with Gallery(g_path) as g, env.client("cam-a") as c:
            c.pull(g)
            record_sightings(g, np.random.default_rng(5), unit(np.random.default_rng(6), 2))
            admin.merge(env.lab, "kenya", "zebra", ["zebra-0001"], "zebra-0002")
            good = c.fetch_bundle("kenya", "zebra", pulled_version(g, "kenya", "zebra"))
            before = (g.versions(), _lab_state(g), g.sightings(), len(g.identities()))
            for pos in (len(good) // 2, len(good) - 70, len(good) - 3):  # payload, signature region, tail
                bad = bytearray(good)
                bad[pos] ^= 0x01
                with pytest.raises(SignatureError):
                    verify_bundle(bytes(bad), env.lab.key.public_raw)
            impostor = LabKey.generate()
            payload = verify_bundle(good, env.lab.key.public_raw)
            with pytest.raises(SignatureError, match="not by the lab key"):
                verify_bundle(impostor.sign_bundle(payload), env.lab.key.public_raw)
            wrong = SyncConfig(server=env.server.url, token=env.tokens["cam-a"], lab_key=impostor.public_raw)
            with SyncClient(wrong) as c2, pytest.raises(SignatureError):
                c2.pull(g)
            assert (g.versions(), _lab_state(g), g.sightings(), len(g.identities())) == before
            c.pull(g)  # the genuine bundle applies; replaying an older one afterwards is refused
            with pytest.raises(BundleError):
                apply_bundle(g, {**payload, "kind": "snapshot", "version": payload["version"] - 1}, "kenya",
                             "zebra", "cam-a")
    finally:
        env.server.stop()


def test_lab_merges_rewrite_both_devices_and_later_sightings_use_new_id(lab_env):
    rng = np.random.default_rng(7)
    animal = unit(rng, 1)[0]
    near = lambda: (animal + 0.02 * rng.standard_normal(DIM)).astype(np.float32)  # noqa: E731
    galleries = {}
    for d in ("cam-a", "cam-b"):
        g = galleries[d] = Gallery(lab_env.tmp / f"{d}.db")
        with lab_env.client(d) as c:
            c.pull(g)
            record_sightings(g, rng, np.array([near()]))
            c.push(g)
    a_local = galleries["cam-a"].sightings()[0]["identity_id"]
    b_local = galleries["cam-b"].sightings()[0]["identity_id"]
    admin.merge(lab_env.lab, "kenya", "zebra", [f"{a_local}@cam-a", f"{b_local}@cam-b"], "zebra-0042", new=True)
    for d, g in galleries.items():
        with lab_env.client(d) as c:
            c.pull(g)
        assert [s["identity_id"] for s in g.sightings()] == ["zebra-0042"]
        assert not g.has_identity(a_local if d == "cam-a" else b_local) or g.get_identity(
            a_local if d == "cam-a" else b_local).origin == "lab"
        record_sightings(g, rng, np.array([near()]))
        assert g.sightings()[-1]["identity_id"] == "zebra-0042" and g.sightings()[-1]["decision"] == "known"
        with lab_env.client(d) as c:
            c.push(g)
        g.close()
    ids = [r[2] for r in lab_sightings(lab_env.lab)]
    assert ids == ["zebra-0042"] * 4  # the sightings pushed before the merge were re-pointed at the lab too


# ------------------------------------------------------------------------------------------- limits
def test_oversized_and_malformed_uploads_and_rate_limit(sqlite_url, tmp_path):
    env = _make_lab(sqlite_url, tmp_path, np.random.default_rng(8))
    env.server.stop()
    env.server.extra = ["--max-push-mb", "0.05", "--rate", "2"]
    env.server.start()
    try:
        url = env.server.url
        h = {"Authorization": f"Bearer {env.tokens['cam-a']}", "Idempotency-Key": "k" * 16}
        r = httpx.post(f"{url}/v1/projects/kenya/sightings", content=b"\0" * 60000, headers=h)
        assert r.status_code == 413
        r = httpx.post(f"{url}/v1/projects/kenya/sightings", content=b"\xc1not msgpack", headers=h)
        assert r.status_code in (422, 429)
        codes = [httpx.get(f"{url}/v1/me", headers=h).status_code for _ in range(20)]
        assert 429 in codes and codes[0] in (200, 429)
    finally:
        env.server.stop()


# ------------------------------------------------------------------------------------------- hostile data
def _sightings_of_species(g: Gallery, rng, n: int, species: str, lab_centres=None) -> None:
    """n sightings: of the lab's animals (species 'zebra') when lab_centres is given, else new animals of
    ``species`` (provisional identities), each queued with a vector and a crop."""
    from fieldreid.gallery.openset import Identifier
    from fieldreid.sync.queue import Outbox

    vecs = lab_centres[:n] if lab_centres is not None else unit(rng, n)
    ds = Identifier(g, species=species).identify(vecs, MODEL, sources=[f"cam/{species}-{rng.integers(1e9)}-{i}.jpg"
                                                                       for i in range(n)])
    Outbox(g).add_many([(d.sighting_id, vecs[i], jpeg(rng)) for i, d in enumerate(ds)])


def test_invalid_species_chunk_is_refused_whole_and_other_devices_keep_syncing(lab_env):
    """A push naming species '../../x' once made a lab gallery by that name, after which every device's pull
    failed (and so did its push). Now such a chunk is refused whole with the reason; the device records it,
    stops resending it and sends the rest; no other device notices."""
    rng, url = np.random.default_rng(12), lab_env.server.url
    h = {"Authorization": f"Bearer {lab_env.tokens['cam-a']}", "Content-Type": "application/msgpack"}
    for i, species in enumerate(("../../x", "zebra (plains)", "..")):
        chunk = {"sightings": [{"uid": f"evil:{i}", "species": species, "decision": "new", "model_id": MODEL}]}
        r = httpx.post(f"{url}/v1/projects/kenya/sightings", content=packb(chunk),
                       headers={**h, "Idempotency-Key": f"evil-key-{i:04d}"})
        assert r.status_code == 422 and "not a valid species name" in r.json()["detail"]
    with Gallery(lab_env.tmp / "a.db") as g:
        with lab_env.client("cam-a", chunk_sightings=4) as c:
            c.pull(g)
            _sightings_of_species(g, rng, 4, "zebra", lab_env.centres)
            _sightings_of_species(g, rng, 4, "zebra (plains)")  # an honest device, a name the lab cannot serve
            _sightings_of_species(g, rng, 4, "zebra", lab_env.centres[4:])
            rep = c.push(g)
            assert (rep.accepted, rep.refused_now, rep.pending) == (8, 1, 4)
            [refused] = rep.refused
            assert refused["sightings"] == 4 and "HTTP 422" in refused["reason"]
            assert "'zebra (plains)' is not a valid species name" in refused["reason"]
            again = c.push(g)  # not resent, still reported
            assert (again.accepted, again.refused_now, again.chunks, again.refused) == (0, 0, 0, [refused])
            from fieldreid.sync.queue import Outbox

            assert Outbox(g).retry_rejected() == 1  # `fieldreid sync --retry-refused`: sent once more
            assert c.push(g).refused_now == 1 and Outbox(g).pending() == 4
    with lab_env.lab.read() as con:
        assert [gal.species for gal in lab_env.lab.galleries(con, "kenya")] == ["zebra"]
    assert len(lab_sightings(lab_env.lab)) == 8
    with Gallery(lab_env.tmp / "b.db") as g, lab_env.client("cam-b") as c:
        pulled, pushed = c.sync(g)
        assert [(p.species, p.error) for p in pulled] == [("zebra", None)] and pushed.refused == []


def test_bad_gallery_rows_already_in_a_lab_never_stop_a_pull(lab_env):
    """A lab database that already holds galleries no device can pull (made before names were checked):
    the lab does not list them, and a device that is told of one skips it, pulls the rest and pushes."""
    import sqlalchemy as sa

    from fieldreid.server import schema as s

    with lab_env.lab.write() as con:
        for sp in ("../../x", "zebra (plains)"):
            con.execute(s.galleries.insert().values(project_id="kenya", species=sp, version=3, floor=0))
    rng = np.random.default_rng(13)
    with Gallery(lab_env.tmp / "b.db") as g, lab_env.client("cam-b") as c:
        assert list(c.me()["projects"]["kenya"]["galleries"]) == ["zebra"]
        record_sightings(g, rng, lab_env.centres[:2])
        real_me = c.me

        def old_lab_me():  # as an older lab would answer: every gallery row, and one that has gone since
            me = real_me()
            me["projects"]["kenya"]["galleries"].update({"../../x": 3, "zebra (plains)": 3, "ghost": 1})
            return me

        c.me = old_lab_me
        pulled, pushed = c.sync(g)
    by = {p.species: p for p in pulled}
    assert by["zebra"].error is None and by["zebra"].to_version > 0
    assert "not a valid species name" in by["../../x"].error and "not a valid species name" in by["zebra (plains)"].error
    assert by["ghost"].kind == "failed" and "not found" in by["ghost"].error
    assert pushed.accepted == 2 and pushed.pending == 0
    with lab_env.lab.read() as con:
        assert con.execute(sa.select(sa.func.count()).select_from(s.sightings)).scalar_one() == 2


def test_reused_idempotency_key_with_other_sightings_is_409(lab_env):
    rng, url = np.random.default_rng(14), lab_env.server.url
    h = {"Authorization": f"Bearer {lab_env.tokens['cam-a']}", "Content-Type": "application/msgpack",
         "Idempotency-Key": "same-key-0001"}
    base = {"species": "zebra", "decision": "known", "model_id": MODEL, "identity": "zebra-0001",
            "vector": unit(rng, 1)[0].tobytes(), "crop": jpeg(rng)}
    first = packb({"sightings": [{**base, "uid": "dev:1"}]})
    assert httpx.post(f"{url}/v1/projects/kenya/sightings", content=first, headers=h).json()["accepted"] == 1
    r = httpx.post(f"{url}/v1/projects/kenya/sightings", content=packb({"sightings": [{**base, "uid": "dev:2"}]}),
                   headers=h)
    assert r.status_code == 409 and "already used" in r.json()["detail"]
    assert httpx.post(f"{url}/v1/projects/kenya/sightings", content=first, headers=h).json()["replayed"]
    assert [r[1] for r in lab_sightings(lab_env.lab)] == ["dev:1"]


def test_sync_reports_sightings_pushed_without_crop_or_vector(lab_env, tmp_path, monkeypatch):
    import hashlib

    import cv2

    root = tmp_path / "cards"
    (root / "cam1").mkdir(parents=True)
    rng = np.random.default_rng(15)
    cv2.imwrite(str(root / "cam1" / "a.jpg"), rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    sha = hashlib.sha256((root / "cam1" / "a.jpg").read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)  # not the camera root: relative image paths must not be read from here
    row = {"decision": "uncertain", "upper": 0.8, "lower": 0.6, "threshold_method": "t", "model_id": MODEL,
           "gallery_version": 1, "source_root": str(root)}
    with Gallery(lab_env.tmp / "a.db") as g, lab_env.client("cam-a") as c:
        c.pull(g)
        g.add_sightings([{**row, "image": "cam1/a.jpg", "box": (5, 5, 100, 100), "source_sha256": sha,
                          "vector": lab_env.centres[0]},
                         {**row, "image": "cam1/gone.jpg", "box": (5, 5, 100, 100), "source_sha256": "0" * 64,
                          "vector": lab_env.centres[1]},
                         {**row, "image": "cam1/a.jpg", "box": (1, 1, 50, 50)}])  # no vector recorded
        rep = c.push(g)
    assert (rep.accepted, rep.no_crop, rep.no_vector) == (3, 1, 1)
    crops = sorted(r[3] is not None for r in lab_sightings(lab_env.lab))
    assert crops == [False, True, True]


def _wrong_logins(url: str, n: int, forwarded) -> list[int]:
    codes = []
    for i in range(n):
        h = {"Authorization": "Bearer frd_cam-a_" + "y" * 43}
        if forwarded is not None:
            h["X-Forwarded-For"] = forwarded(i)
        codes.append(httpx.get(f"{url}/v1/me", headers=h).status_code)
    return codes


def test_failed_login_limit_keys_on_the_peer_unless_a_proxy_is_trusted(sqlite_url, tmp_path):
    """40 wrong tokens, each claiming another X-Forwarded-For, once all got 401: the limit trusted the header
    on a direct connection. Now it keys on the TCP peer; a configured proxy's header is believed."""
    env = _make_lab(sqlite_url, tmp_path, np.random.default_rng(16))
    try:
        codes = _wrong_logins(env.server.url, 40, lambda i: f"203.0.113.{i}")
        assert codes.count(429) >= 5 and set(codes) == {401, 429}
        env.server.stop()
        env.server.extra = ["--trusted-proxy", "127.0.0.1"]
        env.server.start()
        codes = _wrong_logins(env.server.url, 40, lambda i: f"203.0.113.{i}")
        assert codes == [401] * 40  # forty clients behind the proxy, one guess each
        codes = _wrong_logins(env.server.url, 40, lambda i: f"198.51.100.{i}, 203.0.113.7")
        assert codes.count(429) >= 5  # one client (the proxy's own entry), whatever it put in front
    finally:
        env.server.stop()


def test_schema_2_lab_database_upgrades_and_carries_features_and_fusion(db_url, tmp_path):
    """A lab database made before schema 3 (no embedding_features, no fusion) opens, upgrades, and an import
    of a gallery with local features and a fusion then reaches a pulled bundle; bad ones are refused whole."""
    import sqlalchemy as sa

    from fieldreid.server import schema as s

    rng = np.random.default_rng(11)
    make_lab_gallery(tmp_path / "curated.db", rng, n_ids=4)
    with Gallery(tmp_path / "curated.db") as g:
        rows = g.embeddings()
        g.set_local_features([(r.id, "test-kind/v1", bytes([r.id % 256]) * (100 + r.id)) for r in rows[:5]])
        g.set_fusion("zebra", MODEL, {"k": 5, "pays": True, "weights": [1.0, 2.0]})
    lab = LabDB(db_url, tmp_path / "labdata")
    with lab.write() as con:  # back to what schema 2 made
        con.execute(sa.text("DROP TABLE embedding_features"))
        con.execute(sa.text("DROP TABLE fusion"))
        con.execute(sa.update(s.meta).where(s.meta.c.key == "schema").values(value="2"))
    lab.close()
    lab = LabDB(db_url, tmp_path / "labdata")
    try:
        with lab.read() as con:
            assert con.execute(sa.select(s.meta.c.value).where(s.meta.c.key == "schema")).scalar() == "3"
        admin.create_project(lab, "kenya", MODEL, DIM)
        rep = admin.import_gallery(lab, "kenya", tmp_path / "curated.db")
        assert rep["zebra"]["features"] == 5 and rep["zebra"]["fusion"] is True
        assert admin.import_gallery(lab, "kenya", tmp_path / "curated.db")["zebra"]["features"] == 0  # idempotent
        bundle, summary = lab.build_bundle("kenya", "zebra", 0)
        assert summary["features"] == 5 and summary["fusion"] is True
        payload = verify_bundle(bundle, lab.key.public_raw)
        with pytest.raises(SignatureError, match="FIELDREID_MAX_BUNDLE_BYTES"):
            verify_bundle(bundle, lab.key.public_raw, max_bytes=1000)
        with Gallery(tmp_path / "dev.db") as dev:
            for bad in ({"features": payload["features"][:-1]}, {"features": [[1, b"x"]] * len(payload["features"])},
                        {"fusion": "[1, 2]"}):
                with pytest.raises(BundleError):
                    apply_bundle(dev, {**payload, **bad}, "kenya", "zebra", "cam-a")
                assert dev.count_embeddings() == 0
            apply_bundle(dev, payload, "kenya", "zebra", "cam-a")
            assert dev.fusion("zebra", MODEL) == {"k": 5, "pays": True, "weights": [1.0, 2.0]}
            by_src = {r.source: r.id for r in dev.embeddings()}
            with lab.read() as con:
                lab_src = {r.id: r.source for r in con.execute(sa.select(s.embeddings))}
            got = {lab_src[int(src.rsplit(":", 1)[1])]: blob for src, i in by_src.items()
                   for blob in dev.local_features([i], "test-kind/v1").values()}
        with Gallery(tmp_path / "curated.db") as g:
            want = {r.source: bytes([r.id % 256]) * (100 + r.id) for r in g.embeddings()[:5]}
        assert got == want
        admin.delete_identity(lab, "kenya", "zebra", "zebra-0000")  # 3 of the 5 embeddings with features
        admin.compact(lab, "kenya", "zebra")
        with lab.read() as con:
            assert con.execute(sa.select(sa.func.count()).select_from(s.embedding_features)).scalar() == 2
    finally:
        lab.close()
