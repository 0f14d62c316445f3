"""The ``fieldreid`` command line (:mod:`fieldreid.cli.app`); ``python -m fieldreid.cli`` runs it too.

* :mod:`~fieldreid.cli.common` — consoles, one-line errors, progress, opening models, shared options.
* :mod:`~fieldreid.cli.run` — ``doctor``, ``detect``, ``embed``.
* :mod:`~fieldreid.cli.export` — ``export``, ``models``.
* :mod:`~fieldreid.cli.gallery` — ``enroll``, ``identify``, ``eval``, ``calibrate``, ``gallery ...``.
* :mod:`~fieldreid.cli.watch` — ``watch``, ``report``.
* :mod:`~fieldreid.cli.config` — ``init``.
* :mod:`~fieldreid.cli.sync` — ``serve``, ``sync``, ``server ...``.
* :mod:`~fieldreid.cli.train` — ``train``, ``distill``.
* :mod:`~fieldreid.cli.verify` — ``verify``.
"""
from fieldreid.cli.app import app, main

__all__ = ["app", "main"]
