"""Storage that survives crashes: versioned SQLite files, atomic file outputs and bounded, safe reads.

* :mod:`fieldreid.storage.sqlite` — the one opener of versioned SQLite files (header and WAL checks,
  application id, schema version, WAL + synchronous + busy timeout, ordered migrations), used by
  :class:`fieldreid.gallery.Gallery` and :class:`fieldreid.watch.StateDB`.
* :mod:`fieldreid.storage.fsutil` — crash-safe writes, bounded reads of regular files, names as text, one writer.
"""
