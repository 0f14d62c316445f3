"""Species: a photo whose species is unknown is searched in every species of the gallery, never in an empty
``animal`` partition; a camera folder may name its species; each decision says which species it was made in."""

from __future__ import annotations

import numpy as np
import pytest
from test_gallery_helpers import unit

from fieldreid.gallery import Gallery, Identifier
from fieldreid.watch.runner import SPECIES_FILE, camera_species


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        yield g


def test_unknown_species_searches_every_species_and_uses_its_thresholds(gallery):
    e = unit(np.eye(4))
    gallery.add_embeddings(["z-1", "z-2", "ny-1"], e[:3], "m", ["1", "2", "3"],
                           species=["plains_zebra", "plains_zebra", "nyala"])
    gallery.set_thresholds("plains_zebra", "m", upper=0.95, lower=0.9, method="zebra-cal")
    gallery.set_thresholds("nyala", "m", upper=0.5, lower=0.4, method="nyala-cal")
    ident = Identifier(gallery, create_provisional=True, record=False)
    # a device-made provisional animal of unknown species exists: it must not be all that is searched
    assert gallery.add_provisional("animal", unit([0, 0, 0, 1]), "m", "cam/x.jpg", None) == "animal-P0001"
    z, ny = ident.identify(np.stack([unit([1, 0.02, 0, 0]), unit([0.02, 0, 1, 0.3])]), "m", sources=["a", "b"])
    assert (z.decision, z.identity, z.species, z.threshold_method) == ("known", "z-1", "plains_zebra", "zebra-cal")
    assert (ny.decision, ny.identity, ny.species, ny.threshold_method) == ("known", "ny-1", "nyala", "nyala-cal")


def test_a_given_species_restricts_one_call(gallery):
    gallery.add_embeddings(["z-1", "ny-1"], unit(np.eye(3)[:2]), "m", ["1", "2"], species=["plains_zebra", "nyala"])
    ident = Identifier(gallery, create_provisional=True, record=False)
    q = unit([0.2, 1, 0])  # a nyala to the eye of the embedder, from a camera set to zebras
    [d] = ident.identify(q, "m", sources=["cam/q.jpg"])  # the identifier itself is not restricted
    assert (d.identity, d.species) == ("ny-1", "nyala")
    [d] = ident.identify(q, "m", sources=["cam/q.jpg"], species="plains_zebra")
    assert d.species == "plains_zebra" and d.top[0][0] == "z-1" and all(i != "ny-1" for i, _ in d.top)
    [d] = ident.identify(q, "m", sources=["cam/r.jpg"], species="lynx")  # a species with nobody yet
    assert (d.decision, d.species) == ("new", "lynx") and d.identity.startswith("lynx-P")


def test_new_animals_of_unknown_species_in_an_empty_gallery(gallery):
    ident = Identifier(gallery, record=False)
    [a] = ident.identify(unit([1, 0, 0]), "m", sources=["a.jpg"])
    [b] = ident.identify(unit([1, 0.01, 0]), "m", sources=["b.jpg"])
    assert (a.decision, b.decision) == ("new", "known") and a.identity == b.identity
    assert a.species == b.species == "animal"


def test_camera_species_file(tmp_path):
    root = tmp_path / "cards"
    (root / "cam1").mkdir(parents=True)
    (root / "cam2").mkdir()
    assert camera_species(root, "cam1") is None
    (root / SPECIES_FILE).write_text("plains_zebra\n")
    (root / "cam2" / SPECIES_FILE).write_text("# set by the field team\n\n  nyala  \n")
    assert camera_species(root, "cam1") == "plains_zebra"  # the watched folder's file covers every camera
    assert camera_species(root, "cam2") == "nyala"
    assert camera_species(root, "cards") == "plains_zebra"  # files lying in the root itself
    (root / "cam2" / SPECIES_FILE).write_bytes(b"")
    assert camera_species(root, "cam2") == "plains_zebra"
