"""`fastunlearn demo`: original vs retrained vs unlearned on a real dataset, on a laptop CPU."""

from __future__ import annotations

import json
import os
import time

import torch

from fastunlearn.api import unlearn
from fastunlearn.cli.common import add_common, add_data_args, add_train_precision, load_splits, metrics_table, subset
from fastunlearn.cli.folder import is_folder
from fastunlearn.config import UnlearnConfig
from fastunlearn.data import io as data
from fastunlearn.data.checkpoint import atomic_write_text, save_model
from fastunlearn.data.forget import by_class, split
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval.metrics import evaluate, gap
from fastunlearn.eval.plots import metrics_bars
from fastunlearn.nn.models import create_model

# Settings that forget a class in a few fine-tune epochs on a small subset. The authors'
# lr 1e-5 needs their full 6,000-image class and 10 epochs to move the model at all.
DEMO_CONFIG = UnlearnConfig(eps=0.1, steps=1, relabel="nearest_incorrect", epochs=3, lr=1e-3, batch_size=64,
                            remain_reg=1.0, remain_target="labels")


def run_demo(args):
    torch.manual_seed(args.seed)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_folder(args.data):
        raise SystemExit("error: demo runs on the built-in data sets; for --data folder:DIR use train, unlearn "
                         "and report")
    name, splits = load_splits(args.data, args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    test = subset(splits["test"], args.test_size, args.seed)
    x, y = train
    classes = int(y.max()) + 1
    if not 0 <= args.forget_class < classes:
        raise ValueError(f"--forget-class must be in [0, {classes}), got {args.forget_class}")
    mean, std = data.channel_stats(x)
    arch = {"name": args.arch, "in_channels": int(x.shape[1]), "num_classes": classes}
    if args.arch == "allcnn":
        arch["width"] = args.width
    progress = not args.no_progress
    print(f"dataset {name}: {len(y)} training / {len(test[1])} test images {tuple(x.shape[1:])}, "
          f"{classes} classes; model {arch}; device {dev}")

    forget, remain = split(x, y, by_class(y, args.forget_class))
    kw = dict(mean=mean, std=std, device=dev, seed=args.seed, progress=progress, precision=args.train_precision)
    t0 = time.perf_counter()
    original = train_classifier(create_model(**{k: v for k, v in arch.items()}), train, args.train_epochs,
                                desc="original", **kw)
    t_orig = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain = train_classifier(create_model(**arch), remain, args.train_epochs, desc="retrain", **kw)
    t_retrain = time.perf_counter() - t0

    cfg = UnlearnConfig(seed=args.seed) if args.authors else DEMO_CONFIG.replace(seed=args.seed)
    res = unlearn(original, forget, remain, config=cfg, mean=mean, std=std, device=dev, progress=progress)

    rows = {}
    for label, model, secs in (("original", original, t_orig), ("retrain", retrain, t_retrain),
                               ("unlearned", res.model, res.seconds)):
        rows[label] = dict(evaluate(model, forget, remain, test, mean, std, dev, max_shadow=2000), seconds=secs)
    for label in ("original", "unlearned"):
        rows[label]["gap"] = gap(rows[label], rows["retrain"])
    print()
    print(f"forget class {args.forget_class} ({len(forget[1])} images); unlearning: {cfg.relabel} relabels, "
          f"eps {cfg.eps}, {cfg.epochs} epochs at lr {cfg.lr}, remain_reg {cfg.remain_reg}")
    print(metrics_table(rows, ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "gap", "seconds")))
    speed = rows["retrain"]["seconds"] / rows["unlearned"]["seconds"]
    print(f"\nunlearning took {res.seconds:.1f}s ({speed:.1f}x faster than retraining); "
          f"{100 * float(res.success.float().mean()):.1f}% of the forget set crossed the boundary in the search")

    os.makedirs(args.out, exist_ok=True)
    for label, model in (("original", original), ("retrain", retrain), ("unlearned", res.model)):
        save_model(model, os.path.join(args.out, f"{label}.safetensors"), arch, mean=mean, std=std, dataset=name)
    atomic_write_text(os.path.join(args.out, "metrics.json"),
                      json.dumps({"dataset": name, "forget_class": args.forget_class, "config": cfg.to_dict(),
                                  "metrics": rows}, indent=2))
    try:
        png = metrics_bars(rows, os.path.join(args.out, "metrics.png"),
                           title=f"{name}: forgetting class {args.forget_class}")
        print(f"wrote {args.out}/{{original,retrain,unlearned}}.safetensors, metrics.json, {os.path.basename(png)}")
    except ImportError:
        print(f"wrote {args.out}/{{original,retrain,unlearned}}.safetensors and metrics.json")
    return rows


def cmd_demo(args):
    run_demo(args)


def add_parser(sub, fmt):
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
