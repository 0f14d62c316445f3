"""``fieldreid watch``: a camera-trap folder in, every image processed exactly once, results out.

Loop: a *pass* streams the files that need work (:mod:`~fieldreid.watch.scanner`) through a reader thread
(read bytes, re-stat, sha256, EXIF, decode: one batch ahead, bounded queue) into the detector and embedder,
and commits each batch; then events whose gap has passed are decided; then the loop sleeps on a
``threading.Event`` that inotify (watchdog) or a signal sets, with a timeout for the periodic rescan
(SD cards, FUSE and network mounts send no events) - no polling loop, no spinning.

**Never lose, never repeat - the commit protocol.**

1. *Batch*: every file's new state (done / failed / duplicate / pending), its image row, detections,
   embeddings, crop thumbnails and event membership are written in ONE SQLite transaction. ``kill -9``
   before COMMIT: nothing of the batch exists, the restart re-reads those files. After COMMIT: all of it
   exists and the files are skipped. Nothing outside the results database is touched by a batch.
2. *Event decision* (write-ahead): tracks are linked and decided against the gallery *without writing to
   it*; the decisions of every sighting and ``events.status = 'decided'`` are committed in one transaction.
3. *Gallery side effects*, replayed from step 2's record until done: a provisional identity for each new
   track via :meth:`Gallery.add_provisional`, keyed by (model, source image, box) - the gallery returns
   the existing identity on a replay instead of creating another; then the sightings, keyed by
   (image path, box) - the same key as (content sha256, box index) here, since a done path has one
   content; on recovery the keys already in the gallery are skipped. Then ``status = 'closed'``.
   A crash anywhere in 3 leaves the event ``decided``; the next start finishes it, adding nothing twice.

Duplicates (same sha256 under another name) are recorded as ``duplicate`` with the original's path and
never counted again. Files still being copied (changed between the scan's stat and the read, modified
within ``settle`` seconds, or truncated/empty/undecodable while younger than ``grace`` seconds) stay
``pending`` and are retried; after ``grace`` an undecodable file becomes ``failed`` with the reason.
"""

from __future__ import annotations

import hashlib
import os  # noqa: F401  (tests reach os.fsync through this module)
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.crop import CROP_RULE
from fieldreid.embed.pipeline import Pipeline, prefetch_batches
from fieldreid.errors import FieldreidError, ImageReadError
from fieldreid.frames.decode import DEFAULT_MAX_PIXELS, VIDEO_SUFFIXES, Frame, encode_jpeg, read_image
from fieldreid.frames.exif import CaptureInfo, read_capture_info
from fieldreid.gallery.openset import Decision, Identifier
from fieldreid.gallery.store import Gallery, box_key
from fieldreid.storage.fsutil import (
    DEFAULT_MAX_FILE_BYTES,
    FileChangedError,
    FileRefusedError,
    ReadInterrupted,
    path_text,
    read_regular_file,
)
from fieldreid.watch.events import (
    DEFAULT_GAP_S,
    DEFAULT_LINK_THRESHOLD,
    LinkRules,
    Sighting,
    exclusive_identities,
    link_tracks,
)
from fieldreid.watch.scanner import Candidate, FolderGoneError, ScanStats, candidate_at, scan
from fieldreid.watch.state import StateDB

RESULTS_DB = "results.db"
#: a camera folder (or the watched folder, for all its cameras) may name its animals' species in this file
SPECIES_FILE = ".fieldreid-species"
EMBED_DTYPE = "<f2"  # float16 on disk: half the size, cosine changes < 1e-3 (unit vectors)
MAX_DIRTY = 10_000  # more inotify paths than this between passes: do a full scan instead


@dataclass
class WatchConfig:
    """Options of ``fieldreid watch`` (the CLI documents each)."""

    root: Path
    out: Path
    gallery: Path
    batch: int = 8
    conf: float = 0.2
    gap: float = DEFAULT_GAP_S
    idle_close: float = 120.0
    settle: float = 2.0
    grace: float = 120.0
    rescan: float = 60.0
    flush_every: float = 60.0
    status_every: float = 10.0
    link_threshold: float = DEFAULT_LINK_THRESHOLD
    species: str | None = None
    thumb_size: int = 96
    write_outputs: bool = True
    max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass
class Loaded:
    """One candidate after the reader thread: ready (frame), or pending/failed with a reason."""

    cand: Candidate
    status: str
    reason: str | None = None
    sha: str | None = None
    frame: Frame | None = None
    capture: CaptureInfo | None = None


@dataclass
class PassResult:
    processed: int = 0
    fresh: int = 0
    pending: int = 0
    stats: ScanStats = field(default_factory=ScanStats)


class Stopped(Exception):
    """Internal: a stop was requested between batches."""


def _chunks(items: Iterable[Candidate], n: int) -> Iterator[list[Candidate]]:
    batch: list[Candidate] = []
    for it in items:
        batch.append(it)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def camera_species(root: Path, camera: str) -> str | None:
    """The species named by ``ROOT/CAMERA/.fieldreid-species`` or, failing that, ``ROOT/.fieldreid-species``
    (its first non-empty line), or None. Read when an event is decided, so a file added later counts."""
    root = Path(root)
    for folder in ((root / camera) if camera and (root / camera).is_dir() else None, root):
        if folder is None:
            continue
        try:
            text = (folder / SPECIES_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:  # absent (the usual case) or unreadable: no species from here
            continue
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return line.strip()
    return None


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Watcher:
    """Processes a camera folder into ``OUT/results.db`` (+ outputs) against an identity gallery.

    >>> w = Watcher(WatchConfig(Path("cards"), Path("out"), Path("g.db")), detector, embedder)  # doctest: +SKIP
    >>> w.run(once=True)                                                                      # doctest: +SKIP
    """

    def __init__(self, cfg: WatchConfig, detector, embedder, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.out = Path(cfg.out)
        self.log = log or _default_log
        self.detector, self.embedder = detector, embedder
        self.state = StateDB(self.out / RESULTS_DB)  # holds OUT/.lock until close()
        opened: list = [self.state]
        try:
            self.reader = StateDB(self.out / RESULTS_DB, readonly=True)
            opened.append(self.reader)
            self.gallery = Gallery(cfg.gallery)
            opened.append(self.gallery)
            self.gallery.check_model(embedder.model_id, embedder.dim)
        except BaseException:
            for db in reversed(opened):  # release the output folder's lock now, not at garbage collection
                db.close()
            raise
        self.identifier = Identifier(self.gallery, species=cfg.species, create_provisional=False, record=False,
                                     model_thresholds=getattr(embedder, "thresholds", None))
        self.pipe = Pipeline(detector, embedder, batch_size=cfg.batch, keep_crops=True, min_crop_conf=cfg.conf,
                             prefetch=False)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self._dirty: set[str] = set()
        self._dirty_full = False
        self._dirty_lock = threading.Lock()
        self._changed = False
        self._last_flush = 0.0
        self._last_status = time.monotonic()
        self._t0 = time.monotonic()
        self._n_session = 0
        self._queue = 0
        self._observer = None
        self.wakeups = 0  # times the watch loop woke from its wait: an idle watcher must (almost) never wake
        with self.state.transaction() as con:
            self.state.set_meta(con, "root", path_text(self.root.resolve()))
            self.state.set_meta(con, "gallery", str(Path(cfg.gallery).resolve()))
            self.state.set_meta(con, "detector", str(getattr(detector, "model_id", "detector")))
            self.state.set_meta(con, "embedder", embedder.model_id)
            self.state.set_meta(con, "conf", str(cfg.conf))
            self.state.set_meta(con, "gap", str(cfg.gap))
            self.state.set_meta(con, "crop_rule", CROP_RULE)
        self._species_warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._stop_observer()
        for closer in (self.reader.close, self.state.close, self.gallery.close):
            try:
                closer()
            except Exception:
                pass

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_stop(self, *_: object) -> None:
        """Finish the current batch, flush, return. Safe from a signal handler."""
        self.stop_event.set()
        self.wake.set()

    # ------------------------------------------------------------------ reading (reader thread)
    def _load(self, c: Candidate) -> Loaded:
        if c.refused:  # a link, FIFO or device: never opened
            return Loaded(c, "failed", c.refused)
        if c.path.suffix.lower() in VIDEO_SUFFIXES:
            return Loaded(c, "failed", "video files are not processed (extract frames first)")
        try:
            data, st = read_regular_file(c.path, self.cfg.max_file_bytes, follow_symlinks=False,
                                         identity=c.identity, stop=self.stop_event)
        except FileRefusedError as exc:
            return Loaded(c, "failed", exc.reason)
        except FileChangedError:
            return Loaded(c, "pending", "file replaced by another while being read (still being copied?)")
        except ReadInterrupted:
            return Loaded(c, "pending", "reading was interrupted by a stop request")
        except FileNotFoundError:
            return Loaded(c, "failed", "file disappeared before it could be read")
        except OSError as exc:
            return Loaded(c, "pending", f"cannot read file yet ({exc.strerror or exc})")
        if st.st_size != c.size or st.st_mtime_ns != c.mtime_ns or len(data) != st.st_size:
            return Loaded(c, "pending", "file changed while being read (still being copied?)")
        sha = hashlib.sha256(data).hexdigest()
        capture = read_capture_info(data, st.st_mtime)
        try:
            frame = read_image(c.path, min_side=self.pipe.detector_min_side, data=data, keep_data=True,
                               max_pixels=self.cfg.max_pixels)
        except ImageReadError as exc:
            young = time.time() - st.st_mtime < self.cfg.grace
            if young and c.path.suffix.lower() not in VIDEO_SUFFIXES:
                return Loaded(c, "pending", f"{exc.reason}; retrying until the file has been unchanged for "
                                            f"{self.cfg.grace:g} s", sha)
            return Loaded(c, "failed", exc.reason, sha)
        except Exception as exc:  # any other decoder failure (MemoryError, a library's own error): this file only
            return Loaded(c, "failed", f"the decoder failed ({type(exc).__name__}: {exc})"[:300], sha)
        return Loaded(c, "ready", None, sha, frame, capture)

    def _load_batch(self, batch: list[Candidate]) -> list[Loaded]:
        return [self._load(c) for c in batch]

    # ------------------------------------------------------------------ one batch
    def _thumb(self, crop: np.ndarray) -> bytes | None:
        s = self.cfg.thumb_size
        if s <= 0 or crop.size == 0:
            return None
        return encode_jpeg(crop, s, quality=80)

    def _process_batch(self, items: list[Loaded]) -> tuple[int, int]:
        """Detect/embed the ready items and commit the whole batch in one transaction; (done, pending)."""
        in_batch: dict[str, str] = {}
        ready: list[Loaded] = []
        dup_of: dict[int, str] = {}
        for i, it in enumerate(items):
            if it.status != "ready":
                continue
            prior = in_batch.get(it.sha) or self.state.done_path_for_hash(it.sha)
            if prior is not None and prior != it.cand.rel:
                dup_of[i] = prior
                it.frame = None
                continue
            if prior == it.cand.rel:  # same path, same content (touched or re-copied): nothing new
                dup_of[i] = prior
                continue
            in_batch[it.sha] = it.cand.rel
            ready.append(it)
        results = self.pipe.process([it.frame for it in ready]) if ready else []
        rows = []
        for it, res in zip(ready, results, strict=True):
            it.frame = None  # let the pixels go
            if res.failure:
                rows.append((it, None))
                continue
            det = res.detections
            emb = {int(j): res.embeddings[r] for r, j in enumerate(res.animal_index)}
            crops = {int(j): res.crops[r] for r, j in enumerate(res.animal_index)} if res.crops else {}
            dets = []
            for j in range(len(det)):
                vec = emb.get(j)
                dets.append((j, int(det.category[j]), float(det.confidence[j]), *(float(v) for v in det.xyxy[j]),
                             None if vec is None else np.asarray(vec, EMBED_DTYPE).tobytes(),
                             self._thumb(crops[j]) if j in crops else None))
            rows.append((it, (res.size, dets)))
        now = time.time()
        done = pending = 0
        with self.state.transaction() as con:
            for i, it in enumerate(items):
                c = it.cand
                if it.status == "pending":
                    pending += 1
                    self.state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, "pending", it.sha, it.reason)
                elif it.status == "failed":
                    self.state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, "failed", it.sha, it.reason)
                elif i in dup_of:
                    same = dup_of[i] == c.rel
                    self.state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, "done" if same else "duplicate",
                                           it.sha, None, None if same else dup_of[i])
            for it, payload in rows:
                c = it.cand
                if payload is None:
                    self.state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, "failed", it.sha,
                                           "could not be processed")
                    continue
                (h, w), dets = payload
                cap = it.capture
                event_id = self.state.assign_event(con, c.camera, cap.timestamp, self.cfg.gap)
                con.execute("INSERT INTO images (sha256, path, camera, captured, captured_ts, utc_offset, time_source, "
                            "make, model, width, height, latitude, longitude, event_id, processed) VALUES "
                            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (it.sha, c.rel, c.camera, cap.captured, cap.timestamp, cap.utc_offset, cap.time_source,
                             cap.make, cap.model, w, h, cap.latitude, cap.longitude, event_id, now))
                con.executemany("INSERT INTO detections (sha256, idx, category, conf, x1, y1, x2, y2, embedding, thumb) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [(it.sha, *d) for d in dets])
                self.state.upsert_file(con, c.rel, c.camera, c.size, c.mtime_ns, "done", it.sha)
                done += 1
        self._changed = True
        return done, pending

    # ------------------------------------------------------------------ passes
    def _lookup(self, rel: str):
        return self.reader.file_row(rel)

    def _targeted(self, paths: Iterable[str], stats: ScanStats) -> Iterator[Candidate]:
        """Candidates among paths inotify reported (the periodic full scan catches anything missed); the
        scan's rules apply (:func:`~fieldreid.watch.scanner.candidate_at`: no links followed)."""
        for p in sorted(set(paths)):
            fresh = stats.fresh
            cand = candidate_at(self.root, p, self._lookup, self.cfg.settle, stats)
            if stats.fresh > fresh:
                with self._dirty_lock:
                    self._dirty.add(p)
            if cand is not None:
                yield cand

    def run_pass(self, paths: Iterable[str] | None = None) -> PassResult:
        """Process every file that needs work (or only ``paths``); commits batch by batch."""
        res = PassResult()
        stats = res.stats
        cands = scan(self.root, self._lookup, self.cfg.settle, stats) if paths is None else self._targeted(paths, stats)
        loaded = prefetch_batches(_chunks(cands, self.cfg.batch), self._load_batch, depth=1,
                           stop_requested=self.stop_event)
        handled = 0
        try:
            for items in loaded:
                done, pending = self._process_batch(items)
                res.processed += done
                res.pending += pending
                self._n_session += len(items)
                handled += len(items)
                self._queue = max(0, stats.candidates - handled)
                self._maybe_status()
                if self.stop_event.is_set():
                    break
        finally:
            loaded.close()
        res.fresh = stats.fresh
        return res

    # ------------------------------------------------------------------ events
    def _event_species(self, event_id: int) -> str | None:
        """The species an event's animals are searched in: ``--species``, else the first line of
        ``CAMERA/.fieldreid-species`` (else ``ROOT/.fieldreid-species``), else None: every species in the
        gallery is searched and each decision carries the species of its match."""
        if self.cfg.species:
            return self.cfg.species
        row = self.state.con.execute("SELECT camera FROM events WHERE id = ?", (event_id,)).fetchone()
        camera = row[0] if row else ""
        species = camera_species(self.root, camera)
        if species and (camera, species) not in self._species_warned and species not in self.gallery.species():
            self._species_warned.add((camera, species))
            self.log(f"camera {camera}: species '{species}' ({SPECIES_FILE}) has no identities in the gallery, so "
                     f"its animals are all new (the gallery holds: {', '.join(self.gallery.species()) or 'none'})")
        return species

    def _event_sightings(self, event_id: int) -> list[Sighting]:
        rows = self.state.con.execute(
            "SELECT d.sha256, d.idx, i.captured_ts, i.path, d.conf, d.embedding, d.x1, d.y1, d.x2, d.y2, i.width, "
            "i.height FROM detections d JOIN images i ON i.sha256 = d.sha256 WHERE i.event_id = ? AND d.embedding "
            "IS NOT NULL", (event_id,))
        return [Sighting(sha, idx, (ts, path), conf, np.frombuffer(blob, EMBED_DTYPE).astype(np.float32),
                         (x1, y1, x2, y2), path, (w, h) if w and h else None)
                for sha, idx, ts, path, conf, blob, x1, y1, x2, y2, w, h in rows]

    def _link(self, sightings: list[Sighting], species: str | None = None) -> list:
        """Tracks of an event. With several detections, each is first searched on its own: what it alone is
        *known* as keeps two gallery animals out of one track, and the upper threshold in force is the
        cosine a link needs where box positions cannot vouch for it (see :mod:`fieldreid.watch.events`)."""
        if len(sightings) < 2:
            return link_tracks(sightings, self.cfg.link_threshold)
        singles = self.identifier.identify(np.stack([s.embedding for s in sightings]), self.embedder.model_id,
                                           sources=[s.path for s in sightings], boxes=[s.box for s in sightings],
                                           species=species)
        for s, d in zip(sightings, singles, strict=True):
            s.known_as = d.identity if d.decision == "known" else None
        rules = LinkRules(appearance=self.cfg.link_threshold, strict=max(d.upper for d in singles))
        return link_tracks(sightings, rules)

    def _decide_event(self, event_id: int) -> None:
        """Step 2 of the protocol: decide every track, commit decisions + 'decided' in one transaction."""
        species = self._event_species(event_id)
        tracks = self._link(self._event_sightings(event_id), species)
        decided = []
        for track in tracks:
            rep = track.representative
            [d] = self.identifier.identify(track.fused[None], self.embedder.model_id, sources=[rep.path],
                                           boxes=[rep.box], species=species)
            decided.append(d)
        rows = []
        now = time.time()
        for t_i, (track, d) in enumerate(zip(tracks, exclusive_identities(tracks, decided), strict=True)):
            rep = track.representative
            for s in track.members:
                rows.append(self._decision_row(d, s, event_id, t_i, track.n_frames, s is rep, now))
        with self.state.transaction() as con:
            con.executemany(f"INSERT OR REPLACE INTO decisions VALUES ({', '.join('?' * 20)})", rows)
            con.execute("UPDATE events SET status = ? WHERE id = ?", ("decided" if rows else "closed", event_id))

    @staticmethod
    def _decision_row(d: Decision, s: Sighting, event_id: int, track: int, n_frames: int, rep: bool,
                      now: float) -> tuple:
        import json

        return (s.sha256, s.idx, event_id, track, n_frames, d.decision, d.identity, d.score, d.runner_up,
                d.runner_up_score, d.upper, d.lower, int(d.calibrated), d.threshold_method, d.model_id,
                d.gallery_version, d.species, json.dumps([[i, round(sc, 6)] for i, sc in d.top]), int(rep), now)

    def _apply_gallery(self, event_id: int, recovering: bool = False) -> None:
        """Step 3: provisional identities and gallery sightings, idempotent; then 'closed'."""
        con = self.state.con
        rows = con.execute(
            "SELECT c.sha256, c.idx, c.track, c.decision, c.identity, c.score, c.runner_up, c.runner_up_score, "
            "c.upper, c.lower, c.threshold_method, c.model_id, c.gallery_version, c.species, c.representative, "
            "i.path, i.captured, i.utc_offset, i.camera, d.x1, d.y1, d.x2, d.y2, d.embedding FROM decisions c "
            "JOIN images i ON i.sha256 = c.sha256 JOIN detections d ON d.sha256 = c.sha256 AND d.idx = c.idx "
            "WHERE c.event_id = ? ORDER BY c.track, i.captured_ts, i.path, c.idx", (event_id,)).fetchall()
        by_track: dict[int, list] = {}
        for r in rows:
            by_track.setdefault(r[2], []).append(r)
        identity_of: dict[int, str | None] = {}
        for track, members in by_track.items():
            rep = next(m for m in members if m[14])
            identity_of[track] = rep[4]
            if rep[3] == "new" and rep[4] is None:
                vecs = np.stack([np.frombuffer(m[23], EMBED_DTYPE).astype(np.float64) for m in members])
                fused = vecs.sum(0)
                fused = (fused / max(float(np.linalg.norm(fused)), 1e-12)).astype(np.float32)
                identity_of[track] = self.gallery.add_provisional(rep[13], fused, rep[11], rep[15],
                                                                  (rep[19], rep[20], rep[21], rep[22]))
        existing: set[tuple[str, str]] = set()
        if recovering and rows:
            existing = self._gallery_sighting_keys({r[15] for r in rows})
        sightings = []
        for r in rows:
            key = (r[15], box_key((r[19], r[20], r[21], r[22])))
            if key in existing:
                continue
            captured = r[16] + (r[17] or "")
            sightings.append({"image": r[15], "box": (r[19], r[20], r[21], r[22]), "captured": captured,
                              "camera": r[18], "decision": r[3], "identity_id": identity_of[r[2]], "score": r[5],
                              "runner_up_id": r[6], "runner_up_score": r[7], "upper": r[8], "lower": r[9],
                              "threshold_method": r[10], "model_id": r[11], "gallery_version": r[12],
                              # unique by (content, box) in the gallery; the crop is read back under the root
                              "source_sha256": r[0], "source_root": str(self.root.resolve()),
                              "vector": None if r[23] is None else np.frombuffer(r[23], EMBED_DTYPE)})
        if sightings:
            self.gallery.add_sightings(sightings)
        with self.state.transaction() as wcon:
            for track, ident in identity_of.items():
                wcon.execute("UPDATE decisions SET identity = ? WHERE event_id = ? AND track = ?",
                             (ident, event_id, track))
            wcon.execute("UPDATE events SET status = 'closed' WHERE id = ?", (event_id,))
        self._changed = True

    def _gallery_sighting_keys(self, images: set[str]) -> set[tuple[str, str]]:
        """(image, box) of sightings already in the gallery for these images (replay after a crash)."""
        con = sqlite3.connect(f"{Path(self.cfg.gallery).resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
        try:
            out: set[tuple[str, str]] = set()
            imgs = sorted(images)
            for a in range(0, len(imgs), 500):
                chunk = imgs[a:a + 500]
                out.update(con.execute(f"SELECT image, box FROM sightings WHERE image IN ({', '.join('?' * len(chunk))})",
                                       chunk).fetchall())
            return out
        finally:
            con.close()

    def close_events(self, force: bool = False) -> int:
        """Decide and close events whose gap has passed (all open ones with ``force``); returns how many."""
        ids = self.state.events_to_close(self.cfg.gap, self.cfg.idle_close, force)
        for eid in ids:
            self._decide_event(eid)
            if self.state.con.execute("SELECT status FROM events WHERE id = ?", (eid,)).fetchone()[0] == "decided":
                self._apply_gallery(eid)
            if self.stop_event.is_set() and not force:
                break
        if ids:
            self._changed = True
        return len(ids)

    def recover(self) -> int:
        """Finish events left 'decided' by a crash (step 3 replay, skipping what the gallery already has)."""
        ids = self.state.event_ids("decided")
        for eid in ids:
            self._apply_gallery(eid, recovering=True)
        if ids:
            self.log(f"recovered {len(ids)} event(s) interrupted after their decision")
        return len(ids)

    # ------------------------------------------------------------------ outputs and status
    def flush(self, force: bool = False) -> None:
        if not self.cfg.write_outputs or not (self._changed or force):
            return
        from fieldreid import __version__
        from fieldreid.report.tables import write_all

        # A connection of its own: the scanner thread is using self.reader meanwhile. Each output is one
        # read transaction, so it describes one committed state.
        snap = StateDB(self.out / RESULTS_DB, readonly=True)
        try:
            write_all(snap.con, self.out, str(getattr(self.detector, "model_id", "detector")), self.cfg.conf,
                      {"fieldreid_version": __version__, "embedder": self.embedder.model_id})
        finally:
            snap.close()
        self._changed = False
        self._last_flush = time.monotonic()

    def status_line(self) -> str:
        c = self.state.counts()
        d = self.state.decision_counts()
        dt = max(time.monotonic() - self._t0, 1e-9)
        return (f"{c['done']} done, {c['failed']} failed, {c['duplicate']} duplicate, {c['pending']} pending | "
                f"{self._n_session / dt:.2f} images/s | queue {self._queue} | animals: {d['known']} known, "
                f"{d['new']} new, {d['uncertain']} uncertain")

    def _maybe_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.cfg.status_every:
            self._last_status = now
            self.log(self.status_line())
        if now - self._last_flush >= self.cfg.flush_every:
            self.flush()

    # ------------------------------------------------------------------ inotify
    def _start_observer(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # the periodic rescan still finds everything
            self.log("watchdog is not installed: relying on the periodic rescan only")
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                if event.is_directory and event.event_type not in ("created", "moved"):
                    return  # a folder's own "modified" accompanies every file event inside it
                with watcher._dirty_lock:
                    if event.is_directory or len(watcher._dirty) >= MAX_DIRTY:
                        watcher._dirty_full = True  # a new camera folder, or too much at once: full scan
                    else:
                        watcher._dirty.add(getattr(event, "dest_path", "") or event.src_path)
                watcher.wake.set()

        try:
            obs = Observer()
            obs.schedule(Handler(), str(self.root), recursive=True)
            obs.start()
            self._observer = obs
        except Exception as exc:  # inotify limits, FUSE without inotify: fall back to rescans
            self.log(f"no file events for {self.root} ({exc}); relying on the periodic rescan")
            self._observer = None

    def _stop_observer(self) -> None:
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=5)
            except Exception:
                pass
            self._observer = None

    def _take_dirty(self) -> tuple[list[str], bool]:
        with self._dirty_lock:
            paths, full = list(self._dirty), self._dirty_full
            self._dirty.clear()
            self._dirty_full = False
        return paths, full

    # ------------------------------------------------------------------ main loop
    def run(self, once: bool = False, max_fresh_waits: int = 5) -> dict:
        """Process, then (unless ``once``) keep watching until a stop is requested. Returns the counts."""
        handlers = self._install_signals()
        try:
            self.recover()
            if once:
                self._run_once(max_fresh_waits)
            else:
                self._run_forever()
            self.flush(force=True)
            self.log(self.status_line())
            return {**self.state.counts(), **self.state.decision_counts()}
        finally:
            self._restore_signals(handlers)
            self._stop_observer()

    def _run_once(self, max_fresh_waits: int) -> None:
        waits = 0
        while not self.stop_event.is_set():
            try:
                res = self.run_pass()
            except FolderGoneError as exc:
                raise FieldreidError(f"{exc} Nothing was lost: the results so far are in {self.out}.") from exc
            self.close_events()
            if res.fresh and waits < max_fresh_waits and not self.stop_event.is_set():
                waits += 1  # files modified a moment ago: let them settle, then look again
                self.stop_event.wait(self.cfg.settle)
                continue
            break
        if not self.stop_event.is_set():
            self.close_events(force=True)

    def _run_forever(self) -> None:
        self._start_observer()
        next_full = 0.0
        gone_logged = False
        paths: list[str] = []
        while not self.stop_event.is_set():
            now = time.monotonic()
            try:
                if now >= next_full:
                    res = self.run_pass()
                    next_full = time.monotonic() + self.cfg.rescan
                    if gone_logged:
                        self.log(f"{self.root} is back; watching again")
                        gone_logged = False
                        if self._observer is None:
                            self._start_observer()
                else:
                    res = self.run_pass(paths)
            except FolderGoneError as exc:
                if not gone_logged:
                    self.log(f"{exc} Waiting for it to come back (checking every {self.cfg.rescan:g} s); "
                             "nothing is lost meanwhile.")
                    self._stop_observer()
                    gone_logged = True
                next_full = time.monotonic() + self.cfg.rescan
                res = PassResult()
            self.close_events()
            self._maybe_status()
            if self.stop_event.is_set():
                break
            timeout = max(0.0, next_full - time.monotonic())
            deadline = self.state.next_idle_deadline(self.cfg.idle_close)
            if deadline is not None:
                timeout = min(timeout, max(0.5, deadline - time.time()))
            if res.fresh or self._dirty:
                timeout = min(timeout, self.cfg.settle)
            if self._changed:
                timeout = min(timeout, max(0.5, self.cfg.flush_every - (time.monotonic() - self._last_flush)))
            self.wake.wait(timeout)
            self.wakeups += 1
            self.wake.clear()
            if self.stop_event.is_set():
                break
            # coalesce a burst of file events (a card being copied) into one pass
            self.stop_event.wait(min(self.cfg.settle, 1.0))
            paths, full = self._take_dirty()
            if full:
                next_full = 0.0
            if self._changed and time.monotonic() - self._last_flush >= self.cfg.flush_every:
                self.flush()

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass
        return old

    def _on_signal(self, signum, frame) -> None:
        if self.stop_event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the open batch is simply not committed)
        self.log(f"{signal.Signals(signum).name}: finishing the current batch, then writing outputs")
        self.request_stop()

    @staticmethod
    def _restore_signals(old: dict) -> None:
        for sig, handler in old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
