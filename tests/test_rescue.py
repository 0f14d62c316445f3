"""watch's rescue of weak detections: a frame with no animal at the detector threshold keeps its single most
confident animal box at the rescue confidence (fieldreid.embed.pipeline.Pipeline ``rescue_conf``)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fieldreid.embed.pipeline import Pipeline
from fieldreid.types import Detections

ANIMAL, PERSON = 1, 2
#: per image: (box, confidence, category) the fake detector reports
SCRIPT = {
    "a": [((0, 0, 30, 30), 0.6, ANIMAL), ((40, 40, 60, 60), 0.15, ANIMAL), ((10, 40, 30, 60), 0.12, PERSON)],
    "b": [((0, 0, 30, 30), 0.15, ANIMAL), ((40, 40, 60, 60), 0.12, ANIMAL), ((10, 40, 30, 60), 0.5, PERSON)],
    "c": [((0, 0, 30, 30), 0.05, ANIMAL)],
    "d": [],
}


class ScriptedDetector:
    input_size = (64, 64)
    model_id = "scripted"

    def __init__(self) -> None:
        self.order: list[str] = []

    def detect(self, images):
        out = []
        for _ in images:
            rows = SCRIPT[self.order.pop(0)]
            out.append(Detections(np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
                                  np.array([r[1] for r in rows], np.float32),
                                  np.zeros(len(rows), np.int64), np.array([r[2] for r in rows], np.int64)))
        return out


@pytest.fixture()
def frames(tmp_path):
    paths = []
    for name in SCRIPT:
        p = tmp_path / f"{name}.png"
        cv2.imwrite(str(p), np.full((64, 64, 3), 100, np.uint8))
        paths.append(p)
    return paths


def run(frames, **kw):
    det = ScriptedDetector()
    det.order = [p.stem for p in frames]
    pipe = Pipeline(det, None, batch_size=4, min_crop_conf=0.2, crop_side=32, prefetch=False, **kw)
    return {r.path.stem: r for r in pipe.run(frames)}


def test_a_frame_without_a_confident_animal_keeps_its_best_weak_animal_only(frames):
    res = run(frames, rescue_conf=0.1)
    # a confident animal: the weak boxes are dropped, nothing rescued
    assert res["a"].detections.confidence.tolist() == pytest.approx([0.6])
    assert res["a"].boxes.tolist() == [[0, 0, 30, 30]]
    # no animal at 0.2: the most confident animal >= 0.1 is kept and embedded; the confident person stays
    b = res["b"]
    assert sorted(b.detections.confidence.tolist()) == pytest.approx([0.15, 0.5])
    assert b.boxes.tolist() == [[0, 0, 30, 30]] and len(b.animal_index) == 1
    # nothing at the rescue confidence, or nothing at all: no box
    assert len(res["c"].detections) == 0 and len(res["c"].boxes) == 0
    assert len(res["d"].boxes) == 0


def test_without_rescue_only_the_threshold_counts(frames):
    res = run(frames)
    assert len(res["b"].boxes) == 0 and res["a"].boxes.tolist() == [[0, 0, 30, 30]]
    # (without rescue the detections are the detector's, whatever it was run at)
    assert len(res["a"].detections) == 3


def test_rescue_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="rescue_conf"):
        Pipeline(ScriptedDetector(), None, min_crop_conf=0.2, rescue_conf=0.3)
    with pytest.raises(ValueError, match="rescue_conf"):
        Pipeline(ScriptedDetector(), None, min_crop_conf=0.2, rescue_conf=0.1, select="best")
    from typer.testing import CliRunner

    from fieldreid.cli.app import app

    (tmp_path / "cards").mkdir()
    r = CliRunner().invoke(app, ["watch", str(tmp_path / "cards"), "--gallery", str(tmp_path / "g.db"), "--out",
                                 str(tmp_path / "out"), "--once", "--rescue-conf", "1.5"])
    assert r.exit_code != 0 and "--rescue-conf must be between 0 (off) and 1" in r.output


@pytest.mark.parametrize("args, det_conf, rescue", [([], 0.1, 0.1), (["--low-memory"], 0.2, None),
                                                     (["--low-memory", "--rescue-conf", "0.05"], 0.05, 0.05),
                                                     (["--rescue-conf", "0"], 0.2, None)])
def test_watch_cli_rescues_by_default_but_not_with_low_memory(tmp_path, monkeypatch, args, det_conf, rescue):
    """--low-memory turns the rescue off unless asked for (it costs peak memory there); the detector runs at
    the rescue confidence when it is on."""
    from typer.testing import CliRunner

    import fieldreid.detect
    import fieldreid.embed.runtime
    import fieldreid.watch
    from fieldreid.cli import watch as watch_cli
    from fieldreid.cli.app import app

    seen = {}

    class Fake:
        def __init__(self, path=None, *a, conf=None, **kw):
            if conf is not None:
                seen["det_conf"] = conf

    class FakeWatcher:
        def __init__(self, cfg, det, emb, log=None):
            seen["rescue"] = cfg.rescue_conf

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, once):
            pass

    monkeypatch.setattr(fieldreid.detect, "Detector", Fake)
    monkeypatch.setattr(fieldreid.embed.runtime, "Embedder", Fake)
    monkeypatch.setattr(watch_cli, "open_detector", lambda path, backend, conf: Fake(conf=conf))
    monkeypatch.setattr(watch_cli, "open_embedder", lambda path, backend: Fake())
    monkeypatch.setattr("fieldreid.defaults.default_model", lambda kind: tmp_path / f"{kind}.onnx")
    monkeypatch.setattr(fieldreid.watch, "Watcher", FakeWatcher)
    (tmp_path / "cards").mkdir()
    r = CliRunner().invoke(app, ["watch", str(tmp_path / "cards"), "--gallery", str(tmp_path / "g.db"), "--out",
                                 str(tmp_path / "out"), "--once", *args])
    assert r.exit_code == 0, r.output
    assert seen == {"det_conf": pytest.approx(det_conf), "rescue": rescue}
