"""Train / distil / export benchmark on the nyala re-id set (CPU, 2 threads). Not part of the test suite.

    python bench/bench_train.py all                      # every stage, in order (about 1-1.5 h on 2 cores)
    python bench/bench_train.py lite0|lite2|distill      # one training run (resumes if interrupted)
    python bench/bench_train.py export|eval|report       # ONNX FP32 + INT8, the metrics table

Protocol (the README's): train on the ``train`` split (179 animals, 1,213 images), evaluate on the ``test``
split (58 animals never seen, 729 images) with one-vs-all top-1 / mAP and the open-set BAKS / BAUS /
geometric mean at a threshold calibrated on the *train* split (fieldreid.evaluation.calibrate). Models and
embeddings go to runs/train-bench/ (git-ignored); numbers to bench/train_results.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "train-bench"
THREADS = 2


def _shared(args) -> Path:
    return Path(args.shared).resolve()


def _meta(args) -> Path:
    return _shared(args) / "data" / "reid" / "nyala" / "metadata.csv"


# Training recipes sized for ~10-25 minutes each on 2 shared CPU cores.
RECIPES = {
    "lite0": dict(backbone="tf_efficientnet_lite0", image_size=224, epochs=6, batch_size=32, lr=1e-3,
                  freeze_stages=3, warmup_epochs=1.0, lr_decay=0.8),
    "lite2": dict(backbone="tf_efficientnet_lite2", image_size=224, epochs=5, batch_size=32, lr=1e-3,
                  freeze_stages=3, warmup_epochs=1.0, lr_decay=0.8),
    "distill": dict(backbone="tf_efficientnet_lite0", image_size=224, epochs=6, batch_size=32, lr=1e-3,
                    freeze_stages=3, warmup_epochs=1.0, lr_decay=0.8),
}


def _log(step: dict, every: int = 5) -> None:
    if step["step"] % every == 0 or step["step"] == step["total_steps"]:
        parts = " ".join(f"{k}={v:.4g}" for k, v in step.items() if isinstance(v, float))
        print(f"  step {step['step']}/{step['total_steps']} epoch {step['epoch'] + 1} {parts}", flush=True)


def stage_train(args, name: str) -> None:
    import torch

    from fieldreid.train.trainer import TrainConfig, train

    torch.set_num_threads(THREADS)
    RUNS.mkdir(parents=True, exist_ok=True)
    out = RUNS / f"{name}.pt"
    cfg = TrainConfig(metadata=str(_meta(args)), split="train", name="nyala", seed=0, **RECIPES[name])
    resume = (out.with_name(out.name + ".resume")).is_file()
    t = time.time()
    res = train(cfg, out, resume=resume, on_step=_log)
    print(f"{name}: {res.model_id} {res.steps_done} steps in {res.seconds:.0f} s (this call {time.time() - t:.0f} s)")
    (RUNS / f"{name}.run.json").write_text(json.dumps(
        {"model_id": res.model_id, "seconds": res.seconds, "steps": res.steps_done, "epochs": res.epochs_done,
         "history": res.history, "recipe": RECIPES[name]}, indent=1))


def stage_distill(args) -> None:
    import torch

    from fieldreid.train.distill import DistillConfig, distill

    torch.set_num_threads(THREADS)
    out = RUNS / "distill.pt"
    teacher = RUNS / "lite2.pt"
    cfg = DistillConfig(metadata=str(_meta(args)), split="train", name="nyala", seed=0, teacher=str(teacher),
                        **RECIPES["distill"])
    resume = (out.with_name(out.name + ".resume")).is_file()
    res = distill(cfg, out, resume=resume, on_step=_log)
    print(f"distill: {res.model_id} {res.steps_done} steps in {res.seconds:.0f} s")
    (RUNS / "distill.run.json").write_text(json.dumps(
        {"model_id": res.model_id, "seconds": res.seconds, "steps": res.steps_done, "epochs": res.epochs_done,
         "history": res.history, "recipe": RECIPES["distill"]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["all", "lite0", "lite2", "distill", "export", "eval", "report"])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args(argv)
    stages = ["lite0", "lite2", "distill", "export", "eval", "report"] if args.stage == "all" else [args.stage]
    for st in stages:
        print(f"== {st}", flush=True)
        if st in ("lite0", "lite2"):
            stage_train(args, st)
        elif st == "distill":
            stage_distill(args)
        else:
            globals()[f"stage_{st}"](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
