"""Helpers for the gallery tests: unit vectors with known geometry and a tiny real ONNX embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def clusters(n_ids: int, per_id: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Identity i's images are its centre plus small noise: (vectors, labels)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_ids, dim)))
    labels = np.repeat(np.arange(n_ids), per_id)
    vec = unit(centres[labels] + noise * rng.normal(size=(len(labels), dim)))
    return vec, np.array([f"id{i:03d}" for i in labels], dtype=object)


def tiny_embedder_onnx(path: Path, model_id: str = "tiny-embedder-v1", dim: int = 8, seed: int = 0,
                       size: int = 32) -> Path:
    """A real ONNX embedder: global average pool → fixed linear → L2 normalise, with fieldreid metadata.

    Colour alone decides the vector, so images of one flat colour embed identically and different colours
    differently: enough to test enrolment and identification end to end with the real Embedder.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fieldreid.types import PreprocessSpec

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, dim)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["proj"]),
        helper.make_node("LpNormalization", ["proj"], ["embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {
        "fieldreid.kind": "embedder", "fieldreid.model_id": model_id,
        "fieldreid.preprocess": PreprocessSpec(size=(size, size)).to_json(), "fieldreid.embedding_dim": str(dim)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


#: flat BGR colours far apart in the tiny embedder's space, one per test animal
COLOURS = [(20, 40, 220), (220, 40, 20), (30, 200, 40), (200, 200, 30), (150, 30, 160), (30, 160, 160)]


def write_image(path: Path, colour, size: int = 48, jitter: int = 0, seed: int = 0) -> Path:
    import cv2

    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = colour
    if jitter:
        img = np.clip(img.astype(int) + rng.integers(-jitter, jitter + 1, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path
