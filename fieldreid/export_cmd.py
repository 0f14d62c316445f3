"""What ``fieldreid export`` and ``fieldreid models`` do (torch side; imported only by those commands).

``fieldreid export MODEL [--fp16] [--int8 --calib CROPS] [--profile NAME] [--out PATH]``:

1. MODEL -> FP32 ONNX (dynamic batch, metadata, parity gate against torch, manifest). An ONNX MODEL is
   taken as it is.
2. ``--int8``: a QDQ INT8 ONNX (``<name>.int8.onnx``) calibrated on real crops and kept only if it passes
   the accuracy gate against FP32 (:mod:`fieldreid.quantize`); embedders are gated on embedding cosine and
   one-vs-all top-1, detectors on box agreement. Where TensorRT is installed, also an INT8 plan built from
   that QDQ ONNX (strongly typed); where it is not, the QDQ ONNX is the artefact (ONNX Runtime runs it).
3. ``--fp16`` / ``--fp32-plan``: a TensorRT plan built on this device (TensorRT required; it is not
   silently replaced by anything else).
4. ``--profile``: an ``export/*.toml`` profile sets precision, input size, batch profile, calibration size
   and method, and the gate tolerances; explicit flags that contradict it are an error.

Every artefact gets ``<artefact>.json``: source sha256, precision, versions, preprocessing, gate results.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fieldreid.errors import BackendUnavailableError, FieldreidError, InputError, ModelError


def is_embedder_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a fieldreid embedder checkpoint (weights-only torch file with our format tag)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() == ".onnx":
        return False
    try:
        import torch

        from fieldreid.embed.model import CHECKPOINT_FORMAT
    except ImportError:  # torch missing: cannot be ours to export anyway
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip torch file, or pickled objects that weights_only refuses
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


_is_embedder_checkpoint = is_embedder_checkpoint


@dataclass
class ExportOptions:
    """What to build. ``None`` fields fall back to the profile, then to the defaults in :mod:`fieldreid.quantize`."""

    out: Path | None = None
    kind: str = "auto"
    imgsz: int = 640
    fp16: bool = False
    int8: bool = False
    fp32_plan: bool = False
    calib: Path | None = None
    calib_split: str | None = None
    calib_count: int | None = None
    calib_method: str | None = None
    val: Path | None = None
    val_split: str | None = None
    profile: str | None = None
    min_cosine: float | None = None
    max_top1_drop: float | None = None
    fallback: bool = True
    min_calibration: int | None = None


@dataclass
class ExportResult:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gate: dict | None = None


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "torch", "timm", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _resolve_precision(opts: ExportOptions, profile) -> tuple[str | None, bool]:
    """(TensorRT plan precision or None, whether to make a QDQ INT8 ONNX)."""
    chosen = [n for n, f in (("fp16", opts.fp16), ("int8", opts.int8), ("fp32", opts.fp32_plan)) if f]
    if len(chosen) > 1:
        raise InputError(f"Choose one precision, not {' and '.join('--' + c for c in chosen)}.")
    if profile is not None:
        if chosen and chosen[0] != profile.precision:
            raise InputError(f"--{chosen[0]} contradicts profile {profile.name} (precision {profile.precision}).")
        if profile.precision == "int8":
            return ("int8" if profile.backend == "tensorrt" else None), True
        if profile.backend == "tensorrt":
            return profile.precision, False
        return None, False
    if not chosen:
        return None, False
    if chosen[0] == "int8":
        return ("int8" if _tensorrt_available() else None), True
    return chosen[0], False


def _onnx_kind(path: Path) -> str:
    from fieldreid.engines.manifest import onnx_metadata

    return onnx_metadata(path).get("fieldreid.kind", "detector")


def export_fp32_onnx(model: Path, out: Path, kind: str = "auto", imgsz: int = 640,
                     input_size: tuple[int, int] | None = None) -> tuple[Path, str]:
    """Checkpoint -> FP32 ONNX + manifest; returns (path, 'embedder' | 'detector')."""
    if kind == "embedder" or (kind == "auto" and is_embedder_checkpoint(model)):
        from fieldreid.embed.export import export_embedder_onnx
        from fieldreid.embed.model import load_checkpoint
        from fieldreid.types import PreprocessSpec

        net, meta = load_checkpoint(model)
        spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
        if input_size is not None and tuple(input_size) != tuple(spec.size):
            # GeM pooling makes the embedder size-agnostic; the new size travels in the metadata.
            spec = PreprocessSpec(size=tuple(input_size), mean=spec.mean, std=spec.std, color=spec.color,
                                  resize=spec.resize, interpolation=spec.interpolation, extra=spec.extra)
        export_embedder_onnx(net, out, spec, meta["fieldreid.model_id"], source_path=model)
        return out, "embedder"
    if kind in ("auto", "yolov5", "ultralytics"):
        from fieldreid.detect.convert import convert_detector

        convert_detector(model, out, imgsz=imgsz, kind=kind)
        return out, "detector"
    raise FieldreidError(f"Unknown --kind {kind!r}: use auto, yolov5, ultralytics or embedder.")


def _int8_embedder(onnx_path: Path, opts: ExportOptions, profile, log) -> tuple[Path, dict]:
    from fieldreid.engines.manifest import onnx_metadata, sha256_file, write_manifest
    from fieldreid.quantize import (
        DEFAULT_CALIBRATION_CROPS,
        DEFAULT_MAX_TOP1_DROP,
        DEFAULT_MIN_COSINE,
        MIN_CALIBRATION_CROPS,
        load_crops,
        quantize_embedder,
    )

    if opts.calib is None:
        raise InputError("INT8 needs real crops to calibrate on: add --calib FOLDER|metadata.csv "
                         f"({DEFAULT_CALIBRATION_CROPS} or more crops like the ones the device will see).")
    count = opts.calib_count or (profile.calibration_crops if profile else 0) or DEFAULT_CALIBRATION_CROPS
    method = opts.calib_method or (profile.calibration_method if profile else "minmax")
    per_channel = profile.per_channel if profile else True
    min_cos = opts.min_cosine if opts.min_cosine is not None else (profile.min_cosine if profile else DEFAULT_MIN_COSINE)
    max_drop = (opts.max_top1_drop if opts.max_top1_drop is not None
                else (profile.max_top1_drop if profile else DEFAULT_MAX_TOP1_DROP))
    calib, _ = load_crops(opts.calib, limit=count, split=opts.calib_split, seed=0)
    log(f"calibration: {len(calib)} crops from {opts.calib}" + (f" [{opts.calib_split}]" if opts.calib_split else ""))
    val_src, val_split = (opts.val, opts.val_split) if opts.val is not None else (opts.calib, opts.calib_split)
    val, labels = load_crops(val_src, limit=400, split=val_split, seed=1)
    labelled = all(lab is not None for lab in labels)
    log(f"gate: {len(val)} {'labelled ' if labelled else ''}crops from {val_src}"
        + (f" [{val_split}]" if val_split else "") + f"; cosine >= {min_cos}, top-1 drop <= {max_drop}")
    out = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    report = quantize_embedder(onnx_path, out, calib, val, labels if labelled else None, method=method,
                               per_channel=per_channel, min_cosine=min_cos, max_top1_drop=max_drop,
                               fallback=opts.fallback,
                               min_calibration=opts.min_calibration or MIN_CALIBRATION_CROPS, log=log)
    meta = onnx_metadata(out)
    info = {
        "kind": "embedder",
        "model_id": meta.get("fieldreid.model_id", ""),
        "precision": "int8-qdq",
        "runs_on": ["onnxruntime (CPU)", "tensorrt (strongly typed, from this QDQ file)"],
        "source": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": "fp32"},
        "preprocess": json.loads(meta.get("fieldreid.preprocess", "{}")),
        "quantization": {"format": "QDQ", "activations": "int8 symmetric per-tensor",
                         "weights": f"int8 symmetric {'per-channel' if per_channel else 'per-tensor'}",
                         "calibration_method": method, "calibration_crops": report.calibration_crops,
                         "calibration_source": str(opts.calib), "calibration_split": opts.calib_split,
                         "fp32_nodes": report.excluded_nodes},
        "gate": {**report.gate.to_dict(), "validation_source": str(val_src), "validation_split": val_split,
                 "attempts": report.attempts},
        "profile": profile.name if profile else None,
        "versions": _versions(),
    }
    write_manifest(out, info)
    return out, info


def _int8_detector(onnx_path: Path, opts: ExportOptions, profile, log) -> tuple[Path, dict]:
    from fieldreid.engines.manifest import onnx_metadata, sha256_file, write_manifest
    from fieldreid.quantize import (
        DEFAULT_CALIBRATION_CROPS,
        MIN_CALIBRATION_CROPS,
        load_crops,
        quantize_detector,
    )

    if opts.calib is None:
        raise InputError("INT8 detectors need real camera-trap frames to calibrate on: add --calib FOLDER.")
    count = opts.calib_count or (profile.calibration_crops if profile else 0) or DEFAULT_CALIBRATION_CROPS
    frames, _ = load_crops(opts.calib, limit=count, split=opts.calib_split, max_side=1600)
    val_src = opts.val or opts.calib
    val, _ = load_crops(val_src, limit=200, split=opts.val_split, seed=1, max_side=1600)
    out = onnx_path.with_name(onnx_path.stem + ".int8.onnx")
    agree = quantize_detector(onnx_path, out, frames, val,
                              min_calibration=opts.min_calibration or MIN_CALIBRATION_CROPS, log=log)
    log(f"INT8 detector gate: {agree['matched_fraction']:.1%} of {agree['ref_boxes']} FP32 boxes matched, "
        f"mean IoU {agree['mean_iou']:.3f} PASS")
    meta = onnx_metadata(out)
    info = {"kind": "detector", "model_id": meta.get("fieldreid.model_id", ""), "precision": "int8-qdq",
            "source": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": "fp32"},
            "quantization": {"format": "QDQ", "calibration_frames": len(frames),
                             "calibration_source": str(opts.calib)},
            "gate": {**agree, "validation_source": str(val_src)}, "versions": _versions()}
    write_manifest(out, info)
    return out, info


def run_export(model: str | Path, opts: ExportOptions | None = None,
               log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """The whole ``fieldreid export``; see the module docstring. Returns the files written and notes."""
    from fieldreid.engines.profiles import load_profile

    opts = opts or ExportOptions()
    model = Path(model)
    if not model.exists():
        raise ModelError(f"{model} does not exist.")
    profile = load_profile(opts.profile) if opts.profile else None
    plan_precision, make_int8 = _resolve_precision(opts, profile)
    res = ExportResult()

    if model.suffix.lower() == ".onnx":
        onnx_path, kind = model, _onnx_kind(model)
        if profile is not None and kind == "embedder":
            from fieldreid.engines.manifest import onnx_metadata
            from fieldreid.types import PreprocessSpec

            spec = PreprocessSpec.from_json(onnx_metadata(model)["fieldreid.preprocess"])
            if tuple(spec.size) != profile.input_size:
                raise InputError(f"{model} takes {spec.size[0]}x{spec.size[1]} inputs, profile {profile.name} wants "
                                 f"{profile.input_height}x{profile.input_width}; export from the checkpoint instead.")
    else:
        out = Path(opts.out) if opts.out else model.with_suffix(".onnx")
        if out.suffix.lower() != ".onnx":
            out = out / (model.stem + ".onnx") if out.is_dir() or not out.suffix else out.with_suffix(".onnx")
        size = profile.input_size if profile is not None else None
        onnx_path, kind = export_fp32_onnx(model, out, opts.kind, opts.imgsz, size)
        res.written += [onnx_path, onnx_path.with_name(onnx_path.name + ".json")]
        log(f"FP32 ONNX {onnx_path} (parity gate against torch passed)")

    plan_source = onnx_path
    if make_int8 and model.suffix.lower() == ".onnx":
        from fieldreid.engines.manifest import has_qdq

        if has_qdq(model):  # already quantised (and gated) by an earlier export: only the plan is left to build
            make_int8 = False
            if plan_precision is None:
                raise BackendUnavailableError(f"{model} is already an INT8 QDQ ONNX; building its plan needs "
                                              "TensorRT, which is not installed here.")
    if make_int8:
        if kind == "embedder":
            int8_path, info = _int8_embedder(onnx_path, opts, profile, log)
        else:
            int8_path, info = _int8_detector(onnx_path, opts, profile, log)
        res.gate = info["gate"]
        res.written += [int8_path, int8_path.with_name(int8_path.name + ".json")]
        plan_source = int8_path
        if plan_precision is None:
            res.notes.append("TensorRT is not installed here: no INT8 plan built; the QDQ ONNX runs on ONNX Runtime "
                             "and a Jetson builds its plan with `fieldreid export MODEL.int8.onnx --int8`.")
    elif model.suffix.lower() == ".onnx" and plan_precision is None:
        raise FieldreidError(f"{model} is already ONNX; pass --fp16, --fp32-plan, --int8 or --profile.")

    if plan_precision is not None:
        from fieldreid.engines.manifest import has_qdq
        from fieldreid.engines.tensorrt import build_plan

        if plan_precision == "int8" and not make_int8 and not (model.suffix.lower() == ".onnx" and has_qdq(model)):
            raise FieldreidError("An INT8 plan needs a QDQ ONNX; pass --calib so fieldreid can make one.")
        plan_path = plan_source.with_suffix(".engine") if plan_precision != "fp16" else \
            plan_source.with_name(plan_source.stem + ".fp16.engine")
        kwargs = profile.build_kwargs() if profile is not None else {"precision": plan_precision}
        build_plan(plan_source, plan_path, **kwargs)
        res.written += [plan_path, plan_path.with_name(plan_path.name + ".json")]
    return res


def export_model(model: Path, out: Path | None = None, kind: str = "auto", imgsz: int = 640,
                 plan: str | None = None) -> list[Path]:
    """Older entry point: checkpoint -> ONNX, and with ``plan`` (fp16 | fp32 | int8) a TensorRT plan."""
    opts = ExportOptions(out=out, kind=kind, imgsz=imgsz, fp16=plan == "fp16", fp32_plan=plan == "fp32",
                         int8=plan == "int8")
    if plan == "int8" and Path(model).suffix.lower() == ".onnx":
        from fieldreid.engines.tensorrt import build_plan

        plan_path = Path(model).with_suffix(".engine")
        build_plan(model, plan_path, precision="int8")
        return [plan_path]
    return [p for p in run_export(model, opts).written if p.suffix != ".json"]


def build_defaults(yolov5: Path | None = None, force: bool = False, out_dir: Path | None = None) -> list[Path]:
    """Write the default embedder (and detector, given a YOLOv5/MegaDetector checkpoint) into ``out_dir``."""
    from fieldreid.defaults import DETECTOR_NAME, EMBEDDER_NAME, models_dir

    out_dir = Path(out_dir) if out_dir else models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    emb = out_dir / EMBEDDER_NAME
    if force or not emb.exists():
        from fieldreid.embed.export import export_embedder_onnx
        from fieldreid.embed.model import build_default_embedder

        net, spec, model_id = build_default_embedder()
        export_embedder_onnx(net, emb, spec, model_id)
    written.append(emb)
    det = out_dir / DETECTOR_NAME
    if yolov5 is not None and Path(yolov5).exists() and (force or not det.exists()):
        from fieldreid.detect.convert import convert_detector

        convert_detector(Path(yolov5), det, imgsz=640, kind="auto")
    if det.exists():
        written.append(det)
    return written
