"""What tuning costs and what its choice gives: fu.tune on a model, then the same fu.unlearn job
with the plain defaults (tuning off) and with the tuned choice (read from the cache), in
alternation in one process.

    python bench/bench_tune.py [--arch allcnn --width 0.25] [--forget 803] [--epochs 10] [--reps 2]

FashionMNIST (sklearn digits when it is not installed); the original is AllCNN trained for
--train-epochs on --train-size images, so near-ties are those of a trained model. The cache
goes to a temporary directory (FASTUNLEARN_TUNE_CACHE), so the user's cache is left alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_splits, versions  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.nn.models import AllCNN  # noqa: E402
from fastunlearn.runtime import tuning  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--forget", type=int, default=803)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--train-epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=30.0)
    args = ap.parse_args()
    os.environ[tuning.CACHE_ENV] = tempfile.mkdtemp(prefix="fastunlearn-tune-")
    name, splits = load_splits()
    x, y = splits["train"]
    x, y = x[:args.train_size], y[:args.train_size]
    mean, std = [float(x.float().mean() / 255)], [float(x.float().std() / 255)]
    torch.manual_seed(0)
    model = AllCNN(x.shape[1], int(y.max()) + 1, args.width)
    model = train_classifier(model, (x, y), epochs=args.train_epochs, mean=mean, std=std, progress=False).eval()
    forget = (x[y == 0][:args.forget], y[y == 0][:args.forget])
    cfg = fu.UnlearnConfig(epochs=args.epochs)
    print(f"{name}, AllCNN width {args.width}, forget {len(forget[1])}, {args.epochs} epochs; {versions()}")
    plan = fu.tune(model, forget, cfg, mean, std, budget_s=args.budget)
    times = {"default": [], "tuned": []}
    for _ in range(args.reps):
        for label, on in (("default", "0"), ("tuned", "1")):
            os.environ[tuning.TUNE_ENV] = on
            t0 = time.perf_counter()
            res = fu.unlearn(model, forget, config=cfg, mean=mean, std=std, progress=False)
            times[label].append(time.perf_counter() - t0)
            print(f"{label}: {times[label][-1]:.3f}s (search {res.timings['search']:.3f}, fine-tune "
                  f"{res.timings['finetune']:.3f}), settings: {res.timings['tuned']}")
    d, t = statistics.median(times["default"]), statistics.median(times["tuned"])
    print(f"tuning {plan.seconds:.2f}s; median default {d:.3f}s, tuned {t:.3f}s: {d / t:.2f}x; every rep: {times}")


if __name__ == "__main__":
    main()
