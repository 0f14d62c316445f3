"""Field-side embedder: ONNX export + ONNX Runtime vs torch on real crops, metadata, no torch import."""

from __future__ import annotations

import csv
import glob
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import CAMTRAP, DATA, ROOT

from fieldreid.crop import cut
from fieldreid.embed.runtime import Embedder, preprocess_images, resize_image, resize_image_fast
from fieldreid.errors import InputError, ModelError
from fieldreid.types import PreprocessSpec

MIN_COSINE = 0.9999
FAST_MIN_COSINE = 0.999  # the C resize (uint8 between passes) vs the exact float32 triangle filter


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def megadetector_crops(crops: list[np.ndarray], up_to: int) -> None:
    """Append crops of MegaDetector v5a's animal boxes (conf >= 0.2) on the animl-southwest frames until
    ``crops`` holds ``up_to``; nothing where the data is absent."""
    import cv2

    boxes = CAMTRAP / "animl-southwest" / "megadetector_v5a_boxes.csv"
    if not boxes.is_file():
        return
    for row in csv.DictReader(boxes.open()):
        if len(crops) >= up_to or not row["conf"] or float(row["conf"]) < 0.2:
            continue
        img = cv2.imread(str(CAMTRAP / "animl-southwest" / row["FileName"]))
        if img is None:
            continue
        H, W = img.shape[:2]
        x, y, bw, bh = (float(row[k]) for k in ("bbox1", "bbox2", "bbox3", "bbox4"))
        crops.append(cut(img, (x * W, y * H, (x + bw) * W, (y + bh) * H)))


@pytest.fixture(scope="session")
def real_crops() -> list[np.ndarray]:
    """Whole nyala photos (small, upscaled) and MegaDetector boxes from full-size camera-trap frames."""
    import cv2

    crops = []
    for path in sorted(glob.glob(str(DATA / "reid" / "nyala" / "images" / "test" / "*" / "*.jpg")))[:10]:
        img = cv2.imread(path)
        h, w = img.shape[:2]
        crops.append(cut(img, (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)))
    megadetector_crops(crops, up_to=20)
    if len(crops) < 10:
        pytest.skip("real images not found under ../shared/data")
    return crops


def _torch_reference(model, crops: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess the torchvision way (bilinear, antialias) and run the eager torch model."""
    import torch
    import torchvision.transforms.v2.functional as TF

    xs = []
    for c in crops:
        t = torch.from_numpy(np.ascontiguousarray(c[:, :, ::-1])).permute(2, 0, 1).float()
        t = TF.resize(t, list(spec.size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        xs.append((t / 255 - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1))
    with torch.inference_mode():
        return model(torch.stack(xs)).numpy()


def test_export_metadata_and_manifest(default_export):
    import onnx

    path, model, spec, model_id = default_export
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["fieldreid.kind"] == "embedder"
    assert meta["fieldreid.model_id"] == model_id
    assert PreprocessSpec.from_json(meta["fieldreid.preprocess"]) == spec
    assert meta["fieldreid.embedding_dim"] == "1280"
    assert meta["fieldreid.backbone"] == "tf_efficientnet_lite0"
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    assert manifest["precision"] == "fp32" and manifest["parity"]["cosine_min"] >= MIN_COSINE
    assert len(manifest["source"]["state_dict_sha256"]) == 64 and manifest["versions"]["onnxruntime"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["embedder.onnx", "embedder.onnx.json"]
    with Embedder(path, backend="onnxruntime") as emb:
        assert emb.model_id == model_id and emb.preprocess_spec == spec and emb.dim == 1280


def test_onnx_matches_torch_on_real_crops(default_export, real_crops):
    import torch

    path, model, spec, _ = default_export
    with Embedder(path, backend="onnxruntime", batch_size=8) as emb:
        x = emb.preprocess(real_crops)
        assert x.shape == (len(real_crops), 3, 224, 224) and x.dtype == np.float32
        got = emb.embed_tensor(x)  # identical input tensors
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        assert _cos(got, want).min() >= MIN_COSINE
        exact = emb.embed_tensor(preprocess_images(real_crops, spec, exact=True))
        full = emb.embed(real_crops)  # runtime preprocessing (C resize) vs torchvision preprocessing + torch
    ref = _torch_reference(model, real_crops, spec)
    assert full.shape == (len(real_crops), 1280) and full.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert _cos(exact, ref).min() >= MIN_COSINE, _cos(exact, ref)
    assert _cos(full, ref).min() >= FAST_MIN_COSINE, _cos(full, ref)


def test_batching_and_empty_input(default_export, real_crops):
    path = default_export[0]
    with Embedder(path, batch_size=3) as small, Embedder(path, batch_size=32) as big:
        a, b = small.embed(real_crops[:7]), big.embed(real_crops[:7])
        assert small.embed([]).shape == (0, 1280)
        with pytest.raises(InputError):
            small.embed([np.zeros((10, 10), np.uint8)])
    assert _cos(a, b).min() >= MIN_COSINE


def test_convnext_atto_exports_and_matches(tmp_path, real_crops):
    torch = pytest.importorskip("torch")
    from fieldreid.embed.model import BACKBONES, EmbeddingModel
    from fieldreid.export.embedder_onnx import export_embedder_onnx

    torch.manual_seed(0)
    model = EmbeddingModel("convnext_atto", embedding_dim=128).eval()
    spec = BACKBONES["convnext_atto"].preprocess
    path = export_embedder_onnx(model, tmp_path / "atto.onnx", spec, "test-convnext-atto")
    with Embedder(path) as emb:
        assert emb.dim == 128
        got = emb.embed(real_crops[:8])
    assert _cos(got, _torch_reference(model, real_crops[:8], spec)).min() >= MIN_COSINE


def test_parity_gate_refuses_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from fieldreid.embed.model import EmbeddingModel
    from fieldreid.export import embedder_onnx as export

    model = EmbeddingModel("convnext_atto", embedding_dim=16).eval()
    monkeypatch.setattr(export, "PARITY_MIN_COSINE", 1.5)  # unreachable: the gate must fire
    with pytest.raises(ModelError, match="does not match torch: min cosine"):
        export.export_embedder_onnx(model, tmp_path / "x.onnx", PreprocessSpec(size=(64, 64)), "m", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_missing_metadata_is_a_model_error(default_export, tmp_path):
    import onnx

    proto = onnx.load(str(default_export[0]))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "fieldreid.preprocess"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    bad = tmp_path / "nometa.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ModelError, match="fieldreid.preprocess"):
        Embedder(bad)
    with pytest.raises(ModelError, match="does not exist"):
        Embedder(tmp_path / "absent.onnx")


def test_runtime_does_not_import_torch(default_export):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from fieldreid.embed.runtime import Embedder
        emb = Embedder({str(default_export[0])!r}, backend="auto")
        out = emb.embed([np.full((50, 80, 3), 128, np.uint8)])
        assert out.shape == (1, 1280), out.shape
        heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout


def test_resize_matches_torch_antialias():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for h, w in [(384, 384), (1200, 900), (100, 60), (224, 224), (301, 37)]:
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        ours = resize_image(img, (224, 224))
        ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(224, 224),
                                              mode="bilinear", antialias=True, align_corners=False)
        np.testing.assert_allclose(ours, ref[0].permute(1, 2, 0).numpy(), atol=0.01)


def test_fast_resize_is_the_triangle_filter():
    """Enlarging or shrinking < 2x: exact (float). Shrinking 2x or more: PIL's taps, off by uint8 rounding per pass."""
    rng = np.random.default_rng(2)
    for (h, w), size in [((100, 60), (224, 224)), ((50, 224), (224, 224)), ((1200, 900), (224, 224)),
                         ((301, 37), (224, 224)), ((224, 224), (224, 224)), ((640, 480), (160, 96)),
                         ((264, 384), (224, 224)), ((300, 224), (224, 224)), ((447, 100), (224, 224))]:
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        fast, exact = resize_image_fast(img, size), resize_image(img, size)
        assert fast.dtype == np.float32 and fast.shape == exact.shape == (size[1], size[0], 3)
        exact_route = max(h / size[1], w / size[0]) < 2.0  # enlarging, or shrinking < 2x: float all through
        np.testing.assert_allclose(fast, exact, atol=2e-3 if exact_route else 1.0)


def test_fast_preprocessing_matches_exact_on_real_crops(default_embedder_onnx):
    """Final embeddings through the C resize vs the exact numpy resize on real zebra, nyala and camera-trap crops."""
    import cv2

    model = default_embedder_onnx
    crops = []
    for species in ("zebra", "nyala"):
        for path in sorted(glob.glob(str(DATA / "reid" / species / "images" / "**" / "*.jpg"), recursive=True))[3::17][:25]:
            img = cv2.imread(path)
            h, w = img.shape[:2]
            crops.append(cut(img, (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)))
    meta = DATA / "reid" / "nyala" / "metadata.csv"
    if meta.is_file():  # whole photos shrunk by less than 2x: where a uint8 resize fell to cosine 0.9984
        for row in list(csv.DictReader(meta.open()))[:60]:
            img = cv2.imread(str(meta.parent / row["path"]))
            crops.append(cut(img, (0.0, 0.0, float(img.shape[1]), float(img.shape[0]))))
    megadetector_crops(crops, up_to=140)
    if len(crops) < 60:
        pytest.skip("real zebra / nyala / camera-trap images not found under ../shared/data")
    sizes = [c.shape[0] * c.shape[1] for c in crops]
    assert min(sizes) < 224 * 224 < max(sizes)  # both the enlarging and the shrinking branch are exercised
    with Embedder(model, backend="onnxruntime", batch_size=16) as emb:
        fast = emb.embed(crops)
        exact = emb.embed_tensor(preprocess_images(crops, emb.preprocess_spec, exact=True))
    assert _cos(fast, exact).min() >= FAST_MIN_COSINE, np.sort(_cos(fast, exact))[:5]


def test_preprocess_colour_and_normalisation():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255  # blue in BGR
    rgb = preprocess_images([img], PreprocessSpec(size=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3))
    np.testing.assert_allclose(rgb[0, :, 0, 0], [-1.0, -1.0, 1.0])
    bgr = preprocess_images([img], PreprocessSpec(size=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3, color="BGR"))
    np.testing.assert_allclose(bgr[0, :, 0, 0], [1.0, -1.0, -1.0])
    lb = preprocess_images([np.full((2, 4, 3), 255, np.uint8)],
                           PreprocessSpec(size=(4, 4), mean=(0,) * 3, std=(1,) * 3, resize="letterbox", pad_value=0))
    np.testing.assert_allclose(lb[0, 0, :, 0], [0, 1, 1, 0])
