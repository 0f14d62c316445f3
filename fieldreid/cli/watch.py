"""``fieldreid watch`` and ``fieldreid report``: registered on the main app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fieldreid.cli.common import (
    DetectorOpt,
    EmbedderOpt,
    err,
    friendly,
    open_detector,
    open_embedder,
)
from fieldreid.defaults import DEFAULT_RESCUE_CONF
from fieldreid.errors import FieldreidError


def _log(msg: str) -> None:
    err.print(escape(msg), highlight=False)


def watch(
    folder: Annotated[Path, typer.Argument(help="Folder to watch; each sub-folder is a camera (deployment).")],
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="Identity gallery (.db); created if missing "
                                                                         "(default: gallery in the device config).")
                       ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder: results.db, detections.json, CSVs "
                                                                 "(default: out in the device config).")] = None,
    once: Annotated[bool, typer.Option("--once", help="Process what is there, close all events and exit (cron, "
                                                      "tests).")] = False,
    detector: DetectorOpt = None,
    embedder: EmbedderOpt = None,
    backend: Annotated[str | None, typer.Option(help="auto | onnxruntime | tensorrt | torch (default: backend in "
                                                     "the device config, else auto)")] = None,
    config: Annotated[Path | None, typer.Option(help="Device config (default $FIELDREID_CONFIG or "
                                                     "~/.config/fieldreid/config.toml; `fieldreid init` writes it).")
                      ] = None,
    conf: Annotated[float, typer.Option(help="Detector confidence threshold (boxes kept and animals embedded).")] = 0.2,
    rescue_conf: Annotated[float | None, typer.Option(help="A frame with no animal at --conf keeps its most "
                                                           "confident animal box at this confidence or above "
                                                           "(camera traps fire on motion); 0 turns it off. "
                                                           "Default 0.1, off with --low-memory (it costs "
                                                           "~50-90 MiB of peak memory there).")] = None,
    batch: Annotated[int | None, typer.Option(help="Images per batch (= per committed transaction); default 8, "
                                                   "2 with --low-memory.")] = None,
    gap: Annotated[float, typer.Option(help="Seconds between two images of one camera that still make one event.")
                   ] = 60.0,
    idle_close: Annotated[float, typer.Option(help="Close an open event after this many wall-clock seconds with no "
                                                   "new image for it.")] = 120.0,
    settle: Annotated[float, typer.Option(help="A file modified less than this many seconds ago is not read yet.")
                      ] = 2.0,
    grace: Annotated[float, typer.Option(help="An undecodable (truncated, empty) file is retried until it has been "
                                              "unchanged this long, then recorded as failed.")] = 120.0,
    rescan: Annotated[float, typer.Option(help="Full rescan interval in seconds (SD cards, FUSE and network mounts "
                                               "send no file events).")] = 60.0,
    link: Annotated[float, typer.Option(help="Cosine a detection needs to continue a track whose box it follows "
                                             "closely; where position cannot tell animals apart, the gallery's "
                                             "upper threshold applies if higher.")] = 0.75,
    species: Annotated[str | None, typer.Option(help="Restrict matching to this species.")] = None,
    threads: Annotated[int | None, typer.Option(help="Inference threads (default: the backend's).")] = None,
    max_file_mb: Annotated[float, typer.Option(help="Files larger than this (MiB) are not read: recorded as failed."
                                               )] = 100.0,
    max_pixels: Annotated[float, typer.Option(help="Decoded-pixel budget per image, checked in the header before "
                                                   "decoding: a larger JPEG is decoded reduced (1/2..1/8) to fit, "
                                                   "any other image is recorded as failed. 100e6 = 100 MP.")
                          ] = 100e6,
    low_memory: Annotated[bool, typer.Option("--low-memory", help="For small devices: ONNX Runtime without its CPU "
                                                                  "memory arena, batches of 2 images and 8 crops "
                                                                  "(peak RSS about half, some throughput lost).")
                          ] = False,
) -> None:
    """Process a camera-trap folder exactly once per image, then keep watching it for new images.

    Ctrl-C or SIGTERM finishes the current batch, writes the outputs and exits 0; a restart (also after a
    crash or kill -9) resumes where it stopped, with nothing lost and nothing counted twice.
    """
    from fieldreid.config import DeviceConfig
    from fieldreid.watch import WatchConfig, Watcher

    device = DeviceConfig.load(config)
    gallery = device.require(gallery, "gallery", "--gallery", "identity gallery")
    out = device.require(out, "out", "--out", "output folder")
    detector, embedder = device.choose(detector, "detector"), device.choose(embedder, "embedder")
    backend = device.choose(backend, "backend") or "auto"
    if batch is None:
        batch = 2 if low_memory else 8
    if batch < 1:
        raise FieldreidError("--batch must be at least 1.")
    if max_file_mb <= 0 or max_pixels < 1:
        raise FieldreidError("--max-file-mb and --max-pixels must be positive.")
    if rescue_conf is None:
        rescue_conf = 0.0 if low_memory else DEFAULT_RESCUE_CONF
    if not 0.0 <= rescue_conf <= 1.0:
        raise FieldreidError(f"--rescue-conf must be between 0 (off) and 1, got {rescue_conf}.")
    det_conf = min(conf, rescue_conf) if rescue_conf > 0 else conf  # the rescue needs the weaker boxes
    opts: dict = {"threads": threads} if threads else {}
    if low_memory:
        opts["low_memory"] = True
    if opts:
        from fieldreid.cli.common import configured_model
        from fieldreid.defaults import default_model
        from fieldreid.detect import Detector
        from fieldreid.embed.runtime import Embedder

        det = Detector(detector or configured_model("detector") or default_model("detector"), backend=backend,
                       conf=det_conf, batch_size=min(batch, 8), **opts)
        emb = Embedder(embedder or configured_model("embedder") or default_model("embedder"), backend=backend,
                       batch_size=8 if low_memory else 32, **opts)
    else:
        det = open_detector(detector, backend, det_conf)
        emb = open_embedder(embedder, backend)
    if not folder.is_dir() and once:
        raise FieldreidError(f"{folder} is not a folder (card not mounted?).")
    cfg = WatchConfig(root=folder, out=out, gallery=gallery, batch=batch, conf=conf, rescue_conf=rescue_conf or None,
                      gap=gap, idle_close=idle_close,
                      settle=settle, grace=grace, rescan=rescan, link_threshold=link, species=species,
                      max_file_bytes=int(max_file_mb * 2**20), max_pixels=int(max_pixels))
    with Watcher(cfg, det, emb, log=_log) as w:
        if not once:
            _log(f"watching {folder} → {out} (rescan every {rescan:g} s; Ctrl-C to stop)")
        w.run(once=once)


def report(
    out: Annotated[Path, typer.Argument(help="A watch output folder (holding results.db).")],
    camtrap_dp: Annotated[Path | None, typer.Option("--camtrap-dp", help="Write a Camtrap DP 1.0.2 package to this "
                                                                          "folder.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML review page.")] = None,
    megadetector: Annotated[Path | None, typer.Option("--megadetector", help="Write MegaDetector batch-output JSON "
                                                                             "with each animal's individual as its "
                                                                             "classification (Timelapse).")] = None,
    deployments: Annotated[Path | None, typer.Option(help="CSV: deploymentID (= camera folder), locationID, latitude, "
                                                          "longitude, deploymentStart/End, setupBy, utcOffset, … "
                                                          "(any Camtrap DP deployment column).")] = None,
    utc_offset: Annotated[str | None, typer.Option(help="UTC offset of camera clocks for images without EXIF "
                                                        "OffsetTimeOriginal and deployments without utcOffset, e.g. "
                                                        "+02:00 (default +00:00, warned).")] = None,
    title: Annotated[str | None, typer.Option(help="Package / report title.")] = None,
    species: Annotated[str | None, typer.Option(help="Species label of every animal.")] = None,
    species_level: Annotated[int | None, typer.Option(help="Folder level that names the species: 2 for "
                                                           "Station/SPECIES/image.jpg.")] = None,
    taxa: Annotated[Path | None, typer.Option(help="CSV: species (label), scientificName, vernacularName "
                                                   "[, taxonRank, taxonID].")] = None,
    project: Annotated[Path | None, typer.Option(help="JSON or TOML: title, description, contributors, licenses, "
                                                      "project {samplingDesign, …}, bibliographicCitation.")] = None,
    contributor: Annotated[list[str] | None, typer.Option(help="'Name <email> (role)'; repeat for several. Roles: "
                                                                "contact, principalInvestigator, rightsHolder, "
                                                                "publisher, contributor.")] = None,
    data_license: Annotated[str | None, typer.Option(help="Licence of the data (name like CC0-1.0, or a URL).")
                            ] = None,
    media_license: Annotated[str | None, typer.Option(help="Licence of the media files.")] = None,
    media_base: Annotated[str | None, typer.Option(help="URL or package-relative folder the images are published "
                                                        "under (filePath = base/CAMERA/…); default: paths inside "
                                                        "the package, else file: URIs.")] = None,
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="Gallery to read current identities from "
                                                                         "(default: the one watch used).")] = None,
    max_animals: Annotated[int, typer.Option(help="HTML: at most this many new/uncertain animals shown.")] = 200,
) -> None:
    """Camtrap DP package, HTML review page and/or MegaDetector JSON from a watch output folder.

    Identities are read from the gallery now, so merges, renames and confirmations made since the watch show.
    """
    if camtrap_dp is None and html is None and megadetector is None:
        raise FieldreidError("Nothing to do: pass --camtrap-dp PKG, --html report.html and/or --megadetector md.json.")
    if not (Path(out) / "results.db").is_file():
        raise FieldreidError(f"{out} holds no results.db: pass the output folder of `fieldreid watch`.")
    if camtrap_dp is not None:
        from fieldreid.report.camtrapdp import Options, write_package

        opts = Options(deployments_csv=deployments, utc_offset=utc_offset, title=title, species=species,
                       species_level=species_level, taxa_csv=taxa, project_file=project,
                       contributors=list(contributor or []), data_license=data_license, media_license=media_license,
                       media_base=media_base, gallery=gallery)
        pkg, warnings = write_package(out, camtrap_dp, options=opts)
        for w in warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
        err.print(f"Camtrap DP package → {escape(str(pkg))}", highlight=False)
    if html is not None:
        from fieldreid.report.html import write_html

        path = write_html(out, html, title=title, max_animals=max_animals, gallery=gallery)
        err.print(f"HTML report → {escape(str(path))}", highlight=False)
    if megadetector is not None:
        from fieldreid.report.tables import write_megadetector

        n = write_megadetector(out, megadetector, gallery=gallery)
        err.print(f"MegaDetector JSON ({n} images) → {escape(str(megadetector))}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("watch")(friendly(watch))
    app.command("report")(friendly(report))
