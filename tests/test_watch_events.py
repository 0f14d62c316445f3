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


# ---------------------------------------------------------------- space, time and identity (issue 11)
from fieldreid.gallery.openset import Decision  # noqa: E402
from fieldreid.watch.events import LinkRules, Track, exclusive_identities, link_bar  # noqa: E402

W, H = 1920, 1080


def _look(rng, base: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector with cosine ``cos`` to the unit vector ``base``."""
    noise = rng.normal(size=base.shape)
    noise -= (noise @ base) * base
    noise /= np.linalg.norm(noise)
    return _unit(cos * base + np.sqrt(1 - cos**2) * noise)


def _s(name: str, ts: float, vec, box, idx: int = 0, known_as=None, size=(W, H)) -> Sighting:
    return Sighting(name, idx, (ts, name), 0.8, np.asarray(vec, np.float32), tuple(float(v) for v in box), name,
                    size, known_as)


def test_same_capture_time_different_animals_filling_the_frame_stay_apart() -> None:
    """Issue 11 cause 3: nine different zebras given one capture time became one track. Boxes that fill the
    frame say nothing about identity, so appearance must reach the strict (known) bar; the track's members,
    not its drifting mean, are what a newcomer is compared with."""
    rng = np.random.default_rng(3)
    species = _unit(rng.normal(size=128))
    animals = [_look(rng, species, 0.92) for _ in range(9)]  # pairwise cosine about 0.85: one species
    full = (100, 60, 1820, 1020)
    sightings = [_s(f"z{k}.jpg", 1000.0, a, full) for k, a in enumerate(animals)]
    assert min(float(a @ b) for a in animals for b in animals) > 0.75  # the old linker's bar: one track
    tracks = link_tracks(sightings, LinkRules(appearance=0.75, strict=0.93))
    assert len(tracks) == 9
    # the same animal in consecutive frames, filling the frame, still links above the strict bar
    a = animals[0]
    burst = [_s(f"b{k}.jpg", 1000.0 + k, _look(rng, a, 0.97), full) for k in range(3)]
    assert [len(t.members) for t in link_tracks(burst, LinkRules(appearance=0.75, strict=0.93))] == [3]


def test_linking_needs_spatial_continuity_scaled_by_time() -> None:
    v = _unit(np.ones(16))
    here, there = (100, 100, 300, 250), (1500, 800, 1700, 950)  # small boxes, opposite corners
    rules = LinkRules(appearance=0.75, strict=0.95)
    # identical look, but the box jumps across the frame within a second: two animals
    assert len(link_tracks([_s("a.jpg", 10.0, v, here), _s("b.jpg", 10.0, v, there)], rules)) == 2
    assert link_bar(_s("a.jpg", 10.0, v, here), _s("b.jpg", 11.0, v, there), rules) is None
    # a small shift a second later continues the track at the relaxed bar
    near = (130, 110, 330, 262)
    assert link_bar(_s("a.jpg", 10.0, v, here), _s("b.jpg", 11.0, v, near), rules) == 0.75
    # growing 4x in linear size within a second is not the same box either
    big = (0, 0, 800, 600)
    assert link_bar(_s("a.jpg", 10.0, v, here), _s("b.jpg", 11.0, v, big), rules) is None
    # after 20 s anything may have moved anywhere: position no longer vouches, the strict bar applies
    assert link_bar(_s("a.jpg", 10.0, v, here), _s("b.jpg", 30.0, v, there), rules) == 0.95
    # box positions are fractions of each image: the same place in a half-size frame is no shift
    half = Sighting("c.jpg", 0, (11.0, "c.jpg"), 0.8, v, (65, 55, 165, 131), "c.jpg", (W // 2, H // 2))
    assert link_bar(_s("a.jpg", 10.0, v, near), half, rules) == 0.75


def test_herd_of_similar_animals_stays_apart_across_a_burst() -> None:
    """Three animals of one species walk side by side through five frames: three tracks, each following
    its own box, although the animals look more alike (0.85) than the relaxed link bar (0.75)."""
    rng = np.random.default_rng(5)
    species = _unit(rng.normal(size=64))
    animals = [_look(rng, species, 0.92) for _ in range(3)]
    sightings = []
    for f in range(5):
        for k, a in enumerate(animals):
            x = 200 + 500 * k + 40 * f
            sightings.append(_s(f"f{f}.jpg", 100.0 + f, _look(rng, a, 0.96), (x, 400, x + 250, 600), idx=k))
    rng.shuffle(sightings)
    tracks = link_tracks(sightings, LinkRules(appearance=0.75, strict=0.93))
    assert sorted(len(t.members) for t in tracks) == [5, 5, 5]
    for t in tracks:
        assert len({s.idx for s in t.members}) == 1  # one animal per track, one box per frame
        assert len(t.frames) == len(t.members)


def test_same_capture_time_is_ordered_by_file_name() -> None:
    """EXIF times have whole seconds: frames with one time are taken in file-name order, whatever order
    the event's rows arrive in, and the result does not change."""
    v = _unit(np.ones(8))
    boxes = [(100 + 30 * k, 100, 300 + 30 * k, 250) for k in range(4)]
    frames = [_s(f"IMG_{k:04d}.JPG", 50.0, v, boxes[k]) for k in range(4)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        tracks = link_tracks([frames[k] for k in order], LinkRules())
        assert [[m.path for m in t.members] for t in tracks] == [[f"IMG_{k:04d}.JPG" for k in range(4)]]


def test_detections_known_as_different_animals_never_share_a_track() -> None:
    v = _unit(np.ones(8))
    box = (100, 100, 300, 250)
    a = _s("a.jpg", 1.0, v, box, known_as="zebra-0001")
    b = _s("b.jpg", 2.0, v, box, known_as="zebra-0002")
    c = _s("c.jpg", 3.0, v, box, known_as=None)
    tracks = link_tracks([a, b, c], LinkRules())
    assert [[m.path for m in t.members] for t in tracks] == [["a.jpg", "c.jpg"], ["b.jpg"]]


def _decision(identity, score, top, decision="known") -> Decision:
    return Decision(decision=decision, identity=identity, score=score, runner_up=top[1][0] if len(top) > 1 else None,
                    runner_up_score=top[1][1] if len(top) > 1 else None, upper=0.8, lower=0.6, calibrated=True,
                    threshold_method="test", model_id="m", gallery_version=1, species="zebra", top=top)


def test_one_identity_never_names_two_boxes_of_one_frame() -> None:
    v = _unit(np.ones(8))
    t1, t2, t3 = Track(), Track(), Track()
    t1.add(_s("f1.jpg", 1.0, v, (0, 0, 10, 10), idx=0))
    t2.add(_s("f1.jpg", 1.0, v, (500, 0, 510, 10), idx=1))
    t3.add(_s("f9.jpg", 9.0, v, (0, 0, 10, 10)))  # another frame: may name the same animal
    d1 = _decision("Z1", 0.95, [("Z1", 0.95), ("Z2", 0.7)])
    d2 = _decision("Z1", 0.90, [("Z1", 0.90), ("Z3", 0.85), ("Z2", 0.5)])
    d3 = _decision("Z1", 0.91, [("Z1", 0.91)])
    out = exclusive_identities([t1, t2, t3], [d1, d2, d3])
    assert out[0] is d1 and out[2] is d3
    assert (out[1].decision, out[1].identity, out[1].score) == ("known", "Z3", 0.85)
    # nothing left above the lower threshold: the second animal is new
    d2b = _decision("Z1", 0.90, [("Z1", 0.90), ("Z2", 0.5)])
    out = exclusive_identities([t1, t2], [d1, d2b])
    assert (out[1].decision, out[1].identity) == ("new", None)
    # a runner-up between the thresholds: uncertain
    d2c = _decision("Z1", 0.90, [("Z1", 0.90), ("Z4", 0.7)])
    assert exclusive_identities([t1, t2], [d1, d2c])[1].decision == "uncertain"
