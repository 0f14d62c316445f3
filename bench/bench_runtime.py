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
    result: dict = {"model": ours.model_id, "input": list(ours.input_size)}
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
    return {"crops": len(crops), "mean_megapixels": round(float(np.mean([c.shape[0] * c.shape[1] for c in crops]) / 1e6), 3),
            "exact_numpy_per_crop": _ms(t_exact), "c_resize_per_crop": _ms(t_fast),
            "speedup": round(statistics.median(t_exact) / statistics.median(t_fast), 2),
            "model_per_crop_batch16": _ms(t_model),
            "c_resize_share_of_embedding": round(statistics.median(t_fast) / (statistics.median(t_fast) + model), 3),
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
    path.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N camtrap images")
    args = ap.parse_args()
    files = camtrap_jpegs(args.shared)
    if args.limit:
        files = files[: args.limit]
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "threads": THREADS}
    print(f"decode: {len(files)} images", file=sys.stderr)
    results["decode"] = bench_decode(files)
    print("reduced-decode accuracy", file=sys.stderr)
    results["reduced_accuracy"] = bench_reduced_accuracy(files, default_model("detector"))
    print("detector", file=sys.stderr)
    results["detector"] = bench_detector(files, default_model("detector"), args.shared / "weights" / "yolov5n-coco.pt")
    print("embedder", file=sys.stderr)
    results["embedder"] = bench_embedder(args.shared, default_model("embedder"))
    print("embedder preprocessing: exact numpy vs C resize", file=sys.stderr)
    results["preprocess"] = bench_preprocess(args.shared, default_model("embedder"))
    print("INT8 embedder on ONNX Runtime CPU: U8S8 and S8S8 vs FP32", file=sys.stderr)
    results["int8"] = bench_int8(args.shared, default_model("embedder"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out.with_name("RESULTS.md"))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
