"""``fieldreid watch``: camera-trap folders processed exactly once, with events fused and state in SQLite.

The stages, in the order a file meets them: :mod:`~fieldreid.watch.scanner` (which files need work),
:mod:`~fieldreid.watch.loader` (read, hash, decode), :mod:`~fieldreid.watch.commit` (one batch, one
transaction), :mod:`~fieldreid.watch.events` (bursts linked into tracks), :mod:`~fieldreid.watch.decide`
(decisions, then their gallery side effects); :mod:`~fieldreid.watch.runner` runs the loop and explains the
commit protocol, :mod:`~fieldreid.watch.state` holds the results database.
"""

from fieldreid.watch.runner import RESULTS_DB, WatchConfig, Watcher
from fieldreid.watch.scanner import FolderGoneError
from fieldreid.watch.state import StateDB

__all__ = ["RESULTS_DB", "FolderGoneError", "StateDB", "WatchConfig", "Watcher"]
