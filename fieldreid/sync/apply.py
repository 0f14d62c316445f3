"""Apply a verified lab bundle to a device gallery in one SQLite transaction.

The device gallery is either the old version or the new one, never a mix: every change below (lab
identities and embeddings with their local features, merges rewriting the device's own records, thresholds
and the fitted score fusion, the pulled version)
happens inside one ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the gallery's connection, which also bumps the
gallery's ``version``/``structure`` so a running :class:`~fieldreid.gallery.Searcher` reloads.

What a pull owns on the device: identities with ``origin='lab'`` of the pulled species, and embeddings
whose source is ``lab:<project>:<lab embedding id>``. The device's own provisional animals
(``origin='field'``) and all sightings are never deleted; merges sent by the lab rewrite them:

* a merge ``<local>@<this device> → target`` (the lab confirmed or merged one of this device's animals):
  sightings naming ``<local>`` now name ``target``; the local provisional identity is removed (its
  embeddings already sent to the lab arrive inside ``target``; any others move to it);
* a merge ``A → B`` of lab identities: sightings naming ``A`` now name ``B``.
"""

from __future__ import annotations

import json

import numpy as np

from fieldreid.errors import FieldreidError
from fieldreid.gallery.store import Gallery, GalleryError, utc_now
from fieldreid.sync.queue import get_state, set_state


class BundleError(FieldreidError):
    """A verified bundle does not fit this gallery (wrong project/species/model, or an older version)."""


def version_key(project: str, species: str) -> str:
    return f"version:{project}:{species}"


def pulled_version(gallery: Gallery, project: str, species: str) -> int:
    return int(get_state(gallery, version_key(project, species), "0"))


def lab_source(project: str, eid: int) -> str:
    return f"lab:{project}:{eid}"


def _check(gallery: Gallery, p: dict, project: str, species: str, current: int) -> None:
    if p.get("project") != project or p.get("species") != species:
        raise BundleError(f"The lab sent a bundle for {p.get('project')}/{p.get('species')} when "
                          f"{project}/{species} was asked for; nothing was applied.")
    version = p.get("version")
    if not isinstance(version, int) or version < current:
        raise BundleError(f"The bundle is version {version}, older than this gallery's {current} (a replayed or "
                          "rolled-back bundle); nothing was applied.")
    if p.get("kind") == "delta":
        if p.get("base") != current:
            raise BundleError(f"The delta starts at version {p.get('base')} but this gallery is at {current}; "
                              "nothing was applied. Sync again (a full snapshot will be fetched).")
    elif p.get("kind") != "snapshot":
        raise BundleError(f"Unknown bundle kind {p.get('kind')!r}.")
    if p.get("dtype") != "<f4":
        raise BundleError(f"Unknown vector type {p.get('dtype')!r}; upgrade fieldreid.")
    mine = gallery.model_id
    if mine is not None and (mine != p.get("model_id") or gallery.dim != p.get("dim")):
        raise BundleError(f"This gallery holds embeddings of model {mine!r} but project {project} uses "
                          f"{p.get('model_id')!r}; re-embed the gallery with the project's embedder first.")


def _features(p: dict, n: int) -> list:
    """The bundle's per-embedding ``[kind, bytes]`` local features (None: none); a lab before schema 3 sends
    no list at all."""
    feats = p.get("features")
    if feats is None:
        return [None] * n
    if not isinstance(feats, list) or len(feats) != n:
        raise BundleError("The bundle's local features do not match its embedding list; nothing was applied.")
    for f in feats:
        if f is not None and not (isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                                  and isinstance(f[1], bytes)):
            raise BundleError("The bundle holds malformed local features; nothing was applied.")
    return [tuple(f) if f is not None else None for f in feats]


def _fusion(p: dict) -> dict | None:
    text = p.get("fusion")
    if text is None:
        return None
    try:
        fusion = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        fusion = None
    if not isinstance(fusion, dict):
        raise BundleError("The bundle's score fusion is not a JSON object; nothing was applied.")
    return fusion


def apply_bundle(gallery: Gallery, payload: dict, project: str, species: str, device_id: str,
                 _fail_after: str | None = None) -> dict:
    """Apply a bundle already verified by :func:`fieldreid.server.signing.verify_bundle`.

    ``_fail_after`` (tests only) raises after the named step, inside the transaction, to prove atomicity.
    """
    current = pulled_version(gallery, project, species)
    _check(gallery, payload, project, species, current)
    dim = int(payload["dim"])
    eids = [int(e) for e in payload["embedding_ids"]]
    owners = list(payload["embedding_identities"])
    vecs = np.frombuffer(payload["vectors"], "<f4")
    if vecs.size != len(eids) * dim or len(owners) != len(eids):
        raise BundleError("The bundle's vectors do not match its embedding list; nothing was applied.")
    vecs = vecs.reshape(len(eids), dim)
    if not np.all(np.isfinite(vecs)):
        raise BundleError("The bundle holds non-finite vectors; nothing was applied.")
    feats = _features(payload, len(eids))
    fusion = _fusion(payload)
    storage = "<f2" if gallery.storage == "float16" else "<f4"
    snapshot = payload["kind"] == "snapshot"
    details: dict = {"project": project, "species": species, "kind": payload["kind"], "from": current,
                     "to": payload["version"]}
    if payload["version"] == current and not snapshot and not eids and not payload["identities"] \
            and not payload["merges"] and not payload["embeddings_deleted"]:
        return {**details, "changed": False}
    now = utc_now()
    prefix = f"lab:{project}:"

    def step(name: str) -> None:
        if _fail_after == name:
            raise GalleryError(f"injected failure after {name}")

    with gallery.transaction("sync-pull", details, structural=True) as con:
        if gallery.meta("model_id") is None:
            gallery.set_meta("model_id", payload["model_id"])
            gallery.set_meta("dim", str(dim))
        incoming = {i[0] for i in payload["identities"] if not i[3]}
        # 1. a lab id that collides with one of this device's own provisional ids: renumber the local one
        renamed = {}
        for iid in sorted(incoming):
            row = con.execute("SELECT species FROM identities WHERE id = ? AND origin = 'field'", (iid,)).fetchone()
            if row is not None:
                new_local = gallery.next_provisional(row[0])
                con.execute("UPDATE identities SET id = ? WHERE id = ?", (new_local, iid))
                con.execute("UPDATE sightings SET identity_id = ? WHERE identity_id = ?", (new_local, iid))
                con.execute("UPDATE sightings SET runner_up_id = ? WHERE runner_up_id = ?", (new_local, iid))
                con.execute("UPDATE sync_field_ids SET local_id = ? WHERE local_id = ?", (new_local, iid))
                renamed[iid] = new_local
        details["renamed_local"] = renamed
        # 2. a snapshot replaces everything the lab owns for this species
        if snapshot:
            keep = incoming
            gone = [r[0] for r in con.execute("SELECT id FROM identities WHERE origin = 'lab' AND species = ?",
                                              (species,)) if r[0] not in keep]
            con.executemany("DELETE FROM identities WHERE id = ?", [(g,) for g in gone])
            keep_src = {lab_source(project, e) for e in eids}
            stale = [r[0] for r in con.execute(
                "SELECT e.id, e.source FROM embeddings e JOIN identities i ON i.id = e.identity_id "
                "WHERE i.species = ? AND substr(e.source, 1, ?) = ?", (species, len(prefix), prefix))
                if r[1] not in keep_src]
            con.executemany("DELETE FROM embeddings WHERE id = ?", [(e,) for e in stale])
            details["removed_identities"] = len(gone)
        step("snapshot-clear")
        # 3. identities
        for iid, name, status, deleted in payload["identities"]:
            if deleted:
                con.execute("DELETE FROM identities WHERE id = ? AND origin = 'lab'", (iid,))
                continue
            con.execute("INSERT INTO identities (id, name, species, status, origin, created, updated) VALUES "
                        "(?, ?, ?, ?, 'lab', ?, ?) ON CONFLICT(id) DO UPDATE SET name = excluded.name, status = "
                        "excluded.status, species = excluded.species, updated = excluded.updated",
                        (iid, name, species, status, now, now))
        step("identities")
        # 4. embeddings
        con.executemany("DELETE FROM embeddings WHERE source = ? AND box = ''",
                        [(lab_source(project, int(e)),) for e in payload["embeddings_deleted"]])
        model_id = payload["model_id"]
        con.executemany(
            "INSERT INTO embeddings (identity_id, model_id, dim, dtype, vector, source, box, created) VALUES "
            "(?, ?, ?, ?, ?, ?, '', ?) ON CONFLICT(model_id, source, box) DO UPDATE SET identity_id = "
            "excluded.identity_id, vector = excluded.vector, dtype = excluded.dtype",
            [(owners[k], model_id, dim, gallery.storage, vecs[k].astype(storage).tobytes(), lab_source(project, e), now)
             for k, e in enumerate(eids)])
        step("embeddings")
        # 4b. each embedding's local features (verification re-ranking), stored against the device's row id
        wanted = {lab_source(project, e): feats[k] for k, e in enumerate(eids) if feats[k] is not None}
        rows = []
        for src, (kind, data) in wanted.items():
            row = con.execute("SELECT id FROM embeddings WHERE model_id = ? AND source = ? AND box = ''",
                              (model_id, src)).fetchone()
            if row is not None:
                rows.append((int(row[0]), kind, data))
        details["features"] = gallery.set_local_features(rows)
        step("features")
        # 5. merges: rewrite this device's records
        suffix = f"@{device_id}"
        rewritten = 0
        for _version, source, target in payload["merges"]:
            local = source[:-len(suffix)] if source.endswith(suffix) else source
            local = renamed.get(local, local)
            rewritten += con.execute("UPDATE sightings SET identity_id = ? WHERE identity_id = ?",
                                     (target, local)).rowcount
            con.execute("UPDATE sightings SET runner_up_id = ? WHERE runner_up_id = ?", (target, local))
            if source.endswith(suffix):
                row = con.execute("SELECT embedding_ids FROM sync_field_ids WHERE local_id = ?", (local,)).fetchone()
                sent = json.loads(row[0]) if row else []
                con.executemany("DELETE FROM embeddings WHERE id = ? AND identity_id = ?", [(e, local) for e in sent])
                if con.execute("SELECT 1 FROM identities WHERE id = ?", (target,)).fetchone():
                    con.execute("UPDATE OR IGNORE embeddings SET identity_id = ? WHERE identity_id = ?", (target, local))
                    con.execute("DELETE FROM identities WHERE id = ? AND origin = 'field'", (local,))
                con.execute("DELETE FROM sync_field_ids WHERE local_id = ?", (local,))
        details["merges"] = len(payload["merges"])
        details["sightings_rewritten"] = rewritten
        step("merges")
        # 6. thresholds, then the version this gallery now holds
        th = payload.get("thresholds")
        if th is not None:
            last = gallery.thresholds(species, model_id)
            if last is None or (last.upper, last.lower, last.method) != (th[0], th[1], th[2]) or last.species != species:
                con.execute("INSERT INTO thresholds (species, model_id, upper, lower, method, created) VALUES "
                            "(?, ?, ?, ?, ?, ?)", (species, model_id, float(th[0]), float(th[1]), str(th[2]), now))
        if fusion is not None and gallery.fusion(species, model_id) != fusion:
            gallery.set_fusion(species, model_id, fusion)  # joins this transaction
        details["fusion"] = fusion is not None
        set_state(con, version_key(project, species), str(payload["version"]))
        set_state(con, "project", project)
        set_state(con, "device_id", device_id)
        details.update(identities=len(payload["identities"]), embeddings=len(eids),
                       embeddings_deleted=len(payload["embeddings_deleted"]))
        step("state")
    return {**details, "changed": True}
