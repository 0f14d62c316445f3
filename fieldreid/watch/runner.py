"""``fieldreid watch``: a camera-trap folder in, every image processed exactly once, results out.

Loop: a *pass* streams the files that need work (:mod:`~fieldreid.watch.scanner`) through a reader thread
(:mod:`~fieldreid.watch.loader`: read bytes, re-stat, sha256, EXIF, decode: one batch ahead, bounded queue)
into the detector and embedder, and commits each batch (:mod:`~fieldreid.watch.commit`); then events whose gap has passed are decided; then the loop sleeps on a
``threading.Event`` that inotify (watchdog) or a signal sets, with a timeout for the periodic rescan
(SD cards, FUSE and network mounts send no events) - no polling loop, no spinning.

**Never lose, never repeat - the commit protocol.**

1. *Batch*: every file's new state (done / failed / duplicate / pending), its image row, detections,
   embeddings, crop thumbnails and event membership are written in ONE SQLite transaction. ``kill -9``
   before COMMIT: nothing of the batch exists, the restart re-reads those files. After COMMIT: all of it
   exists and the files are skipped. Nothing outside the results database is touched by a batch.
2. *Event decision* (write-ahead, :mod:`~fieldreid.watch.decide`): tracks are linked and decided against the gallery *without writing to
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

import os  # noqa: F401  (tests reach os.fsync through this module)
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.crop import CROP_RULE
from fieldreid.defaults import DEFAULT_RESCUE_CONF
from fieldreid.embed.pipeline import Pipeline, prefetch_batches
from fieldreid.errors import FieldreidError, InputError
from fieldreid.frames.decode import DEFAULT_MAX_PIXELS
from fieldreid.gallery.openset import Identifier
from fieldreid.gallery.store import Gallery
from fieldreid.storage.fsutil import DEFAULT_MAX_FILE_BYTES, path_text
from fieldreid.types import DecisionKind
from fieldreid.watch.commit import commit_batch, image_results, split_duplicates
from fieldreid.watch.decide import apply_gallery, commit_decisions, decision_row, event_sightings
from fieldreid.watch.events import (
    DEFAULT_GAP_S,
    DEFAULT_LINK_THRESHOLD,
    LinkRules,
    Sighting,
    exclusive_identities,
    link_tracks,
)
from fieldreid.watch.loader import Loaded, LoadLimits, load
from fieldreid.watch.scanner import Candidate, FolderGoneError, ScanStats, candidate_at, scan
from fieldreid.watch.state import StateDB

RESULTS_DB = "results.db"
#: a camera folder (or the watched folder, for all its cameras) may name its animals' species in this file
SPECIES_FILE = ".fieldreid-species"
MAX_DIRTY = 10_000  # more inotify paths than this between passes: do a full scan instead


@dataclass
class WatchConfig:
    """Options of ``fieldreid watch`` (the CLI documents each)."""

    root: Path
    out: Path
    gallery: Path
    batch: int = 8
    conf: float = 0.2
    #: a frame with no animal at ``conf`` keeps its best animal box at this confidence (None: off); see
    #: :class:`fieldreid.embed.pipeline.Pipeline`
    rescue_conf: float | None = DEFAULT_RESCUE_CONF
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
        if cfg.rescue_conf is not None and not 0.0 <= cfg.rescue_conf <= 1.0:
            raise InputError(f"The rescue confidence must be between 0 (off) and 1, got {cfg.rescue_conf}.")
        #: the rescue confidence in force (None: off, or not below ``conf``: nothing to rescue)
        self.rescue_conf = cfg.rescue_conf if cfg.rescue_conf and cfg.rescue_conf < cfg.conf else None
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
                             prefetch=False, rescue_conf=self.rescue_conf)
        self._limits = LoadLimits(cfg.max_file_bytes, cfg.max_pixels, cfg.grace, self.pipe.detector_min_side)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self._dirty: set[str] = set()
        self._dirty_full = False
        self._dirty_lock = threading.Lock()
        self._changed = False
        self._verify: bool | None = None  # does a stored fusion pay (checked once per run)
        self.verified_tracks = 0  # tracks whose crop was matched locally (fieldreid.verify)
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
            self.state.set_meta(con, "rescue_conf", str(self.rescue_conf or ""))
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
        return load(c, self._limits, self.stop_event)

    def _load_batch(self, batch: list[Candidate]) -> list[Loaded]:
        with self.pipe.times("decode"):  # read, hash, EXIF, decode (the reader thread, overlapping the rest)
            return [self._load(c) for c in batch]

    # ------------------------------------------------------------------ one batch
    def _process_batch(self, items: list[Loaded]) -> tuple[int, int]:
        """Detect/embed the ready items and commit the whole batch in one transaction; (done, pending)."""
        ready, dup_of = split_duplicates(items, self.state)
        results = self.pipe.process([it.frame for it in ready]) if ready else []
        with self.pipe.times("database"):  # thumbnails, rows, one transaction
            done_pending = commit_batch(self.state, items, dup_of,
                                        image_results(ready, results, self.cfg.thumb_size), self.cfg.gap)
        self._changed = True
        return done_pending

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
            s.known_as = d.identity if d.decision == DecisionKind.KNOWN else None
        rules = LinkRules(appearance=self.cfg.link_threshold, strict=max(d.upper for d in singles))
        return link_tracks(sightings, rules)

    def _track_features(self, rep: Sighting) -> list | None:
        """What extracts the local features of a track's representative crop (one per track, not per frame)
        when the gallery holds a fusion that pays for this model (``calibrate --verify``); else None: cosine
        decides. Extraction is deferred to the identifier, which skips it for a track below the fusion's
        floor (:meth:`fieldreid.verify.fuse.Fusion.verifies`); ``verified_tracks`` counts those it ran."""
        import json

        from fieldreid.storage.fsutil import text_path
        from fieldreid.verify.features import features_of

        if self._verify is None:
            self._verify = any(json.loads(d).get("pays") for (d,) in self.gallery.read(
                "SELECT data FROM fusion WHERE model_id = ?", (self.embedder.model_id,)))
        if not self._verify:
            return None
        def extract(max_keypoints: int):
            self.verified_tracks += 1
            try:
                return features_of(self.root / text_path(rep.path), rep.box, max_keypoints)
            except FieldreidError:
                return None  # unreadable now: the cosine decides this track

        return [extract]

    def _decide_event(self, event_id: int) -> None:
        """Step 2 of the protocol: decide every track, commit decisions + 'decided' in one transaction."""
        species = self._event_species(event_id)
        tracks = self._link(event_sightings(self.state, event_id), species)
        decided = []
        for track in tracks:
            rep = track.representative
            [d] = self.identifier.identify(track.fused[None], self.embedder.model_id, sources=[rep.path],
                                           boxes=[rep.box], species=species,
                                           query_features=self._track_features(rep))
            decided.append(d)
        rows = []
        now = time.time()
        for t_i, (track, d) in enumerate(zip(tracks, exclusive_identities(tracks, decided), strict=True)):
            rep = track.representative
            rows.extend(decision_row(d, s, event_id, t_i, track.n_frames, s is rep, now) for s in track.members)
        commit_decisions(self.state, event_id, rows)

    def _apply_gallery(self, event_id: int, recovering: bool = False) -> None:
        """Step 3: provisional identities and gallery sightings, idempotent; then 'closed'."""
        apply_gallery(self.state, self.gallery, event_id, self.root, recovering)
        self._changed = True

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
            write_all(snap.con, self.out, str(getattr(self.detector, "model_id", "detector")),
                      self.rescue_conf or self.cfg.conf,  # the lowest confidence a kept box can have
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
                f"{d['new']} new, {d['uncertain']} uncertain"
                + (f" | {self.verified_tracks} track(s) matched locally" if self._verify else ""))

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
