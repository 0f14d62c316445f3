"""Input resolution of the ImageNet EfficientNet-Lite embedders on nyala test (issue 14: "measure our
embedders at 224 / 320 / 384 and pick per model").

Each variant's default embedder (ImageNet backbone + GeM + BN neck, eager torch, as ``fieldreid models``
builds it) embeds the 729 nyala test photos (58 animals never used for training) at each size (area
resize of the whole photo); one-vs-all top-1 (nearest other photo) with and without the mean of the
photo's and its mirror image's embeddings. Seconds are for the whole set on this machine: compare them
only within one quiet run.

    python bench/bench_resolution.py --shared ../shared --variants lite0 --sizes 224,320,384
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def top1(e: np.ndarray, labels: np.ndarray) -> float:
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(labels[s.argmax(1)] == labels))


def main() -> None:
    import torch

    from fieldreid.embed.model import build_default_embedder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--variants", default="lite0")
    ap.add_argument("--sizes", default="224,320,384")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "resolution_results.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = args.shared / "data" / "reid" / "nyala"
    rows = [r for r in csv.DictReader(open(base / "metadata.csv")) if r["split"] == "test"]
    labels = np.array([r["identity"] for r in rows])
    images = [cv2.cvtColor(cv2.imread(str(base / r["path"])), cv2.COLOR_BGR2RGB) for r in rows]
    results = []
    for variant in args.variants.split(","):
        model, spec, model_id = build_default_embedder(variant)
        mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
        for size in (int(s) for s in args.sizes.split(",")):
            t = time.perf_counter()
            z = []
            for i in range(0, len(images), 32):
                x = np.stack([((cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
                                - mean) / std).transpose(2, 0, 1) for im in images[i:i + 32]])
                x = torch.from_numpy(x)
                with torch.inference_mode():
                    z.append(torch.stack([model(x), model(x.flip(3))], 1).numpy())
            z = np.concatenate(z)
            r = {"variant": variant, "size": size, "model_id": model_id, "top1": round(top1(z[:, 0], labels), 4),
                 "top1_with_mirror": round(top1(z[:, 0] + z[:, 1], labels), 4),
                 "seconds_both": round(time.perf_counter() - t, 1)}
            print(json.dumps(r), flush=True)
            results.append(r)
    args.out.write_text(json.dumps({"bench": "resolution", "set": "nyala test (58 animals)", "date":
                                    time.strftime("%Y-%m-%d %H:%M"), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
