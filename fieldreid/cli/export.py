"""``fieldreid export`` and ``fieldreid models``: everything that writes a model artefact (torch side).

:mod:`fieldreid.cli.app` calls :func:`register`; the work is :mod:`fieldreid.export.run`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fieldreid.cli.common import err
from fieldreid.cli.common import friendly as _friendly


@_friendly
def export_cmd(
    model: Annotated[Path | None, typer.Argument(help="A detector checkpoint (YOLOv5 / ultralytics .pt), a fieldreid "
                                                     "embedder checkpoint (.pt), a published re-id model (a MiewID "
                                                     "or MegaDescriptor folder as downloaded, a timm hub folder, or "
                                                     "timm weights with --kind timm --arch) or an ONNX model "
                                                     "(default: the embedder in the device config, else the "
                                                     "default embedder).")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Output ONNX (a .onnx path or a folder): the "
                                                   "FP32 ONNX from a checkpoint, the INT8 ONNX from an ONNX. Plans "
                                                   "go beside the ONNX they are built from.")] = None,
    kind: Annotated[str, typer.Option(help="auto | yolov5 | ultralytics | embedder | miewid | megadescriptor | "
                                           "timm (auto tells a published folder by its config.json)")] = "auto",
    arch: Annotated[str | None, typer.Option(help="timm architecture of a --kind timm weights file.")] = None,
    imgsz: Annotated[int | None, typer.Option(help="Detector input size when converting a checkpoint "
                                                  "(default: the profile's, else 640); for a published "
                                                  "embedder, its input size (default: the published one).")
                     ] = None,
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
    from fieldreid.export.run import ExportOptions, run_export

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
                         fallback=fallback, min_cosine_p05=min_cosine_p05, arch=arch)
    res = run_export(model, opts, log=lambda s: err.print(escape(s)))
    for path in res.written:
        err.print(f"wrote {path}")
    for note in res.notes:
        err.print(f"[yellow]note:[/] {escape(note)}")


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
    from fieldreid.export.run import build_defaults

    for path in build_defaults(yolov5, force=force):
        err.print(f"default model: {path}")
    if thresholds_from is not None:
        from fieldreid.embed.thresholds import ensure_model_thresholds

        ensure_model_thresholds(models_dir() / EMBEDDER_NAME, thresholds_from, split, force=force,
                                log=lambda s: err.print(escape(s), highlight=False))


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command()(models)
