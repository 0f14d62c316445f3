"""Export profiles: TOML files loaded into a frozen dataclass.

A profile says how to turn the lab's portable ONNX into the artefact one kind of device runs: backend,
precision, input size, batch profile, TensorRT workspace, how many crops calibrate INT8, and the accuracy
gate the result must pass against the FP32 reference. ``export/README.md`` documents every key.

The default profiles ship inside the package (``fieldreid/export/default_profiles/*.toml``, package data read
with :mod:`importlib.resources`, so they work from an installed wheel). A name is looked up first in the
user's own folder (``$FIELDREID_EXPORT_DIR``), whose profiles add to the defaults or override one of the
same name, then in the packaged defaults; a path to a ``.toml`` file is loaded as it is.

Unknown keys are errors, not ignored: a typo such as ``max_bacth`` would otherwise build an engine with
the default batch and nobody would notice until the device is in a tree.

>>> p = load_profile("jetson-orin-fp16")            # doctest: +SKIP
>>> p.precision, p.max_batch
('fp16', 16)
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from fieldreid.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8")
PROFILE_BACKENDS = ("onnxruntime", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: ``[calibration] activations``: "int8" symmetric (TensorRT needs it), "uint8" asymmetric (ONNX Runtime CPU)
ACTIVATION_TYPES = ("int8", "uint8")
#: package folder (inside ``fieldreid``) that holds the default profiles
PACKAGED_PROFILES = "default_profiles"
#: default for ``[gate] min_cosine_p05``: the 5th-percentile embedding cosine to FP32 on held-out crops
DEFAULT_MIN_COSINE_P05 = 0.95


class ProfileError(InputError):
    """An export profile is missing, unreadable, or has an unknown key or a bad value."""


def default_profile_dir() -> Traversable:
    """The profiles shipped inside the package (``fieldreid/export/default_profiles``), installed or not."""
    return resources.files("fieldreid.export").joinpath(PACKAGED_PROFILES)


def user_profile_dir() -> Path | None:
    """``$FIELDREID_EXPORT_DIR``: the user's own profiles, looked up before the packaged ones; None if unset."""
    env = os.environ.get("FIELDREID_EXPORT_DIR")
    return Path(env) if env else None


def profile_dirs() -> list[Traversable]:
    """Where a profile name is looked up, in order: the user's folder (if set), then the packaged defaults."""
    user = user_profile_dir()
    return ([user] if user is not None else []) + [default_profile_dir()]


@dataclass(frozen=True)
class ExportProfile:
    """One validated export profile. Batch sizes satisfy ``1 <= min_batch <= opt_batch <= max_batch``."""

    name: str
    backend: str
    precision: str
    input_height: int
    input_width: int
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_mib: int = 1024
    calibration_crops: int = 0
    calibration_method: str = "minmax"
    per_channel: bool = True
    activations: str = "int8"
    min_cosine: float = 0.99
    max_top1_drop: float = 0.01
    min_cosine_p05: float = DEFAULT_MIN_COSINE_P05
    description: str = ""
    source: str = ""

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width), the order :class:`fieldreid.types.PreprocessSpec` uses."""
        return (self.input_height, self.input_width)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fieldreid.engines.tensorrt.runner.build_plan`."""
        return {
            "precision": self.precision,
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "workspace_mib": self.workspace_mib,
        }


# table -> {key: (type(s), required)}; the top level uses "" as its table name
_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "": {
        "name": ((str,), False),
        "description": ((str,), False),
        "backend": ((str,), True),
        "precision": ((str,), True),
    },
    "input": {"height": ((int,), True), "width": ((int,), True)},
    "batch": {"min": ((int,), True), "opt": ((int,), True), "max": ((int,), True)},
    "tensorrt": {"workspace_mib": ((int,), False)},
    "calibration": {"crops": ((int,), False), "method": ((str,), False), "per_channel": ((bool,), False),
                    "activations": ((str,), False)},
    "gate": {"min_cosine": ((int, float), False), "min_cosine_p05": ((int, float), False),
             "max_top1_drop": ((int, float), False)},
}
_TABLES = frozenset(k for k in _SCHEMA if k)


def _check_types(data: dict, where: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {t: {} for t in _SCHEMA}
    for key, value in data.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ProfileError(f"{where}: [{key}] must be a table, got {value!r}.")
            items, table = value.items(), key
        elif isinstance(value, dict):
            raise ProfileError(f"{where}: unknown table [{key}]; known tables: {', '.join(sorted(_TABLES))}.")
        else:
            items, table = [(key, value)], ""
        for k, v in items:
            label = f"{table}.{k}" if table else k
            if k not in _SCHEMA[table]:
                known = ", ".join(sorted(_SCHEMA[table]))
                raise ProfileError(f"{where}: unknown key {label!r}; known keys here: {known}.")
            types, _ = _SCHEMA[table][k]
            # bool is an int subclass in Python: `min = true` must not pass as batch 1.
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                names = " or ".join(t.__name__ for t in types)
                raise ProfileError(f"{where}: {label} must be {names}, got {v!r}.")
            out[table][k] = v
    for table, keys in _SCHEMA.items():
        for k, (_, required) in keys.items():
            if required and k not in out[table]:
                label = f"[{table}] {k}" if table else k
                raise ProfileError(f"{where}: required key {label} is missing.")
    return out


def parse_profile(data: dict, name: str = "", source: str = "<dict>") -> ExportProfile:
    """Validate a profile already parsed from TOML. ``name`` is used when the profile has no ``name``."""
    t = _check_types(data, source)
    top, inp, batch = t[""], t["input"], t["batch"]
    backend, precision = top["backend"], top["precision"]
    if backend not in PROFILE_BACKENDS:
        raise ProfileError(f"{source}: backend must be one of {', '.join(PROFILE_BACKENDS)}, got {backend!r}.")
    if precision not in PRECISIONS:
        raise ProfileError(f"{source}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if backend == "onnxruntime" and precision == "fp16":
        raise ProfileError(
            f"{source}: fp16 is a TensorRT precision; ONNX Runtime on a CPU runs fp32 or int8 (QDQ)."
        )
    for key in ("height", "width"):
        if not 16 <= inp[key] <= 4096:
            raise ProfileError(f"{source}: input.{key} must be between 16 and 4096 pixels, got {inp[key]}.")
    lo, opt, hi = batch["min"], batch["opt"], batch["max"]
    if not 1 <= lo <= opt <= hi:
        raise ProfileError(f"{source}: batch sizes must satisfy 1 <= min <= opt <= max, got {lo}, {opt}, {hi}.")
    if hi > 1024:
        raise ProfileError(f"{source}: batch.max {hi} is unreasonably large (at most 1024).")
    if "tensorrt" in data and backend != "tensorrt":
        raise ProfileError(f"{source}: a [tensorrt] table only applies to backend = \"tensorrt\".")
    workspace = t["tensorrt"].get("workspace_mib", 1024)
    if not 16 <= workspace <= 1 << 20:
        raise ProfileError(f"{source}: tensorrt.workspace_mib must be between 16 and 1048576, got {workspace}.")
    cal = t["calibration"]
    crops = cal.get("crops", 0)
    if precision == "int8" and crops < 1:
        raise ProfileError(
            f"{source}: an int8 profile needs [calibration] crops >= 1 (a few hundred real crops is typical)."
        )
    if precision != "int8" and "calibration" in data:
        raise ProfileError(f"{source}: a [calibration] table only applies to precision = \"int8\".")
    if crops < 0:
        raise ProfileError(f"{source}: calibration.crops must be >= 0, got {crops}.")
    method = cal.get("method", "minmax")
    if method not in CALIBRATION_METHODS:
        raise ProfileError(
            f"{source}: calibration.method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}."
        )
    activations = cal.get("activations", "int8")
    if activations not in ACTIVATION_TYPES:
        raise ProfileError(
            f"{source}: calibration.activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}."
        )
    if activations == "uint8" and backend == "tensorrt":
        raise ProfileError(f"{source}: TensorRT needs symmetric int8 activations (zero point 0); "
                           "calibration.activations = \"uint8\" is for ONNX Runtime on a CPU.")
    gate = t["gate"]
    min_cosine = float(gate.get("min_cosine", 0.99))
    max_drop = float(gate.get("max_top1_drop", 0.01))
    if not (math.isfinite(min_cosine) and 0.0 < min_cosine <= 1.0):
        raise ProfileError(f"{source}: gate.min_cosine must be in (0, 1], got {min_cosine}.")
    if not (math.isfinite(max_drop) and 0.0 <= max_drop <= 1.0):
        raise ProfileError(f"{source}: gate.max_top1_drop must be in [0, 1], got {max_drop}.")
    min_p05 = float(gate.get("min_cosine_p05", DEFAULT_MIN_COSINE_P05))
    if not (math.isfinite(min_p05) and 0.0 < min_p05 <= 1.0):
        raise ProfileError(f"{source}: gate.min_cosine_p05 must be in (0, 1], got {min_p05}.")
    return ExportProfile(
        name=top.get("name", name) or name,
        backend=backend,
        precision=precision,
        input_height=inp["height"],
        input_width=inp["width"],
        min_batch=lo,
        opt_batch=opt,
        max_batch=hi,
        workspace_mib=workspace,
        calibration_crops=crops,
        calibration_method=method,
        per_channel=cal.get("per_channel", True),
        activations=activations,
        min_cosine=min_cosine,
        max_top1_drop=max_drop,
        min_cosine_p05=min_p05,
        description=top.get("description", ""),
        source=source,
    )


def load_profile(name_or_path: str | Path, directory: str | Path | None = None) -> ExportProfile:
    """Load a profile by ``.toml`` path, or by name from ``directory`` (default: :func:`profile_dirs`)."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.exists():
        if not candidate.is_file():
            known = ", ".join(list_profiles(candidate.parent)) or "none"
            raise ProfileError(f"Export profile {candidate} does not exist. Profiles in {candidate.parent}: {known}.")
        return _read_profile(candidate, candidate.stem)
    folders: list[Traversable] = [Path(directory)] if directory is not None else profile_dirs()
    for folder in folders:
        entry = folder.joinpath(f"{name_or_path}.toml")
        if entry.is_file():
            return _read_profile(entry, str(name_or_path))
    known = ", ".join(list_profiles(directory)) or "none"
    where = " or ".join(str(f) for f in folders)
    raise ProfileError(f"Export profile {name_or_path!r} does not exist in {where}. Known profiles: {known}.")


def _read_profile(entry: Traversable, name: str) -> ExportProfile:
    try:
        data = tomllib.loads(entry.read_bytes().decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"Export profile {entry} is not valid TOML: {exc}.") from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"Export profile {entry} is not UTF-8 text: {exc}.") from exc
    except OSError as exc:
        raise ProfileError(f"Cannot read export profile {entry}: {exc.strerror or exc}.") from exc
    return parse_profile(data, name=name, source=str(entry))


def _names_in(folder: Traversable) -> set[str]:
    if not folder.is_dir():
        return set()
    return {e.name[: -len(".toml")] for e in folder.iterdir() if e.name.endswith(".toml") and e.is_file()}


def list_profiles(directory: str | Path | None = None) -> list[str]:
    """Names of the profiles in ``directory``; without one, in the user's folder and the packaged defaults."""
    folders: list[Traversable] = [Path(directory)] if directory is not None else profile_dirs()
    return sorted(set().union(*(_names_in(f) for f in folders)))
