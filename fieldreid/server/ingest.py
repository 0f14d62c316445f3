"""Push handling: check every uploaded sighting, then store a chunk exactly once.

A chunk is one HTTP request holding up to ``MAX_SIGHTINGS`` sightings and the device's provisional
identities they refer to, sent with an idempotency key. The key and every sighting row are committed in
one transaction, so a retry of a chunk whose answer was lost returns the stored answer, and a sighting
that reaches the server twice (in two different chunks) is stored once (``UNIQUE(device_id, uid)``).

Content checks (a sighting that fails one is rejected with its reason; the rest of the chunk is kept):
JPEG magic bytes, decodable by Pillow, at most ``MAX_CROP_PIXELS``; embedding exactly ``dim`` float32
values, all finite, from the project's model; text fields of bounded length. Nothing in an upload is used
as a file path.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from fieldreid.server import schema as s
from fieldreid.server.db import LabDB, LabError, now

MAX_SIGHTINGS = 512
MAX_CROP_BYTES = 1024 * 1024
MAX_CROP_PIXELS = 4096 * 4096
MAX_IDENTITIES = 512
MAX_EMBEDDINGS_PER_IDENTITY = 64
DECISIONS = ("known", "new", "uncertain")
_TEXT_LIMITS = {"uid": 128, "species": 64, "identity": 128, "runner_up": 128, "captured": 40, "camera": 200,
                "image": 1024, "box": 100, "threshold_method": 200, "model_id": 500}


class BadChunk(LabError):
    """The chunk as a whole is malformed (HTTP 400/422); nothing of it was stored."""


def check_jpeg(data: object) -> str | None:
    """None if ``data`` is a decodable JPEG within the limits, else the reason."""
    if not isinstance(data, bytes | bytearray):
        return "crop is not bytes"
    if len(data) > MAX_CROP_BYTES:
        return f"crop is {len(data)} bytes (limit {MAX_CROP_BYTES})"
    if not data.startswith(b"\xff\xd8\xff"):
        return "crop is not a JPEG (bad magic bytes)"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            w, h = img.size
            if w * h > MAX_CROP_PIXELS or w == 0 or h == 0:
                return f"crop is {w}x{h} pixels (limit {MAX_CROP_PIXELS} pixels)"
            img.load()
    except Exception as exc:  # any decoder failure is the upload's fault, never the server's
        return f"crop does not decode as JPEG ({type(exc).__name__})"
    return None


def check_vector(data: object, dim: int) -> str | None:
    if not isinstance(data, bytes | bytearray):
        return "embedding is not bytes"
    if len(data) != 4 * dim:
        return f"embedding has {len(data) // 4} float32 values; the project model gives {dim}"
    if not np.all(np.isfinite(np.frombuffer(data, "<f4"))):
        return "embedding holds NaN or infinity"
    return None


def _text(d: dict, key: str, required: bool = False) -> str | None:
    v = d.get(key)
    if v is None:
        if required:
            raise ValueError(f"{key} missing")
        return None
    if not isinstance(v, str):
        raise ValueError(f"{key} is not text")
    if len(v) > _TEXT_LIMITS[key] or "\x00" in v:
        raise ValueError(f"{key} too long or holds NUL")
    return v


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} is not a finite number")
    return float(v)


@dataclass
class CheckedSighting:
    row: dict
    crop: bytes | None
    identity_kind: str


def check_sighting(d: object, model_id: str, dim: int) -> CheckedSighting:
    if not isinstance(d, dict):
        raise ValueError("sighting is not a map")
    row = {k: _text(d, k, k in ("uid", "species")) for k in ("uid", "species", "identity", "runner_up", "captured",
                                                             "camera", "image", "box", "threshold_method",
                                                             "model_id")}
    if not row["uid"] or not row["species"]:
        raise ValueError("uid and species must not be empty")
    if d.get("decision") not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}")
    if row["model_id"] != model_id:
        raise ValueError(f"sighting made with model {row['model_id']!r}, the project uses {model_id!r}")
    for k in ("score", "runner_up_score", "upper", "lower"):
        row[k] = _num(d, k)
    gv = d.get("gallery_version")
    if gv is not None and (isinstance(gv, bool) or not isinstance(gv, int)):
        raise ValueError("gallery_version is not an integer")
    row["gallery_version"] = gv
    row["decision"] = d["decision"]
    kind = d.get("identity_kind", "lab")
    if kind not in ("lab", "field"):
        raise ValueError("identity_kind must be lab or field")
    vec = d.get("vector")
    row["vector"] = None
    if vec is not None:
        reason = check_vector(vec, dim)
        if reason:
            raise ValueError(reason)
        row["vector"] = bytes(vec)
    crop = d.get("crop")
    if crop is not None:
        reason = check_jpeg(crop)
        if reason:
            raise ValueError(reason)
        crop = bytes(crop)
    return CheckedSighting(row, crop, kind)


def check_identity(d: object, dim: int) -> dict:
    if not isinstance(d, dict):
        raise ValueError("identity is not a map")
    local = d.get("local_id")
    species = d.get("species")
    if not isinstance(local, str) or not local or len(local) > 128 or "@" in local or "\x00" in local:
        raise ValueError("local_id must be text without '@', at most 128 characters")
    if not isinstance(species, str) or not species or len(species) > 64:
        raise ValueError("species must be text, at most 64 characters")
    embs = d.get("embeddings") or []
    if not isinstance(embs, list) or len(embs) > MAX_EMBEDDINGS_PER_IDENTITY:
        raise ValueError(f"at most {MAX_EMBEDDINGS_PER_IDENTITY} embeddings per identity")
    out = []
    for e in embs:
        if not isinstance(e, dict):
            raise ValueError("embedding is not a map")
        reason = check_vector(e.get("vector"), dim)
        if reason:
            raise ValueError(reason)
        src, box = e.get("source", ""), e.get("box", "")
        if not isinstance(src, str) or not isinstance(box, str) or len(src) > 1024 or len(box) > 100:
            raise ValueError("embedding source/box must be short text")
        out.append({"source": src, "box": box, "vector": bytes(e["vector"])})
    return {"local_id": local, "species": species, "embeddings": out}


def ingest_chunk(lab: LabDB, device_id: str, project_id: str, key: str, chunk: object) -> dict:
    """Store one pushed chunk exactly once; returns ``{accepted, duplicates, rejected, replayed}``."""
    if not isinstance(key, str) or not (8 <= len(key) <= 64) or not key.isascii() or not key.replace("-", "").isalnum():
        raise BadChunk("Idempotency-Key must be 8-64 letters, digits or '-'.")
    if not isinstance(chunk, dict):
        raise BadChunk("The chunk is not a msgpack map.")
    raw_s, raw_i = chunk.get("sightings") or [], chunk.get("identities") or []
    if not isinstance(raw_s, list) or not isinstance(raw_i, list):
        raise BadChunk("sightings and identities must be lists.")
    if len(raw_s) > MAX_SIGHTINGS or len(raw_i) > MAX_IDENTITIES:
        raise BadChunk(f"At most {MAX_SIGHTINGS} sightings and {MAX_IDENTITIES} identities per chunk.")
    with lab.read() as con:
        stored = con.execute(sa.select(s.push_chunks.c.response).where(
            s.push_chunks.c.device_id == device_id, s.push_chunks.c.key == key)).first()
        if stored is not None:
            return {**json.loads(stored[0]), "replayed": True}
        proj = lab.project(con, project_id)
    model_id, dim = proj.model_id, int(proj.dim)
    rejected: list[dict] = []
    checked: list[CheckedSighting] = []
    for d in raw_s:
        try:
            checked.append(check_sighting(d, model_id, dim))
        except ValueError as exc:
            uid = d.get("uid") if isinstance(d, dict) and isinstance(d.get("uid"), str) else None
            rejected.append({"uid": uid[:128] if uid else None, "reason": str(exc)})
    idents = []
    for d in raw_i:
        try:
            idents.append(check_identity(d, dim))
        except ValueError as exc:
            raise BadChunk(f"identity rejected: {exc}") from exc
    for c in checked:  # content-addressed, idempotent, before the transaction: an orphan crop is harmless
        c.row["crop_sha256"] = lab.store_crop(c.crop) if c.crop is not None else None
    last_exc: Exception | None = None
    for _ in range(4):  # a concurrent retry of the same chunk can collide on a unique key: re-run, then replay
        try:
            return _store(lab, device_id, project_id, key, checked, idents, rejected)
        except sa.exc.IntegrityError as exc:
            last_exc = exc
    raise LabError(f"Could not store chunk {key}: {last_exc}")


def _store(lab: LabDB, device_id: str, project_id: str, key: str, checked: list[CheckedSighting],
           idents: list[dict], rejected: list[dict]) -> dict:
    received = now()
    with lab.write() as con:
        stored = con.execute(sa.select(s.push_chunks.c.response).where(
            s.push_chunks.c.device_id == device_id, s.push_chunks.c.key == key)).first()
        if stored is not None:
            return {**json.loads(stored[0]), "replayed": True}
        gal_ids: dict[str, int] = {}

        def gallery_id(species: str) -> int:
            if species not in gal_ids:
                gal_ids[species] = int(lab.gallery(con, project_id, species, create=True).id)
            return gal_ids[species]

        new_identities = 0
        for ident in idents:
            gid = gallery_id(ident["species"])
            lab_id = f"{ident['local_id']}@{device_id}"
            exists = con.execute(sa.select(sa.literal(1)).where(s.identities.c.gallery_id == gid,
                                                                s.identities.c.id == lab_id)).first()
            if exists is not None:
                continue
            version = con.execute(sa.select(s.galleries.c.version).where(s.galleries.c.id == gid)).scalar_one()
            con.execute(s.identities.insert().values(
                gallery_id=gid, id=lab_id, name=None, status="provisional", origin="field", device_id=device_id,
                local_id=ident["local_id"], deleted=False, updated_version=version, created=received))
            if ident["embeddings"]:
                con.execute(s.embeddings.insert(), [
                    {"gallery_id": gid, "identity_id": lab_id, "source": f"device:{device_id}:{e['source']}",
                     "box": e["box"], "vector": e["vector"], "deleted": False, "updated_version": version}
                    for e in ident["embeddings"]])
            new_identities += 1
        uids = [c.row["uid"] for c in checked]
        present: set[str] = set()
        for i in range(0, len(uids), 500):
            present.update(r[0] for r in con.execute(sa.select(s.sightings.c.uid).where(
                s.sightings.c.device_id == device_id, s.sightings.c.uid.in_(uids[i:i + 500]))))
        rows, seen = [], set()
        resolved: dict[tuple[int, str | None], str | None] = {}
        for c in checked:
            r = c.row
            if r["uid"] in present or r["uid"] in seen:
                continue
            seen.add(r["uid"])
            gid = gallery_id(r["species"])
            device_identity = r.pop("identity")
            lab_identity = device_identity
            if device_identity is not None and c.identity_kind == "field":
                device_identity = lab_identity = f"{device_identity}@{device_id}"
            if (gid, lab_identity) not in resolved:
                resolved[gid, lab_identity] = lab.resolve(con, gid, lab_identity)
            rows.append({**r, "project_id": project_id, "device_id": device_id, "device_identity": device_identity,
                         "identity_id": resolved[gid, lab_identity], "received": received})
        if rows:
            con.execute(s.sightings.insert(), rows)
        response = {"accepted": len(rows), "duplicates": len(checked) - len(rows), "rejected": rejected,
                    "identities": new_identities}
        con.execute(s.push_chunks.insert().values(device_id=device_id, key=key, received=received,
                                                  response=json.dumps(response)))
        con.execute(sa.update(s.devices).where(s.devices.c.id == device_id).values(last_seen=received))
    return {**response, "replayed": False}
