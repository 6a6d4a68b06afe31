"""`fastunlearn bench NAME`: run bench/bench_NAME.py, optionally under the profiler."""

from __future__ import annotations

import argparse
import os
import platform
import runpy
import sys
from pathlib import Path

import torch

from fastunlearn.data import io as data
from fastunlearn.data.checkpoint import load_model
from fastunlearn.nn.models import create_model
from fastunlearn.runtime import profiling

BENCHES = ("e2e", "revision", "cold_start", "search", "boundary_step", "relabel_check", "batch_norm_relu",
           "thin_conv", "train_eval", "paper")


def _bench_script(name):
    roots = [os.environ.get("FASTUNLEARN_BENCH_DIR"), Path(__file__).resolve().parents[3] / "bench", "bench"]
    for root in filter(None, roots):
        path = os.path.join(root, f"bench_{name}.py")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"bench_{name}.py not found (looked in $FASTUNLEARN_BENCH_DIR and the source "
                            "checkout's bench/); the benchmarks ship with the source tree, not the wheel")


def _option(rest, name, default=None):
    for i, a in enumerate(rest):
        if a == name and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def cmd_bench(args):
    script = _bench_script(args.name)
    rest = list(args.args)
    profile_dir = args.profile
    for i, a in enumerate(rest):
        if a == "--profile" and i + 1 < len(rest):
            profile_dir = rest[i + 1]
            del rest[i:i + 2]
            break
        if a.startswith("--profile="):
            profile_dir = a.split("=", 1)[1]
            del rest[i]
            break
    if profile_dir and args.name in ("e2e", "revision", "cold_start"):
        rest += ["--profile", profile_dir]  # they profile their own runs, on their own model
        profile_dir = None
    old_argv = sys.argv
    sys.argv = [script] + rest

    def run():
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise

    try:
        if not profile_dir:
            run()
            return
        dev = torch.device(_option(rest, "--device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = profiling.trace(run, os.path.join(profile_dir, "trace.json"), dev)
        # The roofline runs on the benchmark's model family: AllCNN at its --width on the
        # default dataset, or the model file given with --model.
        name, splits = data.load_default(_option(rest, "--data-dir"))
        x, y = splits["train"]
        mean, std = data.channel_stats(x[:4096])
        model_file = _option(rest, "--model")
        if model_file:
            model, meta = load_model(model_file, dev)
            mean, std = meta.get("mean", mean), meta.get("std", std)
        else:
            model = create_model("allcnn", in_channels=int(x.shape[1]), num_classes=int(y.max()) + 1,
                                 width=float(_option(rest, "--width", 0.25))).to(dev).eval()
        rows, peaks = profiling.roofline(model, x[:512], y[:512], mean=mean, std=std, device=dev)
        dname = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
        print("\n" + profiling.write_summary(rows, peaks, profile_dir, dname))
        print(f"trace: {path}")
    finally:
        sys.argv = old_argv


def add_parser(sub, fmt):
    bn = sub.add_parser("bench", help="run a benchmark: " + " | ".join(BENCHES),
                        description="Run bench/bench_NAME.py with the remaining arguments (see "
                        "`fastunlearn bench NAME --help`). --profile DIR (anywhere on the line) also writes a "
                        "torch.profiler trace (trace.json, opens in Perfetto or chrome://tracing) and a roofline "
                        "summary (roofline.txt/json) of the search, a train step and the elementwise ops; for "
                        "revision, a trace of one warm revision per case with its top ops; for cold_start, the first "
                        "call's trace and the table of what it paid more than the second.")
    bn.add_argument("--profile", metavar="DIR", help="write trace.json and roofline.txt/json to DIR")
    bn.add_argument("name", choices=BENCHES, help="which benchmark to run (bench/bench_NAME.py)")
    bn.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bn.set_defaults(func=cmd_bench)
