"""Learned whitening: it pulls one animal's photos together on animals it never saw, folds exactly into the
model, is chosen on the run's held-out animals (or refused), and `fieldreid whiten` writes a usable
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from fieldreid.errors import InputError  # noqa: E402
from fieldreid.evaluation.metrics import one_vs_all  # noqa: E402
from fieldreid.train.whiten import fit_whitening, fold_whitening, neck_outputs  # noqa: E402


def _photos(n_animals: int, per: int, seed: int, dim: int = 48, nuisance: int = 6) -> tuple[np.ndarray, list]:
    """Each animal a small identity vector; every photo adds large shared nuisance (pose, light) along a
    few directions common to all animals -- what a species-level embedding spends its length on."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(nuisance, dim))  # the same nuisance for every call
    x, y = [], []
    for a in range(n_animals):
        centre = rng.normal(size=dim)
        for _ in range(per):
            x.append(centre + rng.normal(size=nuisance) @ basis + 0.3 * rng.normal(size=dim))
            y.append(f"a{a}")
    return np.asarray(x), y


def _top1(emb: np.ndarray, labels) -> float:
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return one_vs_all(emb, np.asarray(labels, dtype=object), ks=(1,))["top1"]


def test_whitening_learned_on_some_animals_separates_unseen_ones():
    train_x, train_y = _photos(40, 5, seed=0)
    test_x, test_y = _photos(30, 4, seed=1)  # other animals
    w = fit_whitening(train_x, train_y, shrink=0.2)
    raw, white = _top1(test_x, test_y), _top1(w.apply(test_x), test_y)
    assert raw < 0.3 and white > 0.95, (raw, white)
    assert w.apply(test_x).shape == (len(test_x), 48)
    assert fit_whitening(train_x, train_y, shrink=0.2, dim=12).apply(test_x).shape == (len(test_x), 12)
    # the kept dimensions are the ones that separate animals: 12 of 48 still do the job
    assert _top1(fit_whitening(train_x, train_y, shrink=0.2, dim=12).apply(test_x), test_y) > 0.8


@pytest.mark.parametrize("kw, match", [
    (dict(labels=["a"] * 10 + [f"s{i}" for i in range(10)]), "at least 2 animals with 2 or more"),
    (dict(shrink=0.0), "shrinkage"),
    (dict(dim=49), "1..48"),
    (dict(labels=["a", "b"]), "one label per embedding"),
])
def test_bad_whitening_inputs_are_refused(kw, match):
    x, y = _photos(10, 2, seed=0)
    args = dict(labels=y, shrink=0.3, dim=None) | kw
    with pytest.raises(InputError, match=match):
        fit_whitening(x, args["labels"], args["shrink"], args["dim"])
    with pytest.raises(InputError, match="non-finite"):
        fit_whitening(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y, 0.3)


@pytest.mark.parametrize("embedding_dim", [None, 64])
def test_folded_model_computes_the_whitening_exactly(embedding_dim):
    from fieldreid.embed.model import EmbeddingModel
    from fieldreid.embed.runtime import PreprocessSpec

    torch.manual_seed(0)
    model = EmbeddingModel("tf_efficientnet_lite0", embedding_dim=embedding_dim)
    with torch.no_grad():  # a trained-looking neck: stats and scale far from the identity
        model.neck.running_mean.normal_(0.0, 0.5)
        model.neck.running_var.uniform_(0.2, 3.0)
        model.neck.weight.uniform_(0.5, 2.0)
    model.eval()
    spec = PreprocessSpec(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 36, 3), dtype=np.uint8) for _ in range(24)]
    labels = [f"a{i // 3}" for i in range(24)]
    x = neck_outputs(model, images, spec)
    w = fit_whitening(x, labels, shrink=0.3, dim=16)
    folded = fold_whitening(model, w)
    from fieldreid.embed.runtime import preprocess_images

    with torch.inference_mode():
        got = folded(torch.from_numpy(preprocess_images(images, spec))).numpy()
    want = w.apply(x)
    assert got.shape == (24, 16)
    assert (got * want).sum(1).min() > 0.99999
    assert folded.config()["embedding_dim"] == 16
    assert not any(m.training for m in folded.modules())


# ------------------------------------------------------------------------------------- checkpoint + CLI
def _trained(tmp_path, val: float):
    """A tiny run of the real trainer on a written labelled set (as test_train_budget writes them)."""
    from test_train_budget import _write_set

    from fieldreid.train.trainer import TrainConfig, train

    meta = _write_set(tmp_path, "herd", "zebra", [4, 3, 4, 3, 4, 3, 4, 3, 4])
    cfg = TrainConfig(metadata=str(meta), backbone="tf_efficientnet_lite0", image_size=32, epochs=1, pk=(2, 2),
                      lr=2e-3, freeze_stages=3, seed=3, device="cpu", name="herd", val_identities=val)
    return train(cfg, tmp_path / "m.pt").checkpoint


def test_cli_whitens_a_validated_run_and_the_written_model_scores_what_it_says(tmp_path):
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.embed.model import load_checkpoint
    from fieldreid.embed.runtime import PreprocessSpec
    from fieldreid.train.trainer import TrainConfig, _prepare, embed_torch

    ckpt = _trained(tmp_path, val=0.34)
    out = tmp_path / "white.pt"
    r = CliRunner().invoke(app, ["whiten", str(ckpt), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output.count("  shrink ") == 16  # 4 shrinkages x (all, 768, 512, 256 of 1280 dimensions)
    model, meta = load_checkpoint(out)
    chosen = json.loads(meta["fieldreid.extra.whiten.chosen"])
    assert "-whitened-" in meta["fieldreid.model_id"] and model.embedding_dim == chosen["dim"]
    assert meta["fieldreid.extra.whiten.from"].startswith("m.pt (fieldreid-effnetlite0-herd-")
    assert json.loads(meta["fieldreid.extra.whiten.fit"])["identities"] == 6
    before = json.loads(meta["fieldreid.extra.whiten.before"])
    assert (chosen["mAP"], chosen["top1"]) > (before["mAP"], before["top1"])
    # the written model, run as any embedder, gives the held-out score the choice was made on
    _, val = _prepare(TrainConfig.from_json(meta["fieldreid.extra.train.config"]), None)
    emb = embed_torch(model, val.images, PreprocessSpec.from_json(meta["fieldreid.preprocess"]), device="cpu")
    got = one_vs_all(emb, np.asarray(val.identities, dtype=object), ks=(1,))
    assert round(got["mAP"], 4) == pytest.approx(chosen["mAP"], abs=2e-4)
    # whitening twice, or onto itself, is refused; the input checkpoint is untouched
    r = CliRunner().invoke(app, ["whiten", str(out), "--out", str(tmp_path / "w2.pt"), "--device", "cpu"])
    assert r.exit_code == 2 and "already whitened" in r.output
    r = CliRunner().invoke(app, ["whiten", str(ckpt), "--out", str(ckpt), "--device", "cpu"])
    assert r.exit_code == 2 and "is the checkpoint itself" in r.output
    assert load_checkpoint(ckpt)[0].embedding_dim == 1280


def test_a_run_without_held_out_animals_is_refused(tmp_path):
    from typer.testing import CliRunner

    from fieldreid.cli import app

    ckpt = _trained(tmp_path, val=0.0)
    r = CliRunner().invoke(app, ["whiten", str(ckpt), "--out", str(tmp_path / "w.pt"), "--device", "cpu"])
    assert r.exit_code == 2 and "without --val-identities" in r.output
    assert not (tmp_path / "w.pt").exists()


def test_whitening_that_does_not_beat_the_plain_model_is_not_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.train import whiten as whiten_mod

    def useless(x, labels, shrink, dim=None):  # keeps one direction only: it cannot separate the animals
        return whiten_mod.Whitening(mean=np.zeros(x.shape[1]), projection=np.eye(1, x.shape[1]), shrink=shrink)

    monkeypatch.setattr(whiten_mod, "fit_whitening", useless)
    ckpt = _trained(tmp_path, val=0.34)
    r = CliRunner().invoke(app, ["whiten", str(ckpt), "--out", str(tmp_path / "w.pt"), "--device", "cpu"])
    assert r.exit_code == 1 and "no whitening beat the plain embedder" in r.output, r.output
    assert not (tmp_path / "w.pt").exists()
