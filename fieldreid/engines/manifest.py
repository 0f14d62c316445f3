"""JSON manifests beside built artefacts, atomic file writes, and small ONNX inspections.

Every artefact fieldreid builds (a TensorRT plan, a quantised ONNX) gets ``<artefact>.json`` beside it:
``model.engine`` → ``model.engine.json``. The manifest says what the artefact was built from (sha256 of
the source ONNX), how (precision, batch profile), and for what (TensorRT version, GPU), so that a plan
copied to the wrong device is refused with a sentence instead of crashing inside TensorRT.

Writes are atomic (:mod:`fieldreid.storage.fsutil`: temporary file in the same folder, fsync, ``os.replace``):
a power cut on a field device leaves either the old file or the new one, never half a JSON.

>>> write_manifest("engines/embedder.engine", {"precision": "fp16"})   # doctest: +SKIP
PosixPath('engines/embedder.engine.json')
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from fieldreid.errors import ModelError, missing_extra
from fieldreid.storage.fsutil import atomic_write_text

MANIFEST_SUFFIX = ".json"
#: ONNX operators that mark explicit (Q/DQ) quantisation
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: TensorRT plan precisions, and the suffix of every plan fieldreid writes (``<stem>.<precision>.engine``)
PLAN_PRECISIONS = ("fp32", "fp16", "int8")
PLAN_SUFFIX = ".engine"
#: suffixes accepted for plans built by hand (``trtexec --saveEngine=model.plan``) or by older fieldreid
PLAN_SUFFIXES = (".engine", ".plan", ".trt")


def manifest_path(artefact_path: str | Path) -> Path:
    """``model.engine`` → ``model.engine.json`` (the suffix is appended, not replaced)."""
    artefact_path = Path(artefact_path)
    return artefact_path.with_name(artefact_path.name + MANIFEST_SUFFIX)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (plans and ONNX files can be hundreds of MB)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
    except OSError as exc:
        raise ModelError(f"Cannot read {path} to checksum it: {exc.strerror or exc}.") from exc
    return digest.hexdigest()


def _fieldreid_version() -> str:
    try:
        from fieldreid import __version__
    except ImportError:  # pragma: no cover - partial checkout
        return "unknown"
    return str(__version__)


def write_manifest(artefact_path: str | Path, data: dict) -> Path:
    """Write ``<artefact>.json`` atomically and return its path.

    Adds ``created`` (UTC, ISO 8601), ``fieldreid_version``, ``artefact`` (file name) and
    ``artefact_sha256`` to ``data`` (a copy; the caller's dict is left alone). The artefact must exist.
    """
    artefact_path = Path(artefact_path)
    record = dict(data)
    record.update(
        {
            "artefact": artefact_path.name,
            "artefact_sha256": sha256_file(artefact_path),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "fieldreid_version": _fieldreid_version(),
        }
    )
    target = manifest_path(artefact_path)
    # Serialise fully before touching the disk: a bad value must not leave a half-written file.
    try:
        text = json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"Cannot write manifest {target}: a value is not JSON-serialisable ({exc}).") from exc
    return atomic_write_text(target, text + "\n")


def read_manifest(artefact_path: str | Path, verify_sha256: bool = False) -> dict:
    """Read ``<artefact>.json``; :class:`ModelError` naming the file if it is missing or not a JSON object.

    With ``verify_sha256`` the artefact's checksum is compared with the recorded one (catches a plan
    truncated by a failed copy before TensorRT gets to see it).
    """
    artefact_path = Path(artefact_path)
    path = manifest_path(artefact_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelError(
            f"Manifest {path} is missing: {artefact_path.name} cannot be checked. Rebuild the artefact with "
            "`fieldreid export`, which writes both files."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"Cannot read manifest {path}: {exc}. Rebuild it with `fieldreid export`.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"Manifest {path} is corrupt (invalid JSON at line {exc.lineno}, column {exc.colno}). "
            "Rebuild the artefact with `fieldreid export`."
        ) from exc
    if not isinstance(data, dict):
        raise ModelError(f"Manifest {path} is not a JSON object. Rebuild the artefact with `fieldreid export`.")
    if verify_sha256:
        want = data.get("artefact_sha256")
        got = sha256_file(artefact_path)
        if want != got:
            raise ModelError(
                f"{artefact_path} does not match its manifest {path.name} (sha256 {got[:12]}… ≠ "
                f"{str(want)[:12]}…): the file was changed or truncated. Rebuild it with `fieldreid export`."
            )
    return data


def _load_onnx_proto(onnx_path: Path):
    import onnx

    try:
        # External weights are not needed to read metadata or node types.
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError... for a bad file
        raise ModelError(f"{onnx_path} is not a readable ONNX model ({exc}). Export it again.") from exc


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file {path} does not exist.")
    return path


def onnx_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The model's ``metadata_props`` (preprocessing, model id, ...) as ``{key: value}``.

    Uses the ``onnx`` package when installed, else ONNX Runtime (a core dependency), which exposes the
    same map as ``custom_metadata_map``.
    """
    onnx_path = _require_file(onnx_path)
    try:
        import onnx  # noqa: F401
    except ImportError:
        return _onnx_metadata_via_ort(onnx_path)
    model = _load_onnx_proto(onnx_path)
    return {prop.key: prop.value for prop in model.metadata_props}


def _onnx_metadata_via_ort(onnx_path: Path) -> dict[str, str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - core dependency
        raise missing_extra("onnxruntime", "core") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{onnx_path} is not a readable ONNX model ({exc}). Export it again.") from exc
    return dict(session.get_modelmeta().custom_metadata_map)


def _graph_op_types(graph) -> set[str]:
    ops: set[str] = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.g is not None and len(attr.g.node):
                ops |= _graph_op_types(attr.g)
            for sub in attr.graphs:
                ops |= _graph_op_types(sub)
    return ops


def has_qdq(onnx_path: str | Path) -> bool:
    """True when the ONNX contains QuantizeLinear/DequantizeLinear nodes (explicit INT8 quantisation).

    Needs the ``onnx`` package: ONNX Runtime does not expose the graph's nodes.
    """
    onnx_path = _require_file(onnx_path)
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise missing_extra("onnx", "trt", "needed to check an ONNX model for Q/DQ quantisation nodes") from exc
    model = _load_onnx_proto(onnx_path)
    ops = _graph_op_types(model.graph)
    for function in model.functions:
        for node in function.node:
            ops.add(node.op_type)
    return bool(ops & QDQ_OPS)


# -- TensorRT plan names: the one place that names them (writer: ``fieldreid export``; reader: the registry)
def _onnx_stem(onnx_path: Path) -> str:
    name = onnx_path.name
    return name[: -len(".onnx")] if name.lower().endswith(".onnx") else onnx_path.stem


def plan_path(onnx_path: str | Path, precision: str) -> Path:
    """The plan fieldreid builds from ``onnx_path`` at ``precision``, beside it.

    ``m.onnx`` → ``m.fp16.engine`` / ``m.fp32.engine`` / ``m.int8.engine``; a precision already in the
    name is not repeated (``m.int8.onnx`` → ``m.int8.engine``). :func:`plan_precision` reads it back.
    """
    if precision not in PLAN_PRECISIONS:
        raise ModelError(f"TensorRT plan precision must be one of {', '.join(PLAN_PRECISIONS)}, got {precision!r}.")
    onnx_path = Path(onnx_path)
    stem = _onnx_stem(onnx_path)
    if not stem.endswith("." + precision):
        stem += "." + precision
    return onnx_path.with_name(stem + PLAN_SUFFIX)


def plan_precision(plan: str | Path) -> str | None:
    """The precision in a plan's name (``m.fp16.engine`` → ``"fp16"``); None for a name without one."""
    name = Path(plan).name
    for precision in PLAN_PRECISIONS:
        if name.endswith(f".{precision}{PLAN_SUFFIX}"):
            return precision
    return None


def is_int8_onnx(onnx_path: str | Path) -> bool:
    """Whether fieldreid made ``onnx_path`` as an INT8 (QDQ) model: by its name (``m.int8.onnx``) or by the
    manifest beside it (``precision: int8-qdq``). Cheap: the model itself is not read."""
    onnx_path = Path(onnx_path)
    if _onnx_stem(onnx_path).endswith(".int8"):
        return True
    try:
        data = json.loads(manifest_path(onnx_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("precision", "")).startswith("int8")


def plan_candidates(onnx_path: str | Path) -> list[Path]:
    """Plans of ``onnx_path`` that backend selection looks for, best first.

    A float ONNX: its FP16 plan, then its FP32 plan; an INT8 (QDQ) ONNX: its INT8 plan (the only
    precision TensorRT builds it at). Then a hand-built ``m.engine`` / ``m.plan`` / ``m.trt``.
    """
    onnx_path = Path(onnx_path)
    precisions = ("int8",) if is_int8_onnx(onnx_path) else ("fp16", "fp32")
    out = [plan_path(onnx_path, p) for p in precisions]
    for suffix in PLAN_SUFFIXES:
        bare = onnx_path.with_name(_onnx_stem(onnx_path) + suffix)
        if bare not in out:
            out.append(bare)
    return out


def find_plan(onnx_path: str | Path) -> Path | None:
    """The best plan built from ``onnx_path`` that exists beside it (:func:`plan_candidates`), or None."""
    return next((p for p in plan_candidates(onnx_path) if p.is_file()), None)


def plan_source_onnx(plan: str | Path) -> Path:
    """The ONNX a plan was built from, beside it: from its manifest when readable, else from its name."""
    plan = Path(plan)
    try:
        source = json.loads(manifest_path(plan).read_text(encoding="utf-8")).get("source_onnx")
    except (OSError, ValueError, AttributeError):
        source = None
    if isinstance(source, str) and source:
        return plan.with_name(Path(source).name)
    precision = plan_precision(plan)
    if precision is None:
        return plan.with_suffix(".onnx")  # m.engine, m.plan, m.trt: built by hand from m.onnx
    tagged = plan.name[: -len(PLAN_SUFFIX)]  # m.int8
    bare = plan.with_name(tagged[: -len("." + precision)] + ".onnx")  # m.onnx
    if precision == "int8" and (plan.with_name(tagged + ".onnx").is_file() or not bare.is_file()):
        return plan.with_name(tagged + ".onnx")  # m.int8.engine from m.int8.onnx, the QDQ model export writes
    return bare
