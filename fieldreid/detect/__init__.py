"""Animal detection: YOLO-family ONNX detectors (MegaDetector, COCO YOLO) run with numpy + OpenCV.

>>> from fieldreid.detect import Detector
>>> det = Detector("engines/yolov5n-coco.onnx")              # doctest: +SKIP
>>> boxes = det.detect_one(cv2.imread("IMAG0107_deer.JPG"))  # doctest: +SKIP

Converting a checkpoint needs the ``train`` extra (torch); see :func:`fieldreid.export.detector_onnx.convert_detector`.
Importing this package never imports torch.
"""

from fieldreid.detect.classes import (
    category_lookup,
    md_category,
    names_from_metadata,
    nms_groups,
    parse_names,
)
from fieldreid.detect.decode import (
    LAYOUTS,
    batched_nms,
    box_iou,
    decode,
    decode_end2end,
    decode_ultralytics,
    decode_yolov5,
    decode_yolov5_raw,
    nms,
    raw_to_yolov5,
)
from fieldreid.detect.detector import DEFAULT_CONF, Detector, infer_layout
from fieldreid.detect.letterbox import LetterboxInfo, letterbox, preprocess, rect_shape, scale_boxes


def convert_detector(*args, **kwargs):
    """Convert a YOLOv5 / ultralytics checkpoint to ONNX; see :func:`fieldreid.export.detector_onnx.convert_detector`."""
    from fieldreid.export.detector_onnx import convert_detector as _convert

    return _convert(*args, **kwargs)


__all__ = [
    "DEFAULT_CONF",
    "LAYOUTS",
    "Detector",
    "LetterboxInfo",
    "batched_nms",
    "box_iou",
    "category_lookup",
    "convert_detector",
    "decode",
    "decode_end2end",
    "decode_ultralytics",
    "decode_yolov5",
    "decode_yolov5_raw",
    "infer_layout",
    "letterbox",
    "md_category",
    "names_from_metadata",
    "nms",
    "nms_groups",
    "parse_names",
    "preprocess",
    "raw_to_yolov5",
    "rect_shape",
    "scale_boxes",
]
