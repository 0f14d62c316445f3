"""Gallery storage: schema, bad files refused untouched, idempotent writes, concurrent writers, curation log."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import numpy as np
import pytest
from test_gallery_helpers import clusters, unit

from fieldreid.errors import FieldreidError
from fieldreid.gallery import SCHEMA_VERSION, Gallery, GalleryError, IdentityNotFoundError, ModelMismatchError
from fieldreid.gallery.store import APPLICATION_ID


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        yield g


def filled(path, n_ids=3, per_id=4, model="m1"):
    vec, labels = clusters(n_ids, per_id, dim=16)
    with Gallery(path) as g:
        g.add_embeddings(list(labels), vec, model, [f"img{i}.jpg" for i in range(len(labels))], species="zebra")
    return vec, labels


def test_new_gallery_has_schema_wal_and_full_sync(tmp_path):
    path = tmp_path / "sub" / "g.db"
    with Gallery(path) as g:
        assert g.schema_version == SCHEMA_VERSION
        assert g._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert g._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert g._con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert g.version == 0 and g.model_id is None
        assert [c.action for c in g.log()] == ["create"]
    with Gallery(path) as g:  # reopening migrates nothing and keeps the data
        assert g.schema_version == SCHEMA_VERSION


def test_missing_gallery_without_create(tmp_path):
    with pytest.raises(GalleryError, match="No gallery"):
        Gallery(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize("damage", ["not-sqlite", "truncated", "corrupt-page", "short-header"])
def test_damaged_file_is_refused_and_left_unchanged(tmp_path, damage):
    path = tmp_path / "g.db"
    filled(path, n_ids=20, per_id=10)
    data = path.read_bytes()
    assert len(data) > 8 * 4096
    if damage == "not-sqlite":
        data = b"PK\x03\x04 this is a zip, not a gallery" + bytes(5000)
    elif damage == "truncated":
        data = data[: len(data) // 2 + 100]
    elif damage == "short-header":
        data = data[:60]
    else:  # scribble over a b-tree page in the middle
        page = 4096
        mid = (len(data) // page // 2) * page
        data = data[:mid] + b"\xde\xad\xbe\xef" * (page // 4) + data[mid + page:]
    path.write_bytes(data)
    before = path.read_bytes()
    with pytest.raises(GalleryError, match="Nothing was changed") as exc:
        Gallery(path)
    assert isinstance(exc.value, FieldreidError)
    assert path.read_bytes() == before


def test_other_sqlite_database_is_not_a_gallery(tmp_path):
    path = tmp_path / "timelapse.ddb"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE DataTable (id INTEGER)")
    con.commit()
    con.close()
    before = path.read_bytes()
    with pytest.raises(GalleryError, match="not a fieldreid gallery"):
        Gallery(path)
    assert path.read_bytes() == before


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "g.db"
    Gallery(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(GalleryError, match="newer fieldreid"):
        Gallery(path)


def test_empty_file_becomes_a_gallery(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"")
    with Gallery(path) as g:
        assert g.schema_version == SCHEMA_VERSION


def test_reenrol_is_idempotent_and_not_logged(gallery):
    vec, labels = clusters(2, 3, dim=8)
    sources = [f"a{i}.jpg" for i in range(6)]
    assert gallery.add_embeddings(list(labels), vec, "m1", sources, species="nyala") == (6, 0)
    v = gallery.version
    assert gallery.add_embeddings(list(labels), vec, "m1", sources, species="nyala") == (0, 6)
    assert gallery.version == v
    assert gallery.count_embeddings() == 6
    # same image, different box: a second animal, a second row
    assert gallery.add_embeddings([labels[0]], vec[:1], "m1", ["a0.jpg"], boxes=[(1, 2, 30, 40)]) == (1, 0)
    assert [c.action for c in gallery.log()] == ["enrol", "enrol", "create"]
    assert gallery.model_id == "m1" and gallery.dim == 8


def test_model_mismatch_names_both_models_and_the_fix(gallery):
    vec, labels = clusters(2, 2, dim=8)
    gallery.add_embeddings(list(labels), vec, "effnet-lite0-abc", ["a", "b", "c", "d"], species="nyala")
    with pytest.raises(ModelMismatchError) as exc:
        gallery.add_embeddings(["x"], vec[:1], "convnext-xyz", ["e"], species="nyala")
    msg = str(exc.value)
    assert "effnet-lite0-abc" in msg and "convnext-xyz" in msg and "--reembed" in msg and "fieldreid enroll" in msg
    with pytest.raises(ModelMismatchError, match="16-d"):
        gallery.add_embeddings(["x"], np.ones((1, 16)), "effnet-lite0-abc", ["e"])
    assert gallery.count_embeddings() == 4


def test_float16_storage_roundtrip(tmp_path):
    vec, labels = clusters(10, 10, dim=512)
    for storage in ("float16", "float32"):
        with Gallery(tmp_path / f"{storage}.db", storage=storage) as g:
            g.add_embeddings(list(labels), vec, "m", [str(i) for i in range(len(vec))], species="s")
            block = g.load_vectors()
        assert block.matrix.dtype == np.dtype(storage)
        np.testing.assert_allclose(block.matrix.astype(np.float32), vec, atol=1e-3)
    # 100 x 512 values: 200 kB in float32, half of it saved in float16
    assert (tmp_path / "float32.db").stat().st_size - (tmp_path / "float16.db").stat().st_size > 80 * 1024


def test_provisional_numbering_is_persistent(tmp_path):
    path = tmp_path / "g.db"
    v = unit(np.eye(4)[:3])
    with Gallery(path) as g:
        assert g.add_provisional("nyala", v[0], "m", "a.jpg") == "nyala-P0001"
        assert g.add_provisional("nyala", v[1], "m", "b.jpg", box=(0, 0, 5, 5)) == "nyala-P0002"
        assert g.add_provisional("nyala", v[1], "m", "b.jpg", box=(0, 0, 5, 5)) == "nyala-P0002"  # same crop
        g.delete("nyala-P0002")
        assert g.add_provisional("zebra", v[2], "m", "c.jpg") == "zebra-P0001"
    with Gallery(path) as g:
        assert g.add_provisional("nyala", v[2], "m", "d.jpg") == "nyala-P0003"  # never reuses a deleted number
        ident = g.get_identity("nyala-P0003")
        assert ident.status == "provisional" and ident.origin == "field" and ident.n_embeddings == 1


def _writer(path: str, worker: int, n_batches: int) -> None:
    rng = np.random.default_rng(worker)
    with Gallery(path, who=f"worker{worker}") as g:
        for b in range(n_batches):
            vec = unit(rng.normal(size=(10, 16)))
            g.add_embeddings([f"w{worker}-id{b % 3}"] * 10, vec, "m", [f"w{worker}/b{b}/{i}.jpg" for i in range(10)],
                             species="zebra")
            g.add_provisional("zebra", vec[0], "m", f"w{worker}/prov{b}.jpg")
            g.add_sightings([{"image": f"w{worker}/{b}.jpg", "decision": "new", "upper": 0.7, "lower": 0.5,
                              "threshold_method": "default", "model_id": "m", "gallery_version": 0}])


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "g.db"
    Gallery(path).close()
    ctx = mp.get_context("spawn")
    n_batches = 15
    procs = [ctx.Process(target=_writer, args=(str(path), w, n_batches)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Gallery(path) as g:
        assert g.count_embeddings() == 2 * n_batches * 11
        assert g.count_sightings() == 2 * n_batches
        prov = [i.id for i in g.identities(status="provisional")]
        assert len(prov) == len(set(prov)) == 2 * n_batches
        assert sorted(prov) == [f"zebra-P{i:04d}" for i in range(1, 2 * n_batches + 1)]
        assert g.version == 4 * n_batches  # every enrol and every provisional identity, once each
        assert g.check() == []


def test_log_of_one_identity_matches_whole_ids_only(gallery):
    """`gallery log --identity nyala-1` once listed nyala-10's and nyala-11's changes too (substring match)."""
    vec, _ = clusters(4, 1, dim=8)
    gallery.add_embeddings(["nyala-1", "nyala-10", "nyala-11", "nyala-2"], vec, "m",
                           ["cam/nyala-1/a.jpg", "cam/nyala-1/b.jpg", "c.jpg", "d.jpg"], species="nyala")
    gallery.rename("nyala-10", name="nyala-1 look-alike")
    gallery.merge(["nyala-11"], "nyala-10")
    gallery.rename("nyala-2", "nyala-20")
    gallery.confirm("nyala-1", name="Old one")

    def actions(identity):
        return [c.action for c in gallery.log(identity_id=identity)]

    assert actions("nyala-1") == ["confirm", "enrol"]
    assert actions("nyala-10") == ["merge", "rename", "enrol"]
    assert actions("nyala-11") == ["merge", "enrol"]
    assert actions("nyala-2") == ["rename", "enrol"] and actions("nyala-20") == ["rename"]
    assert actions("nyala") == actions("1") == []
    assert [c.action for c in gallery.log(limit=2, identity_id="nyala-10")] == ["merge", "rename"]


def test_curation_is_logged_and_moves_everything(gallery):
    vec, labels = clusters(3, 2, dim=8)
    labels = ["nyala-0001"] * 2 + ["nyala-0002"] * 2 + ["nyala-0003"] * 2
    gallery.add_embeddings(labels, vec, "m", [f"s{i}.jpg" for i in range(6)], species="nyala")
    gallery.add_sightings([{"image": "s2.jpg", "box": None, "decision": "known", "identity_id": "nyala-0002",
                            "score": 0.9, "runner_up_id": "nyala-0003", "runner_up_score": 0.5, "upper": 0.7,
                            "lower": 0.5, "threshold_method": "default", "model_id": "m", "gallery_version": 1}])
    v0 = gallery.version

    assert gallery.merge(["nyala-0002"], "nyala-0001") == 2
    assert not gallery.has_identity("nyala-0002")
    one = gallery.get_identity("nyala-0001")
    assert one.n_embeddings == 4 and one.n_sightings == 1
    assert gallery.sightings()[0]["identity_id"] == "nyala-0001"

    moved = [e.id for e in gallery.embeddings("nyala-0001") if e.source == "s2.jpg"]
    new = gallery.split("nyala-0001", moved)
    assert new == "nyala-P0001" and gallery.get_identity(new).n_sightings == 1  # the s2.jpg sighting followed
    assert gallery.get_identity("nyala-0001").n_embeddings == 3

    assert gallery.confirm(new, new_id="nyala-0004", name="Scar") == "nyala-0004"
    four = gallery.get_identity("nyala-0004")
    assert (four.status, four.name, four.n_embeddings, four.n_sightings) == ("confirmed", "Scar", 1, 1)

    gallery.rename("nyala-0003", name="Big male")
    assert gallery.get_identity("nyala-0003").name == "Big male"
    assert gallery.delete("nyala-0003") == 2
    assert gallery.sightings()[0]["runner_up_id"] == "nyala-0003"  # history stays

    actions = [c.action for c in gallery.log()]
    assert actions[:6] == ["delete", "rename", "confirm", "rename", "split", "merge"]
    assert gallery.version == v0 + 6
    merge = next(c for c in gallery.log() if c.action == "merge")
    assert merge.details["sources"] == ["nyala-0002"] and merge.details["embeddings_moved"] == 2 and merge.who

    with pytest.raises(IdentityNotFoundError, match="gallery list"):
        gallery.delete("nyala-0999")
    with pytest.raises(GalleryError, match="already exists"):
        gallery.rename("nyala-0001", "nyala-0004")


def test_merge_refuses_other_species(gallery):
    gallery.add_embeddings(["a", "b"], unit(np.eye(2)), "m", ["1", "2"], species=["nyala", "zebra"])
    with pytest.raises(GalleryError, match="different species"):
        gallery.merge(["b"], "a")


def test_thresholds_latest_wins_with_species_fallback(gallery):
    assert gallery.thresholds("nyala", "m") is None
    gallery.set_thresholds("*", "m", 0.8, 0.6, "manual")
    assert gallery.thresholds("nyala", "m").upper == 0.8
    gallery.set_thresholds("nyala", "m", 0.75, 0.7, "calibrated")
    gallery.set_thresholds("nyala", "m", 0.72, 0.65, "calibrated again")
    t = gallery.thresholds("nyala", "m")
    assert (t.upper, t.lower, t.method) == (0.72, 0.65, "calibrated again")
    assert gallery.thresholds("nyala", "other-model") is None
    with pytest.raises(FieldreidError, match="lower <= upper"):
        gallery.set_thresholds("nyala", "m", 0.5, 0.6, "bad")
