"""A new field device: `fieldreid init`, then `fieldreid sync` makes its gallery from the lab's signed
snapshot; provisional animals made before that first pull are matched against the lab's (issue 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sync_support import MODEL, ROOT, ServerProcess, make_lab_gallery, unit

from fieldreid.gallery.store import Gallery
from fieldreid.server import admin
from fieldreid.server.db import LabDB
from fieldreid.server.signing import LabKey
from fieldreid.sync.apply import pulled_version

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _cli(*args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture
def lab(tmp_path):
    rng = np.random.default_rng(7)
    centres = make_lab_gallery(tmp_path / "curated.db", rng, n_ids=10)
    db = LabDB(f"sqlite:///{tmp_path / 'lab.db'}", tmp_path / "labdata")
    admin.create_project(db, "kenya", MODEL, centres.shape[1])
    admin.import_gallery(db, "kenya", tmp_path / "curated.db")
    token = admin.register_device(db, "cam-a", ["kenya"])
    server = ServerProcess(db.url, tmp_path / "labdata").start()
    (tmp_path / "lab.pub").write_text(db.key.public_b64)
    yield db, server, token, centres
    server.stop()
    db.close()


def test_first_sync_creates_the_gallery_from_the_signed_snapshot(lab, tmp_path) -> None:
    db, server, token, _ = lab
    dev = tmp_path / "device"
    cfg = dev / "config.toml"
    _cli("init", "--gallery", str(dev / "new.db"), "--out", str(dev / "results"), "--server", server.url,
         "--lab-key", str(tmp_path / "lab.pub"), "--config", str(cfg), env={"FIELDREID_TOKEN": token})
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"  # it holds the token
    assert not (dev / "new.db").exists()
    # before issue 11: "No gallery at new.db"
    rep = json.loads(_cli("sync", "--config", str(cfg), "--json").stdout)
    assert rep["created"] == str(dev / "new.db") and [p["kind"] for p in rep["pull"]] == ["snapshot"]
    with Gallery(dev / "new.db", create=False) as g:
        assert g.model_id == MODEL and len(g.identities()) == 10 and g.count_embeddings() == 30
        th = g.thresholds("zebra", MODEL)
        assert (th.upper, th.lower) == (0.8, 0.6)  # the lab's calibration came with it
        assert pulled_version(g, "kenya", "zebra") == rep["pull"][0]["to"]
    assert sorted(p.name for p in dev.iterdir()) == ["config.toml", "new.db"]  # no temporary files left
    again = json.loads(_cli("sync", "--config", str(cfg), "--json").stdout)
    assert "created" not in again and [p["kind"] for p in again["pull"]] == ["up-to-date"]


def test_first_sync_that_cannot_be_verified_creates_nothing(lab, tmp_path) -> None:
    _, server, token, _ = lab
    forged = LabKey.generate().public_b64  # a key the bundles were not signed with
    dev = tmp_path / "device"
    dev.mkdir()
    cfg = dev / "config.toml"
    cfg.write_text(f'server = "{server.url}"\nlab_public_key = "{forged}"\ngallery = "new.db"\n')
    r = _cli("sync", "--config", str(cfg), env={"FIELDREID_TOKEN": token}, ok=False)
    assert r.returncode == 2 and "signed by key" in r.stderr and "nothing was applied" in r.stderr
    assert sorted(p.name for p in dev.iterdir()) == ["config.toml"]  # relative gallery: beside the config


def test_missing_gallery_setting_is_one_sentence(tmp_path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('server = "http://127.0.0.1:9"\n')
    r = _cli("sync", "--config", str(cfg), ok=False)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "--gallery" in line and "gallery = " in line and str(cfg) in line


def test_provisional_animals_made_before_the_first_pull_get_suggestions(lab, tmp_path) -> None:
    """A device watched before it ever synced: its animals are `animal-P....` (species unknown). After the
    first pull each is searched against every lab species; a lab zebra is suggested, an unknown animal not."""
    from fieldreid.gallery.openset import Identifier

    _, server, token, centres = lab
    rng = np.random.default_rng(3)
    seen = centres[4] + 0.03 * rng.standard_normal(centres.shape[1]).astype(np.float32)
    stranger = unit(rng, 1)[0]
    g_path = tmp_path / "field.db"
    with Gallery(g_path) as g:
        ds = Identifier(g).identify(np.stack([seen / np.linalg.norm(seen), stranger]), MODEL,
                                    sources=["cam1/a.jpg", "cam1/b.jpg"])
        assert [(d.decision, d.identity) for d in ds] == [("new", "animal-P0001"), ("new", "animal-P0002")]
    cfg = tmp_path / "config.toml"
    _cli("init", "--gallery", str(g_path), "--server", server.url, "--lab-key", str(tmp_path / "lab.pub"),
         "--config", str(cfg))
    rep = json.loads(_cli("sync", "--config", str(cfg), "--json", env={"FIELDREID_TOKEN": token}).stdout)
    assert rep["suggestions"] == [{"identity": "animal-P0001", "candidate": "zebra-0004", "species": "zebra",
                                   "score": pytest.approx(rep["suggestions"][0]["score"]), "decision": "known"}]
    assert rep["suggestions"][0]["score"] >= 0.8
    listing = _cli("gallery", "list", "-g", str(g_path)).stdout
    row = next(line for line in listing.splitlines() if "animal-P0001" in line)
    assert "zebra-0004 (known" in row
    assert "zebra-" not in next(line for line in listing.splitlines() if "animal-P0002" in line)
    assert "suggested match: zebra-0004" in _cli("gallery", "show", "animal-P0001", "-g", str(g_path)).stdout
    # accepting it: an animal of unknown species may join a lab zebra
    _cli("gallery", "merge", "animal-P0001", "--into", "zebra-0004", "-g", str(g_path))
    with Gallery(g_path, create=False) as g:
        assert not g.has_identity("animal-P0001")
        assert {s["identity_id"] for s in g.sightings()} == {"zebra-0004", "animal-P0002"}
    assert "suggested match" not in _cli("gallery", "list", "-g", str(g_path)).stdout


def _zebra_items(zebra, n_ids: int = 8, per: int = 4):
    """Real zebra crops: ``per - 1`` enrolled and one query per identity, plus one spare per identity."""
    import csv

    from fieldreid.gallery.enroll import Item

    by: dict[str, list] = {}
    for r in csv.DictReader((zebra / "metadata.csv").open()):
        if r["split"] == "database":
            by.setdefault(r["identity"], []).append(r["path"])
    ids = sorted(i for i, v in by.items() if len(v) > per)[:n_ids]
    items, queries, spare = [], [], []
    for i in ids:
        paths = sorted(by[i])
        items += [Item(zebra / p, i, "zebra") for p in paths[:per - 1]]
        queries.append(Item(zebra / paths[per - 1], i, "zebra"))
        spare.append(Item(zebra / paths[per], i, "zebra"))
    return items, queries, spare


def test_device_gets_the_labs_local_features_and_fusion_and_reranks_the_same(zebra, tmp_path) -> None:
    """Issue 13: verification re-ranking survived only in the lab. The lab gallery's local features (per
    embedding) and fitted fusion now travel through `server import-gallery` and the signed snapshot/delta."""
    from test_gallery_helpers import tiny_embedder_onnx

    from fieldreid.embed.runtime import Embedder
    from fieldreid.evaluation.rerank import calibrate_fusion
    from fieldreid.gallery.enroll import embed_items, enroll
    from fieldreid.gallery.openset import Identifier
    from fieldreid.verify.features import KIND, features_of

    items, queries, spare = _zebra_items(zebra)
    emb = Embedder(tiny_embedder_onnx(tmp_path / "tiny.onnx"))  # colour only: the local features must decide
    curated = tmp_path / "curated.db"
    with Gallery(curated) as g:
        enroll(items, g, emb, None, crops=True, features=True)
        res = embed_items(items, emb, None, crops=True)
        fusion, _ = calibrate_fusion(res.vectors, [it.identity for it in res.items],
                                     [features_of(it.path) for it in res.items], k=8)
        assert fusion.pays
        g.set_fusion("zebra", emb.model_id, fusion.to_dict())
        g.set_thresholds("zebra", emb.model_id, 0.9, 0.8, "test")
    db = LabDB(f"sqlite:///{tmp_path / 'lab.db'}", tmp_path / "labdata")
    admin.create_project(db, "kenya", emb.model_id, emb.dim)
    rep = admin.import_gallery(db, "kenya", curated)
    assert rep["zebra"]["features"] == len(items) and rep["zebra"]["fusion"] is True
    token = admin.register_device(db, "cam-a", ["kenya"])
    server = ServerProcess(db.url, tmp_path / "labdata").start()
    (tmp_path / "lab.pub").write_text(db.key.public_b64)
    q = embed_items(queries, emb, None, crops=True)
    qf = [features_of(it.path) for it in q.items]

    def decisions(path):
        with Gallery(path, create=False) as g:
            ds = Identifier(g, create_provisional=False, record=False).identify(q.vectors, emb.model_id,
                                                                                query_features=qf)
        return [(d.decision, d.identity, round(d.score, 6), d.threshold_method) for d in ds]

    def features_by_source(path, lab_ids=None):
        with Gallery(path, create=False) as g:
            rows = g.embeddings()
            blobs = g.local_features([r.id for r in rows], KIND)
        return {(lab_ids or {}).get(r.source, r.source): blobs.get(r.id) for r in rows}

    try:
        dev = tmp_path / "device"
        cfg = dev / "config.toml"
        _cli("init", "--gallery", str(dev / "g.db"), "--out", str(dev / "results"), "--server", server.url,
             "--lab-key", str(tmp_path / "lab.pub"), "--config", str(cfg), env={"FIELDREID_TOKEN": token})
        pull = json.loads(_cli("sync", "--config", str(cfg), "--json").stdout)["pull"]
        assert [p["kind"] for p in pull] == ["snapshot"]
        import sqlalchemy as sa

        from fieldreid.server import schema as s
        with db.read() as con:  # device sources are lab:<project>:<lab embedding id>
            lab_ids = {f"lab:kenya:{r.id}": r.source for r in con.execute(sa.select(s.embeddings))}
        want = features_by_source(curated)
        assert all(v is not None for v in want.values())
        assert features_by_source(dev / "g.db", lab_ids) == want  # the same bytes for every embedding
        with Gallery(dev / "g.db", create=False) as g:
            assert g.fusion("zebra", emb.model_id) == fusion.to_dict()
        lab_answer = decisions(curated)
        assert all(m.startswith("fused probability") for *_, m in lab_answer)
        assert decisions(dev / "g.db") == lab_answer
        # the lab adds photos (with features) and re-fits the fusion: the delta carries both
        with Gallery(curated) as g:
            enroll(spare[:2], g, emb, None, crops=True, features=True)
            g.set_fusion("zebra", emb.model_id, {**fusion.to_dict(), "k": 4})
        rep = admin.import_gallery(db, "kenya", curated)
        assert rep["zebra"]["features"] == 2 and rep["zebra"]["embeddings"] == 2
        pull = json.loads(_cli("sync", "--config", str(cfg), "--json").stdout)["pull"]
        assert [p["kind"] for p in pull] == ["delta"]
        with db.read() as con:
            lab_ids = {f"lab:kenya:{r.id}": r.source for r in con.execute(sa.select(s.embeddings))}
        assert features_by_source(dev / "g.db", lab_ids) == features_by_source(curated)
        with Gallery(dev / "g.db", create=False) as g:
            assert g.fusion("zebra", emb.model_id)["k"] == 4
        assert decisions(dev / "g.db") == decisions(curated)
    finally:
        server.stop()
        db.close()
