"""Walking the watched folder: a stream of files that need work, one stat each, nothing held in memory.

The walk and the "needs work" rule are :func:`fieldreid.frames.files.walk` and
:func:`fieldreid.frames.files.needs_work`; this module turns them into :class:`Candidate` s per camera.

Sub-folders of the watched folder are cameras (deployments): ``ROOT/<camera>/.../IMG_0001.JPG``; files
directly in ``ROOT`` belong to a camera named after ``ROOT`` itself. New sub-folders are simply walked
on the next pass. Hidden files and folders (``.DS_Store``, ``._IMG``, rsync's ``.name.XXXX`` temporaries)
are skipped.

Only regular files inside ``ROOT`` are read. Symbolic links are never followed (a link to ``/``, to
``/dev/zero`` or back up the tree cannot pull in other files, block or loop), and a folder reached twice
(a bind mount loop) is walked once. An entry with an image or video name that is a symbolic link, a FIFO,
a device or a socket becomes a candidate with ``refused`` set: the watch records it as *failed* with that
reason, without opening it. Paths are recorded in the text form of :func:`fieldreid.storage.fsutil.path_text`
(names that are not UTF-8 get ``\\xNN`` escapes), which is what ``Candidate.rel`` holds.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fieldreid.errors import FieldreidError
from fieldreid.frames.files import needs_work, walk, wanted
from fieldreid.storage.fsutil import file_kind, path_text


class FolderGoneError(FieldreidError):
    """The watched folder is missing (card removed, mount dropped)."""


@dataclass(frozen=True)
class Candidate:
    """A file to read: its path, path relative to the root (posix, text form of
    :func:`~fieldreid.storage.fsutil.path_text`), camera, and the ``lstat`` seen by the scan: size, mtime and
    ``identity`` = ``(st_dev, st_ino)``, so that the reader can tell the file it opens is the one listed.
    ``refused``: why the entry is not read at all (a symbolic link, a FIFO, a device); recorded as failed."""

    path: Path
    rel: str
    camera: str
    size: int
    mtime_ns: int
    identity: tuple[int, int] | None = None
    refused: str | None = None


def camera_of(rel: str, root: Path) -> str:
    """The camera (deployment) of a relative path in text form: its first folder, else the root's name."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else (path_text(root.resolve().name) or "camera")


LINK_REASON = "a symbolic link (not followed: only regular files inside the watched folder are read)"


def refusal(st: os.stat_result) -> str | None:
    """Why an entry (its ``lstat``) is not read, or None for a regular file."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISLNK(st.st_mode):
        return LINK_REASON
    return f"not a regular file but {file_kind(st.st_mode)}; not read"


@dataclass
class ScanStats:
    seen: int = 0
    skipped: int = 0
    fresh: int = 0  # modified within the settle time: come back later
    candidates: int = 0
    links: int = 0  # symbolic links (to folders, or with a wanted name) not followed
    refused: int = 0  # wanted names that are not regular files (links, FIFOs, devices): recorded as failed


def _candidate(root: Path, path: str, rel_fs: str, st: os.stat_result, lookup, settle: float,
               stats: ScanStats) -> Candidate | None:
    """The candidate for one listed entry (its ``lstat``), or None when it needs no work now."""
    stats.seen += 1
    rel = path_text(rel_fs)
    why = refusal(st)
    work = needs_work(lookup(rel), st.st_size, st.st_mtime_ns, st.st_mtime, settle, time.time(), why is None)
    if work == "skip":
        stats.skipped += 1
        return None
    if work == "wait":
        stats.fresh += 1
        return None
    if why is not None:
        stats.refused += 1
    stats.candidates += 1
    return Candidate(Path(path), rel, camera_of(rel, root), int(st.st_size), int(st.st_mtime_ns),
                     (int(st.st_dev), int(st.st_ino)), why)


def candidate_at(root: Path, path: str | os.PathLike, lookup, settle: float, stats: ScanStats) -> Candidate | None:
    """The candidate for one path a file event named, with the same rules as :func:`scan`: None when it is
    outside ``root`` (lexically: links are not resolved), hidden, not a wanted name, reached through a
    symbolic link to a folder, gone, or needing no work now (``stats.fresh`` counts a file too new)."""
    base = os.path.abspath(root)
    full = os.path.abspath(path)
    rel_fs = os.path.relpath(full, base)
    parts = rel_fs.split(os.sep)
    if rel_fs == os.curdir or parts[0] == os.pardir or any(p.startswith(".") for p in parts):
        return None
    if not wanted(parts[-1]):
        return None
    folder = base
    try:
        for part in parts[:-1]:  # no folder on the way may be a link (the full scan does not follow them)
            folder = os.path.join(folder, part)
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return None
        st = os.lstat(full)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    return _candidate(Path(root), full, "/".join(parts), st, lookup, settle, stats)


def scan(root: Path, lookup, settle: float, stats: ScanStats | None = None) -> Iterator[Candidate]:
    """Files under ``root`` that need work. ``lookup(rel)`` returns the file's state row
    ``(status, size, mtime_ns, attempts)`` or None.

    A file is skipped when it is done/failed/duplicate with the same size and mtime, and deferred
    (``stats.fresh``) when it was modified less than ``settle`` seconds ago: a copy in progress. Entries
    that are not regular files come with ``refused`` set (see the module docstring); sizes and mtimes are
    those of ``lstat``.
    """
    stats = stats if stats is not None else ScanStats()
    if not root.is_dir():
        raise FolderGoneError(f"The watched folder {root} is not there (card removed or mount dropped?).")
    try:
        for rel_fs, entry in walk(root, on_link=lambda: setattr(stats, "links", stats.links + 1)):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # vanished between listing and stat
                continue
            cand = _candidate(root, entry.path, rel_fs, st, lookup, settle, stats)
            if cand is not None:
                yield cand
    except FileNotFoundError as exc:
        raise FolderGoneError(f"The watched folder {root} disappeared during the scan.") from exc
