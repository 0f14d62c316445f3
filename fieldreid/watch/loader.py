"""Reading one camera file for ``fieldreid watch`` (the reader thread): bytes, re-stat, sha256, EXIF, decode.

:func:`load` never raises for a bad file: it answers a :class:`Loaded` that is ready (a decoded frame), or
carries the file's next state with the reason - ``pending`` while the file may still be being copied
(changed between the scan's stat and the read, unreadable for now, undecodable while younger than
``grace`` seconds), ``failed`` otherwise (a link or device, a video, too large, undecodable when old).
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from fieldreid.errors import ImageReadError
from fieldreid.frames.decode import VIDEO_SUFFIXES, Frame, read_image
from fieldreid.frames.exif import CaptureInfo, read_capture_info
from fieldreid.storage.fsutil import FileChangedError, FileRefusedError, ReadInterrupted, read_regular_file
from fieldreid.types import FileState
from fieldreid.watch.scanner import Candidate


@dataclass
class Loaded:
    """One candidate after the reader thread. ``status`` None: ready to process (``frame`` set); else the
    state to record (``pending`` / ``failed``) with its ``reason``."""

    cand: Candidate
    status: FileState | None
    reason: str | None = None
    sha: str | None = None
    frame: Frame | None = None
    capture: CaptureInfo | None = None

    @property
    def ready(self) -> bool:
        return self.status is None


@dataclass(frozen=True)
class LoadLimits:
    """What the reader accepts: file size and decoded pixels (None: no limit), how long an undecodable
    file may still be being written (``grace`` seconds), and the smallest side the detector needs."""

    max_file_bytes: int | None
    max_pixels: int | None
    grace: float
    min_side: int | None = None


def load(c: Candidate, limits: LoadLimits, stop: threading.Event | None = None) -> Loaded:
    """Read, hash and decode one candidate (see the module docstring for the states it answers)."""
    pending, failed = FileState.PENDING, FileState.FAILED
    if c.refused:  # a link, FIFO or device: never opened
        return Loaded(c, failed, c.refused)
    if c.path.suffix.lower() in VIDEO_SUFFIXES:
        return Loaded(c, failed, "video files are not processed (extract frames first)")
    try:
        data, st = read_regular_file(c.path, limits.max_file_bytes, follow_symlinks=False, identity=c.identity,
                                     stop=stop)
    except FileRefusedError as exc:
        return Loaded(c, failed, exc.reason)
    except FileChangedError:
        return Loaded(c, pending, "file replaced by another while being read (still being copied?)")
    except ReadInterrupted:
        return Loaded(c, pending, "reading was interrupted by a stop request")
    except FileNotFoundError:
        return Loaded(c, failed, "file disappeared before it could be read")
    except OSError as exc:
        return Loaded(c, pending, f"cannot read file yet ({exc.strerror or exc})")
    if st.st_size != c.size or st.st_mtime_ns != c.mtime_ns or len(data) != st.st_size:
        return Loaded(c, pending, "file changed while being read (still being copied?)")
    sha = hashlib.sha256(data).hexdigest()
    capture = read_capture_info(data, st.st_mtime)
    try:
        frame = read_image(c.path, min_side=limits.min_side, data=data, keep_data=True, max_pixels=limits.max_pixels)
    except ImageReadError as exc:
        if time.time() - st.st_mtime < limits.grace:
            return Loaded(c, pending, f"{exc.reason}; retrying until the file has been unchanged for "
                                      f"{limits.grace:g} s", sha)
        return Loaded(c, failed, exc.reason, sha)
    except Exception as exc:  # any other decoder failure (MemoryError, a library's own error): this file only
        return Loaded(c, failed, f"the decoder failed ({type(exc).__name__}: {exc})"[:300], sha)
    return Loaded(c, None, None, sha, frame, capture)
