"""Lab-side training: fine-tune and distil embedders (torch + timm; the ``train`` extra).

- :mod:`fieldreid.train.losses` — sub-center ArcFace with dynamic (class-frequency) margins, distillation terms.
- :mod:`fieldreid.train.data` — labelled crops from a ``metadata.csv``, MiewID-style augmentation, the
  same preprocessing the field runtime uses (:func:`fieldreid.embed.runtime.preprocess_images`).
- :mod:`fieldreid.train.trainer` — the seeded, resumable training loop (``fieldreid train``).
- :mod:`fieldreid.train.distill` — teacher embeddings (ours, timm, ONNX) and ``fieldreid distill``.
"""
