"""`make bench` v1: fieldreid's ONNX Runtime path against the route a user would write by hand.

Every ratio is measured in one run, interleaving the two routes image by image, so that a noisy shared
machine slows both alike. Results go to bench/results.json and bench/RESULTS.md.

    python bench/bench_runtime.py --shared ../shared --out bench/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # yolov5's torch.cuda.amp notices, once per call
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_CONFIG_DIR", str(ROOT / ".cache" / "ultralytics"))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fieldreid.crop import cut  # noqa: E402
from fieldreid.defaults import default_model  # noqa: E402
from fieldreid.detect import Detector  # noqa: E402
from fieldreid.embed.runtime import Embedder  # noqa: E402
from fieldreid.frames.decode import iter_files, read_image  # noqa: E402

THREADS = 2
SECTIONS = ("decode", "reduced_accuracy", "detector", "detector_rect", "embedder", "preprocess", "int8", "detector_int8")


def _ms(samples: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(samples), 2),
            "mean_ms": round(1000 * statistics.fmean(samples), 2), "n": len(samples)}


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def camtrap_jpegs(shared: Path) -> list[Path]:
    files = [p for p in iter_files([shared / "data" / "camtrap"])
             if p.suffix.lower() in (".jpg", ".jpeg") and p.stat().st_size > 0]
    return files


def bench_decode(files: list[Path]) -> dict:
    full, reduced, megapixels, factors = [], [], [], []
    for p in files:
        data = p.read_bytes()
        buf = np.frombuffer(data, np.uint8)
        t_full, img = _timed(cv2.imdecode, buf, cv2.IMREAD_COLOR)
        t_red, frame = _timed(lambda d=data, q=p: read_image(q, min_side=640, data=d))
        full.append(t_full)
        reduced.append(t_red)
        megapixels.append(img.shape[0] * img.shape[1] / 1e6)
        factors.append(frame.reduction)
    out = {"images": len(files), "mean_megapixels": round(statistics.fmean(megapixels), 2)}
    big = [i for i, mp in enumerate(megapixels) if mp >= 5.0]
    for label, idx in (("all", range(len(files))), ("ge_5mp", big)):
        if not idx:
            continue
        f = [full[i] for i in idx]
        r = [reduced[i] for i in idx]
        out[label] = {"images": len(f), "mean_megapixels": round(statistics.fmean(megapixels[i] for i in idx), 2),
                      "full_decode": _ms(f), "reduced_decode": _ms(r),
                      "speedup_median": round(statistics.median(f) / statistics.median(r), 2),
                      "total_full_s": round(sum(f), 2), "total_reduced_s": round(sum(r), 2)}
    out["reduction_factors"] = {str(k): factors.count(k) for k in sorted(set(factors))}
    return out


def bench_reduced_accuracy(files: list[Path], detector_onnx: Path) -> dict:
    """Judge the reduced decode on its own: does the detector find the same animals, with the same boxes?"""
    from fieldreid.detect import box_iou

    det = Detector(detector_onnx, backend="onnxruntime", conf=0.1, threads=THREADS)
    pairs = []
    for p in files:
        full, red = read_image(p), read_image(p, min_side=640)
        if red.reduction == 1:
            continue
        a, b = det.detect([full.pixels])[0], det.detect([red.pixels])[0]
        sy, sx = red.scale
        pairs.append((a.xyxy[a.category == 1], a.confidence[a.category == 1],
                      b.xyxy[b.category == 1] * np.array([sx, sy, sx, sy], np.float32), b.confidence[b.category == 1]))
    out: dict = {"images_decoded_reduced": len(pairs), "by_confidence": {}}
    for thr in (0.2, 0.3, 0.4, 0.5):
        total = found = iou90 = 0
        ious = []
        for A, Ac, B, Bc in pairs:
            for X, Xc, Y in ((A, Ac, B), (B, Bc, A)):  # both directions: nothing lost, nothing invented
                for i in np.flatnonzero(Xc >= thr):
                    total += 1
                    best = float(box_iou(X[i:i + 1], Y).max()) if len(Y) else 0.0
                    ious.append(best)
                    found += best >= 0.5
                    iou90 += best >= 0.9
        out["by_confidence"][str(thr)] = {"animal_boxes": total, "found_iou_0.5": found, "iou_ge_0.9": iou90,
                                          "min_iou": round(min(ious), 3) if ious else None,
                                          "median_iou": round(float(np.median(ious)), 3) if ious else None}
    return out


def bench_detector(files: list[Path], detector_onnx: Path, yolov5_pt: Path | None) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    ours = Detector(detector_onnx, backend="onnxruntime", conf=0.1, iou=0.45, threads=THREADS)
    # rect: each frame at its own stride-multiple rectangle (as AutoShape does) when the model's input is dynamic
    result: dict = {"model": ours.model_id, "input": list(ours.input_size), "rect": ours.rect}
    naive = None
    if yolov5_pt is not None and yolov5_pt.exists():
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        import yolov5

        naive = yolov5.load(str(yolov5_pt), device="cpu")
        naive.conf, naive.iou = 0.1, 0.45
    images = [cv2.imread(str(p)) for p in files]
    # warm-up both routes
    ours.detect([images[0]])
    if naive is not None:
        naive(images[0][:, :, ::-1], size=640)
    t_ours, t_naive, t_ours_e2e, t_naive_e2e = [], [], [], []
    for p, img in zip(files, images, strict=True):
        t_ours.append(_timed(ours.detect, [img])[0])
        t_ours_e2e.append(_timed(lambda q=p: ours.detect([read_image(q, min_side=640).pixels]))[0])
        if naive is not None:
            rgb = np.ascontiguousarray(img[:, :, ::-1])
            t_naive.append(_timed(lambda x=rgb: naive(x, size=640))[0])
            t_naive_e2e.append(_timed(lambda q=p: naive(str(q), size=640))[0])
    result["fieldreid_ort_same_pixels"] = _ms(t_ours)
    result["fieldreid_ort_file_to_boxes"] = _ms(t_ours_e2e)
    if naive is not None:
        result["naive_yolov5_predict_same_pixels"] = _ms(t_naive)
        result["naive_yolov5_predict_file_to_boxes"] = _ms(t_naive_e2e)
        result["speedup_same_pixels"] = round(statistics.median(t_naive) / statistics.median(t_ours), 2)
        result["speedup_file_to_boxes"] = round(statistics.median(t_naive_e2e) / statistics.median(t_ours_e2e), 2)
    return result


def real_crops(shared: Path, n: int) -> list[np.ndarray]:
    meta = shared / "data" / "reid" / "nyala" / "metadata.csv"
    import csv

    with meta.open() as fh:
        rows = list(csv.DictReader(fh))[:n]
    crops = []
    for r in rows:
        img = read_image(meta.parent / r["path"]).pixels
        h, w = img.shape[:2]
        crops.append(cut(img, (0.0, 0.0, float(w), float(h))))  # the crop rule's whole-image box
    return crops


def bench_embedder(shared: Path, embedder_onnx: Path, n: int = 48) -> dict:
    import torch

    from fieldreid.embed.model import build_default_embedder

    torch.set_num_threads(THREADS)
    ours = Embedder(embedder_onnx, backend="onnxruntime", threads=THREADS)
    net, spec, _ = build_default_embedder()
    net.eval()
    crops = real_crops(shared, n)
    h, w = spec.size
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    import torchvision.transforms.v2.functional as TF

    def naive(batch: list[np.ndarray]) -> np.ndarray:
        # What a timm user writes: torchvision resize (bilinear, antialias), normalise, eager forward.
        xs = [TF.resize(torch.from_numpy(np.ascontiguousarray(c[:, :, ::-1])).permute(2, 0, 1).float(),
                        [h, w], antialias=True) for c in batch]
        t = (torch.stack(xs) / 255.0 - mean) / std
        with torch.inference_mode():
            return net(t).numpy()

    ours.embed(crops[:2])
    naive(crops[:2])
    res = {"model": ours.model_id, "input": [h, w], "dim": ours.dim}
    for bs in (1, 16):
        t_o, t_n = [], []
        for i in range(0, len(crops) - bs + 1, bs):
            b = crops[i:i + bs]
            t_o.append(_timed(ours.embed, b)[0] / bs)
            t_n.append(_timed(naive, b)[0] / bs)
        res[f"batch{bs}"] = {"fieldreid_ort_per_crop": _ms(t_o), "naive_timm_eager_per_crop": _ms(t_n),
                             "speedup": round(statistics.median(t_n) / statistics.median(t_o), 2)}
    a, b = ours.embed(crops[:16]), naive(crops[:16])
    res["cosine_ort_vs_torch_min"] = round(float(np.min(np.sum(a * b, axis=1))), 6)
    return res


def camtrap_box_crops(shared: Path, n: int) -> list[np.ndarray]:
    """Animal boxes (MegaDetector v5a, conf >= 0.2) cut by the crop rule from full-size camera-trap frames."""
    import csv

    folder = shared / "data" / "camtrap" / "animl-southwest"
    boxes = folder / "megadetector_v5a_boxes.csv"
    crops: list[np.ndarray] = []
    if not boxes.is_file():
        return crops
    with boxes.open() as fh:
        for row in csv.DictReader(fh):
            if len(crops) >= n or not row["conf"] or float(row["conf"]) < 0.2:
                continue
            img = cv2.imread(str(folder / row["FileName"]))
            if img is None:
                continue
            H, W = img.shape[:2]
            x, y, bw, bh = (float(row[k]) for k in ("bbox1", "bbox2", "bbox3", "bbox4"))
            crops.append(cut(img, (x * W, y * H, (x + bw) * W, (y + bh) * H)))
    return crops


def bench_preprocess(shared: Path, embedder_onnx: Path, n: int = 64) -> dict:
    """Embedder preprocessing per crop: the exact float32 numpy resize vs the C resize (interleaved), the model's
    own time per crop at batch 16, and the embedding cosine between the two routes (target: >= 0.999, and
    preprocessing <= 25 % of embedding time)."""
    from fieldreid.embed.runtime import preprocess_images

    emb = Embedder(embedder_onnx, backend="onnxruntime", threads=THREADS)
    spec = emb.preprocess_spec
    crops = real_crops(shared, n) + camtrap_box_crops(shared, n // 2)
    t_exact, t_fast = [], []
    for c in crops:
        t_exact.append(_timed(lambda x: preprocess_images(x, spec, exact=True), [c])[0])
        t_fast.append(_timed(lambda x: preprocess_images(x, spec), [c])[0])
    x = preprocess_images(crops, spec, exact=True)
    emb.embed_tensor(x[:16])
    t_model = [_timed(emb.embed_tensor, x[i:i + 16])[0] / 16 for i in range(0, len(x) - 15, 16)]
    a, b = emb.embed_tensor(x), emb.embed_tensor(preprocess_images(crops, spec))
    cos = np.sum(a * b, axis=1)
    model = statistics.median(t_model)
    # Issue 17's target: preprocessing <= 25 % of the embedding time per crop (preprocessing + model at batch 16),
    # by the medians and by the totals over these crops (large crops weigh more in the totals).
    share_median = statistics.median(t_fast) / (statistics.median(t_fast) + model)
    share_total = sum(t_fast) / (sum(t_fast) + model * len(t_fast))
    return {"crops": len(crops), "mean_megapixels": round(float(np.mean([c.shape[0] * c.shape[1] for c in crops]) / 1e6), 3),
            "exact_numpy_per_crop": _ms(t_exact), "c_resize_per_crop": _ms(t_fast),
            "speedup": round(statistics.median(t_exact) / statistics.median(t_fast), 2),
            "model_per_crop_batch16": _ms(t_model),
            "c_resize_share_of_embedding": round(share_median, 3),
            "preprocess_share_of_embedding": {"median_crop": round(share_median, 3), "all_crops": round(share_total, 3),
                                              "target_max": 0.25, "meets_target": bool(max(share_median, share_total)
                                                                                        <= 0.25)},
            "cosine_c_vs_exact_min": round(float(cos.min()), 6), "cosine_c_vs_exact_mean": round(float(cos.mean()), 6)}


def bench_int8(shared: Path, embedder_onnx: Path, n: int = 96) -> dict:
    """INT8 embedder on ONNX Runtime CPU: U8S8 (the cpu-int8 profile) and S8S8 (TensorRT's symmetric form) vs
    FP32, timed alternately at batch 16, with the cosine to FP32 on crops not used for calibration and the CPU's
    INT8 flags (target: >= 1.3x FP32 on a VNNI CPU)."""
    import tempfile

    from fieldreid.embed.runtime import preprocess_images
    from fieldreid.engines.ort import OnnxRuntimeEngine, cpu_int8_flags
    from fieldreid.export.quantize import quantize_qdq

    spec = Embedder(embedder_onnx, backend="onnxruntime").preprocess_spec
    x = preprocess_images(real_crops(shared, n), spec)
    calib, val = x[: n * 2 // 3], x[n * 2 // 3:]
    res: dict = {"cpu_flags": cpu_int8_flags(), "calibration_crops": len(calib), "validation_crops": len(val)}
    with tempfile.TemporaryDirectory(prefix="fieldreid-bench-int8-") as tmp:
        paths = {"fp32": embedder_onnx}
        for act in ("uint8", "int8"):
            paths[act] = quantize_qdq(embedder_onnx, Path(tmp) / f"{act}.onnx", calib, activations=act)
        engines = {k: OnnxRuntimeEngine(p, device="cpu", threads=THREADS) for k, p in paths.items()}
        batch = np.ascontiguousarray(val[:16])
        times: dict[str, list[float]] = {k: [] for k in engines}
        for eng in engines.values():
            eng.run(batch)
        for _ in range(7):
            for k, eng in engines.items():
                times[k].append(_timed(eng.run, batch)[0] / len(batch))
        outs = {}
        for k, eng in engines.items():
            v = np.concatenate([next(iter(eng.run(val[i:i + 16]).values())) for i in range(0, len(val), 16)])
            outs[k] = v / np.linalg.norm(v, axis=1, keepdims=True)
            eng.close()
    fp32 = statistics.median(times["fp32"])
    for k in ("fp32", "uint8", "int8"):
        cos = np.sum(outs[k] * outs["fp32"], axis=1)
        res[k] = {"per_crop_batch16": _ms(times[k]), "throughput_vs_fp32": round(fp32 / statistics.median(times[k]), 2),
                  "cosine_to_fp32_mean": round(float(cos.mean()), 5), "cosine_to_fp32_min": round(float(cos.min()), 5)}
    return res


def megadetector_animals(shared: Path, min_conf: float = 0.5) -> dict[Path, np.ndarray]:
    """MegaDetector v5's animal boxes (conf >= ``min_conf``) shipped with three animl sets, as normalised xyxy per
    image: machine output, not human truth, but a far larger detector's; a yardstick for yolov5n variants."""
    import csv

    sets = (("animl-southwest", "megadetector_v5a_boxes.csv", ("FileName", "bbox1", "bbox2", "bbox3", "bbox4")),
            ("animl-buow", "megadetector_boxes.csv", ("filename", "bbox_x", "bbox_y", "bbox_w", "bbox_h")),
            ("animl-jaguar", "reid_manifest.csv", ("filename", "bbox_x", "bbox_y", "bbox_w", "bbox_h")))
    out: dict[Path, list] = {}
    for folder, name, keys in sets:
        table = shared / "data" / "camtrap" / folder / name
        if not table.is_file():
            continue
        with table.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("category") != "1" or not row.get("conf") or float(row["conf"]) < min_conf:
                    continue
                x, y, w, h = (float(row[k]) for k in keys[1:])
                out.setdefault(table.parent / row[keys[0]], []).append([x, y, x + w, y + h])
    return {p: np.asarray(v, np.float32) for p, v in out.items() if p.is_file()}


def bench_detector_rect(files: list[Path], detector_onnx: Path, shared: Path | None = None) -> dict:
    """The detector at each frame's smallest stride-multiple rectangle vs the 640 x 640 square, the same model
    file and pixels (the reduced decode watch uses), interleaved per image; and whether they find the same
    confident boxes (>= 0.5, same category, IoU >= 0.9, found at conf >= 0.1 on the other side)."""
    from fieldreid.detect import box_iou

    sq = Detector(detector_onnx, backend="onnxruntime", conf=0.1, threads=THREADS, rect=False)
    if not sq.dynamic_shape:
        return {"model": sq.model_id, "skipped": "the detector's input is fixed at "
                f"{sq.input_size[0]}x{sq.input_size[1]}: rebuild it with `make models` (dynamic height/width)"}
    rc = Detector(detector_onnx, backend="onnxruntime", conf=0.1, threads=THREADS)
    images = [read_image(p, min_side=640).pixels for p in files]
    sq.detect([images[0]])
    rc.detect([images[0]])
    t_sq, t_rc, shapes = [], [], {}
    found = {"square": [0, 0], "rect": [0, 0]}
    crossing, worst = 0, 1.0
    for img in images:
        shape = "x".join(map(str, rc.input_shape(img.shape[:2])))
        shapes[shape] = shapes.get(shape, 0) + 1
        ta, a = _timed(sq.detect, [img])
        tb, b = _timed(rc.detect, [img])
        t_sq.append(ta)
        t_rc.append(tb)
        a, b = a[0], b[0]
        for key, x, y in (("square", a, b), ("rect", b, a)):
            for i in np.flatnonzero(x.confidence >= 0.5):
                same = y.category == x.category[i]
                best = float(box_iou(x.xyxy[i:i + 1], y.xyxy[same]).max()) if same.any() else 0.0
                found[key][0] += 1
                found[key][1] += best >= 0.9
                worst = min(worst, best)
        crossing += int((a.confidence >= 0.5).sum() != (b.confidence >= 0.5).sum())
    md: dict = {}
    truth = megadetector_animals(shared) if shared is not None else {}
    if truth:
        # MegaDetector's animal boxes found (IoU >= 0.5) by yolov5n's animal boxes at each threshold, both inputs
        low_sq = Detector(detector_onnx, backend="onnxruntime", conf=0.05, threads=THREADS, rect=False)
        low_rc = Detector(detector_onnx, backend="onnxruntime", conf=0.05, threads=THREADS)
        thresholds = (0.1, 0.2, 0.3, 0.4, 0.5)
        found_md = {"square": [0] * len(thresholds), "rect": [0] * len(thresholds)}
        n_md = 0
        for path, boxes in truth.items():
            img = read_image(path, min_side=640).pixels
            h, w = img.shape[:2]
            t = boxes * np.array([w, h, w, h], np.float32)
            n_md += len(t)
            for key, det in (("square", low_sq), ("rect", low_rc)):
                d = det.detect_one(img)
                for k, thr in enumerate(thresholds):
                    mine = d.xyxy[(d.category == 1) & (d.confidence >= thr)]
                    found_md[key][k] += int((box_iou(t, mine).max(1) >= 0.5).sum()) if len(mine) else 0
        md = {"images": len(truth), "animal_boxes": n_md, "found_iou_0.5_at_conf": {
            key: dict(zip(map(str, thresholds), v, strict=True)) for key, v in found_md.items()}}
    return {"model": rc.model_id, "images": len(images), "input_shapes": shapes,
            "megadetector_v5_animals_conf_0.5": md,
            "square_640": _ms(t_sq), "rect": _ms(t_rc),
            "speedup": round(statistics.median(t_sq) / statistics.median(t_rc), 2),
            "confident_boxes_found_again": {k: {"boxes": v[0], "found": v[1]} for k, v in found.items()},
            "worst_iou": round(worst, 3), "frames_with_a_box_crossing_0.5": crossing,
            "note": "rect = YOLOv5's own rect letterbox (tests/test_detect_rect.py: same boxes as the yolov5 "
                    "package's AutoShape predict); scores move by up to ~0.2 between the two paddings, so a count "
                    "at one threshold can differ"}


def bench_detector_int8(shared: Path, detector_onnx: Path) -> dict:
    """Detector INT8 on ONNX Runtime CPU, through the export's own gate (:func:`quantize_detector`, fallback
    ladder, held-out camera-trap frames), for uint8 activations (ONNX Runtime's form) and int8 (TensorRT's);
    and, gate or not, the speed of each ladder step's model against FP32 (same CPU, timed alternately), so that
    "faster?" has an answer even where the gate refuses. For scale: FP32 at the square against FP32 at the
    rectangle, scored by the same gate on the same frames."""
    import tempfile

    from fieldreid.detect.letterbox import preprocess
    from fieldreid.engines.ort import cpu_int8_flags
    from fieldreid.export.quantize import (
        QuantizationGateError,
        box_agreement,
        detector_fallback_ladder,
        held_out_sets,
        quantize_detector,
        quantize_qdq,
        read_crops,
        speed_vs_fp32,
    )

    sets = held_out_sets(shared / "data" / "camtrap", calib_limit=256, val_limit=200)
    calib, _ = read_crops(sets.calib, max_side=1600)
    val, _ = read_crops(sets.val, max_side=1600)
    res: dict = {"cpu_flags": cpu_int8_flags(), "calibration_frames": len(calib), "validation_frames": len(val),
                 "held_out": sets.info["validation"]["held_out"]}
    with Detector(detector_onnx, backend="onnxruntime", conf=0.2, threads=THREADS) as rc, \
            Detector(detector_onnx, backend="onnxruntime", conf=0.2, threads=THREADS, rect=False) as sq:
        if rc.rect:
            res["fp32_square_vs_rect_by_the_gate"] = box_agreement(rc.detect(val), sq.detect(val))
        groups: dict = {}
        for img in calib:
            groups.setdefault(rc.input_shape(img.shape[:2]), []).append(img)
        batches = [preprocess(g, stride=rc.stride, spec=rc.preprocess_spec, rect=rc.rect)[0] for g in groups.values()]
        common = max(groups, key=lambda k: len(groups[k]))
        timing = preprocess(groups[common][:4], stride=rc.stride, spec=rc.preprocess_spec, rect=rc.rect)[0]
    ladder = detector_fallback_ladder(detector_onnx)
    with tempfile.TemporaryDirectory(prefix="fieldreid-bench-det-int8-") as tmp:
        for act in ("uint8", "int8"):
            row: dict = {}
            try:
                rep = quantize_detector(detector_onnx, Path(tmp) / f"{act}.onnx", calib, val, activations=act)
                row["gate"] = "pass"
                row["verdict"] = rep["verdict"]
            except QuantizationGateError as exc:
                rep = exc.report
                row["gate"] = "refused"
                row["verdict"] = str(exc)
            row["attempts"] = [{k: a[k] for k in ("step", "matched", "ref_boxes", "matched_fraction", "mean_iou",
                                                  "passed")} for a in rep["attempts"]]
            steps = []
            for label, exclude in ladder:
                q = quantize_qdq(detector_onnx, Path(tmp) / f"{act}-step.onnx", batches, nodes_to_exclude=exclude,
                                 batch_size=4, op_types=("Conv",) if act == "int8" else None, activations=act)
                sp = speed_vs_fp32(detector_onnx, q, timing, rounds=7, batch_size=len(timing))
                steps.append({"step": label, "speedup": sp["speedup"], "fp32_ms_per_image": sp["fp32_ms_per_item"],
                              "int8_ms_per_image": sp["int8_ms_per_item"]})
            row["speed_by_step"] = steps
            row["input"] = list(timing.shape[2:])
            res[act] = row
    return res


def write_markdown(results: dict, path: Path) -> None:
    d, det, emb = results.get("decode", {}), results.get("detector", {}), results.get("embedder", {})
    lines = [f"# Benchmark results ({results['when']}, {results['machine']})", ""]
    for key, label in (("all", "all camtrap JPEGs"), ("ge_5mp", "JPEGs of 5 MP or more")):
        if key in d:
            r = d[key]
            lines += [f"| image decode, {label} ({r['images']}, mean {r['mean_megapixels']} MP) | median ms |",
                      "|---|---|",
                      f"| full size (cv2.imdecode) | {r['full_decode']['median_ms']} |",
                      f"| reduced for a 640 detector (DCT scaling) | {r['reduced_decode']['median_ms']} |",
                      f"| speed-up | {r['speedup_median']}x |", ""]
    acc = results.get("reduced_accuracy")
    if acc:
        lines += [f"Reduced vs full decode, same detector, {acc['images_decoded_reduced']} images decoded reduced "
                  "(animal boxes compared both ways):", "",
                  "| animals at conf >= | boxes | found (IoU >= 0.5) | IoU >= 0.9 | min IoU |", "|---|---|---|---|---|"]
        for thr, r in acc["by_confidence"].items():
            lines.append(f"| {thr} | {r['animal_boxes']} | {r['found_iou_0.5']} | {r['iou_ge_0.9']} | {r['min_iou']} |")
        lines.append("")
    if det:
        lines += ["| detector, per image, 2 threads | median ms |", "|---|---|",
                  f"| fieldreid ONNX Runtime, same pixels | {det['fieldreid_ort_same_pixels']['median_ms']} |"]
        if "naive_yolov5_predict_same_pixels" in det:
            lines += [f"| yolov5 `predict` (AutoShape, eager torch), same pixels | "
                      f"{det['naive_yolov5_predict_same_pixels']['median_ms']} |",
                      f"| speed-up | {det['speedup_same_pixels']}x |",
                      f"| fieldreid, file → boxes (reduced decode) | {det['fieldreid_ort_file_to_boxes']['median_ms']} |",
                      f"| yolov5 `predict(path)`, file → boxes | {det['naive_yolov5_predict_file_to_boxes']['median_ms']} |",
                      f"| speed-up | {det['speedup_file_to_boxes']}x |"]
        lines.append("")
    if emb:
        lines += ["| embedder per crop, 2 threads | fieldreid ORT ms | timm eager ms | speed-up |", "|---|---|---|---|"]
        for bs in (1, 16):
            r = emb[f"batch{bs}"]
            lines.append(f"| batch {bs} | {r['fieldreid_ort_per_crop']['median_ms']} | "
                         f"{r['naive_timm_eager_per_crop']['median_ms']} | {r['speedup']}x |")
        lines += ["", f"ORT vs torch embedding cosine (min over 16 crops): {emb['cosine_ort_vs_torch_min']}", ""]
    pre = results.get("preprocess")
    if pre:
        lines += [f"Embedder preprocessing per crop ({pre['crops']} crops, mean {pre['mean_megapixels']} MP): exact numpy "
                  f"{pre['exact_numpy_per_crop']['median_ms']} ms, C resize {pre['c_resize_per_crop']['median_ms']} ms "
                  f"({pre['speedup']}x), model {pre['model_per_crop_batch16']['median_ms']} ms at batch 16; C resize "
                  f"{pre['c_resize_share_of_embedding']:.0%} of embedding time; cosine to exact min "
                  f"{pre['cosine_c_vs_exact_min']}", ""]
    q = results.get("int8")
    if q:
        flags = ", ".join(k for k, v in q["cpu_flags"].items() if v is True) or "none"
        lines += [f"| INT8 embedder, ORT CPU, batch 16 ({q['cpu_flags']['cpu']}; {flags}) | ms/crop | vs FP32 | "
                  "cosine mean / min |", "|---|---|---|---|"]
        for k, label in (("fp32", "FP32"), ("uint8", "U8S8 (cpu-int8)"), ("int8", "S8S8 (TensorRT form)")):
            r = q[k]
            lines.append(f"| {label} | {r['per_crop_batch16']['median_ms']} | {r['throughput_vs_fp32']}x | "
                         f"{r['cosine_to_fp32_mean']} / {r['cosine_to_fp32_min']} |")
        lines.append("")
    rect = results.get("detector_rect")
    if rect and "skipped" not in rect:
        shapes = ", ".join(f"{k} ({v})" for k, v in sorted(rect["input_shapes"].items(), key=lambda kv: -kv[1]))
        f = rect["confident_boxes_found_again"]
        lines += ["| detector input, per image, 2 threads, same pixels | median ms |", "|---|---|",
                  f"| 640 x 640 square | {rect['square_640']['median_ms']} |",
                  f"| rectangle ({shapes}) | {rect['rect']['median_ms']} |", f"| speed-up | {rect['speedup']}x |", "",
                  f"Confident boxes (>= 0.5) found again at IoU >= 0.9: square {f['square']['found']}/"
                  f"{f['square']['boxes']}, rectangle {f['rect']['found']}/{f['rect']['boxes']} (worst IoU "
                  f"{rect['worst_iou']}); {rect['frames_with_a_box_crossing_0.5']} frames have a box crossing 0.5.",
                  ""]
        md = rect.get("megadetector_v5_animals_conf_0.5")
        if md:
            found = md["found_iou_0.5_at_conf"]
            lines += [f"MegaDetector v5's {md['animal_boxes']} animal boxes (conf >= 0.5, {md['images']} images) found "
                      "by yolov5n's animal boxes (IoU >= 0.5):", "",
                      "| yolov5n conf >= | " + " | ".join(found["square"]) + " |",
                      "|---|" + "---|" * len(found["square"]),
                      "| square | " + " | ".join(str(v) for v in found["square"].values()) + " |",
                      "| rectangle | " + " | ".join(str(v) for v in found["rect"].values()) + " |", ""]
    elif rect:
        lines += [f"Rectangular letterbox: {rect['skipped']}.", ""]
    dq = results.get("detector_int8")
    if dq:
        base = dq.get("fp32_square_vs_rect_by_the_gate")
        lines += [f"Detector INT8, ORT CPU ({dq['calibration_frames']} calibration frames, {dq['validation_frames']} "
                  "held out; gate: >= 95 % of FP32 boxes at conf 0.2 found again):", "",
                  "| activations | ladder step | boxes found again | INT8 vs FP32 speed |", "|---|---|---|---|"]
        for act in ("uint8", "int8"):
            r = dq[act]
            for att, sp in zip(r["attempts"], r["speed_by_step"], strict=False):
                lines.append(f"| {act} | {att['step']} | {att['matched']}/{att['ref_boxes']} "
                             f"({att['matched_fraction']:.0%}) | {sp['speedup']}x |")
        lines += [""] + [f"- {act}: {dq[act]['verdict']}" for act in ("uint8", "int8")]
        if base:
            lines.append(f"- For scale, FP32 at the square scored against FP32 at the rectangle by the same gate: "
                         f"{base['matched']}/{base['ref_boxes']} ({base['matched_fraction']:.0%}).")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N camtrap images")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all): " + ", ".join(SECTIONS))
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if only - set(SECTIONS):
        ap.error(f"unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}; choose from {', '.join(SECTIONS)}")
    files = camtrap_jpegs(args.shared)
    if args.limit:
        files = files[: args.limit]
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "threads": THREADS}
    sections = {
        "decode": ("decode: full vs reduced", lambda: bench_decode(files)),
        "reduced_accuracy": ("reduced-decode accuracy", lambda: bench_reduced_accuracy(files, default_model("detector"))),
        "detector": ("detector", lambda: bench_detector(files, default_model("detector"),
                                                         args.shared / "weights" / "yolov5n-coco.pt")),
        "detector_rect": ("detector: rectangle vs square input", lambda: bench_detector_rect(files, default_model("detector"), args.shared)),
        "embedder": ("embedder", lambda: bench_embedder(args.shared, default_model("embedder"))),
        "preprocess": ("embedder preprocessing: exact numpy vs C resize",
                       lambda: bench_preprocess(args.shared, default_model("embedder"))),
        "int8": ("INT8 embedder on ONNX Runtime CPU: U8S8 and S8S8 vs FP32",
                 lambda: bench_int8(args.shared, default_model("embedder"))),
        "detector_int8": ("INT8 detector on ONNX Runtime CPU: the export's gate, and speed per ladder step",
                          lambda: bench_detector_int8(args.shared, default_model("detector"))),
    }
    for key, (label, run) in sections.items():
        if only and key not in only:
            continue
        print(label, file=sys.stderr)
        results[key] = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out.with_name("RESULTS.md"))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
