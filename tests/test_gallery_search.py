"""Gallery search: per-identity aggregation, top-k, caching across versions, float16."""

from __future__ import annotations

import numpy as np
import pytest
from test_gallery_helpers import clusters, unit

from fieldreid.gallery import Gallery, ModelMismatchError, Searcher
from fieldreid.gallery.search import aggregate_scores, group_bounds, top_k


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        yield g


def test_aggregate_max_and_mean_top3_by_hand():
    labels = np.array([1, 0, 1, 1, 1, 0])
    scores = np.array([[0.9, 0.5, 0.1, 0.8, 0.2, 0.7]], np.float32)
    order, starts, groups = group_bounds(labels)
    assert groups.tolist() == [0, 1]
    np.testing.assert_allclose(aggregate_scores(scores, order, starts, "max"), [[0.7, 0.9]])
    np.testing.assert_allclose(aggregate_scores(scores, order, starts, "mean-top3"), [[0.6, (0.9 + 0.8 + 0.2) / 3]],
                               rtol=1e-6)
    scores[0, 5] = -np.inf  # an excluded entry is ignored by the mean
    np.testing.assert_allclose(aggregate_scores(scores, order, starts, "mean-top3"), [[0.5, (0.9 + 0.8 + 0.2) / 3]],
                               rtol=1e-6)


def test_top_k_orders_and_breaks_ties_by_index():
    idx, vals = top_k(np.array([[0.1, 0.5, 0.5, 0.9]], np.float32), 3)
    assert idx.tolist() == [[3, 1, 2]]
    np.testing.assert_allclose(vals, [[0.9, 0.5, 0.5]])


def test_animal_with_many_photos_does_not_crowd_out_others(gallery):
    rng = np.random.default_rng(1)
    base = unit(rng.normal(size=16))
    many = unit(base + 0.1 * rng.normal(size=(40, 16)))  # 40 photos close to the query
    few = unit(base + 0.3 * rng.normal(size=(2, 16)))
    other = unit(rng.normal(size=(3, 16)))
    vec = np.r_[many, few, other]
    ids = ["many"] * 40 + ["few"] * 2 + ["x", "y", "z"]
    gallery.add_embeddings(ids, vec, "m", [str(i) for i in range(len(ids))], species="s")
    [res] = Searcher(gallery).search(base, k=5, model_id="m")
    assert res.identities[:2] == ["many", "few"]
    assert len(res.identities) == len(set(res.identities)) == 5
    assert res.best[0] == "many" and res.runner_up[0] == "few"
    # scores are the max over each identity's photos
    assert res.best[1] == pytest.approx(float(np.max(many @ base)), abs=1e-6)
    assert res.runner_up[1] == pytest.approx(float(np.max(few @ base)), abs=1e-6)


def test_cache_appends_new_rows_and_reloads_on_merge(tmp_path):
    path = tmp_path / "g.db"
    vec, labels = clusters(4, 3, dim=16)
    with Gallery(path) as g, Gallery(path) as other:
        g.add_embeddings(list(labels[:6]), vec[:6], "m", [str(i) for i in range(6)], species="s")
        s = Searcher(g)
        [r] = s.search(vec[7], k=2)
        assert s.n_embeddings == 6 and s.loads == 1 and "id002" not in r.identities
        # another process/connection enrols more: visible, loaded incrementally
        other.add_embeddings(list(labels[6:]), vec[6:], "m", [str(i) for i in range(6, 12)], species="s")
        [r] = s.search(vec[7], k=2)
        assert r.best[0] == "id002" and s.n_embeddings == 12 and s.loads == 1
        assert s.refresh() is False  # nothing changed: no reload
        other.merge(["id002"], "id003")
        [r] = s.search(vec[7], k=2)
        assert r.best[0] == "id003" and s.loads == 2
        other.delete("id003")
        [r] = s.search(vec[7], k=5)
        assert "id003" not in r.identities and s.n_embeddings == 6


def test_species_filter_and_model_check(gallery):
    gallery.add_embeddings(["z1", "n1"], unit([[1, 0, 0], [0.9, 0.1, 0]]), "m", ["a", "b"], species=["zebra", "nyala"])
    s = Searcher(gallery)
    assert s.search(np.array([1, 0, 0]), species="nyala")[0].identities == ["n1"]
    assert s.search(np.array([1, 0, 0]), species="giraffe")[0].identities == []
    with pytest.raises(ModelMismatchError):
        s.search(np.array([1, 0, 0]), model_id="other")


def test_empty_gallery_returns_no_candidates(gallery):
    [r] = Searcher(gallery).search(np.ones(4, np.float32))
    assert r.best is None and r.runner_up is None


def test_float16_gallery_scores_match_float32(tmp_path):
    vec, labels = clusters(50, 4, dim=128, noise=0.3)
    q = vec[::7]
    res = {}
    for storage, memory in (("float32", "float32"), ("float16", "float32"), ("float16", "float16")):
        with Gallery(tmp_path / f"{storage}.db", storage=storage) as g:
            if not g.count_embeddings():
                g.add_embeddings(list(labels), vec, "m", [str(i) for i in range(len(labels))], species="s")
            s = Searcher(g, memory_dtype=memory)
            res[storage, memory] = s.search(q, k=5)
            assert s.matrix.dtype == np.dtype(memory)
    ref = res["float32", "float32"]
    for other in (res["float16", "float32"], res["float16", "float16"]):
        for a, b in zip(ref, other, strict=True):
            assert a.identities[0] == b.identities[0]
            np.testing.assert_allclose(a.scores, b.scores, atol=2e-3)
