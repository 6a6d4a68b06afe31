"""End to end: fu.unlearn against an op-for-op rewrite of the authors' loop, same model, data, config.

One process, one original model (trained here for a few epochs, or loaded with --model),
one forget set (a class of a FashionMNIST subset) and its remain set. Both runs use the
authors' defaults (batch 64, lr 1e-5, momentum 0.9, 10 epochs, eps 0.1, gamma 0), so the
quality comparison is fair; the rewrite gets its data already in memory as float tensors.
Prints wall time, the ratio, forget / remain / test accuracy and MIA-LR for both, where
our time goes (search, fine-tune, compile, set-up; and by fastunlearn.runtime.profiling.phases,
which adds a device sync at each of the run's few phase edges), the share of the rewrite's
time spent in its per-iteration search, and the p50 of a warm revision of 64 samples
through fu.Unlearner. Appends rows to the CSV. --profile DIR also writes a torch.profiler trace
of our run and a roofline summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402
from common import DATASETS, append_csv, device_name, load_splits, model_label, print_table, resized, sync  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.data import io as data
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval.authors import authors_search, authors_unlearn  # noqa: E402
from fastunlearn.eval.metrics import evaluate  # noqa: E402
from fastunlearn.nn.fuse import batch_norm_fusion_on  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402
from fastunlearn.runtime import profiling  # noqa: E402
from fastunlearn.runtime.precision import resolve_precision  # noqa: E402


def add_setup_args(p):
    """The data, the original model and the run-wide switches (shared with bench_revision.py)."""
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS,
                   help="fashion-mnist (falls back to sklearn digits) or retina (RetinaMNIST fundus photographs)")
    p.add_argument("--data-dir", help="data folder (default: $FASTUNLEARN_DATA, or Debian's path for FashionMNIST)")
    p.add_argument("--train-size", type=int, default=6000, help="training subset (seeded); 0 = all")
    p.add_argument("--test-size", type=int, default=0, help="test subset evaluated (seeded); 0 = all")
    p.add_argument("--size", type=int, default=0, help="resize every image to SIZE x SIZE (0 = native), e.g. 512")
    p.add_argument("--channels", type=int, default=0, help="repeat grey images to this many channels (0 = native)")
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument("--forget-size", type=int, default=0, help="forget only this many of the class (seeded; 0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="fine-tune batch (both runs; the authors' clinical: 16)")
    p.add_argument("--arch", default="allcnn", help="a fastunlearn model name, or zoo:<name> (see bench/zoo.py)")
    p.add_argument("--zoo", nargs="?", const="all", default=None,
                   help="run every model of bench/zoo.py (or those named, comma-separated), each in a fresh "
                        "process against the authors' loop (bench_revision.py: with --authors)")
    p.add_argument("--width", type=float, default=0.25, help="AllCNN width (1 = the paper's)")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs to train the original")
    p.add_argument("--train-precision", default="fp32", help="precision of that training: fp32 | bf16 | auto")
    p.add_argument("--model", help="a .safetensors original to load; trained and saved there if missing")
    p.add_argument("--search-batch-size", type=int, default=None,
                   help="our search's chunk (UnlearnConfig.search_batch_size; default: sized from free memory)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="CSV file to append rows to (default bench/results.csv)")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p)
    p.add_argument("--epochs", type=int, default=10, help="unlearning epochs (both runs)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile our train step")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"),
                   help="replay our eager train step as a CUDA graph (auto: on for CUDA with compile off)")
    p.add_argument("--precision", default="auto", help="our precision: auto | fp32 | bf16 (the rewrite runs fp32)")
    p.add_argument("--gamma", type=float, default=0.0, help="noise scale (both runs; > 0 redoes the search per batch)")
    p.add_argument("--ours-reps", type=int, default=0,
                   help="after the cold run, time fu.unlearn this many more times in the same process (warm)")
    p.add_argument("--fuse-batch-norm", default="auto", choices=("auto", "on", "off"),
                   help="our train step's BatchNorm + ReLU as the native op (auto: on CPU only)")
    p.add_argument("--warm-reps", type=int, default=7, help="warm revisions of 64 samples timed (0 = skip)")
    p.add_argument("--no-authors-split", action="store_true", help="skip timing the rewrite's search alone")
    p.add_argument("--authors-pil", action="store_true",
                   help="also time the rewrite with its batches decoded one PIL image per sample through a "
                        "DataLoader, as the authors' code loads them (same batches, same model)")
    p.add_argument("--authors-workers", type=int, default=0, help="DataLoader workers for --authors-pil")
    p.add_argument("--profile", metavar="DIR", help="write trace.json and roofline.txt/json to DIR")
    return p.parse_args(argv)


def load(args):
    """(name, train, forget, remain, test, mean, std): uint8 images at the asked size; the
    statistics are taken at the native size, before any resize."""
    name, splits = load_splits(args.dataset, args.data_dir)
    x, y = splits["train"]
    if args.train_size and args.train_size < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:args.train_size]
        x, y = x[idx.sort().values], y[idx.sort().values]
    mean, std = data.channel_stats(x, chunk=1024)
    if args.channels and args.channels != x.shape[1]:
        mean, std = mean * (args.channels // x.shape[1]), std * (args.channels // x.shape[1])
    x = resized(x, args.size, args.channels)
    tx, ty = splits["test"]
    if args.test_size and args.test_size < len(ty):
        keep = torch.randperm(len(ty), generator=torch.Generator().manual_seed(args.seed))[:args.test_size]
        tx, ty = tx[keep.sort().values], ty[keep.sort().values]
    test = (resized(tx, args.size, args.channels), ty)
    f = y == args.forget_class
    forget = (x[f], y[f])
    if args.forget_size and args.forget_size < len(forget[1]):
        keep = torch.randperm(len(forget[1]), generator=torch.Generator().manual_seed(args.seed))[:args.forget_size]
        forget = (forget[0][keep], forget[1][keep])
    return name, (x, y), forget, (x[~f], y[~f]), test, mean, std


def original_model(args, train, mean, std, dev):
    from fastunlearn.data.checkpoint import load_model, save_model

    if args.model and os.path.exists(args.model):
        model, _ = load_model(args.model, dev)
        return model
    arch = {"name": args.arch, "in_channels": int(train[0].shape[1]), "num_classes": int(train[1].max()) + 1}
    torch.manual_seed(args.seed)  # the initialisation too: a run with the same seed trains the same original
    if zoo.is_zoo_arch(args.arch):
        model = zoo.create(args.arch, arch["in_channels"], arch["num_classes"], int(train[0].shape[-1]))
        return train_classifier(model, train, args.train_epochs, mean=mean, std=std, device=dev, seed=args.seed,
                                progress=False, precision=args.train_precision).to(dev).eval()
    if args.arch in ("allcnn", "smallcnn"):
        arch["width"] = args.width if args.arch == "allcnn" else int(args.width)
    if args.arch.startswith("resnet"):
        arch["small_input"] = int(train[0].shape[-1]) < 96  # the ImageNet stem from 96 px up
    model = create_model(**arch)
    model = train_classifier(model, train, args.train_epochs, mean=mean, std=std, device=dev, seed=args.seed,
                             progress=False, precision=args.train_precision)
    if args.model:
        save_model(model, args.model, arch, mean=mean, std=std)
    return model.to(dev).eval()


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


ZOO_COLS = ["input", "n_forget", "seconds_authors", "seconds_ours", "ratio", "search_s", "finetune_s", "tune_s",
            "setup_s", "precision", "tuned", "authors_forget_acc", "ours_forget_acc", "authors_remain_acc",
            "ours_remain_acc", "quality"]
FLAG = {"auto": "auto", "on": True, "off": False}


def setup(args):
    """Threads, device, data and the original model, as the flags ask:
    (dev, name, train, forget, remain, test, mean, std, model)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    name, train, forget, remain, test, mean, std = load(args)
    return dev, name, train, forget, remain, test, mean, std, original_model(args, train, mean, std, dev)


def main(argv=None):
    args = parse(argv)
    if args.zoo:
        return zoo.run_zoo(os.path.abspath(__file__), "e2e", sys.argv[1:] if argv is None else list(argv), args.zoo,
                           torch.device(args.device).type, args.csv, ZOO_COLS)
    dev, name, train, forget, remain, test, mean, std, model = setup(args)
    flag = FLAG
    cfg = fu.UnlearnConfig(epochs=args.epochs, compile=flag[args.compile], cuda_graph=flag[args.cuda_graph],
                           precision=args.precision, seed=args.seed, search_batch_size=args.search_batch_size,
                           fuse_batch_norm=flag[args.fuse_batch_norm], batch_size=args.batch_size,
                           gamma=args.gamma)
    auth_cfg = cfg.replace(precision="fp32", cuda_graph=False)
    kw = dict(mean=mean, std=std, device=dev)

    # The rewrite first, then ours: neither gains from the other having warmed a cache.
    t_auth, (auth_model, _) = timed(lambda: authors_unlearn(model, forget, remain, auth_cfg, **kw), dev)
    # Ours cold, split by phase (first-use costs: cuDNN plans per new shape, graph captures,
    # allocations); the phases add a device sync at each of their few edges.
    with profiling.phases(dev) as cold:
        t_ours, res = timed(lambda: fu.unlearn(model, forget, remain, config=cfg, progress=False, **kw), dev)
    warm_runs = [timed(lambda: fu.unlearn(model, forget, remain, config=cfg, progress=False, **kw), dev)[0]
                 for _ in range(args.ours_reps)]
    t_pil = None
    if args.authors_pil:
        t_pil, (pil_model, _) = timed(lambda: authors_unlearn(model, forget, remain, auth_cfg, loading="pil",
                                                              workers=args.authors_workers, **kw), dev)
        same = all(torch.equal(a, b) for a, b in zip(auth_model.state_dict().values(),
                                                     pil_model.state_dict().values()))

    ev = dict(forget=forget, remain=remain, test=test, max_shadow=1000, **kw)
    m_orig = evaluate(model, **ev)
    m_auth = evaluate(auth_model, **ev)
    m_ours = evaluate(res.model, **ev)

    auth_search_share = None
    if not args.no_authors_split:
        # One epoch of the rewrite's search alone (its frozen copy keeps weight gradients),
        # scaled to every epoch: the part of its time that refresh="once" removes.
        import copy

        test_model = copy.deepcopy(model).to(dev)
        fx = forget[0].to(dev).float() / 255
        t_s, _ = timed(lambda: authors_search(test_model, fx, forget[1].to(dev), auth_cfg,
                                              torch.tensor(mean, device=dev), torch.tensor(std, device=dev)), dev)
        auth_search_share = min(1.0, t_s * args.epochs / t_auth)

    warm_p50 = None
    if args.warm_reps:
        session = fu.Unlearner(model, cfg, **kw)
        g = torch.Generator().manual_seed(args.seed + 1)
        times = []
        for i in range(args.warm_reps + 1):
            idx = torch.randperm(len(forget[1]), generator=g)[:64]
            t, _ = timed(lambda: session.revise((forget[0][idx], forget[1][idx]), progress=False), dev)
            if i:  # the first revision pays set-up and compile
                times.append(t)
        warm_p50 = 1e3 * statistics.median(times)

    dname = device_name(dev)
    fused_bn = batch_norm_fusion_on(dev, res.step_mode == "compiled", cfg) and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    precision_names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    ours_precision = precision_names[resolve_precision(cfg.precision, dev, model, tuple(forget[0].shape[1:]))]
    rows = [dict(provider="original", **m_orig),
            dict(provider="authors' loop (rewrite)", seconds=t_auth, ratio=1.0, **m_auth),
            *([dict(provider=f"  same, PIL per sample, {args.authors_workers} workers", seconds=t_pil,
                    ratio=t_auth / t_pil)] if t_pil is not None else []),
            dict(provider=f"fastunlearn ({res.config.refresh_mode}, {res.step_mode}, {ours_precision}"
                          f"{', BatchNorm fused' if fused_bn else ''})",
                 seconds=t_ours,
                 ratio=t_auth / t_ours, **m_ours)]
    print(f"\nend to end: forget class {args.forget_class} ({len(forget[1])} of {len(train[1])} {name} training "
          f"images), {model_label(args.arch, args.width)}, {args.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, "
          f"eps {cfg.eps}, gamma {cfg.gamma}; {dname}")
    print_table(rows, ["provider", "seconds", "ratio", "forget_acc", "remain_acc", "test_acc", "mia_lr"])
    t = res.timings
    print(f"\nours: search {t['search']:.3f}s, fine-tune {t['finetune']:.3f}s (compile {t['compile']:.3f}s), "
          f"set-up {t['setup']:.3f}s, other {t_ours - t['search'] - t['finetune'] - t['setup']:.3f}s")
    if t.get("tuned"):
        print(f"tuning: {t.get('tune', 0.0):.3f}s, chose {t['tuned']}")
    cold = {k: cold[k] for k in profiling.phase_order(cold)}
    print("ours by phase (s, cold): " + ", ".join(f"{k} {sec:.3f}" for k, (sec, _) in cold.items()))
    if t_pil is not None:
        print(f"ours vs the rewrite loading PIL images: {t_pil / t_ours:.2f}x (its model "
              f"{'equals' if same else 'DIFFERS FROM'} the in-memory rewrite's)")
    if auth_search_share is not None:
        print(f"rewrite: its per-iteration search is about {100 * auth_search_share:.0f}% of its time")
    visits = args.epochs * len(forget[1])
    print(f"per forget-sample visit ({visits} visits): rewrite {1e3 * t_auth / visits:.3f} ms, ours cold "
          f"{1e3 * t_ours / visits:.3f} ms ({t_auth / t_ours:.2f}x)")
    if warm_runs:
        warm_med = statistics.median(warm_runs)
        print(f"ours in a warm process (fu.unlearn again, {len(warm_runs)} runs): "
              f"{', '.join(f'{w:.3f}' for w in warm_runs)} s; median {warm_med:.3f} s = {t_auth / warm_med:.2f}x "
              "the rewrite")
    if warm_p50 is not None:
        print(f"warm revision of 64 samples (fu.Unlearner.revise): p50 {warm_p50:.1f} ms over {args.warm_reps} runs")
    d_forget = 100 * (m_ours["forget_acc"] - m_auth["forget_acc"])
    d_remain = 100 * (m_ours["remain_acc"] - m_auth["remain_acc"])
    print(f"quality vs rewrite: forget {d_forget:+.2f} points, remain {d_remain:+.2f} points")

    common = {"bench": "e2e", "device": dname, "model": model_label(args.arch, args.width), "dataset": name,
              "n_forget": len(forget[1]), "n_remain": len(remain[1]), "epochs": args.epochs,
              "threads": torch.get_num_threads()}
    csv_row = dict(common, provider="fastunlearn vs authors' rewrite", seconds_ours=t_ours, seconds_authors=t_auth,
                   ratio=t_auth / t_ours, seconds_authors_pil=t_pil,
                   ratio_pil=None if t_pil is None else t_pil / t_ours,
                   authors_workers=args.authors_workers if t_pil is not None else None,
                   seconds_ours_warm=";".join(f"{w:.4f}" for w in warm_runs) or None,
                   ms_per_visit_ours=1e3 * t_ours / visits, ms_per_visit_authors=1e3 * t_auth / visits,
                   batch_size=cfg.batch_size, gamma=cfg.gamma, input="x".join(str(v) for v in forget[0].shape[1:]),
                   search_s=t["search"], finetune_s=t["finetune"], compile_s=t["compile"],
                   setup_s=t["setup"], tune_s=t.get("tune"), tuned=t.get("tuned"),
                   quality="ok" if abs(d_forget) <= 2 and abs(d_remain) <= 5 else
                   f"outside (forget {d_forget:+.1f}, remain {d_remain:+.1f} points)",
                   compile=str(res.config.compile), step_mode=res.step_mode, precision=ours_precision,
                   fused_batch_norm=fused_bn,
                   warm_revision_p50_ms=warm_p50,
                   cold_phases_s=";".join(f"{k}={sec:.4f}" for k, (sec, _) in cold.items()),
                   authors_search_share=auth_search_share,
                   **{f"ours_{k}": v for k, v in m_ours.items()}, **{f"authors_{k}": v for k, v in m_auth.items()},
                   **{f"original_{k}": v for k, v in m_orig.items()})
    path = append_csv([csv_row], args.csv)
    print(f"\nappended 1 row to {path}")

    if args.profile:
        trace_path = profiling.trace(lambda: fu.unlearn(model, forget, remain, config=cfg.replace(epochs=1),
                                                        progress=False, **kw),
                                     os.path.join(args.profile, "trace.json"), dev)
        rows, peaks = profiling.roofline(model, forget[0][:512], forget[1][:512], cfg, device=dev, mean=mean, std=std)
        print("\n" + profiling.write_summary(rows, peaks, args.profile, dname))
        print(f"trace (one epoch of ours): {trace_path}")
        with open(os.path.splitext(trace_path)[0] + "_ops.txt") as f:
            print(f.readline().rstrip())
    return csv_row


if __name__ == "__main__":
    main()
