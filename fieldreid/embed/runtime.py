"""Field-side embedder: numpy + OpenCV + an inference engine (ONNX Runtime, TensorRT). Never imports torch.

>>> emb = Embedder("engines/default/embedder.onnx")               # doctest: +SKIP
>>> crops = fieldreid.crop.crops(frame, detections.xyxy, 224)     # the one crop rule   # doctest: +SKIP
>>> vectors = emb.embed(crops)          # (N, D) float32, unit L2 norm   # doctest: +SKIP

Preprocessing is read from the model's metadata (``fieldreid.preprocess``), never retyped. Training code
should feed crops through :func:`preprocess_images` too, so that lab and field see identical tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from fieldreid.engines import load_engine
from fieldreid.errors import InputError, ModelError
from fieldreid.types import Crop, PreprocessSpec

REQUIRED_METADATA = ("fieldreid.model_id", "fieldreid.preprocess")


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    if isinstance(image, Crop):
        image = image.pixels
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"Image {index} must be an HxWx3 BGR uint8 array, got {desc}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"Image {index} is empty (shape {image.shape}).")
    return image


@lru_cache(maxsize=64)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ``(out_size, K)`` of antialiased bilinear (triangle-filter) resampling.

    The same taps as torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)`` and
    PIL's bilinear resize: the triangle is stretched by the scale factor when downscaling, so every source
    pixel contributes; when upscaling it is plain half-pixel-centre bilinear.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    lo = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64)
    k = int((hi - lo).max())
    idx = lo[:, None] + np.arange(k)[None, :]
    w = np.clip(1.0 - np.abs((idx - centre[:, None] + 0.5) * inv), 0.0, None)
    w[idx >= hi[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return np.minimum(idx, in_size - 1), w.astype(np.float32)


def resize_image(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize an HxWxC image to (width, height) in float32, matching torchvision's default resize.

    torchvision's ``Resize`` (and timm's eval transforms) use bilinear with ``antialias=True``. OpenCV
    has no such kernel: ``INTER_LINEAR`` samples 2 x 2 pixels and aliases on large crops (embedding cosine
    vs torchvision down to 0.92 on camera-trap crops), ``INTER_AREA`` is a box filter (0.98). So the
    triangle filter is applied here as two separable passes of gathered taps, which agrees with torch to
    float rounding (max 0.003 on 0..255) at ~10 ms for a 384 px crop and ~40 ms for a 1600 px one. Working in float32 also avoids uint8 rounding after the resize.
    """
    w_out, h_out = size_wh
    src = np.asarray(image, np.float32)
    for axis, out_size in ((0, h_out), (1, w_out)):
        if src.shape[axis] == out_size:
            continue
        idx, w = _aa_taps(src.shape[axis], out_size)
        shape = list(src.shape)
        shape[axis] = out_size
        acc = np.zeros(shape, np.float32)
        buf = np.empty(shape, np.float32)
        wshape = [1] * src.ndim
        wshape[axis] = out_size
        for k in range(idx.shape[1]):
            np.take(src, idx[:, k], axis=axis, out=buf)
            buf *= w[:, k].reshape(wshape)
            acc += buf
        src = acc
    return src


def _resize_planar_float(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The triangle filter in float32 by PIL's "F" resampling (C), all three channels in one call per pass:
    planes stacked as rows (3H x W) for the horizontal pass, interleaved as columns (H x 3W) for the vertical
    one, so no pass mixes channels. Equal to :func:`resize_image` to float rounding."""
    import cv2
    from PIL import Image

    w_out, h_out = size_wh
    h, w = image.shape[:2]
    x = np.concatenate(cv2.split(image)).astype(np.float32)  # (3h, w)
    if w != w_out:
        x = np.asarray(Image.fromarray(x, "F").resize((w_out, 3 * h), Image.BILINEAR))
    x = x.reshape(3, h, w_out)
    if h == h_out:
        return x.transpose(1, 2, 0)
    y = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(h, 3 * w_out)
    y = np.asarray(Image.fromarray(y, "F").resize((3 * w_out, h_out), Image.BILINEAR))
    return y.reshape(h_out, 3, w_out).transpose(0, 2, 1)


def resize_image_fast(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """The same triangle-filter resize as :func:`resize_image`, in C; float32 ``(H, W, 3)`` out.

    - enlarging on both axes the triangle filter is plain half-pixel-centre bilinear, which OpenCV's
      ``INTER_LINEAR`` on float32 computes exactly;
    - shrinking by less than 2x (most crops: the crop rule decodes each box at the coarsest JPEG scale that
      still covers the input size) PIL's float resampling, exact too;
    - shrinking by 2x or more, PIL's ``BILINEAR`` on the uint8 image (the same taps in fixed point, rounded
      to uint8 after each pass: 2x faster than the float route on 1-3 MP crops, the rounding averaged out).

    Embedding cosine to :func:`resize_image` >= 0.999 on real zebra, nyala and camera-trap crops
    (tests/test_embed_runtime.py). Plain uint8 PIL everywhere gave 0.9984 on mildly shrunk nyala photos;
    OpenCV's ``INTER_AREA`` (a box filter) 0.986.
    """
    import cv2
    from PIL import Image

    w_out, h_out = size_wh
    h_in, w_in = image.shape[:2]
    if (h_in, w_in) == (h_out, w_out):
        return np.asarray(image, np.float32)
    if w_in <= w_out and h_in <= h_out:
        return cv2.resize(np.asarray(image, np.float32), (w_out, h_out), interpolation=cv2.INTER_LINEAR)
    if image.dtype != np.uint8:
        return resize_image(image, size_wh)
    if max(h_in / h_out, w_in / w_out) < 2.0:
        return _resize_planar_float(image, size_wh)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((w_out, h_out), Image.BILINEAR)
    return np.asarray(resized, np.float32)


def preprocess_images(images: Sequence[np.ndarray], spec: PreprocessSpec, *, exact: bool = False) -> np.ndarray:
    """BGR uint8 images (or :class:`Crop`) -> model input ``(N, 3, H, W) float32`` as ``spec`` says.

    The resize is :func:`resize_image_fast` (C); ``exact=True`` takes the float32 numpy reference
    :func:`resize_image` instead (the path models before issue 17 were calibrated with; cosine >= 0.999).
    """
    h, w = spec.size
    out = np.empty((len(images), 3, h, w), np.float32)
    mean = np.asarray(spec.mean, np.float32) * 255.0
    inv_std = 1.0 / (np.asarray(spec.std, np.float32) * 255.0)
    resize = resize_image if exact else resize_image_fast
    for i, image in enumerate(images):
        image = _check_image(image, i)  # resized in BGR (both filters are per channel), flipped after
        if spec.resize == "letterbox":
            scale = min(w / image.shape[1], h / image.shape[0])
            nw, nh = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
            canvas = np.full((h, w, 3), float(spec.pad_value), np.float32)
            top, left = (h - nh) // 2, (w - nw) // 2
            canvas[top:top + nh, left:left + nw] = resize(np.ascontiguousarray(image), (nw, nh))
            resized = canvas
        else:
            resized = resize(np.ascontiguousarray(image), (w, h))
        if spec.color == "RGB":
            resized = resized[:, :, ::-1]
        out[i] = ((resized - mean) * inv_std).transpose(2, 0, 1)
    return out


class Embedder:
    """Crops -> L2-normalised embeddings with an exported model (ONNX, TensorRT plan, or torch checkpoint).

    Reads ``fieldreid.preprocess`` and ``fieldreid.model_id`` from the model's metadata; a model without them
    is refused (:class:`ModelError` naming the key) rather than guessed at.
    """

    def __init__(self, path: str | Path, backend: str = "auto", batch_size: int = 32, **engine_options) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self.engine = load_engine(self.path, backend, **engine_options)
        try:
            meta = self.engine.metadata
            for key in REQUIRED_METADATA:
                if key not in meta:
                    raise ModelError(
                        f"{self.path} has no '{key}' metadata, so it is not a fieldreid embedder export. "
                        "Re-export it with fieldreid (fieldreid.export.embedder_onnx.export_embedder_onnx)."
                    )
            kind = meta.get("fieldreid.kind", "embedder")
            if kind != "embedder":
                raise ModelError(f"{self.path} is a fieldreid '{kind}' model, not an embedder.")
            self.model_id: str = meta["fieldreid.model_id"]
            self.preprocess_spec: PreprocessSpec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
            from fieldreid.embed.thresholds import model_thresholds

            #: open-set thresholds chosen for this model on identities it was not trained on (None: uncalibrated)
            self.thresholds = model_thresholds(meta)
            names = self.engine.output_names
            self._output = "embedding" if "embedding" in names else names[0]
            self.dim: int = self._find_dim(meta)
        except BaseException:
            self.engine.close()
            raise

    def _find_dim(self, meta: dict[str, str]) -> int:
        if "fieldreid.embedding_dim" in meta:
            try:
                return int(meta["fieldreid.embedding_dim"])
            except ValueError as exc:
                raise ModelError(f"{self.path}: fieldreid.embedding_dim is not an integer.") from exc
        shape = next(o.shape for o in self.engine.outputs if o.name == self._output)
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return int(shape[1])
        h, w = self.preprocess_spec.size
        return int(self.engine.run(np.zeros((1, 3, h, w), np.float32))[self._output].shape[1])

    @property
    def backend(self) -> str:
        return self.engine.backend

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 images -> ``(N, 3, H, W) float32`` input, following this model's PreprocessSpec."""
        return preprocess_images(images, self.preprocess_spec)

    def embed_tensor(self, batch: np.ndarray) -> np.ndarray:
        """Already-preprocessed ``(N, 3, H, W)`` input -> ``(N, D)`` unit vectors, in chunks of batch_size."""
        batch = np.asarray(batch, np.float32)
        h, w = self.preprocess_spec.size
        if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
            raise InputError(f"Embedder input must have shape (N, 3, {h}, {w}), got {batch.shape}.")
        out = np.empty((batch.shape[0], self.dim), np.float32)
        for start in range(0, batch.shape[0], self.batch_size):
            chunk = batch[start:start + self.batch_size]
            vec = np.asarray(self.engine.run(chunk)[self._output], np.float32).reshape(len(chunk), -1)
            if vec.shape[1] != self.dim:
                raise ModelError(f"{self.path} returned {vec.shape[1]}-d vectors; its metadata says {self.dim}.")
            out[start:start + len(chunk)] = vec
        # Re-normalise: a TensorRT FP16/INT8 engine (or a model exported without the final L2) can drift.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 crops (or :class:`Crop`) -> ``(N, D) float32`` L2-normalised embeddings."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = np.empty((len(images), self.dim), np.float32)
        # Preprocess per chunk, so a folder of crops never holds every input tensor in memory at once.
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.embed_tensor(self.preprocess(chunk))
        return out

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Embedder({str(self.path)!r}, model_id={self.model_id!r}, dim={self.dim}, backend={self.backend!r})"
