"""The ``fieldreid`` command line: one Typer app, each group of commands registered from its module.

Library errors become one readable line and a non-zero exit (:func:`fieldreid.cli.common.friendly`).
Command modules import their heavy dependencies inside the commands, so ``fieldreid --help`` stays fast.
"""
from __future__ import annotations

import typer

from fieldreid.cli import config, export, gallery, review, run, sync, train, verify, watch

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Identify individual animals in camera-trap images, offline.")

run.register(app)  # doctor, detect, embed
export.register(app)  # export, models
gallery.register(app)
config.register(app)
sync.register(app)
watch.register(app)
review.register(app)  # review (the web app over a watch output)
train.register(app)
verify.register(app)  # verify (local-feature match of two photos, drawn)


def main() -> None:  # pragma: no cover - console entry point
    app()
