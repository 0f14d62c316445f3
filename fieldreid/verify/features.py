"""Local features of one animal crop: RootSIFT keypoints, computed once, stored compactly.

The crop (cut by :mod:`fieldreid.crop`, BGR or grey uint8) is turned grey, resized so its longer side is
:data:`FEATURE_SIDE` pixels (the same scale for every crop, whatever the camera), equalised with CLAHE
(stripes and spots keep their contrast in shade and glare), and described with SIFT, at most
:data:`MAX_KEYPOINTS` of the strongest keypoints. Descriptors are RootSIFT (Arandjelović & Zisserman 2012:
L1-normalise, square root, so Euclidean distance compares like the Hellinger kernel), quantised to uint8;
keypoints are kept as float16 (x, y) in the resized crop's pixels. 2,000 keypoints take 264 kB.

The keypoint cap is part of the features' kind (:func:`kind_for`): features of different caps are never
compared, and a fusion fitted on one cap (``calibrate --verify``) is used with query features extracted at
that cap (:func:`keypoints_of`). Why 2,000: on nyala test (ImageNet Lite0, 2-fold cross-fit) re-ranking the
top 40 lifts top-1 0.155 -> 0.277 at 1,000 keypoints, 0.303 at 1,500 and 0.326 at 2,000 (the 1,000 cap was
reached by 99.6 % of crops); matching costs about 3.5x as much as at 1,000 (bench_verify, nyala, K = 20:
226 vs 65 ms per query).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import cv2
import numpy as np

from fieldreid.errors import InputError

#: longer side of the grey crop features are computed on (pixels)
FEATURE_SIDE = 384
#: at most this many keypoints (the strongest) per crop, by default
MAX_KEYPOINTS = 2000
#: the largest cap a kind can name
LARGEST_CAP = 99999
#: the recipe's name and version; a cap other than 1,000 (the first recipe's) is added to it
_RECIPE, _VERSION = "rootsift-clahe", "v1"
CLAHE_CLIP = 2.0
CLAHE_TILES = 8
_MAGIC = b"FRLF"
_HEADER = struct.Struct("<4sB23sIHH")  # magic, format version, kind, n keypoints, height, width


def kind_for(max_keypoints: int) -> str:
    """The kind of features extracted with this keypoint cap: ``rootsift-clahe/v1`` for 1,000 (the name
    galleries indexed before the cap was part of it carry), ``rootsift-clahe-<cap>/v1`` otherwise."""
    if not 1 <= int(max_keypoints) <= LARGEST_CAP:
        raise InputError(f"max_keypoints must be between 1 and {LARGEST_CAP}, got {max_keypoints}.")
    n = int(max_keypoints)
    return f"{_RECIPE}/{_VERSION}" if n == 1000 else f"{_RECIPE}-{n}/{_VERSION}"


def keypoints_of(kind: str) -> int:
    """The keypoint cap a kind names (:func:`kind_for` reversed); a clear error for a kind this fieldreid
    cannot extract (another recipe, or a newer version)."""
    name, _, version = str(kind).partition("/")
    if version == _VERSION:
        if name == _RECIPE:
            return 1000
        base, _, cap = name.rpartition("-")
        if base == _RECIPE and cap.isdigit() and 1 <= int(cap) <= LARGEST_CAP and kind_for(int(cap)) == kind:
            return int(cap)
    raise InputError(f"Local features of kind {kind!r} cannot be extracted by this fieldreid (it makes "
                     f"{_RECIPE}[-<keypoints>]/{_VERSION}); calibrate again with `calibrate --verify`.")


#: the kind of features extracted with the default cap
KIND = kind_for(MAX_KEYPOINTS)


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints ``xy`` (N, 2) float32 in the resized crop, ``descriptors`` (N, 128) uint8 (RootSIFT × 255),
    and the resized crop's ``(height, width)``."""

    xy: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]
    kind: str = KIND

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    def unit_descriptors(self) -> np.ndarray:
        """(N, 128) float32 descriptors of unit L2 norm (dequantised)."""
        d = self.descriptors.astype(np.float32)
        n = np.linalg.norm(d, axis=1, keepdims=True)
        return d / np.maximum(n, 1e-6)

    def to_bytes(self) -> bytes:
        """Compact form: a header, float16 keypoints, uint8 descriptors."""
        kind = self.kind.encode()
        if len(kind) > 23:
            raise InputError(f"Feature kind {self.kind!r} is longer than 23 bytes.")
        head = _HEADER.pack(_MAGIC, 1, kind, len(self), int(self.size[0]), int(self.size[1]))
        return head + self.xy.astype("<f2").tobytes() + np.ascontiguousarray(self.descriptors, np.uint8).tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> LocalFeatures:
        blob = bytes(blob)
        if len(blob) < _HEADER.size or blob[:4] != _MAGIC:
            raise InputError("Stored local features are not in fieldreid's format (bad header).")
        magic, version, kind, n, h, w = _HEADER.unpack_from(blob)
        if version != 1:
            raise InputError(f"Stored local features have format version {version}; this fieldreid reads 1.")
        expected = _HEADER.size + n * 4 + n * 128
        if len(blob) != expected:
            raise InputError(f"Stored local features are truncated or padded ({len(blob)} bytes, expected "
                             f"{expected}); compute them again from the image.")
        off = _HEADER.size
        xy = np.frombuffer(blob, "<f2", n * 2, off).reshape(n, 2).astype(np.float32)
        desc = np.frombuffer(blob, np.uint8, n * 128, off + n * 4).reshape(n, 128).copy()
        return cls(xy, desc, (h, w), kind.rstrip(b"\0").decode())


def prepare(crop: np.ndarray, side: int = FEATURE_SIDE) -> np.ndarray:
    """The grey, resized (longer side ``side``), CLAHE-equalised image features are computed on."""
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim not in (2, 3) \
            or min(crop.shape[:2]) < 1 or (crop.ndim == 3 and crop.shape[2] not in (1, 3, 4)):
        desc = f"{crop.dtype} {crop.shape}" if isinstance(crop, np.ndarray) else type(crop).__name__
        raise InputError(f"Local features need an HxW or HxWx3 uint8 crop, got {desc}.")
    if crop.ndim == 3 and crop.shape[2] == 4:
        grey = cv2.cvtColor(crop, cv2.COLOR_BGRA2GRAY)
    elif crop.ndim == 3 and crop.shape[2] == 3:
        grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    else:
        grey = crop.reshape(crop.shape[:2])
    h, w = grey.shape
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    grey = cv2.resize(grey, size, interpolation=interp)
    return cv2.createCLAHE(CLAHE_CLIP, (CLAHE_TILES, CLAHE_TILES)).apply(grey)


_LOCAL = threading.local()  # one SIFT per thread and keypoint cap (OpenCV objects are not shared)


def extract(crop: np.ndarray, max_keypoints: int = MAX_KEYPOINTS, side: int = FEATURE_SIDE) -> LocalFeatures:
    """RootSIFT features of one crop (see the module docstring), of kind ``kind_for(max_keypoints)``. A flat
    crop gives zero keypoints."""
    kind = kind_for(max_keypoints)
    img = prepare(crop, side)
    cache = _LOCAL.__dict__.setdefault("sift", {})
    sift = cache.get(max_keypoints)
    if sift is None:
        sift = cache[max_keypoints] = cv2.SIFT_create(nfeatures=max_keypoints)
    kps, desc = sift.detectAndCompute(img, None)
    if desc is None or len(kps) == 0:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), img.shape[:2], kind)
    if len(kps) > max_keypoints:  # SIFT may return a few more (ties in response, orientations)
        keep = np.argsort([-k.response for k in kps], kind="stable")[:max_keypoints]
        kps, desc = [kps[i] for i in keep], desc[keep]
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    d = np.sqrt(d)  # unit L2 norm; every element <= 1
    q = np.clip(np.rint(d * 255.0), 0, 255).astype(np.uint8)
    xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
    return LocalFeatures(xy, q, img.shape[:2], kind)


def crop_for_features(path, box_xyxy=None, side: int = FEATURE_SIDE, data: bytes | None = None) -> np.ndarray:
    """The crop of an image's animal box (full-resolution ``x1, y1, x2, y2``; None = the whole image) cut
    by the one crop rule (:mod:`fieldreid.crop`) at the resolution local features need."""
    from fieldreid.crop import crops, whole_box
    from fieldreid.frames.decode import read_image

    frame = read_image(path, min_side=side, data=data, keep_data=True)
    [px] = crops(frame, [box_xyxy if box_xyxy is not None else whole_box(frame.size)], side)
    return px


def features_of(path, box_xyxy=None, max_keypoints: int = MAX_KEYPOINTS, side: int = FEATURE_SIDE,
                data: bytes | None = None) -> LocalFeatures:
    """Local features of an image's animal (see :func:`crop_for_features`)."""
    return extract(crop_for_features(path, box_xyxy, side, data), max_keypoints, side)
