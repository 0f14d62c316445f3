"""Export an :class:`~fieldreid.embed.model.EmbeddingModel` to a portable, self-describing ONNX file.

>>> model, spec, model_id = build_default_embedder()                           # doctest: +SKIP
>>> export_embedder_onnx(model, "engines/default/embedder.onnx", spec, model_id)  # doctest: +SKIP

The ONNX file carries ``metadata_props`` (``fieldreid.kind``, ``fieldreid.model_id``,
``fieldreid.preprocess``, ``fieldreid.embedding_dim``, ``fieldreid.backbone``) so the runtime never
retypes preprocessing; ``<out>.onnx.json`` beside it is the manifest (hashes, versions, parity).

Exporter choice (torch 2.14): the dynamo exporter (``torch.export`` + onnxscript) at opset 18 gives the
clean graph. TF-"SAME" padding of ``tf_efficientnet_lite*`` is folded into each Conv's static pads (49
Conv + 34 Clip + GeM/BN/L2, nothing else), the embedding width is a static dimension, and
``external_data=False`` keeps it one file. The legacy TorchScript exporter (``dynamo=False``) is also
correct (cosine 1.0) but traces timm's dynamic ``Conv2dSame`` into ~400 shape-arithmetic nodes
(Shape/Gather/Ceil/Pad) and names the output width ``Divembedding_dim_1``. Opset 18 is what the dynamo
exporter emits natively; its down-conversion to 17 fails (the ONNX version converter cannot turn
ReduceMean's ``axes`` input back into an attribute). So ``opset >= 18`` uses dynamo, ``opset <= 17``
uses the legacy exporter. ONNX Runtime >= 1.14 and TensorRT >= 8.6 read opset 18.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import platform
import warnings
from pathlib import Path

import numpy as np
import torch

from fieldreid.embed.model import EmbeddingModel, model_metadata
from fieldreid.engines.manifest import sha256_file, write_manifest
from fieldreid.errors import ModelError
from fieldreid.storage.fsutil import atomic_output
from fieldreid.types import PreprocessSpec

#: torch vs ONNX Runtime cosine below which an export is refused.
PARITY_MIN_COSINE = 0.9999
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), independent of file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sample_batch(preprocess: PreprocessSpec, n: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic image-like inputs: smooth colour fields plus texture, normalised like real pixels."""
    h, w = preprocess.size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    imgs = []
    for _ in range(n):
        a, b, c = rng.uniform(0.2, 0.8, size=3)
        base = np.stack([a + 0.3 * np.sin(6 * xx * b), b * yy + 0.2, c * xx * yy + 0.1], axis=0)
        img = np.clip(base + 0.1 * rng.standard_normal((3, h, w)), 0, 1)
        imgs.append(img)
    x = np.stack(imgs).astype(np.float32)
    mean = np.asarray(preprocess.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocess.std, np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def _torch_export(model: EmbeddingModel, tmp: Path, example: torch.Tensor, opset: int, dynamic_batch: bool) -> str:
    if opset >= 18:
        kwargs: dict = {"dynamo": True, "external_data": False}
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        exporter = "dynamo"
    else:
        kwargs = {"dynamo": False, "do_constant_folding": True}
        if dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        exporter = "torchscript"
    log = io.StringIO()
    # The exporters print progress and tracer warnings; the parity gate is the real check, so keep the
    # chatter out of the field log and show it only when the export fails.
    with warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, verbose=False, **kwargs)
        except Exception as exc:
            raise ModelError(f"torch.onnx.export ({exporter}, opset {opset}) failed for "
                             f"{model.backbone_name}: {type(exc).__name__}: {exc}\n{log.getvalue()[-2000:]}") from exc
    return exporter


def check_parity(model: EmbeddingModel, onnx_path: str | Path, batch: np.ndarray) -> dict:
    """Run ``batch`` through torch and ONNX Runtime (CPU); cosine per row and max abs difference."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})[0]
    with torch.inference_mode():
        want = model.eval()(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()
    if got.shape != want.shape:
        raise ModelError(f"ONNX output shape {got.shape} differs from torch {want.shape}.")
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
    return {"n": int(batch.shape[0]), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "max_abs_diff": float(np.abs(got - want).max()), "threshold": PARITY_MIN_COSINE}


def export_embedder_onnx(model: EmbeddingModel, out_path: str | Path, preprocess: PreprocessSpec, model_id: str,
                         opset: int = 18, dynamic_batch: bool = True, parity_batch: np.ndarray | None = None,
                         source_path: str | Path | None = None, extra: dict[str, str] | None = None,
                         licence: str | None = None) -> Path:
    """Export ``model`` to ``out_path`` (ONNX, fp32, NCHW ``input`` -> ``embedding``) with metadata + manifest.

    The parity gate runs ``parity_batch`` (default: 4 deterministic image-like inputs) through torch and
    ONNX Runtime and raises :class:`ModelError` when the cosine drops below 0.9999; nothing is left at
    ``out_path`` then. ``source_path`` (the checkpoint exported) is hashed into the manifest. ``licence`` (the
    weights' terms, for a published model) goes into the metadata (``fieldreid.licence``) and the manifest, and
    ``extra`` into both (``fieldreid.extra.*``; the manifest's ``extra``).
    """
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    h, w = preprocess.size
    batch = _sample_batch(preprocess) if parity_batch is None else np.asarray(parity_batch, np.float32)
    if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
        raise ModelError(f"parity_batch must have shape (N, 3, {h}, {w}), got {batch.shape}.")
    example = torch.from_numpy(batch[:2] if dynamic_batch and len(batch) >= 2 else batch[:1]).contiguous()

    with atomic_output(out_path) as tmp:
        exporter = _torch_export(model, tmp, example, opset, dynamic_batch)
        proto = onnx.load(str(tmp))
        meta = model_metadata(model, preprocess, model_id)
        meta.update({f"fieldreid.extra.{k}": str(v) for k, v in (extra or {}).items()})
        if licence:
            meta["fieldreid.licence"] = licence
        del proto.metadata_props[:]
        for key, value in meta.items():
            prop = proto.metadata_props.add()
            prop.key, prop.value = key, value
        proto.doc_string = f"fieldreid embedder {model_id}"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        parity = check_parity(model, tmp, batch)
        if parity["cosine_min"] < PARITY_MIN_COSINE:
            raise ModelError(
                f"ONNX export of {model_id} does not match torch: min cosine {parity['cosine_min']:.6f} "
                f"(mean {parity['cosine_mean']:.6f}, max abs diff {parity['max_abs_diff']:.3g}) over "
                f"{parity['n']} inputs, below {PARITY_MIN_COSINE}. The file was not written."
            )

    import onnxruntime as ort
    import timm

    manifest = {
        "kind": "embedder",
        "model_id": model_id,
        "file": out_path.name,
        "size_bytes": out_path.stat().st_size,
        "precision": "fp32",
        "opset": opset,
        "exporter": exporter,
        "dynamic_batch": dynamic_batch,
        "input": {"name": INPUT_NAME, "shape": ["batch" if dynamic_batch else len(example), 3, h, w],
                  "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch" if dynamic_batch else len(example), model.embedding_dim],
                   "dtype": "float32", "l2_normalised": True},
        "backbone": model.backbone_name,
        "config": model.config(),
        "preprocess": json.loads(preprocess.to_json()),
        "source": {"state_dict_sha256": state_dict_sha256(model),
                   **({"file": str(source_path), "file_sha256": sha256_file(source_path)}
                      if source_path else {})},
        "parity": parity,
        **({"licence": licence} if licence else {}),
        **({"extra": {str(k): str(v) for k, v in extra.items()}} if extra else {}),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__, "python": platform.python_version()},
    }
    write_manifest(out_path, manifest)  # adds the artefact's sha256 and creation time
    return out_path
