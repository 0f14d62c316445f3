"""The whole job, scored against the truth: what the lab enrols, the field device must recognise.

From a labelled re-id set in ``../shared/data/reid`` (zebra; nyala test animals) this builds what a field
deployment sees and runs the real CLI on it, in subprocesses, exactly as users do:

1. **Lab**: a share of the animals is *known*. For each known animal the first half of its photos (sorted by
   file name: for the zebra video frames, the earlier frames) is enrolled *as crops* into a gallery
   (``fieldreid enroll META --crops``) and ``fieldreid calibrate`` chooses the open-set thresholds on them.
2. **Field**: every other photo (the second half of each known animal's, all photos of the animals never
   enrolled) is copied under an anonymous name into one of four camera folders. Capture times (file mtime: the
   sets carry no EXIF) make realistic bursts: 1–3 frames of one animal 2 s apart, bursts 5–60 min apart per
   camera, and some bursts where two animals are seen in alternating frames (a pair passing the camera).
3. ``fieldreid watch FIELD --gallery COPY --out OUT --once`` (no ``--species``: the detector says "animal"),
   and, for one case, the same after ``fieldreid sync`` pulled the gallery from a lab server on loopback onto
   a device that had no gallery yet.
4. ``fieldreid identify`` on the same photos ``--crops`` as the reference route.

Each photo is scored by its most confident sighting (a photo with no sighting counts as wrong):
known photos named correctly (balanced over animals, as AnimalCLEF's BAKS), unknown photos not given an enrolled
name (BAUS), their geometric mean, and how the provisional animals group the unknowns (pairwise precision /
recall and adjusted Rand index over the unknown photos, as AnimalCLEF 2026 scores new-individual clustering).

    python bench/bench_e2e.py --shared ../shared --out bench/e2e_results.json

Run it on a quiet machine: it is a measurement of accuracy, but its timings are printed too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = 4
UNKNOWN_SHARE = 0.25


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", YOLO_OFFLINE="1", YOLO_AUTOINSTALL="False", COLUMNS="200",
             YOLO_CONFIG_DIR=str(ROOT / ".cache" / "ultralytics"))
    return e


def fieldreid(*args: str, check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fieldreid.cli", *map(str, args)]
    e = env()
    e.update(extra_env or {})
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True)
    dt = time.monotonic() - t0
    print(f"  $ fieldreid {' '.join(map(str, args))}  [{dt:.1f} s, rc {p.returncode}]", flush=True)
    if check and p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    p.seconds = dt  # type: ignore[attr-defined]
    return p


def stable_hash(s: str) -> int:
    return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16)


# ------------------------------------------------------------------------------------------------ the scene
def build_scene(set_dir: Path, split: str | None, work: Path, seed: int = 0) -> dict:
    """Enrolment metadata, camera folders with realistic capture times, and the truth for every field photo."""
    rows = [r for r in csv.DictReader(open(set_dir / "metadata.csv")) if split is None or r["split"] == split]
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[r["identity"]].append(r)
    ids = sorted(by_id, key=lambda i: (stable_hash(i), i))
    n_unknown = round(UNKNOWN_SHARE * len(ids))
    unknown, known = set(ids[:n_unknown]), set(ids[n_unknown:])
    enrol, field = [], []
    for ident in sorted(by_id):
        photos = sorted(by_id[ident], key=lambda r: r["path"])
        if ident in known:
            half = (len(photos) + 1) // 2
            enrol += photos[:half]
            field += [(ident, p) for p in photos[half:]]
        else:
            field += [(ident, p) for p in photos]

    meta = work / "enrol.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "identity", "path", "species", "split"])
        for r in enrol:
            w.writerow([r["image_id"], r["identity"], str((set_dir / r["path"]).resolve()), r["species"], "database"])

    # Bursts of one animal, a few pairs interleaved, spread over cameras and time.
    rng = random.Random(seed)
    per_animal: dict[str, list[dict]] = defaultdict(list)
    for ident, p in field:
        per_animal[ident].append(p)
    bursts = []
    for ident in sorted(per_animal):
        photos = per_animal[ident]
        i = 0
        while i < len(photos):
            n = rng.randint(1, 3)
            bursts.append([(ident, p) for p in photos[i:i + n]])
            i += n
    rng.shuffle(bursts)
    merged, i = [], 0
    while i < len(bursts):
        b = bursts[i]
        if i + 1 < len(bursts) and rng.random() < 0.15 and bursts[i + 1][0][0] != b[0][0]:
            a, c = b, bursts[i + 1]
            inter = [x for pair in zip(a, c, strict=False) for x in pair] + a[len(c):] + c[len(a):]
            merged.append(inter)
            i += 2
        else:
            merged.append(b)
            i += 1

    field_dir = work / "field"
    clock = [1_700_000_000.0 + 3600 * k for k in range(CAMERAS)]
    truth: dict[str, dict] = {}
    n = 0
    for b in merged:
        cam = stable_hash(b[0][0]) % CAMERAS
        clock[cam] += rng.uniform(300, 3600)
        camdir = field_dir / f"cam{cam + 1}"
        camdir.mkdir(parents=True, exist_ok=True)
        for k, (ident, p) in enumerate(b):
            n += 1
            dest = camdir / f"IMG_{n:05d}.jpg"
            shutil.copyfile(set_dir / p["path"], dest)
            t = clock[cam] + 2 * k
            os.utime(dest, (t, t))
            truth[str(dest.relative_to(field_dir))] = {"identity": ident, "known": ident in known,
                                                      "path": str(dest)}
        clock[cam] += 2 * len(b)
    return {"enrol_csv": meta, "field": field_dir, "truth": truth, "known": sorted(known),
            "unknown": sorted(unknown), "n_enrolled": len(enrol), "n_bursts": len(merged),
            "n_pair_bursts": sum(len({x[0] for x in b}) > 1 for b in merged)}


# ------------------------------------------------------------------------------------------------ scoring
def adjusted_rand(labels_true: list, labels_pred: list) -> float:
    n = len(labels_true)
    if n < 2:
        return float("nan")

    def c2(x: int) -> float:
        return x * (x - 1) / 2

    cont = Counter(zip(labels_true, labels_pred, strict=True))
    a, b = Counter(labels_true), Counter(labels_pred)
    index = sum(c2(v) for v in cont.values())
    sa, sb = sum(c2(v) for v in a.values()), sum(c2(v) for v in b.values())
    expected = sa * sb / c2(n)
    maximum = (sa + sb) / 2
    return 1.0 if maximum == expected else (index - expected) / (maximum - expected)


def score(truth: dict, answers: dict, known_ids: set[str]) -> dict:
    """answers: field-relative file -> (decision, identity) or None when the photo gave no sighting."""
    per_known, per_unknown = defaultdict(list), defaultdict(list)
    missing = 0
    unk_true, unk_pred = [], []
    for rel, t in truth.items():
        a = answers.get(rel)
        if a is None:
            missing += 1
        decision, identity = a if a else ("", "")
        if t["known"]:
            per_known[t["identity"]].append(decision == "known" and identity == t["identity"])
        else:
            ok = decision in ("new", "known") and identity not in known_ids and bool(identity)
            per_unknown[t["identity"]].append(ok)
            unk_true.append(t["identity"])
            unk_pred.append(identity if ok else f"__{rel}")  # wrong or missing answers are singletons
    def balanced(d):
        return sum(sum(v) / len(v) for v in d.values()) / len(d) if d else float("nan")
    known_acc = balanced(per_known)
    unknown_acc = balanced(per_unknown)
    same_t = [(x == y) for x, y in combinations(unk_true, 2)]
    same_p = [(x == y) for x, y in combinations(unk_pred, 2)]
    tp = sum(a and b for a, b in zip(same_t, same_p, strict=True))
    precision = tp / max(1, sum(same_p))
    recall = tp / max(1, sum(same_t))
    n_known = sum(len(v) for v in per_known.values())
    return {
        "known_photos": n_known,
        "known_named_correctly": round(sum(sum(v) for v in per_known.values()) / max(1, n_known), 4),
        "BAKS": round(known_acc, 4),
        "unknown_photos": sum(len(v) for v in per_unknown.values()),
        "BAUS": round(unknown_acc, 4),
        "GM": round((known_acc * unknown_acc) ** 0.5, 4),
        "unknown_pair_precision": round(precision, 4),
        "unknown_pair_recall": round(recall, 4),
        "unknown_ARI": round(adjusted_rand(unk_true, unk_pred), 4),
        "photos_without_sighting": missing,
    }


def watch_answers(out: Path, field: Path) -> dict:
    best: dict[str, tuple] = {}
    with open(out / "sightings.csv", newline="") as f:
        for r in csv.DictReader(f):
            p = Path(r["file"])
            rel = str(p.relative_to(field)) if p.is_absolute() else str(p)  # watch stores paths under FOLDER
            conf = float(r["conf"] or 0)
            if rel not in best or conf > best[rel][0]:
                best[rel] = (conf, r["decision"], r["identity"])
    return {k: (v[1], v[2]) for k, v in best.items()}


def identify_answers(csv_path: Path, field: Path) -> dict:
    out = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("error"):
                continue
            rel = str(Path(r["file"]).resolve().relative_to(field.resolve()))
            out.setdefault(rel, (r["decision"], r["identity"]))
    return out


# ------------------------------------------------------------------------------------------------ routes
#: ``--embedder PATH`` for every command that embeds (empty: the default embedder); set by ``--embedder``
EMBEDDER: list[str] = []


def lab_gallery(scene: dict, work: Path, verify: bool = True) -> Path:
    g = work / "lab.db"
    fieldreid("enroll", scene["enrol_csv"], "--crops", "--gallery", g, *EMBEDDER)
    fieldreid("calibrate", scene["enrol_csv"], "--crops", "--gallery", g, *(["--verify"] if verify else []),
              *EMBEDDER)
    return g


def run_watch(gallery: Path, scene: dict, out: Path) -> tuple[dict, float]:
    p = fieldreid("watch", scene["field"], "--gallery", gallery, "--out", out, "--once", "--settle", "0", *EMBEDDER)
    return watch_answers(out, scene["field"]), p.seconds


def run_identify(gallery: Path, scene: dict, work: Path) -> tuple[dict, float]:
    out = work / "identify.csv"
    p = fieldreid("identify", scene["field"], "--crops", "--gallery", gallery, "--out", out, *EMBEDDER)
    return identify_answers(out, scene["field"]), p.seconds


def sync_device(lab_gallery_path: Path, work: Path) -> Path:
    """A lab server on loopback holding the lab gallery; a fresh device pulls it with `fieldreid sync`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sync_support import ServerProcess  # a real `fieldreid serve` subprocess

    lab_dir = work / "labdata"
    lab_dir.mkdir()
    db = f"sqlite:///{lab_dir / 'lab.db'}"
    common = ["--db", db, "--data-dir", lab_dir]
    fieldreid("server", "init", *common)
    fieldreid("server", "create-project", "bench", "--from-gallery", lab_gallery_path, *common)
    fieldreid("server", "import-gallery", lab_gallery_path, "--project", "bench", *common)
    token = fieldreid("server", "add-device", "cam-bench", "--project", "bench", *common).stdout.strip().splitlines()[-1]
    key = fieldreid("server", "public-key", *common).stdout.strip().splitlines()[-1]
    server = ServerProcess(db, lab_dir).start()
    try:
        cfg = work / "sync.toml"
        cfg.write_text(f'server = "{server.url}"\nlab_public_key = "{key}"\n')
        cfg.chmod(0o600)
        device = work / "device.db"
        fieldreid("sync", "--gallery", device, "--config", cfg, "--no-push",
                  extra_env={"FIELDREID_TOKEN": token})
    finally:
        server.stop()
    return device


def run_case(name: str, set_dir: Path, split: str | None, work: Path, with_sync: bool, verify: bool = True) -> dict:
    print(f"== {name}", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    scene = build_scene(set_dir, split, work)
    known = set(scene["known"])
    lab = lab_gallery(scene, work, verify)
    res: dict = {"set": name, "verification": verify, "animals_known": len(known), "animals_unknown": len(scene["unknown"]),
                 "photos_enrolled": scene["n_enrolled"], "field_photos": len(scene["truth"]),
                 "bursts": scene["n_bursts"], "bursts_with_two_animals": scene["n_pair_bursts"]}

    g = work / "identify.db"
    shutil.copyfile(lab, g)
    answers, secs = run_identify(g, scene, work)
    res["identify_crops"] = score(scene["truth"], answers, known) | {"seconds": round(secs, 1)}

    g = work / "watch.db"
    shutil.copyfile(lab, g)
    answers, secs = run_watch(g, scene, work / "out-watch")
    res["watch"] = score(scene["truth"], answers, known) | {"seconds": round(secs, 1)}

    if with_sync:
        device = sync_device(lab, work)
        answers, secs = run_watch(device, scene, work / "out-sync")
        res["watch_after_sync"] = score(scene["truth"], answers, known) | {"seconds": round(secs, 1)}
    for k in ("identify_crops", "watch", "watch_after_sync"):
        if k in res:
            print(f"  {k:18s} {json.dumps(res[k])}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "e2e_results.json")
    ap.add_argument("--work", type=Path, default=None, help="keep the scenes and outputs here")
    ap.add_argument("--sets", default="zebra,nyala")
    ap.add_argument("--no-sync", action="store_true", help="skip the lab-server case")
    ap.add_argument("--no-verify", action="store_true", help="calibrate without local-feature verification")
    ap.add_argument("--embedder", type=Path, default=None,
                    help="an embedder ONNX for every command (e.g. bench_train's runs/train-bench/lite0-full.onnx)")
    args = ap.parse_args()
    if args.embedder:
        EMBEDDER[:] = ["--embedder", str(args.embedder.resolve())]
    reid = args.shared / "data" / "reid"
    if not reid.is_dir():
        raise SystemExit(f"labelled re-id sets not found at {reid}")
    work = args.work or Path(tempfile.mkdtemp(prefix="fieldreid-e2e-"))
    cases = {"zebra": (reid / "zebra", None, True), "nyala": (reid / "nyala", "test", False)}
    results = []
    for name in args.sets.split(","):
        set_dir, split, with_sync = cases[name]
        results.append(run_case(name, set_dir, split, work / name, with_sync and not args.no_sync, not args.no_verify))
    doc = {"bench": "e2e", "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "embedder": str(args.embedder) if args.embedder else "default",
           "note": "real CLI in subprocesses; scores per photo (most confident sighting); see bench_e2e.py",
           "results": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
