"""Open-set decisions: thresholds, provisional identities, recorded provenance."""

from __future__ import annotations

import numpy as np
import pytest
from test_gallery_helpers import unit

from fieldreid.errors import InputError
from fieldreid.gallery import DEFAULT_LOWER, DEFAULT_UPPER, Gallery, Identifier, Thresholds


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        yield g


def test_threshold_boundaries():
    t = Thresholds(upper=0.8, lower=0.6)
    assert [t.decide(s) for s in (0.8, 0.79, 0.6, 0.59, None, float("nan"))] == [
        "known", "uncertain", "uncertain", "new", "new", "new"]
    assert Thresholds(0.7, 0.7).decide(0.7) == "known"
    with pytest.raises(InputError):
        Thresholds(upper=0.5, lower=0.6)


def test_new_animal_gets_a_provisional_id_that_later_crops_join(gallery):
    e = unit(np.eye(4))
    gallery.add_embeddings(["nyala-0001"], e[:1], "m", ["lab/1.jpg"], species="nyala")
    ident = Identifier(gallery)
    stranger = unit([0.05, 1, 0, 0])
    # two crops of one unknown animal in one batch, then one crop of the known animal
    ds = ident.identify(np.stack([stranger, stranger * 0.999 + 0.001, e[0]]), "m",
                        sources=["cam/a.jpg", "cam/b.jpg", "cam/c.jpg"], boxes=[(0, 0, 10, 10), None, None],
                        captured=["2024:01:01 10:00:00", None, None], camera=["cam1", "cam1", None])
    assert [d.decision for d in ds] == ["new", "known", "known"]
    assert ds[0].identity == ds[1].identity == "nyala-P0001" and ds[0].created_identity
    assert ds[2].identity == "nyala-0001" and ds[2].score == pytest.approx(1.0)
    assert ds[1].runner_up == "nyala-0001"
    assert all(not d.calibrated and d.upper == DEFAULT_UPPER and d.lower == DEFAULT_LOWER for d in ds)
    assert gallery.get_identity("nyala-P0001").status == "provisional"
    assert len(gallery.identities()) == 2  # the second crop did not create another animal
    rows = gallery.sightings()
    assert [r["decision"] for r in rows] == ["new", "known", "known"]
    r0 = rows[0]
    assert (r0["image"], r0["box"], r0["captured"], r0["camera"], r0["model_id"]) == (
        "cam/a.jpg", "0.0,0.0,10.0,10.0", "2024:01:01 10:00:00", "cam1", "m")
    assert r0["gallery_version"] == 1 and rows[1]["gallery_version"] == 2  # decided before / after P0001
    assert r0["threshold_method"].startswith("default")
    assert ds[0].sighting_id == r0["id"]


def test_uncertain_names_the_candidate_and_creates_nothing(gallery):
    gallery.add_embeddings(["z-1", "z-2"], unit(np.eye(3)[:2]), "m", ["1", "2"], species="zebra")
    gallery.set_thresholds("zebra", "m", upper=0.9, lower=0.5, method="test")
    q = unit([1, 0.6, 0])  # cos to z-1 = 0.857
    [d] = Identifier(gallery).identify(q, "m", sources=["q.jpg"])
    assert (d.decision, d.identity, d.runner_up) == ("uncertain", "z-1", "z-2")
    assert d.calibrated and d.upper == 0.9 and d.threshold_method == "test"
    assert d.top[0][0] == "z-1" and len(d.top) == 2
    assert len(gallery.identities()) == 2


def test_empty_gallery_everything_new_and_no_record_mode(gallery):
    ident = Identifier(gallery, species="lynx", record=False)
    ds = ident.identify(unit(np.eye(3)), "m", sources=["a", "b", "c"])
    assert [d.decision for d in ds] == ["new"] * 3
    assert [d.identity for d in ds] == ["lynx-P0001", "lynx-P0002", "lynx-P0003"]
    assert ds[0].score is None and gallery.count_sightings() == 0
    assert gallery.model_id == "m"  # the first provisional animal fixed the gallery's model


def test_no_provisional_mode_leaves_gallery_unchanged(gallery):
    gallery.add_embeddings(["a"], unit(np.eye(3)[:1]), "m", ["1"], species="s")
    v = gallery.version
    [d] = Identifier(gallery, create_provisional=False).identify(unit([0, 1, 0]), "m", sources=["x"])
    assert d.decision == "new" and d.identity is None and gallery.version == v
