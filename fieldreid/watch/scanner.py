"""Walking the watched folder: a stream of files that need work, one stat each, nothing held in memory.

Sub-folders of the watched folder are cameras (deployments): ``ROOT/<camera>/.../IMG_0001.JPG``; files
directly in ``ROOT`` belong to a camera named after ``ROOT`` itself. New sub-folders are simply walked
on the next pass. Hidden files and folders (``.DS_Store``, ``._IMG``, rsync's ``.name.XXXX`` temporaries)
are skipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fieldreid.errors import FieldreidError
from fieldreid.imageio import IMAGE_SUFFIXES, VIDEO_SUFFIXES

WANTED = IMAGE_SUFFIXES | VIDEO_SUFFIXES
FINAL = ("done", "failed", "duplicate")


class FolderGoneError(FieldreidError):
    """The watched folder is missing (card removed, mount dropped)."""


@dataclass(frozen=True)
class Candidate:
    """A file to read: its path, path relative to the root (posix), camera, and the stat seen by the scan."""

    path: Path
    rel: str
    camera: str
    size: int
    mtime_ns: int


def camera_of(rel: str, root: Path) -> str:
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else (root.resolve().name or "camera")


@dataclass
class ScanStats:
    seen: int = 0
    skipped: int = 0
    fresh: int = 0  # modified within the settle time: come back later
    candidates: int = 0


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative posix path, entry) of wanted files, depth first, sorted per folder, streamed."""
    stack = [("", str(root))]
    while stack:
        prefix, folder = stack.pop()
        try:
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
                if e.is_dir(follow_symlinks=True):
                    subdirs.append(e)
                elif Path(e.name).suffix.lower() in WANTED:
                    yield prefix + e.name, e
            except OSError:
                continue
        for d in reversed(subdirs):
            stack.append((f"{prefix}{d.name}/", d.path))


def scan(root: Path, lookup, settle: float, stats: ScanStats | None = None) -> Iterator[Candidate]:
    """Files under ``root`` that need work. ``lookup(rel)`` returns the file's state row
    ``(status, size, mtime_ns, attempts)`` or None.

    A file is skipped when it is done/failed/duplicate with the same size and mtime, and deferred
    (``stats.fresh``) when it was modified less than ``settle`` seconds ago: a copy in progress.
    """
    stats = stats if stats is not None else ScanStats()
    if not root.is_dir():
        raise FolderGoneError(f"The watched folder {root} is not there (card removed or mount dropped?).")
    try:
        for rel, entry in _walk(root):
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:  # vanished between listing and stat
                continue
            stats.seen += 1
            row = lookup(rel)
            if row is not None and row[0] in FINAL and row[1] == st.st_size and row[2] == st.st_mtime_ns:
                stats.skipped += 1
                continue
            if time.time() - st.st_mtime < settle:
                stats.fresh += 1
                continue
            stats.candidates += 1
            yield Candidate(Path(entry.path), rel, camera_of(rel, root), int(st.st_size), int(st.st_mtime_ns))
    except FileNotFoundError as exc:
        raise FolderGoneError(f"The watched folder {root} disappeared during the scan.") from exc
