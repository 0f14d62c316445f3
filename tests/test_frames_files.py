"""The one walk over frame folders and the one "needs work" rule (fieldreid.frames.files)."""
from __future__ import annotations

import os

import pytest

from fieldreid.frames.files import iter_files, needs_work


def test_iter_files_uses_the_watch_walk_rules(tmp_path):
    """Hidden names skipped, videos kept, folder links not followed (a link back up the tree cannot loop),
    ``recursive=False`` lists the folder's own files only."""
    (tmp_path / "cam1" / "sub").mkdir(parents=True)
    for rel in ("a.JPG", "cam1/b.jpg", "cam1/sub/c.png", "cam1/v.MP4", ".hidden.jpg", "cam1/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "cam1" / "loop")
    got = [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])]
    assert got == ["a.JPG", "cam1/b.jpg", "cam1/v.MP4", "cam1/sub/c.png"]
    assert [p.name for p in iter_files([tmp_path], recursive=False)] == ["a.JPG"]


@pytest.mark.parametrize(("state", "size", "mtime_ns", "age", "regular", "expected"), [
    (None, 10, 5, 100.0, True, "read"),                   # never seen
    (("done", 10, 5, 1), 10, 5, 100.0, True, "skip"),     # done, unchanged
    (("duplicate", 10, 5, 1), 10, 5, 0.0, True, "skip"),  # final states skip even when just touched
    (("done", 10, 5, 1), 11, 5, 100.0, True, "read"),     # grew since
    (("done", 10, 5, 1), 10, 6, 100.0, True, "read"),     # rewritten since
    (("pending", 10, 5, 3), 10, 5, 100.0, True, "read"),  # pending: retried on every pass
    (None, 10, 5, 0.5, True, "wait"),                     # modified within the settle time: a copy in progress
    (None, 10, 5, 0.5, False, "read"),                    # not a regular file: refused at once, never waited for
])
def test_needs_work(state, size, mtime_ns, age, regular, expected):
    assert needs_work(state, size, mtime_ns, 1000.0 - age, 2.0, 1000.0, regular) == expected
