"""Forget/remain trade-off on FashionMNIST class 0: the authors' settings, our sweep, the baselines.

One table (bench/results_quality.csv and a report folder with plots) in the same harness:
every method starts from the same original model and is scored on the same sets.

Data (documented so the numbers can be reproduced):
  train   a seeded 10,000-image subset of the FashionMNIST training split (cli.common.subset, seed 0)
  forget  every class-0 (T-shirt/top) image of that subset; remain = the rest
  val     held out from training: 300 class-0 and 1,000 other training-split images that are
          not in the subset (the sweep selects on these, never on the test set)
  test    a seeded 2,000-image subset of the test split
  remain accuracy in the table: a seeded 3,000-image subset of the remain set (--eval-remain)
  model   AllCNN width 0.25 (24/48 filters) with BatchNorm, trained 3 epochs (one-cycle, lr 0.05,
          batch 128); the retrained reference is the same recipe on the remain set.

    python bench/bench_quality.py --out runs/quality          # CPU: ~30-60 minutes on 2 cores
    python bench/bench_quality.py --width 1 --train-size 60000 --train-epochs 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_csv, device_name  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.data import forget
from fastunlearn.data import io as data  # noqa: E402
from fastunlearn.data.checkpoint import load_model, save_model  # noqa: E402
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval import baselines
from fastunlearn.eval.plots import front_plot  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

AUTHORS = fu.UnlearnConfig()  # lr 1e-5, 10 epochs, argmax, rho = 0, FGSM eps 0.1: their published settings
# Kept small for a 2-core CPU: every run is a fine-tune of the 10k-image model. The remain
# term fits the true labels: the retrained model beats the original on the remain set (it
# no longer confuses T-shirts with shirts), so distilling the original would hold remain
# accuracy below the retrained model's. --grid full widens it (relabels, distillation).
GRID = {"relabel": ["nearest_incorrect"], "gamma": [0.0], "remain_reg": [1.0], "remain_target": ["labels"],
        "lr": [1e-3], "epochs": [2], "batchnorm": ["frozen", "train"], "compose": [None, "head_ft", "full_ft"]}
FULL_GRID = dict(GRID, relabel=["nearest_incorrect", "soft_incorrect", "argmax"], remain_target=["labels", "distill"],
                 remain_reg=[1.0, 3.0], epochs=[2, 4])


def load_data(args):
    splits = data.load_fashion_mnist(args.data_dir)
    x_all, y_all = splits["train"]
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(args.seed))
    train = subset(splits["train"], args.train_size, args.seed)
    # The rows cli.subset did not take are held out: the validation pool.
    taken = torch.zeros(len(y_all), dtype=torch.bool)
    taken[perm[:args.train_size]] = True
    pool = torch.nonzero(~taken).flatten()
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed + 1))]
    fv = pool[y_all[pool] == args.forget_class][:300]
    rv = pool[y_all[pool] != args.forget_class][:1000]
    test = subset(splits["test"], args.test_size, args.seed)
    f, r = forget.split(train[0], train[1], forget.by_class(train[1], args.forget_class))
    return train, f, r, ((x_all[fv], y_all[fv]), (x_all[rv], y_all[rv])), test


def trained(path, arch, d, args, mean, std, dev, desc):
    if os.path.exists(path):
        m, meta = load_model(path, dev)
        return m, float(meta.get("seconds", "nan"))
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the initialisation too, so the seed names the whole run
    m = train_classifier(create_model(**arch), d, args.train_epochs, mean=mean, std=std, device=dev, seed=args.seed,
                         progress=not args.no_progress, desc=desc, precision=args.precision)
    secs = time.perf_counter() - t0
    save_model(m, path, arch, mean=mean, std=std, seconds=secs)
    return m, secs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--data-dir")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument("--max-forget-acc", type=float, default=0.03)
    p.add_argument("--baselines", default="boundary_shrink,finetune_remain,neggrad,random_labels",
                   help="comma-separated names from fastunlearn.eval.baselines.BASELINES ('' for none)")
    p.add_argument("--grid", choices=("small", "full"), default="small")
    p.add_argument("--eval-remain", type=int, default=3000, help="remain images scored in the table (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="of the training, the retrain and every unlearning run alike (a fair x retrain)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_quality.csv"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = FULL_GRID if args.grid == "full" else GRID
    os.makedirs(args.out, exist_ok=True)
    train, f, r, val, test = load_data(args)
    mean, std = data.channel_stats(train[0])
    arch = {"name": "allcnn", "in_channels": 1, "num_classes": 10, "width": args.width}
    tag = f"w{args.width}_n{args.train_size}_e{args.train_epochs}_s{args.seed}"
    original, t_orig = trained(os.path.join(args.out, f"original_{tag}.safetensors"), arch, train, args, mean, std,
                               dev, "original")
    retrain, t_rt = trained(os.path.join(args.out, f"retrain_{tag}.safetensors"), arch, r, args, mean, std, dev,
                            "retrain")
    log = print
    models = {"original": (original, t_orig), "retrain": (retrain, t_rt)}
    settings = {"data": dict(train=args.train_size, forget=len(f[1]), remain=len(r[1]), val=[len(val[0][1]),
                                                                                           len(val[1][1])],
                             test=args.test_size, forget_class=args.forget_class, seed=args.seed),
                "model": arch, "train_epochs": args.train_epochs}

    log("authors' settings ...")
    res = fu.unlearn(original, f, r, config=AUTHORS.replace(precision=args.precision), mean=mean, std=std, device=dev,
                     progress=False)
    models["authors (lr 1e-5, argmax, rho 0)"] = (res.model, res.seconds)
    settings["authors"] = AUTHORS.to_dict()
    log("recommended settings ...")
    rec = fu.UnlearnConfig.recommended(forget_size=len(f[1]), remain_size=len(r[1]), seed=args.seed,
                                       precision=args.precision)
    res = fu.unlearn(original, f, r, config=rec, mean=mean, std=std, device=dev, progress=False)
    models["recommended"] = (res.model, res.seconds)
    settings["recommended"] = rec.to_dict()

    log("sweep ...")
    base = fu.UnlearnConfig(batch_size=64, seed=args.seed, precision=args.precision)
    sw = fu.sweep(original, f, r, val=val, max_forget_acc=args.max_forget_acc, grid=grid, base=base, mean=mean,
                  std=std, device=dev, log=log)
    models["ours (sweep choice)"] = (sw.model, sw.seconds)  # the whole sweep: what choosing cost
    settings["sweep"] = dict(grid=grid, chosen=sw.chosen.settings, val_forget_acc=sw.chosen.forget_acc,
                             val_remain_acc=sw.chosen.remain_acc, sweep_seconds=sw.seconds,
                             search_seconds=sw.search_seconds, spent=sw.spent, points=sw.table(),
                             front=[q.as_row() for q in sw.front])
    front_png = front_plot(sw.points, os.path.join(args.out, "front.png"), front=sw.front, chosen=sw.chosen,
                           title="sweep on the validation split")

    names = [n for n in args.baselines.split(",") if n]
    bl_settings = {"finetune_remain": dict(epochs=1, lr=0.01), "neggrad": dict(epochs=2, lr=1e-4),
                   "neggrad_plus": dict(epochs=1, lr=1e-3, alpha=0.9), "random_labels": dict(epochs=3, lr=1e-3),
                   "boundary_shrink": dict(epochs=10, lr=1e-5)}
    for n in names:
        log(f"baseline {n} ...")
        b = baselines.run_all(original, f, r, names=[n], mean=mean, std=std, device=dev, seed=args.seed,
                              settings={n: bl_settings.get(n, {})})[n]
        models[n] = (b.model, b.seconds)
        settings.setdefault("baselines", {})[n] = b.settings

    r_eval = subset(r, args.eval_remain or None, args.seed)
    settings["data"]["remain_scored"] = len(r_eval[1])
    rep = fu.report(models, f, r_eval, test, out_dir=args.out, mean=mean, std=std, device=dev, notes=settings,
                    title=f"FashionMNIST, forgetting class {args.forget_class} (AllCNN width {args.width}, "
                    f"{args.train_size} training images)", class_names=data.FASHION_MNIST_CLASSES, tsne_points=200,
                    extra_figures={"Sweep: forget vs remain accuracy on the validation split": front_png})
    print(rep.markdown.split("\n## ")[0])
    rows = [dict(method=k, device=device_name(dev), tag=tag,
                 **{c: v for c, v in rv.items()}) for k, rv in rep.rows.items()]
    append_csv(rows, args.csv)
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump(settings["sweep"], fh, indent=2, default=str)
    print(f"wrote {rep.paths['markdown']} and {args.csv}")
    return rep


if __name__ == "__main__":
    main()
