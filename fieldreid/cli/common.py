"""Plumbing shared by the CLI modules: consoles, error handling, progress, model opening, common options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fieldreid.errors import FieldreidError

# soft_wrap: a message is printed as one line whatever the terminal width (or the 80 columns rich assumes when
# the stream is not a terminal), so errors, warnings and log lines stay whole for grep and log collectors.
# Tables and progress bars still lay themselves out to the width.
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
F = TypeVar("F", bound=Callable)

BackendOpt = Annotated[str, typer.Option(help="auto | onnxruntime | tensorrt | torch")]
EmbedderOpt = Annotated[Path | None, typer.Option(help="Embedder ONNX / plan (default: engines/default).")]
DetectorOpt = Annotated[Path | None, typer.Option(help="Detector ONNX / plan (default: engines/default).")]
CropsOpt = Annotated[bool, typer.Option("--crops", help="Images are labelled animal crops: the detector finds the "
                                                       "animal's box in each (the whole image if none), so they are "
                                                       "cut exactly as watch cuts camera frames.")]


def friendly(fn: F) -> F:
    """Library errors become one readable line and exit status 2; Ctrl-C exits 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FieldreidError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def progress_bar(total: int, label: str) -> Progress:
    # Progress goes to stderr and only when it is a terminal or the run is long, so pipes stay clean.
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, disable=total < 20 and not err.is_terminal, transient=False)


def configured_model(kind: str) -> Path | None:
    """The ``detector`` / ``embedder`` the device config names (:mod:`fieldreid.config`), if any."""
    from fieldreid.config import DeviceConfig

    return DeviceConfig.load().path_of(kind)


def open_embedder(path: Path | None, backend: str):
    from fieldreid.defaults import default_model
    from fieldreid.embed.runtime import Embedder

    return Embedder(path or configured_model("embedder") or default_model("embedder"), backend=backend)


def open_detector(path: Path | None, backend: str, conf: float, iou: float = 0.45):
    from fieldreid.defaults import default_model
    from fieldreid.detect import Detector

    return Detector(path or configured_model("detector") or default_model("detector"), backend=backend, conf=conf,
                    iou=iou)


def open_crop_detector(path: Path | None, backend: str, conf: float):
    """The detector that finds the animal in ``--crops`` images (fieldreid.crop): the given or configured one,
    else the default one if it exists; without any, None and a note (each crop is then its own box)."""
    from fieldreid.errors import ModelError

    try:
        return open_detector(path, backend, conf)
    except ModelError:
        if path is not None:
            raise
        err.print("[yellow]note:[/] no detector (run `make models` or pass --detector): each crop is embedded "
                  "whole, which matches `watch` only where the animal fills the photo", highlight=False)
        return None
