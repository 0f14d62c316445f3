"""Checkpoint -> ONNX conversion for YOLO-family detectors (lab side; needs the ``train`` extra).

torch, onnx and the model libraries are imported inside the functions, so importing this module is cheap.

.. warning::
   ``.pt`` checkpoints are Python pickles: loading one runs code chosen by whoever made the file.
   Convert only checkpoints from a source you trust (the official MegaDetector / YOLOv5 / ultralytics
   releases, checked against the sha256 in ``detector/models.toml``), and ship the ONNX instead.

>>> from fieldreid.export.detector_onnx import convert_detector
>>> convert_detector("md_v5a.0.0.pt", "engines/md_v5a.onnx", imgsz=1280)   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fieldreid.engines.manifest import sha256_file, write_manifest
from fieldreid.errors import InputError, ModelError, missing_extra
from fieldreid.storage.fsutil import atomic_output

KINDS = ("auto", "yolov5", "ultralytics")
#: parity gate between torch and ONNX Runtime on a random batch: |ort - torch| <= ATOL + RTOL * max|torch|.
#: Box outputs are in input pixels (up to imgsz), so a relative term is needed; 1e-4 of 640 px is 0.064 px.
PARITY_ATOL = 1e-3
PARITY_RTOL = 1e-4


# -- loading ----------------------------------------------------------------------------------------------
def _require(package: str, why: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        extra = "dev" if package == "yolov5" else "train"
        raise missing_extra(package, extra, why) from exc


def sniff_checkpoint_kind(path: str | Path) -> str:
    """``yolov5`` or ``ultralytics`` for a ``.pt``/``.yaml`` file, without unpickling anything.

    A torch checkpoint is a zip whose ``data.pkl`` names the classes it needs: YOLOv5 pickles refer to
    ``models.yolo`` (the repo's top-level package), ultralytics pickles to ``ultralytics.nn``.
    """
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return "yolov5" if path.stem.startswith("yolov5") and not path.stem.endswith("u") else "ultralytics"
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            blob = zf.read(pkl) if pkl else b""
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path} is not a torch checkpoint (zip) file: {exc}. Pass kind= if it is.") from exc
    if b"ultralytics.nn" in blob:
        return "ultralytics"
    if b"DDetect" in blob:  # WongKinYiu/yolov9 also pickles `models.yolo`, but its head is not YOLOv5's
        raise ModelError(
            f"{path} is a YOLOv9 checkpoint from the WongKinYiu/yolov9 repo (e.g. MegaDetector v1000-cedar); "
            "fieldreid cannot convert it. Export it with that repo's export.py (output [B, 4+C, N]) and load "
            "the ONNX with Detector(..., layout='ultralytics')."
        )
    if b"models.yolo" in blob or b"models.common" in blob:
        return "yolov5"
    raise ModelError(f"{path} is neither a YOLOv5 nor an ultralytics checkpoint; pass kind= to say which.")


def _load_yolov5(path: Path):
    """A fused, eval-mode YOLOv5 ``DetectionModel`` from a checkpoint (e.g. MegaDetector v5)."""
    torch = _require("torch", "to convert checkpoints")
    yolov5 = _require("yolov5", "its model code unpickles YOLOv5/MegaDetector v5 checkpoints")
    # The pickles name classes as `models.yolo.Model` etc.: the YOLOv5 repo's own top-level packages.
    # The pip package ships them under yolov5/; putting that folder on sys.path lets torch.load find them.
    root = str(Path(yolov5.__file__).parent)
    if root not in sys.path:
        sys.path.append(root)
    import models.yolo as y5  # noqa: F401  (the module the pickle refers to)

    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path} holds no YOLOv5 model (keys: {list(ckpt)[:8] if isinstance(ckpt, dict) else '-'}).")
    model = model.float()
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    if hasattr(model, "fuse"):
        model = model.fuse()
    model.eval()
    # Compatibility with checkpoints pickled by older YOLOv5 / torch (MegaDetector v5 was trained on v6.x).
    for m in model.modules():
        t = type(m).__name__
        if t == "Detect" and not isinstance(getattr(m, "anchor_grid", None), list):
            if hasattr(m, "anchor_grid"):
                delattr(m, "anchor_grid")
            m.anchor_grid = [torch.zeros(1)] * m.nl
        if t == "Detect" and not isinstance(getattr(m, "grid", None), list):
            m.grid = [torch.zeros(1)] * m.nl
        if isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
    return model


def _load_ultralytics(source):
    """A fused, eval-mode ultralytics ``DetectionModel`` from a ``.pt``, a ``.yaml``, a ``YOLO`` or a model."""
    torch = _require("torch", "to convert checkpoints")
    # Never let ultralytics install packages or reach its hub while we convert.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    if isinstance(source, torch.nn.Module) and not hasattr(source, "predictor"):
        model = source
    elif hasattr(source, "model") and isinstance(getattr(source, "model", None), torch.nn.Module):
        model = source.model  # an ultralytics YOLO object
    else:
        path = Path(source)
        if path.suffix.lower() in (".yaml", ".yml"):
            _require("ultralytics", "to build models from yaml")
            from ultralytics.nn.tasks import DetectionModel

            model = DetectionModel(str(path), verbose=False)
        else:
            _require("ultralytics", "its model code unpickles ultralytics checkpoints")
            from ultralytics.nn.tasks import load_checkpoint

            model, _ = load_checkpoint(str(path))
    import copy

    model = copy.deepcopy(model).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "fuse"):
        model = model.fuse(verbose=False)
    return model


def _names_list(names) -> list[str]:
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names]


def _wrap_first_output(model, torch):
    """A module returning only the decoded tensor (YOLOv5 returns ``(y, raw)``, ultralytics ``y``)."""

    class FirstOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            while isinstance(y, tuple | list):
                y = y[0]
            return y

    return FirstOutput(model).eval()


def _wrap_raw_head(model, torch):
    """A YOLOv5 model whose Detect layer returns its raw per-stride logits ``[B, na, ny, nx, 5 + C]``."""

    class RawHead(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            head = self.inner.model[-1]
            head.training = True  # Detect returns its inputs, reshaped, before any decoding
            try:
                return tuple(self.inner(x))
            finally:
                head.training = False

    return RawHead(model).eval()


def _prepare(source, kind: str, raw_head: bool, dynamic_shape: bool = False):
    """(torch module to export, layout, names, strides, anchors in pixels or None, head).

    ``dynamic_shape``: the head rebuilds its grids from each input's shape (YOLOv5's and ultralytics' own
    ``dynamic`` flag), so the traced graph computes them from the input instead of baking in one size."""
    import torch

    if kind == "yolov5":
        if isinstance(source, torch.nn.Module):
            import copy

            model = copy.deepcopy(source).float().eval()  # we flip export flags on it: leave the caller's alone
        else:
            model = _load_yolov5(Path(source))
        head = model.model[-1]
        if type(head).__name__ != "Detect":
            raise ModelError(f"Only YOLOv5 detection models can be converted, not {type(head).__name__}.")
        strides = [float(s) for s in head.stride]
        anchors = (head.anchors.detach().cpu() * head.stride.view(-1, 1, 1)).tolist()
        names = _names_list(model.names)
        if raw_head:  # the grids are made in numpy (decode.raw_to_yolov5) from each output's own shape
            return _wrap_raw_head(model, torch), "yolov5-raw", names, strides, anchors, head
        head.export = True  # one output tensor
        head.dynamic = bool(dynamic_shape)
        return _wrap_first_output(model, torch), "yolov5", names, strides, anchors, head
    if raw_head:
        raise InputError("raw_head=True applies to YOLOv5 checkpoints only.")
    model = _load_ultralytics(source)
    head = model.model[-1]
    if not hasattr(head, "nc") or type(head).__name__ not in ("Detect", "v10Detect"):
        raise ModelError(f"Only ultralytics detection models can be converted, not {type(head).__name__}.")
    head.export, head.format, head.dynamic = True, "onnx", bool(dynamic_shape)
    layout = "end2end" if getattr(head, "end2end", False) else "ultralytics"
    strides = [float(s) for s in model.stride]
    return _wrap_first_output(model, torch), layout, _names_list(model.names), strides, None, head


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("fieldreid", "torch", "onnx", "onnxruntime", "yolov5", "ultralytics"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def parity_shapes(size: tuple[int, int], stride: int, dynamic_shape: bool) -> list[tuple[int, int]]:
    """The input shapes the parity gate checks: the square ``size``, and for a model with dynamic spatial axes
    also the rectangles a 4:3 landscape and a 9:16 portrait frame are letterboxed to (as the Detector does)."""
    from fieldreid.detect.letterbox import rect_shape

    shapes = [tuple(size)]
    if dynamic_shape:
        for hw in ((1536, 2048), (1920, 1080)):
            rect = rect_shape(hw, size, stride)
            if rect not in shapes:
                shapes.append(rect)
    return shapes


def _parity(module, onnx_path: Path, shapes: list[tuple[int, int]], batch: int, seed: int = 0) -> dict:
    """Run torch and ONNX Runtime on the same random batch at each input shape; return the worst
    absolute/relative error over all of them (and the shapes checked)."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    worst_abs, worst_scale, ok = 0.0, 0.0, True
    for hw in shapes:
        x = rng.random((batch, 3, *hw), dtype=np.float32)
        with torch.inference_mode():
            ref = module(torch.from_numpy(x))
        ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        ref = [r.float().numpy() for r in ref]
        got = sess.run(None, {sess.get_inputs()[0].name: x})
        if len(got) != len(ref):
            raise ModelError(f"Parity gate: torch gives {len(ref)} outputs, ONNX {len(got)}.")
        for r, g in zip(ref, got, strict=True):
            if r.shape != g.shape:
                raise ModelError(f"Parity gate at input {hw[0]}x{hw[1]}: torch output shape {r.shape} but ONNX "
                                 f"{g.shape}.")
            diff = float(np.abs(r - g).max()) if r.size else 0.0
            scale = float(np.abs(r).max()) if r.size else 0.0
            worst_abs, worst_scale = max(worst_abs, diff), max(worst_scale, scale)
            ok &= diff <= PARITY_ATOL + PARITY_RTOL * scale
    return {"max_abs_diff": worst_abs, "max_abs_ref": worst_scale, "batch": batch, "ok": ok,
            "shapes": [list(hw) for hw in shapes]}


def convert_detector(
    checkpoint,
    out_onnx: str | Path,
    imgsz: int | tuple[int, int] = 640,
    kind: str = "auto",
    raw_head: bool = False,
    dynamic_batch: bool = True,
    opset: int = 17,
    model_id: str | None = None,
    dynamic_shape: bool = True,
) -> dict[str, Any]:
    """Export a YOLOv5 (incl. MegaDetector v5) or ultralytics (YOLOv8/11, MDv1000, YOLOv10) detector to ONNX.

    ``checkpoint``: a ``.pt`` path (a pickle: trusted files only, see the module warning), an ultralytics
    ``.yaml``, an ultralytics ``YOLO`` object or a ``torch.nn.Module``. ``imgsz``: the fixed input size
    (h, w) or one int; MegaDetector v5 was trained at 1280. ``raw_head`` (YOLOv5 only) exports the head
    before its decoding (``yolov5-raw`` layout, decoded in numpy). ``dynamic_batch`` makes the batch axis
    dynamic. ``dynamic_shape`` (the default) makes height and width dynamic too, so that ONNX Runtime can run
    each frame at its smallest stride-multiple rectangle (4:3 -> 640 x 480: ~27 % less detector time, the same
    boxes; README *Issue 17*); ``imgsz`` is then the largest input (the long side) and the size the model was
    made for. A TensorRT plan built from such a file is fixed at ``imgsz``
    (:func:`fieldreid.engines.tensorrt.runner.build_plan`); ``dynamic_shape=False`` bakes the size into the ONNX.

    Writes ``out_onnx`` with ``fieldreid.*`` metadata and ``out_onnx + '.json'`` (the manifest), after a
    parity gate (torch vs ONNX Runtime on a random batch, at the square and, when ``dynamic_shape``, at a 4:3
    and a 9:16 rectangle) that raises :class:`ModelError` with the numbers if they disagree. Returns the
    manifest dict.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    torch = _require("torch", "to convert checkpoints")
    onnx = _require("onnx", "to write ONNX files")
    size = (int(imgsz), int(imgsz)) if isinstance(imgsz, int | np.integer) else (int(imgsz[0]), int(imgsz[1]))
    out_onnx = Path(out_onnx)

    source_path: Path | None = None
    if isinstance(checkpoint, str | Path):
        source_path = Path(checkpoint)
        if not source_path.is_file():
            raise ModelError(f"Checkpoint {source_path} does not exist.")
        if kind == "auto":
            kind = sniff_checkpoint_kind(source_path)
    elif kind == "auto":
        kind = "yolov5" if type(checkpoint).__module__.startswith(("models.", "yolov5.")) else "ultralytics"
    source_sha = sha256_file(source_path) if source_path and source_path.suffix.lower() == ".pt" else None

    module, layout, names, strides, anchors, _head = _prepare(checkpoint, kind, raw_head, dynamic_shape)
    stride = int(max(strides))
    if size[0] % stride or size[1] % stride:
        raise InputError(f"imgsz {size} must be a multiple of the model stride {stride}.")

    n_out = len(strides) if layout == "yolov5-raw" else 1
    output_names = [f"output{i}" for i in range(n_out)]
    in_axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_shape:
        in_axes.update({2: "height", 3: "width"})
    # Outputs: the batch, and what follows the input's size: the grid of a raw head, the box count of a flat
    # output ([B, N, 5 + C] yolov5, [B, 4 + C, N] ultralytics); an end2end head keeps its fixed top K.
    out_axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_shape:
        out_axes |= {"yolov5-raw": {2: "ny", 3: "nx"}, "yolov5": {1: "boxes"}, "ultralytics": {2: "boxes"}
                     }.get(layout, {})
    dynamic_axes = ({"images": in_axes, **{n: dict(out_axes) for n in output_names}}
                    if in_axes else None)
    dummy = torch.zeros(1, 3, *size)
    with torch.inference_mode():
        module(dummy)  # build grids/anchors once in eager mode so tracing sees constants
    with atomic_output(out_onnx) as tmp:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python bools in the heads are expected
            # The TorchScript exporter (dynamo=False) handles these heads reliably, with the heads' own
            # ``dynamic`` flag for dynamic spatial axes; the dynamo exporter is newer and slower and gains
            # nothing here.
            torch.onnx.export(
                module, (dummy,), str(tmp), input_names=["images"], output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model_proto = onnx.load(str(tmp))
        onnx.checker.check_model(model_proto)
        if model_id is None:
            basis = source_sha or hashlib.sha256(tmp.read_bytes()).hexdigest()
            model_id = f"{out_onnx.stem}-{basis[:12]}"
        from fieldreid.types import PreprocessSpec

        spec = PreprocessSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="RGB",
                              resize="letterbox", pad_value=114)
        meta = {
            "fieldreid.kind": "detector",
            "fieldreid.layout": layout,
            "fieldreid.names": json.dumps(names),
            "fieldreid.imgsz": json.dumps(list(size)),
            "fieldreid.stride": json.dumps(strides),
            "fieldreid.model_id": model_id,
            "fieldreid.source_sha256": source_sha or "",
            "fieldreid.preprocess": spec.to_json(),
            # "true": height and width are dynamic, the Detector letterboxes to rectangles (imgsz = long side)
            "fieldreid.dynamic_shape": json.dumps(bool(dynamic_shape)),
        }
        if anchors is not None and layout == "yolov5-raw":
            meta["fieldreid.anchors"] = json.dumps(anchors)
        del model_proto.metadata_props[:]
        for k, v in meta.items():
            entry = model_proto.metadata_props.add()
            entry.key, entry.value = k, v
        tmp.write_bytes(model_proto.SerializeToString())
        parity = _parity(module, tmp, parity_shapes(size, stride, dynamic_shape), batch=2 if dynamic_batch else 1)
        if not parity["ok"]:
            raise ModelError(
                f"Parity gate failed for {out_onnx.name}: ONNX Runtime differs from torch by up to "
                f"{parity['max_abs_diff']:.3g} (outputs reach {parity['max_abs_ref']:.3g}; allowed "
                f"{PARITY_ATOL:g} + {PARITY_RTOL:g} x that) at inputs "
                f"{', '.join(f'{h}x{w}' for h, w in parity['shapes'])}. Try another opset"
                + (", or dynamic_shape=False (a fixed input size)" if dynamic_shape else "") + ", or report the model."
            )

    manifest = {
        "kind": "detector",
        "onnx": out_onnx.name,
        "onnx_sha256": sha256_file(out_onnx),
        "source": str(source_path) if source_path else type(checkpoint).__name__,
        "source_sha256": source_sha,
        "source_kind": kind,
        "model_id": model_id,
        "precision": "fp32",
        "layout": layout,
        "names": names,
        "imgsz": list(size),
        "stride": strides,
        "anchors": anchors if layout == "yolov5-raw" else None,
        "opset": opset,
        "dynamic_batch": bool(dynamic_batch),
        # Recorded choice: a dynamic-shape detector is letterboxed to rectangles by the Detector (ONNX Runtime);
        # TensorRT plans built from it are fixed at imgsz.
        "dynamic_shape": bool(dynamic_shape),
        "letterbox": "rect (long side imgsz, short side up to a multiple of the stride)" if dynamic_shape
                     else "square (imgsz)",
        "preprocess": json.loads(spec.to_json()),
        "parity": parity,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    write_manifest(out_onnx, json.loads(json.dumps(manifest, default=str)))
    return manifest
