"""The device configuration: one TOML file that names what a field device works with.

``fieldreid init`` writes it; ``watch``, ``sync``, ``export`` and every command that opens a model read it,
and their options override it. Default location: ``$FIELDREID_CONFIG`` (``$FIELDREID_SYNC_CONFIG`` is
still read), else ``~/.config/fieldreid/config.toml`` (a ``sync.toml`` there from an older fieldreid
is used while no ``config.toml`` exists). Keys, all optional::

    gallery = "/data/fieldreid/field.db"      # identity gallery          (--gallery)
    out = "/data/fieldreid/results"           # watch output folder        (--out)
    server = "https://lab.example.org"        # lab server                 (sync --server)
    project = "kenya-2025"                    # lab project                (sync --project)
    lab_public_key = "base64..."              # pinned lab signing key     (sync --lab-key)
    token = "frd_..."                         # device token (or $FIELDREID_TOKEN; keep the file mode 600)
    detector = "/opt/fieldreid/detector.onnx" # models                     (--detector / --embedder)
    embedder = "/opt/fieldreid/embedder.onnx"
    backend = "auto"                          # (--backend)
    calib = "/data/fieldreid/calib-crops"     # real crops for `export --int8` (--calib)

Relative paths are relative to the file's folder. A setting that is needed and missing everywhere is one
sentence naming the option and the key (:meth:`DeviceConfig.require`).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fieldreid.errors import FieldreidError

CONFIG_ENV = "FIELDREID_CONFIG"
LEGACY_CONFIG_ENV = "FIELDREID_SYNC_CONFIG"
#: keys whose values are paths (resolved against the config file's folder)
PATH_KEYS = ("gallery", "out", "detector", "embedder", "calib", "lab_public_key_file")


class ConfigError(FieldreidError):
    """The device configuration is unreadable, or a setting it should give is missing."""


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "fieldreid"


def default_config_path() -> Path:
    """Where the device configuration is read from and ``fieldreid init`` writes it."""
    env = os.environ.get(CONFIG_ENV) or os.environ.get(LEGACY_CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    new, legacy = config_dir() / "config.toml", config_dir() / "sync.toml"
    return legacy if legacy.is_file() and not new.is_file() else new


@dataclass
class DeviceConfig:
    path: Path
    data: dict = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    @classmethod
    def load(cls, path: str | Path | None = None) -> DeviceConfig:
        """Read the file (an absent file is an empty configuration); :class:`ConfigError` if unreadable."""
        p = Path(path).expanduser() if path else default_config_path()
        if path and not p.is_file():
            raise ConfigError(f"No configuration file at {p} (given with --config).")
        if not p.is_file():
            return cls(p, {})
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"Cannot read the configuration {p}: {exc}. Fix it or rewrite it with "
                              "`fieldreid init`.") from exc
        return cls(p, data)

    def get(self, key: str):
        value = self.data.get(key)
        return None if value in (None, "") else value

    def path_of(self, key: str) -> Path | None:
        """A path setting, ``~`` expanded and relative paths taken from the file's folder."""
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{key} in {self.path} must be a path in quotes, got {value!r}.")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.path.parent / p

    def choose(self, given, key: str):
        """The option's value if given, else the configured one (paths resolved), else None."""
        if given is not None:
            return given
        return self.path_of(key) if key in PATH_KEYS else self.get(key)

    def require(self, given, key: str, option: str, what: str):
        """Like :meth:`choose`, but a missing setting is a :class:`ConfigError` saying where to give it."""
        value = self.choose(given, key)
        if value is None:
            where = f"{self.path}" + ("" if self.exists else " (which does not exist yet)")
            raise ConfigError(f"No {what}: pass {option} or set {key} = \"...\" in {where}; `fieldreid init "
                              f"{option} ...` writes it.")
        return value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"Cannot write {value!r} to a configuration file.")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"Cannot write {value!r} ({type(value).__name__}) to a configuration file.")


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() and name.isascii() else json.dumps(name)


def to_toml(data: Mapping) -> str:
    """Flat keys first, then one level of tables (all a device configuration needs)."""
    lines = [f"{_key(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def write_config(path: str | Path, updates: Mapping, header: str = "") -> dict:
    """Merge ``updates`` (None values are ignored) into the file at ``path`` and write it atomically with
    mode 600 (it may hold the device token). Returns the merged settings."""
    from fieldreid.storage.fsutil import atomic_output

    path = Path(path).expanduser()
    current = DeviceConfig.load(path).data if path.is_file() else {}
    merged = {**current, **{k: v for k, v in updates.items() if v is not None}}
    text = (header + "\n" if header else "") + to_toml(merged)
    tomllib.loads(text)  # never write a file that would not read back
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        os.chmod(tmp, 0o600)  # before the token is in it
        tmp.write_text(text, encoding="utf-8")
    return merged
