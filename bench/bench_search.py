"""Search engine vs an op-for-op rewrite of the authors' inner loop, same model and data.

The authors' loop (fastunlearn.eval.authors.authors_search): batches of 64, a full backward
(weight gradients too) for the input gradient, the eager step chain, and a second forward
with an autograd graph for the relabel; fp32 under the process's own settings (on GPUs,
PyTorch's default TF32 convolutions), as their code runs. The engine: a frozen copy, big
chunks, the input-only backward seeded by relabel_check's dlogits, the fused boundary_step,
one check forward at the end.

Each engine variant (--variants) names its precision explicitly, so no row depends on what
precision="auto" resolves to:
  fp32              precision="fp32" under the process's settings (TF32 convolutions on GPUs)
  fp32-ieee         precision="fp32" with IEEE fp32 convolutions and matmuls
  bf16-norecheck    precision="bf16", recheck_margin=0
  bf16              precision="bf16" with its recheck of unsure samples in IEEE fp32
  bf16-tf32recheck  the same, the recheck under the process's fp32 settings (TF32 on GPUs)
  bf16-autotuned    bf16 with cuDNN autotuning on (torch.backends.cudnn.benchmark; its untimed
                    run pays the tuning)
  unfolded          the first variant's precision on a frozen copy whose BatchNorm layers are
                    not folded into the convolutions (what folding buys)
Every provider runs once untimed over the whole set (every chunk shape meets its cuDNN plans
then), then --reps timed runs, each reported. Labels are compared with the authors' loop and
with the most exact fp32 variant run; for the bf16 recheck, how many of the samples it redid
got another label under TF32 than under IEEE (the flip risk of a TF32 recheck).

--curve also times T = 1..8 with and without early exit; --compile times search_compile=True;
--profile DIR writes a torch.profiler table (ops by device time) of one chunk in bf16.
The images may be resized (--size) and repeated to 3 channels (--channels) a chunk at a time
on the host, and --dataset retina uses RetinaMNIST's fundus photographs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402
from common import DATASETS, append_csv, device_name, load_splits, model_label, print_table, resized, sync  # noqa: E402

from fastunlearn import UnlearnConfig
from fastunlearn.data import io as data
from fastunlearn.data.pixels import Normalizer
from fastunlearn.engine import search  # noqa: E402
from fastunlearn.engine.search import run_search
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval.authors import authors_search  # noqa: E402
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.models import create_model  # noqa: E402
from fastunlearn.runtime.precision import strict_fp32  # noqa: E402

# name -> (precision, recheck margin (None: the config's), fp32 mode of the recheck, IEEE fp32
# around the run, cuDNN autotuning)
VARIANTS = {
    "auto": ("auto", None, None, False, False),
    "fp32": ("fp32", None, None, False, False),
    "fp32-ieee": ("fp32", None, None, True, False),
    "bf16-norecheck": ("bf16", 0.0, None, False, False),
    "bf16": ("bf16", None, "ieee", False, False),
    "bf16-tf32recheck": ("bf16", None, "tf32", False, False),
    "bf16-autotuned": ("bf16", None, "ieee", False, True),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-dir", help="data folder (default: $FASTUNLEARN_DATA, or Debian's path for FashionMNIST; "
                   "FashionMNIST falls back to sklearn digits)")
    p.add_argument("--n", type=int, default=2048, help="forget samples searched")
    p.add_argument("--arch", default="allcnn", help="a fastunlearn model name, or zoo:<name> (see bench/zoo.py)")
    p.add_argument("--zoo", nargs="?", const="all", default=None,
                   help="run every model of bench/zoo.py (or those named, comma-separated), each in a fresh "
                        "process against the authors' loop, with the default precision (variant auto)")
    p.add_argument("--width", type=float, default=0.25, help="AllCNN width (1 = the paper's)")
    p.add_argument("--size", type=int, default=0, help="resize images to SIZE x SIZE (0 = native), e.g. 32 or 512")
    p.add_argument("--channels", type=int, default=0, help="repeat grey images to this many channels (0 = native)")
    p.add_argument("--train-epochs", type=int, default=1, help="epochs to train the model first (0 = random init)")
    p.add_argument("--train-precision", default="auto", help="precision of that training: fp32 | bf16 | auto")
    p.add_argument("--steps", type=int, default=1, help="inner steps T of the timed search (1 = FGSM)")
    p.add_argument("--variants", default="fp32,bf16",
                   help=f"engine variants, comma-separated, from {', '.join(VARIANTS)}, unfolded")
    p.add_argument("--precision", default="fp32", help="engine precision of --curve and --compile: fp32 | bf16")
    p.add_argument("--recheck-margin", type=float, default=None,
                   help="UnlearnConfig.recheck_margin of the bf16 variants (default: the config's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--chunk", type=int, default=None, help="engine chunk size (default: from free memory)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per provider, each reported")
    p.add_argument("--curve", action="store_true", help="also time T = 1, 2, 4, 8 with and without early exit")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine with search_compile=True: compile seconds (first search minus a "
                        "warm one), warm samples/s, and labels against the eager engine")
    p.add_argument("--profile", metavar="DIR", help="write a profiler table of one bf16 chunk to DIR/search_ops.txt")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None, help="CSV file to append rows to (default bench/results.csv)")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS and v != "unfolded"]
    if unknown:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}, unfolded")
    return args


def load(args):
    """(name, train, forget, mean, std): uint8 images at the asked size, stats at the native size."""
    name, splits = load_splits(args.dataset, args.data_dir)
    x, y = splits["train"]
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if args.n > len(y):
        raise SystemExit(f"--n {args.n}: {name} has {len(y)} training images")
    keep = idx[: max(args.n, min(4000, len(y)))]
    mean, std = data.channel_stats(x[keep], chunk=256)
    if args.channels and args.channels != x.shape[1]:
        mean, std = mean * (args.channels // x.shape[1]), std * (args.channels // x.shape[1])
    train = (resized(x[keep], args.size, args.channels), y[keep])
    return name, train, (train[0][: args.n], train[1][: args.n]), mean, std


def original(args, train, mean, std, dev):
    c = train[0].shape[1]
    torch.manual_seed(args.seed)  # the same initialisation, so the same model, run after run
    if zoo.is_zoo_arch(args.arch):
        model = zoo.create(args.arch, c, int(train[1].max()) + 1, int(train[0].shape[-1]))
        return trained(args, model, train, mean, std, dev)
    kwargs = {"width": args.width} if args.arch in ("allcnn", "smallcnn") else {}
    if args.arch.startswith("resnet"):
        # The ImageNet stem (7x7/2 + max-pool) from 96 px up: the small-image stem keeps
        # full resolution through layer1, 16x the activations at 512 px.
        kwargs["small_input"] = train[0].shape[-1] < 96
    model = create_model(args.arch, in_channels=c, num_classes=int(train[1].max()) + 1, **kwargs)
    return trained(args, model, train, mean, std, dev)


def trained(args, model, train, mean, std, dev):
    if args.train_epochs:
        model = train_classifier(model, train, args.train_epochs, mean=mean, std=std, device=dev, seed=args.seed,
                                 progress=False, precision=args.train_precision, batch_size=64)
    return model.to(dev).eval()


def timed_reps(fn, device, reps, first=None):
    """One untimed run (every shape meets its plans), then ``reps`` timed ones: (seconds each, last output).
    The untimed run's seconds are appended to ``first`` when given."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    if first is not None:
        first.append(time.perf_counter() - t0)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


@contextlib.contextmanager
def recheck_mode(mode):
    before = search.RECHECK_FP32
    search.RECHECK_FP32 = mode or before
    try:
        yield
    finally:
        search.RECHECK_FP32 = before


@contextlib.contextmanager
def cudnn_autotuning(on: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def variant_runner(name, model, forget, base, mean, std, dev, frozen):
    """A callable running one engine variant over the forget set, and its config."""
    fx, fy = forget
    if name == "unfolded":
        unfolded = frozen_copy(model, dev, fold=False)
        return (lambda: run_search(model, fx, fy, base, mean=mean, std=std, device=dev, frozen=unfolded)), base
    precision, margin, recheck, ieee, autotune = VARIANTS[name]
    cfg = base.replace(precision=precision)
    if margin is not None:
        cfg = cfg.replace(recheck_margin=margin)

    def run():
        with recheck_mode(recheck), strict_fp32(dev, enabled=ieee), cudnn_autotuning(autotune):
            return run_search(model, fx, fy, cfg, mean=mean, std=std, device=dev, frozen=frozen)
    return run, cfg


def main(argv=None):
    args = parse(argv)
    if args.zoo:
        return zoo.run_zoo(os.path.abspath(__file__), "search", sys.argv[1:] if argv is None else list(argv),
                           args.zoo, torch.device(args.device).type, args.csv,
                           ["provider", "input", "n", "samples_per_s", "ratio", "first_s", "ratio_first",
                            "labels_agree", "seconds_each"])
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name, train, forget, mean, std = load(args)
    model = original(args, train, mean, std, dev)
    fx, fy = forget
    n = len(fy)
    base = UnlearnConfig(eps=0.1, steps=args.steps, search_batch_size=args.chunk)
    if args.recheck_margin is not None:
        base = base.replace(recheck_margin=args.recheck_margin)
    mean_t, std_t = torch.tensor(mean, device=dev), torch.tensor(std, device=dev)

    # The authors' frozen copy keeps requires_grad on its weights.
    test_model = copy.deepcopy(model)
    x_pix, y_dev = fx.to(dev).float() / 255, fy.to(dev)
    frozen = frozen_copy(model, dev)
    first = {}
    t_auth, (auth_labels, _) = timed_reps(lambda: authors_search(test_model, x_pix, y_dev, base, mean_t, std_t),
                                          dev, args.reps, first.setdefault("authors", []))
    x_pix = None  # frees the float copy
    auth_labels = auth_labels.cpu()
    variants = args.variants.split(",")
    runs = {}
    for v in variants:
        fn, _ = variant_runner(v, model, forget, base.replace(precision=args.precision) if v == "unfolded" else base,
                               mean, std, dev, frozen)
        runs[v] = timed_reps(fn, dev, args.reps, first.setdefault(v, []))
    exact = next((v for v in ("fp32-ieee", "fp32") if v in runs), None)
    rows = [provider_row("authors' loop (batch 64, fp32)", t_auth, t_auth, n, auth_labels, auth_labels, None)]
    for v, (times, res) in runs.items():
        ref = runs[exact][1].relabels[0] if exact else None
        rows.append(provider_row(f"fastunlearn {v}", times, t_auth, n, res.relabels[0], auth_labels, ref,
                                 res.rechecked))
    for r, key in zip(rows, ["authors", *runs]):
        # The first call of the process (plans, allocations, the chunk-size measurement) and its ratio.
        r.update(first_s=first[key][0], ratio_first=first["authors"][0] / first[key][0])
    shape = "x".join(str(s) for s in fx.shape[1:])
    dname = device_name(dev)
    print(f"\nsearch, T={args.steps}, {n} x {shape} {name} images, {model_label(args.arch, args.width)}, {dname}")
    print_table(rows, ["provider", "samples_per_s", "ratio", "first_s", "ratio_first", "labels_agree",
                       "agree_exact", "rechecked", "seconds_each"])
    print(f"labels_agree: with the authors' loop; agree_exact: with fastunlearn {exact}")
    flip_note = tf32_recheck_flips(runs)
    if flip_note:
        print(flip_note)
    common = {"device": dname, "model": model_label(args.arch, args.width), "input": shape, "n": n, "dataset": name,
              "steps": args.steps}
    csv_rows = [dict(common, bench="search", **r) for r in rows]
    cfg = base.replace(precision=args.precision)
    if args.compile:
        csv_rows.append(dict(common, **compile_row(model, forget, cfg, mean, std, dev, frozen, t_auth, auth_labels,
                                                   args.reps)))
    if args.curve:
        csv_rows += [dict(common, **r) for r in curve_rows(model, forget, cfg, mean, std, dev, frozen, args.reps)]
    if args.profile:
        profile_chunk(model, forget, base.replace(precision="bf16"), mean, std, dev, frozen, args.profile)
    path = append_csv(csv_rows, args.csv)
    print(f"\nappended {len(csv_rows)} rows to {path}")


def provider_row(provider, times, t_auth, n, labels, auth_labels, exact_labels, rechecked=None):
    med = sorted(times)[len(times) // 2]
    return {"provider": provider, "samples_per_s": n / med, "ratio": sorted(t_auth)[len(t_auth) // 2] / med,
            "labels_agree": float((labels == auth_labels).float().mean()),
            "agree_exact": None if exact_labels is None else float((labels == exact_labels).float().mean()),
            "rechecked": None if rechecked is None else float(rechecked.float().mean()),
            "seconds_each": " ".join(f"{t:.3f}" for t in times)}


def tf32_recheck_flips(runs) -> str:
    """Among the samples the IEEE recheck redid, how many a TF32 recheck labels otherwise."""
    if "bf16" not in runs or "bf16-tf32recheck" not in runs:
        return ""
    ieee, tf32 = runs["bf16"][1], runs["bf16-tf32recheck"][1]
    redone = ieee.rechecked[0]
    differ = int((ieee.relabels[0][redone] != tf32.relabels[0][redone]).sum())
    return (f"recheck in TF32 vs IEEE: {differ} of the {int(redone.sum())} redone samples labelled otherwise "
            f"({differ / max(1, len(redone)):.4%} of all)")


def compile_row(model, forget, cfg, mean, std, dev, frozen, t_auth, auth_labels, reps):
    fx, fy = forget
    ccfg = cfg.replace(search_compile=True)
    sync(dev)
    t0 = time.perf_counter()
    run_search(model, fx, fy, ccfg, mean=mean, std=std, device=dev, frozen=frozen)
    sync(dev)
    t_first = time.perf_counter() - t0
    eager, res = timed_reps(lambda: run_search(model, fx, fy, cfg, mean=mean, std=std, device=dev, frozen=frozen),
                            dev, reps)
    comp, res_c = timed_reps(lambda: run_search(model, fx, fy, ccfg, mean=mean, std=std, device=dev, frozen=frozen),
                             dev, reps)
    row = provider_row(f"fastunlearn {cfg.precision}, search_compile", comp, t_auth, len(fy), res_c.relabels[0],
                       auth_labels, res.relabels[0])
    med = sorted(comp)[len(comp) // 2]
    row.update(bench="search-compile", vs_eager=sorted(eager)[len(eager) // 2] / med,
               compile_s=max(0.0, t_first - med))
    print(f"search_compile: {row['vs_eager']:.2f}x the eager engine once warm, {row['compile_s']:.1f} s of compile, "
          f"labels equal to the eager engine's for {100 * row['agree_exact']:.2f}% of samples")
    return row


def curve_rows(model, forget, cfg, mean, std, dev, frozen, reps):
    fx, fy = forget
    rows = []
    for steps in (1, 2, 4, 8):
        for early in (False, True):
            c2 = cfg.replace(steps=steps, early_exit=early)
            times, r = timed_reps(lambda: run_search(model, fx, fy, c2, mean=mean, std=std, device=dev, frozen=frozen),
                                  dev, reps)
            rows.append({"bench": "search-curve", "provider": f"T={steps} early_exit={early}", "steps": steps,
                         "early_exit": early, "us_per_sample": 1e6 * sorted(times)[len(times) // 2] / len(fy),
                         "mean_steps_taken": float(r.steps[0].float().mean()),
                         "crossed": float(r.success[0].float().mean())})
    print("\ncost per sample against T (early exit stops a sample once it has crossed)")
    print_table(rows, ["provider", "us_per_sample", "mean_steps_taken", "crossed"])
    return rows


def profile_chunk(model, forget, cfg, mean, std, dev, frozen, out_dir):
    """Ops of one chunk's bf16 search (with its recheck) by device time, to out_dir/search_ops.txt."""
    from torch.profiler import ProfilerActivity, profile

    fx, fy = forget
    chunk = search._chunk_size(frozen, Normalizer(mean, std, fx.shape[1], dev), fx[:8], dev,
                               cfg.search_batch_size, torch.bfloat16)
    rows = slice(0, min(len(fy), chunk))
    run = lambda: run_search(model, fx[rows], fy[rows], cfg, mean=mean, std=std, device=dev, frozen=frozen)  # noqa: E731
    run()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "search_ops.txt")
    with open(path, "w") as f:
        f.write(f"one chunk of {rows.stop} samples, bf16 with recheck\n{table}\n")
    print(f"\nprofile of one bf16 chunk ({rows.stop} samples), top ops by device time ({path}):")
    print("\n".join(table.splitlines()[:20]))


if __name__ == "__main__":
    main()
