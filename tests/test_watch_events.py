"""Track linking within an event: bursts fuse, two animals in one frame never do."""

from __future__ import annotations

import numpy as np

from fieldreid.watch.events import Sighting, link_tracks


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_burst_links_and_two_animals_stay_apart() -> None:
    rng = np.random.default_rng(0)
    a, b = _unit(rng.normal(size=64)), _unit(rng.normal(size=64))
    sightings = []
    for f in range(3):  # three frames, animals a and b in each, slightly noisy
        for k, base in enumerate((a, b)):
            sightings.append(Sighting(f"img{f}", k, (float(f), f"img{f}"), 0.5 + 0.1 * k,
                                      _unit(base + 0.05 * rng.normal(size=64))))
    tracks = link_tracks(sightings, 0.75)
    assert len(tracks) == 2
    assert sorted(t.n_frames for t in tracks) == [3, 3]
    for t in tracks:
        assert len({s.sha256 for s in t.members}) == len(t.members)  # one detection per frame per track
        assert abs(float(np.linalg.norm(t.fused)) - 1.0) < 1e-5
    # the fused vector is closer to its animal than any single noisy frame is, on average
    ta = max(tracks, key=lambda t: float(t.fused @ a))
    assert float(ta.fused @ a) >= np.mean([float(s.embedding @ a) for s in ta.members])


def test_two_similar_detections_in_one_frame_are_two_animals() -> None:
    v = _unit(np.ones(8))
    tracks = link_tracks([Sighting("x", 0, (0.0, "x"), 0.9, v), Sighting("x", 1, (0.0, "x"), 0.8, v)], 0.5)
    assert len(tracks) == 2


def test_dissimilar_frames_make_separate_tracks_and_is_deterministic() -> None:
    e = np.eye(4, dtype=np.float32)
    s = [Sighting(f"i{k}", 0, (float(k), f"i{k}"), 0.5, e[k]) for k in range(4)]
    t1 = link_tracks(s, 0.75)
    t2 = link_tracks(list(reversed(s)), 0.75)
    assert len(t1) == 4
    assert [[m.sha256 for m in t.members] for t in t1] == [[m.sha256 for m in t.members] for t in t2]
