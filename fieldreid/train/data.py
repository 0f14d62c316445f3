"""Labelled crops for training: ``metadata.csv`` rows -> decoded images -> augmented, preprocessed batches.

Images are decoded once (EXIF-upright, :func:`fieldreid.frames.decode.read_image`), cut by the **one crop rule**
(:mod:`fieldreid.crop`: with a detector, the animal's box in each labelled crop plus the margin; without
one, the whole image is the box) and kept in memory as BGR uint8, shrunk so their longer side is at most
``max_side``: re-id sets are small and a 2-core CPU must not spend its time in the JPEG decoder every
epoch. Each batch goes through the **field preprocessing** (:func:`fieldreid.embed.runtime.preprocess_images`
with the model's :class:`PreprocessSpec`), so lab and device see the same tensors for the same crop.

MiewID-style augmentation (its appendix: sharpening, CLAHE, shift 25 %, scale 20 %, rotation 15 degrees,
colour jitter), each drawn independently per image:

- shift / scale / rotate, p = 0.5: shift up to 25 % of the side, scale 0.8-1.2, rotation up to 15 degrees,
  borders reflected;
- colour jitter, p = 0.5: brightness, contrast and saturation x U(0.8, 1.2), hue shift up to 4 degrees;
- CLAHE on the lightness channel, p = 0.2; unsharp-mask sharpening, p = 0.2.

No horizontal flip: a flipped left flank is not that animal's right flank (coat patterns are not
symmetric), so flipping would teach the model that two different patterns are one animal.

Randomness comes from ``numpy.random.default_rng((seed, epoch, batch))``: a resumed run redraws exactly the
batches and augmentations the interrupted run would have drawn. Identity-balanced P x K batches
(:func:`pk_batches`) and the held-out validation identities (:func:`held_out_identities`) are pure functions of
the seed (and epoch) too.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fieldreid.errors import FieldreidError, InputError
from fieldreid.types import PreprocessSpec


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the MiewID-style augmentation (see the module docstring)."""

    p_affine: float = 0.5
    shift: float = 0.25
    scale: float = 0.2
    rotate_deg: float = 15.0
    p_color: float = 0.5
    color: float = 0.2
    hue_deg: float = 4.0
    p_clahe: float = 0.2
    p_sharpen: float = 0.2


def augment(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One random MiewID-style augmentation of a BGR uint8 image (same size out)."""
    img = image
    h, w = img.shape[:2]
    if rng.random() < cfg.p_affine:
        angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
        scale = rng.uniform(1.0 - cfg.scale, 1.0 + cfg.scale)
        mat = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
        mat[0, 2] += rng.uniform(-cfg.shift, cfg.shift) * w
        mat[1, 2] += rng.uniform(-cfg.shift, cfg.shift) * h
        img = cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rng.random() < cfg.p_color:
        f = img.astype(np.float32)
        f *= rng.uniform(1 - cfg.color, 1 + cfg.color)  # brightness
        mean = f.mean()
        f = (f - mean) * rng.uniform(1 - cfg.color, 1 + cfg.color) + mean  # contrast
        gray = f @ np.array([0.114, 0.587, 0.299], np.float32)
        f = (f - gray[..., None]) * rng.uniform(1 - cfg.color, 1 + cfg.color) + gray[..., None]  # saturation
        img = np.clip(f, 0, 255).astype(np.uint8)
        if cfg.hue_deg > 0:
            hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            shift = int(round(rng.uniform(-cfg.hue_deg, cfg.hue_deg) / 2))  # OpenCV hue is 0..179
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.random() < cfg.p_clahe:
        lab = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)
        clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 4.0)), tileGridSize=(8, 8))
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        img = cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
    if rng.random() < cfg.p_sharpen:
        blur = cv2.GaussianBlur(img, (0, 0), 1.0)
        amount = rng.uniform(0.2, 1.0)
        img = cv2.addWeighted(img, 1 + amount, blur, -amount, 0)
    return np.ascontiguousarray(img)


class LabelledImages:
    """Decoded crops with integer class labels, made from a ``metadata.csv`` split.

    >>> data = LabelledImages.from_metadata("nyala/metadata.csv", split="train")   # doctest: +SKIP
    >>> x, y = data.batch([0, 1, 2], spec, rng=np.random.default_rng(0))          # doctest: +SKIP
    """

    def __init__(self, images: Sequence[np.ndarray], identities: Sequence[str], paths: Sequence[Path],
                 classes: Sequence[str] | None = None, species: Sequence[str] | None = None,
                 sets: Sequence[str] | None = None) -> None:
        if not (len(images) == len(identities) == len(paths)):
            raise InputError("images, identities and paths need the same length.")
        if len(images) == 0:
            raise InputError("No training images.")
        self.images = list(images)
        self.identities = [str(i) for i in identities]
        self.paths = [Path(p) for p in paths]
        #: per image: its species (the metadata's column) and the labelled set it came from (``""``: one set)
        self.species = [str(s) for s in species] if species is not None else [""] * len(self.images)
        self.sets = [str(s) for s in sets] if sets is not None else [""] * len(self.images)
        if not (len(self.species) == len(self.sets) == len(self.images)):
            raise InputError("species and sets need one entry per image.")
        self.classes = sorted(set(self.identities)) if classes is None else list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        missing = sorted(set(self.identities) - set(index))
        if missing:
            raise InputError(f"Identities not in the class list: {missing[:5]}.")
        self.labels = np.array([index[i] for i in self.identities], np.int64)

    @classmethod
    def from_metadata(cls, metadata: str | Path, split: str | None = "train", max_side: int | None = 512,
                      progress=None, detector=None) -> LabelledImages:
        """Decode every labelled row of ``metadata`` (``split`` selects rows; unreadable files are an error)
        and cut each by the crop rule, the animal's box found by ``detector`` (else the whole image)."""
        from fieldreid.gallery.enroll import read_metadata

        items = read_metadata(metadata, split=split)
        if not items:
            raise InputError(f"{metadata} has no labelled rows{f' in split {split!r}' if split else ''}.")
        images, failures = [], []
        for it, px in zip(items, _rule_crops([it.path for it in items], detector, max_side or 512), strict=True):
            if isinstance(px, str):
                failures.append(f"{it.path}: {px}")
                continue
            if max_side and max(px.shape[:2]) > max_side:
                s = max_side / max(px.shape[:2])
                px = cv2.resize(px, (max(1, round(px.shape[1] * s)), max(1, round(px.shape[0] * s))),
                                interpolation=cv2.INTER_AREA)
            images.append(px)
            if progress is not None:
                progress(1)
        if failures:
            raise FieldreidError(f"{len(failures)} training image(s) could not be read, e.g. {failures[0]}. "
                                 "Fix or remove those rows from the metadata.")
        return cls(images, [it.identity for it in items], [it.path for it in items],
                   species=[it.species for it in items])

    @classmethod
    def combine(cls, parts: Sequence[tuple[str, LabelledImages]]) -> LabelledImages:
        """Several labelled sets as one: identity ``x`` of set ``name`` becomes class ``name/x``, so two sets'
        identity "1" stay two animals; species and set name are kept per image."""
        images, identities, paths, species, sets = [], [], [], [], []
        for name, part in parts:
            images += part.images
            identities += [f"{name}/{i}" for i in part.identities]
            paths += part.paths
            species += part.species
            sets += [name] * len(part)
        return cls(images, identities, paths, species=species, sets=sets)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        """The images at ``indices`` (their classes renumbered over the identities they hold)."""
        idx = [int(i) for i in indices]
        return LabelledImages([self.images[i] for i in idx], [self.identities[i] for i in idx],
                              [self.paths[i] for i in idx], species=[self.species[i] for i in idx],
                              sets=[self.sets[i] for i in idx])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        counts = Counter(self.labels.tolist())
        return np.array([counts.get(i, 0) for i in range(self.num_classes)], np.int64)

    def batch(self, indices: Sequence[int], spec: PreprocessSpec, rng: np.random.Generator | None = None,
              cfg: AugmentConfig | None = AugmentConfig()) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 3, H, W) float32`` inputs and ``(N,)`` labels; augmented when ``rng`` and ``cfg`` are given."""
        from fieldreid.embed.runtime import preprocess_images

        imgs = [self.images[i] for i in indices]
        if rng is not None and cfg is not None:
            imgs = [augment(im, rng, cfg) for im in imgs]
        return preprocess_images(imgs, spec), self.labels[np.asarray(indices, np.int64)]


def _rule_crops(paths: Sequence[Path], detector, side: int) -> list[np.ndarray | str]:
    """The crop-rule crop of each labelled image (a failure reason instead where it cannot be read), cut
    with pixels for ``side`` (fieldreid.crop.crops), as enrolment and ``watch`` cut them."""
    from fieldreid.embed.pipeline import Pipeline

    out: dict[Path, np.ndarray | str] = {}
    unique = list(dict.fromkeys(Path(p) for p in paths))
    for res in Pipeline(detector, None, batch_size=8, select="crop", keep_crops=True, crop_side=side).run(unique):
        out[res.path] = res.failure if res.failure else res.crops[0]
    return [out[Path(p)] for p in paths]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of one epoch; a pure function of (seed, epoch), so resume can redo it."""
    return np.random.default_rng((int(seed), int(epoch), 0x5EED)).permutation(n)


def batch_rng(seed: int, epoch: int, step_in_epoch: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), int(epoch), int(step_in_epoch) + 1))


def pk_batches(labels: np.ndarray, num_classes: int, p: int, k: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Identity-balanced batches of one epoch: ``p`` identities x ``k`` images each.

    The identities are visited in a seeded order (a pure function of (seed, epoch), like :func:`epoch_order`),
    ``p`` per batch, the last incomplete group dropped; each contributes ``k`` of its images drawn without
    replacement, or with replacement when it has fewer than ``k``. Batch ``s`` holds the ``k`` images of its
    first identity, then the second's, and so on.
    """
    labels = np.asarray(labels, np.int64)
    if p < 2 or k < 1:
        raise InputError(f"P x K batches need P >= 2 identities and K >= 1 images, got {p}x{k}.")
    if num_classes < p:
        raise InputError(f"--pk {p}x{k} needs at least {p} training identities; there are {num_classes}.")
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    order = np.random.default_rng((int(seed), int(epoch), 0x9C1D)).permutation(num_classes)
    rng = np.random.default_rng((int(seed), int(epoch), 0x9C1E))
    batches = []
    for s in range(num_classes // p):
        picks = []
        for c in order[s * p:(s + 1) * p]:
            pool = members[c]
            picks.append(rng.choice(pool, size=k, replace=len(pool) < k))
        batches.append(np.concatenate(picks))
    return batches


def held_out_identities(identities: Sequence[str], sets: Sequence[str], fraction: float, seed: int) -> set[str]:
    """Identities kept out of training for validation: in each set, ``round(fraction * n)`` of its ``n``
    identities (at least 2), drawn with the seed from its sorted identity names among those with 2 or more
    images (a single image cannot be a one-vs-all query)."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--val-identities must be a fraction in [0, 1), got {fraction}.")
    if fraction == 0.0:
        return set()
    counts = Counter(zip(sets, identities, strict=True))
    held: set[str] = set()
    for name in sorted(set(sets)):
        names = sorted({i for (s, i) in counts if s == name})
        eligible = [i for i in names if counts[(name, i)] >= 2]
        n = min(len(eligible), max(2, int(round(fraction * len(names)))))
        if n < 2:
            raise InputError(f"--val-identities: {'set ' + name if name else 'the training set'} has only "
                             f"{len(eligible)} identities with 2 or more images; validation needs 2.")
        key = zlib.crc32(name.encode())
        perm = np.random.default_rng((int(seed), key, 0x7A1D)).permutation(len(eligible))
        held.update(eligible[j] for j in perm[:n])
    return held
