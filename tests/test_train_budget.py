"""Training that trains: wall-clock budget, P x K identity-balanced batches, validation on held-out identities
with the best epoch kept, progressive resolution and several labelled sets at once (tiny synthetic data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from fieldreid.errors import InputError  # noqa: E402
from fieldreid.train import trainer as trainer_mod  # noqa: E402
from fieldreid.train.data import LabelledImages, held_out_identities, pk_batches  # noqa: E402
from fieldreid.train.trainer import (  # noqa: E402
    RESUME_SUFFIX,
    Fit,
    TrainConfig,
    _prepare,
    check_config,
    parse_pk,
    parse_sizes,
    train,
)

SIZE = 32


def _images(counts: list[int], seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Identity k = a stripe pattern of its own period and colour; its images = noisy, shifted copies."""
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for k, n in enumerate(counts):
        base = np.zeros((48, 48, 3), np.uint8)
        period = 4 + 3 * k
        for x in range(0, 48, period):
            base[:, x:x + period // 2] = rng.integers(40, 255, 3)
        for _ in range(n):
            img = np.roll(base, tuple(rng.integers(-3, 4, 2)), axis=(0, 1)).astype(np.int16)
            images.append(np.clip(img + rng.integers(-15, 16, img.shape), 0, 255).astype(np.uint8))
            ids.append(f"animal_{k}")
    return images, ids


def _data(counts: list[int], species: str = "test") -> LabelledImages:
    images, ids = _images(counts)
    return LabelledImages(images, ids, [Path(f"/synthetic/{i}.png") for i in range(len(images))],
                          species=[species] * len(images))


def _cfg(**kw) -> TrainConfig:
    base = dict(metadata="/synthetic/metadata.csv", backbone="tf_efficientnet_lite0", image_size=SIZE, epochs=2,
                batch_size=4, lr=2e-3, warmup_epochs=0.5, freeze_stages=3, name="tiny", seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _spy_steps(monkeypatch) -> list[dict]:
    """Record every training step's images (identities) and input size, then run the real step."""
    seen: list[dict] = []
    real = Fit._train_step

    def spy(self, idx, rng, aug, spec=None):
        seen.append({"epoch": self.step // self.steps_per_epoch, "ids": [self.data.identities[i] for i in idx],
                     "size": (spec or self.spec).size})
        return real(self, idx, rng, aug, spec)

    monkeypatch.setattr(Fit, "_train_step", spy)
    return seen


def _write_set(root: Path, name: str, species: str, counts: list[int], split: str = "train") -> Path:
    """A labelled set ``root/name/metadata.csv`` whose identities are named "1", "2", ... (lossless PNGs)."""
    images, ids = _images(counts, seed=len(name))
    rows = []
    for i, (img, ident) in enumerate(zip(images, ids, strict=True)):
        rel = f"images/{i}.png"
        (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name / rel), img)
        rows.append({"image_id": str(i), "identity": str(int(ident.split("_")[1]) + 1), "path": rel,
                     "species": species, "split": split})
    path = root / name / "metadata.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------- P x K
def test_pk_batches_are_p_identities_times_k_images():
    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 4, 3])
    epoch0 = pk_batches(labels, 6, 2, 3, seed=7, epoch=0)
    assert len(epoch0) == 3
    for batch in epoch0:
        assert len(batch) == 6
        got = labels[batch]
        assert len(set(got.tolist())) == 2 and all(np.sum(got == c) == 3 for c in set(got.tolist()))
        for c in set(got.tolist()):
            picks = batch[got == c]
            if np.sum(labels == c) >= 3:
                assert len(set(picks.tolist())) == 3  # enough images: drawn without replacement
    assert sorted(np.concatenate([labels[b][::3] for b in epoch0]).tolist()) == list(range(6))  # each id once
    one = [b for b in epoch0 if 0 in labels[b]][0]
    assert len(set(one[labels[one] == 0].tolist())) == 1  # identity 0 has 1 image: drawn with replacement
    again = pk_batches(labels, 6, 2, 3, seed=7, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again, strict=True))  # pure function of (seed, epoch)
    epoch1 = pk_batches(labels, 6, 2, 3, seed=7, epoch=1)
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    with pytest.raises(InputError, match="at least 8 training identities"):
        pk_batches(labels, 6, 8, 4, seed=0, epoch=0)


def test_held_out_identities_are_drawn_per_set_from_the_seed():
    ids = [f"a/{i}" for i in range(10) for _ in range(2)] + [f"b/{i}" for i in range(5) for _ in range(3)]
    sets = ["a"] * 20 + ["b"] * 15
    held = held_out_identities(ids, sets, 0.3, seed=1)
    assert len([h for h in held if h.startswith("a/")]) == 3 and len([h for h in held if h.startswith("b/")]) == 2
    assert held == held_out_identities(list(reversed(ids)), list(reversed(sets)), 0.3, seed=1)  # order-free
    assert held_out_identities(ids, sets, 0.0, seed=1) == set()
    single = held_out_identities(["x", "y", "y", "z", "z"], [""] * 5, 0.5, seed=0)
    assert single == {"y", "z"}  # "x" has one image: it cannot be a one-vs-all query


def test_training_batches_are_pk_and_never_hold_out_identities(monkeypatch, tmp_path):
    data = _data([3, 2, 4, 3, 2, 3])
    cfg = _cfg(pk=(2, 2), val_identities=0.34, epochs=2)
    held = held_out_identities(data.identities, data.sets, 0.34, cfg.seed)
    assert len(held) == 2
    seen = _spy_steps(monkeypatch)
    res = train(cfg, tmp_path / "m.pt", data=data)
    assert res.steps_per_epoch == 2 and res.steps_done == 4 and len(seen) == 4
    for step in seen:
        assert len(step["ids"]) == 4 and sorted({i: step["ids"].count(i) for i in step["ids"]}.values()) == [2, 2]
        assert not set(step["ids"]) & held  # held-out identities never train
    for epoch in (0, 1):  # an epoch is one pass over the 4 training identities
        ids = [i for s in seen if s["epoch"] == epoch for i in s["ids"]]
        assert set(ids) == set(data.identities) - held
    # validation ran after every epoch, on the held-out identities; the checkpoint is the best of them
    from fieldreid.embed.model import load_checkpoint

    assert [v["epoch"] for v in res.validation] == [1, 2]
    assert all(np.isfinite(v["val_top1"]) and np.isfinite(v["val_mAP"]) for v in res.validation)
    assert all(v["val_species"]["test"]["identities"] == 2 for v in res.validation)
    _, meta = load_checkpoint(tmp_path / "m.pt")
    stored = json.loads(meta["fieldreid.extra.train.validation"])
    assert stored == json.loads(json.dumps(res.validation))
    scores = [(v["val_mAP"], v["val_top1"]) for v in stored]
    best = scores.index(max(scores)) + 1  # the first epoch of the highest (mAP, top-1)
    assert res.best_epoch == best and meta["fieldreid.extra.train.best_epoch"] == str(best)
    assert meta["fieldreid.extra.train.epochs_done"] == str(best) and meta["fieldreid.model_id"] == res.model_id
    assert meta["fieldreid.extra.train.val_identities"] == "2"


def test_the_best_epoch_is_the_checkpoint_and_the_last_state_resumes(monkeypatch, tmp_path):
    from fieldreid.embed.model import load_checkpoint

    # (mAP, top-1) per epoch: epoch 4 ties epoch 2 on mAP and wins on top-1; epoch 3's better top-1 loses on mAP
    plan = [(0.2, 0.1), (0.5, 0.3), (0.4, 0.9), (0.5, 0.6), (0.3, 0.9)]
    weights: list[dict] = []

    def fake_validate(self):
        weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        m, t = plan[len(self.history)]
        return {"val_top1": t, "val_mAP": m, "val_species": {"test": {"top1": t, "mAP": m}}}

    monkeypatch.setattr(Fit, "validate", fake_validate)
    out = tmp_path / "m.pt"
    res = train(_cfg(pk=(2, 2), val_identities=0.34, epochs=5), out, data=_data([3, 2, 4, 3, 2, 3]))
    assert res.best_epoch == 4 and len(weights) == 5
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], weights[3][k]) for k in weights[3])
    assert not all(torch.equal(saved["state_dict"][k], weights[4][k]) for k in weights[4])
    assert [(v["val_mAP"], v["val_top1"]) for v in json.loads(saved["extra"]["train.validation"])] == plan
    state = torch.load(out.with_name(out.name + RESUME_SUFFIX), weights_only=True)
    assert state["step"] == 10 and all(torch.equal(state["model"][k], weights[4][k]) for k in weights[4])
    # resuming the finished run changes nothing: the best stays
    again = train(_cfg(pk=(2, 2), val_identities=0.34, epochs=5), out, data=_data([3, 2, 4, 3, 2, 3]), resume=True)
    assert again.model_id == res.model_id == load_checkpoint(out)[1]["fieldreid.model_id"]
    assert again.best_epoch == 4
    assert all(torch.equal(torch.load(out, weights_only=True)["state_dict"][k], weights[3][k]) for k in weights[3])


# ----------------------------------------------------------------------------------------------- budget
def test_zero_minutes_stops_after_the_first_step(tmp_path):
    out = tmp_path / "m.pt"
    res = train(_cfg(minutes=0.0, epochs=3), out, data=_data([3, 3, 3, 3]))
    assert res.stopped == "budget" and res.steps_done == 1 and res.steps_per_epoch == 3
    assert "in epoch 1, after step 1 of 3" in res.stop_note()
    assert out.is_file() and torch.load(out.with_name(out.name + RESUME_SUFFIX), weights_only=True)["step"] == 1


def test_budget_stop_resumes_to_the_uninterrupted_weights(monkeypatch, tmp_path):
    """A fake clock: each step takes 25 s. With a 1-minute budget the run stops after step 3 (75 s > 60 s),
    in epoch 2 of P x K batches; resuming without a budget ends where the uninterrupted run ends."""
    from fieldreid.embed.model import load_checkpoint

    torch.set_num_threads(1)  # identical float summation order in both runs (conftest restores the count)
    data = _data([3, 2, 4, 3])
    full = train(_cfg(pk=(2, 2), epochs=2), tmp_path / "full.pt", data=data)
    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(monotonic=lambda: clock["t"]))

    def tick(step: dict) -> None:
        clock["t"] += 25.0

    part = train(_cfg(pk=(2, 2), epochs=2, minutes=1.0), tmp_path / "part.pt", data=data, on_step=tick)
    assert part.stopped == "budget" and part.steps_done == 3 and len(part.history) == 1
    assert part.stop_note().startswith("stopped by the time budget in epoch 2, after step 1 of 2")
    _, meta = load_checkpoint(tmp_path / "part.pt")
    assert meta["fieldreid.extra.train.steps_done"] == "3"  # the run is over: its latest weights are written
    resumed = train(_cfg(pk=(2, 2), epochs=2), tmp_path / "part.pt", data=data, resume=True)
    assert resumed.steps_done == full.steps_done == 4 and not resumed.stopped
    a = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part.pt", weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # the same batches: bit-identical weights


def test_budget_passed_on_an_epochs_last_step_still_validates(monkeypatch, tmp_path):
    clock = {"t": 0.0}
    monkeypatch.setattr(trainer_mod, "time", SimpleNamespace(monotonic=lambda: clock["t"]))
    res = train(_cfg(pk=(2, 2), val_identities=0.34, epochs=3, minutes=0.8), tmp_path / "m.pt",
                data=_data([3, 2, 4, 3, 2, 3]), on_step=lambda s: clock.__setitem__("t", clock["t"] + 25.0))
    assert res.stopped == "budget" and res.steps_done == 2 and res.stop_note().startswith(
        "stopped by the time budget after epoch 1")
    assert [v["epoch"] for v in res.validation] == [1] and res.best_epoch == 1


# ----------------------------------------------------------------------------------------------- sizes
def test_progressive_sizes_change_the_input_at_their_epochs(monkeypatch, tmp_path):
    from fieldreid.embed.model import load_checkpoint
    from fieldreid.types import PreprocessSpec

    seen = _spy_steps(monkeypatch)
    val_sizes = []
    real_embed = trainer_mod.embed_torch

    def spy_embed(model, images, spec, **kw):
        val_sizes.append(spec.size)
        return real_embed(model, images, spec, **kw)

    monkeypatch.setattr(trainer_mod, "embed_torch", spy_embed)
    out = tmp_path / "m.pt"
    res = train(_cfg(image_size=None, sizes=[(0, 32), (2, 48)], epochs=3, val_identities=0.34),
                out, data=_data([3, 2, 4, 3, 2, 3]))
    steps = res.steps_per_epoch
    assert [s["size"] for s in seen] == [(32, 32)] * (2 * steps) + [(48, 48)] * steps
    assert [h["size"] for h in res.history] == [32, 32, 48]
    assert val_sizes == [(48, 48)] * 3  # validation always at the final size
    _, meta = load_checkpoint(out)
    assert PreprocessSpec.from_json(meta["fieldreid.preprocess"]).size == (48, 48)


@pytest.mark.parametrize("kw, match", [
    (dict(sizes=[(0, 48), (2, 32)]), "not a schedule"),
    (dict(sizes=[(0, 32), (0, 48)]), "not a schedule"),
    (dict(sizes=[(1, 32), (2, 48)]), "not a schedule"),
    (dict(sizes=[(0, 32), (4, 48)]), "only 3 epochs"),
    (dict(sizes=[(0, 32), (1, 48)], cache_views=2), "cannot be combined with --cache-views"),
    (dict(sizes=[(0, 32), (1, 48)], image_size=64), "differs from the last of --sizes"),
    (dict(pk=(1, 4)), "pk must be"),
    (dict(val_identities=1.0), "fraction"),
    (dict(minutes=-1.0), "--minutes"),
])
def test_bad_settings_are_refused(kw, match, tmp_path):
    cfg = _cfg(epochs=3, **{"image_size": None, **kw})
    with pytest.raises(InputError, match=match):
        check_config(cfg)
    with pytest.raises(InputError, match=match):  # before any training
        train(cfg, tmp_path / "m.pt", data=_data([2, 2, 2]))
    assert not (tmp_path / "m.pt").exists()


def test_cli_values_parse_or_are_refused():
    assert parse_pk("8x4") == (8, 4) and parse_sizes("0:160, 3:192,6:224") == [(0, 160), (3, 192), (6, 224)]
    for bad in ("8", "8x", "x4", "1x4", "8*4"):
        with pytest.raises(InputError, match="--pk"):
            parse_pk(bad)
    for bad in ("0-160", "0:a", "160"):
        with pytest.raises(InputError, match="--sizes"):
            parse_sizes(bad)


# ----------------------------------------------------------------------------------------------- several sets
def test_two_sets_with_the_same_identity_names_stay_apart(tmp_path):
    a = _write_set(tmp_path, "herd_a", "zebra", [2, 3, 2, 2])
    b = _write_set(tmp_path, "herd_b", "nyala", [3, 2, 2, 2])
    data, val = _prepare(_cfg(metadata=str(a), also=[f"{b}:train"]), None)
    assert val is None and data.num_classes == 8  # identities "1".."4" in both sets: 8 animals
    assert data.classes == [f"herd_{s}/{i}" for s in "ab" for i in "1234"]
    assert {(s, sp) for s, sp in zip(data.sets, data.species, strict=True)} == {("herd_a", "zebra"),
                                                                                 ("herd_b", "nyala")}
    cfg = _cfg(metadata=str(a), also=[str(b)], val_identities=0.5, name=None, epochs=1, pk=(2, 2))
    data, val = _prepare(cfg, None)
    assert data.num_classes == 4 and len(set(val.identities)) == 4  # 2 of each set's 4 held out
    assert {i.split("/")[0] for i in val.identities} == {"herd_a", "herd_b"}
    res = train(cfg, tmp_path / "m.pt")
    (v,) = res.validation
    assert set(v["val_species"]) == {"zebra", "nyala"}
    assert all(r["identities"] == 2 for r in v["val_species"].values())
    assert "-herd-a-herd-b-" in res.model_id  # the tag names both sets


def test_a_set_without_the_requested_split_is_one_clear_error(tmp_path):
    a = _write_set(tmp_path, "herd_a", "zebra", [2, 2])
    b = _write_set(tmp_path, "herd_b", "nyala", [2, 2], split="database")
    with pytest.raises(InputError, match="No rows with split 'train' in .*herd_b.*database"):
        _prepare(_cfg(metadata=str(a), also=[str(b)]), None)
    with pytest.raises(InputError, match="No rows with split 'query'"):
        _prepare(_cfg(metadata=str(a), also=[f"{b}:query"]), None)
    data, _ = _prepare(_cfg(metadata=str(a), also=[f"{b}:database"]), None)
    assert data.num_classes == 4
    with pytest.raises(InputError, match="given twice"):
        _prepare(_cfg(metadata=str(a), also=[str(a)]), None)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_prints_each_epochs_validation(tmp_path):
    from typer.testing import CliRunner

    from fieldreid.cli import app

    meta = _write_set(tmp_path, "herd", "zebra", [3, 2, 3, 2, 3, 2])
    out = tmp_path / "m.pt"
    args = ["train", str(meta), "--out", str(out), "--epochs", "2", "--freeze-stages", "3", "--device", "cpu",
            "--pk", "2x2", "--val-identities", "0.34", "--sizes", "0:32,1:40", "--minutes", "5"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("epoch ")]
    assert [ln.split("  ")[:2] for ln in lines] == [["epoch 1/2", "size 32"], ["epoch 2/2", "size 40"]]
    assert all("val top-1 " in ln and " mAP " in ln and ln.endswith(" min") for ln in lines)
    assert "by val mAP" in r.output and out.is_file()
    r = CliRunner().invoke(app, args[:-4] + ["--sizes", "0:40,1:32"])
    assert r.exit_code == 2 and "not a schedule" in r.output


def test_distill_takes_the_same_options(tmp_path):
    """The teacher embeds only the training images (held-out animals stay unseen), batches are P x K and the
    best validated epoch is kept, as in ``train``."""
    from fieldreid.train.distill import DistillConfig, distill

    data = _data([3, 2, 4, 3, 2, 3])
    train(_cfg(epochs=1), tmp_path / "teacher.pt", data=data)
    cfg = DistillConfig(**(_cfg(pk=(2, 2), val_identities=0.34, epochs=2, image_size=None,
                                sizes=[(0, 32), (1, 40)]).__dict__ | {"teacher": str(tmp_path / "teacher.pt")}))
    res = distill(cfg, tmp_path / "s.pt", data=data)
    held = held_out_identities(data.identities, data.sets, 0.34, cfg.seed)
    with np.load(tmp_path / "s.pt.teacher.npz") as z:
        assert len(z["vectors"]) == sum(i not in held for i in data.identities)
    assert res.steps_done == 4 and [v["size"] for v in res.validation] == [32, 40]
    assert res.best_epoch in (1, 2) and "-distilled-" in res.model_id
    # a student of the teacher's own backbone starts from the teacher's weights (what it was given is kept)
    from fieldreid.embed.model import load_checkpoint

    init = load_checkpoint(tmp_path / "s.pt")[1]["fieldreid.extra.distill.init"]
    assert init.startswith("checkpoint teacher.pt") and init.endswith("; teacher teacher.pt"), init
    assert cfg.init is None
