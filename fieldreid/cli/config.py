"""``fieldreid init``: write the device configuration that ``watch``, ``sync`` and ``export`` read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fieldreid.cli.common import err, friendly, out


def init(
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="Identity gallery of this device (.db).")
                       ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder of `fieldreid watch`.")] = None,
    server: Annotated[str | None, typer.Option(help="Lab server URL, e.g. https://lab.example.org.")] = None,
    project: Annotated[str | None, typer.Option(help="Lab project of this device.")] = None,
    lab_key: Annotated[str | None, typer.Option(help="The lab's public key (`fieldreid server public-key`): the "
                                                     "base64 text, or a file holding it.")] = None,
    detector: Annotated[Path | None, typer.Option(help="Detector ONNX / TensorRT plan.")] = None,
    embedder: Annotated[Path | None, typer.Option(help="Embedder ONNX / TensorRT plan.")] = None,
    backend: Annotated[str | None, typer.Option(help="auto | onnxruntime | tensorrt | torch")] = None,
    calib: Annotated[Path | None, typer.Option(help="Real animal crops (folder or metadata.csv) for "
                                                    "`fieldreid export --int8`.")] = None,
    config: Annotated[Path | None, typer.Option(help="File to write (default $FIELDREID_CONFIG or "
                                                     "~/.config/fieldreid/config.toml).")] = None,
) -> None:
    """Write (or update) this device's configuration: the settings given are stored, the others kept.

    The device token is never a command-line argument (other users can read those in `ps`): set
    $FIELDREID_TOKEN while running `fieldreid init` to store it (the file is written with mode 600).
    """
    from fieldreid.config import DeviceConfig, default_config_path, write_config
    from fieldreid.errors import InputError

    path = config or default_config_path()
    updates: dict = {k: str(v.expanduser().resolve()) if isinstance(v, Path) else v for k, v in {
        "gallery": gallery, "out": out_dir, "server": server.rstrip("/") if server else None, "project": project,
        "detector": detector, "embedder": embedder, "backend": backend, "calib": calib}.items()}
    if backend is not None and backend not in ("auto", "onnxruntime", "tensorrt", "torch"):
        raise InputError(f"--backend must be auto, onnxruntime, tensorrt or torch, got {backend!r}.")
    if lab_key is not None:
        key_file = Path(lab_key).expanduser()
        text = key_file.read_text(encoding="utf-8").strip() if key_file.is_file() else lab_key.strip()
        try:
            from fieldreid.server.signing import parse_public_key

            parse_public_key(text)
        except ImportError:  # pragma: no cover - without the sync extra the key is checked on the first sync
            pass
        updates["lab_public_key"] = text
    token = os.environ.get("FIELDREID_TOKEN")
    if token:
        updates["token"] = token
    merged = write_config(path, updates, header="# fieldreid device configuration (`fieldreid init`; options of "
                                                "each command override it)")
    err.print(f"wrote {path}", highlight=False)
    for k, v in merged.items():
        shown = "(set)" if k == "token" else v
        out.print(f"  {k} = {shown}", highlight=False, markup=False)
    missing = [k for k in ("gallery", "out", "server", "lab_public_key") if k not in merged]
    if missing:
        err.print(f"not set yet: {', '.join(missing)} (run `fieldreid init` again with them when you have them)",
                  highlight=False)
    if "token" not in merged:
        err.print("no device token stored: run `FIELDREID_TOKEN=frd_... fieldreid init` or set $FIELDREID_TOKEN "
                  "when syncing", highlight=False)
    DeviceConfig.load(path)  # reads back


def register(app: typer.Typer) -> None:
    app.command("init")(friendly(init))
