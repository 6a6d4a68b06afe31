"""Search engine vs an op-for-op rewrite of the authors' inner loop, same model and data.

The authors' loop (fastunlearn.authors.authors_search): batches of 64, a full backward
(weight gradients too) for the input gradient, the eager step chain, and a second forward
with an autograd graph for the relabel. The engine: a frozen copy, big chunks, the
input-only backward seeded by relabel_check's dlogits, the fused boundary_step, one check
forward at the end; it is timed again on a copy whose BatchNorm layers are not folded into
the convolutions (what folding buys). Both run T = 1 FGSM at eps = 0.1 on the same images;
the table shows samples/s, the ratio and how many labels agree. With --curve it also times
T = 1..8 with and without early exit, to show the cost per sample falling as samples
cross. With --compile it also times the engine with search_compile=True (torch.compile of
the frozen model): compile seconds, warm samples/s against the eager engine, and label
agreement.

With --precision bf16 (or fp16, or auto on a GPU) a second table compares, for each T in
--lowp-steps, the low-precision engine with and without its fp32 recheck against the fp32
engine: samples/s, the fraction of samples rechecked, and how many labels equal fp32's.
On CPUs without bf16 units autocast is emulated and far slower than fp32; there only the
fractions mean anything.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, device_name, print_table, sync  # noqa: E402

from fastunlearn import UnlearnConfig, data  # noqa: E402
from fastunlearn.authors import authors_search  # noqa: E402
from fastunlearn.models import create_model  # noqa: E402
from fastunlearn.search import frozen_copy, resolve_precision, run_search  # noqa: E402
from fastunlearn.train import train_classifier  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="FashionMNIST directory (default: $FASTUNLEARN_DATA or Debian's path; "
                   "falls back to sklearn digits)")
    p.add_argument("--n", type=int, default=2048, help="forget samples searched")
    p.add_argument("--arch", default="allcnn")
    p.add_argument("--width", type=float, default=0.25, help="AllCNN width (1 = the paper's)")
    p.add_argument("--size", type=int, default=0, help="resize images to SIZE x SIZE (0 = native), e.g. 32")
    p.add_argument("--channels", type=int, default=0, help="repeat grey images to this many channels (0 = native)")
    p.add_argument("--train-epochs", type=int, default=1, help="epochs to train the model first (0 = random init)")
    p.add_argument("--precision", default="auto", help="engine precision: auto | fp32 | bf16 | fp16")
    p.add_argument("--recheck-margin", type=float, default=None,
                   help="UnlearnConfig.recheck_margin for a low precision (default: the config's)")
    p.add_argument("--lowp-steps", default="1,4", help="T values of the low-precision table (comma-separated)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--chunk", type=int, default=None, help="engine chunk size (default: from free memory)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--curve", action="store_true", help="also time T = 1, 2, 4, 8 with and without early exit")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine with search_compile=True: compile seconds (first search minus a "
                        "warm one), warm samples/s, and labels against the eager engine")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None, help="CSV file to append rows to (default bench/results.csv)")
    return p.parse_args()


def load(args):
    name, splits = data.load_default(args.data_dir)
    x, y = splits["train"]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)
    train = (x[idx[: max(args.n, 4000)]], y[idx[: max(args.n, 4000)]])
    forget = (x[idx[:args.n]], y[idx[:args.n]])
    if args.size or args.channels:
        def reshape(t):
            t = t.float()
            if args.size:
                t = torch.nn.functional.interpolate(t, size=(args.size, args.size), mode="bilinear")
            if args.channels:
                t = t.repeat(1, args.channels // t.shape[1], 1, 1)
            return t.round().clamp(0, 255).to(torch.uint8)
        train, forget = (reshape(train[0]), train[1]), (reshape(forget[0]), forget[1])
    return name, train, forget


def median_time(fn, device, reps):
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name, train, forget = load(args)
    mean, std = data.channel_stats(train[0])
    c = train[0].shape[1]
    kwargs = {"width": args.width} if args.arch in ("allcnn", "smallcnn") else {}
    if args.arch.startswith("resnet"):
        # The ImageNet stem (7x7/2 + max-pool) from 96 px up: the small-image stem keeps
        # full resolution through layer1, 16x the activations at 512 px.
        kwargs["small_input"] = train[0].shape[-1] < 96
    torch.manual_seed(args.seed)  # the same initialisation, so the same model, run after run
    model = create_model(args.arch, in_channels=c, num_classes=int(train[1].max()) + 1, **kwargs)
    if args.train_epochs:
        model = train_classifier(model, train, args.train_epochs, mean=mean, std=std, device=dev, seed=args.seed,
                                 progress=False)
    model = model.to(dev).eval()
    fx, fy = forget
    n = len(fy)
    cfg = UnlearnConfig(eps=0.1, steps=1, precision=args.precision, search_batch_size=args.chunk)
    if args.recheck_margin is not None:
        cfg = cfg.replace(recheck_margin=args.recheck_margin)
    mean_t = torch.tensor(mean, device=dev)
    std_t = torch.tensor(std, device=dev)

    # The authors' frozen copy keeps requires_grad on its weights.
    test_model = copy.deepcopy(model)
    x_pix = fx.to(dev).float() / 255
    y_dev = fy.to(dev)
    frozen = frozen_copy(model, dev)
    run_search(model, fx[:64], fy[:64], cfg, mean=mean, std=std, device=dev, frozen=frozen)  # warm-up
    authors_search(test_model, x_pix[:64], y_dev[:64], cfg, mean_t, std_t)
    t_auth, (auth_labels, _) = median_time(lambda: authors_search(test_model, x_pix, y_dev, cfg, mean_t, std_t),
                                           dev, args.reps)
    t_ours, res = median_time(lambda: run_search(model, fx, fy, cfg, mean=mean, std=std, device=dev,
                                                 frozen=frozen), dev, args.reps)
    agree = float((res.relabels[0] == auth_labels.cpu()).float().mean())
    # The same engine on a copy that keeps its BatchNorm layers: what folding them buys.
    unfolded = frozen_copy(model, dev, fold=False)
    run_search(model, fx[:64], fy[:64], cfg, mean=mean, std=std, device=dev, frozen=unfolded)  # warm-up
    t_unf, res_u = median_time(lambda: run_search(model, fx, fy, cfg, mean=mean, std=std, device=dev,
                                                  frozen=unfolded), dev, args.reps)
    dname = device_name(dev)
    shape = "x".join(str(s) for s in fx.shape[1:])
    rows = [
        {"bench": "search", "provider": "authors' loop (batch 64)", "samples_per_s": n / t_auth, "ratio": 1.0,
         "labels_agree": 1.0},
        {"bench": "search", "provider": f"fastunlearn ({cfg.precision})", "samples_per_s": n / t_ours,
         "ratio": t_auth / t_ours, "labels_agree": agree},
        {"bench": "search", "provider": "  same, BatchNorm not folded", "samples_per_s": n / t_unf,
         "ratio": t_auth / t_unf, "labels_agree": float((res_u.relabels[0] == auth_labels.cpu()).float().mean())},
    ]
    compile_note = ""
    if args.compile:
        ccfg = cfg.replace(search_compile=True)
        sync(dev)
        t0 = time.perf_counter()
        run_search(model, fx, fy, ccfg, mean=mean, std=std, device=dev, frozen=frozen)
        sync(dev)
        t_first = time.perf_counter() - t0
        t_comp, res_c = median_time(lambda: run_search(model, fx, fy, ccfg, mean=mean, std=std, device=dev,
                                                       frozen=frozen), dev, args.reps)
        rows.append({"bench": "search", "provider": f"fastunlearn ({cfg.precision}, search_compile)",
                     "samples_per_s": n / t_comp, "ratio": t_auth / t_comp,
                     "labels_agree": float((res_c.relabels[0] == auth_labels.cpu()).float().mean()),
                     "vs_eager": t_ours / t_comp, "compile_s": max(0.0, t_first - t_comp),
                     "agree_eager": float((res_c.relabels == res.relabels).float().mean())})
        compile_note = (f"search_compile: {rows[-1]['vs_eager']:.2f}x the eager engine once warm, "
                        f"{rows[-1]['compile_s']:.1f} s of compile, labels equal to the eager engine's "
                        f"for {100 * rows[-1]['agree_eager']:.2f}% of samples")
    print(f"\nsearch, T=1 FGSM, {n} x {shape} {name} images, {args.arch} width {args.width}, {dname}")
    print_table(rows, ["provider", "samples_per_s", "ratio", "labels_agree"])
    if compile_note:
        print(compile_note)
    common = {"device": dname, "model": f"{args.arch}-w{args.width}", "input": shape, "n": n}
    csv_rows = [dict(common, **r) for r in rows]

    if args.curve:
        curve = []
        for steps in (1, 2, 4, 8):
            for early in (False, True):
                c2 = cfg.replace(steps=steps, early_exit=early)
                t, r = median_time(lambda: run_search(model, fx, fy, c2, mean=mean, std=std, device=dev,
                                                      frozen=frozen), dev, args.reps)
                curve.append({"bench": "search-curve", "provider": f"T={steps} early_exit={early}",
                              "steps": steps, "early_exit": early, "us_per_sample": 1e6 * t / n,
                              "mean_steps_taken": float(r.steps[0].float().mean()),
                              "crossed": float(r.success[0].float().mean())})
        print("\ncost per sample against T (early exit stops a sample once it has crossed)")
        print_table(curve, ["provider", "us_per_sample", "mean_steps_taken", "crossed"])
        csv_rows += [dict(common, **r) for r in curve]
    if resolve_precision(cfg.precision, dev) is not None:
        csv_rows += [dict(common, **r) for r in low_precision_table(model, fx, fy, cfg, mean, std, dev, frozen, args)]
    path = append_csv(csv_rows, args.csv)
    print(f"\nappended {len(csv_rows)} rows to {path}")


def low_precision_table(model, fx, fy, cfg, mean, std, dev, frozen, args):
    """The low-precision engine with and without its fp32 recheck, against the fp32 engine."""
    n = len(fy)
    low = resolve_precision(cfg.precision, dev)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[low]
    rows = []
    for steps in (int(t) for t in args.lowp_steps.split(",")):
        base = cfg.replace(steps=steps)
        runs = {}
        for label, c in (("fp32", base.replace(precision="fp32")),
                         (f"{name}, no recheck", base.replace(precision=name, recheck_margin=0.0)),
                         (f"{name}, recheck margin {base.recheck_margin:g}", base.replace(precision=name))):
            runs[label] = median_time(lambda c=c: run_search(model, fx, fy, c, mean=mean, std=std, device=dev,
                                                             frozen=frozen), dev, args.reps)
        ref = runs["fp32"][1].relabels
        t_plain = runs[f"{name}, no recheck"][0]
        for label, (t, res) in runs.items():
            rechecked = res.rechecked
            rows.append({"bench": "search-lowp", "provider": label, "steps": steps, "samples_per_s": n / t,
                         "vs_fp32": runs["fp32"][0] / t,
                         "agree_fp32": float((res.relabels == ref).float().mean()),
                         "rechecked": None if rechecked is None else float(rechecked.float().mean()),
                         "recheck_time_share": (t - t_plain) / t if rechecked is not None else None})
    print(f"\n{name} against fp32, with and without the fp32 recheck of unsure samples")
    print_table(rows, ["provider", "steps", "samples_per_s", "vs_fp32", "agree_fp32", "rechecked",
                       "recheck_time_share"])
    return rows


if __name__ == "__main__":
    main()
