"""Storage that survives crashes: atomic file outputs and bounded, safe reads.

* :mod:`fieldreid.storage.fsutil` — crash-safe writes, bounded reads of regular files, names as text, one writer.

The versioned SQLite files are opened by their owners today (:class:`fieldreid.gallery.Gallery`,
:class:`fieldreid.watch.StateDB`); one shared opener belongs here.
"""
