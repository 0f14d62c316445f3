"""The gallery commands end to end through typer, with a tiny real ONNX embedder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from test_gallery_enroll import make_dataset
from test_gallery_helpers import tiny_embedder_onnx, write_image
from typer.testing import CliRunner

from fieldreid.cli.gallery import register
from fieldreid.gallery import Gallery


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """test app"""

    register(app)
    return app


def run(app, *args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def test_enroll_calibrate_identify_eval_and_curate(tmp_path, app):
    csv = make_dataset(tmp_path / "data", n_ids=6, per_id=4)
    model = tiny_embedder_onnx(tmp_path / "tiny.onnx", "tiny-a")
    g = tmp_path / "g.db"

    r = run(app, "enroll", csv, "--gallery", g, "--split", "database", "--crops", "--embedder", model)
    assert r.exit_code == 0, r.output
    assert "18 embeddings added" in r.output and "2 failed" in r.output and "missing.png" in r.output

    r = run(app, "calibrate", csv, "--gallery", g, "--crops", "--embedder", model, "--target-far", "0.05",
            "--repeats", "2")
    assert r.exit_code == 0, r.output
    with Gallery(g) as gal:
        th = gal.thresholds("zebra", "tiny-a")
        assert th is not None and th.lower <= th.upper

    # queries of known animals, one animal the gallery has never seen, twice
    qdir = tmp_path / "data/images/query"
    write_image(tmp_path / "new/a.png", (128, 128, 128), jitter=3, seed=1)
    write_image(tmp_path / "new/b.png", (128, 128, 128), jitter=3, seed=2)
    # --no-record is a dry run: an animal never seen is decided "new" but nothing lands in the gallery
    with Gallery(g) as gal:
        before = ({i.id for i in gal.identities()}, gal.count_sightings(), gal.count_embeddings())
    r = run(app, "identify", tmp_path / "new", "--gallery", g, "--crops", "--embedder", model, "--out",
            tmp_path / "dry.json", "--no-record")
    assert r.exit_code == 0, r.output
    ds = json.loads((tmp_path / "dry.json").read_text())["decisions"]
    assert [(d["decision"], d["identity"], d["created_identity"]) for d in ds] == [("new", None, False)] * 2
    with Gallery(g) as gal:
        assert ({i.id for i in gal.identities()}, gal.count_sightings(), gal.count_embeddings()) == before
    r = run(app, "identify", tmp_path / "new", "--gallery", g, "--crops", "--embedder", model, "--out",
            tmp_path / "dry.json", "--no-record", "--new-identities")
    assert r.exit_code != 0 and "--no-record writes nothing" in r.output
    out = tmp_path / "decisions.json"
    r = run(app, "identify", qdir, tmp_path / "new", "--gallery", g, "--crops", "--embedder", model, "--out", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    by_file = {d["source"].split("/")[-2] + "/" + d["source"].split("/")[-1]: d for d in doc["decisions"]}
    for i in range(6):
        d = by_file[f"z{i}/3.png"]
        assert (d["decision"], d["identity"]) == ("known", f"z{i}") and d["calibrated"]
        assert len(d["top"]) == 5 and d["runner_up"] and d["model_id"] == "tiny-a"
    assert by_file["new/a.png"]["decision"] == "new" and by_file["new/a.png"]["identity"] == "zebra-P0001"
    assert by_file["new/b.png"]["identity"] == "zebra-P0001" and by_file["new/b.png"]["decision"] == "known"

    csv_out = tmp_path / "decisions.csv"
    r = run(app, "identify", tmp_path / "new", "--gallery", g, "--crops", "--embedder", model, "--out", csv_out,
            "--no-record")
    assert r.exit_code == 0, r.output
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("file,box,decision,identity,score,runner_up") and len(lines) == 3


    r = run(app, "eval", csv, "--crops", "--json", "--embedder", model)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["one_vs_all"]["top1"] == 1.0 and res["model_id"] == "tiny-a" and res["n_images_failed"] == 2
    assert res["open_set"]["best"]["geometric_mean"] == 1.0

    # (rich tables wrap at the test terminal's width: check the effects through the API)
    r = run(app, "gallery", "list", "--gallery", g)
    assert r.exit_code == 0 and "identities" in r.output
    with Gallery(g) as gal:
        assert gal.get_identity("zebra-P0001").status == "provisional"
    r = run(app, "gallery", "confirm", "zebra-P0001", "--as", "zebra-0007", "--gallery", g, "--who", "ana")
    assert r.exit_code == 0, r.output
    r = run(app, "gallery", "merge", "z5", "--into", "z4", "--gallery", g)
    assert r.exit_code == 0, r.output
    r = run(app, "gallery", "show", "z4", "--gallery", g)
    assert r.exit_code == 0 and "embeddings" in r.output
    r = run(app, "gallery", "delete", "z0", "--gallery", g, "--yes")
    assert r.exit_code == 0, r.output
    r = run(app, "gallery", "split", "z4", "1", "--gallery", g)
    assert r.exit_code == 2 and "not its embeddings" in r.output
    assert run(app, "gallery", "log", "--gallery", g).exit_code == 0
    assert run(app, "gallery", "info", "--gallery", g).exit_code == 0
    with Gallery(g) as gal:
        z7 = gal.get_identity("zebra-0007")
        assert z7.status == "confirmed" and z7.n_embeddings == 1
        assert gal.get_identity("z4").n_embeddings == 6 and not gal.has_identity("z5") and not gal.has_identity("z0")
        log = gal.log()
        actions = [c.action for c in log]
        for action in ("delete", "merge", "confirm", "rename", "thresholds", "create-provisional", "enrol"):
            assert action in actions
        assert next(c for c in log if c.action == "confirm").who == "ana"


def test_cli_errors_are_one_line(tmp_path, app):
    csv = make_dataset(tmp_path / "data", n_ids=3, per_id=3)
    a = tiny_embedder_onnx(tmp_path / "a.onnx", "tiny-a")
    b = tiny_embedder_onnx(tmp_path / "b.onnx", "tiny-b", seed=3)
    g = tmp_path / "g.db"
    assert run(app, "enroll", csv, "--gallery", g, "--crops", "--embedder", a).exit_code == 0
    r = run(app, "identify", tmp_path / "data/images", "--gallery", g, "--crops", "--embedder", b, "--out",
            tmp_path / "d.csv")
    assert r.exit_code == 2 and "tiny-a" in r.output and "--reembed" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "d.csv").exists()
    r = run(app, "identify", tmp_path / "data/images", "--gallery", tmp_path / "nope.db", "--crops", "--embedder", a)
    assert r.exit_code == 2 and "No gallery" in r.output
    # a path longer than any terminal: the error must still be one line (rich wraps at 80 columns otherwise)
    deep = tmp_path / ("camera-trap-season-2024-" * 5) / "gallery"
    deep.mkdir(parents=True)
    junk = deep / "junk.db"
    junk.write_bytes(b"junk" * 100)
    assert len(str(junk)) > 120
    r = run(app, "gallery", "list", "--gallery", junk)
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{junk} is not a fieldreid gallery" in lines[0]
    r = run(app, "enroll", csv, "--gallery", g, "--crops", "--embedder", b, "--reembed")
    assert r.exit_code == 0, r.output
    with Gallery(g) as gal:
        assert gal.model_id == "tiny-b"


def test_gallery_show_and_log_of_one_identity_skip_similar_ids(tmp_path, app):
    """Defect: `gallery show nyala-1` / `gallery log --identity nyala-1` also listed nyala-10's history."""
    import numpy as np

    g = tmp_path / "g.db"
    vec = np.eye(3, 8, dtype=np.float32)
    with Gallery(g) as gal:
        gal.add_embeddings(["nyala-1", "nyala-10", "nyala-11"], vec, "m", ["a.jpg", "b.jpg", "c.jpg"],
                           species="nyala")
        gal.merge(["nyala-11"], "nyala-10")
        gal.rename("nyala-10", name="Ten")
        gal.rename("nyala-1", name="One")
    r = run(app, "gallery", "show", "nyala-1", "--gallery", g)
    assert r.exit_code == 0, r.output
    history = [line.split()[2] for line in r.output.splitlines() if line.startswith("  ") and ": " in line]
    assert history == ["rename", "enrol"], r.output
    assert "merge" not in r.output and "Ten" not in r.output
    r = run(app, "gallery", "log", "--identity", "nyala-1", "--gallery", g)
    assert r.exit_code == 0 and "merge" not in r.output and "Ten" not in r.output and "One" in r.output, r.output


def test_cli_error_is_one_line_in_a_narrow_terminal(tmp_path):
    """The real entry point, as a user's shell runs it, with COLUMNS=40 and a path longer than 100 characters."""
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4)
    deep.mkdir()
    junk = deep / "junk.db"
    junk.write_bytes(b"junk" * 100)
    assert len(str(junk)) > 100
    env = {**os.environ, "COLUMNS": "40", "LINES": "10", "TERM": "dumb"}
    p = subprocess.run([sys.executable, "-m", "fieldreid.cli", "gallery", "list", "--gallery", str(junk)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    assert f"{junk} is not a fieldreid gallery" in p.stderr


@pytest.mark.slow
def test_eval_zebra_with_the_default_embedder(app, tmp_path, zebra, default_embedder_onnx):
    out = tmp_path / "zebra.json"
    r = run(app, "eval", zebra / "metadata.csv", "--crops", "--json", "--out", out,
            "--embedder", default_embedder_onnx)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    ova = res["one_vs_all"]
    assert ova["n_images"] == 362 and ova["n_identities"] == 35 and res["n_images_failed"] == 0
    # near-duplicate frames: even an ImageNet embedder finds most animals (a sanity floor, not a benchmark)
    assert ova["top1"] > 0.6 and ova["top5"] >= ova["top1"] and 0 < ova["mAP"] <= 1
    best = res["open_set"]["best"]
    assert 0 <= best["BAUS"] <= 1 and best["geometric_mean"] > 0
