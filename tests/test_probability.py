"""Calibrated match probabilities (issue 13): every open-set decision carries P(it is right) from the fit that
``fieldreid calibrate`` stores per species and model - the fused one (cosine + inliers) where verification
decided, else the cosine-only one - never a cosine passed off as a probability; sightings, watch tracks,
the identify CSV and the Camtrap DP export carry it."""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_gallery_helpers import clusters, tiny_embedder_onnx, unit
from test_verify import coat, photo
from test_verify_cli import coats_dataset
from typer.testing import CliRunner

from fieldreid.errors import InputError
from fieldreid.evaluation.rerank import calibrate_cosine
from fieldreid.gallery import Gallery, Identifier
from fieldreid.gallery import schema as gallery_schema
from fieldreid.gallery.openset import Decision
from fieldreid.verify.fuse import Fusion, fit_fusion

MODEL = "m"


def _cosine_fit(coef=(-12.0, 14.0), k: int = 5) -> Fusion:
    return Fusion(tuple(coef), False, "", k, 100, 20)


# ------------------------------------------------------------------------------------------ the stored fit
def test_a_fused_fit_carries_its_cosine_only_fallback_through_storage():
    cos = _cosine_fit()
    fused = Fusion((-6.0, 4.0, 1.5), True, "rootsift", 20, 400, 50, True, {"threshold": 0.5}, cos)
    back = Fusion.from_dict(json.loads(json.dumps(fused.to_dict())))
    assert back == fused and back.for_cosine() == cos and cos.for_cosine() is cos
    assert back.cosine_only.probability([0.9])[0] == pytest.approx(cos.probability([0.9])[0])
    # a fit stored before there was a fallback: unverified crops get no probability from it
    old = {k: v for k, v in fused.to_dict().items() if k != "cosine_only"}
    assert Fusion.from_dict(old).for_cosine() is None
    with pytest.raises(InputError, match="without inlier counts"):
        Fusion((-6.0, 4.0, 1.5), True, cosine_only=fused)
    with pytest.raises(InputError, match="cosine-only fit is malformed"):
        Fusion.from_dict({**fused.to_dict(), "cosine_only": [1, 2]})


def test_calibrate_cosine_fits_the_best_candidate_of_the_open_set_simulations_and_holds_on_held_out_animals():
    from fieldreid.evaluation.metrics import open_set_split

    vec, lab = clusters(16, 4, dim=32, noise=0.25, seed=3)
    fit = calibrate_cosine(vec, lab, unknown_fraction=0.3, enrol_fraction=0.5, seed=0, repeats=5)
    # the same fit by hand: in each simulation, every query's best gallery image, right or not
    cos, right = [], []
    for s in range(5):
        split = open_set_split(lab, 0.3, 0.5, s)
        q = np.r_[split.known_queries, split.unknown_queries].astype(int)
        sim = vec[q] @ vec[split.gallery].T
        best = np.argmax(sim, axis=1)
        cos += sim[np.arange(len(q)), best].tolist()
        right += (lab[split.gallery][best] == lab[q]).tolist()
    manual = fit_fusion(cos, None, right)
    assert fit.coef == pytest.approx(manual.coef, rel=1e-6) and not fit.uses_inliers and fit.k == 1
    assert (fit.n_pairs, fit.n_positive) == (len(cos), sum(right)) and fit.pays is None
    assert fit.coef[1] > 0  # higher cosine, higher probability
    e = fit.evidence
    assert (e["n_identities"], e["unknown_fraction"], e["repeats"]) == (16, 0.3, 5)
    # on animals it was not fitted on, the mean probability of the best candidate is how often it is right,
    # and the probability tells right from wrong better than a constant would (Brier < p(1 - p))
    assert 0.2 < e["top1_observed"] < 0.9 and abs(e["top1_predicted"] - e["top1_observed"]) < 0.05
    assert e["top1_brier"] < e["top1_observed"] * (1 - e["top1_observed"])
    with pytest.raises(InputError, match="same and of different animals"):
        calibrate_cosine(unit(np.eye(5)), ["a", "b", "c", "d", "e"])  # one image per animal: never right


# ------------------------------------------------------------------------------------------ decisions
@pytest.fixture
def gallery(tmp_path):
    vec, lab = clusters(6, 3, dim=16, noise=0.3, seed=1)
    with Gallery(tmp_path / "g.db", synchronous="NORMAL") as g:
        g.add_embeddings([f"zebra-{x}" for x in lab], vec, MODEL, [f"lab/{i}.jpg" for i in range(len(lab))],
                         species="zebra")
        g.set_thresholds("zebra", MODEL, upper=0.9, lower=0.75, method="test")
        yield g


def _queries(seed: int = 7) -> np.ndarray:
    """Crops near the enrolled animals at several distances, and strangers."""
    vec, _ = clusters(6, 3, dim=16, noise=0.3, seed=1)
    rng = np.random.default_rng(seed)
    near = [unit(vec[i] + s * rng.normal(size=16)) for i in range(0, 18, 3) for s in (0.05, 0.3, 0.6)]
    return np.stack(near + list(unit(rng.normal(size=(4, 16)))))


def test_without_a_calibration_there_is_no_probability(gallery):
    ds = Identifier(gallery).identify(_queries(), MODEL, sources=[f"q{i}" for i in range(22)])
    assert {d.decision for d in ds} == {"known", "uncertain", "new"}
    assert all(d.probability is None and d.probability_source is None and d.top_probability == [] for d in ds)
    assert all(r["probability"] is None and r["probability_source"] is None for r in gallery.sightings())
    assert all(t["probability"] is None for d in ds for t in d.to_dict()["top"])


def test_decisions_take_the_stored_cosine_fit_known_its_probability_new_one_minus_it(gallery):
    fit = _cosine_fit()
    gallery.set_fusion("zebra", MODEL, fit.to_dict())
    ds = Identifier(gallery).identify(_queries(), MODEL, sources=[f"q{i}" for i in range(22)])
    kinds = {d.decision for d in ds}
    assert kinds == {"known", "uncertain", "new"}
    for d in ds:
        p_best = float(fit.probability([d.score])[0])
        want = 1.0 - p_best if d.decision == "new" else p_best
        assert d.probability == pytest.approx(want) and d.probability_source == "cosine", d
        assert d.top_probability == pytest.approx([float(v) for v in fit.probability([s for _, s in d.top])])
    # monotone: the higher the score of the named animal, the higher its probability
    named = sorted((d.score, d.probability) for d in ds if d.decision != "new")
    assert all(b[1] >= a[1] for a, b in zip(named, named[1:], strict=False))
    rows = {r["image"]: r for r in gallery.sightings()}
    for d in ds:
        assert rows[d.source]["probability"] == pytest.approx(d.probability)
        assert rows[d.source]["probability_source"] == "cosine"
    top = ds[0].to_dict()["top"]
    assert top[0]["probability"] == pytest.approx(ds[0].top_probability[0], abs=1e-6)


def test_a_species_with_a_calibration_but_no_animals_gives_a_certain_new_one(gallery):
    gallery.set_fusion("lynx", MODEL, _cosine_fit().to_dict())
    [d] = Identifier(gallery, species="lynx", record=False).identify(_queries()[:1], MODEL)
    assert (d.decision, d.score, d.probability, d.probability_source) == ("new", None, 1.0, "cosine")


def test_reassigned_decision_takes_the_probability_of_its_new_candidate():
    base = Decision(decision="known", identity="Z1", score=0.95, runner_up="Z3", runner_up_score=0.85, upper=0.9,
                    lower=0.6, calibrated=True, threshold_method="t", model_id=MODEL, gallery_version=1,
                    species="zebra", top=[("Z1", 0.95), ("Z3", 0.85), ("Z2", 0.5)], probability=0.97,
                    probability_source="cosine", top_probability=[0.97, 0.7, 0.1])
    moved = base.reassigned(("Z3", 0.85))
    assert (moved.decision, moved.identity, moved.score, moved.probability) == ("uncertain", "Z3", 0.85, 0.7)
    gone = base.reassigned(("Z2", 0.5))  # below the lower threshold: a new animal
    assert (gone.decision, gone.identity, gone.score) == ("new", None, 0.5)
    assert gone.probability == pytest.approx(0.9)
    none_left = base.reassigned(None)
    assert none_left.decision == "new" and none_left.probability == pytest.approx(0.9)  # bounded by the last listed
    plain = Decision(**{**base.__dict__, "probability": None, "probability_source": None, "top_probability": []})
    assert plain.reassigned(("Z3", 0.85)).probability is None


def test_two_tracks_of_one_frame_the_second_gets_its_alternatives_probability():
    from fieldreid.watch.events import Sighting, Track, exclusive_identities

    def track(name, idx):
        t = Track()
        t.add(Sighting(name, idx, (1.0, name), 0.8, unit(np.ones(8)), (0.0, 0.0, 10.0, 10.0), name, (100, 100)))
        return t

    t1, t2 = track("f1.jpg", 0), track("f1.jpg", 1)
    common = dict(runner_up=None, runner_up_score=None, upper=0.9, lower=0.6, calibrated=True, threshold_method="t",
                  model_id=MODEL, gallery_version=1, species="zebra", probability_source="cosine")
    d1 = Decision(decision="known", identity="Z1", score=0.95, top=[("Z1", 0.95)], probability=0.97,
                  top_probability=[0.97], **common)
    d2 = Decision(decision="known", identity="Z1", score=0.93, top=[("Z1", 0.93), ("Z3", 0.91)], probability=0.95,
                  top_probability=[0.95, 0.93], **common)
    out = exclusive_identities([t1, t2], [d1, d2])
    assert (out[0].identity, out[0].probability) == ("Z1", 0.97)
    assert (out[1].decision, out[1].identity, out[1].probability) == ("known", "Z3", 0.93)


# ------------------------------------------------------------------------------------------ verification
@pytest.fixture(scope="module")
def coats(tmp_path_factory):
    """Six animals told apart only by their coat (the tiny embedder sees mean colour), two photos each enrolled
    with local features, and one more photo of each to identify."""
    from fieldreid.embed.runtime import Embedder
    from fieldreid.gallery.enroll import Item

    root = tmp_path_factory.mktemp("probability_coats")
    items, queries = [], []
    for i in range(6):
        for j in range(3):
            p = root / f"a{i}" / f"{j}.png"
            p.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(p), photo(coat(400 + i), 50 * i + j))
            (queries if j == 2 else items).append(Item(p, f"a{i}", "zebra"))
    return root, items, queries, Embedder(tiny_embedder_onnx(root / "tiny.onnx"))


def test_verified_decisions_take_the_fused_probability_and_unverified_ones_the_fallback(coats, tmp_path):
    from fieldreid.gallery.enroll import embed_items, enroll
    from fieldreid.verify.features import KIND, features_of

    root, items, queries, emb = coats
    cos_fit = _cosine_fit((-20.0, 20.0), k=8)
    fused = Fusion((-4.0, 1.0, 2.0), True, KIND, 8, 100, 20, True, {"threshold": 0.5}, cos_fit)
    with Gallery(tmp_path / "g.db") as g:
        enroll(items, g, emb, None, crops=True, features=True)
        q = embed_items(queries, emb, None, crops=True)
        qf = [features_of(it.path) for it in q.items]
        ident = Identifier(g, create_provisional=False, record=False)
        g.set_fusion("zebra", emb.model_id, fused.to_dict())
        ds = ident.identify(q.vectors, emb.model_id, query_features=[*qf[:-1], None])
        for d in ds[:-1]:  # verified: the fused probability is what decided
            assert d.probability_source == "fused" and d.threshold_method.startswith("fused probability")
            want = d.score if d.decision != "new" else 1.0 - d.score
            assert d.probability == pytest.approx(want) and d.top_probability[0] == pytest.approx(d.score)
        last = ds[-1]  # no features for this crop: the cosine decides, and the fallback gives its probability
        assert last.probability_source == "cosine" and not last.threshold_method.startswith("fused")
        p = float(cos_fit.probability([last.score])[0])
        assert last.probability == pytest.approx(1.0 - p if last.decision == "new" else p)
        # verification does not pay for the species: every crop is decided and given a probability by the cosine
        g.set_fusion("zebra", emb.model_id, {**fused.to_dict(), "pays": False})
        assert {d.probability_source for d in ident.identify(q.vectors, emb.model_id, query_features=qf)} == {"cosine"}
        # a fused fit stored before the fallback existed: verified crops have a probability, the rest none
        g.set_fusion("zebra", emb.model_id, {**fused.to_dict(), "cosine_only": None})
        ds = ident.identify(q.vectors, emb.model_id, query_features=[*qf[:-1], None])
        assert [d.probability_source for d in ds] == ["fused"] * (len(ds) - 1) + [None]
        assert ds[-1].probability is None


def test_a_query_below_the_fusion_floor_is_not_matched_and_its_features_are_never_extracted(coats, tmp_path):
    from fieldreid.gallery.enroll import embed_items, enroll
    from fieldreid.verify.features import KIND, features_of

    root, items, queries, emb = coats
    with Gallery(tmp_path / "g.db") as g:
        enroll(items, g, emb, None, crops=True, features=True)
        q = embed_items(queries, emb, None, crops=True)
        ident = Identifier(g, create_provisional=False, record=False)
        plain = ident.identify(q.vectors, emb.model_id)  # no fusion stored yet: the cosine decides
        calls = []

        def lazy(path):
            def extract(max_keypoints):
                calls.append(path)
                return features_of(path, max_keypoints=max_keypoints)
            return extract

        def decide(floor):
            fused = Fusion((-4.0, 1.0, 2.0), True, KIND, 8, 100, 20, True, {"threshold": 0.5},
                           _cosine_fit((-20.0, 20.0), k=8), floor)
            g.set_fusion("zebra", emb.model_id, fused.to_dict())
            calls.clear()
            return ident.identify(q.vectors, emb.model_id, query_features=[lazy(it.path) for it in q.items]), fused

        ds, _ = decide(-1.0)  # every query above the floor: each crop extracted once and matched
        assert sorted(calls) == sorted(it.path for it in q.items)
        assert all(d.threshold_method == "fused probability, verification K=8" for d in ds)
        ds, fused = decide(1.01)  # every query below it: nothing extracted, zero inliers on the same fused scale
        assert calls == []
        for d, c in zip(ds, plain, strict=True):
            assert d.probability_source == "fused" and "below its floor 1.010: not matched" in d.threshold_method
            assert d.score == pytest.approx(float(fused.probability([c.score], [0])[0]))
            assert d.decision == ("known" if d.score >= 0.5 else "new")


# ------------------------------------------------------------------------------------------ storage
def _v5_gallery(path: Path) -> None:
    """A gallery as schema 5 wrote it, with one sighting."""
    con = sqlite3.connect(path, isolation_level=None)
    for version in range(5):
        for step in gallery_schema.MIGRATIONS[version]:
            step(con) if callable(step) else con.execute(step)
    con.execute("PRAGMA user_version = 5")
    con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("version", "0"), ("structure", "0"), ("storage", "float32"), ("created", "x")])
    con.execute("INSERT INTO sightings (image, box, decision, identity_id, score, upper, lower, threshold_method, "
                "model_id, gallery_version, created, source_sha256) VALUES ('cam/a.jpg', '', 'known', 'z-1', 0.93, "
                f"0.9, 0.7, 't', 'm', 1, 'x', '{'ab' * 32}')")
    con.close()


def test_a_v5_gallery_migrates_its_old_sightings_keep_no_probability_and_new_ones_store_it(tmp_path):
    _v5_gallery(tmp_path / "old.db")
    with Gallery(tmp_path / "old.db") as g:
        assert g.schema_version == gallery_schema.SCHEMA_VERSION == 6
        [old] = g.sightings()
        assert (old["score"], old["probability"], old["probability_source"]) == (0.93, None, None)
        row = {"image": "cam/b.jpg", "box": None, "decision": "new", "identity_id": "z-P0001", "score": 0.4,
               "upper": 0.9, "lower": 0.7, "threshold_method": "t", "model_id": "m", "gallery_version": 1,
               "probability": 0.82, "probability_source": "cosine"}
        g.add_sightings([row])
        assert [(s["probability"], s["probability_source"]) for s in g.sightings()] == [(None, None), (0.82, "cosine")]
        for bad in (1.5, -0.1, math.nan):
            with pytest.raises(InputError, match=r"probability must lie in \[0, 1\]"):
                g.add_sightings([{**row, "image": "cam/c.jpg", "probability": bad}])
        assert g.count_sightings() == 2


def test_results_decided_before_probabilities_still_report_and_migrate(tmp_path):
    from fieldreid.report.tables import SIGHTING_COLUMNS, read_csv, write_sightings_csv
    from fieldreid.watch import state as results

    path = tmp_path / "results.db"
    con = sqlite3.connect(path, isolation_level=None)
    for stmt in results.MIGRATIONS[0]:
        con.execute(stmt)
    con.execute("PRAGMA user_version = 1")
    con.execute("INSERT INTO images (sha256, path, camera, captured, captured_ts, time_source, width, height, "
                "event_id, processed) VALUES ('s1', 'cam/a.jpg', 'cam', '2024-01-01T10:00:00', 0, 'exif', 100, 100, 1, 0)")
    con.execute("INSERT INTO detections VALUES ('s1', 0, 1, 0.8, 0, 0, 50, 50, ?, NULL)",
                (np.ones(4, np.float16).tobytes(),))
    con.execute("INSERT INTO decisions (sha256, idx, event_id, track, n_frames, decision, identity, score, upper, "
                "lower, calibrated, threshold_method, model_id, gallery_version, species, top, representative, "
                "decided) VALUES ('s1', 0, 1, 0, 1, 'known', 'z-1', 0.93, 0.9, 0.7, 1, 't', 'm', 1, 'zebra', '[]', 1, 0)")
    con.close()
    db = results.StateDB(path, readonly=True)  # a report reads it as it is
    try:
        write_sightings_csv(db.con, tmp_path / "s.csv")
    finally:
        db.close()
    [row] = read_csv(tmp_path / "s.csv")
    assert list(row) == SIGHTING_COLUMNS and SIGHTING_COLUMNS[-1] == "probability"
    assert (row["score"], row["probability"]) == ("0.93", "")
    db = results.StateDB(path)  # a watch writing to it again migrates it
    try:
        assert db.con.execute("SELECT probability, probability_source FROM decisions").fetchall() == [(None, None)]
    finally:
        db.close()


# ------------------------------------------------------------------------------------------ the CLI
OLD_CSV_COLUMNS = ["file", "box", "decision", "identity", "score", "runner_up", "runner_up_score", "upper", "lower",
                   "calibrated", "threshold_method", "threshold_source", "species", "model_id", "gallery_version",
                   "top5", "sighting_id", "error"]


def test_calibrate_stores_a_cosine_fit_verify_keeps_it_inside_and_identify_writes_the_probability(tmp_path):
    from fieldreid.cli.app import app

    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    data = coats_dataset(tmp_path / "data")
    model = tiny_embedder_onnx(tmp_path / "tiny.onnx")
    g = tmp_path / "g.db"
    run("enroll", data, "--gallery", g, "--crops", "--embedder", model, "--no-features")
    assert "zebra: match probability fitted on" in run("calibrate", data, "--gallery", g, "--crops", "--embedder",
                                                        model)
    with Gallery(g) as gal:
        plain = Fusion.from_dict(gal.fusion("zebra", "tiny-embedder-v1"))
    assert not plain.uses_inliers and plain.k == 1 and plain.pays is None
    q = tmp_path / "q"
    q.mkdir()
    for i in range(8):
        cv2.imwrite(str(q / f"{i}.png"), photo(coat(200 + i), 999 + i))
    run("identify", q, "--gallery", g, "--crops", "--embedder", model, "--out", tmp_path / "d.csv", "--no-record")
    with (tmp_path / "d.csv").open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*OLD_CSV_COLUMNS, "probability", "probability_source"]  # appended: old readers keep working
    rows = list(csv.DictReader((tmp_path / "d.csv").open(encoding="utf-8")))
    run("identify", q, "--gallery", g, "--crops", "--embedder", model, "--out", tmp_path / "d.json", "--no-record")
    decisions = json.loads((tmp_path / "d.json").read_text())["decisions"]
    assert len(rows) == len(decisions) == 8
    for r, d in zip(rows, decisions, strict=True):
        p = float(plain.probability([d["score"]])[0])
        assert d["probability"] == pytest.approx(1.0 - p if d["decision"] == "new" else p)
        assert (r["probability"], r["probability_source"]) == (f"{d['probability']:.6f}", "cosine")
    # --verify: the fused fit is stored with the same cosine-only fit inside it
    run("calibrate", data, "--gallery", g, "--crops", "--embedder", model, "--verify", "--verify-k", 8)
    with Gallery(g) as gal:
        fused = Fusion.from_dict(gal.fusion("zebra", "tiny-embedder-v1"))
    assert fused.uses_inliers and fused.cosine_only == plain
    # calibrating again without --verify refits the cosine part and keeps verification as it was
    assert "is kept" in run("calibrate", data, "--gallery", g, "--crops", "--embedder", model)
    with Gallery(g) as gal:
        again = Fusion.from_dict(gal.fusion("zebra", "tiny-embedder-v1"))
    assert again.uses_inliers and again.coef == fused.coef and again.cosine_only == plain
    assert "probability" in run("gallery", "info", "--gallery", g)


# ------------------------------------------------------------------------------------------ end to end
def test_calibrate_then_watch_gives_each_track_one_probability_that_reaches_the_camtrap_dp_export(
        tmp_path_factory, tmp_path, zebra, camtrap, yolov5n_onnx, default_embedder_onnx):
    """Real photos and models: the review build's gallery (six zebras) calibrated by `fieldreid calibrate`, a
    fresh `watch --once` over its camera folders, then `fieldreid report --camtrap-dp`, validated offline."""
    import camtrapdp_validate
    from review_support import built, fieldreid, fresh_copy

    from fieldreid.report.camtrapdp import _num

    base = built(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx)
    _, g = fresh_copy(base, tmp_path / "copy")
    models = ["--detector", yolov5n_onnx, "--embedder", default_embedder_onnx, "--backend", "onnxruntime"]
    r = fieldreid("calibrate", base / "enrol.csv", "--split", "database", "--crops", "--gallery", g, *models)
    assert "plains_zebra: match probability fitted on" in r.stderr
    with Gallery(g) as gal:
        fit = Fusion.from_dict(gal.fusion("plains_zebra", gal.model_id))
    out = tmp_path / "out"
    fieldreid("watch", base / "cards", "--gallery", g, "--out", out, "--once", "--settle", "0", "--threads", "2",
              "--conf", "0.3", *models)
    con = sqlite3.connect(out / "results.db")
    rows = con.execute("SELECT event_id, track, decision, score, probability, probability_source FROM decisions"
                       ).fetchall()
    con.close()
    assert {r[2] for r in rows} >= {"known", "new"}
    per_track: dict = {}
    for event, track, decision, score, prob, source in rows:
        per_track.setdefault((event, track), set()).add((decision, score, prob, source))
    assert all(len(v) == 1 for v in per_track.values())  # one probability per track, not per frame
    for [(decision, score, prob, source)] in map(list, per_track.values()):
        if source is None:  # a species the gallery holds no calibration for (none searched: no candidate)
            assert prob is None
            continue
        p = float(fit.probability([score])[0]) if score is not None else 0.0
        assert source == "cosine" and prob == pytest.approx(1.0 - p if decision == "new" else p)
    # the review app's queue shows each track's probability beside its score
    from fieldreid.review.queue import Filters, ReviewSource

    with Gallery(g, create=False) as gal:
        src = ReviewSource(out, gal)
        try:
            items = src.queue(Filters(status="all"))
        finally:
            src.close()
    want = {f"{event}-{track}": next(iter(v))[2] for (event, track), v in per_track.items()}
    assert items and all(it["probability"] == want[it["key"]] for it in items)
    # the HTML page shows each new or uncertain animal's probability beside its score
    fieldreid("report", out, "--html", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    shown = [v for (d, _s, v, _src) in (next(iter(t)) for t in per_track.values()) if d != "known" and v is not None]
    assert shown and all(f"{v:.3f}" in page for v in shown) and "probability of a new animal" in page
    pkg = tmp_path / "pkg"
    (tmp_path / "deployments.csv").write_text("deploymentID,latitude,longitude\nzebra-cam,-1.29,36.82\n"
                                              "southwest,34.05,-111.9\n", encoding="utf-8")
    fieldreid("report", out, "--camtrap-dp", pkg, "--deployments", tmp_path / "deployments.csv")
    if camtrapdp_validate.available():  # the standard's own profile and table schemas, read offline
        assert camtrapdp_validate.validate(pkg) == ([], [])
    obs = list(csv.DictReader((pkg / "observations.csv").open(encoding="utf-8")))
    con = sqlite3.connect(out / "results.db")
    by_obs = {f"{sha[:20]}_{idx}": (decision, prob) for sha, idx, decision, prob in con.execute(
        "SELECT sha256, idx, decision, probability FROM decisions")}
    con.close()
    media = [o for o in obs if o["observationLevel"] == "media" and o["observationID"] in by_obs]
    assert sum(bool(o["classificationProbability"]) for o in media) >= 3
    for o in media:
        decision, prob = by_obs[o["observationID"]]
        named = decision in ("known", "new") and prob is not None
        assert o["classificationProbability"] == (_num(prob, 4) if named else ""), o
    events = [o for o in obs if o["observationLevel"] == "event" and o["individualID"]]
    assert any(e["classificationProbability"] for e in events)
    for e in events:  # an event's individual: the best of its tracks' probabilities
        mine = [float(o["classificationProbability"]) for o in media if o["eventID"] == e["eventID"]
                and o["individualID"] == e["individualID"] and o["classificationProbability"]]
        assert e["classificationProbability"] == (_num(max(mine), 4) if mine else "")


def test_watch_matches_locally_only_the_tracks_above_the_fusion_floor(tmp_path_factory, tmp_path, zebra, camtrap,
                                                                     yolov5n_onnx, default_embedder_onnx):
    """Real photos and models: with a fusion that pays stored in the gallery, `watch --once` extracts and
    matches local features for every track above its floor (floor -1: all) and for none below it (floor
    1.01), which decide on the fused probability with zero inliers; the status line counts them."""
    from review_support import built, fieldreid, fresh_copy

    from fieldreid.verify.features import KIND

    base = built(tmp_path_factory, zebra, camtrap, yolov5n_onnx, default_embedder_onnx)
    models = ["--detector", yolov5n_onnx, "--embedder", default_embedder_onnx, "--backend", "onnxruntime"]
    seen = {}
    for floor in (-1.0, 1.01):
        _, g = fresh_copy(base, tmp_path / f"copy{floor}")
        with Gallery(g) as gal:
            fused = Fusion((-6.0, 4.0, 1.5), True, KIND, 8, 400, 50, True, {"threshold": 0.5},
                           _cosine_fit((-20.0, 20.0), k=8), floor)
            for sp in gal.species():
                gal.set_fusion(sp, gal.model_id, fused.to_dict())
        out = tmp_path / f"out{floor}"
        r = fieldreid("watch", base / "cards", "--gallery", g, "--out", out, "--once", "--settle", "0",
                      "--threads", "2", "--conf", "0.3", *models)
        con = sqlite3.connect(out / "results.db")
        tracks = con.execute("SELECT DISTINCT event_id, track, threshold_method, probability_source FROM decisions "
                             "WHERE representative = 1").fetchall()
        con.close()
        searched = [t for t in tracks if t[3] is not None]  # tracks with gallery candidates in a fused species
        assert searched and all(t[3] == "fused" for t in searched)
        seen[floor] = (int(re.findall(r"(\d+) track\(s\) matched locally", r.stdout + r.stderr)[-1]),
                       len(searched), {t[2] for t in searched})
    n_all, tracks_all, methods_all = seen[-1.0]
    n_none, tracks_none, methods_none = seen[1.01]
    assert n_all == tracks_all and methods_all == {"fused probability, verification K=8"}
    assert n_none == 0 and all("below its floor 1.010: not matched" in m for m in methods_none)
