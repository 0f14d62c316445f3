"""``fieldreid doctor``, ``detect`` and ``embed``: the pipeline run on a folder, without a gallery.

:mod:`fieldreid.cli.app` calls :func:`register`."""

from __future__ import annotations

import io
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from fieldreid import __version__
from fieldreid.cli.common import BackendOpt, CropsOpt, err, out
from fieldreid.cli.common import friendly as _friendly
from fieldreid.cli.common import open_detector as _open_detector
from fieldreid.cli.common import open_embedder as _open_embedder
from fieldreid.cli.common import progress_bar as _progress
from fieldreid.errors import FieldreidError


def _collect(paths: list[Path]) -> list[Path]:
    from fieldreid.frames.files import iter_files

    files = list(iter_files(paths))
    if not files:
        raise FieldreidError(f"No images found under {', '.join(map(str, paths))}.")
    return files


@_friendly
def doctor() -> None:
    """Show backends, devices, versions and whether the default models are present."""
    from fieldreid.defaults import DETECTOR_NAME, EMBEDDER_NAME, models_dir
    from fieldreid.engines import available_backends, cuda_device_count

    table = Table(title=f"fieldreid {__version__} on {platform.machine()} / Python {platform.python_version()}")
    table.add_column("item")
    table.add_column("status")
    for name, status in available_backends().items():
        table.add_row(f"backend {name}", "[green]ok[/]" if status == "ok" else f"[yellow]{escape(status)}[/]")
    table.add_row("NVIDIA GPUs", str(cuda_device_count()))
    for mod in ("numpy", "cv2", "onnxruntime", "onnx", "torch", "timm", "ultralytics", "tensorrt"):
        try:
            m = __import__(mod)
            table.add_row(mod, getattr(m, "__version__", "?"))
        except ImportError:
            table.add_row(mod, "[dim]not installed[/]")
    try:
        import onnxruntime as ort

        table.add_row("onnxruntime providers", ", ".join(ort.get_available_providers()))
    except ImportError:
        pass
    mdir = models_dir()
    for kind, name in (("detector", DETECTOR_NAME), ("embedder", EMBEDDER_NAME)):
        p = mdir / name
        table.add_row(f"default {kind}", f"[green]{p}[/]" if p.exists() else f"[red]missing[/] ({p}; run make models)")
    emb_path = mdir / EMBEDDER_NAME
    if emb_path.exists():
        from fieldreid.embed.thresholds import describe, read_thresholds_info

        try:
            info = read_thresholds_info(emb_path)
        except FieldreidError:
            info = None
        table.add_row("embedder thresholds", escape(f"{info['upper']:.4f} ({describe(info)})") if info else
                      "[yellow]uncalibrated[/] (make models with ../shared/data, or fieldreid calibrate --into-model)")
    out.print(table)


def _run_pipeline(files: list[Path], pipe, label: str) -> Iterator:
    with _progress(len(files), label) as progress:
        task = progress.add_task(label, total=len(files))
        for res in pipe.run(files):
            progress.advance(task)
            yield res


@_friendly
def detect(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders (walked recursively).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="MegaDetector-format JSON to write.")] = Path(
        "detections.json"),
    detector: Annotated[Path | None, typer.Option(help="Detector ONNX / TensorRT plan (default: engines/default).")] = None,
    conf: Annotated[float, typer.Option(help="Keep boxes at or above this confidence.")] = 0.1,
    iou: Annotated[float, typer.Option(help="NMS IoU threshold.")] = 0.45,
    batch: Annotated[int, typer.Option(help="Images per detector batch.")] = 4,
    backend: BackendOpt = "auto",
    reduced_decode: Annotated[bool, typer.Option(help="Decode large JPEGs at reduced size (DCT scaling).")] = True,
) -> None:
    """Detect animals, people and vehicles; write MegaDetector batch-output JSON (Timelapse reads it)."""
    from fieldreid.embed.pipeline import Pipeline
    from fieldreid.report.megadetector import failure_entry, image_entry, relative_name, write_batch_output

    files = _collect(paths)
    det = _open_detector(detector, backend, conf, iou)
    pipe = Pipeline(det, None, batch_size=batch, reduced_decode=reduced_decode)
    images, failures, n_dets = [], 0, 0
    t0 = time.perf_counter()
    for res in _run_pipeline(files, pipe, "detect"):
        name = relative_name(res.path, paths)
        if res.failure:
            failures += 1
            images.append(failure_entry(name, res.failure))
        else:
            entry = image_entry(name, res.detections, res.size)
            n_dets += len(entry["detections"])
            images.append(entry)
    dt = time.perf_counter() - t0
    write_batch_output(out_path, images, detector=det.model_id, conf_threshold=conf,
                       extra_info={"fieldreid_version": __version__})
    err.print(f"{len(files)} files, {n_dets} detections, {failures} failed, {dt:.1f} s "
              f"({len(files) / max(dt, 1e-9):.2f} images/s) → {out_path}")


@_friendly
def embed(
    paths: Annotated[list[Path], typer.Argument(help="Images or folders (walked recursively).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="NPZ file to write.")] = Path("vectors.npz"),
    crops: CropsOpt = False,
    embedder: Annotated[Path | None, typer.Option(help="Embedder ONNX / plan (default: engines/default).")] = None,
    detector: Annotated[Path | None, typer.Option(help="Detector ONNX / plan (default: engines/default).")] = None,
    conf: Annotated[float, typer.Option(help="Embed animal boxes at or above this confidence.")] = 0.2,
    batch: Annotated[int, typer.Option(help="Images per batch.")] = 4,
    backend: BackendOpt = "auto",
) -> None:
    """Embed animals: one L2-normalised vector per animal box (one per image with --crops)."""
    from fieldreid.cli.common import open_crop_detector
    from fieldreid.embed.pipeline import Pipeline
    from fieldreid.report.megadetector import relative_name
    from fieldreid.storage.fsutil import atomic_write_bytes

    files = _collect(paths)
    emb = _open_embedder(embedder, backend)
    vectors: list[np.ndarray] = []
    names: list[str] = []
    boxes: list[np.ndarray] = []
    confs: list[float] = []
    failures: list[tuple[str, str]] = []
    # one crop rule (fieldreid.crop): a labelled crop's animal is found by the detector too, else it is whole
    det = open_crop_detector(detector, backend, conf) if crops else _open_detector(detector, backend, conf, 0.45)
    pipe = Pipeline(det, emb, batch_size=batch, min_crop_conf=conf, select="crop" if crops else "all")
    for res in _run_pipeline(files, pipe, "embed"):
        name = relative_name(res.path, paths)
        if res.failure:
            failures.append((name, res.failure))
            continue
        h, w = res.size
        for row, (x1, y1, x2, y2) in enumerate(res.boxes):
            vectors.append(res.embeddings[row:row + 1])
            names.append(name)
            boxes.append(np.array([x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h], np.float32))
            confs.append(1.0 if res.whole_image else float(res.detections.confidence[res.animal_index[row]]))
    mat = np.concatenate(vectors) if vectors else np.zeros((0, emb.dim), np.float32)
    buf = io.BytesIO()
    np.savez(buf, vectors=mat.astype(np.float32), files=np.array(names, dtype=str),
             boxes=np.array(boxes, np.float32).reshape(-1, 4), conf=np.array(confs, np.float32),
             model_id=np.array(emb.model_id), failures=np.array(failures, dtype=str).reshape(-1, 2))
    atomic_write_bytes(out_path, buf.getvalue())
    err.print(f"{len(files)} files, {mat.shape[0]} vectors of dim {emb.dim}, {len(failures)} failed → {out_path}")
    for name, reason in failures:
        err.print(f"  [yellow]failed[/] {escape(name)}: {escape(reason)}")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(detect)
    app.command()(embed)
