"""The ``fieldreid`` command line. Library errors become one readable line and a non-zero exit."""

from __future__ import annotations

import io
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from fieldreid import __version__
from fieldreid.cli_common import BackendOpt, CropsOpt, err, out
from fieldreid.cli_common import friendly as _friendly
from fieldreid.cli_common import open_detector as _open_detector
from fieldreid.cli_common import open_embedder as _open_embedder
from fieldreid.cli_common import progress_bar as _progress
from fieldreid.errors import FieldreidError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Identify individual animals in camera-trap images, offline.")


def _collect(paths: list[Path]) -> list[Path]:
    from fieldreid.imageio import iter_files

    files = list(iter_files(paths))
    if not files:
        raise FieldreidError(f"No images found under {', '.join(map(str, paths))}.")
    return files


@app.command()
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


@app.command()
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
    from fieldreid.megadetector import failure_entry, image_entry, relative_name, write_batch_output
    from fieldreid.pipeline import Pipeline

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


@app.command()
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
    from fieldreid.cli_common import open_crop_detector
    from fieldreid.fsutil import atomic_write_bytes
    from fieldreid.megadetector import relative_name
    from fieldreid.pipeline import Pipeline

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


@app.command("export")
@_friendly
def export_cmd(
    model: Annotated[Path | None, typer.Argument(help="A detector checkpoint (YOLOv5 / ultralytics .pt), a fieldreid "
                                                     "embedder checkpoint (.pt) or an ONNX model (default: the "
                                                     "embedder in the device config, else the default embedder).")
                     ] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Output ONNX (a .onnx path or a folder): the "
                                                   "FP32 ONNX from a checkpoint, the INT8 ONNX from an ONNX. Plans "
                                                   "go beside the ONNX they are built from.")] = None,
    kind: Annotated[str, typer.Option(help="auto | yolov5 | ultralytics | embedder")] = "auto",
    imgsz: Annotated[int | None, typer.Option(help="Detector input size when converting a checkpoint "
                                                  "(default: the profile's, else 640).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also build a TensorRT FP16 plan (needs TensorRT + GPU).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 QDQ ONNX calibrated on --calib, gated against FP32; "
                                                      "plus a TensorRT INT8 plan where TensorRT is installed.")] = False,
    fp32: Annotated[bool, typer.Option("--fp32", "--fp32-plan", help="Build a TensorRT FP32 plan.")] = False,
    calib: Annotated[Path | None, typer.Option(help="Real crops for INT8 calibration: a folder or a "
                                                    "metadata.csv.")] = None,
    calib_split: Annotated[str | None, typer.Option(help="Rows of a --calib metadata.csv.")] = None,
    calib_count: Annotated[int | None, typer.Option(help="Crops to calibrate on (default: profile, else 256).")
                           ] = None,
    calib_method: Annotated[str | None, typer.Option(help="minmax | entropy | percentile")] = None,
    val: Annotated[Path | None, typer.Option(help="Validation set for the INT8 gate (metadata.csv or folder; "
                                                  "calibration files are removed from it). Default: a held-out "
                                                  "part of --calib, split by name hash.")] = None,
    val_split: Annotated[str | None, typer.Option(help="Rows of a --val metadata.csv.")] = None,
    profile: Annotated[str | None, typer.Option(help="Export profile: a name in export/ or a .toml path.")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="INT8 gate: mean embedding cosine to FP32.")] = None,
    min_cosine_p05: Annotated[float | None, typer.Option(help="INT8 gate: 5th-percentile embedding cosine to FP32 "
                                                              "(default: profile, else 0.95).")] = None,
    max_top1_drop: Annotated[float | None, typer.Option(help="INT8 gate: allowed one-vs-all top-1 drop.")] = None,
    fallback: Annotated[bool, typer.Option(help="On a failed gate, retry with sensitive layers in FP32.")] = True,
) -> None:
    """Checkpoint -> ONNX (FP32, dynamic batch, metadata, parity gate, manifest); INT8 QDQ; TensorRT plans."""
    from fieldreid.config import DeviceConfig
    from fieldreid.export_cmd import ExportOptions, run_export

    device = DeviceConfig.load()  # a configured device: `fieldreid export --int8` works on its own embedder
    if model is None:
        from fieldreid.defaults import default_model

        model = device.path_of("embedder") or default_model("embedder")
    if int8:
        calib = device.require(calib, "calib", "--calib", "calibration crops for INT8 (a folder of real animal "
                               "crops or a metadata.csv)")
    opts = ExportOptions(out=out_path, kind=kind, imgsz=imgsz, fp16=fp16, int8=int8, fp32_plan=fp32, calib=calib,
                         calib_split=calib_split, calib_count=calib_count, calib_method=calib_method, val=val,
                         val_split=val_split, profile=profile, min_cosine=min_cosine, max_top1_drop=max_top1_drop,
                         fallback=fallback, min_cosine_p05=min_cosine_p05)
    res = run_export(model, opts, log=lambda s: err.print(escape(s)))
    for path in res.written:
        err.print(f"wrote {path}")
    for note in res.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")


@app.command()
@_friendly
def models(
    yolov5: Annotated[Path | None, typer.Option(help="YOLOv5/MegaDetector checkpoint to convert as the default "
                                                     "detector.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the files exist.")] = False,
    thresholds_from: Annotated[Path | None, typer.Option(
        help="Labelled metadata.csv of identities the embedder was not trained on (animal crops): choose the "
             "embedder's open-set thresholds on it and write them into its metadata. Without it the model "
             "stays uncalibrated.")] = None,
    split: Annotated[str | None, typer.Option(help="Rows of --thresholds-from to use (e.g. train; never the "
                                                   "split you evaluate on).")] = None,
) -> None:
    """Write the default embedder (EfficientNet-Lite0, ImageNet) and detector into engines/default."""
    from fieldreid.defaults import EMBEDDER_NAME, models_dir
    from fieldreid.export_cmd import build_defaults

    for path in build_defaults(yolov5, force=force):
        err.print(f"default model: {path}")
    if thresholds_from is not None:
        from fieldreid.embed.thresholds import ensure_model_thresholds

        ensure_model_thresholds(models_dir() / EMBEDDER_NAME, thresholds_from, split, force=force,
                                log=lambda s: err.print(escape(s), highlight=False))


def _register_subcommands() -> None:
    from fieldreid.cli_config import register as _register_config
    from fieldreid.cli_gallery import register
    from fieldreid.cli_sync import register as _register_sync
    from fieldreid.cli_watch import register as _register_watch

    register(app)
    _register_config(app)
    _register_sync(app)
    _register_watch(app)
    from fieldreid.cli_train import register as _register_train

    _register_train(app)


_register_subcommands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
