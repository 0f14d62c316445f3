"""Which files are camera frames, how a folder of them is walked, and when a file needs (re)work.

* :func:`walk` — the one walk: wanted names (images and videos) under a folder, depth first, sorted per
  folder, streamed (nothing held in memory). Hidden files and folders (``.DS_Store``, ``._IMG`` from macOS,
  rsync's ``.name.XXXX`` temporaries) are skipped; symbolic links to folders are not followed, and a folder
  reached twice (a bind-mount loop) is walked once. Entries that are links, FIFOs or devices with a wanted
  name are yielded, so a caller can refuse them with a reason instead of skipping them silently.
* :func:`iter_files` — the walk for commands given files and folders (``detect``, ``identify``, ``enroll``).
* :func:`needs_work` — the one rule deciding whether a file seen before must be read again
  (``fieldreid watch``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fieldreid.errors import ImageReadError
from fieldreid.types import FileState

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mts", ".wmv", ".3gp", ".mpg", ".mpeg"}
#: names worth listing: images, and videos (listed so they are reported as not processed, never lost)
WANTED = IMAGE_SUFFIXES | VIDEO_SUFFIXES
#: states after which a file is not read again while its size and mtime stay the same
FINAL = (FileState.DONE, FileState.FAILED, FileState.DUPLICATE)


def wanted(name: str) -> bool:
    """A visible file name with an image or video suffix."""
    return not name.startswith(".") and Path(name).suffix.lower() in WANTED


def walk(root: str | Path, on_link: Callable[[], None] | None = None,
         recursive: bool = True) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative posix path, entry) of wanted names under ``root`` that are not folders (see the module
    docstring). ``on_link`` is called for every symbolic link met (to a folder or with a wanted name);
    ``recursive=False`` lists ``root``'s own files only.
    A missing ``root`` raises FileNotFoundError; unreadable sub-folders are skipped."""
    stack = [("", str(root))]
    seen: set[tuple[int, int]] = set()
    while stack:
        prefix, folder = stack.pop()
        try:
            st = os.stat(folder)
            if st.st_ino:  # some FUSE file systems report no inode numbers: nothing to compare then
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if not prefix:
                raise
            continue
        except (NotADirectoryError, PermissionError):
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                want = wanted(e.name)
                if e.is_symlink():
                    if on_link is not None:
                        on_link()
                    if want:
                        yield prefix + e.name, e
                elif e.is_dir(follow_symlinks=False):
                    if recursive:
                        subdirs.append(e)
                elif want:
                    yield prefix + e.name, e
            except OSError:
                continue
        for d in reversed(subdirs):
            stack.append((f"{prefix}{d.name}/", d.path))


def iter_files(paths: Iterable[str | Path], recursive: bool = True) -> Iterator[Path]:
    """Image and video files under ``paths`` (files given directly are always yielded), sorted per folder.

    Videos are yielded too so callers can record them as failures instead of silently skipping them.
    Folders are walked with :func:`walk` (``recursive=False``: only the folder's own files).
    """
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for _rel, entry in walk(p, recursive=recursive):
                yield Path(entry.path)
        elif p.exists():
            yield p
        else:
            raise ImageReadError(p, "does not exist")


def needs_work(state: tuple | None, size: int, mtime_ns: int, mtime: float, settle: float,
               now: float, regular: bool = True) -> str:
    """What to do with a listed file: ``"skip"``, ``"wait"`` or ``"read"``.

    ``state`` is the file's recorded ``(status, size, mtime_ns, ...)`` or None if never seen. A file in a
    final state (done / failed / duplicate) with the same size and mtime is skipped; a regular file modified
    less than ``settle`` seconds ago waits (a copy in progress); everything else is read - pending files
    on every pass, and entries that are not regular files at once (they are refused, not read).
    """
    if state is not None and state[0] in FINAL and state[1] == size and state[2] == mtime_ns:
        return "skip"
    if regular and now - mtime < settle:
        return "wait"
    return "read"
