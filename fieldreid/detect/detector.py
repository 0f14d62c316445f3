"""The detector runtime: an ONNX YOLO model in, :class:`~fieldreid.types.Detections` per image out.

numpy + OpenCV + an :class:`~fieldreid.engines.Engine` only; torch is never imported here.

Preprocessing travels with the model, as the embedder's does: ``fieldreid.preprocess`` in the model's
metadata (written by :mod:`fieldreid.export.detector_onnx`) gives the input size, letterbox padding value,
interpolation, channel order and normalisation. A model without it (an Ultralytics or YOLOv5 export) gets
:func:`yolo_preprocess`: the YOLO convention, letterbox with grey (114) padding, RGB, pixels / 255.

>>> det = Detector("engines/md_v5a.onnx")                      # doctest: +SKIP
>>> [d.xyxy for d in det.detect([cv2.imread("IMG_0001.JPG")])]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import numpy as np

from fieldreid.detect.classes import category_lookup, names_from_metadata, nms_groups
from fieldreid.detect.decode import LAYOUTS, decode
from fieldreid.detect.letterbox import check_image, preprocess, rect_shape, scale_boxes
from fieldreid.engines import Engine, load_engine
from fieldreid.errors import InputError, ModelError
from fieldreid.types import Detections, PreprocessSpec

#: Default confidence threshold. MegaDetector's authors recommend about 0.2 for deciding what to show
#: or count (lower finds more animals at the price of more false boxes on vegetation), and 0.005 when a
#: run should keep everything for later thresholding (their batch files use that). 0.2 is also a sane
#: value for COCO YOLO models on camera-trap frames; re-ID crops below it are mostly too poor to embed.
DEFAULT_CONF = 0.2
DEFAULT_IOU = 0.45
DEFAULT_BATCH = 8  # images per run for dynamic-batch models: ~40 MB of input tensor at 640x640


def yolo_preprocess(size: tuple[int, int]) -> PreprocessSpec:
    """The fallback for a detector whose metadata has no ``fieldreid.preprocess``: what YOLOv5, Ultralytics
    and MegaDetector feed their models (letterbox to ``size`` (h, w), pad 114, RGB, [0, 1], no mean/std)."""
    return PreprocessSpec(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color="RGB", resize="letterbox",
                          pad_value=114)


def _json_or_literal(text: str):
    """Metadata numbers/lists: JSON first, then a bare int ("32")."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        try:
            return int(text)
        except ValueError:
            return None


def _is_true(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def infer_layout(
    output_shapes: Sequence[tuple], metadata: Mapping[str, str], num_classes: int | None
) -> str | None:
    """The output layout of a detector, from ``fieldreid.layout`` or else from shapes and foreign metadata.

    Returns None when the shapes are dynamic and nothing else decides (run the model once and ask again
    with the real output shapes). Raises :class:`ModelError` when the answer is ambiguous or impossible.
    """
    declared = metadata.get("fieldreid.layout")
    if declared:
        if declared not in LAYOUTS:
            raise ModelError(f"The model declares layout {declared!r}, which fieldreid does not know ({LAYOUTS}).")
        return declared
    if not output_shapes:
        raise ModelError("The detector has no outputs.")
    if len(output_shapes) >= 2 and all(len(s) == 5 for s in output_shapes):
        return "yolov5-raw"
    shape = tuple(output_shapes[0])
    if len(shape) != 3:
        raise ModelError(
            f"Detector output shape {shape} matches no known layout ([B,N,5+C] yolov5, [B,4+C,N] ultralytics, "
            f"[B,K,6] end2end). Pass layout= if you know it."
        )
    _, a, b = (d if isinstance(d, int) and d > 0 else None for d in shape)
    is_ultralytics = "task" in metadata or "imgsz" in metadata  # YOLOv5's export writes only names + stride
    if _is_true(metadata.get("end2end")):
        return "end2end"
    candidates: list[str] = []
    if num_classes is not None:
        if a is not None and a == 4 + num_classes:
            candidates.append("ultralytics")
        if b is not None and b == 5 + num_classes:
            candidates.append("yolov5")
        if b == 6:
            candidates.append("end2end")
    elif a is not None and b is not None:
        if b == 6:
            candidates += ["end2end", "yolov5"]
        else:
            candidates.append("ultralytics" if a < b else "yolov5")
    if is_ultralytics and len(candidates) > 1 and "yolov5" in candidates:
        candidates.remove("yolov5")  # ultralytics never exports the objectness layout
    if len(candidates) == 1:
        return candidates[0]
    if not candidates and (a is None or b is None):
        return None
    what = "ambiguous" if candidates else "not a known layout"
    raise ModelError(
        f"Detector output shape {shape} with {num_classes if num_classes is not None else 'unknown'} classes is "
        f"{what} (could be: {', '.join(candidates) or 'none'}). Pass layout= one of {', '.join(LAYOUTS)}, "
        f"or convert the checkpoint with fieldreid's converter, which records it."
    )


class Detector:
    """Runs a YOLO-family ONNX detector on BGR images and returns boxes in original-image pixels.

    ``conf`` defaults to 0.2 (see :data:`DEFAULT_CONF`); ``iou`` is the NMS threshold. NMS runs per
    MegaDetector category, not per model class (:func:`~fieldreid.detect.classes.nms_groups`): a COCO model's
    ``cat`` and ``dog`` boxes on one animal suppress each other, leaving one box per animal; ``agnostic``
    makes every box suppress every other;
    ``imgsz`` defaults to the size recorded in the model (or its static input shape, or 640);
    ``layout`` overrides what the metadata says (needed only for ambiguous foreign files);
    ``keep_other`` keeps classes that are none of animal/person/vehicle (category 0).
    ``rect``: letterbox each image to its smallest stride-multiple rectangle (4:3 -> 640 x 480, 16:9 ->
    640 x 384) instead of the square ``imgsz``; the default (None) does so exactly when the model's spatial
    axes are dynamic (``fieldreid export``/``make models`` write such files; a fixed-size ONNX or a TensorRT
    plan keeps the square). Images of different rectangles are batched by shape.
    ``path`` may also be an already loaded :class:`~fieldreid.engines.Engine`.
    """

    def __init__(
        self,
        path: str | Path | Engine,
        backend: str = "auto",
        conf: float = DEFAULT_CONF,
        iou: float = DEFAULT_IOU,
        max_det: int = 300,
        imgsz: int | tuple[int, int] | None = None,
        layout: str | None = None,
        batch_size: int = DEFAULT_BATCH,
        keep_other: bool = False,
        agnostic: bool = False,
        rect: bool | None = None,
        **engine_options,
    ) -> None:
        if not 0.0 <= conf <= 1.0:
            raise InputError(f"conf must be between 0 and 1, got {conf}")
        if not 0.0 <= iou <= 1.0:
            raise InputError(f"iou must be between 0 and 1, got {iou}")
        if int(max_det) < 1 or int(batch_size) < 1:
            raise InputError(f"max_det and batch_size must be at least 1, got {max_det} and {batch_size}")
        if layout is not None and layout not in LAYOUTS:
            raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        self.keep_other, self.agnostic = bool(keep_other), bool(agnostic)
        self.engine = path if isinstance(path, Engine) else load_engine(path, backend, **engine_options)
        self.path = self.engine.path
        if len(self.engine.inputs) != 1:
            raise ModelError(f"A detector takes one image input; {self.path} has inputs {self.engine.input_names}.")
        meta = dict(self.engine.metadata)
        self.metadata: dict[str, str] = meta
        kind = meta.get("fieldreid.kind")
        if kind and kind != "detector":
            raise ModelError(f"{self.path} is a fieldreid {kind!r} model, not a detector.")

        in_shape = self.engine.inputs[0].shape
        if len(in_shape) != 4 or (isinstance(in_shape[1], int) and in_shape[1] not in (-1, 3)):
            raise ModelError(f"A detector input must be [B, 3, H, W]; {self.path} has {in_shape}.")
        declared = PreprocessSpec.from_json(meta["fieldreid.preprocess"]) if "fieldreid.preprocess" in meta else None
        if declared is not None and declared.resize != "letterbox":
            raise ModelError(f"{self.path}: a detector's input is letterboxed, but its preprocessing metadata says "
                             f"resize={declared.resize!r}; re-export it with fieldreid's converter.")
        self.input_size = self._resolve_imgsz(imgsz if imgsz is not None or declared is None else declared.size,
                                              in_shape, meta)
        #: how images become this model's input (from its metadata, else :func:`yolo_preprocess`)
        self.preprocess_spec = replace(declared, size=self.input_size) if declared is not None \
            else yolo_preprocess(self.input_size)
        fixed_batch = in_shape[0] if isinstance(in_shape[0], int) and in_shape[0] > 0 else None
        #: images per engine run: the model's fixed batch, or ``batch_size`` for a dynamic batch axis
        self.batch = fixed_batch or int(batch_size)
        self.dynamic_batch = fixed_batch is None
        self.stride = self._resolve_stride(meta)
        #: whether the model takes any input height/width (then ``rect`` letterboxing is possible)
        self.dynamic_shape = not all(isinstance(d, int) and d > 0 for d in in_shape[2:])
        if rect and not self.dynamic_shape:
            raise InputError(f"rect=True needs a model with dynamic height and width; {self.path} takes "
                             f"{tuple(in_shape[2:])} only. Convert the checkpoint again (fieldreid export), "
                             "or leave rect unset.")
        #: letterbox each image to its smallest stride-multiple rectangle instead of the square input size
        self.rect = self.dynamic_shape if rect is None else bool(rect)

        names = names_from_metadata(meta)
        self._anchors = None
        self._strides = None
        if layout is None:
            layout = infer_layout([o.shape for o in self.engine.outputs], meta, len(names) if names else None)
            if layout is None:  # dynamic output shapes and no metadata: look at one real output
                zeros = np.zeros((self.batch, 3, *self.input_size), np.float32)
                out = self.engine.run(zeros)
                shapes = [out[n].shape for n in self.engine.output_names]
                layout = infer_layout(shapes, meta, len(names) if names else None)
                if layout is None:  # pragma: no cover - real shapes are always concrete
                    raise ModelError(f"Could not work out the output layout of {self.path}; pass layout=.")
        self.layout = layout
        if layout == "yolov5-raw":
            self._anchors, self._strides = self._raw_head_geometry(meta)
        self.names: list[str] = names or self._placeholder_names()
        self._categories = category_lookup(self.names)
        self._nms_groups = nms_groups(self.names)

    # -- metadata ---------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_imgsz(imgsz, in_shape: tuple, meta: Mapping[str, str]) -> tuple[int, int]:
        static = tuple(in_shape[2:]) if all(isinstance(d, int) and d > 0 for d in in_shape[2:]) else None
        if imgsz is None:
            for key in ("fieldreid.imgsz", "imgsz"):
                value = _json_or_literal(meta.get(key, "")) if key in meta else None
                if value is not None:
                    imgsz = value
                    break
        if imgsz is None:
            imgsz = static or 640
        if isinstance(imgsz, int | np.integer):
            size = (int(imgsz), int(imgsz))
        elif isinstance(imgsz, Sequence) and len(imgsz) in (1, 2):
            size = (int(imgsz[0]), int(imgsz[-1]))
        else:
            raise ModelError(f"Unreadable input size {imgsz!r} in the detector metadata.")
        if static is not None and size != static:
            raise InputError(f"The model's input is fixed at {static} (h, w); imgsz {size} cannot be used.")
        return size

    @staticmethod
    def _resolve_stride(meta: Mapping[str, str]) -> int:
        for key in ("fieldreid.stride", "stride"):
            value = _json_or_literal(meta.get(key, "")) if key in meta else None
            if isinstance(value, list) and value:
                return int(max(value))
            if isinstance(value, int | float):
                return int(value)
        return 32

    @staticmethod
    def _raw_head_geometry(meta: Mapping[str, str]) -> tuple[np.ndarray, list[float]]:
        anchors = _json_or_literal(meta.get("fieldreid.anchors", ""))
        strides = _json_or_literal(meta.get("fieldreid.stride", ""))
        if anchors is None or not isinstance(strides, list):
            raise ModelError(
                "This model outputs a raw YOLOv5 head but has no fieldreid.anchors / fieldreid.stride metadata; "
                "re-export it with fieldreid's converter."
            )
        return np.asarray(anchors, np.float32), [float(s) for s in strides]

    def _placeholder_names(self) -> list[str]:
        shape = self.engine.outputs[0].shape
        n = None
        if self.layout == "yolov5" and isinstance(shape[-1], int) and shape[-1] > 5:
            n = shape[-1] - 5
        elif self.layout == "ultralytics" and isinstance(shape[1], int) and shape[1] > 4:
            n = shape[1] - 4
        return [f"class{i}" for i in range(n or 0)]

    @property
    def model_id(self) -> str:
        """``fieldreid.model_id`` from the metadata, else file stem + the first 12 hex of its sha256."""
        return self.metadata.get("fieldreid.model_id") or self._file_id

    @cached_property
    def _file_id(self) -> str:
        if self.path is None or not Path(self.path).is_file():
            return "unknown"
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"{Path(self.path).stem}-{h.hexdigest()[:12]}"

    # -- inference --------------------------------------------------------------------------------------
    def _run_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        n = batch.shape[0]
        if not self.dynamic_batch and n < self.batch:  # fixed-batch model: pad with blank frames
            pad = np.zeros((self.batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        out = self.engine.run(batch)
        outputs = [out[name] for name in self.engine.output_names]
        if self.layout == "yolov5-raw":
            # Smallest stride = largest grid first, whatever order the outputs were named in.
            outputs = sorted(outputs, key=lambda o: -o.shape[2] * o.shape[3])
        dets = decode(outputs, self.layout, self.conf, self.iou, self.max_det, self.agnostic,
                      anchors=self._anchors, strides=self._strides, groups=self._nms_groups)
        return dets[:n]

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect in a list of BGR uint8 images (HxWx3; grayscale/BGRA are converted).

        Returns one :class:`Detections` per image, boxes in that image's pixels, best score first.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise InputError("detect() takes a list of images; use detect_one() for a single image.")
        images = [check_image(img, i) for i, img in enumerate(images)]
        # Rectangular inputs: one engine run per shape (images in order within it), so that no image is
        # padded beyond its own rectangle and its boxes do not depend on what it was batched with.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_shape(img.shape[:2]), []).append(i)
        results: list[Detections | None] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), self.batch):
                idx = members[start:start + self.batch]
                tensor, infos = preprocess([images[i] for i in idx], stride=self.stride, spec=self.preprocess_spec,
                                           rect=self.rect)
                for i, raw, info in zip(idx, self._run_batch(tensor), infos, strict=True):
                    results[i] = self._to_detections(raw, info)
        return results  # type: ignore[return-value]  # every index was filled

    def input_shape(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The model input (h, w) an image of ``image_hw`` is letterboxed to: its rectangle, or the square."""
        if not self.rect:
            return self.input_size
        return rect_shape(image_hw, self.input_size, self.stride)

    def _to_detections(self, raw: np.ndarray, info) -> Detections:
        cls = raw[:, 5].astype(np.int64)
        known = (cls >= 0) & (cls < len(self._categories))
        category = np.where(known, self._categories[np.where(known, cls, 0)], 0)
        if not self.keep_other:
            raw, cls, category = raw[category > 0], cls[category > 0], category[category > 0]
        xyxy = scale_boxes(raw[:, :4], info.ratio, info.pad, info.orig_shape)
        return Detections(xyxy, raw[:, 4], cls, category)

    def detect_one(self, image: np.ndarray) -> Detections:
        """Detect in one BGR uint8 image."""
        return self.detect([image])[0]

    # -- lifecycle --------------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Detector({str(self.path)!r}, layout={self.layout!r}, imgsz={self.input_size}, "
                f"rect={self.rect}, classes={len(self.names)}, conf={self.conf})")
