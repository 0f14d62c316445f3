"""``fieldreid review``: the review web app over a watch output folder; :mod:`fieldreid.cli.app` registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldreid.cli.common import err, friendly, out
from fieldreid.errors import FieldreidError

MIN_TOKEN = 16


def review(
    folder: Annotated[Path, typer.Argument(help="A watch output folder (holding results.db).")],
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="The gallery its decisions went to "
                                                                         "(default: the one results.db names).")
                       ] = None,
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8765,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --token.")
                    ] = "127.0.0.1",
    token: Annotated[str | None, typer.Option(envvar="FIELDREID_REVIEW_TOKEN", help="Secret the page link carries "
                                              f"(at least {MIN_TOKEN} characters; default: a random one per start). "
                                              "Prefer $FIELDREID_REVIEW_TOKEN: other users can read arguments in ps.")
                     ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the link instead of opening a browser.")
                          ] = False,
    who: Annotated[str | None, typer.Option(help="Reviewer name for the logs (default: $FIELDREID_USER or the login "
                                                 "name; the page can change it).")] = None,
    qc: Annotated[float, typer.Option(help="Percent of 'known' animals sampled into the queue for quality control.")
                  ] = 20.0,
) -> None:
    """Review the animals of a watch run in a browser: confirm, name, reject, merge, undo - saved to the gallery.

    New and uncertain animals come first, then a sample of known ones. Every decision is one gallery
    transaction, logged with the reviewer's name, queued for `fieldreid sync` and exported by
    `fieldreid report`. Served on 127.0.0.1 unless --host is given with a --token.
    """
    from fieldreid.review.app import create_app, is_loopback, serve

    if not (0 <= port <= 65535):
        raise FieldreidError("--port must be between 0 and 65535.")
    if not 0 <= qc <= 100:
        raise FieldreidError("--qc is a percentage (0-100).")
    loopback = is_loopback(host)
    if not loopback and not token:
        raise FieldreidError(f"--host {host} puts the review page on the network: give it a secret with "
                             f"$FIELDREID_REVIEW_TOKEN (or --token), at least {MIN_TOKEN} characters, and open the "
                             "link printed.")
    if token is not None and len(token) < MIN_TOKEN:
        raise FieldreidError(f"The review token must be at least {MIN_TOKEN} characters.")
    if not (folder / "results.db").is_file():
        raise FieldreidError(f"{folder} holds no results.db; give the --out folder of a fieldreid watch run.")
    app = create_app(folder, gallery, token=token, who=who, qc_percent=qc, loopback_only=loopback)
    state = app.state.review
    err.print(f"Reviewing {folder} with gallery {state.gallery.path} as {state.who} (Ctrl-C to stop):",
              highlight=False)

    def announce(url: str) -> None:
        out.print(url, highlight=False, soft_wrap=True)
        out.file.flush()  # a pipe (a script, a test) must see the link before the server blocks

    serve(app, host, port, open_browser=not no_browser, announce=announce)


def register(app: typer.Typer) -> None:
    app.command("review")(friendly(review))
