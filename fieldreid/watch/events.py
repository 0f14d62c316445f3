"""Bursts and events: one decision per animal per event, from the evidence of all its frames.

Camera traps fire bursts (3-10 frames a second apart) and re-trigger while an animal stays in view.
Images of one camera whose capture times lie within ``gap`` seconds of each other form an *event*
(:meth:`fieldreid.watch.state.StateDB.assign_event`). Deciding every frame on its own would give one animal
several answers - and, for a new animal, several provisional identities. So when an event closes:

1. **Link** its animal detections into tracks, frame by frame in capture order: each detection joins the
   track whose mean embedding is most similar (cosine >= ``link_threshold``), greedily, best pair first,
   at most one detection per track per frame (two animals in one frame are two animals).
2. **Fuse** a track: the mean of its members' unit embeddings, re-normalised. Averaging cancels
   per-frame noise (pose, blur, IR flash) the way multi-query re-ID averages query features.
3. **Decide once** per track against the gallery; the decision is written for each of its sightings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Cosine above which two detections of one event are taken as the same animal. Frames of a burst are
#: near-duplicates (>= 0.9 with ImageNet features); different individuals of one species score lower
#: within an event. Too low merges two animals; too high only splits a track (two decisions, no harm).
DEFAULT_LINK_THRESHOLD = 0.75
DEFAULT_GAP_S = 60.0


@dataclass
class Sighting:
    """One animal detection of an event."""

    sha256: str
    idx: int
    frame_key: tuple  # (captured_ts, path): capture order within the event
    conf: float
    embedding: np.ndarray
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    path: str = ""


@dataclass
class Track:
    members: list[Sighting] = field(default_factory=list)
    total: np.ndarray | None = None

    def add(self, s: Sighting) -> None:
        self.members.append(s)
        self.total = s.embedding.astype(np.float64) if self.total is None else self.total + s.embedding

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


def link_tracks(sightings: list[Sighting], link_threshold: float = DEFAULT_LINK_THRESHOLD) -> list[Track]:
    """Group an event's sightings into tracks (see the module docstring). Deterministic for a given input."""
    frames: dict[tuple, list[Sighting]] = {}
    for s in sorted(sightings, key=lambda s: (s.frame_key, s.idx)):
        frames.setdefault(s.frame_key, []).append(s)
    tracks: list[Track] = []
    for dets in frames.values():
        assigned: dict[int, int] = {}
        if tracks:
            means = np.stack([t.fused for t in tracks])
            vecs = np.stack([d.embedding for d in dets]).astype(np.float32)
            sims = vecs @ means.T
            order = np.dstack(np.unravel_index(np.argsort(-sims, axis=None, kind="stable"), sims.shape))[0]
            used_tracks: set[int] = set()
            for di, ti in order:
                if sims[di, ti] < link_threshold:
                    break
                if di in assigned or ti in used_tracks:
                    continue
                assigned[int(di)] = int(ti)
                used_tracks.add(int(ti))
        for di, d in enumerate(dets):
            if di in assigned:
                tracks[assigned[di]].add(d)
            else:
                t = Track()
                t.add(d)
                tracks.append(t)
    return tracks
