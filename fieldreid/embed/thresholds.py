"""Open-set thresholds that travel with an embedder, so decisions hold before anyone calibrates.

Cosine scores mean different things for different embedders (ImageNet features score two unrelated
nyala 0.8; a trained re-ID model scores them 0.3), so fixed defaults are wrong for most models: with the
old 0.55 / 0.70 every unknown nyala was called known (open-set geometric mean 0.000). Each embedder
therefore carries its own thresholds in its metadata (ONNX ``metadata_props`` key ``fieldreid.thresholds``,
copied into TensorRT plan manifests), chosen with :func:`fieldreid.evaluation.metrics.calibrate` on labelled
identities the model was **not trained on**, and saying which data, split and method they came from::

    {"upper": 0.829, "lower": 0.829, "method": "max-geometric-mean (open-set simulation, 5 splits)",
     "data": "nyala/metadata.csv", "data_sha256": "...", "split": "train", "identities": 179,
     "images": 1213, "crops": true, "geometric_mean": 0.125}

Decisions use them until ``fieldreid calibrate`` stores thresholds for a population in a gallery (see
:func:`fieldreid.gallery.openset.thresholds_for`); a model without the key is *uncalibrated* and its
decisions stay flagged. ``fieldreid models --thresholds-from META.csv --split train`` writes them into the
default embedder; ``fieldreid calibrate META.csv --into-model`` into any embedder ONNX.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from fieldreid.errors import InputError, ModelError
from fieldreid.gallery.openset import Thresholds

THRESHOLDS_KEY = "fieldreid.thresholds"


def model_thresholds(meta: Mapping[str, str]) -> Thresholds | None:
    """The thresholds an embedder's metadata carries, or None (uncalibrated model). Never raises on bad
    metadata: a model whose entry cannot be read is treated as uncalibrated."""
    text = meta.get(THRESHOLDS_KEY)
    if not text:
        return None
    try:
        info = json.loads(text)
        upper, lower = float(info["upper"]), float(info["lower"])
        return Thresholds(upper, lower, describe(info), True, "model")
    except (ValueError, KeyError, TypeError, InputError):
        return None


def describe(info: Mapping) -> str:
    """The ``threshold_method`` recorded with each decision made with a model's thresholds."""
    parts = [f"split {info['split']}"] if info.get("split") else []
    if info.get("identities"):
        parts.append(f"{info['identities']} identities")
    where = f" ({', '.join(parts)})" if parts else ""
    return f"model: {info.get('method', '?')} on {info.get('data', '?')}{where}"


def read_thresholds_info(onnx_path: str | Path) -> dict | None:
    """The raw ``fieldreid.thresholds`` entry of an ONNX embedder, or None."""
    from fieldreid.engines.manifest import onnx_metadata

    text = onnx_metadata(onnx_path).get(THRESHOLDS_KEY)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _data_label(metadata: Path) -> str:
    """``nyala/metadata.csv``: the set's folder and file, not a machine-specific absolute path."""
    return f"{metadata.resolve().parent.name}/{metadata.name}"


def choose_model_thresholds(embedder, metadata: str | Path, split: str | None, crops: bool = True,
                            detector=None, batch_size: int = 16, seed: int = 0, repeats: int = 5,
                            on_progress: Callable[[int], None] | None = None) -> dict:
    """Embed the labelled images of ``metadata`` (rows of ``split``) and choose open-set thresholds on them
    with :func:`fieldreid.evaluation.metrics.calibrate` (threshold maximising sqrt(BAKS · BAUS), pooled over
    ``repeats`` simulated splits). Use identities the embedder was not trained on."""
    from fieldreid.crop import CROP_RULE
    from fieldreid.engines.manifest import sha256_file
    from fieldreid.evaluation.metrics import calibrate
    from fieldreid.gallery.enroll import embed_items, read_metadata

    metadata = Path(metadata)
    items = read_metadata(metadata, split)
    if not items:
        raise InputError(f"No labelled rows in {metadata}{f' (split {split})' if split else ''}.")
    res = embed_items(items, embedder, detector, crops, batch_size, on_progress)
    labels = [it.identity for it in res.items]
    cal = calibrate(res.vectors, labels, seed=seed, repeats=repeats)
    return {"upper": round(cal.upper, 6), "lower": round(cal.lower, 6), "method": cal.method,
            "data": _data_label(metadata), "data_sha256": sha256_file(metadata), "split": split,
            "identities": cal.n_identities, "images": len(res.items), "crops": bool(crops),
            "crop_rule": CROP_RULE, "detector": getattr(detector, "model_id", None) if detector else None,
            "model_id": embedder.model_id, "geometric_mean": round(cal.geometric_mean, 4),
            "BAKS": round(cal.BAKS, 4), "BAUS": round(cal.BAUS, 4), "seed": seed, "repeats": cal.repeats}


def write_model_thresholds(onnx_path: str | Path, info: Mapping) -> Path:
    """Put ``info`` into the ONNX file's metadata (atomically; the graph is untouched, so the model id and
    every embedding stay the same) and into its manifest, if it has one."""
    from fieldreid.engines.manifest import manifest_path, read_manifest, write_manifest
    from fieldreid.storage.fsutil import atomic_output

    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - the train extra brings it
        from fieldreid.errors import missing_extra

        raise missing_extra("onnx", "train", "writing thresholds into a model") from exc
    onnx_path = Path(onnx_path)
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ModelError(f"Cannot read {onnx_path} as an ONNX model: {exc}") from exc
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("fieldreid.kind", "embedder") != "embedder" or "fieldreid.model_id" not in meta:
        raise ModelError(f"{onnx_path} is not a fieldreid embedder export; thresholds belong to an embedder.")
    if info.get("model_id") not in (None, meta["fieldreid.model_id"]):
        raise ModelError(f"These thresholds were chosen with model {info['model_id']}, not "
                         f"{meta['fieldreid.model_id']} ({onnx_path}).")
    text = json.dumps(dict(info), sort_keys=True)
    for p in proto.metadata_props:
        if p.key == THRESHOLDS_KEY:
            p.value = text
            break
    else:
        prop = proto.metadata_props.add()
        prop.key, prop.value = THRESHOLDS_KEY, text
    with atomic_output(onnx_path) as tmp:
        onnx.save(proto, str(tmp))
    if manifest_path(onnx_path).exists():
        manifest = read_manifest(onnx_path)
        for key in ("artefact", "artefact_sha256", "created", "fieldreid_version"):
            manifest.pop(key, None)
        write_manifest(onnx_path, {**manifest, "thresholds": dict(info)})
    return onnx_path


def ensure_model_thresholds(onnx_path: str | Path, metadata: str | Path, split: str | None, crops: bool = True,
                            force: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Choose and write thresholds into ``onnx_path`` unless it already carries some chosen on the same
    data (same metadata file content and split) for the same model, or ``force``. Returns the entry."""
    from fieldreid.crop import CROP_RULE
    from fieldreid.defaults import DETECTOR_NAME
    from fieldreid.embed.runtime import Embedder
    from fieldreid.engines.manifest import sha256_file

    metadata = Path(metadata)
    if not metadata.is_file():
        raise InputError(f"{metadata} does not exist: thresholds need a labelled metadata.csv.")
    emb = Embedder(onnx_path, backend="onnxruntime")
    # the crops are cut as the field cuts them (fieldreid.crop): by the detector beside the embedder, if any
    det_path = Path(onnx_path).parent / DETECTOR_NAME
    detector = None
    if crops and det_path.is_file():
        from fieldreid.detect import Detector

        detector = Detector(det_path, backend="onnxruntime")
    try:
        have = read_thresholds_info(onnx_path)
        if (not force and have and have.get("data_sha256") == sha256_file(metadata) and have.get("split") == split
                and have.get("model_id") == emb.model_id and have.get("crops") == bool(crops)
                and have.get("crop_rule") == CROP_RULE
                and have.get("detector") == (detector.model_id if detector else None)):
            if log:
                log(f"{onnx_path} already carries thresholds from {describe(have)}")
            return have
        if log:
            log(f"choosing open-set thresholds for {emb.model_id} on {metadata}"
                f"{f' (split {split})' if split else ''} ...")
        info = choose_model_thresholds(emb, metadata, split, crops=crops, detector=detector)
    finally:
        emb.close()
        if detector is not None:
            detector.close()
    write_model_thresholds(onnx_path, info)
    if log:
        log(f"{onnx_path}: upper = lower = {info['upper']:.4f} ({describe(info)}; open-set GM on that data "
            f"{info['geometric_mean']:.3f})")
    return info
