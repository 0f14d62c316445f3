"""INT8 by explicit quantisation: a QDQ ONNX calibrated on real crops, and the accuracy gate it must pass.

>>> report = quantize_embedder("embedder.onnx", "embedder.int8.onnx", calib, val_images, val_labels)  # doctest: +SKIP

How (and why this way):

- ONNX Runtime's ``quantize_static`` with ``QuantFormat.QDQ`` inserts QuantizeLinear/DequantizeLinear pairs
  into the FP32 graph. ONNX Runtime runs that file on a CPU (fusing the pairs into integer kernels) and
  TensorRT builds it as a *strongly typed* network (:func:`fieldreid.engines.tensorrt.runner.build_plan`): the
  explicit-quantisation path that replaces TensorRT's deprecated (10.x) and removed (11) calibrator.
- Symmetric INT8 for weights *and* activations (zero point 0), weights per output channel: TensorRT only
  accepts symmetric Q/DQ, and depthwise convolutions (all of EfficientNet-Lite) lose too much with one
  scale per tensor.
- Calibration runs on **real crops** of the kind the device will see; fewer than
  :data:`MIN_CALIBRATION_CROPS` are refused (activation ranges from a handful of crops are noise).
- The gate compares INT8 with FP32 on validation crops never used for calibration (a separate set, or a
  deterministic name-hash split of the one set given: :func:`held_out_sets`): per-crop embedding cosine
  (mean, 5th percentile and worst; the gate checks the mean and the 5th percentile) and, with labels,
  one-vs-all top-1 (:func:`fieldreid.evaluation.metrics.one_vs_all`). When the gate fails and ``fallback`` is
  on, the quantisation is redone with the most sensitive layers kept in FP32 (``nodes_to_exclude``), in
  steps: the earliest convolutions (first 1/12, then 1/4 of them) plus the whole head (last convolution,
  pooling, BN neck), then also every depthwise convolution; the report names the nodes. If even that fails, :class:`QuantizationGateError` carries the numbers and no
  INT8 file is left behind.
- Detectors get the same treatment with a box-agreement gate (:func:`quantize_detector`): published INT8 YOLO
  results often collapse (YOLO11n mAP 0.61 -> 0.32 on a Jetson with a small calibration set). Their decode
  and shape arithmetic stay FP32 (:func:`detector_fp32_nodes`) and the fallback keeps early convolutions in
  FP32 (:func:`detector_fallback_ladder`); a passing model says in one sentence whether it is faster than FP32.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fieldreid.detect.decode import box_iou
from fieldreid.errors import FieldreidError, InputError, ModelError
from fieldreid.export.profiles import DEFAULT_MIN_COSINE_P05
from fieldreid.storage.fsutil import atomic_output

MIN_CALIBRATION_CROPS = 32
DEFAULT_CALIBRATION_CROPS = 256
DEFAULT_MIN_COSINE = 0.98
DEFAULT_MAX_TOP1_DROP = 0.02
METHODS = ("minmax", "entropy", "percentile")
#: INT8 activation types: "int8" symmetric (TensorRT's QDQ form), "uint8" asymmetric (fast on ONNX Runtime CPU)
ACTIVATION_TYPES = ("int8", "uint8")
#: share of a single crop set held out for the gate when no separate validation set is given
VALIDATION_FRACTION = 0.3
#: at most this many validation crops
VALIDATION_CROPS = 400


class QuantizationGateError(FieldreidError):
    """The INT8 model is not accurate enough against FP32; ``report`` holds every attempt's numbers."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class GateResult:
    """INT8 against FP32 on the validation set."""

    n: int
    cosine_mean: float
    cosine_p05: float
    cosine_min: float
    top1_fp32: float | None
    top1_int8: float | None
    top1_drop: float | None
    min_cosine: float
    min_cosine_p05: float
    max_top1_drop: float
    passed: bool

    def cosine_text(self) -> str:
        """``cosine mean 0.9970, 5th percentile 0.9920, min 0.9800`` (what the CLI and errors print)."""
        return (f"cosine mean {self.cosine_mean:.4f}, 5th percentile {self.cosine_p05:.4f}, "
                f"min {self.cosine_min:.4f}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeReport:
    int8_path: Path
    calibration_crops: int
    method: str
    per_channel: bool
    excluded_nodes: list[str]
    gate: GateResult
    attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"int8_path": str(self.int8_path), "calibration_crops": self.calibration_crops,
                "method": self.method, "per_channel": self.per_channel, "excluded_nodes": self.excluded_nodes,
                "gate": self.gate.to_dict(), "attempts": self.attempts, "seconds": round(self.seconds, 1)}


# ------------------------------------------------------------------------------------------ crops
@dataclass(frozen=True)
class CropRef:
    """One crop file: its path, identity (None from a folder) and ``key``, its path relative to the source
    (the folder, or the ``metadata.csv``'s folder), which the held-out split hashes."""

    path: Path
    label: str | None
    key: str


def _key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # an absolute path in a metadata.csv
        return path.as_posix()


def list_crops(source: str | Path | Sequence[str | Path], split: str | None = None) -> list[CropRef]:
    """The crop files of a ``metadata.csv`` (``split`` selects rows), a folder, or a list of files/folders.

    ``split`` only means something for a ``metadata.csv``: for a folder it is an error, not ignored.
    """
    from fieldreid.frames.files import iter_files
    from fieldreid.gallery.enroll import read_metadata

    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".csv":
        root = Path(source).parent
        return [CropRef(Path(it.path), it.identity, _key(Path(it.path), root))
                for it in read_metadata(source, split=split)]
    srcs = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    missing = [str(s) for s in srcs if not s.exists()]
    if missing:
        raise InputError(f"Crop source {missing[0]} does not exist.")
    if split is not None:
        raise InputError(f"A split ({split!r}) selects rows of a metadata.csv; {srcs[0]} is not one. Drop the "
                         "split option, or pass the metadata.csv.")
    out = []
    for src in srcs:
        root = src if src.is_dir() else src.parent
        out += [CropRef(p, None, _key(p, root)) for p in iter_files([src])]
    return out


def holdout_split(refs: Sequence[CropRef], fraction: float = VALIDATION_FRACTION
                  ) -> tuple[list[CropRef], list[CropRef]]:
    """(calibration, validation): a deterministic split of one crop set into two disjoint parts.

    Crops are ordered by the sha256 of their ``key`` (path relative to the source); the first
    ``round(n * fraction)`` (at least 1 and at most n - 1 when n >= 2) are held out for validation. The
    split depends only on the names, not on the listing order, the folder's location or a seed.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"The validation fraction must be between 0 and 1, got {fraction}.")
    n = len(refs)
    n_val = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
    order = sorted(range(n), key=lambda i: (hashlib.sha256(refs[i].key.encode("utf-8")).hexdigest(), refs[i].key))
    held = set(order[:n_val])
    return [r for i, r in enumerate(refs) if i not in held], [r for i, r in enumerate(refs) if i in held]


def sample_crops(refs: Sequence[CropRef], limit: int | None, seed: int = 0) -> list[CropRef]:
    """A seeded random subset of ``limit`` crops (all of them when there are no more), in listing order."""
    if limit is None or limit >= len(refs):
        return list(refs)
    return [refs[i] for i in np.sort(np.random.default_rng(seed).choice(len(refs), size=limit, replace=False))]


def read_crops(refs: Sequence[CropRef], max_side: int = 512) -> tuple[list[np.ndarray], list[str | None]]:
    """BGR pixels (longest side at most ``max_side``) and identities; unreadable files are skipped."""
    import cv2

    from fieldreid.errors import ImageReadError
    from fieldreid.frames.decode import read_image

    crops, labels = [], []
    for ref in refs:
        try:
            px = read_image(ref.path, min_side=max_side).pixels
        except ImageReadError:
            continue
        if max(px.shape[:2]) > max_side:
            s = max_side / max(px.shape[:2])
            px = cv2.resize(px, (max(1, round(px.shape[1] * s)), max(1, round(px.shape[0] * s))),
                            interpolation=cv2.INTER_AREA)
        crops.append(px)
        labels.append(ref.label)
    return crops, labels


def load_crops(source: str | Path | Sequence[str | Path], limit: int | None = None, split: str | None = None,
               seed: int = 0, max_side: int = 512) -> tuple[list[np.ndarray], list[str | None]]:
    """BGR crops (and identities, None for a folder) from a ``metadata.csv``, a folder, or a list of files.

    With ``limit``, a seeded random subset of that many is taken; unreadable files are skipped.
    """
    return read_crops(sample_crops(list_crops(source, split), limit, seed), max_side)


@dataclass
class HeldOutSets:
    """Calibration and validation crops that share no file, and where each came from (for the manifest)."""

    calib: list[CropRef]
    val: list[CropRef]
    info: dict


def held_out_sets(calib_source: str | Path, calib_split: str | None = None, val_source: str | Path | None = None,
                  val_split: str | None = None, calib_limit: int | None = None,
                  val_limit: int | None = VALIDATION_CROPS, fraction: float = VALIDATION_FRACTION) -> HeldOutSets:
    """Calibration crops, and validation crops never used for calibration.

    Without ``val_source`` the calibration set is split (:func:`holdout_split`): calibration samples
    ``calib_limit`` from one part, validation uses the other. With it, every file that calibrates is
    removed from the validation set (``--val`` may name the same folder or CSV as ``--calib``).
    """
    refs = list_crops(calib_source, calib_split)
    info: dict = {"calibration": {"source": str(calib_source), "split": calib_split}}
    if val_source is None:
        calib_part, val_part = holdout_split(refs, fraction)
        calib = sample_crops(calib_part, calib_limit, seed=0)
        val = sample_crops(val_part, val_limit, seed=1)
        info["validation"] = {"source": str(calib_source), "split": calib_split,
                              "held_out": f"{len(val_part)} of {len(refs)} files (fraction {fraction}) held out "
                                          "from calibration by name hash"}
    else:
        calib = sample_crops(refs, calib_limit, seed=0)
        used = {r.path.resolve() for r in calib}
        candidates = list_crops(val_source, val_split)
        kept = [r for r in candidates if r.path.resolve() not in used]
        val = sample_crops(kept, val_limit, seed=1)
        info["validation"] = {"source": str(val_source), "split": val_split,
                              "held_out": f"{len(candidates) - len(kept)} calibration file(s) removed"}
        if len(kept) < 2:
            raise InputError(
                f"The validation set {val_source}{f' [{val_split}]' if val_split else ''} has {len(kept)} file(s) "
                f"that were not used for calibration ({len(candidates) - len(kept)} were): INT8 is never "
                "validated on its calibration images. Give --val other crops, or leave it out to split --calib.")
    return HeldOutSets(calib, val, info)


def check_calibration_count(n: int, minimum: int = MIN_CALIBRATION_CROPS) -> None:
    if n < minimum:
        raise InputError(
            f"INT8 calibration needs at least {minimum} real crops, got {n}: activation ranges from so few "
            f"images would clip or waste the INT8 range. Give --calib a folder or metadata.csv with "
            f"{DEFAULT_CALIBRATION_CROPS} or more crops like the ones the device will see."
        )


# ------------------------------------------------------------------------------------------ ORT helpers
def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, batch: np.ndarray, batch_size: int = 16, threads: int | None = None) -> np.ndarray:
    """First output of ``path`` over ``batch`` in chunks (ONNX Runtime, CPU)."""
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    outs = [np.asarray(sess.run(None, {name: batch[i:i + batch_size]})[0], np.float32)
            for i in range(0, len(batch), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def speed_vs_fp32(fp32_path: str | Path, int8_path: str | Path, batch: np.ndarray, rounds: int = 5,
                  batch_size: int = 16) -> dict:
    """INT8 throughput / FP32 throughput on this CPU (ONNX Runtime, the engine's thread count), both models
    timed alternately on the same batch so that a busy machine slows both alike; with the CPU's INT8 flags."""
    from fieldreid.engines.ort import OnnxRuntimeEngine, cpu_int8_flags

    x = np.ascontiguousarray(np.resize(batch, (batch_size, *batch.shape[1:])), np.float32)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    with OnnxRuntimeEngine(fp32_path, device="cpu") as fp32, OnnxRuntimeEngine(int8_path, device="cpu") as int8:
        engines = {"fp32": fp32, "int8": int8}
        for eng in engines.values():
            eng.run(x)  # warm-up
        for _ in range(rounds):
            for key, eng in engines.items():
                t = time.perf_counter()
                eng.run(x)
                times[key].append(time.perf_counter() - t)
    ms = {k: 1e3 * float(np.median(v)) / batch_size for k, v in times.items()}
    return {"speedup": round(ms["fp32"] / ms["int8"], 2), "fp32_ms_per_item": round(ms["fp32"], 2),
            "int8_ms_per_item": round(ms["int8"], 2), "batch": batch_size, **cpu_int8_flags()}


class _Reader:
    """onnxruntime CalibrationDataReader over a preprocessed ``(N, 3, H, W)`` array, in small batches; or over
    a list of such arrays of different (H, W) (a dynamic-shape detector's rectangles), each in small batches."""

    def __init__(self, input_name: str, batch: np.ndarray | Sequence[np.ndarray], batch_size: int = 8) -> None:
        groups = [batch] if isinstance(batch, np.ndarray) else list(batch)
        self.input_name = input_name
        self._chunks = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
        self._i = 0

    def get_next(self):
        if self._i >= len(self._chunks):
            return None
        x = self._chunks[self._i]
        self._i += 1
        return {self.input_name: np.ascontiguousarray(x, np.float32)}

    def rewind(self) -> None:
        self._i = 0


def conv_nodes(onnx_path: str | Path) -> list[tuple[str, bool]]:
    """(name, is_depthwise) of every Conv node in graph order (unnamed nodes are named by the quantiser)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        depthwise = bool(group > 1 and w is not None and group == w.dims[0])
        out.append((node.name, depthwise))
    return out


def _tail_nodes(onnx_path: str | Path) -> list[str]:
    """Every node from the last Conv to the output: head conv, its activation, pooling, neck, L2 norm.

    ONNX graphs are stored in topological order, so "after the last Conv" is a slice of the node list.
    """
    import onnx

    nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    last = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=None)
    return [] if last is None else [n.name for n in nodes[last:] if n.name]


def fallback_ladder(onnx_path: str | Path) -> list[tuple[str, list[str]]]:
    """Steps of layers kept in FP32 when the gate fails (the gate decides; these are only the candidates).

    1. none; 2. the first ``n/12`` convolutions and the head (last conv, pooling, BN neck); 3. the first
    ``n/4`` convolutions and the head; 4. additionally every depthwise convolution. Measured on a
    fine-tuned EfficientNet-Lite0 (49 convs, nyala): quantising only convs 2-3 (block 0's linear
    projection and block 1's expansion, at 112 x 112) alone drops the embedding cosine to FP32 to 0.38,
    while convs 12-49 quantised together keep 0.99: the early, high-resolution, per-tensor-quantised
    activations are where EfficientNet INT8 breaks.
    """
    convs = conv_nodes(onnx_path)
    steps = [("all layers int8", [])]
    if not convs or any(not name for name, _ in convs):
        return steps
    tail = _tail_nodes(onnx_path)
    seen: set[int] = set()
    for k in (max(1, len(convs) // 12), max(1, len(convs) // 4)):
        if k in seen:
            continue
        seen.add(k)
        names = list(dict.fromkeys([n for n, _ in convs[:k]] + tail))
        steps.append((f"first {k} conv(s) and the head (last conv, pooling, neck) in fp32", names))
    dw = [n for n, d in convs if d and n not in steps[-1][1]]
    if dw:
        steps.append((f"{steps[-1][0]}, plus every depthwise conv", steps[-1][1] + dw))
    return steps


def quantize_qdq(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray | Sequence[np.ndarray],
                 method: str = "minmax",
                 per_channel: bool = True, nodes_to_exclude: Sequence[str] = (), batch_size: int = 8,
                 op_types: Sequence[str] | None = None, activations: str = "int8") -> Path:
    """Write a QDQ INT8 ONNX calibrated on ``calib`` (preprocessed: one array, or a list of arrays whose
    spatial sizes differ, for a model with dynamic height/width); weights symmetric int8.

    ``activations``: ``"int8"`` symmetric (zero point 0: the form TensorRT needs) or ``"uint8"`` asymmetric
    (U8S8: what ONNX Runtime's CPU kernels run fast; VNNI's ``vpdpbusd`` multiplies unsigned by signed bytes,
    and S8S8 measured 0.72x FP32 speed vs 2.2x for U8S8 on an AVX-512 VNNI EPYC, README *Measured*).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in METHODS:
        raise InputError(f"Calibration method must be one of {', '.join(METHODS)}, got {method!r}.")
    if activations not in ACTIVATION_TYPES:
        raise InputError(f"INT8 activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}.")
    cm = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
          "percentile": CalibrationMethod.Percentile}[method]
    sess = _session(fp32_path)
    reader = _Reader(sess.get_inputs()[0].name, calib, batch_size)
    del sess
    fp32_path, out_path = Path(fp32_path).resolve(), Path(out_path).resolve()  # before the chdir below
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fieldreid-q-") as tmp:
        # The calibrator writes augmented models next to its working files; keep them out of the output dir.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(str(fp32_path), str(Path(tmp) / "q.onnx"), reader,
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            op_types_to_quantize=list(op_types) if op_types else None,
                            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(nodes_to_exclude) or None, calibrate_method=cm,
                            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True})
        except Exception as exc:
            raise ModelError(f"INT8 quantisation of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            os.chdir(cwd)
        # The work dir may be on another filesystem (tmpfs on a Jetson): copy, don't rename across it.
        shutil.copyfile(Path(tmp) / "q.onnx", out_path)
    return out_path


def _has_qdq(path: Path) -> bool:
    from fieldreid.engines.manifest import has_qdq

    return has_qdq(path)


def _copy_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    import onnx

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst))
    props = {p.key: p.value for p in s.metadata_props}
    props.update(extra)
    del d.metadata_props[:]
    for k, v in props.items():
        p = d.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(d, str(dst))


# ------------------------------------------------------------------------------------------ gates
def embedding_gate(fp32: np.ndarray, int8: np.ndarray, labels: Sequence | None = None,
                   min_cosine: float = DEFAULT_MIN_COSINE, max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
                   min_cosine_p05: float = DEFAULT_MIN_COSINE_P05) -> GateResult:
    """Compare INT8 with FP32 embeddings of the same crops: cosine per crop, one-vs-all top-1 with labels.

    Passes when the mean cosine reaches ``min_cosine``, its 5th percentile ``min_cosine_p05`` (a mean hides
    a tail of crops the INT8 model gets badly wrong) and, with labels, top-1 drops by ``max_top1_drop`` at most.
    """
    from fieldreid.evaluation.metrics import one_vs_all

    if fp32.shape != int8.shape or fp32.ndim != 2:
        raise InputError(f"FP32 and INT8 embeddings differ in shape: {fp32.shape} vs {int8.shape}.")
    a = fp32 / np.maximum(np.linalg.norm(fp32, axis=1, keepdims=True), 1e-12)
    b = int8 / np.maximum(np.linalg.norm(int8, axis=1, keepdims=True), 1e-12)
    b = np.nan_to_num(b)
    cos = (a * b).sum(1)
    t32 = t8 = drop = None
    if labels is not None and all(lab is not None for lab in labels) and len(set(labels)) >= 2:
        t32 = float(one_vs_all(a, list(labels))["top1"])
        t8 = float(one_vs_all(b, list(labels))["top1"])
        drop = t32 - t8
    p05 = float(np.percentile(cos, 5))
    passed = bool(cos.mean() >= min_cosine and p05 >= min_cosine_p05
                  and (drop is None or drop <= max_top1_drop + 1e-12))
    return GateResult(n=int(len(cos)), cosine_mean=float(cos.mean()), cosine_p05=p05, cosine_min=float(cos.min()),
                      top1_fp32=t32, top1_int8=t8, top1_drop=drop, min_cosine=float(min_cosine),
                      min_cosine_p05=float(min_cosine_p05), max_top1_drop=float(max_top1_drop), passed=passed)


def quantize_embedder(fp32_path: str | Path, out_path: str | Path, calib_crops: Sequence[np.ndarray],
                      val_crops: Sequence[np.ndarray], val_labels: Sequence | None = None,
                      method: str = "minmax", per_channel: bool = True,
                      min_cosine: float = DEFAULT_MIN_COSINE, max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
                      fallback: bool = True, min_calibration: int = MIN_CALIBRATION_CROPS,
                      log: Callable[[str], None] | None = None,
                      min_cosine_p05: float = DEFAULT_MIN_COSINE_P05, activations: str = "int8") -> QuantizeReport:
    """FP32 embedder ONNX -> gated INT8 QDQ ONNX at ``out_path``; raises :class:`QuantizationGateError`.

    Preprocessing comes from the FP32 model's metadata, so calibration and gate see field tensors.
    ``val_crops`` must not include calibration crops (:func:`held_out_sets` makes such a pair).
    """
    from fieldreid.embed.runtime import preprocess_images
    from fieldreid.engines.manifest import onnx_metadata
    from fieldreid.types import PreprocessSpec

    t0 = time.monotonic()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    check_calibration_count(len(calib_crops), min_calibration)
    if len(val_crops) < 2:
        raise InputError("The INT8 accuracy gate needs a validation set of at least 2 crops (labelled for top-1).")
    meta = onnx_metadata(fp32_path)
    if "fieldreid.preprocess" not in meta:
        raise ModelError(f"{fp32_path} has no fieldreid.preprocess metadata; export it with fieldreid first.")
    spec = PreprocessSpec.from_json(meta["fieldreid.preprocess"])
    calib = preprocess_images(list(calib_crops), spec)
    val = preprocess_images(list(val_crops), spec)
    ref = run_onnx(fp32_path, val)
    steps = fallback_ladder(fp32_path) if fallback else [("all layers int8", [])]
    attempts: list[dict] = []
    # Every attempt is written to a temp file beside the output; only a passing one is renamed over it.
    with atomic_output(out_path) as tmp:
        for label, exclude in steps:
            if log:
                log(f"INT8: quantising ({label}) with {len(calib)} calibration crops")
            quantize_qdq(fp32_path, tmp, calib, method, per_channel, exclude, activations=activations)
            if exclude and not _has_qdq(tmp):
                attempts.append({"step": label, "excluded_nodes": list(exclude), "gate": None,
                                 "note": "no layer left in INT8"})
                break
            gate = embedding_gate(ref, run_onnx(tmp, val), val_labels, min_cosine, max_top1_drop, min_cosine_p05)
            attempts.append({"step": label, "excluded_nodes": list(exclude), "gate": gate.to_dict()})
            if log:
                log(f"INT8 gate ({label}) on {gate.n} held-out crops: {gate.cosine_text()}"
                    + (f", top-1 {gate.top1_fp32:.3f} -> {gate.top1_int8:.3f}" if gate.top1_fp32 is not None else "")
                    + (" PASS" if gate.passed else " FAIL"))
            if gate.passed:
                _copy_metadata(fp32_path, tmp, {"fieldreid.precision": "int8-qdq", "fieldreid.int8.activations": activations,
                                                 "fieldreid.int8.excluded_nodes": ",".join(exclude)})
                return QuantizeReport(out_path, len(calib), method, per_channel, list(exclude), gate, attempts,
                                      time.monotonic() - t0)
        last = next(a["gate"] for a in reversed(attempts) if a["gate"] is not None)
        report = {"attempts": attempts, "calibration_crops": len(calib), "method": method}
        top1 = (f", one-vs-all top-1 {last['top1_fp32']:.3f} -> {last['top1_int8']:.3f} (drop {last['top1_drop']:.3f}, "
                f"allowed {max_top1_drop})" if last["top1_fp32"] is not None else "")
        raise QuantizationGateError(
            f"INT8 export refused: against FP32 on {last['n']} validation crops the embedding cosine is "
            f"{last['cosine_mean']:.4f} mean / {last['cosine_p05']:.4f} 5th percentile / {last['cosine_min']:.4f} "
            f"worst (required mean >= {min_cosine}, 5th percentile >= {min_cosine_p05}){top1}, "
            f"after {len(attempts)} attempt(s) ({'; '.join(a['step'] for a in attempts)}). Use the FP32 model, "
            "calibrate on more representative crops, or try --calib-method percentile.", report)


# ------------------------------------------------------------------------------------------ detectors
def box_agreement(ref: Sequence, test: Sequence, iou_match: float = 0.5) -> dict:
    """Greedy same-class matching of ``test`` detections to ``ref`` (FP32) ones, per image.

    ``matched_fraction``: FP32 boxes with an INT8 box of the same class at IoU >= ``iou_match``;
    ``extra_fraction``: INT8 boxes matching none; ``mean_iou`` over matched pairs.
    """
    n_ref = n_test = matched = 0
    ious: list[float] = []
    for r, t in zip(ref, test, strict=True):
        n_ref += len(r.xyxy)
        n_test += len(t.xyxy)
        iou = box_iou(np.asarray(r.xyxy, np.float32), np.asarray(t.xyxy, np.float32))
        if iou.size:
            same = np.asarray(r.class_id)[:, None] == np.asarray(t.class_id)[None, :]
            iou = np.where(same, iou, 0.0)
        used: set[int] = set()
        for i in np.argsort(-np.asarray(r.confidence)) if len(r.xyxy) else []:
            if iou.shape[1] == 0:
                break
            cand = np.where([j not in used for j in range(iou.shape[1])], iou[i], -1.0)
            j = int(np.argmax(cand))
            if cand[j] >= iou_match:
                used.add(j)
                matched += 1
                ious.append(float(cand[j]))
    return {"ref_boxes": n_ref, "test_boxes": n_test, "matched": matched,
            "matched_fraction": matched / n_ref if n_ref else 1.0,
            "extra_fraction": (n_test - matched) / n_test if n_test else 0.0,
            "mean_iou": float(np.mean(ious)) if ious else (1.0 if n_ref == 0 else 0.0)}


def _consumers(nodes) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            if name:
                out.setdefault(name, []).append(n)
    return out


def detector_fp32_nodes(onnx_path: str | Path) -> dict[str, list[str]]:
    """The nodes of a YOLO detector that INT8 must leave in FP32, by reason.

    - ``decode``: the head's output convolutions (the last Conv on each path) and everything after them. An
      exported YOLO head decodes boxes in-graph and concatenates pixel coordinates (0..640) with confidences
      (0..1) in one tensor: one INT8 scale for both rounds every confidence to 0 (measured: 0 of 23 YOLOv5n
      boxes survived when every op was quantised). The objectness logits of the head convolutions need FP32 too.
    - ``shape``: shape arithmetic (``Shape`` and what computes only from shapes and constants). A model with
      dynamic height/width computes its upsampling sizes as ``float(dim) * 2``; quantised, 15 * 2 came out as
      29.9 and the floor 29, so the feature maps no longer fit together (a QLinearConcat error at 480 x 640).
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = list(model.graph.node)
    consumers = _consumers(nodes)
    below: dict[int, bool] = {}  # node index -> a Conv lies downstream

    index = {id(n): i for i, n in enumerate(nodes)}
    for i in range(len(nodes) - 1, -1, -1):  # reverse topological order: consumers first
        below[i] = any(c.op_type == "Conv" or below.get(index[id(c)], False)
                       for o in nodes[i].output for c in consumers.get(o, []))
    heads = [n for i, n in enumerate(nodes) if n.op_type == "Conv" and not below[i]]
    decode: dict[str, None] = {}
    stack = list(heads)
    while stack:
        n = stack.pop()
        if n.name in decode:
            continue
        decode[n.name] = None
        stack += [c for o in n.output for c in consumers.get(o, [])]
    static = {i.name for i in model.graph.initializer}
    shape: list[str] = []
    for n in nodes:
        inputs = [i for i in n.input if i]
        if n.op_type == "Constant":
            static.update(n.output)
        elif n.op_type == "Shape" or (inputs and all(i in static for i in inputs)):
            static.update(n.output)
            shape.append(n.name)
    order = [n.name for n in nodes]
    return {"decode": [name for name in order if name in decode and name],
            "shape": [name for name in shape if name and name not in decode]}


def detector_fallback_ladder(onnx_path: str | Path) -> list[tuple[str, list[str]]]:
    """Steps of a detector's INT8 attempts: the decode and shape arithmetic always in FP32
    (:func:`detector_fp32_nodes`), then also the first ``n/12`` and ``n/4`` convolutions (YOLOv5n: 5 and 15 of
    60, layers 0-2 and 0-4). Measured on YOLOv5n at 480 x 640: every layer INT8 found 71 % of the FP32 boxes
    again, layers 0-4 in FP32 95 %; the neck alone in INT8 95 % but no faster (README *Issue 17*): like
    EfficientNet's, YOLO's early, high-resolution activations are where INT8 breaks."""
    keep = detector_fp32_nodes(onnx_path)
    base = keep["decode"] + keep["shape"]
    steps = [("all layers int8 but the decode", base)]
    convs = [name for name, _ in conv_nodes(onnx_path) if name and name not in keep["decode"]]
    seen: set[int] = set()
    for k in (max(1, len(convs) // 12), max(1, len(convs) // 4)):
        if k in seen or k >= len(convs):
            continue
        seen.add(k)
        steps.append((f"first {k} of {len(convs)} convs and the decode in fp32", base + convs[:k]))
    return steps


def _shape_groups(images: Sequence[np.ndarray], det) -> list[list[int]]:
    """Indices of ``images`` grouped by the input shape ``det`` letterboxes them to, biggest group first."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(det.input_shape(img.shape[:2]), []).append(i)
    return sorted(groups.values(), key=len, reverse=True)


def quantize_detector(fp32_path: str | Path, out_path: str | Path, calib_images: Sequence[np.ndarray],
                      val_images: Sequence[np.ndarray], min_matched: float = 0.95, min_iou: float = 0.85,
                      conf: float = 0.2, method: str = "minmax", per_channel: bool = True,
                      min_calibration: int = MIN_CALIBRATION_CROPS,
                      log: Callable[[str], None] | None = None, activations: str = "int8",
                      fallback: bool = True) -> dict:
    """Detector ONNX -> INT8 QDQ ONNX, kept only if its boxes agree with FP32 on ``val_images``.

    The gate (:func:`box_agreement` at ``conf``): at least ``min_matched`` of the FP32 boxes found again
    (same class, IoU >= 0.5) with mean IoU >= ``min_iou``. The decode and shape arithmetic stay FP32
    (:func:`detector_fp32_nodes`); with ``fallback`` the early convolutions follow, step by step
    (:func:`detector_fallback_ladder`), until an attempt passes; else :class:`QuantizationGateError` says so in
    one sentence and no file is written. Calibration sees what the detector feeds the model: its letterbox, at
    each frame's rectangle for a dynamic-shape model (the histogram methods need one shape: they calibrate on
    the square). ``activations``: ``"int8"`` symmetric, convolutions only (TensorRT's Q/DQ placement) or
    ``"uint8"`` (ONNX Runtime's CPU kernels: every op but the FP32 nodes, so that convolution, SiLU, concat,
    add and resize fuse into QLinear kernels). A passing model is timed against FP32 on this CPU
    (``speed_vs_fp32_here``); ``verdict`` is one sentence saying whether INT8 pays here.
    """
    from fieldreid.detect import Detector
    from fieldreid.detect.letterbox import preprocess

    if activations not in ACTIVATION_TYPES:
        raise InputError(f"INT8 activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}.")
    t0 = time.monotonic()
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    check_calibration_count(len(calib_images), min_calibration)
    if not val_images:
        raise InputError("The detector INT8 gate needs validation images (real camera-trap frames).")
    with Detector(fp32_path, backend="onnxruntime", conf=conf) as det:
        spec, stride = det.preprocess_spec, det.stride  # calibrate on exactly what the detector feeds the model
        ref = det.detect(list(val_images))
        rect = det.rect and method == "minmax"
        calib = ([preprocess([calib_images[i] for i in g], stride=stride, spec=spec, rect=True)[0]
                  for g in _shape_groups(calib_images, det)] if rect
                 else preprocess(list(calib_images), stride=stride, spec=spec)[0])
        timing_group = _shape_groups(val_images, det)[0]
        timing = preprocess([val_images[i] for i in timing_group[:4]], stride=stride, spec=spec, rect=det.rect)[0]
    n_calib = len(calib) if isinstance(calib, np.ndarray) else sum(len(c) for c in calib)
    steps = detector_fallback_ladder(fp32_path)
    if not fallback:
        steps = steps[:1]
    op_types = ("Conv",) if activations == "int8" else None
    attempts: list[dict] = []
    with atomic_output(out_path) as tmp:
        for label, exclude in steps:
            if log:
                log(f"INT8 detector ({activations} activations): quantising ({label}) with {n_calib} calibration "
                    "frames")
            quantize_qdq(fp32_path, tmp, calib, method, per_channel, exclude, batch_size=4, op_types=op_types,
                         activations=activations)
            _copy_metadata(fp32_path, tmp, {"fieldreid.precision": "int8-qdq",
                                             "fieldreid.int8.activations": activations,
                                             "fieldreid.int8.excluded_nodes": ",".join(exclude)})
            with Detector(tmp, backend="onnxruntime", conf=conf) as det8:
                got = det8.detect(list(val_images))
            agree = box_agreement(ref, got)
            agree["passed"] = bool(agree["matched_fraction"] >= min_matched and agree["mean_iou"] >= min_iou)
            attempts.append({"step": label, "fp32_nodes": len(exclude), **agree})
            if log:
                log(f"INT8 detector gate ({label}): {agree['matched']} of {agree['ref_boxes']} FP32 boxes found again "
                    f"({agree['matched_fraction']:.1%}), mean IoU {agree['mean_iou']:.3f}"
                    + (" PASS" if agree["passed"] else " FAIL"))
            if agree["passed"]:
                break
        last = attempts[-1]
        result = {**{k: v for k, v in last.items() if k not in ("step", "fp32_nodes")},
                  "min_matched_fraction": min_matched, "min_mean_iou": min_iou, "conf": conf,
                  "calibration_frames": n_calib, "validation_frames": len(val_images), "activations": activations,
                  "calibration_shapes": ([list(c.shape[2:]) for c in calib] if not isinstance(calib, np.ndarray)
                                         else [list(calib.shape[2:])]),
                  "step": last["step"], "attempts": attempts}
        if not last["passed"]:
            raise QuantizationGateError(
                f"INT8 detector refused: against FP32 on {len(val_images)} frames at most "
                f"{max(a['matched_fraction'] for a in attempts):.1%} of {last['ref_boxes']} boxes are found again "
                f"(need {min_matched:.0%}, mean IoU {min_iou}) after {len(attempts)} attempt(s) "
                f"({'; '.join(a['step'] for a in attempts)}): keep the FP32 detector.", result)
        speed = speed_vs_fp32(fp32_path, tmp, timing, rounds=5, batch_size=len(timing))
        result["speed_vs_fp32_here"] = {**speed, "input": list(timing.shape[2:])}
        result["verdict"] = detector_int8_verdict(speed, activations)
        result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def detector_int8_verdict(speed: dict, activations: str) -> str:
    """One sentence: does this INT8 detector pay on this CPU?"""
    vnni = "AVX-512 VNNI" if speed.get("avx512_vnni") else "AVX-VNNI" if speed.get("avx_vnni") else "no VNNI"
    head = (f"INT8 detector on ONNX Runtime CPU here ({vnni}): {speed['speedup']:.2f}x FP32 throughput "
            f"({speed['int8_ms_per_item']:.1f} vs {speed['fp32_ms_per_item']:.1f} ms/image)")
    if speed["speedup"] > 1.0:
        return head + "."
    return head + (" — slower than FP32: on this CPU keep the FP32 detector"
                   + (" (symmetric int8 activations are TensorRT's form; uint8 activations are ONNX Runtime's)"
                      if activations == "int8" else "") + ".")
