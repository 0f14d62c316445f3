"""Errors a field technician can act on.

Every error raised by fieldreid's library code is a :class:`FieldreidError`; its message is one or two
sentences that say what went wrong and what to do about it. The CLI prints the message (no traceback)
and exits non-zero.
"""

from __future__ import annotations


class FieldreidError(Exception):
    """Base class of every error fieldreid raises on purpose."""


class BackendUnavailableError(FieldreidError):
    """An inference backend (TensorRT, ONNX Runtime, torch) is not installed or has no device."""


class ModelError(FieldreidError):
    """A model file is missing, unreadable, or not the kind of model expected."""


class ImageReadError(FieldreidError):
    """An image file could not be read or decoded (corrupt, empty, not an image, a video).

    ``reason`` is the short cause without the file name (what failure records store); ``str()`` adds the name.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        name = getattr(path, "name", None) or str(path)
        super().__init__(f"{name}: {reason}")


class InputError(FieldreidError):
    """An input array or argument has the wrong shape, type or value."""


def missing_extra(package: str, extra: str, why: str = "") -> BackendUnavailableError:
    """The error for an optional dependency that is not installed, naming the extra that brings it."""
    reason = f" ({why})" if why else ""
    return BackendUnavailableError(
        f"{package} is not installed{reason}. Install it with: pip install 'fieldreid[{extra}]'"
    )


class GalleryError(FieldreidError):
    """A gallery file is missing, corrupt, from a newer fieldreid, or asked to do something impossible."""


class ModelMismatchError(GalleryError):
    """Query embeddings come from a different model than the gallery's."""


class IdentityNotFoundError(GalleryError):
    """An identity id that is not in the gallery."""


class WeightLayoutError(ModelError):
    """A published model's files (config.json, weights) do not have the layout its kind expects: missing or
    unexpected parameters, other shapes, another embedding width, or no config where one is needed."""
