"""Bursts and events: one decision per animal per event, from the evidence of all its frames.

Camera traps fire bursts (3-10 frames a second apart) and re-trigger while an animal stays in view.
Images of one camera whose capture times lie within ``gap`` seconds of each other form an *event*
(:meth:`fieldreid.watch.state.StateDB.assign_event`). Deciding every frame on its own would give one animal
several answers - and, for a new animal, several provisional identities. So when an event closes:

1. **Link** its animal detections into tracks, frame by frame in capture order (frames with the same
   capture time - EXIF has whole seconds - in file-name order). A detection may join a track only if

   * *space*: its box continues the track's last box - centre shift at most ``max_shift`` image
     diagonals per second and linear size ratio at most ``1 + max_growth`` per second, both over the
     time since that box plus the clock's resolution (two frames stamped with the same second may be
     up to a second apart), with boxes measured as fractions of their own image;
   * *appearance*: its cosine to *every* member of the track reaches ``appearance`` - or ``strict``
     when position says little about identity: boxes that fill most of the frame (any two such boxes
     "continue" each other) or frames more than ``informative_dt`` seconds apart. ``strict`` is the
     score at which the gallery itself would call two crops the same animal (the upper open-set
     threshold), so a link is never easier than a *known* decision where space cannot vouch for it.
     Every member, not the track's mean: a mean drifts towards the species' average look as a track
     grows, and then takes in the next animal too (nine zebras became one track that way);
   * *identity*: no member of the track is, on its own, *known* as another gallery animal than the
     detection is (``Sighting.known_as``): the gallery tells animals apart far better than a fixed
     cosine does;
   * *one box per frame*: a track takes at most one detection of a frame, and two detections of one
     frame are never one track (two animals in one frame are two animals).

   Pairs that pass are taken greedily, most similar first; the rest start new tracks. Too strict only
   splits a track (two decisions for one animal); too loose gives two animals one identity.
2. **Fuse** a track: the mean of its members' unit embeddings, re-normalised. Averaging cancels
   per-frame noise (pose, blur, IR flash) the way multi-query re-ID averages query features.
3. **Decide once** per track against the gallery; then :func:`exclusive_identities` makes sure no
   identity is given to two tracks that share a frame (it would name two boxes of one frame).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Cosine a detection needs to join a track whose last box it continues closely (small boxes, a short
#: time apart): with position vouching for it, appearance only has to agree. Frames of one burst score
#: 0.7-0.95 with ImageNet features (small, blurred crops at the low end).
DEFAULT_LINK_THRESHOLD = 0.75
DEFAULT_GAP_S = 60.0


@dataclass(frozen=True)
class LinkRules:
    """When a detection may continue a track (see the module docstring)."""

    appearance: float = DEFAULT_LINK_THRESHOLD
    #: cosine needed where position cannot tell animals apart; None: same as ``appearance``
    strict: float | None = None
    #: capture times are whole seconds (EXIF): frames stamped dt apart may be dt + 1 s apart
    time_resolution: float = 1.0
    #: box centre shift per second, in image diagonals (a walking animal crosses a frame in a few seconds)
    max_shift: float = 0.2
    #: growth of the box's linear size ratio per second (an animal walking towards the camera)
    max_growth: float = 0.5
    #: boxes whose linear size exceeds this fraction of the frame fill it: their position proves nothing
    informative_size: float = 0.5
    #: frames further apart than this (seconds) are linked on appearance as if position said nothing
    informative_dt: float = 2.0

    @property
    def strict_bar(self) -> float:
        return max(self.appearance, self.strict if self.strict is not None else self.appearance)


@dataclass
class Sighting:
    """One animal detection of an event."""

    sha256: str
    idx: int
    frame_key: tuple  # (captured_ts, path): capture order within the event, file name breaks ties
    conf: float
    embedding: np.ndarray
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x1, y1, x2, y2 in image pixels
    path: str = ""
    size: tuple[int, int] | None = None  # image (width, height); None: position unknown
    known_as: str | None = None  # the identity this detection alone is *known* as, if any

    def geometry(self) -> tuple[float, float, float] | None:
        """Centre (x, y) and linear size of the box as fractions of its image, or None if unknown."""
        if self.size is None or not self.size[0] or not self.size[1]:
            return None
        w, h = float(self.size[0]), float(self.size[1])
        x1, y1, x2, y2 = (float(v) for v in self.box)
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0) / (w * h)
        return (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, math.sqrt(area)


@dataclass
class Track:
    members: list[Sighting] = field(default_factory=list)
    total: np.ndarray | None = None
    _matrix: np.ndarray | None = field(default=None, repr=False)

    def add(self, s: Sighting) -> None:
        self.members.append(s)
        self.total = s.embedding.astype(np.float64) if self.total is None else self.total + s.embedding
        self._matrix = None

    @property
    def matrix(self) -> np.ndarray:
        """The members' embeddings, one row each (kept until the next member joins)."""
        if self._matrix is None:
            self._matrix = np.stack([m.embedding for m in self.members]).astype(np.float32)
        return self._matrix

    @property
    def last(self) -> Sighting:
        return self.members[-1]

    @property
    def fused(self) -> np.ndarray:
        v = np.asarray(self.total, np.float64)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    @property
    def representative(self) -> Sighting:
        """The member with the highest detector confidence (its crop stands for the track)."""
        return max(self.members, key=lambda s: (s.conf, -s.frame_key[0]))

    @property
    def n_frames(self) -> int:
        return len({s.sha256 for s in self.members})

    @property
    def frames(self) -> set[str]:
        return {s.sha256 for s in self.members}


def link_bar(prev: Sighting, cur: Sighting, rules: LinkRules) -> float | None:
    """The cosine ``cur`` needs to continue a track whose last detection is ``prev``; None if its box does
    not continue ``prev``'s (too far, too different in size for the time between them)."""
    dt = abs(float(cur.frame_key[0]) - float(prev.frame_key[0]))
    a, b = prev.geometry(), cur.geometry()
    if a is None or b is None:  # no position: appearance alone, at the strict bar
        return rules.strict_bar
    span = dt + rules.time_resolution
    shift = math.hypot(a[0] - b[0], a[1] - b[1]) / math.sqrt(2.0)
    ratio = max(a[2], b[2]) / max(min(a[2], b[2]), 1e-9)
    if shift > rules.max_shift * span or ratio > 1.0 + rules.max_growth * span:
        return None
    informative = max(a[2], b[2]) <= rules.informative_size and dt <= rules.informative_dt
    return rules.appearance if informative else rules.strict_bar


def _frame_order(s: Sighting) -> tuple:
    ts, path = s.frame_key[0], s.frame_key[1] if len(s.frame_key) > 1 else ""
    return float(ts), str(path), s.sha256


def link_tracks(sightings: Sequence[Sighting], link_threshold: float | LinkRules = DEFAULT_LINK_THRESHOLD
                ) -> list[Track]:
    """Group an event's sightings into tracks (see the module docstring). Deterministic for a given set of
    sightings, whatever their order: frames by (capture time, path, content hash), boxes by index."""
    rules = link_threshold if isinstance(link_threshold, LinkRules) else LinkRules(appearance=float(link_threshold))
    frames: dict[tuple, list[Sighting]] = {}
    for s in sorted(sightings, key=lambda s: (_frame_order(s), s.idx)):
        frames.setdefault(_frame_order(s), []).append(s)
    tracks: list[Track] = []
    for dets in frames.values():
        assigned: dict[int, int] = {}
        if tracks:
            vecs = np.stack([d.embedding for d in dets]).astype(np.float32)
            sims = np.stack([np.min(vecs @ t.matrix.T, axis=1) for t in tracks], axis=1)  # vs every member
            pairs = []
            for di, d in enumerate(dets):
                for ti, t in enumerate(tracks):
                    if d.known_as is not None and any(m.known_as not in (None, d.known_as) for m in t.members):
                        continue  # known as two different animals: never one track
                    bar = link_bar(t.last, d, rules)
                    if bar is not None and sims[di, ti] >= bar:
                        pairs.append((-float(sims[di, ti]), ti, di))
            used_tracks: set[int] = set()
            for _, ti, di in sorted(pairs):
                if di in assigned or ti in used_tracks:
                    continue
                assigned[di] = ti
                used_tracks.add(ti)
        for di, d in enumerate(dets):
            if di in assigned:
                tracks[assigned[di]].add(d)
            else:
                t = Track()
                t.add(d)
                tracks.append(t)
    return tracks


def exclusive_identities(tracks: Sequence[Track], decisions: Sequence) -> list:
    """No identity for two tracks that share a frame: two boxes of one frame are two animals.

    ``decisions[i]`` (a :class:`~fieldreid.gallery.openset.Decision`) belongs to ``tracks[i]``. Where
    tracks that appear together in a frame name the same identity (known or uncertain), the one with the
    higher score keeps it; each other one takes its best remaining candidate (from ``top``) not named by a
    track it shares a frame with, decided again with its own thresholds - or becomes *new* when none is
    left above the lower threshold. Returns the (possibly replaced) decisions, in order.
    """
    out = list(decisions)
    frames = [t.frames for t in tracks]
    order = sorted(range(len(out)), key=lambda i: (-(out[i].score if out[i].score is not None else -math.inf), i))
    taken: dict[int, str] = {}  # track index -> identity it names, in order of precedence
    for i in order:
        d = out[i]
        if d.identity is None:
            continue
        blocked = {ident for j, ident in taken.items() if frames[i] & frames[j]}
        if d.identity not in blocked:
            taken[i] = d.identity
            continue
        alt = next(((ident, score) for ident, score in d.top if ident not in blocked), None)
        out[i] = d.reassigned(alt)  # decided again on alt, with alt's probability (or that of a new animal)
        if out[i].identity is not None:
            taken[i] = out[i].identity
    return out
