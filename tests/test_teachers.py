"""Published re-id models (fieldreid.teachers): replicas of MiewID and MegaDescriptor built from random weights
with the published architectures, parameter names and file layouts (nothing is downloaded), loaded, exported
to ONNX (parity with eager torch), refused when their layout differs, and used as a distillation teacher."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from fieldreid.errors import FieldreidError, InputError, WeightLayoutError  # noqa: E402

#: a small timm EfficientNetV2 with the same key layout as MiewID's efficientnetv2_rw_m (1024-d, not 2152-d)
MIEW_BACKBONE = "efficientnetv2_rw_t"
MIEW_WIDTH = 1024
SWIN_T = "swin_tiny_patch4_window7_224"


def _miewid_config(model_name: str = MIEW_BACKBONE, **kw) -> dict:
    """config.json as conservationxlabs/miewid-msv2/-msv3 publish it (transformers custom code)."""
    config = {"architectures": ["MiewIdNet"],
              "auto_map": {"AutoConfig": "configuration_miewid.MiewIdNetConfig",
                           "AutoModel": "modeling_miewid.MiewIdNet"},
              "dropout": 0.0, "fc_dim": 512, "k": None, "loss_module": "softmax", "ls_eps": 0.0, "margin": 0.5,
              "margins": None, "model_name": model_name, "model_type": "miewid", "n_classes": 10,
              "pretrained": True, "s": 30.0, "theta_zero": 0.785, "torch_dtype": "float32",
              "transformers_version": "4.41.2", "use_fc": False}
    config.update(kw)
    return config


def _write_miewid(folder: Path, state: dict, config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _well_conditioned(net, residual_scale: float = 0.2):
    """Random weights made to behave like trained ones: residual branches damped (their last BN scale) and
    running statistics taken from a few image-like batches. With timm's initial ones (BN scale 1, mean 0,
    variance 1) the random EfficientNetV2 is chaotic: activations reach ~1e4 and float32 rounding, amplified
    through the depth, moves even the torch-vs-ONNX Runtime cosine of the bare backbone to 0.84."""
    for block in net.modules():
        if getattr(block, "has_skip", False):
            norms = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            torch.nn.init.constant_(norms[-1].weight, residual_scale)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    x = torch.from_numpy(np.stack([_preprocessed(img, 96) for img in _images(8, seed=7)]))
    net.train()
    with torch.no_grad():
        for chunk in x.split(4):
            net(chunk)
    return net.eval()


def _preprocessed(img: np.ndarray, side: int) -> np.ndarray:
    import cv2

    rgb = cv2.resize(img, (side, side), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].astype(np.float32) / 255
    return ((rgb - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)).transpose(2, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def miewid_state():
    """MiewIdNet's parameters: the timm model built with its classifier (then replaced by Identity, so absent),
    GeM ``pooling.p``, BatchNorm1d ``bn.*`` with trained-looking statistics, the softmax head ``final.*``."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = _well_conditioned(timm.create_model(MIEW_BACKBONE, pretrained=False))
    state = {f"backbone.{k}": v.clone() for k, v in net.state_dict().items() if not k.startswith("classifier.")}
    state.update({
        "pooling.p": torch.tensor([2.6]),
        "bn.weight": 1 + 0.1 * torch.randn(MIEW_WIDTH, generator=gen),
        "bn.bias": 0.1 * torch.randn(MIEW_WIDTH, generator=gen),
        "bn.running_mean": 0.2 * torch.randn(MIEW_WIDTH, generator=gen),
        "bn.running_var": 0.5 + torch.rand(MIEW_WIDTH, generator=gen),
        "bn.num_batches_tracked": torch.tensor(1000),
        "final.weight": torch.randn(10, MIEW_WIDTH, generator=gen),
        "final.bias": torch.zeros(10),
    })
    return net, state


@pytest.fixture(scope="module")
def miewid_dir(miewid_state, tmp_path_factory) -> Path:
    _, state = miewid_state
    return _write_miewid(tmp_path_factory.mktemp("hf") / "miewid-msv3", state, _miewid_config())


def _miewid_reference(net, state, x: torch.Tensor) -> torch.Tensor:
    """MiewID's embedding written out by hand: features -> GeM -> BatchNorm1d (eval)."""
    with torch.inference_mode():
        fmap = net.forward_features(x)
        p = float(state["pooling.p"])
        pooled = fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
        return ((pooled - state["bn.running_mean"]) / torch.sqrt(state["bn.running_var"] + 1e-5)
                * state["bn.weight"] + state["bn.bias"])


def _swin_original_layout(state: dict, buffers: dict) -> dict:
    """timm's Swin state dict -> the original Microsoft layout the MegaDescriptor files use: each stage's patch
    merging at the end of the stage before, and the buffers older checkpoints saved."""
    out = {}
    for key, value in state.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else key] = value.clone()
    out.update({k: v.clone() for k, v in buffers.items()})
    return out


def _megadescriptor_config(arch: str = SWIN_T, num_features: int = 768) -> dict:
    """config.json of a timm hub folder as BVRA publish MegaDescriptor (num_classes 0, mean = std = 0.5)."""
    return {"architecture": arch, "num_classes": 0, "num_features": num_features, "global_pool": "avg",
            "pretrained_cfg": {"tag": "", "custom_load": False, "input_size": [3, 224, 224],
                               "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
                               "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                               "num_classes": 0, "pool_size": [7, 7], "first_conv": "patch_embed.proj",
                               "classifier": "head.fc"}}


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(1)
    net = timm.create_model(SWIN_T, pretrained=False, num_classes=0).eval()
    persistent = net.state_dict()
    buffers = {k: v for k, v in net.named_buffers() if k not in persistent}
    return net, _swin_original_layout(persistent, buffers)


@pytest.fixture(scope="module")
def megadescriptor_dir(swin_t, tmp_path_factory) -> Path:
    _, state = swin_t
    folder = tmp_path_factory.mktemp("hf") / "MegaDescriptor-T-224"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(_megadescriptor_config(), indent=2))
    return folder


def _images(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 90 + 7 * i, 120 - 5 * i
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        base = np.stack([np.sin(6 * xx + i), yy * (i + 1) % 1.0, xx * yy], axis=2)
        img = np.clip(255 * (0.5 + 0.4 * base) + rng.normal(0, 12, (h, w, 3)), 0, 255)
        out.append(img.astype(np.uint8))
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith("."), text
    return text


# --- loading -------------------------------------------------------------------------------------------------


def test_miewid_replica_loads_with_its_published_preprocessing(miewid_state, miewid_dir):
    from fieldreid.teachers import detect_kind, load_published

    net, state = miewid_state
    assert detect_kind(miewid_dir) == "miewid"
    assert detect_kind(miewid_dir / "model.safetensors") == "miewid"  # the weights file, its folder's config
    model = load_published(miewid_dir, image_size=64)
    assert (model.kind, model.backbone_name, model.embedding_dim) == ("miewid", MIEW_BACKBONE, MIEW_WIDTH)
    assert model.model_id.startswith(f"miewid-{MIEW_BACKBONE}-")
    assert "not stated" in model.licence and "Conservation X Labs" in model.licence
    spec = load_published(miewid_dir).preprocess  # the published size
    assert spec.size == (440, 440) and spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.interpolation == "bilinear" and spec.color == "RGB"
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want = torch.nn.functional.normalize(_miewid_reference(net, state, x), dim=1)
    with torch.inference_mode():
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_megadescriptor_original_swin_layout_loads(swin_t, megadescriptor_dir):
    from fieldreid.teachers import detect_kind, load_published

    net, _ = swin_t
    assert detect_kind(megadescriptor_dir) == "megadescriptor"
    model = load_published(megadescriptor_dir)
    assert (model.kind, model.backbone_name, model.embedding_dim) == ("megadescriptor", SWIN_T, 768)
    assert model.preprocess.size == (224, 224) and model.preprocess.mean == model.preprocess.std == (0.5, 0.5, 0.5)
    assert model.licence.startswith("CC BY-NC 4.0")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = torch.nn.functional.normalize(net(x), dim=1)  # the timm model the replica was written from
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    with pytest.raises(InputError, match="fixed 224x224"):
        load_published(megadescriptor_dir, image_size=256)


def test_a_timm_hub_folder_without_megadescriptor_in_its_name_is_plain_timm(swin_t, megadescriptor_dir, tmp_path):
    from fieldreid.teachers import detect_kind, load_published

    folder = tmp_path / "my-lab-swin"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes((megadescriptor_dir / "pytorch_model.bin").read_bytes())
    config = _megadescriptor_config()
    config["pretrained_cfg"]["mean"] = [0.485, 0.456, 0.406]
    (folder / "config.json").write_text(json.dumps(config))
    assert detect_kind(folder) == "timm"
    model = load_published(folder)
    assert model.kind == "timm" and model.preprocess.mean == (0.485, 0.456, 0.406)  # the config's, not 0.5
    assert "not stated" in model.licence


def test_which_paths_are_not_published_folders(tmp_path, miewid_state):
    from fieldreid.teachers import detect_kind

    net, _ = miewid_state
    assert detect_kind(tmp_path / "model.onnx") is None
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    assert detect_kind(tmp_path / "weights.pt") is None  # no config.json beside it: a plain timm file
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightLayoutError, match="holds no weights file") as e:
        detect_kind(tmp_path / "empty")
    _one_line(e.value)
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((tmp_path / "weights.pt").read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(WeightLayoutError, match="neither MiewID's config") as e:
        detect_kind(folder)
    _one_line(e.value)


# --- wrong layouts, one sentence each ---------------------------------------------------------------------------


def _refused(folder: Path, exc_type=WeightLayoutError, **kw) -> str:
    from fieldreid.teachers import load_published

    with pytest.raises(exc_type) as e:
        load_published(folder, **kw)
    assert isinstance(e.value, FieldreidError)
    return _one_line(e.value)


def test_miewid_layouts_that_differ_are_refused_naming_the_difference(miewid_state, tmp_path):
    _, state = miewid_state
    config = _miewid_config()

    less = {k: v for k, v in state.items() if k != "backbone.conv_head.weight"}
    msg = _refused(_write_miewid(tmp_path / "missing", less, config))
    assert "1 parameter missing (backbone.conv_head.weight)" in msg and "MiewID" in msg

    more = dict(state, **{"backbone.adapter.weight": torch.zeros(3)})
    assert "1 unexpected (backbone.adapter.weight)" in _refused(_write_miewid(tmp_path / "more", more, config))

    wide = dict(state, **{k: torch.ones(2152) for k in ("bn.weight", "bn.bias", "bn.running_mean",
                                                         "bn.running_var")})
    msg = _refused(_write_miewid(tmp_path / "wide", wide, config))  # efficientnetv2_rw_m's width, in a rw_t
    assert "4 with other shapes (bn.weight expected (1024), found (2152)" in msg

    msg = _refused(_write_miewid(tmp_path / "other-backbone", state, _miewid_config("efficientnetv2_rw_s")))
    assert "with other shapes" in msg and "efficientnetv2_rw_s" in msg

    assert "has no config.json" in _refused(_write_miewid(tmp_path / "no-config", state, None), kind="miewid")
    no_name = {k: v for k, v in config.items() if k != "model_name"}
    assert "has no model_name" in _refused(_write_miewid(tmp_path / "no-name", state, no_name))
    assert "use_fc: true" in _refused(_write_miewid(tmp_path / "fc", state, _miewid_config(use_fc=True)))
    assert "cannot build" in _refused(_write_miewid(tmp_path / "unknown", state, _miewid_config("no_such_net")))
    msg = _refused(_write_miewid(tmp_path / "vit", state, _miewid_config("vit_tiny_patch16_224")))
    assert "does not give a convolutional (B, 192, H, W) feature map" in msg


def test_megadescriptor_and_timm_layouts_that_differ_are_refused(swin_t, megadescriptor_dir, tmp_path):
    weights = (megadescriptor_dir / "pytorch_model.bin").read_bytes()

    def folder(name: str, config: dict | None) -> Path:
        f = tmp_path / name
        f.mkdir()
        (f / "pytorch_model.bin").write_bytes(weights)
        if config is not None:
            (f / "config.json").write_text(json.dumps(config))
        return f

    msg = _refused(folder("MegaDescriptor-wide", _megadescriptor_config(num_features=1536)))
    assert "says num_features 1536" in msg and "has 768" in msg
    msg = _refused(folder("MegaDescriptor-S", _megadescriptor_config("swin_small_patch4_window7_224")))
    assert re.search(r"\d+ parameters missing \(layers\.2\.blocks\.6\.", msg), msg
    assert "has no config.json" in _refused(folder("MegaDescriptor-bare", None), kind="megadescriptor")

    plain = tmp_path / "lab" / "weights.pth"
    plain.parent.mkdir()
    plain.write_bytes(weights)
    assert "--arch" in _refused(plain, InputError)
    msg = _refused(plain, arch="resnet18")
    assert msg.startswith(f"{plain} does not have the layout of timm resnet18 (512-d embedding):")


def test_timm_state_dict_file_with_its_architecture(tmp_path):
    from fieldreid.teachers import load_published

    torch.manual_seed(4)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()  # with its classifier
    path = tmp_path / "lab.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model = load_published(path, arch="mobilenetv3_small_050")
    assert model.kind == "timm" and model.embedding_dim == net.head_hidden_size == 1024  # conv_head's width
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = torch.nn.functional.normalize(net.forward_head(net.forward_features(x), pre_logits=True), dim=1)
        got = model(x)
    assert torch.allclose(got, want, atol=1e-5)


# --- export: ONNX with preprocessing + licence, parity with eager torch ---------------------------------------


def _parity_with_eager(onnx_path: Path, model) -> float:
    from fieldreid.embed.runtime import Embedder
    from fieldreid.train.trainer import embed_torch

    images = _images()
    with Embedder(onnx_path, backend="onnxruntime") as emb:
        got = emb.embed(images)
        assert emb.preprocess_spec == model.preprocess
    want = embed_torch(model, images, model.preprocess, device="cpu")
    return float(np.min((got * want).sum(1)))


def test_export_miewid_cli(miewid_dir, tmp_path):
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.engines.manifest import onnx_metadata, read_manifest
    from fieldreid.teachers import load_published

    out = tmp_path / "miewid.onnx"
    r = CliRunner().invoke(app, ["export", str(miewid_dir), "--kind", "miewid", "--imgsz", "96", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "licence of miewid-" in r.output
    meta = onnx_metadata(out)
    model = load_published(miewid_dir, image_size=96)
    assert meta["fieldreid.model_id"] == model.model_id and meta["fieldreid.embedding_dim"] == str(MIEW_WIDTH)
    assert meta["fieldreid.licence"] == model.licence
    assert json.loads(meta["fieldreid.preprocess"])["size"] == [96, 96]
    assert meta["fieldreid.extra.published.kind"] == "miewid"
    manifest = read_manifest(out)
    assert manifest["licence"] == model.licence and manifest["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["parity"]["cosine_min"] >= 0.9999
    assert manifest["source"]["file_sha256"] == model.weights_sha256
    assert _parity_with_eager(out, model) >= 0.9999


def test_export_megadescriptor_kind_from_its_folder(megadescriptor_dir, tmp_path):
    from fieldreid.engines.manifest import onnx_metadata, read_manifest
    from fieldreid.teachers import export_published

    out, model = export_published(megadescriptor_dir, tmp_path / "md.onnx")  # the kind from its config.json
    assert model.kind == "megadescriptor"
    meta = onnx_metadata(out)
    assert meta["fieldreid.model_id"] == model.model_id and model.model_id.startswith(f"megadescriptor-{SWIN_T}-")
    assert meta["fieldreid.licence"].startswith("CC BY-NC 4.0")
    spec = json.loads(meta["fieldreid.preprocess"])
    assert spec["size"] == [224, 224] and spec["mean"] == spec["std"] == [0.5, 0.5, 0.5]
    manifest = read_manifest(out)
    assert manifest["licence"] == meta["fieldreid.licence"] and manifest["parity"]["cosine_min"] >= 0.9999
    assert _parity_with_eager(out, model) >= 0.9999


def test_export_timm_weights_file_and_refused_options(tmp_path, miewid_dir):
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.engines.manifest import onnx_metadata
    from fieldreid.teachers import load_published

    torch.manual_seed(6)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    path = tmp_path / "lab.pth"
    torch.save(net.state_dict(), path)
    r = CliRunner().invoke(app, ["export", str(path), "--kind", "timm", "--arch", "mobilenetv3_small_050",
                                 "--imgsz", "96"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "lab.onnx"
    assert onnx_metadata(out)["fieldreid.backbone"] == "mobilenetv3_small_050"
    assert _parity_with_eager(out, load_published(path, arch="mobilenetv3_small_050", image_size=96)) >= 0.9999

    r = CliRunner().invoke(app, ["export", str(miewid_dir), "--arch", "resnet18", "--out", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--arch names the timm architecture" in r.output
    broken = _write_miewid(tmp_path / "broken", {"bn.weight": torch.ones(4)}, _miewid_config())
    r = CliRunner().invoke(app, ["export", str(broken), "--out", str(tmp_path / "broken.onnx")])
    assert r.exit_code == 2 and "does not have the layout of MiewID" in r.output
    assert not (tmp_path / "broken.onnx").exists() and not (tmp_path / "x.onnx").exists()


# --- distillation from a published folder ---------------------------------------------------------------------


def test_distill_cli_from_a_miewid_folder_on_real_photos(miewid_dir, zebra, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fieldreid.cli import app
    from fieldreid.embed.model import load_checkpoint
    from fieldreid.teachers import load_published
    from fieldreid.train.data import LabelledImages
    from fieldreid.train.trainer import embed_torch

    with open(zebra / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "database"]
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["identity"], []).append(row)
    chosen = [r for ident in sorted(by_id)[:4] for r in by_id[ident][:2]]  # 4 animals x 2 photos, read in place
    meta = tmp_path / "metadata.csv"
    with open(meta, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_id", "identity", "path", "species", "split"])
        w.writeheader()
        for r in chosen:
            w.writerow({"image_id": r["image_id"], "identity": r["identity"],
                        "path": str((zebra / r["path"]).resolve()), "species": r["species"], "split": "train"})
    monkeypatch.setenv("FIELDREID_MODELS", str(tmp_path / "no-models"))  # no default detector: photos used whole
    out = tmp_path / "student.pt"
    r = CliRunner().invoke(app, ["distill", str(meta), "--teacher", str(miewid_dir), "--teacher-size", "64",
                                 "--out", str(out), "--image-size", "32", "--epochs", "1", "--batch", "8",
                                 "--freeze-stages", "3", "--device", "cpu", "--name", "zebra"])
    assert r.exit_code == 0, r.output
    _, student_meta = load_checkpoint(out)
    assert "-distilled-" in student_meta["fieldreid.model_id"]
    with np.load(tmp_path / "student.pt.teacher.npz") as z:
        info = json.loads(str(z["teacher"]))
        vectors = z["vectors"]
    assert info["kind"] == "miewid" and info["preprocess"]["size"] == [64, 64]
    assert vectors.shape == (8, MIEW_WIDTH)
    data = LabelledImages.from_metadata(meta, split="train")  # what the CLI read: whole photos, no detector
    teacher = load_published(miewid_dir, image_size=64)
    want = embed_torch(teacher, data.images, teacher.preprocess, device="cpu")
    assert np.min((vectors * want).sum(1)) > 0.9999  # the cached targets are the MiewID replica's embeddings
