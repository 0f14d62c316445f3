"""Open-set thresholds carried by the embedder: used until a gallery is calibrated, recorded with each
decision, written into the ONNX metadata with the data they came from (issue 11, cause 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_gallery_helpers import unit

from fieldreid.embed.thresholds import THRESHOLDS_KEY, describe, model_thresholds
from fieldreid.gallery import Gallery, Identifier, Thresholds

INFO = {"upper": 0.83, "lower": 0.82, "method": "max-geometric-mean", "data": "nyala/metadata.csv",
        "split": "train", "identities": 179}


def test_metadata_thresholds_parse_and_bad_entries_mean_uncalibrated() -> None:
    th = model_thresholds({THRESHOLDS_KEY: json.dumps(INFO)})
    assert (th.upper, th.lower, th.calibrated, th.source) == (0.83, 0.82, True, "model")
    assert th.method == describe(INFO) and "nyala/metadata.csv" in th.method and "split train" in th.method
    assert model_thresholds({}) is None
    for bad in ("not json", json.dumps({"upper": 0.5}), json.dumps({**INFO, "lower": 0.9})):
        assert model_thresholds({THRESHOLDS_KEY: bad}) is None


def test_model_thresholds_apply_until_the_gallery_is_calibrated(tmp_path) -> None:
    """With ImageNet features an unrelated animal scores ~0.8: the fixed 0.70 default calls it known
    (the GM 0.000 of issue 11); the model's own 0.83 calls it new; a calibration for the population wins."""
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        g.add_embeddings(["nyala-0001"], unit(np.eye(4)[:1]), "m", ["lab/1.jpg"], species="nyala")
        stranger = unit([0.8, 0.6, 0, 0])  # cosine 0.8 to nyala-0001
        model = model_thresholds({THRESHOLDS_KEY: json.dumps(INFO)})
        [d0] = Identifier(g, create_provisional=False).identify(stranger, "m", sources=["a.jpg"])
        assert (d0.decision, d0.threshold_source, d0.calibrated) == ("known", "default", False)
        [d1] = Identifier(g, model_thresholds=model).identify(stranger, "m", sources=["b.jpg"])
        assert (d1.decision, d1.threshold_source, d1.calibrated, d1.upper) == ("new", "model", True, 0.83)
        assert g.sightings()[-1]["threshold_method"] == describe(INFO)  # the sighting says where they came from
        assert d1.to_dict()["threshold_source"] == "model"
        g.set_thresholds("nyala", "m", upper=0.75, lower=0.7, method="calibrated on my nyala")
        [d2] = Identifier(g, model_thresholds=model).identify(stranger, "m", sources=["c.jpg"])
        assert (d2.decision, d2.threshold_source, d2.threshold_method) == ("known", "gallery", "calibrated on my nyala")
    assert Thresholds().source == "default"


def test_thresholds_chosen_on_labelled_crops_are_written_into_the_onnx(default_embedder_onnx, zebra, tmp_path):
    """`fieldreid models --thresholds-from` / `calibrate --into-model`: the model keeps its graph and id,
    gains thresholds naming their data and split, and a second run with the same data changes nothing."""
    from fieldreid.embed.runtime import Embedder
    from fieldreid.embed.thresholds import ensure_model_thresholds, read_thresholds_info
    from fieldreid.engines.manifest import read_manifest

    model = tmp_path / "embedder.onnx"
    shutil.copy(default_embedder_onnx, model)
    shutil.copy(str(default_embedder_onnx) + ".json", str(model) + ".json")
    before = Embedder(model, backend="onnxruntime")
    assert before.thresholds is None  # no data given at export: uncalibrated
    rows = (zebra / "metadata.csv").read_text().splitlines()
    ids = sorted({r.split(",")[1] for r in rows[1:]})[:6]
    keep = [rows[0]] + [r for i in ids for r in [r for r in rows[1:] if r.split(",")[1] == i and ",database," in r][:6]]
    small = tmp_path / "zebra" / "metadata.csv"
    small.parent.mkdir()
    small.write_text("\n".join(r.replace("images/", str(zebra / "images") + "/", 1) for r in keep) + "\n")
    info = ensure_model_thresholds(model, small, "database")
    after = Embedder(model, backend="onnxruntime")
    assert after.model_id == before.model_id
    assert after.thresholds is not None and after.thresholds.source == "model"
    assert after.thresholds.upper == pytest.approx(info["upper"])
    assert 0.5 < info["upper"] < 1.0 and info["identities"] == 6 and info["split"] == "database"
    assert info["data"] == "zebra/metadata.csv" and info["model_id"] == before.model_id
    assert read_manifest(model, verify_sha256=True)["thresholds"]["upper"] == info["upper"]
    vec = np.full((1, 64, 64, 3), 128, np.uint8)
    assert np.allclose(before.embed(list(vec)), after.embed(list(vec)))  # same graph, same embeddings
    mtime = model.stat().st_mtime_ns
    assert ensure_model_thresholds(model, small, "database") == read_thresholds_info(model)
    assert model.stat().st_mtime_ns == mtime  # already there: not rewritten
