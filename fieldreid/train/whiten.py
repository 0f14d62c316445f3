"""Learned whitening of a trained embedder, chosen on its held-out animals and folded into its neck.

A fine-tuned embedder's output still spends much of its length on what every photo of the species shares
(pose, light, the coat's overall look). Supervised whitening (Radenović, Tolias and Chum, "Fine-tuning CNN
image retrieval with no human annotation", 2018) learns, from the training animals, a linear map that
scales down the directions in which photos of *one* animal differ and ranks the rest by how much they
separate animals:

    within  = covariance of (embedding - its animal's mean) over the training photos, shrunk toward
              a scaled identity (few photos per animal: the raw covariance is singular)
    W       = within^(-1/2)                       (photos of one animal pulled together)
    R       = eigenvectors of cov(W (x - mean)), largest first, the first ``dim`` kept
    white(x) = R W (x - mean), then L2-normalised

``x`` is the neck's output before L2 normalisation. The map is affine, so it folds exactly into the model
(its ``proj`` Linear and BN neck): the whitened embedder is an ordinary fieldreid checkpoint, exported,
quantised and run like any other, at the same cost (a 1280 x dim matrix more).

The shrinkage and the kept dimension are chosen on the run's held-out identities (``--val-identities``:
animals the model never trained on), by their one-vs-all mAP; whitening that does not beat the plain
embedder there is refused rather than written. The map is fitted on the run's *main* set (its
``metadata``), the animals the model is meant for; ``--also`` sets trained it but are other species.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fieldreid.errors import InputError, ModelError

#: shrinkage of the within-animal covariance toward a scaled identity, tried in order
SHRINKS = (0.2, 0.4, 0.6, 0.8)
#: kept dimensions (None = all), tried in order; larger than the embedding is skipped
DIMS = (None, 768, 512, 256)


@dataclass
class Whitening:
    """``white(x) = projection @ (x - mean)`` (then L2-normalised); ``x``: the neck's pre-normalisation output."""

    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (d, D)
    shrink: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = (np.asarray(x, np.float64) - self.mean) @ self.projection.T
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def fit_whitening(x: np.ndarray, labels, shrink: float, dim: int | None = None) -> Whitening:
    """Supervised whitening of ``x`` (N, D) from its identities (see the module docstring)."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels, dtype=object)
    if x.ndim != 2 or len(x) != len(labels):
        raise InputError(f"Whitening needs one label per embedding; got {x.shape} and {len(labels)} labels.")
    if not np.isfinite(x).all():
        raise InputError("Whitening got non-finite embeddings.")
    if not 0.0 < shrink <= 1.0:
        raise InputError(f"Whitening shrinkage must be in (0, 1]; got {shrink}.")
    d_in = x.shape[1]
    if dim is not None and not 1 <= dim <= d_in:
        raise InputError(f"Whitening can keep 1..{d_in} dimensions; got {dim}.")
    ids, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    repeated = counts[inverse] >= 2
    if (counts >= 2).sum() < 2:
        raise InputError(f"Whitening needs at least 2 animals with 2 or more photos each; got "
                         f"{int((counts >= 2).sum())} of {len(ids)}.")
    mean = x.mean(axis=0)
    xc = x - mean
    sums = np.zeros((len(ids), d_in))
    np.add.at(sums, inverse, xc)
    within = (xc - sums[inverse] / counts[inverse][:, None])[repeated]
    cov = within.T @ within / len(within)
    cov = (1.0 - shrink) * cov + shrink * (np.trace(cov) / d_in) * np.eye(d_in)
    vals, vecs = np.linalg.eigh(cov)
    if vals.min() <= 0:
        raise InputError("Whitening: the within-animal covariance is degenerate (all photos alike?).")
    inv_sqrt = (vecs / np.sqrt(vals)) @ vecs.T
    spread = np.cov((xc @ inv_sqrt.T).T)
    vals2, vecs2 = np.linalg.eigh(spread)
    order = np.argsort(vals2)[::-1][:dim or d_in]
    return Whitening(mean=mean, projection=vecs2[:, order].T @ inv_sqrt, shrink=float(shrink))


def fold_whitening(model, whitening: Whitening):
    """A new EmbeddingModel whose output is ``whitening.apply(neck output of model)`` (eval mode)."""
    from fieldreid.embed.model import EmbeddingModel

    cfg = model.config()
    d_out, d_in = whitening.projection.shape
    if d_in != model.embedding_dim:
        raise ModelError(f"Whitening for {d_in}-d embeddings cannot fold into a {model.embedding_dim}-d model.")
    neck = model.neck
    scale = (neck.weight.detach().double() / torch.sqrt(neck.running_var.double() + neck.eps))
    shift = neck.bias.detach().double() - neck.running_mean.double() * scale
    proj = torch.from_numpy(whitening.projection)
    w0 = (model.proj.weight.detach().double() if isinstance(model.proj, torch.nn.Linear)
          else torch.eye(model.feature_dim, dtype=torch.float64))
    weight = proj @ torch.diag(scale) @ w0  # (d_out, feature_dim)
    offset = proj @ (shift - torch.from_numpy(whitening.mean))
    out = EmbeddingModel(cfg["backbone"], embedding_dim=d_out, gem_p=cfg["gem_p"],
                         gem_learnable=cfg["gem_learnable"], backbone_kwargs=cfg["backbone_kwargs"])
    out.backbone.load_state_dict(model.backbone.state_dict())
    out.pool.load_state_dict(model.pool.state_dict())
    with torch.no_grad():
        out.proj.weight.copy_(weight.float())
        out.neck.weight.fill_(1.0)
        out.neck.bias.zero_()
        out.neck.running_mean.copy_((-offset).float())
        out.neck.running_var.fill_(1.0 - out.neck.eps)  # (u - mean) / sqrt(var + eps) = u + offset
    return out.eval()


def neck_outputs(model, images, spec, device: str = "cpu") -> np.ndarray:
    """The BN neck's output before L2 normalisation (what the whitening is fitted on); leaves the model on CPU."""
    from fieldreid.train.trainer import embed_torch

    try:
        return embed_torch(model, images, spec, device=device, normalise=False)
    finally:
        model.cpu()


@dataclass
class WhitenResult:
    checkpoint: Path | None  # None: refused (no setting beat the plain embedder on the held-out animals)
    model_id: str
    chosen: dict | None
    before: dict
    grid: list[dict] = field(default_factory=list)
    fit_images: int = 0
    fit_identities: int = 0
    val_images: int = 0
    val_identities: int = 0


def _score(emb: np.ndarray, labels) -> dict:
    from fieldreid.evaluation.metrics import one_vs_all

    r = one_vs_all(emb, np.asarray(labels, dtype=object), ks=(1,))
    return {"top1": round(float(r["top1"]), 4), "mAP": round(float(r["mAP"]), 4)}


def _run_config(meta: dict[str, str]):
    """The training config stored in a fieldreid checkpoint (train or distill), with its data options."""
    from fieldreid.train.distill import DistillConfig
    from fieldreid.train.trainer import TrainConfig

    for kind, cls in (("train", TrainConfig), ("distill", DistillConfig)):
        text = meta.get(f"fieldreid.extra.{kind}.config")
        if text:
            return kind, cls.from_json(text)
    return None, None


def whiten_checkpoint(checkpoint: str | Path, out: str | Path, shrinks=SHRINKS, dims=DIMS,
                      device: str = "auto", on_setting=None) -> WhitenResult:
    """Fit, choose and fold a learned whitening into a checkpoint trained with held-out identities.

    The training animals and the held-out ones are those of the checkpoint's own run (its stored config:
    same sets, same seed, same split), restricted to its main set. Writes ``out`` only when the best setting
    beats the plain embedder's held-out mAP; ``on_setting(row)`` sees each setting's held-out score.
    """
    from fieldreid.embed.model import load_checkpoint, save_checkpoint
    from fieldreid.embed.runtime import PreprocessSpec
    from fieldreid.export.embedder_onnx import state_dict_sha256
    from fieldreid.train.trainer import _prepare, metadata_sets, set_names

    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise InputError(f"--out {out} is the checkpoint itself; write the whitened model to a new file.")
    model, meta = load_checkpoint(checkpoint)
    if "fieldreid.extra.whiten.chosen" in meta:
        raise InputError(f"{checkpoint} is already whitened; whiten the checkpoint it came from.")
    kind, cfg = _run_config(meta)
    if cfg is None:
        raise InputError(f"{checkpoint} has no training config (not written by fieldreid train/distill), so its "
                         "training and held-out animals are unknown.")
    if cfg.val_identities <= 0:
        raise InputError(f"{checkpoint} was trained without --val-identities: whitening is chosen on animals the "
                         "model never trained on, and this run held none out.")
    if not Path(cfg.metadata).is_file():
        raise InputError(f"{checkpoint} was trained on {cfg.metadata}, which is not here; whitening refits on "
                         "that run's own data.")
    spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
    data, val = _prepare(cfg, None)
    main = set_names(metadata_sets(cfg))[0] if cfg.also else ""
    fit_idx = [i for i, s in enumerate(data.sets) if s == main]
    val_idx = [i for i, s in enumerate(val.sets) if s == main]
    fit, held = data.subset(fit_idx), val.subset(val_idx)
    if len(set(held.identities)) < 2:
        raise InputError(f"{checkpoint}'s run held out fewer than 2 animals of its main set "
                         f"({len(set(held.identities))}); choosing a whitening needs at least 2.")
    x = neck_outputs(model, fit.images, spec, device=device)
    v = neck_outputs(model, held.images, spec, device=device)
    before = _score(v / np.linalg.norm(v, axis=1, keepdims=True), held.identities)
    grid, best, best_w = [], None, None
    for shrink in shrinks:
        full = fit_whitening(x, fit.identities, shrink)  # rows ranked: fewer dimensions = its first rows
        for dim in dims:
            if dim is not None and dim > model.embedding_dim:
                continue
            w = replace(full, projection=full.projection[:dim])
            row = {"shrink": shrink, "dim": dim or model.embedding_dim, **_score(w.apply(v), held.identities)}
            grid.append(row)
            if on_setting is not None:
                on_setting(row)
            if best is None or (row["mAP"], row["top1"]) > (best["mAP"], best["top1"]):
                best, best_w = row, w
    result = WhitenResult(None, "", None, before, grid, len(fit), len(set(fit.identities)), len(held),
                          len(set(held.identities)))
    if best is None or (best["mAP"], best["top1"]) <= (before["mAP"], before["top1"]):
        return result
    white = fold_whitening(model, best_w)
    stem = meta["fieldreid.model_id"].rsplit("-", 1)[0]
    model_id = f"{stem}-whitened-{state_dict_sha256(white)[:8]}"
    extra = {k[len("fieldreid.extra."):]: v for k, v in meta.items() if k.startswith("fieldreid.extra.")}
    extra.update({"whiten.chosen": json.dumps(best), "whiten.before": json.dumps(before),
                  "whiten.grid": json.dumps(grid), "whiten.from": f"{checkpoint.name} ({meta['fieldreid.model_id']})",
                  "whiten.fit": json.dumps({"set": main or Path(cfg.metadata).parent.name, "split": cfg.split,
                                            "images": len(fit), "identities": len(set(fit.identities)),
                                            "run": kind})})
    save_checkpoint(out, white, spec, model_id, extra=extra)
    result.checkpoint, result.model_id, result.chosen = out, model_id, best
    return result


__all__ = ["Whitening", "fit_whitening", "fold_whitening", "neck_outputs", "whiten_checkpoint", "WhitenResult",
           "SHRINKS", "DIMS"]
