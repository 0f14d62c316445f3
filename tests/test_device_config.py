"""One device configuration (`fieldreid init` writes it) names gallery, output, lab and models; options
override it; a missing setting is one sentence naming the option and the key (issue 11)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fieldreid.config import ConfigError, DeviceConfig, default_config_path, write_config

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fieldreid.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_relative_paths_come_from_the_file_and_options_win(tmp_path) -> None:
    cfg = tmp_path / "dev" / "config.toml"
    write_config(cfg, {"gallery": "field.db", "out": "/data/results", "server": "http://lab:8750", "project": None})
    c = DeviceConfig.load(cfg)
    assert c.path_of("gallery") == tmp_path / "dev" / "field.db"
    assert c.choose(None, "out").as_posix() == "/data/results"
    assert c.choose(tmp_path / "other.db", "gallery") == tmp_path / "other.db"
    assert c.choose(None, "server") == "http://lab:8750" and c.get("project") is None
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    write_config(cfg, {"project": "kenya"})  # an update keeps what was there
    assert DeviceConfig.load(cfg).data == {"gallery": "field.db", "out": "/data/results",
                                           "server": "http://lab:8750", "project": "kenya"}


def test_missing_setting_names_option_and_key(tmp_path) -> None:
    c = DeviceConfig(tmp_path / "none.toml")  # no file: nothing configured
    with pytest.raises(ConfigError) as e:
        c.require(None, "gallery", "--gallery", "identity gallery")
    msg = str(e.value)
    assert msg.startswith("No identity gallery: pass --gallery or set gallery = ") and "fieldreid init" in msg
    assert "\n" not in msg


def test_unreadable_config_is_one_clear_error(tmp_path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("gallery = [unclosed\n")
    with pytest.raises(ConfigError, match="Cannot read the configuration"):
        DeviceConfig.load(bad)
    with pytest.raises(ConfigError, match="No configuration file"):
        DeviceConfig.load(tmp_path / "absent.toml")


def test_default_location_and_the_old_sync_file(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FIELDREID_CONFIG", raising=False)
    monkeypatch.delenv("FIELDREID_SYNC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_config_path() == tmp_path / "fieldreid" / "config.toml"
    (tmp_path / "fieldreid").mkdir()
    (tmp_path / "fieldreid" / "sync.toml").write_text('server = "http://x"\n')
    assert default_config_path() == tmp_path / "fieldreid" / "sync.toml"  # the file sync read before
    monkeypatch.setenv("FIELDREID_SYNC_CONFIG", str(tmp_path / "s.toml"))
    assert default_config_path() == tmp_path / "s.toml"
    monkeypatch.setenv("FIELDREID_CONFIG", str(tmp_path / "c.toml"))
    assert default_config_path() == tmp_path / "c.toml"


def test_product_card_watch_command_on_a_configured_device(camtrap, yolov5n_onnx, default_embedder_onnx,
                                                           tmp_path) -> None:
    """`fieldreid watch /camera/dir` as written: before issue 11 it stopped with "Missing option '--gallery'"."""
    cards = tmp_path / "camera" / "cam1"
    cards.mkdir(parents=True)
    shutil.copy(camtrap / "animl-buow" / "IMG_0708.JPG", cards / "IMG_0708.JPG")
    old = time.time() - 3600
    os.utime(cards / "IMG_0708.JPG", (old, old))
    cfg = tmp_path / "config.toml"
    env = {"FIELDREID_CONFIG": str(cfg)}
    r = _cli("watch", str(tmp_path / "camera"), "--once", env=env)
    assert r.returncode == 2 and "No identity gallery: pass --gallery or set gallery = " in r.stderr
    r = _cli("init", "--gallery", str(tmp_path / "dev" / "field.db"), "--out", str(tmp_path / "dev" / "results"),
             "--detector", str(yolov5n_onnx), "--embedder", str(default_embedder_onnx), "--backend", "onnxruntime",
             env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("watch", str(tmp_path / "camera"), "--once", "--settle", "0", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "dev" / "results" / "results.db").is_file() and (tmp_path / "dev" / "field.db").is_file()
    # an option still overrides the file
    r = _cli("watch", str(tmp_path / "camera"), "--once", "--settle", "0", "--out", str(tmp_path / "elsewhere"),
             env=env)
    assert r.returncode == 0 and (tmp_path / "elsewhere" / "results.db").is_file()


def test_export_int8_on_a_configured_device_needs_only_its_calibration_setting(tmp_path) -> None:
    cfg = tmp_path / "config.toml"
    write_config(cfg, {"embedder": str(tmp_path / "embedder.onnx")})
    r = _cli("export", "--int8", env={"FIELDREID_CONFIG": str(cfg)})
    assert r.returncode == 2
    assert "No calibration crops for INT8" in r.stderr and "--calib" in r.stderr and "calib = " in r.stderr
