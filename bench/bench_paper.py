"""Reproduction study of Nahass et al. (2025) on FashionMNIST class 0 with AllCNN.

Every setting of the paper runs twice, under compat="authors" (the published code's arithmetic)
and under fastunlearn's default, from the same original model, with the published fine-tune
(SGD lr 1e-5, momentum 0.9, 10 epochs, batch 64, FGSM eps 0.1, argmax relabels):

  gamma        0, 1e-4, 1e-3 (normal noise)
  noise laws   normal, laplace, cauchy, uniform at gamma 1e-4
  lambda       inverse, exponential, linear schedules at lamda --lamda, gamma 0
  remain_reg   1, 10 at gamma 1e-4 (0 is the gamma 1e-4 row)
  composition  the backbone of the best-remain run with the head of the best-forget run, then
               the whole composed model fine-tuned on the remain set with Adam, lr 1e-4, 5 epochs

Scored as the published code scores: forget / remain accuracy on the test set's forget / other
classes, test accuracy, MIA-LR (metrics.mia_lr_published: test set vs its forget class), and the
wall time of each run. Writes table.csv, table.md and forget_remain.png to --out and prints the table.

    python bench/reproduce_paper.py --out runs/paper                 # CPU preset, ~5 minutes on 2 cores
    python bench/reproduce_paper.py --out runs/paper --preset small  # a few minutes
    python bench/reproduce_paper.py --out runs/paper --preset full --device cuda   # the paper's size
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.compose import compose  # noqa: E402
from fastunlearn.data import forget as forget_sets  # noqa: E402
from fastunlearn.data import io as data  # noqa: E402
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval import metrics  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

# The published FashionMNIST loader normalises with (0.5, 0.5).
MEAN, STD = [0.5], [0.5]
PRESETS = {"small": dict(train_size=3000, test_size=1000, width=0.25, train_epochs=2),
           "cpu": dict(train_size=10000, test_size=2000, width=0.25, train_epochs=3),
           "full": dict(train_size=60000, test_size=10000, width=1.0, train_epochs=30)}


def settings(lamda: float) -> list[tuple[str, dict]]:
    """(name, UnlearnConfig fields) of every run, each under both modes."""
    runs = [(f"gamma {g:g}", dict(gamma=g)) for g in (0.0, 1e-4, 1e-3)]
    runs += [(f"gamma 1e-4 {law}", dict(gamma=1e-4, noise=law)) for law in ("laplace", "cauchy", "uniform")]
    runs += [(f"lamda {lamda:g} {s}", dict(lamda=lamda, lamda_schedule=s))
             for s in ("inverse", "exponential", "linear")]
    runs += [(f"gamma 1e-4 remain_reg {r:g}", dict(gamma=1e-4, remain_reg=r)) for r in (1.0, 10.0)]
    return runs


def score(model, test, forget_class, device) -> dict:
    net = metrics.inference_copy(model, device)
    logits = metrics.predict_logits(net, test[0], MEAN, STD, device=device)
    y = test[1]
    fmask = y == forget_class
    losses = metrics.per_sample_loss(logits, y)
    return {"forget_acc": metrics.accuracy(logits[fmask], y[fmask]),
            "remain_acc": metrics.accuracy(logits[~fmask], y[~fmask]), "test_acc": metrics.accuracy(logits, y),
            "mia_lr": metrics.mia_lr_published(losses[fmask], losses)}


def adam_finetune(model, remain, epochs: int, lr: float, device, seed: int):
    """The paper's composition fine-tune: the whole model, Adam, cross-entropy on the remain set."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = remain
    gen = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(MEAN, device=device).view(1, -1, 1, 1), torch.tensor(STD, device=device).view(1, -1, 1, 1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            xb = (data.to_float(x[idx]).to(device) - mean) / std
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def run_study(original, f, r, test, args, dev) -> list[dict]:
    rows = []
    for mode in ("authors", None):
        label = "compat authors" if mode else "default"
        done = {}
        for name, fields in settings(args.lamda):
            cfg = fu.UnlearnConfig(compat=mode, seed=args.seed, **fields)
            res = fu.unlearn(original, f, r, config=cfg, mean=MEAN, std=STD, device=dev, progress=False)
            row = dict(mode=label, setting=name, seconds=res.seconds, **score(res.model, test, args.forget_class, dev))
            print(f"{label:15s} {name:30s} forget {row['forget_acc']:.3f} remain {row['remain_acc']:.3f} "
                  f"MIA {row['mia_lr']:.3f} {row['seconds']:.1f} s", flush=True)
            rows.append(row)
            done[name] = (res.model, row)
        t0 = time.perf_counter()
        best_f = min(done, key=lambda k: done[k][1]["forget_acc"])
        best_r = max(done, key=lambda k: done[k][1]["remain_acc"])
        composed = compose(done[best_r][0], done[best_f][0])
        composed = adam_finetune(composed, r, args.compose_epochs, 1e-4, dev, args.seed)
        rows.append(dict(mode=label, setting=f"compose: backbone of [{best_r}], head of [{best_f}], Adam 1e-4 x "
                         f"{args.compose_epochs}", seconds=time.perf_counter() - t0,
                         **score(composed, test, args.forget_class, dev)))
    return rows


def write_outputs(rows, out, header_rows):
    cols = ["mode", "setting", "forget_acc", "remain_acc", "test_acc", "mia_lr", "seconds"]
    tmp = os.path.join(out, "table.csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(header_rows + rows)
    os.replace(tmp, os.path.join(out, "table.csv"))
    lines = ["| mode | setting | forget % | remain % | test % | MIA-LR | seconds |", "|---|---|---|---|---|---|---|"]
    for row in header_rows + rows:
        lines.append(f"| {row['mode']} | {row['setting']} | {100 * row['forget_acc']:.1f} | "
                     f"{100 * row['remain_acc']:.1f} | {100 * row['test_acc']:.1f} | {row['mia_lr']:.3f} | "
                     f"{row['seconds']:.1f} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md.tmp"), "w") as fh:
        fh.write(md)
    os.replace(os.path.join(out, "table.md.tmp"), os.path.join(out, "table.md"))
    _figure(header_rows + rows, os.path.join(out, "forget_remain.png"))
    return md


def _figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for mode, marker in (("compat authors", "o"), ("default", "s"), ("reference", "*")):
        pts = [r for r in rows if r["mode"] == mode]
        ax.scatter([100 * r["forget_acc"] for r in pts], [100 * r["remain_acc"] for r in pts], marker=marker,
                   label=mode, s=60 if mode != "reference" else 160)
        for r in pts:
            ax.annotate(r["setting"].split(":")[0][:24], (100 * r["forget_acc"], 100 * r["remain_acc"]), fontsize=6)
    ax.set_xlabel("forget accuracy % (lower is better)")
    ax.set_ylabel("remain accuracy % (higher is better)")
    ax.legend()
    ax.set_title("FashionMNIST class 0, AllCNN: the paper's settings")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=150)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/paper")
    p.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    p.add_argument("--data-dir")
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument("--lamda", type=float, default=0.05, help="lamda of the three schedule runs")
    p.add_argument("--compose-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pre = PRESETS[args.preset]
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    splits = data.load_fashion_mnist(args.data_dir)
    train = subset(splits["train"], pre["train_size"], args.seed)
    test = subset(splits["test"], pre["test_size"], args.seed)
    f, r = forget_sets.split(train[0], train[1], forget_sets.by_class(train[1], args.forget_class))
    arch = {"name": "allcnn", "in_channels": 1, "num_classes": 10, "width": pre["width"]}
    header = []
    for name, d in (("original", train), ("retrain", r)):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        m = train_classifier(create_model(**arch), d, pre["train_epochs"], mean=MEAN, std=STD, device=dev,
                             seed=args.seed, progress=False, desc=name)
        header.append(dict(mode="reference", setting=name, seconds=time.perf_counter() - t0,
                           **score(m, test, args.forget_class, dev)))
        if name == "original":
            original = m
    print(f"{args.preset} preset on {device_name(dev)}: {len(train[1])} training images ({len(f[1])} forget), "
          f"{len(test[1])} test, AllCNN width {pre['width']}", flush=True)
    rows = run_study(original, f, r, test, args, dev)
    print(write_outputs(rows, args.out, header))
    print(f"wrote {args.out}/table.csv, table.md, forget_remain.png")


if __name__ == "__main__":
    main()
