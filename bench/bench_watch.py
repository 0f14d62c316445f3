"""`fieldreid watch` end to end against the naive route, on >= 500 real camera-trap images, 2 CPU threads.

The camtrap JPEGs are copied N times into camera folders with a unique trailer appended after the JPEG
end-of-image marker, so every copy is a valid, distinct file (otherwise watch would rightly record the
copies as duplicates and skip them). Then, in one run:

* **fieldreid**: ``fieldreid watch DIR --once`` in a subprocess (ONNX Runtime, 2 threads): scan, stability
  checks, sha256, EXIF, reduced JPEG decode, detector, crops, embedder, per-event fusion and decisions,
  SQLite commits (synchronous=FULL), outputs. Its RSS is sampled every 0.25 s against images done.
* **naive**: what a user writes by hand with the same models: the ``yolov5`` package's ``model(path)``
  (AutoShape ``predict``) per image, then per animal box a crop of the full image, torchvision resize and
  timm eager forward, one crop at a time. It does *less* (no state, no hashing, no gallery).
* **same decisions?** (``throughput_interleaved.same_decisions``): per image of copy 0, the watch's embedded
  animal boxes against the naive route's (one to one, IoU >= 0.9), then both routes' crops through one open-set
  ``Identifier`` each: same known / new / uncertain and the same identities (:func:`compare_decisions`).

    python bench/bench_watch.py --copies 5 --out bench/watch_results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
THREADS = 2


def camtrap_jpegs(shared: Path) -> list[Path]:
    from fieldreid.frames.decode import iter_files, read_image

    out = []
    for p in iter_files([shared / "data" / "camtrap"]):
        if p.suffix.lower() not in (".jpg", ".jpeg") or p.stat().st_size == 0:
            continue
        try:
            read_image(p, min_side=640)
        except Exception:
            continue
        out.append(p)
    return out


def make_folder(files: list[Path], copies: int, dest: Path) -> list[Path]:
    made = []
    for k in range(copies):
        for i, p in enumerate(files):
            cam = dest / f"cam{k:02d}-{p.parent.name}"
            cam.mkdir(parents=True, exist_ok=True)
            target = cam / f"{i:04d}_{p.name}"
            target.write_bytes(p.read_bytes() + f"fieldreid-bench-{k}-{i}".encode())  # after EOI: still valid
            made.append(target)
    old = time.time() - 3600  # as if copied off a card an hour ago: nothing waits for the settle time
    for p in made:
        os.utime(p, (old, old))
    return made


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_fieldreid(folder: Path, out: Path, gallery: Path, n: int, batch: int | None, *extra: str) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "fieldreid"), "watch", str(folder), "--gallery", str(gallery), "--out",
           str(out), "--once", "--settle", "0", "--threads", str(THREADS), *(["--batch", str(batch)] if batch else []),
           *extra]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "fieldreid.cli", *cmd[1:]]
    samples: list[tuple[float, int, int]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop = threading.Event()

    def sample() -> None:
        db = out / "results.db"
        while not stop.is_set():
            kib = rss_kib(proc.pid)
            done = 0
            if db.exists():
                try:
                    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                    done = c.execute("SELECT count(*) FROM files WHERE status != 'pending'").fetchone()[0]
                    c.close()
                except sqlite3.Error:
                    pass
            if kib:
                samples.append((time.perf_counter() - t0, done, kib))
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"fieldreid watch failed ({proc.returncode}):\n{err[-3000:]}")
    first = next((s for s in samples if s[1] > 0), None)
    last = samples[-1] if samples else None
    steady = None
    if first and last and last[1] > first[1]:
        steady = (last[1] - first[1]) / (last[0] - first[0])
    peak = max(s[2] for s in samples) if samples else None
    # RSS against progress: flat memory means the quarter marks stay level
    marks = {}
    for q in (0.25, 0.5, 0.75, 1.0):
        hit = next((s for s in samples if s[1] >= q * n), None)
        if hit:
            marks[f"{int(q * 100)}%"] = round(hit[2] / 1024, 1)
    con = sqlite3.connect(f"file:{out / 'results.db'}?mode=ro", uri=True)
    counts = dict(con.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
    animals = con.execute("SELECT count(*) FROM detections WHERE embedding IS NOT NULL").fetchone()[0]
    con.close()
    return {"images": n, "wall_s_including_model_load": round(wall, 2),
            "images_per_s_end_to_end": round(n / wall, 2),
            "images_per_s_steady": round(steady, 2) if steady else None,
            "peak_rss_mib": round(peak / 1024, 1) if peak else None,
            "rss_mib_at_progress": marks, "file_states": counts, "animal_crops_embedded": animals,
            "status_line": err.strip().splitlines()[-1] if err.strip() else ""}


def naive_route(yolov5_pt: Path, conf: float):
    """The hand-written route, returned as a function of one image path (models loaded once)."""
    import cv2
    import numpy as np
    import torch
    import torchvision.transforms.v2.functional as TF

    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    import yolov5

    from fieldreid.crop import cut
    from fieldreid.detect.classes import md_category
    from fieldreid.embed.model import build_default_embedder

    torch.set_num_threads(THREADS)
    det = yolov5.load(str(yolov5_pt), device="cpu")
    det.conf, det.iou = conf, 0.45
    net, spec, _ = build_default_embedder()
    net.eval()
    animal = {i for i, name in det.names.items() if md_category(name) == 1}
    h, w = spec.size
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def run(p: Path) -> list[tuple]:
        """(box xyxy, confidence, unit embedding) of each animal in the image at ``p``."""
        res = det(str(p), size=640)
        keep = [b for b in res.xyxy[0].numpy() if int(b[5]) in animal and b[4] >= conf]
        if not keep:
            return []
        img = cv2.imread(str(p))
        out = []
        for b in keep:
            c = cut(img, tuple(float(v) for v in b[:4]))  # the crop rule (fieldreid.crop)
            x = TF.resize(torch.from_numpy(np.ascontiguousarray(c[:, :, ::-1])).permute(2, 0, 1).float(), [h, w],
                          antialias=True)
            with torch.inference_mode():
                v = net(((x[None] / 255.0) - mean) / std)[0].numpy()
            out.append((np.asarray(b[:4], np.float32), float(b[4]), v / max(float(np.linalg.norm(v)), 1e-12)))
        return out

    return run


def fieldreid_detections(results_db: Path, paths: list[Path], root: Path) -> dict[str, list]:
    """(box, confidence, embedding) of each embedded (animal) detection the watch stored for each path (the
    results database records paths relative to the watched root)."""
    import numpy as np

    from fieldreid.watch.commit import EMBED_DTYPE

    con = sqlite3.connect(f"file:{results_db}?mode=ro", uri=True)
    by_rel = {Path(p).relative_to(root).as_posix(): str(p) for p in paths}
    out: dict[str, list] = {str(p): [] for p in paths}
    rows = con.execute("SELECT i.path, d.x1, d.y1, d.x2, d.y2, d.conf, d.embedding FROM detections d JOIN images i "
                       "ON i.sha256 = d.sha256 WHERE d.embedding IS NOT NULL ORDER BY i.path, d.idx").fetchall()
    con.close()
    for rel, x1, y1, x2, y2, c, blob in rows:
        path = by_rel.get(Path(rel).as_posix())
        if path is not None:
            v = np.frombuffer(blob, EMBED_DTYPE).astype(np.float32)
            out[path].append((np.array([x1, y1, x2, y2], np.float32), float(c), v / max(float(np.linalg.norm(v)), 1e-12)))
    return out


def compare_decisions(ours: dict[str, list], naive: dict[str, list], embedder, work: Path,
                      iou_min: float = 0.9) -> dict:
    """Do the two routes reach the same decisions on the same images?

    Boxes: per image, the naive route's animal boxes and the watch's embedded animal boxes matched one to one
    (best IoU first; a pair needs IoU >= ``iou_min``). Identities: the matched crops of both routes, image by
    image in the same order, through the same open-set decision code (:class:`fieldreid.gallery.Identifier`,
    fresh gallery per route, provisional identities created, the embedder's thresholds): same decision
    (known / new / uncertain) and the same identity, up to the naming of provisional identities (a consistent
    one-to-one mapping). The watch's own decisions fuse the frames of an event, which the naive route has no
    notion of; this compares what the two routes compute, fed to one decision rule.
    """
    import numpy as np

    from fieldreid.detect import box_iou
    from fieldreid.gallery import Gallery, Identifier

    stats = {"images": 0, "images_same_boxes": 0, "boxes_naive": 0, "boxes_fieldreid": 0, "boxes_matched": 0,
             "worst_iou": 1.0, "cosine_min": 1.0, "cosine_mean": None, "unmatched": [],
             "naive_same_animal_other_class": []}
    pairs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    cos = []
    for path, theirs in naive.items():
        mine = ours.get(path, [])
        stats["images"] += 1
        stats["boxes_naive"] += len(theirs)
        stats["boxes_fieldreid"] += len(mine)
        a = np.array([t[0] for t in theirs], np.float32).reshape(-1, 4)
        b = np.array([m[0] for m in mine], np.float32).reshape(-1, 4)
        iou = box_iou(a, b) if len(a) and len(b) else np.zeros((len(a), len(b)))
        used: set[int] = set()
        matched = 0
        paired: list[int] = []
        missed: list[int] = []
        for i in np.argsort(-np.array([t[1] for t in theirs])) if theirs else []:
            cand = [j for j in range(len(mine)) if j not in used]
            j = max(cand, key=lambda k: iou[i, k]) if cand else None
            if j is None or iou[i, j] < iou_min:
                missed.append(i)
                continue
            paired.append(i)
            used.add(j)
            matched += 1
            stats["worst_iou"] = min(stats["worst_iou"], float(iou[i, j]))
            c = float(theirs[i][2] @ mine[j][2])
            cos.append(c)
            pairs.append((path, theirs[i][0], theirs[i][2], mine[j][2]))
        # A naive box left over on an animal it already boxed (IoU > 0.45 with a matched box) is the same animal
        # under another COCO class: per-class NMS keeps both (a "dog" and a "sheep" on one coyote), the watch's
        # NMS per MegaDetector category keeps one by design (test_detect_parity). Anything else is a difference.
        own = box_iou(a, a) if len(a) else np.zeros((0, 0))
        dups = 0
        for i in missed:
            dup = bool(paired) and float(own[i, paired].max()) > 0.45
            dups += dup
            best = float(iou[i].max()) if len(mine) else 0.0
            stats["naive_same_animal_other_class" if dup else "unmatched"].append(
                {"image": Path(path).name, "route": "naive", "conf": round(theirs[i][1], 3), "best_iou": round(best, 3)})
        for j in (j for j in range(len(mine)) if j not in used):
            stats["unmatched"].append({"image": Path(path).name, "route": "fieldreid", "conf": round(mine[j][1], 3)})
        stats["boxes_matched"] += matched
        stats["images_same_boxes"] += matched == len(mine) == len(theirs) - dups
    if cos:
        stats["cosine_min"], stats["cosine_mean"] = round(min(cos), 5), round(float(np.mean(cos)), 5)
    stats["worst_iou"] = round(stats["worst_iou"], 4)
    same = 0
    mismatches = []
    a_to_b: dict[str, str] = {}
    b_to_a: dict[str, str] = {}
    with Gallery(work / "decide-naive.db") as ga, Gallery(work / "decide-fieldreid.db") as gb:
        ia = Identifier(ga, model_thresholds=embedder.thresholds)
        ib = Identifier(gb, model_thresholds=embedder.thresholds)
        for path, box, va, vb in pairs:
            [da] = ia.identify(va[None], embedder.model_id, sources=[path], boxes=[box])
            [db] = ib.identify(vb[None], embedder.model_id, sources=[path], boxes=[box])
            ok = da.decision == db.decision
            if ok and (da.identity is not None or db.identity is not None):
                want_b, want_a = a_to_b.setdefault(da.identity, db.identity), b_to_a.setdefault(db.identity, da.identity)
                ok = want_b == db.identity and want_a == da.identity
            same += ok
            if not ok:
                mismatches.append({"image": Path(path).name,
                                   "naive": [getattr(da.decision, "value", da.decision), da.score],
                                   "fieldreid": [getattr(db.decision, "value", db.decision), db.score]})
    stats["decisions_compared"] = len(pairs)
    stats["decisions_identical"] = same
    stats["decision_mismatches"] = mismatches[:20]
    stats["identical"] = bool(same == len(pairs) and not stats["unmatched"])
    stats["rule"] = (f"boxes: one to one, IoU >= {iou_min}, naive boxes of another COCO class on an animal already "
                     "matched set apart; decisions: both routes' matched crops through one Identifier each (fresh "
                     "gallery, the embedder's thresholds), same kind and identity up to naming")
    return stats


def run_interleaved(files: list[Path], copies: int, root: Path, work: Path, yolov5_pt: Path, conf: float,
                    batch: int, chunk: int) -> dict:
    """Both routes in this process, alternating chunks, so that a busy machine slows both alike.

    fieldreid processes every image (all copies); the naive route the images of copy 0 only (the other
    copies are the same pictures), one naive image per ``copies`` fieldreid images in each round.
    """
    from fieldreid.defaults import default_model
    from fieldreid.detect import Detector
    from fieldreid.embed.runtime import Embedder
    from fieldreid.watch import WatchConfig, Watcher

    det = Detector(default_model("detector"), backend="onnxruntime", conf=conf, threads=THREADS)
    emb = Embedder(default_model("embedder"), backend="onnxruntime", threads=THREADS)
    cfg = WatchConfig(root=root, out=work / "out-interleaved", gallery=work / "g-interleaved.db", batch=batch,
                      conf=conf, settle=0, status_every=1e9, idle_close=1e9)
    naive = naive_route(yolov5_pt, conf)
    per_copy = len(files) // copies
    naive_files = files[:per_copy]
    t_ours = t_naive = 0.0
    n_ours = n_naive = crops = 0
    naive_out: dict[str, list] = {}
    with Watcher(cfg, det, emb, log=lambda m: None) as w:
        w.run_pass([str(files[0])])  # warm-up both routes (not timed)
        naive(naive_files[0])
        times = w.pipe.times  # per stage: decode (reader thread), detect, crop, embed, database
        times.reset()
        for a in range(0, per_copy, chunk):
            ours_paths = [str(files[k * per_copy + i]) for k in range(copies) for i in range(a, min(a + chunk, per_copy))]
            t = time.perf_counter()
            w.run_pass(ours_paths)
            with times("events+decide"):
                w.close_events()
            t_ours += time.perf_counter() - t
            n_ours += len(ours_paths)
            t = time.perf_counter()
            for p in naive_files[a:a + chunk]:
                naive_out[str(p)] = naive(p)
                crops += len(naive_out[str(p)])
            t_naive += time.perf_counter() - t
            n_naive += len(naive_files[a:a + chunk])
            print(f"  {n_ours} fieldreid, {n_naive} naive", file=sys.stderr)
        t = time.perf_counter()
        with times("events+decide"):
            w.close_events(force=True)
        with times("outputs"):
            w.flush(force=True)
        t_ours += time.perf_counter() - t
        counts = w.state.counts()
    # Same decisions? The watch's boxes and embeddings of copy 0 (what the naive route saw) against the naive
    # route's, outside the timed loop.
    check = compare_decisions(fieldreid_detections(cfg.out / "results.db", naive_files, root), naive_out, emb, work)
    print(f"same decisions: {check['images_same_boxes']} of {check['images']} images with the same boxes, "
          f"{check['decisions_identical']} of {check['decisions_compared']} decisions identical, "
          f"{len(check['unmatched'])} unmatched boxes ({len(check['naive_same_animal_other_class'])} naive boxes of "
          "another class on a matched animal set apart)", file=sys.stderr)
    stages = times.per_image_ms(n_ours)
    print("fieldreid ms per image by stage (decode runs in the reader thread, overlapping the others): "
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + f"; loop {1e3 * t_ours / n_ours:.1f}",
          file=sys.stderr)
    return {"fieldreid": {"images": n_ours, "seconds": round(t_ours, 2), "images_per_s": round(n_ours / t_ours, 2),
                          "file_states": counts, "ms_per_image_by_stage": stages,
                          "ms_per_image_loop": round(1e3 * t_ours / n_ours, 2)},
            "naive": {"images": n_naive, "seconds": round(t_naive, 2), "images_per_s": round(n_naive / t_naive, 2),
                      "animal_crops_embedded": crops},
            "speedup": round((n_ours / t_ours) / (n_naive / t_naive), 2),
            "same_decisions": check}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--copies", type=int, default=5, help="copies of the ~120 readable camtrap JPEGs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="naive images per interleaving round")
    ap.add_argument("--conf", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "watch_results.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    from fieldreid.engines.ort import cpu_int8_flags

    src = camtrap_jpegs(args.shared)
    tmp = Path(tempfile.mkdtemp(prefix="fieldreid-bench-watch-"))
    try:
        files = make_folder(src, args.copies, tmp / "cards")
        print(f"{len(files)} images in {tmp / 'cards'}", file=sys.stderr)
        print("interleaved throughput run", file=sys.stderr)
        inter = run_interleaved(files, args.copies, tmp / "cards", tmp, args.shared / "weights" / "yolov5n-coco.pt",
                                args.conf, args.batch, args.chunk)
        print(json.dumps(inter), file=sys.stderr)
        print("long run: fieldreid watch --once in a subprocess, RSS sampled", file=sys.stderr)
        ours = run_fieldreid(tmp / "cards", tmp / "out", tmp / "gallery.db", len(files), args.batch)
        print(json.dumps(ours), file=sys.stderr)
        print("long run again with --low-memory (no ONNX Runtime arena, its own smaller batches)", file=sys.stderr)
        small = run_fieldreid(tmp / "cards", tmp / "out-low", tmp / "gallery-low.db", len(files), None, "--low-memory")
        print(json.dumps(small), file=sys.stderr)
        result = {
            "when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "cpu_flags": cpu_int8_flags(),
            "load_average_at_end": os.getloadavg(), "threads": THREADS, "source_images": len(src),
            "copies": args.copies, "throughput_interleaved": inter, "watch_subprocess_long_run": ours,
            "watch_subprocess_long_run_low_memory": small,
            "notes": "Throughput: both routes in one process, alternating chunks (fieldreid: all copies, through "
                     "Watcher.run_pass + event closing + outputs; naive: copy 0, yolov5 predict(path) + timm eager "
                     "per crop), models loaded before timing. fieldreid additionally hashes, reads EXIF, commits "
                     "state (synchronous=FULL), fuses events and decides against a gallery. The long run is the "
                     "real CLI (`fieldreid watch --once`), including process start and model loading; its RSS "
                     "is sampled every 0.25 s against the number of files done.",
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
