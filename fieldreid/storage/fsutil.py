"""Files, safely: crash-safe writes, bounded reads of regular files only, file names as text, one writer.

* Writes: a killed process or a full disk leaves the previous good file in place (:func:`atomic_output`).
* Reads: :func:`read_regular_file` reads only regular files (never a FIFO, device or, on request, a
  symbolic link), at most a byte limit, and can be interrupted by a stop request.
* Names: :func:`path_text` / :func:`text_path`, the reversible text form of names that are not UTF-8.
* One writer per output folder: :class:`FolderLock`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import threading
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


# ---------------------------------------------------------------------------------------------- file names
#
# A file name on a POSIX system is bytes; one that is not valid UTF-8 (common on damaged FAT cards) reaches
# Python as a str holding lone surrogates (U+DC80..U+DCFF, PEP 383), which SQLite, JSON and CSV writers
# cannot store. Every name fieldreid records therefore goes through one reversible text form:
#
#   * each byte that is not part of valid UTF-8 is written ``\xNN`` (two lower-case hex digits);
#   * a backslash is written ``\\`` (so the literal text ``\xff`` and the byte 0xFF never collide);
#   * everything else is kept as is. Names on camera cards (FAT, exFAT: no backslashes) are unchanged.
#
# ``path_text`` makes the form, ``text_path`` undoes it (``os.fsencode(text_path(t))`` gives the bytes back).


def path_text(name: str | bytes | os.PathLike) -> str:
    """The recorded text form of a file name or relative path (valid UTF-8 always; reversible).

    >>> path_text(b"cam1/IMG\\xff.JPG")
    'cam1/IMG\\\\xff.JPG'
    >>> path_text("a\\\\b.jpg")
    'a\\\\\\\\b.jpg'
    """
    s = os.fsdecode(name)
    if "\\" not in s and s.isascii():
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:  # another lone surrogate (never from a POSIX name): ``\uNNNN``
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def text_path(text: str) -> str:
    """The file-system name (a str ``os`` functions accept) of a text made by :func:`path_text`."""
    if "\\" not in text:
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "\\" or i + 1 >= n:
            out.append(ch)
            i += 1
        elif text[i + 1] == "\\":
            out.append("\\")
            i += 2
        elif text[i + 1] == "x" and i + 4 <= n:
            out.append(chr(0xDC00 + int(text[i + 2:i + 4], 16)))
            i += 4
        elif text[i + 1] == "u" and i + 6 <= n:
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        else:  # not produced by path_text: keep it literally
            out.append(ch)
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------- reading
#: largest file read by default (camera JPEGs are 1-30 MB); ``fieldreid watch --max-file-mb`` changes it
DEFAULT_MAX_FILE_BYTES = 100 * 1024 * 1024
_READ_CHUNK = 1 << 20

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """``st_mode`` in words, for failure reasons: ``a regular file``, ``a FIFO (named pipe)``, ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class FileRefusedError(FieldreidError):
    """A file that is not read, for good (while its size and mtime stay the same): not a regular file, a
    symbolic link where links are not followed, or larger than the byte limit. ``reason`` has no file name."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path_text(os.fspath(path))}: {reason}")


class FileChangedError(FieldreidError):
    """The file under this name is not the one that was listed (replaced or grown while being read)."""


class ReadInterrupted(FieldreidError):
    """A stop was requested while a file was being read."""


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_FILE_BYTES, *,
                      follow_symlinks: bool = True, identity: tuple[int, int] | None = None,
                      stop: threading.Event | None = None) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and the ``fstat`` of the descriptor they were read from.

    Never blocks on, or reads from, anything but a regular file: the file is opened with ``O_NONBLOCK``
    (opening a FIFO does not wait for a writer) and ``fstat`` of the open descriptor must say *regular
    file*, so a FIFO, a device (``/dev/zero``), a socket or a folder is refused without a single read.
    ``follow_symlinks=False`` adds ``O_NOFOLLOW`` (a symbolic link is refused). ``identity`` = the
    ``(st_dev, st_ino)`` the caller listed: another file under that name raises :class:`FileChangedError`.
    At most ``max_bytes`` are read (a larger file, or one that grows past it, is refused), in 1 MiB chunks
    between which ``stop`` is checked (:class:`ReadInterrupted`).

    Raises :class:`FileRefusedError` (for good), :class:`FileChangedError` (try again later), ``OSError``
    (``FileNotFoundError`` when it vanished; permission and I/O errors).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            if not follow_symlinks and os.path.islink(path):
                raise FileRefusedError(path, "a symbolic link (not followed: only regular files inside the "
                                             "watched folder are read)") from exc
            raise FileRefusedError(path, "a loop of symbolic links") from exc
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing only elsewhere
            raise FileRefusedError(path, "not a regular file (a socket or device)") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefusedError(path, f"not a regular file but {file_kind(st.st_mode)}; not read")
        if identity is not None and (st.st_dev, st.st_ino) != tuple(identity):
            raise FileChangedError(f"{path_text(os.fspath(path))} was replaced by another file while being read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise FileRefusedError(path, _too_large(st.st_size, max_bytes))
        want = st.st_size + 1  # one more byte than listed: tells a file that is still growing
        limit = want if max_bytes is None else min(want, max_bytes + 1)
        buf = bytearray(limit)
        view = memoryview(buf)
        n = 0
        with open(fd, "rb", buffering=0, closefd=False) as fh:
            while n < limit:
                if stop is not None and stop.is_set():
                    raise ReadInterrupted(f"reading {path_text(os.fspath(path))} was interrupted by a stop request")
                got = fh.readinto(view[n:min(limit, n + _READ_CHUNK)])
                if not got:
                    break
                n += got
        view.release()
        if max_bytes is not None and n > max_bytes:
            raise FileRefusedError(path, _too_large(n, max_bytes))
        return bytes(buf[:n]), st
    finally:
        os.close(fd)


def _too_large(size: int, max_bytes: int) -> str:
    return (f"file too large ({size / 2**20:.1f} MiB; files over {max_bytes / 2**20:g} MiB are not read, "
            "see --max-file-mb)")


# ---------------------------------------------------------------------------------------------- one writer
LOCK_NAME = ".lock"


class OutputLockedError(FieldreidError):
    """Another process is already writing into this output folder."""


def folder_write_problem(folder: str | os.PathLike) -> str | None:
    """Why nothing can be created in ``folder`` ("read-only file system", "permission denied"), or None.

    Found by trying (``os.access`` says yes to root on a read-only mount's folder in some setups)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fieldreid-probe.", dir=folder)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return (exc.strerror or str(exc)).lower()
        return None
    os.close(fd)
    os.unlink(name)
    return None


def _permission_error(folder: Path, why: str) -> OutputWriteError:
    return OutputWriteError(f"Cannot write into the output folder {path_text(os.fspath(folder))}: {why}. This is a "
                            "permission problem, not damaged results: make the folder writable (a read-only mount "
                            "or another user's folder?) or choose another --out.")


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.lock`` held while a process writes into ``FOLDER``.

    The file holds the holder's pid, host name and start time (JSON) so that a second process can say who
    it is; the kernel drops the lock when the holder exits, also on ``kill -9``, so a stale file is never a
    problem (it is simply overwritten). ``what`` names the holder's job in the message.
    """

    def __init__(self, folder: str | Path, what: str = "fieldreid watch") -> None:
        import fcntl
        import socket
        import time

        self._fd: int | None = None
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _permission_error(self.folder, (exc.strerror or str(exc)).lower()) from exc
            raise OutputWriteError(f"Cannot create the lock file {path_text(os.fspath(self.path))}: "
                                   f"{exc.strerror or exc}.") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            finally:
                os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputLockedError(f"{path_text(os.fspath(self.folder))} is in use by another {what} "
                                        f"({_describe_holder(holder)}); two processes must not write one output "
                                        "folder. Stop that one first, or give this one another --out.") from exc
            raise OutputWriteError(f"Cannot lock {path_text(os.fspath(self.path))}: {exc.strerror or exc}.") from exc
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock itself is held; the note is only for the message of a second process

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock; the file stays (no unlink race)
            self._fd = None

    def __del__(self) -> None:  # a lock object dropped without release() must not hold the folder
        try:
            self.release()
        except Exception:
            pass

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, running since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"
