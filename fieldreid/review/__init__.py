"""Review: a person checks the machine's identities in a browser, and every decision goes to the gallery.

* :mod:`fieldreid.review.queue` - which tracks to review, in what order, and what the page shows of one.
* :mod:`fieldreid.review.actions` - decisions (same / new / other species / not an animal, merge), each one
  gallery transaction, logged, undoable and queued for sync.
* :mod:`fieldreid.review.images` - pictures named by ids the databases know.
* :mod:`fieldreid.review.app` - the web app (Starlette; ``fieldreid review`` serves it, the lab server mounts it).
* :mod:`fieldreid.review.verdicts` - what the exports (``fieldreid report``) read back.
"""
