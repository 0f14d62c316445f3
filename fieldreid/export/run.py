"""What ``fieldreid export`` and ``fieldreid models`` do (torch side; imported only by those commands).

``fieldreid export MODEL [--fp16] [--int8 --calib CROPS] [--profile NAME] [--out PATH]``:

1. MODEL -> FP32 ONNX (dynamic batch, metadata, parity gate against torch, manifest). An ONNX MODEL is
   taken as it is.
2. ``--int8``: a QDQ INT8 ONNX (``<name>.int8.onnx``, or ``--out``) calibrated on real crops and kept only
   if it passes the accuracy gate against FP32 on crops never used for calibration (:mod:`fieldreid.export.quantize`);
   embedders are gated on embedding cosine (mean and 5th percentile) and one-vs-all top-1, detectors on box
   agreement. Where TensorRT is installed, also an INT8 plan built from that QDQ ONNX (strongly typed);
   where it is not, the QDQ ONNX is the artefact (ONNX Runtime runs it).
3. ``--fp16`` / ``--fp32-plan``: a TensorRT plan built on this device (TensorRT required; it is not
   silently replaced by anything else), named by :func:`fieldreid.engines.manifest.plan_path`, the function
   backend selection uses to find it.
4. ``--profile``: a profile (packaged ``fieldreid/export/default_profiles/*.toml`` or the user's own) sets precision,
   input size, batch profile, calibration size and method, and the gate tolerances; explicit flags that
   contradict it are an error.

An option this export would not use is refused with a sentence, never silently dropped.

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


DEFAULT_IMGSZ = 640
#: options that only mean something when a model is quantised to INT8, as the CLI spells them
_INT8_OPTIONS = {"calib": "--calib", "calib_split": "--calib-split", "calib_count": "--calib-count",
                 "calib_method": "--calib-method", "val": "--val", "val_split": "--val-split",
                 "min_cosine": "--min-cosine", "min_cosine_p05": "--min-cosine-p05",
                 "max_top1_drop": "--max-top1-drop", "min_calibration": "min_calibration"}
#: INT8 options of the embedding gate, which detectors (gated on box agreement) do not have
_EMBEDDING_GATE_OPTIONS = ("min_cosine", "min_cosine_p05", "max_top1_drop")


@dataclass
class ExportOptions:
    """What to build. ``None`` fields fall back to the profile, then to the defaults in :mod:`fieldreid.export.quantize`.

    Every option is either used or refused with an :class:`InputError` (:func:`_check_options`): none is
    silently dropped. ``out``: the FP32 ONNX made from a checkpoint, or the INT8 ONNX made from an ONNX
    (a file ending in ``.onnx``, or a folder); plans are written beside the ONNX they are built from.
    """

    out: Path | None = None
    kind: str = "auto"
    imgsz: int | None = None
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
    min_cosine_p05: float | None = None
    arch: str | None = None  # timm architecture of a --kind timm weights file


#: published re-id models (fieldreid.teachers) that export to an embedder ONNX
PUBLISHED_KINDS = ("miewid", "megadescriptor", "timm")


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


def _onnx_metadata(path: Path) -> dict[str, str]:
    from fieldreid.engines.manifest import onnx_metadata

    return onnx_metadata(path)


def _onnx_kind(path: Path) -> str:
    from fieldreid.engines.manifest import onnx_metadata

    return onnx_metadata(path).get("fieldreid.kind", "detector")


def _onnx_stem(path: Path) -> str:
    return path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.stem


def _out_file(out: Path, default_name: str) -> Path:
    """``--out`` as an ``.onnx`` file, or a folder (one that exists, or a path without a suffix)."""
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / default_name
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out}: give a path ending in .onnx, or a folder ({default_name} is written there).")
    return out


def _check_options(model: Path, opts: ExportOptions, profile, kind: str, is_onnx: bool, quantise: bool,
                   qdq_input: bool, published: str | None = None) -> None:
    """Refuse every option this export would not use (and say why) instead of dropping it."""
    if opts.arch is not None and published != "timm":
        raise InputError("--arch names the timm architecture of a weights file exported with --kind timm; "
                         f"{model} is not one (a published folder names its architecture in config.json).")
    if is_onnx:
        if opts.kind != "auto" and (opts.kind == "embedder") != (kind == "embedder"):
            raise InputError(f"--kind {opts.kind}: {model} is an ONNX {kind} (its metadata says so).")
        if opts.imgsz is not None:
            raise InputError(f"--imgsz sets the input size when a detector checkpoint is converted; {model} is "
                             "already ONNX, with its input size fixed. Convert the checkpoint again to change it.")
    elif kind == "embedder" and opts.imgsz is not None and not published:
        raise InputError("--imgsz is the detector input size; an embedder's comes from its checkpoint "
                         "(or the [input] of --profile).")
    used = [flag for name, flag in _INT8_OPTIONS.items() if getattr(opts, name) is not None]
    if not opts.fallback:
        used.append("--no-fallback")
    if used and not quantise:
        why = (f"{model} is already an INT8 QDQ ONNX, so --int8 only builds its TensorRT plan" if qdq_input
               else "they apply to INT8 quantisation (--int8, or an int8 --profile)")
        raise InputError(f"{', '.join(used)}: {why}; nothing would use them. Leave them out.")
    if quantise and kind != "embedder":
        gate = [_INT8_OPTIONS[n] for n in _EMBEDDING_GATE_OPTIONS if getattr(opts, n) is not None]
        gate += [] if opts.fallback else ["--no-fallback"]
        if gate:
            raise InputError(f"{', '.join(gate)}: options of the embedder's INT8 gate (embedding cosine, top-1, "
                             "FP32 fallback); a detector's INT8 is gated on box agreement with FP32.")
    if profile is not None and kind != "embedder" and not is_onnx and opts.imgsz is not None \
            and (opts.imgsz, opts.imgsz) != profile.input_size:
        raise InputError(f"--imgsz {opts.imgsz} contradicts profile {profile.name} "
                         f"({profile.input_height}x{profile.input_width}).")
    if opts.out is not None and is_onnx and not quantise:
        raise InputError(f"--out: {model} is already ONNX and only a TensorRT plan is built from it, which is written "
                         "beside its ONNX, where backend selection and the ONNX Runtime fallback find it. Copy the "
                         "ONNX where you want the plan and export that copy.")


def export_fp32_onnx(model: Path, out: Path, kind: str = "auto", imgsz: int | tuple[int, int] = DEFAULT_IMGSZ,
                     input_size: tuple[int, int] | None = None) -> tuple[Path, str]:
    """Checkpoint -> FP32 ONNX + manifest; returns (path, 'embedder' | 'detector')."""
    if kind == "embedder" or (kind == "auto" and is_embedder_checkpoint(model)):
        from fieldreid.embed.model import load_checkpoint
        from fieldreid.export.embedder_onnx import export_embedder_onnx
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
        from fieldreid.export.detector_onnx import convert_detector

        convert_detector(model, out, imgsz=imgsz, kind=kind)
        return out, "detector"
    raise FieldreidError(f"Unknown --kind {kind!r}: use auto, yolov5, ultralytics, embedder, "
                         f"{', '.join(PUBLISHED_KINDS)}.")


def _held_out(opts: ExportOptions, count: int, val_limit: int, max_side: int, log):
    """Calibration and validation images that share no file (:func:`fieldreid.export.quantize.held_out_sets`)."""
    from fieldreid.export.quantize import held_out_sets, read_crops

    # --val-split without --val: validation rows from the --calib metadata.csv
    val_src = opts.val if opts.val is not None else (opts.calib if opts.val_split is not None else None)
    sets = held_out_sets(opts.calib, opts.calib_split, val_src, opts.val_split, calib_limit=count,
                         val_limit=val_limit)
    calib, _ = read_crops(sets.calib, max_side=max_side)
    val, labels = read_crops(sets.val, max_side=max_side)
    v = sets.info["validation"]
    log(f"calibration: {len(calib)} images from {opts.calib}" + (f" [{opts.calib_split}]" if opts.calib_split else ""))
    log(f"validation: {len(val)} images from {v['source']}" + (f" [{v['split']}]" if v["split"] else "")
        + f" ({v['held_out']})")
    return calib, val, labels, sets.info


def _int8_embedder(onnx_path: Path, out: Path, opts: ExportOptions, profile, log) -> tuple[Path, dict]:
    from fieldreid.engines.manifest import onnx_metadata, sha256_file, write_manifest
    from fieldreid.export.quantize import (
        DEFAULT_CALIBRATION_CROPS,
        DEFAULT_MAX_TOP1_DROP,
        DEFAULT_MIN_COSINE,
        DEFAULT_MIN_COSINE_P05,
        MIN_CALIBRATION_CROPS,
        VALIDATION_CROPS,
        quantize_embedder,
        speed_vs_fp32,
    )

    if opts.calib is None:
        raise InputError("INT8 needs real crops to calibrate on: add --calib FOLDER|metadata.csv "
                         f"({DEFAULT_CALIBRATION_CROPS} or more crops like the ones the device will see).")
    count = opts.calib_count or (profile.calibration_crops if profile else 0) or DEFAULT_CALIBRATION_CROPS
    method = opts.calib_method or (profile.calibration_method if profile else "minmax")
    per_channel = profile.per_channel if profile else True
    # Without a profile: symmetric int8 activations, the QDQ form both TensorRT and ONNX Runtime run.
    activations = profile.activations if profile else "int8"
    min_cos = opts.min_cosine if opts.min_cosine is not None else (profile.min_cosine if profile else DEFAULT_MIN_COSINE)
    min_p05 = (opts.min_cosine_p05 if opts.min_cosine_p05 is not None
               else (profile.min_cosine_p05 if profile else DEFAULT_MIN_COSINE_P05))
    max_drop = (opts.max_top1_drop if opts.max_top1_drop is not None
                else (profile.max_top1_drop if profile else DEFAULT_MAX_TOP1_DROP))
    calib, val, labels, held = _held_out(opts, count, VALIDATION_CROPS, 512, log)
    labelled = all(lab is not None for lab in labels)
    log(f"gate: cosine mean >= {min_cos}, 5th percentile >= {min_p05}"
        + (f", top-1 drop <= {max_drop}" if labelled else " (unlabelled crops: no top-1 check)"))
    report = quantize_embedder(onnx_path, out, calib, val, labels if labelled else None, method=method,
                               per_channel=per_channel, min_cosine=min_cos, max_top1_drop=max_drop,
                               fallback=opts.fallback,
                               min_calibration=opts.min_calibration or MIN_CALIBRATION_CROPS, log=log,
                               min_cosine_p05=min_p05, activations=activations)
    log(f"INT8 gate PASS on {report.gate.n} held-out crops: {report.gate.cosine_text()}"
        + (f", top-1 {report.gate.top1_fp32:.3f} -> {report.gate.top1_int8:.3f}" if report.gate.top1_fp32 is not None
           else ""))
    meta = onnx_metadata(out)
    from fieldreid.embed.runtime import preprocess_images
    from fieldreid.types import PreprocessSpec

    speed = speed_vs_fp32(onnx_path, out, preprocess_images(
        val[:16], PreprocessSpec.from_json(meta["fieldreid.preprocess"])))
    vnni = "AVX-512 VNNI" if speed["avx512_vnni"] else "AVX-VNNI" if speed["avx_vnni"] else "no VNNI"
    log(f"INT8 on ONNX Runtime CPU here ({vnni}): {speed['speedup']:.2f}x FP32 throughput "
        f"({speed['int8_ms_per_item']:.1f} vs {speed['fp32_ms_per_item']:.1f} ms/crop, batch {speed['batch']})"
        + ("" if speed["speedup"] > 1.0 else
           " — slower than FP32: on this CPU keep the FP32 model"
           + (" (symmetric int8 activations are TensorRT's form; --profile cpu-int8 quantises uint8 "
              "activations, which ONNX Runtime's CPU kernels run fast)" if activations == "int8" else "")))
    info = {
        "kind": "embedder",
        "model_id": meta.get("fieldreid.model_id", ""),
        "precision": "int8-qdq",
        "runs_on": (["onnxruntime (CPU)", "tensorrt (strongly typed, from this QDQ file)"] if activations == "int8"
                    else ["onnxruntime (CPU)"]),
        "source": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": "fp32"},
        "preprocess": json.loads(meta.get("fieldreid.preprocess", "{}")),
        **({"licence": meta["fieldreid.licence"]} if meta.get("fieldreid.licence") else {}),
        "speed_vs_fp32_here": speed,
        "quantization": {"format": "QDQ", "activations": ("int8 symmetric per-tensor" if activations == "int8"
                                                          else "uint8 asymmetric per-tensor"),
                         "weights": f"int8 symmetric {'per-channel' if per_channel else 'per-tensor'}",
                         "calibration_method": method, "calibration_crops": report.calibration_crops,
                         "calibration_source": str(opts.calib), "calibration_split": opts.calib_split,
                         "fp32_nodes": report.excluded_nodes},
        "gate": {**report.gate.to_dict(), "validation_source": held["validation"]["source"],
                 "validation_split": held["validation"]["split"], "held_out": held["validation"]["held_out"],
                 "attempts": report.attempts},
        "profile": profile.name if profile else None,
        "versions": _versions(),
    }
    write_manifest(out, info)
    return out, info


def _int8_detector(onnx_path: Path, out: Path, opts: ExportOptions, profile, log) -> tuple[Path, dict]:
    from fieldreid.engines.manifest import onnx_metadata, sha256_file, write_manifest
    from fieldreid.export.quantize import DEFAULT_CALIBRATION_CROPS, MIN_CALIBRATION_CROPS, quantize_detector

    if opts.calib is None:
        raise InputError("INT8 detectors need real camera-trap frames to calibrate on: add --calib FOLDER.")
    count = opts.calib_count or (profile.calibration_crops if profile else 0) or DEFAULT_CALIBRATION_CROPS
    method = opts.calib_method or (profile.calibration_method if profile else "minmax")
    per_channel = profile.per_channel if profile else True
    activations = profile.activations if profile else "int8"
    frames, val, _, held = _held_out(opts, count, 200, 1600, log)
    agree = quantize_detector(onnx_path, out, frames, val, method=method, per_channel=per_channel,
                              min_calibration=opts.min_calibration or MIN_CALIBRATION_CROPS, log=log,
                              activations=activations)
    log(f"INT8 detector gate: {agree['matched_fraction']:.1%} of {agree['ref_boxes']} FP32 boxes matched, "
        f"mean IoU {agree['mean_iou']:.3f} PASS")
    log(agree["verdict"])  # one sentence: faster than FP32 on this CPU, or keep the FP32 detector
    meta = onnx_metadata(out)
    speed = agree.pop("speed_vs_fp32_here")
    info = {"kind": "detector", "model_id": meta.get("fieldreid.model_id", ""), "precision": "int8-qdq",
            "runs_on": (["onnxruntime (CPU)", "tensorrt (strongly typed, from this QDQ file)"] if activations == "int8"
                        else ["onnxruntime (CPU)"]),
            "source": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": "fp32"},
            "speed_vs_fp32_here": speed,
            "quantization": {"format": "QDQ", "calibration_frames": len(frames), "calibration_method": method,
                             "per_channel": per_channel, "activations": activations,
                             "calibration_source": str(opts.calib),
                             "calibration_split": opts.calib_split,
                             "fp32_nodes": [n for n in meta.get("fieldreid.int8.excluded_nodes", "").split(",") if n]},
            "gate": {**agree, "validation_source": held["validation"]["source"],
                     "validation_split": held["validation"]["split"], "held_out": held["validation"]["held_out"]},
            "profile": profile.name if profile else None, "versions": _versions()}
    write_manifest(out, info)
    return out, info


def _check_profile_size(model: Path, profile) -> None:
    from fieldreid.engines.manifest import onnx_metadata
    from fieldreid.types import PreprocessSpec

    meta = onnx_metadata(model)
    if "fieldreid.preprocess" not in meta:
        return
    spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
    if tuple(spec.size) != profile.input_size:
        raise InputError(f"{model} takes {spec.size[0]}x{spec.size[1]} inputs, profile {profile.name} wants "
                         f"{profile.input_height}x{profile.input_width}; export from the checkpoint instead.")


def run_export(model: str | Path, opts: ExportOptions | None = None,
               log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """The whole ``fieldreid export``; see the module docstring. Returns the files written and notes."""
    from fieldreid.engines.manifest import has_qdq, plan_path
    from fieldreid.export.profiles import load_profile

    opts = opts or ExportOptions()
    model = Path(model)
    if not model.exists():
        raise ModelError(f"{model} does not exist.")
    profile = load_profile(opts.profile) if opts.profile else None
    plan_precision, make_int8 = _resolve_precision(opts, profile)
    is_onnx = model.suffix.lower() == ".onnx"
    qdq_input = False
    published = None  # miewid | megadescriptor | timm: a published model (fieldreid.teachers)
    if is_onnx:
        kind = _onnx_kind(model)
        if make_int8 and has_qdq(model):  # quantised (and gated) by an earlier export: only the plan is left
            make_int8, qdq_input = False, True
    elif opts.kind in PUBLISHED_KINDS or (opts.kind == "auto" and (model.is_dir() or
                                                                   model.suffix.lower() == ".safetensors")):
        from fieldreid.teachers import detect_kind

        kind, published = "embedder", opts.kind if opts.kind in PUBLISHED_KINDS else detect_kind(model)
        if published is None:
            raise InputError(f"{model} has no config.json beside it to say what model it is: export it with "
                             "--kind timm --arch NAME (its timm architecture).")
    elif opts.kind == "embedder" or (opts.kind == "auto" and is_embedder_checkpoint(model)):
        kind = "embedder"
    else:
        kind = "detector"
    _check_options(model, opts, profile, kind, is_onnx, make_int8, qdq_input, published)
    if qdq_input and _onnx_metadata(model).get("fieldreid.int8.activations") == "uint8":
        raise InputError(f"{model} is an INT8 ONNX with uint8 activations, made for ONNX Runtime on a CPU; "
                         "TensorRT needs symmetric int8 activations: export the FP32 ONNX it was made from with "
                         "--int8 (or a TensorRT int8 --profile).")
    if qdq_input and plan_precision is None:
        raise BackendUnavailableError(f"{model} is already an INT8 QDQ ONNX; building its plan needs "
                                      "TensorRT, which is not installed here. To quantise again, export the FP32 "
                                      "ONNX it was made from.")
    if not make_int8 and plan_precision is None and is_onnx:
        raise FieldreidError(f"{model} is already ONNX; pass --fp16, --fp32-plan, --int8 or --profile.")
    res = ExportResult()

    if is_onnx:
        onnx_path = model
        if profile is not None:
            _check_profile_size(model, profile)
    elif published:
        from fieldreid.teachers import export_published

        name = model.name if model.is_dir() else model.stem
        onnx_path = _out_file(opts.out, name + ".onnx") if opts.out else model.parent / (name + ".onnx")
        size = opts.imgsz or (profile.input_size if profile is not None else None)
        onnx_path, teacher = export_published(model, onnx_path, published, opts.arch, size)
        res.written += [onnx_path, onnx_path.with_name(onnx_path.name + ".json")]
        h, w = teacher.preprocess.size
        log(f"FP32 ONNX {onnx_path}: {teacher.kind} {teacher.backbone_name}, {teacher.embedding_dim}-d, {h}x{w} "
            f"input (parity gate against torch passed)")
        res.notes.append(f"licence of {teacher.model_id}: {teacher.licence}")
    else:
        onnx_path = _out_file(opts.out, model.stem + ".onnx") if opts.out else model.with_suffix(".onnx")
        imgsz = opts.imgsz or (profile.input_size if profile is not None else DEFAULT_IMGSZ)
        onnx_path, kind = export_fp32_onnx(model, onnx_path, kind if kind == "embedder" else opts.kind, imgsz,
                                           profile.input_size if profile is not None else None)
        res.written += [onnx_path, onnx_path.with_name(onnx_path.name + ".json")]
        log(f"FP32 ONNX {onnx_path} (parity gate against torch passed)")

    plan_source = onnx_path
    if make_int8:
        default_name = _onnx_stem(onnx_path) + ".int8.onnx"
        int8_out = _out_file(opts.out, default_name) if opts.out and is_onnx else onnx_path.with_name(default_name)
        if int8_out.resolve() == onnx_path.resolve():
            raise InputError(f"--out {opts.out} is the FP32 model itself; the INT8 model needs another path.")
        if kind == "embedder":
            int8_path, info = _int8_embedder(onnx_path, int8_out, opts, profile, log)
        else:
            int8_path, info = _int8_detector(onnx_path, int8_out, opts, profile, log)
        res.gate = info["gate"]
        res.written += [int8_path, int8_path.with_name(int8_path.name + ".json")]
        plan_source = int8_path
        if plan_precision is None and info["quantization"].get("activations", "").startswith("uint8"):
            res.notes.append("uint8 activations: this INT8 ONNX is for ONNX Runtime on a CPU; for TensorRT export "
                             "the FP32 ONNX with --int8 or a TensorRT int8 --profile (symmetric int8).")
        elif plan_precision is None:
            res.notes.append("TensorRT is not installed here: no INT8 plan built; the QDQ ONNX runs on ONNX Runtime "
                             f"and a Jetson builds its plan with `fieldreid export {int8_path} --int8`.")

    if plan_precision is not None:
        from fieldreid.engines.tensorrt.runner import build_plan

        if plan_precision == "int8" and not make_int8 and not qdq_input:
            raise FieldreidError("An INT8 plan needs a QDQ ONNX; pass --calib so fieldreid can make one.")
        plan_file = plan_path(plan_source, plan_precision)
        kwargs = profile.build_kwargs() if profile is not None else {"precision": plan_precision}
        build_plan(plan_source, plan_file, **kwargs)
        res.written += [plan_file, plan_file.with_name(plan_file.name + ".json")]
    return res


def export_model(model: Path, out: Path | None = None, kind: str = "auto", imgsz: int | None = None,
                 plan: str | None = None) -> list[Path]:
    """Older entry point: checkpoint -> ONNX, and with ``plan`` (fp16 | fp32 | int8) a TensorRT plan."""
    opts = ExportOptions(out=out, kind=kind, imgsz=imgsz, fp16=plan == "fp16", fp32_plan=plan == "fp32",
                         int8=plan == "int8")
    if plan == "int8" and Path(model).suffix.lower() == ".onnx":
        from fieldreid.engines.manifest import plan_path
        from fieldreid.engines.tensorrt.runner import build_plan

        target = plan_path(model, "int8")
        build_plan(model, target, precision="int8")
        return [target]
    return [p for p in run_export(model, opts).written if p.suffix != ".json"]


def build_defaults(yolov5: Path | None = None, force: bool = False, out_dir: Path | None = None) -> list[Path]:
    """Write the default embedder (and detector, given a YOLOv5/MegaDetector checkpoint) into ``out_dir``."""
    from fieldreid.defaults import DETECTOR_NAME, EMBEDDER_NAME, models_dir

    out_dir = Path(out_dir) if out_dir else models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    emb = out_dir / EMBEDDER_NAME
    if force or not emb.exists():
        from fieldreid.embed.model import build_default_embedder
        from fieldreid.export.embedder_onnx import export_embedder_onnx

        net, spec, model_id = build_default_embedder()
        export_embedder_onnx(net, emb, spec, model_id)
    written.append(emb)
    det = out_dir / DETECTOR_NAME
    # A detector converted before height/width became dynamic (no fieldreid.dynamic_shape) is converted again:
    # the default detector letterboxes 4:3 and 16:9 frames to rectangles (README *Issue 17*).
    stale = det.exists() and _onnx_metadata(det).get("fieldreid.dynamic_shape") is None
    if yolov5 is not None and Path(yolov5).exists() and (force or stale or not det.exists()):
        from fieldreid.export.detector_onnx import convert_detector

        convert_detector(Path(yolov5), det, imgsz=640, kind="auto", dynamic_shape=True)
    if det.exists():
        written.append(det)
    return written
