"""Push handling: check every uploaded field, then store a chunk exactly once - or refuse it whole.

A chunk is one HTTP request holding up to ``MAX_SIGHTINGS`` sightings and the device's provisional
identities they refer to, sent with an idempotency key. The key and every sighting row are committed in
one transaction, so a retry of a chunk whose answer was lost returns the stored answer, and a sighting
that reaches the server twice (in two different chunks) is stored once (``UNIQUE(device_id, uid)``).
The key also records a fingerprint of what the chunk carried (each sighting's uid, image, box, crop and
vector): the same key with other sightings is refused (:class:`KeyConflict`, HTTP 409), never answered
from the record while the new sightings are silently dropped.

Every field is checked the way the lab checks its own (:mod:`fieldreid.server.fields`): species names
match the pattern of the lab's gallery names (they become galleries that every device pulls), ids and
text have bounded length and no control characters, numbers are finite (thresholds lower <= upper), the capture
time is ISO 8601, a box is four numbers; the crop is a JPEG of at most ``MAX_CROP_BYTES`` whose header
says at most ``MAX_CROP_SIDE`` pixels a side - read before anything is decoded -, the embedding exactly
``dim`` finite float32 values from the project's model. One bad field refuses the whole chunk
(:class:`BadChunk`, HTTP 422) with the sighting and the reason, and nothing of it is stored: one device's
bad data never becomes a gallery, a row or a file. Nothing in an upload is used as a file path.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import sqlalchemy as sa

from fieldreid.frames.decode import jpeg_segments
from fieldreid.server import schema as s
from fieldreid.server.db import LabDB, LabError, now
from fieldreid.server.fields import species_problem, text_problem

MAX_SIGHTINGS = 512
#: a device sends crops of at most 256 px a side (~13 kB); these bound the lab's decoding work per crop
MAX_CROP_BYTES = 512 * 1024
MAX_CROP_SIDE = 1024
MAX_CROP_PIXELS = MAX_CROP_SIDE * MAX_CROP_SIDE
MAX_IDENTITIES = 512
MAX_EMBEDDINGS_PER_IDENTITY = 64
DECISIONS = ("known", "new", "uncertain")
_TEXT_LIMITS = {"uid": 128, "species": 64, "identity": 200, "runner_up": 200, "captured": 40, "camera": 200,
                "image": 1024, "box": 100, "threshold_method": 200, "model_id": 500}


class BadChunk(LabError):
    """The chunk as a whole is malformed or holds an invalid field (HTTP 422); nothing of it was stored."""


class KeyConflict(LabError):
    """The idempotency key was already used for a chunk with other sightings (HTTP 409); nothing stored."""


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (SOFn), without decoding; None if there is none."""
    for marker, pos in jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            h = int.from_bytes(data[pos + 5:pos + 7], "big")
            w = int.from_bytes(data[pos + 7:pos + 9], "big")
            return w, h
    return None  # EOI or SOS before any frame header, or a damaged header


def check_jpeg(data: object) -> str | None:
    """None if ``data`` is a decodable JPEG within the limits, else the reason. The size limits are
    checked on the bytes and the frame header before any pixel is decoded."""
    if not isinstance(data, bytes | bytearray):
        return "crop is not bytes"
    if len(data) > MAX_CROP_BYTES:
        return f"crop is {len(data)} bytes (limit {MAX_CROP_BYTES})"
    if not data.startswith(b"\xff\xd8\xff"):
        return "crop is not a JPEG (bad magic bytes)"
    size = jpeg_size(bytes(data))
    if size is None:
        return "crop does not decode as JPEG (no frame header)"
    w, h = size
    if w == 0 or h == 0 or w > MAX_CROP_SIDE or h > MAX_CROP_SIDE:
        return f"crop is {w}x{h} pixels (limit {MAX_CROP_SIDE} pixels a side)"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            if img.size != (w, h):
                return f"crop header is inconsistent ({img.size[0]}x{img.size[1]} vs {w}x{h})"
            img.draft("L", (max(1, w // 8), max(1, h // 8)))  # every coefficient is still entropy-decoded
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


def _text(d: dict, key: str, required: bool = False, forbid: str = "", trimmed: bool = False) -> str | None:
    problem = text_problem(key, d.get(key), _TEXT_LIMITS[key], required=required, forbid=forbid, trimmed=trimmed,
                           controls=key in ("image", "camera"))  # file and folder names, shown, never opened
    if problem:
        raise ValueError(problem)
    return d.get(key)


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{key} is not a finite number")
    return float(v)


def _box(text: str | None) -> None:
    if not text:
        return
    parts = text.split(",")
    try:
        ok = len(parts) == 4 and all(math.isfinite(float(p)) for p in parts)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError("box must be empty or four comma-separated numbers (x1,y1,x2,y2)")


@dataclass
class CheckedSighting:
    row: dict
    crop: bytes | None
    identity_kind: str


def check_sighting(d: object, model_id: str, dim: int) -> CheckedSighting:
    if not isinstance(d, dict):
        raise ValueError("sighting is not a map")
    kind = d.get("identity_kind", "lab")
    if kind not in ("lab", "field"):
        raise ValueError("identity_kind must be lab or field")
    row = {"uid": _text(d, "uid", required=True, trimmed=True),
           "species": d.get("species"),
           "identity": _text(d, "identity", forbid="@" if kind == "field" else ""),
           "runner_up": _text(d, "runner_up"),
           **{k: _text(d, k) for k in ("captured", "camera", "image", "box", "threshold_method", "model_id")}}
    problem = species_problem(row["species"])
    if problem:
        raise ValueError(problem)
    if kind == "field" and row["identity"] is not None and len(row["identity"]) > 128:
        raise ValueError("a device's own identity id is longer than 128 characters")
    if d.get("decision") not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}")
    if row["model_id"] != model_id:
        raise ValueError(f"sighting made with model {row['model_id']!r}, the project uses {model_id!r}")
    if row["captured"] is not None:
        try:
            datetime.fromisoformat(row["captured"])
        except ValueError:
            raise ValueError(f"captured {row['captured']!r} is not an ISO 8601 time") from None
    _box(row["box"])
    for k in ("score", "runner_up_score", "upper", "lower"):
        row[k] = _num(d, k)
    if row["upper"] is not None and row["lower"] is not None and row["lower"] > row["upper"]:
        raise ValueError("thresholds need lower <= upper")
    gv = d.get("gallery_version")
    if gv is not None and (isinstance(gv, bool) or not isinstance(gv, int) or not 0 <= gv < 2**62):
        raise ValueError("gallery_version is not a non-negative integer")
    row["gallery_version"] = gv
    row["decision"] = d["decision"]
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
    problem = text_problem("local_id", local, 128, required=True, forbid="@", trimmed=True)
    if problem:
        raise ValueError(problem)
    species = d.get("species")
    problem = species_problem(species)
    if problem:
        raise ValueError(problem)
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
        problem = (text_problem("embedding source", src, 1024, controls=True)
                   or text_problem("embedding box", box, 100))
        if problem:
            raise ValueError(problem)
        _box(box)
        out.append({"source": src, "box": box, "vector": bytes(e["vector"])})
    return {"local_id": local, "species": species, "embeddings": out}


def fingerprint(raw_sightings: list) -> str:
    """What a chunk carries, independent of what may change between an attempt and its retry (identity
    ids rewritten by a pull): each sighting's uid, image, box and the hashes of its crop and vector."""
    h = hashlib.sha256()
    items = []
    for d in raw_sightings:
        d = d if isinstance(d, dict) else {}
        items.append([str(d.get(k)) for k in ("uid", "image", "box")] + [
            hashlib.sha256(bytes(d[k])).hexdigest() if isinstance(d.get(k), bytes | bytearray) else ""
            for k in ("crop", "vector")])
    for item in sorted(items):
        h.update(json.dumps(item).encode("utf-8"))
    return h.hexdigest()


def _replay(stored: sa.Row, print_: str) -> dict:
    if stored.fingerprint is not None and stored.fingerprint != print_:
        raise KeyConflict("This Idempotency-Key was already used for a chunk with other sightings; nothing was "
                          "stored. Send new sightings under a new key.")
    return {**json.loads(stored.response), "replayed": True}


def ingest_chunk(lab: LabDB, device_id: str, project_id: str, key: str, chunk: object) -> dict:
    """Store one pushed chunk exactly once; returns ``{accepted, duplicates, rejected, replayed}``.

    Raises :class:`BadChunk` (nothing stored) when any field of it is invalid, :class:`KeyConflict` when
    the key was used for other sightings. ``rejected`` is always empty: a chunk is taken or refused whole.
    """
    if not isinstance(key, str) or not (8 <= len(key) <= 64) or not key.isascii() or not key.replace("-", "").isalnum():
        raise BadChunk("Idempotency-Key must be 8-64 letters, digits or '-'.")
    if not isinstance(chunk, dict):
        raise BadChunk("The chunk is not a msgpack map.")
    raw_s, raw_i = chunk.get("sightings") or [], chunk.get("identities") or []
    if not isinstance(raw_s, list) or not isinstance(raw_i, list):
        raise BadChunk("sightings and identities must be lists.")
    if len(raw_s) > MAX_SIGHTINGS or len(raw_i) > MAX_IDENTITIES:
        raise BadChunk(f"At most {MAX_SIGHTINGS} sightings and {MAX_IDENTITIES} identities per chunk.")
    print_ = fingerprint(raw_s)
    with lab.read() as con:
        stored = con.execute(sa.select(s.push_chunks.c.response, s.push_chunks.c.fingerprint).where(
            s.push_chunks.c.device_id == device_id, s.push_chunks.c.key == key)).first()
        if stored is not None:
            return _replay(stored, print_)
        proj = lab.project(con, project_id)
    model_id, dim = proj.model_id, int(proj.dim)
    checked: list[CheckedSighting] = []
    for i, d in enumerate(raw_s):
        try:
            checked.append(check_sighting(d, model_id, dim))
        except ValueError as exc:
            uid = d.get("uid") if isinstance(d, dict) and isinstance(d.get("uid"), str) else None
            who = f"sighting {uid[:128]!r}" if uid else f"sighting #{i}"
            raise BadChunk(f"{who}: {exc}. Nothing of this chunk was stored.") from exc
    idents = []
    for d in raw_i:
        try:
            idents.append(check_identity(d, dim))
        except ValueError as exc:
            raise BadChunk(f"identity rejected: {exc}. Nothing of this chunk was stored.") from exc
    for c in checked:  # content-addressed, idempotent, before the transaction: an orphan crop is harmless
        c.row["crop_sha256"] = lab.store_crop(c.crop) if c.crop is not None else None
    last_exc: Exception | None = None
    for _ in range(4):  # a concurrent retry of the same chunk can collide on a unique key: re-run, then replay
        try:
            return _store(lab, device_id, project_id, key, print_, checked, idents)
        except sa.exc.IntegrityError as exc:
            last_exc = exc
    raise LabError(f"Could not store chunk {key}: {last_exc}")


def _store(lab: LabDB, device_id: str, project_id: str, key: str, print_: str, checked: list[CheckedSighting],
           idents: list[dict]) -> dict:
    received = now()
    with lab.write() as con:
        stored = con.execute(sa.select(s.push_chunks.c.response, s.push_chunks.c.fingerprint).where(
            s.push_chunks.c.device_id == device_id, s.push_chunks.c.key == key)).first()
        if stored is not None:
            return _replay(stored, print_)
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
        response = {"accepted": len(rows), "duplicates": len(checked) - len(rows), "rejected": [],
                    "identities": new_identities}
        con.execute(s.push_chunks.insert().values(device_id=device_id, key=key, received=received,
                                                  response=json.dumps(response), fingerprint=print_))
        con.execute(sa.update(s.devices).where(s.devices.c.id == device_id).values(last_seen=received))
    return {**response, "replayed": False}
