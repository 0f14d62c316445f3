"""What ``fieldreid export`` and ``fieldreid models`` do (torch side; imported only by those commands)."""

from __future__ import annotations

from pathlib import Path

from fieldreid.errors import FieldreidError, ModelError


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


def export_model(model: Path, out: Path | None = None, kind: str = "auto", imgsz: int = 640,
                 plan: str | None = None) -> list[Path]:
    """Export a checkpoint to ONNX, and with ``plan`` (fp16 | fp32 | int8) a TensorRT plan built from it.

    An INT8 plan needs an ONNX with Q/DQ nodes (explicit quantisation); TensorRT builds it strongly typed.
    Returns the files written.
    """
    model = Path(model)
    if not model.exists():
        raise ModelError(f"{model} does not exist.")
    written: list[Path] = []
    if model.suffix == ".onnx":
        onnx_path = model
    else:
        onnx_path = Path(out) if out else model.with_suffix(".onnx")
        if kind == "embedder" or (kind == "auto" and _is_embedder_checkpoint(model)):
            from fieldreid.embed.export import export_embedder_onnx
            from fieldreid.embed.model import load_checkpoint

            net, meta = load_checkpoint(model)
            from fieldreid.types import PreprocessSpec

            export_embedder_onnx(net, onnx_path, PreprocessSpec.from_json(meta["fieldreid.preprocess"]),
                                 meta["fieldreid.model_id"])
        elif kind in ("auto", "yolov5", "ultralytics"):
            from fieldreid.detect.convert import convert_detector

            convert_detector(model, onnx_path, imgsz=imgsz, kind=kind)
        else:
            raise FieldreidError(f"Unknown --kind {kind!r}: use auto, yolov5, ultralytics or embedder.")
        written.append(onnx_path)
    if plan is not None:
        from fieldreid.engines.tensorrt import build_plan

        plan_path = onnx_path.with_suffix(".engine")
        build_plan(onnx_path, plan_path, precision=plan)
        written.append(plan_path)
    elif model.suffix == ".onnx":
        raise FieldreidError(f"{model} is already ONNX; pass --fp16, --fp32 or --int8 to build a TensorRT plan.")
    return written


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
