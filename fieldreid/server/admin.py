"""Lab curation and administration: projects, devices, gallery import, confirm / merge identities.

These run directly on the lab database (``fieldreid server ...`` on the lab machine), not over HTTP: the
API that devices reach has no admin endpoints at all. Every curation change bumps the gallery's version
and is logged in ``changes`` with who made it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from fieldreid.gallery.store import default_who
from fieldreid.server import schema as s
from fieldreid.server.auth import DEVICE_ID_RE, PROJECT_ID_RE, hash_token, new_token
from fieldreid.server.db import LabDB, LabError, NotFound, now
from fieldreid.server.fields import species_problem


def create_project(lab: LabDB, project_id: str, model_id: str, dim: int) -> None:
    if not PROJECT_ID_RE.match(project_id):
        raise LabError(f"Project id {project_id!r}: use 1-63 lower-case letters, digits, '-' or '_'.")
    if dim <= 0 or not model_id:
        raise LabError("A project needs its embedder's model id and embedding size (--model-id, --dim).")
    with lab.write() as con:
        if con.execute(sa.select(s.projects.c.id).where(s.projects.c.id == project_id)).first():
            raise LabError(f"Project '{project_id}' already exists.")
        con.execute(s.projects.insert().values(id=project_id, model_id=model_id, dim=int(dim), created=now()))
        con.execute(s.changes.insert().values(action="create-project", who=default_who(), at=now(),
                                              details=json.dumps({"project": project_id, "model_id": model_id})))


def register_device(lab: LabDB, device_id: str, projects: list[str]) -> str:
    """Register a device for ``projects``; returns its token (shown once; only its hash is stored)."""
    if not DEVICE_ID_RE.match(device_id):
        raise LabError(f"Device id {device_id!r}: use 1-63 lower-case letters, digits, '-' or '_'.")
    if not projects:
        raise LabError("Give at least one --project the device may sync.")
    token = new_token(device_id)
    with lab.write() as con:
        for p in projects:
            lab.project(con, p)
        if con.execute(sa.select(s.devices.c.id).where(s.devices.c.id == device_id)).first():
            raise LabError(f"Device '{device_id}' already exists; revoke it and register a new id, or use "
                           "`fieldreid server rotate-token`.")
        con.execute(s.devices.insert().values(id=device_id, token_hash=hash_token(token), revoked=False,
                                              created=now()))
        con.execute(s.device_projects.insert(), [{"device_id": device_id, "project_id": p} for p in projects])
        con.execute(s.changes.insert().values(action="register-device", who=default_who(), at=now(),
                                              details=json.dumps({"device": device_id, "projects": projects})))
    return token


def rotate_token(lab: LabDB, device_id: str) -> str:
    token = new_token(device_id)
    with lab.write() as con:
        n = con.execute(sa.update(s.devices).where(s.devices.c.id == device_id)
                        .values(token_hash=hash_token(token), revoked=False, revoked_at=None)).rowcount
        if not n:
            raise NotFound(f"No device '{device_id}'.")
        con.execute(s.changes.insert().values(action="rotate-token", who=default_who(), at=now(),
                                              details=json.dumps({"device": device_id})))
    return token


def revoke_device(lab: LabDB, device_id: str) -> None:
    with lab.write() as con:
        n = con.execute(sa.update(s.devices).where(s.devices.c.id == device_id)
                        .values(revoked=True, revoked_at=now())).rowcount
        if not n:
            raise NotFound(f"No device '{device_id}'.")
        con.execute(s.changes.insert().values(action="revoke-device", who=default_who(), at=now(),
                                              details=json.dumps({"device": device_id})))


def import_gallery(lab: LabDB, project_id: str, path: str | Path, species: list[str] | None = None) -> dict:
    """Copy a gallery file's identities, embeddings (with their local features), thresholds and fitted fusion
    into the project's master galleries.

    Idempotent: an embedding already present (same identity, source, box) is skipped. Every imported
    identity becomes a lab identity (sent to devices), provisional ones included. One version per species.
    """
    from fieldreid.gallery.store import Gallery

    report: dict = {}
    with Gallery(path, create=False) as g:
        bad = [p for p in (species_problem(sp) for sp in g.species() if not species or sp in species) if p]
        if bad:  # the lab serves a gallery per species name: a name outside the pattern could never be pulled
            raise LabError(f"{path}: {'; '.join(bad[:5])}. Nothing was imported; import the other species with "
                           "--species, or rename the identities' species in the gallery first.")
        with lab.read() as con:
            proj = lab.project(con, project_id)
        if g.model_id is not None and (g.model_id != proj.model_id or g.dim != proj.dim):
            raise LabError(f"{path} holds embeddings of model {g.model_id!r} ({g.dim}-d) but project "
                           f"'{project_id}' uses {proj.model_id!r} ({proj.dim}-d).")
        block = g.load_vectors()
        infos = {e.id: e for e in g.embeddings()}
        by_species: dict[str, list] = {}
        for ident in g.identities():
            by_species.setdefault(ident.species, []).append(ident)
        for sp, idents in sorted(by_species.items()):
            if species and sp not in species:
                continue
            wanted = {i.id for i in idents}
            rows = [(int(r), iid, block.matrix[k]) for k, (r, iid) in enumerate(zip(block.row_ids, block.identity_ids,
                                                                                  strict=True)) if iid in wanted]
            th = g.thresholds(sp, proj.model_id)
            fusion = g.fusion(sp, proj.model_id)
            feats = _local_features(g, [r for r, _, _ in rows], (fusion or {}).get("feature_kind"))
            with lab.write() as con:
                gal = lab.gallery(con, project_id, sp, create=True)
                details = {"source": str(path), "species": sp}
                version = lab.bump(con, gal.id, "import", default_who(), details)
                have = {r[0] for r in con.execute(sa.select(s.identities.c.id).where(
                    s.identities.c.gallery_id == gal.id, sa.not_(s.identities.c.deleted)))}
                n_new = 0
                for i in idents:
                    if i.id in have:
                        continue
                    con.execute(sa.delete(s.identities).where(s.identities.c.gallery_id == gal.id,
                                                              s.identities.c.id == i.id))  # an old tombstone
                    con.execute(s.identities.insert().values(
                        gallery_id=gal.id, id=i.id, name=i.name, status=i.status, origin="lab", deleted=False,
                        updated_version=version, created=now()))
                    n_new += 1
                present = {(r[0], r[1], r[2]) for r in con.execute(sa.select(
                    s.embeddings.c.identity_id, s.embeddings.c.source, s.embeddings.c.box).where(
                    s.embeddings.c.gallery_id == gal.id, sa.not_(s.embeddings.c.deleted)))}
                new_rows = [{"gallery_id": gal.id, "identity_id": iid, "source": infos[r].source, "box": infos[r].box,
                             "vector": np.asarray(vec, "<f4").tobytes(), "deleted": False, "updated_version": version}
                            for r, iid, vec in rows if (iid, infos[r].source, infos[r].box) not in present]
                if new_rows:
                    con.execute(s.embeddings.insert(), new_rows)
                n_feat = _import_features(con, gal.id, version, {(iid, infos[r].source, infos[r].box): feats[r]
                                                                 for r, iid, _ in rows if r in feats})
                if fusion is not None:
                    text = json.dumps(fusion, sort_keys=True)
                    last = con.execute(sa.select(s.fusion.c.data).where(
                        s.fusion.c.gallery_id == gal.id, s.fusion.c.model_id == proj.model_id)
                        .order_by(s.fusion.c.id.desc()).limit(1)).scalar()
                    if last != text:
                        con.execute(s.fusion.insert().values(gallery_id=gal.id, model_id=proj.model_id, data=text,
                                                             version=version))
                if th is not None:
                    con.execute(s.thresholds.insert().values(gallery_id=gal.id, model_id=proj.model_id, upper=th.upper,
                                                             lower=th.lower, method=th.method, version=version))
                details.update(identities=n_new, embeddings=len(new_rows))
                report[sp] = {"version": version, "identities": n_new, "embeddings": len(new_rows),
                              "features": n_feat, "fusion": fusion is not None}
    return report


def _local_features(g, row_ids: list[int], prefer: str | None = None) -> dict[int, tuple[str, bytes]]:
    """(kind, bytes) of each gallery embedding's local features, by embedding id (none: absent); where an
    embedding has several kinds (keypoint caps), the ``prefer`` kind (the species' fusion's) is the one kept."""
    out: dict[int, tuple[str, bytes]] = {}
    kinds = [k for (k,) in g.read("SELECT DISTINCT kind FROM local_features ORDER BY kind").fetchall()]
    for kind in sorted(kinds, key=lambda k: k == prefer):  # the preferred kind last: it overwrites
        out.update({i: (kind, b) for i, b in g.local_features(row_ids, kind).items()})
    return out


def _import_features(con, gallery_id: int, version: int, feats: dict[tuple, tuple[str, bytes]]) -> int:
    """Store local features of the lab embeddings matching (identity, source, box); an embedding whose
    features are new or changed is bumped to ``version`` so that deltas carry them. Returns how many."""
    if not feats:
        return 0
    rows = con.execute(sa.select(s.embeddings.c.id, s.embeddings.c.identity_id, s.embeddings.c.source,
                                 s.embeddings.c.box, s.embedding_features.c.kind, s.embedding_features.c.data)
                       .select_from(s.embeddings.outerjoin(s.embedding_features,
                                                           s.embedding_features.c.embedding_id == s.embeddings.c.id))
                       .where(s.embeddings.c.gallery_id == gallery_id, sa.not_(s.embeddings.c.deleted)))
    n = 0
    for r in rows.fetchall():
        f = feats.get((r.identity_id, r.source, r.box))
        if f is None or (r.kind, None if r.data is None else bytes(r.data)) == f:
            continue
        con.execute(sa.delete(s.embedding_features).where(s.embedding_features.c.embedding_id == r.id))
        con.execute(s.embedding_features.insert().values(embedding_id=r.id, kind=f[0], data=f[1]))
        con.execute(sa.update(s.embeddings).where(s.embeddings.c.id == r.id).values(updated_version=version))
        n += 1
    return n


def _identity(con, gallery_id: int, identity_id: str) -> sa.Row:
    row = con.execute(sa.select(s.identities).where(s.identities.c.gallery_id == gallery_id,
                                                    s.identities.c.id == identity_id,
                                                    sa.not_(s.identities.c.deleted))).first()
    if row is None:
        raise NotFound(f"No identity '{identity_id}' in this gallery. List them with `fieldreid server identities`.")
    return row


def _is_field_provisional(row: sa.Row) -> bool:
    return row.status == "provisional" and row.origin == "field"


def _move(con, gallery_id: int, source: str, target: str, version: int) -> int:
    """Move a source identity's embeddings to target, tombstone the source and record the merge."""
    n = con.execute(sa.update(s.embeddings).where(s.embeddings.c.gallery_id == gallery_id,
                                                  s.embeddings.c.identity_id == source,
                                                  sa.not_(s.embeddings.c.deleted))
                    .values(identity_id=target, updated_version=version)).rowcount
    con.execute(sa.update(s.identities).where(s.identities.c.gallery_id == gallery_id, s.identities.c.id == source)
                .values(deleted=True, updated_version=version))
    con.execute(s.merges.insert().values(gallery_id=gallery_id, version=version, source=source, target=target))
    con.execute(sa.update(s.sightings).where(s.sightings.c.identity_id == source).values(identity_id=target))
    return n


def merge(lab: LabDB, project_id: str, species: str, sources: list[str], target: str, *, new: bool = False,
          name: str | None = None, who: str | None = None) -> int:
    """Merge identities (lab ones, or devices' provisional ``P0001@device`` ones) into ``target``.

    ``new=True`` creates ``target`` as a confirmed identity. The target must be one devices receive (not a
    device's provisional animal: confirm that one first). Returns the gallery's new version.
    """
    srcs = [x for x in dict.fromkeys(sources) if x != target]
    if not srcs:
        raise LabError("merge needs at least one source identity other than the target.")
    with lab.write() as con:
        gal = lab.gallery(con, project_id, species)
        rows = [_identity(con, gal.id, x) for x in srcs]
        version = lab.bump(con, gal.id, "merge", who or default_who(), {"sources": srcs, "target": target,
                                                                        "new": new})
        if new:
            if con.execute(sa.select(s.identities.c.id).where(s.identities.c.gallery_id == gal.id,
                                                              s.identities.c.id == target,
                                                              sa.not_(s.identities.c.deleted))).first():
                raise LabError(f"Identity '{target}' already exists; drop --new to merge into it.")
            con.execute(sa.delete(s.identities).where(s.identities.c.gallery_id == gal.id, s.identities.c.id == target))
            origin = "field" if all(_is_field_provisional(r) for r in rows) else "lab"
            con.execute(s.identities.insert().values(gallery_id=gal.id, id=target, name=name, status="confirmed",
                                                     origin=origin, deleted=False, updated_version=version,
                                                     created=now()))
        else:
            tgt = _identity(con, gal.id, target)
            if _is_field_provisional(tgt):
                raise LabError(f"'{target}' is a device's provisional animal; confirm it first (`fieldreid server "
                               f"confirm {target} --as PERMANENT_ID`) or merge with --new.")
            con.execute(sa.update(s.identities).where(s.identities.c.gallery_id == gal.id,
                                                      s.identities.c.id == target)
                        .values(updated_version=version, **({"name": name} if name else {})))
        for x in srcs:
            _move(con, gal.id, x, target, version)
    return version


def confirm(lab: LabDB, project_id: str, species: str, identity_id: str, new_id: str | None = None,
            name: str | None = None, who: str | None = None) -> int:
    """Provisional → confirmed. A device's provisional animal needs a permanent id (``new_id``): it is
    moved there and the device rewrites its records on the next pull."""
    with lab.write() as con:
        gal = lab.gallery(con, project_id, species)
        row = _identity(con, gal.id, identity_id)
    if _is_field_provisional(row) or (new_id and new_id != identity_id):
        if not new_id:
            raise LabError(f"'{identity_id}' is a device's provisional animal: give it a permanent id with --as.")
        return merge(lab, project_id, species, [identity_id], new_id, new=True, name=name, who=who)
    with lab.write() as con:
        version = lab.bump(con, gal.id, "confirm", who or default_who(), {"identity": identity_id})
        con.execute(sa.update(s.identities).where(s.identities.c.gallery_id == gal.id,
                                                  s.identities.c.id == identity_id)
                    .values(status="confirmed", updated_version=version, **({"name": name} if name else {})))
    return version


def delete_identity(lab: LabDB, project_id: str, species: str, identity_id: str, who: str | None = None) -> int:
    with lab.write() as con:
        gal = lab.gallery(con, project_id, species)
        _identity(con, gal.id, identity_id)
        version = lab.bump(con, gal.id, "delete", who or default_who(), {"identity": identity_id})
        con.execute(sa.update(s.embeddings).where(s.embeddings.c.gallery_id == gal.id,
                                                  s.embeddings.c.identity_id == identity_id,
                                                  sa.not_(s.embeddings.c.deleted))
                    .values(deleted=True, vector=None, updated_version=version))
        con.execute(sa.update(s.identities).where(s.identities.c.gallery_id == gal.id,
                                                  s.identities.c.id == identity_id)
                    .values(deleted=True, updated_version=version))
    return version


def compact(lab: LabDB, project_id: str, species: str) -> int:
    """Purge tombstones; devices older than the current version then get a full snapshot. Returns the floor."""
    with lab.write() as con:
        gal = lab.gallery(con, project_id, species)
        gone = sa.select(s.embeddings.c.id).where(s.embeddings.c.gallery_id == gal.id, s.embeddings.c.deleted)
        con.execute(sa.delete(s.embedding_features).where(s.embedding_features.c.embedding_id.in_(gone)))
        con.execute(sa.delete(s.embeddings).where(s.embeddings.c.gallery_id == gal.id, s.embeddings.c.deleted))
        con.execute(sa.delete(s.identities).where(s.identities.c.gallery_id == gal.id, s.identities.c.deleted))
        con.execute(sa.update(s.galleries).where(s.galleries.c.id == gal.id).values(floor=gal.version))
    return int(gal.version)


def summary(lab: LabDB) -> dict:
    """Projects with their galleries (version, identities, pending device animals), devices, sightings."""
    out: dict = {"projects": {}, "devices": {}}
    with lab.read() as con:
        for p in con.execute(sa.select(s.projects).order_by(s.projects.c.id)):
            gals = {}
            for g in lab.galleries(con, p.id):
                counts = dict(con.execute(sa.select(s.identities.c.status, sa.func.count()).where(
                    s.identities.c.gallery_id == g.id, sa.not_(s.identities.c.deleted))
                    .group_by(s.identities.c.status)).all())
                pending = con.execute(sa.select(sa.func.count()).where(
                    s.identities.c.gallery_id == g.id, sa.not_(s.identities.c.deleted),
                    s.identities.c.origin == "field", s.identities.c.status == "provisional")).scalar_one()
                gals[g.species] = {"version": g.version, "floor": g.floor, "confirmed": counts.get("confirmed", 0),
                                   "provisional": counts.get("provisional", 0), "device_provisional": pending}
            n_sight = con.execute(sa.select(sa.func.count()).where(s.sightings.c.project_id == p.id)).scalar_one()
            out["projects"][p.id] = {"model_id": p.model_id, "dim": p.dim, "galleries": gals, "sightings": n_sight}
        for d in con.execute(sa.select(s.devices).order_by(s.devices.c.id)):
            out["devices"][d.id] = {"revoked": bool(d.revoked), "projects": lab.device_projects(con, d.id),
                                    "last_seen": d.last_seen}
    return out


def identities(lab: LabDB, project_id: str, species: str, include_deleted: bool = False) -> list[dict]:
    with lab.read() as con:
        gal = lab.gallery(con, project_id, species)
        q = sa.select(s.identities).where(s.identities.c.gallery_id == gal.id)
        if not include_deleted:
            q = q.where(sa.not_(s.identities.c.deleted))
        out = []
        for r in con.execute(q.order_by(s.identities.c.id)):
            n = con.execute(sa.select(sa.func.count()).where(s.embeddings.c.gallery_id == gal.id,
                                                             s.embeddings.c.identity_id == r.id,
                                                             sa.not_(s.embeddings.c.deleted))).scalar_one()
            out.append({"id": r.id, "name": r.name, "status": r.status, "origin": r.origin, "device": r.device_id,
                        "embeddings": n, "deleted": bool(r.deleted), "version": r.updated_version})
    return out
