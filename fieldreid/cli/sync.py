"""``fieldreid serve``, ``fieldreid sync`` and the lab's ``fieldreid server ...`` administration commands.

``fieldreid.cli`` calls :func:`register`. Heavy imports (FastAPI, SQLAlchemy, httpx) happen inside the
commands, so the rest of the CLI starts without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fieldreid.cli.common import err, out
from fieldreid.cli.common import friendly as _friendly
from fieldreid.errors import FieldreidError

DbOpt = Annotated[str | None, typer.Option("--db", envvar="FIELDREID_LAB_DB", help="Lab database: a SQLite "
                                           "path or URL, or postgresql://user@host/db (default: "
                                           "DATA_DIR/lab.db). Put a PostgreSQL password in ~/.pgpass or "
                                           "$PGPASSWORD, not in the URL.")]
DataOpt = Annotated[Path | None, typer.Option("--data-dir", envvar="FIELDREID_LAB_DIR", help="Lab data folder: "
                                              "signing key, crops (default: ./fieldreid-lab).")]
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project id.")]
SpeciesOpt = Annotated[str, typer.Option("--species", "-s", help="Species of the gallery.")]
WhoOpt = Annotated[str | None, typer.Option(help="Curator name for the change log (default: $FIELDREID_USER "
                                                 "or the login name).")]

server_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                         help="Lab administration: projects, devices, galleries, curation (runs on the lab "
                              "machine, on the database directly).")


def _lab(db: str | None, data_dir: Path | None):
    from fieldreid.server.db import LabDB

    return LabDB(db, data_dir)


def serve_cmd(
    db: DbOpt = None,
    data_dir: DataOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Keep 127.0.0.1 behind a TLS reverse proxy.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8750,
    rate: Annotated[float, typer.Option(help="Requests per second allowed per device (burst: 4x).")] = 50.0,
    max_push_mb: Annotated[float, typer.Option(help="Largest push chunk accepted, MiB.")] = 16.0,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        "--trusted-proxy", help="Address or network of a reverse proxy whose X-Forwarded-For is believed "
                                "(repeatable; default $FIELDREID_TRUSTED_PROXIES, else none: rate limits key on "
                                "the TCP peer).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    review: Annotated[Path | None, typer.Option("--review", help="Also serve `fieldreid review` at /review over this "
                                                "watch output folder; its token comes from "
                                                "$FIELDREID_REVIEW_TOKEN (16+ characters).")] = None,
    review_gallery: Annotated[Path | None, typer.Option(help="The gallery /review decides in (default: the one the "
                                                             "output folder's results.db names), e.g. the lab's "
                                                             "curated gallery that import-gallery reads.")] = None,
) -> None:
    """Run the lab HTTP API that devices sync with."""
    import os

    from fieldreid.server.app import Limits, serve

    if host not in ("127.0.0.1", "::1", "localhost"):
        err.print(f"[yellow]warning:[/] listening on {host}: the API speaks plain HTTP; put a TLS reverse proxy "
                  "in front (README: Lab server).")
    review_app = None
    if review is not None:
        from fieldreid.review.app import TOKEN_ENV, create_app

        token = os.environ.get(TOKEN_ENV, "")
        if len(token) < 16:
            raise FieldreidError(f"--review serves people over the network: set ${TOKEN_ENV} to a secret of at "
                                 "least 16 characters, then open /review/?token=SECRET.")
        review_app = create_app(review, review_gallery, token=token, loopback_only=False)
        err.print(f"review of {review} at /review/ (open /review/?token=... with ${TOKEN_ENV})", highlight=False)
    serve(db, str(data_dir) if data_dir else None, host, port,
          Limits(rate=rate, burst=4 * rate, max_push_bytes=int(max_push_mb * 1024 * 1024),
                 trusted_proxies=trusted_proxy or None), log_level, review=review_app)


def sync_cmd(
    gallery: Annotated[Path | None, typer.Option("--gallery", "-g", help="Device gallery file (default: gallery in "
                                                                         "the config file). Created from the lab's "
                                                                         "signed snapshot on the first sync.")] = None,
    server: Annotated[str | None, typer.Option(help="Lab URL, e.g. https://lab.example.org (default: config "
                                                    "file).")] = None,
    config: Annotated[Path | None, typer.Option(help="Device config (TOML; default $FIELDREID_CONFIG or "
                                                     "~/.config/fieldreid/config.toml, written by `fieldreid init`). "
                                                     "The token comes from $FIELDREID_TOKEN or this file.")] = None,
    lab_key: Annotated[Path | None, typer.Option(help="File holding the lab's public key (default: config "
                                                      "file).")] = None,
    project: Annotated[str | None, typer.Option(help="Project (default: the device's only one).")] = None,
    pull: Annotated[bool, typer.Option("--pull/--no-pull", help="Pull the lab's galleries.")] = True,
    push: Annotated[bool, typer.Option("--push/--no-push", help="Push queued sightings.")] = True,
    full: Annotated[bool, typer.Option("--full", help="Pull full snapshots instead of deltas.")] = False,
    crops: Annotated[bool, typer.Option("--crops/--no-crops", help="Attach a JPEG crop to each new sighting "
                                                                    "(read from its image).")] = True,
    chunk: Annotated[int, typer.Option(help="Sightings per push chunk.")] = 64,
    retry_refused: Annotated[bool, typer.Option("--retry-refused", help="Send again the chunks the lab refused "
                                                                        "(after the cause was fixed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Pull the lab's galleries (signed; delta or snapshot) and push this device's sightings (resumable)."""
    from fieldreid.config import DeviceConfig
    from fieldreid.gallery.store import Gallery
    from fieldreid.sync.client import SyncClient, SyncConfig
    from fieldreid.sync.queue import crop_from_file

    device = DeviceConfig.load(config)
    gallery = device.require(gallery, "gallery", "--gallery", "device gallery")
    cfg = SyncConfig.load(config, server=server, lab_key=lab_key, project=project, chunk_sightings=chunk)
    for w in cfg.warnings:
        err.print(f"[yellow]warning:[/] {w}")
    report: dict = {}
    created = None
    if not Path(gallery).exists():
        if not pull:
            raise FieldreidError(f"No gallery at {gallery}: run `fieldreid sync` without --no-pull to create it "
                                 "from the lab's gallery.")
        from fieldreid.sync.bootstrap import create_from_lab

        with SyncClient(cfg) as boot:
            created = create_from_lab(gallery, boot)
            report["created"] = str(gallery)
            boot_bytes = boot.bytes_received
        err.print(f"created {gallery} from the lab's signed gallery", highlight=False)
    with Gallery(gallery, create=False) as g, SyncClient(cfg) as client:
        if created is not None:
            client.bytes_received += boot_bytes
        if pull:
            pulls = created if created is not None else client.pull(g, full=full)
            report["pull"] = [{"species": r.species, "kind": r.kind, "from": r.from_version, "to": r.to_version,
                               "bytes": r.bytes, **({"error": r.error} if r.error else {})} for r in pulls]
            for r in pulls:
                if r.error:
                    err.print(f"[yellow]pull {r.species} failed[/] (the other species were pulled): {r.error}",
                              highlight=False)
                    continue
                err.print(f"pull {r.species}: {r.kind} v{r.from_version} → v{r.to_version} ({r.bytes} bytes)")
            if any(r.error is None and r.details.get("changed") for r in pulls):
                _suggest(g, device, report)
        if push:
            if retry_refused:
                from fieldreid.sync.queue import Outbox

                Outbox(g).retry_rejected()
            p = client.push(g, crop_fn=crop_from_file if crops else None)
            report["push"] = {"queued": p.queued, "chunks": p.chunks, "accepted": p.accepted,
                              "duplicates": p.duplicates, "rejected": p.rejected, "bytes": p.bytes_sent,
                              "pending": p.pending, "without_crop": p.no_crop, "without_vector": p.no_vector,
                              "refused_chunks": p.refused}
            err.print(f"push: {p.accepted} sightings stored, {p.duplicates} already at the lab, "
                      f"{len(p.rejected)} rejected, {p.chunks} chunks, {p.bytes_sent} bytes; {p.pending} pending")
            if p.no_crop or p.no_vector:
                err.print(f"[yellow]note:[/] {p.no_crop} of the sightings sent had no crop (image gone, changed "
                          f"or unreadable) and {p.no_vector} no embedding")
            for r in p.rejected[:20]:
                err.print(f"  [yellow]rejected[/] {r.get('uid')}: {r.get('reason')}")
            for c in p.refused[:20]:
                err.print(f"  [yellow]refused by the lab[/], kept and not resent: chunk {c['key']} "
                          f"({c['sightings']} sightings): {c['reason']}", highlight=False)
        report["bytes_sent"], report["bytes_received"] = client.bytes_sent, client.bytes_received
    if as_json:
        out.print_json(json.dumps(report))


def _suggest(g, device, report: dict) -> None:
    """After a pull: which lab identity each of this device's provisional animals probably is."""
    from fieldreid.gallery.suggest import suggest_matches
    from fieldreid.sync.bootstrap import device_model_thresholds

    embedder = device.path_of("embedder")
    if embedder is None:
        from fieldreid.defaults import models_dir

        embedder = models_dir() / "embedder.onnx"
    found = suggest_matches(g, device_model_thresholds(g, embedder))
    report["suggestions"] = [{"identity": s.identity_id, "candidate": s.candidate_id, "species": s.candidate_species,
                              "score": round(s.score, 6), "decision": s.decision} for s in found]
    for s in found[:20]:
        err.print(f"your {s.identity_id} looks like lab animal {s.candidate_id} ({s.decision}, score {s.score:.3f}): "
                  f"`fieldreid gallery merge {s.identity_id} --into {s.candidate_id} -g {g.path}` if it is",
                  highlight=False)
    if len(found) > 20:
        err.print(f"... and {len(found) - 20} more: `fieldreid gallery list -g {g.path}`", highlight=False)


# ------------------------------------------------------------------------------ server admin
@server_app.command("init")
@_friendly
def init_cmd(db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Create the lab database and signing key (if absent); print the public key devices must pin."""
    lab = _lab(db, data_dir)
    err.print(f"lab database {lab.safe_url}; signing key {lab.data_dir / 'lab-signing-key.pem'} (back it up)")
    out.print(lab.key.public_b64)


@server_app.command("public-key")
@_friendly
def public_key_cmd(db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Print the lab's public key (put it in each device's sync.toml as lab_public_key)."""
    out.print(_lab(db, data_dir).key.public_b64)


@server_app.command("create-project")
@_friendly
def create_project_cmd(
    project: Annotated[str, typer.Argument(help="Project id (lower-case letters, digits, '-', '_').")],
    model_id: Annotated[str | None, typer.Option(help="The embedder's model id.")] = None,
    dim: Annotated[int | None, typer.Option(help="Embedding size.")] = None,
    from_gallery: Annotated[Path | None, typer.Option(help="Take model id and size from this gallery.")] = None,
    embedder: Annotated[Path | None, typer.Option(help="Take model id and size from this embedder ONNX.")] = None,
    db: DbOpt = None, data_dir: DataOpt = None,
) -> None:
    """Create a project bound to one embedder model (uploads from other models are refused)."""
    from fieldreid.server.admin import create_project

    if from_gallery is not None:
        from fieldreid.gallery.store import Gallery

        with Gallery(from_gallery, create=False) as g:
            model_id, dim = g.model_id, g.dim
    elif embedder is not None:
        from fieldreid.embed.runtime import Embedder

        e = Embedder(embedder)
        model_id, dim = e.model_id, e.dim
    if not model_id or not dim:
        raise typer.BadParameter("give --model-id and --dim, --from-gallery or --embedder")
    create_project(_lab(db, data_dir), project, model_id, dim)
    err.print(f"project {project}: model {model_id} ({dim}-d)")


@server_app.command("add-device")
@_friendly
def add_device_cmd(
    device: Annotated[str, typer.Argument(help="Device id (lower-case letters, digits, '-', '_').")],
    projects: Annotated[list[str], typer.Option("--project", "-p", help="Project(s) it may sync.")],
    db: DbOpt = None, data_dir: DataOpt = None,
) -> None:
    """Register a device and print its token ONCE (only a hash is stored): put it in the device's sync.toml."""
    from fieldreid.server.admin import register_device

    token = register_device(_lab(db, data_dir), device, projects)
    err.print(f"device {device} registered for {', '.join(projects)}. Its token (shown once):")
    out.print(token, highlight=False)


@server_app.command("rotate-token")
@_friendly
def rotate_token_cmd(device: str, db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Give a device a new token (the old one stops working); un-revokes it."""
    from fieldreid.server.admin import rotate_token

    out.print(rotate_token(_lab(db, data_dir), device), highlight=False)


@server_app.command("revoke-device")
@_friendly
def revoke_device_cmd(device: str, db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Revoke a device: its token is refused from the next request on."""
    from fieldreid.server.admin import revoke_device

    revoke_device(_lab(db, data_dir), device)
    err.print(f"device {device} revoked")


@server_app.command("import-gallery")
@_friendly
def import_gallery_cmd(
    gallery: Annotated[Path, typer.Argument(help="A fieldreid gallery file curated at the lab.")],
    project: ProjectOpt,
    species: Annotated[list[str] | None, typer.Option("--species", "-s", help="Only these species.")] = None,
    db: DbOpt = None, data_dir: DataOpt = None,
) -> None:
    """Import (idempotently) a gallery's identities, embeddings, local features, thresholds and fusion as the
    project's master."""
    from fieldreid.server.admin import import_gallery

    for sp, r in import_gallery(_lab(db, data_dir), project, gallery, species).items():
        err.print(f"{sp}: version {r['version']}, +{r['identities']} identities, +{r['embeddings']} embeddings, "
                  f"{r['features']} with new local features" + (", fusion" if r["fusion"] else ""))


@server_app.command("confirm")
@_friendly
def confirm_cmd(
    identity: Annotated[str, typer.Argument(help="Identity id (a device's animal: LOCAL@DEVICE).")],
    project: ProjectOpt, species: SpeciesOpt,
    as_id: Annotated[str | None, typer.Option("--as", help="Permanent id (required for a device's animal).")] = None,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    who: WhoOpt = None, db: DbOpt = None, data_dir: DataOpt = None,
) -> None:
    """Confirm a provisional identity; devices receive it (and rewrite their records) on their next pull."""
    from fieldreid.server.admin import confirm

    v = confirm(_lab(db, data_dir), project, species, identity, as_id, name, who)
    err.print(f"{identity} confirmed{f' as {as_id}' if as_id else ''}; {project}/{species} is now version {v}")


@server_app.command("merge")
@_friendly
def merge_cmd(
    sources: Annotated[list[str], typer.Argument(help="Identities to merge (e.g. nyala-P0003@cam-07).")],
    into: Annotated[str, typer.Option("--into", help="Identity that absorbs them.")],
    project: ProjectOpt, species: SpeciesOpt,
    new: Annotated[bool, typer.Option("--new", help="Create --into as a new confirmed identity.")] = False,
    name: Annotated[str | None, typer.Option(help="Display name of the target.")] = None,
    who: WhoOpt = None, db: DbOpt = None, data_dir: DataOpt = None,
) -> None:
    """Merge identities; each device rewrites its records on its next pull."""
    from fieldreid.server.admin import merge

    v = merge(_lab(db, data_dir), project, species, sources, into, new=new, name=name, who=who)
    err.print(f"merged {', '.join(sources)} into {into}; {project}/{species} is now version {v}")


@server_app.command("delete")
@_friendly
def delete_cmd(identity: str, project: ProjectOpt, species: SpeciesOpt, who: WhoOpt = None, db: DbOpt = None,
               data_dir: DataOpt = None) -> None:
    """Delete an identity from a master gallery (devices drop it on their next pull)."""
    from fieldreid.server.admin import delete_identity

    v = delete_identity(_lab(db, data_dir), project, species, identity, who)
    err.print(f"{identity} deleted; version {v}")


@server_app.command("identities")
@_friendly
def identities_cmd(project: ProjectOpt, species: SpeciesOpt, db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """List a master gallery's identities, devices' provisional animals included."""
    from rich.table import Table

    from fieldreid.server.admin import identities

    t = Table()
    for c in ("id", "name", "status", "origin", "device", "embeddings", "version"):
        t.add_column(c)
    for r in identities(_lab(db, data_dir), project, species):
        t.add_row(*(str(r[c]) if r[c] is not None else "" for c in ("id", "name", "status", "origin", "device",
                                                                    "embeddings", "version")))
    out.print(t)


@server_app.command("status")
@_friendly
def status_cmd(db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Projects, gallery versions, pending device animals, devices (JSON)."""
    from fieldreid.server.admin import summary

    out.print_json(json.dumps(summary(_lab(db, data_dir))))


@server_app.command("compact")
@_friendly
def compact_cmd(project: ProjectOpt, species: SpeciesOpt, db: DbOpt = None, data_dir: DataOpt = None) -> None:
    """Purge tombstones of a gallery; devices behind its current version then get a full snapshot."""
    from fieldreid.server.admin import compact

    err.print(f"compacted; delta floor now version {compact(_lab(db, data_dir), project, species)}")


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``sync`` and the ``server`` sub-app to ``app``."""
    app.command("serve")(_friendly(serve_cmd))
    app.command("sync")(_friendly(sync_cmd))
    app.add_typer(server_app, name="server")
