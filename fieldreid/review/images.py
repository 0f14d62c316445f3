"""Pictures for the review page, each named by an id the databases know - never by a path from a request.

* ``thumb/<sha256>/<idx>`` - the thumbnail ``watch`` stored for a detection (results.db).
* ``frame/<sha256>`` - a camera frame of this output folder (results.db ``images`` names its file under
  the watched folder), downscaled for the screen. Served only if the file still holds the content it was
  processed from (its SHA-256 is checked), so a replaced file never shows a different picture.
* ``crop/<sha256>/<idx>`` - a detection's box (+20 % margin) cut from the full-resolution frame.
* ``embedding/<id>`` - the photo a gallery embedding was made from (enrolment images; a field animal's
  frame, found through the sighting that recorded it), cut by the one crop rule.
* ``sighting/<id>`` - a gallery sighting's crop, from its camera image (content checked), else the crop
  queued for sync.
* ``matches/<sha256>/<idx>/<embedding|sighting>/<id>`` - the local-feature matches between this animal and
  a gallery photo (:mod:`fieldreid.verify`), drawn as lines, when that stage is installed.

Decoded pictures are kept in a small LRU cache of encoded JPEGs.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from pathlib import Path

from fieldreid.review.queue import NotFound

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
FRAME_MAX = 1600
CROP_MAX = 2048
PHOTO_MAX = 480


def _check_sha(sha: str) -> str:
    if not SHA_RE.match(sha):
        raise NotFound("No such image.")
    return sha


class Pictures:
    def __init__(self, source, cache_size: int = 96) -> None:
        self.source = source
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = cache_size

    def _cached(self, key: tuple, make) -> bytes:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = make()
        self._cache[key] = data
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------------ this output folder
    def thumb(self, sha: str, idx: int) -> bytes:
        row = self.source.state.con.execute("SELECT thumb FROM detections WHERE sha256 = ? AND idx = ?",
                                            (_check_sha(sha), int(idx))).fetchone()
        if row is None or not row[0]:
            raise NotFound("No thumbnail for this detection.")
        return bytes(row[0])

    def _frame_file(self, sha: str) -> Path:
        from fieldreid.storage.fsutil import text_path

        row = self.source.state.con.execute("SELECT path FROM images WHERE sha256 = ?", (_check_sha(sha),)).fetchone()
        if row is None or self.source.root is None:
            raise NotFound("No such image in this output folder.")
        return self.source.root / text_path(row[0])

    @staticmethod
    def _read(path: Path, sha: str | None, **kw):
        from fieldreid.errors import FieldreidError
        from fieldreid.frames.decode import read_image

        try:
            frame = read_image(path, keep_data=True, **kw)
        except (FieldreidError, OSError) as exc:
            raise NotFound(f"Cannot read {path.name}: {getattr(exc, 'reason', None) or exc}") from exc
        if sha is not None and hashlib.sha256(frame.data).hexdigest() != sha:
            raise NotFound(f"{path.name} has changed since it was processed.")
        return frame

    def frame(self, sha: str, max_side: int = FRAME_MAX) -> bytes:
        from fieldreid.frames.decode import encode_jpeg

        side = max(128, min(int(max_side), 4096))

        def make() -> bytes:
            frame = self._read(self._frame_file(sha), sha, min_side=side)
            return encode_jpeg(frame.pixels, side, quality=85) or b""

        return self._cached(("frame", sha, side), make)

    def crop(self, sha: str, idx: int) -> bytes:
        from fieldreid.crop import MARGIN, cut
        from fieldreid.frames.decode import encode_jpeg

        def make() -> bytes:
            row = self.source.state.con.execute("SELECT x1, y1, x2, y2 FROM detections WHERE sha256 = ? AND idx = ?",
                                                (_check_sha(sha), int(idx))).fetchone()
            if row is None:
                raise NotFound("No such detection.")
            frame = self._read(self._frame_file(sha), sha, reduction=1)
            return encode_jpeg(cut(frame.pixels, row, MARGIN), CROP_MAX, quality=92) or b""

        return self._cached(("crop", sha, int(idx)), make)

    # ------------------------------------------------------------------ the gallery
    def _cut(self, path: Path, sha: str | None, box: str, max_side: int) -> bytes:
        from fieldreid.crop import crops, whole_box
        from fieldreid.frames.decode import encode_jpeg
        from fieldreid.gallery.store import parse_box

        frame = self._read(path, sha, min_side=max_side)
        b = parse_box(box)
        [pixels] = crops(frame, [b if b is not None else whole_box(frame.size)], max_side)
        return encode_jpeg(pixels, max_side, quality=88) or b""

    def _photo_files(self, kind: str, photo_id: int) -> list[tuple[Path, str | None, str]]:
        """Where a gallery photo can be read: (file, content sha256 to check or None, box), best first."""
        from fieldreid.storage.fsutil import text_path
        from fieldreid.sync.queue import image_path

        g = self.source.gallery
        if kind == "embedding":
            row = g.read("SELECT source, box FROM embeddings WHERE id = ?", (int(photo_id),)).fetchone()
            if row is None:
                raise NotFound("No such gallery photo.")
            source, box = row
            if Path(text_path(source)).is_absolute():
                return [(Path(text_path(source)), None, box)]
            # a field animal's embedding names its frame relative to the camera root of the sighting that made it
            return [(Path(text_path(image_path(image, root))), sha, box) for image, root, sha in g.read(
                "SELECT image, source_root, source_sha256 FROM sightings WHERE image = ? AND box = ? ORDER BY id "
                "LIMIT 3", (source, box))]
        row = g.read("SELECT image, box, source_root, source_sha256 FROM sightings WHERE id = ?",
                     (int(photo_id),)).fetchone()
        if row is None:
            raise NotFound("No such sighting.")
        image, box, root, sha = row
        return [(Path(text_path(image_path(image, root))), sha, box)]

    def embedding(self, emb_id: int, max_side: int = PHOTO_MAX) -> bytes:
        def make() -> bytes:
            for path, sha, box in self._photo_files("embedding", emb_id):
                try:
                    return self._cut(path, sha, box, max_side)
                except NotFound:
                    continue
            raise NotFound("The photo of this gallery embedding is not reachable from here.")

        return self._cached(("embedding", int(emb_id), max_side), make)

    def sighting(self, sighting_id: int, max_side: int = PHOTO_MAX) -> bytes:
        def make() -> bytes:
            g = self.source.gallery
            [(path, sha, box)] = self._photo_files("sighting", sighting_id)
            try:
                return self._cut(path, sha, box, max_side)
            except NotFound:
                if g.read("SELECT count(*) FROM sqlite_master WHERE name = 'sync_outbox'").fetchone()[0]:
                    crop = g.read("SELECT crop FROM sync_outbox WHERE sighting_id = ?", (int(sighting_id),)).fetchone()
                    if crop and crop[0]:
                        return bytes(crop[0])
                raise

        return self._cached(("sighting", int(sighting_id), max_side), make)

    def matches(self, sha: str, idx: int, kind: str, photo_id: int, side: int = 360) -> bytes:
        """The local-feature matches (:mod:`fieldreid.verify`) between this animal and a gallery photo: both
        crops side by side, a line per geometrically verified pair, the count in a caption."""
        try:
            from fieldreid.verify import draw_matches, extract, match
            from fieldreid.verify.features import crop_for_features
        except ImportError as exc:
            raise NotFound("Local-feature verification is not available in this installation.") from exc
        from fieldreid.frames.decode import encode_jpeg
        from fieldreid.gallery.store import parse_box

        def make() -> bytes:
            row = self.source.state.con.execute("SELECT x1, y1, x2, y2 FROM detections WHERE sha256 = ? AND idx = ?",
                                                (_check_sha(sha), int(idx))).fetchone()
            if row is None:
                raise NotFound("No such detection.")
            query = self._read(self._frame_file(sha), sha)
            crop_a = crop_for_features(query.path, row, data=query.data)
            for path, psha, box in self._photo_files(kind, photo_id):
                try:
                    photo = self._read(path, psha)
                except NotFound:
                    continue
                crop_b = crop_for_features(photo.path, parse_box(box), data=photo.data)
                a, b = extract(crop_a), extract(crop_b)
                m = match(a, b)
                title = f"{m.n_inliers} geometrically consistent matches (of {m.n_tentative} tentative)"
                return encode_jpeg(draw_matches(crop_a, a, crop_b, b, m, side=side, title=title), 2 * side + 400,
                                   quality=88) or b""
            raise NotFound("The gallery photo is not reachable from here.")

        return self._cached(("matches", sha, int(idx), kind, int(photo_id)), make)
