"""``fieldreid watch``: camera-trap folders processed exactly once, with events fused and state in SQLite.

See :mod:`fieldreid.watch.runner` for the loop and the commit protocol, :mod:`fieldreid.watch.state` for
the results database, :mod:`fieldreid.watch.events` for burst fusion.
"""

from fieldreid.watch.runner import RESULTS_DB, WatchConfig, Watcher
from fieldreid.watch.scanner import FolderGoneError
from fieldreid.watch.state import StateDB

__all__ = ["RESULTS_DB", "FolderGoneError", "StateDB", "WatchConfig", "Watcher"]
