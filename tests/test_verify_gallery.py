"""Verification inside the gallery: features stored with embeddings (v4), reindex, the stored fusion, and
the Identifier re-ranking its top-K with it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_gallery_helpers import tiny_embedder_onnx
from test_verify import coat, photo
from typer.testing import CliRunner

from fieldreid.embed.runtime import Embedder
from fieldreid.errors import InputError
from fieldreid.evaluation.rerank import calibrate_fusion
from fieldreid.gallery.enroll import Item, embed_items, enroll, index_features
from fieldreid.gallery.openset import Identifier
from fieldreid.gallery.store import Gallery
from fieldreid.verify.features import KIND, MAX_KEYPOINTS, LocalFeatures, features_of

N_IDS, PER = 10, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_gallery")
    items, queries = [], []
    for i in range(N_IDS):
        for j in range(PER + 1):
            p = root / f"a{i}" / f"{j}.png"
            p.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(p), photo(coat(300 + i), 100 * i + j))
            (queries if j == PER else items).append(Item(p, f"a{i}", "zebra"))
    emb = Embedder(tiny_embedder_onnx(root / "tiny.onnx"))  # mean colour only: cannot tell the coats apart
    return root, items, queries, emb


def test_enrol_stores_features_and_reindex_fills_the_missing(world, tmp_path):
    root, items, _, emb = world
    with Gallery(tmp_path / "g.db") as g:
        rep = enroll(items, g, emb, None, crops=True, features=True)
        assert rep.added == len(items) and rep.features_indexed == len(items)
        assert g.missing_local_features(KIND) == []
        rows = g.embeddings()
        blobs = g.local_features([r.id for r in rows], KIND)
        f = LocalFeatures.from_bytes(blobs[rows[0].id])
        assert len(f) > 50
        assert np.array_equal(f.descriptors, features_of(items[0].path).descriptors)  # the same crop
        with g.transaction() as con:
            con.execute("DELETE FROM local_features WHERE embedding_id IN (?, ?)", (rows[0].id, rows[1].id))
        assert [r.id for r in g.missing_local_features(KIND)] == [rows[0].id, rows[1].id]
    r = CliRunner().invoke(__import__("fieldreid.cli.app", fromlist=["app"]).app,
                           ["gallery", "reindex", "--gallery", str(tmp_path / "g.db")])
    assert r.exit_code == 0, r.output
    assert "computed for 2 of 2" in r.output
    with Gallery(tmp_path / "g.db") as g:
        assert g.missing_local_features(KIND) == []
        assert g.local_features([999], KIND) == {}
        # a provisional animal whose crop is not on this machine: listed, never fatal, retried next time
        g.add_provisional("zebra", np.ones(8, np.float32) / np.sqrt(8), emb.model_id, "crop-7", None)
        done, lost = index_features(g)
        assert done == 0 and len(lost) == 1 and lost[0][0] == "crop-7"
        assert len(g.missing_local_features(KIND)) == 1


def test_identifier_reranks_with_the_stored_fusion_only_where_it_pays(world, tmp_path):
    root, items, queries, emb = world
    with Gallery(tmp_path / "g.db") as g:
        enroll(items, g, emb, None, crops=True, features=True)
        res = embed_items(items, emb, None, crops=True)
        feats = [features_of(it.path) for it in res.items]
        fusion, threshold = calibrate_fusion(res.vectors, [it.identity for it in res.items], feats, k=8)
        assert fusion.pays
        q = embed_items(queries, emb, None, crops=True)
        qf = [features_of(it.path) for it in q.items]
        truth = [it.identity for it in q.items]
        ident = Identifier(g, create_provisional=False, record=False)
        plain = ident.identify(q.vectors, emb.model_id)
        assert ident.identify(q.vectors, emb.model_id, query_features=qf)[0].threshold_method == plain[0].threshold_method
        g.set_fusion("zebra", emb.model_id, fusion.to_dict())
        assert g.fusion("zebra", emb.model_id)["pays"] is True and g.fusion("seal", emb.model_id) is None
        verified = ident.identify(q.vectors, emb.model_id, query_features=qf)
        right_plain = np.mean([d.identity == t for d, t in zip(plain, truth, strict=True)])
        right = np.mean([d.identity == t for d, t in zip(verified, truth, strict=True)])
        assert right >= 0.8 > right_plain
        assert all(d.threshold_method.startswith("fused probability") and d.upper == pytest.approx(threshold)
                   for d in verified)
        assert all(0.0 <= d.score <= 1.0 for d in verified)
        # calibration said it does not pay: cosine decides again
        g.set_fusion("zebra", emb.model_id, {**fusion.to_dict(), "pays": False})
        again = ident.identify(q.vectors, emb.model_id, query_features=qf)
        assert [d.identity for d in again] == [d.identity for d in plain]
        with pytest.raises(InputError, match="one feature set"):
            ident.identify(q.vectors, emb.model_id, query_features=qf[:1])


def test_a_fusion_fitted_on_another_keypoint_cap_is_used_only_with_features_of_that_cap(world, tmp_path):
    """A gallery calibrated before the default cap changed keeps verifying: the query is extracted at the
    fusion's cap, the gallery's features of that kind are used, and features of another cap are never
    scored by it (cosine decides)."""
    from fieldreid.gallery.enroll import feature_caps
    from fieldreid.verify.features import kind_for

    root, items, queries, emb = world
    with Gallery(tmp_path / "g.db") as g:
        enroll(items, g, emb, None, crops=True, features=False)
        assert feature_caps(g) == [MAX_KEYPOINTS]  # nothing calibrated yet: the default cap
        res = embed_items(items, emb, None, crops=True)
        feats = [features_of(it.path, max_keypoints=300) for it in res.items]
        fusion, _ = calibrate_fusion(res.vectors, [it.identity for it in res.items], feats, k=8)
        assert fusion.pays and fusion.feature_kind == kind_for(300)
        g.set_fusion("zebra", emb.model_id, fusion.to_dict())
        assert feature_caps(g) == [300]
        done, lost = index_features(g)  # the fusion's cap, not the default one
        assert done == len(items) and not lost
        assert g.missing_local_features(kind_for(300)) == [] and len(g.missing_local_features(KIND)) == len(items)
        q = embed_items(queries, emb, None, crops=True)
        ident = Identifier(g, create_provisional=False, record=False)
        plain = ident.identify(q.vectors, emb.model_id)
        other_cap = [features_of(it.path, max_keypoints=200) for it in q.items]
        cosine = ident.identify(q.vectors, emb.model_id, query_features=other_cap)
        assert [d.threshold_method for d in cosine] == [d.threshold_method for d in plain]
        caps = []

        def lazy(path):
            def extract(max_keypoints):
                caps.append(max_keypoints)
                return features_of(path, max_keypoints=max_keypoints)
            return extract

        fused = ident.identify(q.vectors, emb.model_id, query_features=[lazy(it.path) for it in q.items])
        assert set(caps) == {300} and all(d.threshold_method.startswith("fused probability") for d in fused)
        right = np.mean([d.identity == it.identity for d, it in zip(fused, q.items, strict=True)])
        assert right >= 0.8
        # a fusion of a recipe this fieldreid cannot extract: verification off, cosine decides, no crash
        g.set_fusion("zebra", emb.model_id, {**fusion.to_dict(), "feature_kind": "orb/v9"})
        assert feature_caps(g) == [MAX_KEYPOINTS]
        again = ident.identify(q.vectors, emb.model_id, query_features=[lazy(it.path) for it in q.items])
        assert [d.threshold_method for d in again] == [d.threshold_method for d in plain]
