"""``fieldreid distill``: a small student learns a big teacher's embedding space, plus the identity loss.

>>> cfg = DistillConfig(metadata="nyala/metadata.csv", teacher="models/lite2.pt")   # doctest: +SKIP
>>> distill(cfg, "models/lite0-distilled.pt")                                      # doctest: +SKIP

Loss per batch: ``arcface(z) + cos_weight * mean(1 - cos(P z, t)) + rel_weight * MSE(S(z), S(t))`` where ``z``
is the student's BN-neck output, ``t`` the teacher's embedding of the same images, ``P`` a linear map to the
teacher's width (only when the widths differ; dropped after training) and ``S`` the in-batch cosine
similarity matrix (relational distillation: who is close to whom, width-independent).

Teachers: a fieldreid checkpoint, an ONNX model (fieldreid's own, or any ONNX with an image input given
``teacher_size``), a timm checkpoint file (a state dict, with ``teacher_arch`` naming the timm model;
its globally pooled features are the embedding), or a published model as downloaded (:mod:`fieldreid.teachers`:
a MiewID or MegaDescriptor folder, any timm hub folder; ``teacher_kind`` names the kind, else the folder's
``config.json`` tells it; ``teacher_size`` replaces its input size). **Teacher embeddings are computed once, on the
un-augmented images** (each model's own preprocessing), and cached beside the output
(``<out>.teacher.npz``, keyed by the teacher file's sha256 and the image list): the student sees augmented
crops and must map them where the teacher puts the clean crop, which makes the distillation target
augmentation-invariant and costs one teacher pass instead of one per step.

**Where the student starts.** A student of the teacher's own backbone (a Lite0 fine-tuned at 320 px,
distilled into a Lite0 at 224) starts from the teacher's weights unless ``init`` says otherwise
(``"imagenet"``, a checkpoint, a state dict, ``"scratch"``): it then only has to carry the teacher's space
down to its smaller input. Nyala test, teacher 0.202 top-1 at 320 px, 12 epochs, 2 cores: the 224-px
student from ImageNet weights reached 0.176, from the teacher's 0.192 (288 px: 0.180 / 0.189). Any other
student (another backbone, or a teacher that is not a fieldreid checkpoint) starts as ``train`` would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fieldreid.errors import InputError, ModelError
from fieldreid.train.data import LabelledImages
from fieldreid.train.losses import cosine_distill_loss, relational_distill_loss
from fieldreid.train.trainer import (
    Fit,
    StepCallback,
    TrainConfig,
    TrainResult,
    _prepare,
    build_model,
    embed_torch,
    final_size,
)
from fieldreid.types import PreprocessSpec


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = ""
    teacher_arch: str | None = None  # timm model name, for a plain timm checkpoint file
    teacher_kind: str | None = None  # miewid | megadescriptor | timm (fieldreid.teachers); default: from the layout
    teacher_size: int | None = None  # input size for an ONNX / timm teacher without fieldreid metadata
    cos_weight: float = 5.0
    rel_weight: float = 50.0


def _sha256(path: Path) -> str:
    from fieldreid.engines.manifest import sha256_file

    return sha256_file(path)


def _onnx_teacher(path: Path, images, size: int | None, batch_size: int = 16) -> tuple[np.ndarray, dict]:
    import onnxruntime as ort

    from fieldreid.embed.runtime import preprocess_images
    from fieldreid.engines.manifest import onnx_metadata

    meta = onnx_metadata(path)
    if "fieldreid.preprocess" in meta:
        spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
    elif size:
        spec = PreprocessSpec(size=(size, size))  # ImageNet mean/std, RGB: timm's default
    else:
        raise InputError(f"{path} has no fieldreid preprocessing metadata: give --teacher-size (ImageNet "
                         "mean/std, RGB are assumed).")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    step = batch_size if not isinstance(fixed, int) else fixed
    out = []
    for i in range(0, len(images), step):
        x = preprocess_images(images[i:i + step], spec)
        y = np.asarray(sess.run(None, {name: x})[0], np.float32)
        out.append(y.reshape(len(x), y.shape[1], -1).mean(axis=2) if y.ndim > 2 else y)
    return np.concatenate(out), {"kind": "onnx", "preprocess": json.loads(spec.to_json())}


def _read_cache(cache: Path | None, digest: str, keys: str) -> np.ndarray | None:
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["teacher_sha256"]) == digest and str(z["images_sha256"]) == keys:
                return z["vectors"].astype(np.float32)
    return None


def teacher_embeddings(cfg: DistillConfig, data: LabelledImages, cache: Path | None = None) -> np.ndarray:
    """The teacher's L2-normalised embedding of every (un-augmented) training image, cached in ``cache``."""
    from fieldreid.export.run import is_embedder_checkpoint
    from fieldreid.teachers import detect_kind

    path = Path(cfg.teacher)
    if not path.exists():
        raise InputError(f"Teacher {path} does not exist.")
    own = path.is_file() and (path.suffix.lower() == ".onnx" or is_embedder_checkpoint(path))
    kind = cfg.teacher_kind or (None if own else detect_kind(path))
    published = cfg.teacher_kind is not None or not own
    keys = hashlib.sha256("\n".join(str(p) for p in data.paths).encode()).hexdigest()
    teacher = None
    if published:  # a published folder, or a weights file whose layout is checked against its architecture
        from fieldreid.teachers import load_published

        teacher = load_published(path, kind, cfg.teacher_arch, cfg.teacher_size)
        digest = teacher.digest()  # weights, config and input size
    else:
        digest = _sha256(path)
    cached = _read_cache(cache, digest, keys)
    if cached is not None:
        return cached
    if teacher is not None:
        vec = embed_torch(teacher, data.images, teacher.preprocess, device=cfg.device)
        info = {"kind": teacher.kind, "architecture": teacher.backbone_name, "model_id": teacher.model_id,
                "licence": teacher.licence, "preprocess": json.loads(teacher.preprocess.to_json())}
    elif path.suffix.lower() == ".onnx":
        vec, info = _onnx_teacher(path, data.images, cfg.teacher_size)
    else:
        from fieldreid.embed.model import load_checkpoint

        model, meta = load_checkpoint(path)
        spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
        vec = embed_torch(model, data.images, spec, device=cfg.device)
        info = {"kind": "fieldreid", "model_id": meta.get("fieldreid.model_id", "")}
    vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    if not np.all(np.isfinite(vec)):
        raise ModelError(f"Teacher {path} produced NaN or infinite embeddings.")
    if cache is not None:
        import io

        from fieldreid.storage.fsutil import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, vectors=vec.astype(np.float32), teacher_sha256=np.array(digest),
                 images_sha256=np.array(keys), teacher=np.array(json.dumps(info)))
        atomic_write_bytes(cache, buf.getvalue())
    return vec.astype(np.float32)


def _backbone_of(teacher: str) -> str | None:
    """The timm backbone of a fieldreid checkpoint teacher, from its metadata (None for any other teacher)."""
    from fieldreid.embed.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_tagged
    from fieldreid.export.run import is_embedder_checkpoint

    if not is_embedder_checkpoint(teacher):
        return None
    meta = load_tagged(teacher, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "embedder checkpoint").get("metadata") or {}
    return meta.get("fieldreid.backbone")


def distill(cfg: DistillConfig, out: str | Path, resume: bool = False, data: LabelledImages | None = None,
            on_step: StepCallback | None = None, stop_after_steps: int | None = None,
            on_epoch: StepCallback | None = None) -> TrainResult:
    """Train ``cfg.backbone`` (the student) on ``cfg.metadata`` with the teacher's embeddings as targets
    (budget, P x K batches, validation and sizes as in :func:`fieldreid.train.trainer.train`)."""
    if cfg.cos_weight < 0 or cfg.rel_weight < 0:
        raise InputError("Distillation weights must be >= 0.")
    out = Path(out)
    data, val = _prepare(cfg, data)  # the teacher embeds the training images only
    teacher = torch.from_numpy(teacher_embeddings(cfg, data, out.with_name(out.name + ".teacher.npz")))
    init = cfg.init
    if init is None and _backbone_of(cfg.teacher) == cfg.backbone:
        init = cfg.teacher  # a student of the teacher's own backbone starts where the teacher is
    model, spec, source = build_model(cfg.backbone, init, cfg.embedding_dim, final_size(cfg))
    cfg.backbone = model.backbone_name
    extra: dict[str, nn.Module] = {}
    if teacher.shape[1] != model.embedding_dim:
        extra["to_teacher"] = nn.Linear(model.embedding_dim, teacher.shape[1], bias=False)

    def loss_fn(z: torch.Tensor, idx: np.ndarray):
        t = teacher[torch.from_numpy(np.asarray(idx, np.int64))].to(z.device)
        zc = extra["to_teacher"](z) if "to_teacher" in extra else z
        lc = cosine_distill_loss(zc, t)
        lr = relational_distill_loss(z, t)
        return cfg.cos_weight * lc + cfg.rel_weight * lr, {"cos": float(lc.detach()), "rel": float(lr.detach())}

    fit = Fit(cfg, data, model, spec, out, extra_modules=extra, extra_loss=loss_fn, kind="distill",
              init_source=f"{source}; teacher {Path(cfg.teacher).name}", val=val)
    if resume and fit.resume_path.is_file():
        fit.load_state()
    elif resume:
        raise InputError(f"--resume: no {fit.resume_path} to continue from.")
    return fit.run(on_step=on_step, stop_after_steps=stop_after_steps, on_epoch=on_epoch)
