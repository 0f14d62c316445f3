"""The device's offline push queue, kept in the gallery file itself (survives reboots and power cuts).

Its tables (all prefixed ``sync_``) are part of the gallery's schema - created by the gallery's
migration v3 (:data:`fieldreid.gallery.schema.SYNC_TABLES`) when the file is opened, never here:

* ``sync_state`` — device id, project, pulled versions, the sighting watermark, this gallery's uuid.
* ``sync_outbox`` — one row per queued sighting: its embedding and JPEG crop (taken when the sighting
  was queued, so a camera card wiped later loses nothing) and the chunk it was put in; once the lab
  acknowledges it the blobs are dropped and the row stays as a marker (``chunk = '-'``).
* ``sync_chunks`` — chunks formed but not yet acknowledged. A chunk's key and members are written
  *before* it is sent, so a retry after a dropped link resends the same sightings under the same key and
  the server answers from its record instead of storing them twice. A chunk the lab refused as a whole
  (HTTP 409/413/422) keeps the lab's reason in ``rejected`` and is not sent again until
  :meth:`Outbox.retry_rejected`; the other chunks go on.
* ``sync_field_ids`` — the device's own provisional identities already sent to the lab.

Everything is one SQLite transaction per step on the gallery's connection (WAL, synchronous=FULL).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fieldreid.gallery.store import Gallery, parse_box

SENT = "-"  # sync_outbox.chunk of a sighting the lab has acknowledged
CROP_MAX_SIDE = 256
CROP_QUALITY = 85
#: (image path, box, source content sha256 or None) -> JPEG crop or None
CropFn = Callable[[str, str, str | None], bytes | None]
EmbedFn = Callable[[bytes], np.ndarray | None]


def get_state(gallery: Gallery, key: str, default: str | None = None) -> str | None:
    row = gallery.read("SELECT value FROM sync_state WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def set_state(con, key: str, value: str) -> None:
    """Inside a write transaction."""
    con.execute("INSERT INTO sync_state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                "excluded.value", (key, str(value)))


def gallery_uid(gallery: Gallery) -> str:
    """A random id fixed at the first sync: sighting uids are ``<gallery uid>:<sighting id>``."""
    uid = get_state(gallery, "gallery_uid")
    if uid is None:
        with gallery.transaction() as con:
            uid = get_state(gallery, "gallery_uid") or uuid.uuid4().hex
            set_state(con, "gallery_uid", uid)
    return uid


def encode_crop(pixels_bgr: np.ndarray, max_side: int = CROP_MAX_SIDE, quality: int = CROP_QUALITY) -> bytes:
    """A BGR crop → JPEG bytes, longer side at most ``max_side`` (≈10 KB at 256 px, quality 85)."""
    from fieldreid.frames.decode import encode_jpeg

    data = encode_jpeg(pixels_bgr, max_side, quality)
    if data is None:
        raise ValueError("JPEG encoding failed")
    return data


def crop_from_file(image: str, box: str, sha256: str | None = None) -> bytes | None:
    """The sighting's crop read back from its camera image (None if the file is gone or unreadable, or
    holds another picture than the one the sighting was made from: its content hash differs)."""
    import hashlib

    from fieldreid.crop import crops, whole_box
    from fieldreid.errors import FieldreidError
    from fieldreid.frames.decode import read_image

    try:
        frame = read_image(image, min_side=CROP_MAX_SIDE, keep_data=True)
        if sha256 is not None and (frame.data is None or hashlib.sha256(frame.data).hexdigest() != sha256):
            return None
        b = parse_box(box)
        # the crop the sighting's embedding was made from (fieldreid.crop), at the size it is sent
        [pixels] = crops(frame, [b if b is not None else whole_box(frame.size)], CROP_MAX_SIDE)
        return encode_crop(pixels)
    except (FieldreidError, OSError, ValueError):
        return None


def image_path(image: str, root: str | None) -> str:
    """Where a sighting's image is now: a relative path is relative to the folder that produced it (a watch
    camera root), never to the current directory."""
    from pathlib import Path

    if root and not Path(image).is_absolute():
        return str(Path(root) / image)
    return image


@dataclass
class Chunk:
    key: str
    sighting_ids: list[int]


class Outbox:
    """Sightings waiting to be pushed.

    >>> box = Outbox(gallery)                                 # doctest: +SKIP
    >>> box.add(sighting_id, vector=vec, crop_jpeg=jpeg)      # a watch loop that has both at hand
    >>> box.collect(crop_fn=crop_from_file)                   # or: queue every sighting not yet queued
    """

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery

    def add(self, sighting_id: int, vector: np.ndarray | None = None, crop_jpeg: bytes | None = None) -> None:
        """Queue one recorded sighting with its embedding and crop (a no-op if already queued)."""
        self.add_many([(sighting_id, vector, crop_jpeg)])

    def add_many(self, items) -> None:
        with self.gallery.transaction() as con:
            for sid, vec, crop in items:
                blob = None if vec is None else np.asarray(vec, "<f4").reshape(-1).tobytes()
                con.execute("INSERT OR IGNORE INTO sync_outbox (sighting_id, vector, crop) VALUES (?, ?, ?)",
                            (int(sid), blob, crop))

    def collect(self, crop_fn: CropFn | None = crop_from_file, embed_fn: EmbedFn | None = None,
                batch: int = 200) -> int:
        """Queue every sighting recorded since the last call.

        The crop is read from the sighting's image - a relative path under the folder that produced it
        (``source_root``: the watch camera root), checked against the image's content hash when known.
        The embedding is the sighting's own query vector, else the gallery's vector for that image and box
        (provisional animals), else ``embed_fn(crop)``, else none."""
        added = 0
        while True:
            mark = int(get_state(self.gallery, "queued_upto", "0"))
            rows = self.gallery.read("SELECT id, image, box, source_root, source_sha256, vector FROM sightings "
                                     "WHERE id > ? ORDER BY id LIMIT ?", (mark, batch)).fetchall()
            if not rows:
                return added
            items = []
            for sid, image, box, root, sha, own in rows:
                if self.gallery.read("SELECT 1 FROM sync_outbox WHERE sighting_id = ?", (sid,)).fetchone():
                    continue
                crop = crop_fn(image_path(image, root), box, sha) if crop_fn else None
                vec = None
                hit = None if own is not None else self.gallery.read(
                    "SELECT vector, dtype FROM embeddings WHERE source = ? AND box = ? LIMIT 1", (image, box)).fetchone()
                if own is not None:
                    vec = np.frombuffer(own, "<f4")
                elif hit is not None:
                    vec = np.frombuffer(hit[0], "<f2" if hit[1] == "float16" else "<f4").astype("<f4")
                elif embed_fn is not None and crop is not None:
                    vec = embed_fn(crop)
                items.append((sid, vec, crop))
            with self.gallery.transaction() as con:
                for sid, vec, crop in items:
                    blob = None if vec is None else np.asarray(vec, "<f4").reshape(-1).tobytes()
                    con.execute("INSERT OR IGNORE INTO sync_outbox (sighting_id, vector, crop) VALUES (?, ?, ?)",
                                (int(sid), blob, crop))
                set_state(con, "queued_upto", str(rows[-1][0]))
            added += len(items)

    def pending(self) -> int:
        """Sightings not yet acknowledged by the lab (those in refused chunks included)."""
        return int(self.gallery.read("SELECT count(*) FROM sync_outbox WHERE chunk IS NULL OR chunk != ?",
                                     (SENT,)).fetchone()[0])

    def reject(self, chunk: Chunk, reason: str) -> None:
        """The lab refused this chunk as a whole: keep it, with the reason, and stop sending it."""
        with self.gallery.transaction() as con:
            con.execute("UPDATE sync_chunks SET rejected = ? WHERE key = ?", (reason[:2000] or "refused", chunk.key))

    def rejected_chunks(self) -> list[dict]:
        """Chunks the lab refused: ``{key, sightings, reason}``, oldest first."""
        return [{"key": k, "sightings": n, "reason": r} for k, n, r in self.gallery.read(
            "SELECT key, n, rejected FROM sync_chunks WHERE rejected IS NOT NULL ORDER BY seq")]

    def retry_rejected(self) -> int:
        """Send the refused chunks again on the next push (after the lab or this device was fixed)."""
        with self.gallery.transaction() as con:
            return con.execute("UPDATE sync_chunks SET rejected = NULL WHERE rejected IS NOT NULL").rowcount

    def sent(self) -> int:
        return int(self.gallery.read("SELECT count(*) FROM sync_outbox WHERE chunk = ?", (SENT,)).fetchone()[0])

    def chunks(self, max_sightings: int = 64, max_bytes: int = 4 * 1024 * 1024) -> list[Chunk]:
        """Chunks to send, oldest first: the unacknowledged ones as they were formed, then new ones."""
        free = self.gallery.read("SELECT sighting_id, length(coalesce(vector, '')) + length(coalesce(crop, '')) "
                                 "FROM sync_outbox WHERE chunk IS NULL ORDER BY sighting_id").fetchall()
        if free:
            groups: list[list[int]] = [[]]
            size = 0
            for sid, nbytes in free:
                if groups[-1] and (len(groups[-1]) >= max_sightings or size + nbytes + 512 > max_bytes):
                    groups.append([])
                    size = 0
                groups[-1].append(int(sid))
                size += nbytes + 512
            with self.gallery.transaction() as con:
                seq = con.execute("SELECT coalesce(max(seq), 0) FROM sync_chunks").fetchone()[0]
                for g in groups:
                    seq += 1
                    key = uuid.uuid4().hex
                    con.execute("INSERT INTO sync_chunks (key, seq, n) VALUES (?, ?, ?)", (key, seq, len(g)))
                    con.executemany("UPDATE sync_outbox SET chunk = ? WHERE sighting_id = ?", [(key, s) for s in g])
        out = []
        for (key,) in self.gallery.read("SELECT key FROM sync_chunks WHERE rejected IS NULL ORDER BY seq").fetchall():
            ids = [r[0] for r in self.gallery.read("SELECT sighting_id FROM sync_outbox WHERE chunk = ? ORDER BY "
                                                   "sighting_id", (key,))]
            out.append(Chunk(key, ids))
        return out

    def payload(self, chunk: Chunk, device_id: str) -> tuple[dict, list[str]]:
        """The msgpack-ready chunk body and the local provisional identities it introduces to the lab."""
        g = self.gallery
        uid = gallery_uid(self.gallery)
        model_id = self.gallery.model_id
        species_of = self.gallery.identity_species()
        field = {r[0] for r in g.read("SELECT id FROM identities WHERE origin = 'field'")}
        pushed = {r[0] for r in g.read("SELECT local_id FROM sync_field_ids")}
        sole = self.gallery.species()
        fallback = sole[0] if len(sole) == 1 else "animal"
        sightings, introduce = [], []
        for sid in chunk.sighting_ids:
            cur = g.read("SELECT s.*, o.vector AS qvec, o.crop AS qcrop FROM sightings s JOIN sync_outbox o ON "
                              "o.sighting_id = s.id WHERE s.id = ?", (sid,))
            names = [d[0] for d in cur.description]
            row = cur.fetchone()
            if row is None:
                continue
            r = dict(zip(names, row, strict=True))
            ident, runner = r["identity_id"], r["runner_up_id"]
            if ident in field and ident not in pushed and ident not in introduce:
                introduce.append(ident)
            sightings.append({
                "uid": f"{uid}:{sid}", "species": species_of.get(ident) or fallback, "identity": ident,
                "identity_kind": "field" if ident in field else "lab",
                "runner_up": f"{runner}@{device_id}" if runner in field else runner,
                "decision": r["decision"], "score": r["score"], "runner_up_score": r["runner_up_score"],
                "upper": r["upper"], "lower": r["lower"], "threshold_method": r["threshold_method"],
                "model_id": r["model_id"] or model_id, "gallery_version": r["gallery_version"],
                "captured": r["captured"], "camera": r["camera"], "image": r["image"], "box": r["box"],
                "vector": r["qvec"], "crop": r["qcrop"]})
        identities = []
        for local in introduce:
            embs = g.read("SELECT id, source, box, vector, dtype FROM embeddings WHERE identity_id = ? ORDER BY id "
                               "LIMIT 64", (local,)).fetchall()
            identities.append({"local_id": local, "species": species_of.get(local) or fallback, "embeddings": [
                {"source": src, "box": box, "vector": np.frombuffer(v, "<f2" if dt == "float16" else "<f4")
                 .astype("<f4").tobytes()} for _, src, box, v, dt in embs], "_ids": [e[0] for e in embs]})
        return {"sightings": sightings, "identities": identities}, introduce

    def ack(self, chunk: Chunk, introduced: list[dict]) -> None:
        """The server has the chunk: forget it and its sightings' queued copies, remember the identities sent."""
        with self.gallery.transaction() as con:
            # the row stays (marked sent, blobs dropped) so a later collect() never queues the sighting again
            con.execute("UPDATE sync_outbox SET chunk = ?, vector = NULL, crop = NULL WHERE chunk = ?",
                        (SENT, chunk.key))
            con.execute("DELETE FROM sync_chunks WHERE key = ?", (chunk.key,))
            for ident in introduced:
                con.execute("INSERT OR REPLACE INTO sync_field_ids (local_id, embedding_ids) VALUES (?, ?)",
                            (ident["local_id"], json.dumps(ident["_ids"])))
