"""Published re-identification models, read from the files a lab downloaded by hand (nothing is fetched):

- ``miewid``: MiewID (Wild Me / Conservation X Labs), a Hugging Face folder with ``config.json`` +
  ``model.safetensors`` (:mod:`fieldreid.teachers.miewid`);
- ``megadescriptor``: MegaDescriptor (BVRA), a timm hub folder (:mod:`fieldreid.teachers.megadescriptor`);
- ``timm``: a timm architecture name + a state-dict file, or any timm hub folder
  (:mod:`fieldreid.teachers.timm_file`).

Each loads as a :class:`~fieldreid.teachers.common.PublishedModel` (torch module, L2-normalised embedding)
with its preprocessing and licence; a file whose layout differs (missing or unexpected parameters, other
shapes or embedding width, no config) is refused with :class:`~fieldreid.errors.WeightLayoutError` naming
the difference. ``fieldreid export DIR --kind ...`` and ``fieldreid distill --teacher DIR`` use them.
torch and timm are needed (the ``train`` extra).
"""

from fieldreid.teachers.load import KINDS, detect_kind, export_published, load_published

__all__ = ["KINDS", "detect_kind", "export_published", "load_published"]
