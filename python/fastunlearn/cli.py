"""The `fastunlearn` command: demo, train, unlearn, eval, compose, backends, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DESCRIPTION = """\
Targeted unlearning of image classifiers: make a trained model forget a class, part of
a class, or every sample matching a metadata rule, keep its accuracy elsewhere, and show
it with accuracy and membership-inference metrics.

Images are handled in pixel space ([0, 1] or uint8); normalisation (mean/std) is stored
with the model and applied inside. Model files are safetensors written by `train`,
`unlearn` or `compose`.
"""

EPILOG = """\
examples:
  fastunlearn demo                                   # train, forget class 0, compare with retraining
  fastunlearn train --data digits --arch smallcnn --out orig.safetensors
  fastunlearn unlearn --model orig.safetensors --data digits --forget-class 3 --out forgot.safetensors
  torchrun --nproc_per_node=4 -m fastunlearn.cli unlearn --model orig.safetensors --data digits \\
      --forget-class 3 --out forgot.safetensors      # 4 processes; --batch-size is the global batch
  fastunlearn eval --model forgot.safetensors --data digits --forget-class 3
  fastunlearn unlearn --model retina.safetensors --data retina --data-dir DIR \\
      --forget-rule "device == Topcon NW400" --metadata retina_meta.csv --out r2.safetensors
  fastunlearn compose --backbone a.safetensors --head b.safetensors --out c.safetensors
"""


# ------------------------------------------------------------------- data
def load_splits(name: str, data_dir=None) -> tuple[str, dict]:
    from . import data

    key = name.lower()
    if key in ("auto", "default"):
        return data.load_default(data_dir)
    if key in ("fashion", "fashion-mnist", "fashionmnist"):
        return "fashion-mnist", data.load_fashion_mnist(data_dir)
    if key == "digits":
        return "digits", data.load_digits()
    if key in ("retina", "retinamnist"):
        path = _find_file(data_dir, "retinamnist.npz")
        return "retinamnist", data.load_medmnist(path)
    if key.endswith(".npz"):
        return os.path.basename(key), data.load_medmnist(name)
    if os.path.isdir(name):
        return os.path.basename(os.path.normpath(name)), data.load_fashion_mnist(name)
    raise SystemExit(f"error: --data {name!r} is not a known dataset (auto, fashion-mnist, digits, retina), "
                     "a MedMNIST .npz file, or a directory of IDX files")


def _find_file(data_dir, filename):
    for d in filter(None, [data_dir, os.environ.get("FASTUNLEARN_DATA"), "."]):
        p = os.path.join(d, filename)
        if os.path.exists(p):
            return p
    raise SystemExit(f"error: {filename} not found; pass --data-dir DIR (looked in --data-dir, $FASTUNLEARN_DATA, .)")


def add_data_args(p, forget=True):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="auto", help="auto | fashion-mnist | digits | retina | FILE.npz | IDX directory "
                   "(default: auto = FashionMNIST if installed, else sklearn digits)")
    g.add_argument("--data-dir", help="where the dataset files are (default: $FASTUNLEARN_DATA, Debian's "
                   "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--train-size", type=int, help="use only the first N training images (seeded shuffle)")
    if forget:
        f = p.add_argument_group("forget set (pick one; selected from the training split)")
        f.add_argument("--forget-class", type=int, nargs="+", help="forget every sample of these classes")
        f.add_argument("--forget-fraction", type=float, help="with --forget-class: forget only this seeded fraction")
        f.add_argument("--forget-indices", help="file of training-set indices to forget (one per line or comma-separated)")
        f.add_argument("--forget-rule", action="append", help='metadata rule, e.g. "device == Topcon NW400" or '
                       '"macular_thickness_um >= 300" (repeat to AND rules); needs --metadata')
        f.add_argument("--metadata", help="CSV with an 'index' column (training-set row) and the rule's columns")


def select_forget(args, y):
    from . import forget

    chosen = [a for a in ("forget_class", "forget_indices", "forget_rule") if getattr(args, a)]
    if len(chosen) != 1:
        raise SystemExit("error: choose exactly one of --forget-class, --forget-indices, --forget-rule "
                         f"(got {', '.join('--' + c.replace('_', '-') for c in chosen) or 'none'})")
    if args.forget_class:
        if args.forget_fraction is not None:
            return forget.fraction_of_class(y, args.forget_class, args.forget_fraction, seed=args.seed)
        return forget.by_class(y, args.forget_class)
    if args.forget_indices:
        with open(args.forget_indices) as f:
            idx = [int(t) for t in f.read().replace(",", " ").split()]
        return forget.by_indices(len(y), idx)
    if not args.metadata:
        raise SystemExit("error: --forget-rule needs --metadata CSV")
    return forget.by_metadata(args.metadata, args.forget_rule, n=len(y))


def subset(pair, n, seed):
    if n is None or n >= len(pair[1]):
        return pair
    idx = torch.randperm(len(pair[1]), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return pair[0][idx], pair[1][idx]


def prepare_data(args):
    from . import forget as fg

    name, splits = load_splits(args.data, args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    idx = select_forget(args, train[1])
    f, r = fg.split(train[0], train[1], idx)
    return name, splits, train, f, r, splits["test"]


# --------------------------------------------------------------- printing
def metrics_table(rows: dict, keys=("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "seconds")):
    names = {"forget_acc": "forget", "remain_acc": "remain", "test_acc": "test", "mia_lr": "MIA-LR",
             "mia_efficacy": "MIA-eff", "seconds": "time (s)", "gap": "gap"}
    keys = [k for k in keys if any(k in m for m in rows.values())]
    w = max(len(n) for n in rows) + 2
    lines = ["".ljust(w) + "".join(names.get(k, k).rjust(10) for k in keys)]
    for label, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            if v is None:
                cells.append("-".rjust(10))
            elif k.endswith("_acc"):
                cells.append(f"{100 * v:9.2f}%")
            else:
                cells.append(f"{v:10.3f}")
        lines.append(label.ljust(w) + "".join(cells))
    return "\n".join(lines)


def config_from_args(args):
    from .config import UnlearnConfig

    fields = {k: getattr(args, k) for k in ("eps", "steps", "alpha", "gamma", "lamda", "noise", "lamda_schedule",
                                             "relabel", "topk", "refresh", "epochs", "lr", "batch_size",
                                             "remain_reg", "remain_target", "seed", "precision", "backend",
                                             "recheck_margin", "search_compile", "augment", "batchnorm")
              if getattr(args, k, None) is not None}
    if getattr(args, "fuse_batch_norm", None) is not None:
        fields["fuse_batch_norm"] = {"auto": "auto", "on": True, "off": False}[args.fuse_batch_norm]
    try:
        return UnlearnConfig(**fields)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def add_config_args(p, defaults=None):
    from .config import UnlearnConfig
    from .reference import LAMDA_SCHEDULES, NOISE_KINDS, RELABEL_MODES

    d = UnlearnConfig() if defaults is None else defaults
    g = p.add_argument_group("method (defaults are the authors' settings)")
    g.add_argument("--eps", type=float, default=d.eps, help="L-inf search radius in pixel units")
    g.add_argument("--steps", type=int, default=d.steps, help="inner search steps T; 1 = FGSM")
    g.add_argument("--alpha", type=float, help="step size (default eps for T=1, 2.5*eps/T otherwise)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="noise scale")
    g.add_argument("--noise", choices=NOISE_KINDS, default=d.noise, help="noise law")
    g.add_argument("--lamda", type=float, default=d.lamda, help="pull towards the original image")
    g.add_argument("--lamda-schedule", choices=LAMDA_SCHEDULES, default=d.lamda_schedule)
    g.add_argument("--relabel", choices=RELABEL_MODES, default=d.relabel, help="how the new label is chosen")
    g.add_argument("--topk", type=int, default=d.topk, help="k for --relabel topk")
    g.add_argument("--refresh", choices=("auto", "iteration", "epoch", "once"), default=d.refresh,
                   help="when the search is redone with fresh noise (auto: once if deterministic)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="fine-tune epochs")
    g.add_argument("--lr", type=float, default=d.lr, help="fine-tune learning rate")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="fine-tune batch, over all processes under torchrun")
    g.add_argument("--augment", choices=("crop", "flip", "crop+flip"), default=d.augment,
                   help="augment the fine-tune's images on the device, afresh each epoch (the search sees them "
                        "unshifted)")
    g.add_argument("--remain-reg", type=float, default=d.remain_reg, help="weight rho of the remain-set term")
    g.add_argument("--remain-target", choices=("labels", "distill"), default=d.remain_target)
    g.add_argument("--batchnorm", choices=("train", "frozen"), default=d.batchnorm,
                   help="fine-tune: BatchNorm with batch statistics (train) or the running ones, kept (frozen)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d.precision)
    g.add_argument("--backend", choices=("auto", "torch", "cpu", "cuda", "triton"), default=d.backend,
                   help="backend of the fused ops (see `fastunlearn backends`)")
    g.add_argument("--fuse-batch-norm", choices=("auto", "on", "off"),
                   default={True: "on", False: "off"}.get(d.fuse_batch_norm, "auto"),
                   help="train step: BatchNorm2d + the ReLU after it as one native op (auto: on CPU only; "
                        "on: also on CUDA; off: PyTorch's modules)")
    g.add_argument("--recheck-margin", type=float, default=d.recheck_margin,
                   help="bf16/fp16 search: redo in fp32 the samples whose decisions lay within this many times "
                        "their rounding noise; 0 = off")
    g.add_argument("--search-compile", action="store_true", default=d.search_compile,
                   help="torch.compile the search's frozen model: a one-off compile (seconds to tens of seconds), "
                        "then faster search steps; worth it for large forget sets")


def add_train_precision(p, what):
    from .config import TRAIN_PRECISIONS

    p.add_argument("--train-precision", default="auto", choices=TRAIN_PRECISIONS,
                   help=f"arithmetic of {what}: auto = bf16 autocast on GPUs and on CPUs with native bf16 "
                   "(as the unlearning's), else fp32")


def add_common(p):
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for data subsets, noise and batch order")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def device_of(args):
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------- commands
def cmd_backends(args):
    from . import backends

    for k, v in backends().items():
        print(f"{k:7s} {v}")


def cmd_train(args):
    from . import data
    from .checkpoint import save_model
    from .models import create_model
    from .train import train_classifier

    name, splits = load_splits(args.data, args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    x, y = train
    mean, std = data.channel_stats(x)
    arch = {"name": args.arch, "in_channels": int(x.shape[1]), "num_classes": int(y.max()) + 1}
    if args.width is not None:
        arch["width"] = args.width if args.arch == "allcnn" else int(args.width)
    model = create_model(**arch)
    model = train_classifier(model, train, epochs=args.train_epochs, lr=args.train_lr, mean=mean, std=std,
                             device=device_of(args), seed=args.seed, progress=not args.no_progress,
                             precision=args.train_precision)
    save_model(model, args.out, arch, mean=mean, std=std, dataset=name)
    from .metrics import evaluate

    m = evaluate(model, remain=train, test=splits["test"], mean=mean, std=std, device=device_of(args), mia=False)
    print(f"saved {args.out}: train {100 * m['remain_acc']:.2f}%, test {100 * m['test_acc']:.2f}%")


def cmd_unlearn(args):
    import torch.distributed as dist

    from .distributed import init_from_env, world

    # Under torchrun every rank runs this command: they share the search and the fine-tune
    # (global batch --batch-size), then rank 0 alone saves, evaluates and prints.
    joined = not (dist.is_available() and dist.is_initialized())
    dev = init_from_env(args.device)
    joined = joined and world()[1] > 1
    try:
        _unlearn(args, dev, is_main=world()[0] == 0)
    finally:
        if joined:
            dist.destroy_process_group()


def _unlearn(args, dev, is_main):
    from . import unlearn
    from .checkpoint import atomic_write_text, load_model, save_model
    from .distributed import world
    from .metrics import evaluate

    model, meta = load_model(args.model, dev)
    name, splits, _, f, r, test = prepare_data(args)
    cfg = config_from_args(args)
    if is_main:
        print(f"forgetting {len(f[1])} of {len(f[1]) + len(r[1])} training images of {name} "
              f"({cfg.refresh_mode} search, {world()[1]} process(es))")
    res = unlearn(model, f, r, config=cfg, mean=meta.get("mean"), std=meta.get("std"), device=dev,
                  progress=not args.no_progress)
    if not is_main:
        return
    meta_out = {k: v for k, v in meta.items() if k != "arch"}
    save_model(res.model, args.out, meta["arch"], **meta_out, unlearned_from=os.path.basename(args.model),
               config=cfg.to_dict())
    rows = {"original": evaluate(model, f, r, test, meta.get("mean"), meta.get("std"), dev, max_shadow=5000),
            "unlearned": dict(evaluate(res.model, f, r, test, meta.get("mean"), meta.get("std"), dev,
                                       max_shadow=5000), seconds=res.seconds)}
    print(metrics_table(rows))
    print(f"saved {args.out} (search {res.timings['search']:.2f}s, fine-tune {res.timings['finetune']:.2f}s, "
          f"backend {res.backend}; {100 * float(res.success.float().mean()):.1f}% of the forget set crossed)")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


def cmd_eval(args):
    from .checkpoint import atomic_write_text, load_model
    from .metrics import evaluate, gap

    dev = device_of(args)
    _, _, _, f, r, test = prepare_data(args)
    rows = {}
    for label, path in [("model", args.model)] + ([("retrain", args.retrain)] if args.retrain else []):
        model, meta = load_model(path, dev)
        rows[label] = evaluate(model, f, r, test, meta.get("mean"), meta.get("std"), dev,
                               per_class=args.per_class, max_shadow=5000)
    if args.retrain:
        rows["model"]["gap"] = gap(rows["model"], rows["retrain"])
    print(metrics_table(rows, ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "gap")))
    if args.per_class:
        for label, m in rows.items():
            print(f"{label} per-class test accuracy: "
                  + ", ".join(f"{c}: {100 * a:.1f}%" for c, a in m["per_class"]["test"].items()))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2, default=str))


def cmd_compose(args):
    from .api import compose
    from .checkpoint import load_model, save_model

    dev = device_of(args)
    a, meta = load_model(args.backbone, dev)
    b, _ = load_model(args.head, dev)
    remain = None
    if args.finetune:
        _, _, _, _, remain, _ = prepare_data(args)
    out = compose(a, b, head_name=args.head_name, remain=remain, finetune=args.finetune, epochs=args.epochs,
                  lr=args.lr, mean=meta.get("mean"), std=meta.get("std"), device=dev,
                  progress=not args.no_progress)
    meta_out = {k: v for k, v in meta.items() if k != "arch"}
    save_model(out, args.out, meta["arch"], **meta_out, composed_from=[args.backbone, args.head])
    print(f"saved {args.out}")


def cmd_report(args):
    from .checkpoint import load_model
    from .report import report

    dev = device_of(args)
    _, _, _, f, r, test = prepare_data(args)
    test = subset(test, args.test_size, args.seed)
    names = args.names or [os.path.splitext(os.path.basename(m))[0] for m in args.models]
    if len(names) != len(args.models):
        raise SystemExit(f"error: --names gives {len(names)} names for {len(args.models)} --models")
    models, meta0 = {}, None
    for name, path in zip(names, args.models):
        model, meta = load_model(path, dev)
        meta0 = meta0 or meta
        models[name] = (model, meta.get("seconds"))
    if args.retrain:
        models["retrain"] = load_model(args.retrain, dev)[0]
    rep = report(models, f, r, test, out_dir=args.out, retrain="retrain" if args.retrain else None,
                 mean=meta0.get("mean"), std=meta0.get("std"), device=dev, title=args.title or "",
                 tsne=not args.no_tsne, seed=args.seed)
    print(rep.markdown.split("\n## ")[0])
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in rep.paths.values()))} to {args.out}")


BENCHES = ("e2e", "revision", "cold_start", "search", "boundary_step", "relabel_check", "batch_norm_relu",
           "thin_conv", "train_eval")


def _bench_script(name):
    from pathlib import Path

    roots = [os.environ.get("FASTUNLEARN_BENCH_DIR"), Path(__file__).resolve().parents[2] / "bench", "bench"]
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
    import runpy

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
        from . import data, profiling
        from .models import create_model

        dev = torch.device(_option(rest, "--device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = profiling.trace(run, os.path.join(profile_dir, "trace.json"), dev)
        # The roofline runs on the benchmark's model family: AllCNN at its --width on the
        # default dataset, or the model file given with --model.
        name, splits = data.load_default(_option(rest, "--data-dir"))
        x, y = splits["train"]
        mean, std = data.channel_stats(x[:4096])
        model_file = _option(rest, "--model")
        if model_file:
            from .checkpoint import load_model

            model, meta = load_model(model_file, dev)
            mean, std = meta.get("mean", mean), meta.get("std", std)
        else:
            model = create_model("allcnn", in_channels=int(x.shape[1]), num_classes=int(y.max()) + 1,
                                 width=float(_option(rest, "--width", 0.25))).to(dev).eval()
        rows, peaks = profiling.roofline(model, x[:512], y[:512], mean=mean, std=std, device=dev)
        import platform

        dname = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                 else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
        print("\n" + profiling.write_summary(rows, peaks, profile_dir, dname))
        print(f"trace: {path}")
    finally:
        sys.argv = old_argv


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args)


# ------------------------------------------------------------------- main
def build_parser():
    p = argparse.ArgumentParser(prog="fastunlearn", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("demo", help="train a small model, forget one class, compare with retraining",
                       description="Train an original model on a real dataset (FashionMNIST when installed, else "
                       "sklearn digits), retrain it without one class as the gold standard, unlearn that class "
                       "from the original, and print original / retrain / unlearned side by side "
                       "(forget, remain and test accuracy, MIA). Under a minute on 2 CPU cores.", formatter_class=fmt)
    add_data_args(d, forget=False)
    d.add_argument("--forget-class", type=int, default=0, help="class to forget")
    d.add_argument("--arch", default="allcnn", help="allcnn | smallcnn | resnet18")
    d.add_argument("--width", type=float, default=0.25, help="width multiplier of AllCNN (1 = the paper's 96/192)")
    d.add_argument("--train-epochs", type=int, default=3, help="epochs to train the original and the retrain")
    add_train_precision(d, "the original and the retrain")
    d.add_argument("--test-size", type=int, default=2000, help="test images used for the metrics")
    d.add_argument("--out", default="runs/demo", help="folder for models, metrics.json and plots")
    d.add_argument("--authors", action="store_true", help="use the authors' settings (lr 1e-5) for the unlearning")
    add_common(d)
    d.set_defaults(func=cmd_demo, train_size=6000)

    t = sub.add_parser("train", help="train an original model on a dataset", formatter_class=fmt,
                       description="Train a classifier and save it (with its mean/std) as a model file.")
    add_data_args(t, forget=False)
    t.add_argument("--arch", default="allcnn", help="allcnn | smallcnn | resnet18 | resnet34 | resnet50")
    t.add_argument("--width", type=float, help="allcnn: width multiplier (1 = 96/192 filters); smallcnn: channels")
    t.add_argument("--train-epochs", type=int, default=5)
    t.add_argument("--train-lr", type=float, default=0.05)
    add_train_precision(t, "the training")
    t.add_argument("--out", required=True, help="output model file (.safetensors)")
    add_common(t)
    t.set_defaults(func=cmd_train)

    u = sub.add_parser("unlearn", help="make a model forget a set of training samples", formatter_class=fmt,
                       description="Search each forget sample's nearest decision boundary with perturbed sign "
                       "gradients, relabel it there, fine-tune a copy of the model on the relabelled set "
                       "(optionally regularised on the remain set), save it, and print before/after metrics.")
    u.add_argument("--model", required=True, help="model file written by `fastunlearn train`")
    u.add_argument("--out", required=True, help="output model file (.safetensors), written atomically")
    u.add_argument("--json", help="also write the metrics as JSON here")
    add_data_args(u)
    add_config_args(u)
    add_common(u)
    u.set_defaults(func=cmd_unlearn)

    e = sub.add_parser("eval", help="forget / remain / test accuracy, MIA, gap to a retrained model",
                       formatter_class=fmt, description="Evaluate a model on the forget, remain and test sets. "
                       "MIA-LR: logistic regression on per-sample loss, test vs forget (0.5 = indistinguishable). "
                       "MIA-eff: fraction of forget samples an SVC on confidence calls non-members.")
    e.add_argument("--model", required=True)
    e.add_argument("--retrain", help="a model retrained without the forget set, to report the gap")
    e.add_argument("--per-class", action="store_true", help="also print per-class test accuracy")
    e.add_argument("--json", help="write the metrics as JSON here")
    add_data_args(e)
    add_common(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compose", help="backbone of one model + head of another", formatter_class=fmt,
                       description="Take the feature extractor of --backbone (a run that kept remain accuracy) "
                       "and the classifier head of --head (a run that forgot), optionally fine-tune on the remain set.")
    c.add_argument("--backbone", required=True)
    c.add_argument("--head", required=True)
    c.add_argument("--head-name", help="attribute path of the head (default: found automatically)")
    c.add_argument("--finetune", choices=("head", "full"), help="fine-tune on the remain set (needs the data args)")
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--out", required=True)
    add_data_args(c)
    add_common(c)
    c.set_defaults(func=cmd_compose)

    rp = sub.add_parser("report", help="one table + plots + markdown page comparing model files",
                        formatter_class=fmt, description="Score several model files on the same forget / remain / "
                        "test sets: accuracies (also per class), MIA-LR, MIA-efficacy, gap to a retrained model, "
                        "time; write table.csv, metrics.json, mia_hist.png, tsne.png and report.md to --out.")
    rp.add_argument("--models", nargs="+", required=True, help="model files to compare (the original included)")
    rp.add_argument("--names", nargs="+", help="a row name per --models file (default: file names)")
    rp.add_argument("--retrain", help="a model retrained without the forget set (the gap reference)")
    rp.add_argument("--out", required=True, help="folder for the report")
    rp.add_argument("--title")
    rp.add_argument("--test-size", type=int, default=2000, help="test images used (seeded subset)")
    rp.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure (the slow part)")
    add_data_args(rp)
    add_common(rp)
    rp.set_defaults(func=cmd_report)

    b = sub.add_parser("backends", help="which fused-op backends are available, and why not")
    b.set_defaults(func=cmd_backends)

    bn = sub.add_parser("bench", help="run a benchmark: " + " | ".join(BENCHES),
                        description="Run bench/bench_NAME.py with the remaining arguments (see "
                        "`fastunlearn bench NAME --help`). --profile DIR (anywhere on the line) also writes a "
                        "torch.profiler trace (trace.json, opens in Perfetto or chrome://tracing) and a roofline "
                        "summary (roofline.txt/json) of the search, a train step and the elementwise ops; for "
                        "revision, a trace of one warm revision per case with its top ops; for cold_start, the first "
                        "call's trace and the table of what it paid more than the second.")
    bn.add_argument("--profile", metavar="DIR", help="write trace.json and roofline.txt/json to DIR")
    bn.add_argument("name", choices=BENCHES)
    bn.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
