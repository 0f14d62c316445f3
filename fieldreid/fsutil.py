"""Crash-safe file writes: a killed process or a full disk leaves the previous good file in place."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fieldreid.errors import FieldreidError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp creates 0600 files; outputs are for other tools and users too, so they get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()


class OutputWriteError(FieldreidError):
    """An output file could not be written (full disk, read-only mount, missing folder)."""


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _write_error(path: Path, exc: OSError) -> OutputWriteError:
    hint = " The disk is full: free space and run again." if exc.errno == errno.ENOSPC else ""
    return OutputWriteError(f"Cannot write {path}: {exc.strerror or exc}.{hint} The previous file is unchanged.")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write into; on a clean exit it is fsynced and renamed over ``path``.

    Any exception inside the block (a failed write, a failed check such as a parity gate) removes the temp
    file and leaves the previous ``path`` untouched.

    >>> with atomic_output("model.onnx") as tmp:   # doctest: +SKIP
    ...     onnx.save(proto, tmp); check(tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputWriteError(f"Cannot write {path}: {exc.strerror or exc}.") from exc
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename over it."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
