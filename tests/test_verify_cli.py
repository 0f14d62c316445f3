"""``fieldreid verify`` and ``fieldreid eval --verify`` end to end through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
from test_gallery_helpers import tiny_embedder_onnx
from test_verify import coat, photo
from typer.testing import CliRunner

from fieldreid.cli.app import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_verify_draws_inlier_lines_and_counts_them(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    cv2.imwrite(str(a), photo(coat(7), 1))
    cv2.imwrite(str(b), photo(coat(7), 2))
    cv2.imwrite(str(c), photo(coat(8), 3))
    model = tiny_embedder_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "pair.jpg"
    r = run("verify", a, b, "--out", out, "--embedder", model, "--keypoints", 300)
    assert r.exit_code == 0, r.output
    same = int(r.output.split(" inlier matches")[0].split()[-1])
    assert "cosine" in r.output
    pic = cv2.imread(str(out))
    assert pic is not None and pic.shape[1] == 768
    r = run("verify", a, c, "--embedder", model, "--keypoints", 300)
    assert r.exit_code == 0, r.output
    other = int(r.output.split(" inlier matches")[0].split()[-1])
    assert same >= 3 * max(other, 10)


def test_verify_bad_inputs_are_one_line_errors(tmp_path):
    a = tmp_path / "a.png"
    cv2.imwrite(str(a), coat(1))
    r = run("verify", a, a, "--out", tmp_path / "pair.gif")
    assert r.exit_code == 2 and "--out must end in" in r.output and len(r.output.strip().splitlines()) == 1
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    r = run("verify", a, broken, "--out", tmp_path / "p.jpg")
    assert r.exit_code == 2 and "broken.jpg" in r.output
    assert not (tmp_path / "p.jpg").exists()


def coats_dataset(root, n_ids=8, per_id=3):
    rows = ["image_id,identity,path,species,split"]
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n_ids):
        for j in range(per_id):
            rel = f"img/{i}_{j}.png"
            cv2.imwrite(str(root / rel), photo(coat(200 + i), 10 * i + j))
            rows.append(f"{i}-{j},animal{i},{rel},zebra,all")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root / "metadata.csv"


def test_enroll_calibrate_verify_then_identify_decides_on_the_fused_probability(tmp_path):
    csv = coats_dataset(tmp_path / "data", n_ids=10)
    model = tiny_embedder_onnx(tmp_path / "tiny.onnx")
    g = tmp_path / "g.db"
    r = run("enroll", csv, "--gallery", g, "--crops", "--embedder", model)
    assert r.exit_code == 0, r.output
    assert "local features stored for 30 gallery image(s)" in r.output
    r = run("calibrate", csv, "--gallery", g, "--crops", "--embedder", model, "--verify", "--verify-k", 8)
    assert r.exit_code == 0, r.output
    assert "zebra: verification pays" in r.output
    r = run("gallery", "info", "--gallery", g)
    assert r.exit_code == 0, r.output
    assert "verification" in r.output  # the table's cells may wrap: the stored facts are checked below
    from fieldreid.gallery.store import Gallery
    from fieldreid.verify.features import KIND

    with Gallery(g) as gal:
        assert gal.missing_local_features(KIND) == [] and gal.fusion("zebra", "tiny-embedder-v1")["pays"]
    q = tmp_path / "q"
    q.mkdir()
    for i in range(10):
        cv2.imwrite(str(q / f"{i}.png"), photo(coat(200 + i), 999 + i))
    out = tmp_path / "d.json"
    r = run("identify", q, "--gallery", g, "--crops", "--embedder", model, "--out", out, "--no-record")
    assert r.exit_code == 0, r.output
    decisions = json.loads(out.read_text())["decisions"]
    assert all(d["threshold_method"].startswith("fused probability") for d in decisions)
    right = sum(d["identity"] == f"animal{Path(d['source']).stem}" for d in decisions)
    assert right >= 8


def test_eval_verify_reports_before_after_per_k(tmp_path):
    coats_dataset(tmp_path)
    model = tiny_embedder_onnx(tmp_path / "tiny.onnx")
    r = run("eval", tmp_path / "metadata.csv", "--crops", "--embedder", model, "--verify", "--verify-k", 5,
            "--keypoints", 200, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output[r.output.index("{"):])
    v = doc["verify"]
    assert v["keypoints"] == 200 and v["n_feature_failures"] == 0 and set(v["per_k"]) == {"5"}
    k5 = v["per_k"]["5"]
    assert k5["n_queries"] == 24 and k5["top1_before"] == doc["one_vs_all"]["top1"]
    assert k5["top1_after"] > k5["top1_before"]
    r = run("eval", tmp_path / "metadata.csv", "--crops", "--embedder", model, "--verify", "--verify-k", 0)
    assert r.exit_code == 2 and "--verify-k must be at least 1" in r.output
