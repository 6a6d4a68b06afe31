"""Why the unlearned model's attack AUCs differ from the retrain's on FashionMNIST class 0, and
which of the method's settings close the gap.

The models and data are bench_attacks.py's (same flags, same cached files in --out). For each
unlearning setting (--configs, names of CONFIGS) it prints the accuracies, the attacks' AUC in
the population framing (non-members = every test image) and in the same-class framing, and the
quantities behind them:
  H forget / H test   mean softmax entropy (nats) on the forget images / on the test images of
                      the other classes (the entropy attack compares these)
  another retrain     reference 0 (a retrain of another seed) judged against the retrain and the
                      other references: how far two retrains lie apart on every figure
  phi forget          mean logit-scaled confidence of class 0 on the forget images, and the
                      references' mean on them (the U-LiRA-style z is their difference over the
                      pooled reference std)

    FASTUNLEARN_DATA=/work/shared/data python bench/study_attack_gap.py --out runs/attacks \
        --width 0.25 --train-size 8000 --train-epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attacks import UNLEARN, trained  # noqa: E402
from common import commit, device_name, versions  # noqa: E402
from head_steps import head_step  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.data import forget  # noqa: E402
from fastunlearn.data import io as data  # noqa: E402
from fastunlearn.eval.attacks import attack_suite, logit_confidence  # noqa: E402
from fastunlearn.eval.metrics import accuracy, predict_logits  # noqa: E402
from fastunlearn.eval.representation import representation_checks  # noqa: E402

N_FORGET = None  # filled in main: the recipe's epochs depend on the forget set's size


def _recommended(**kw):
    return fu.UnlearnConfig.recommended(forget_size=N_FORGET, **kw).to_dict()


# Each entry: a function of nothing returning UnlearnConfig fields (so the recipe sees the forget size).
CONFIGS = {
    "bench": lambda: dict(UNLEARN),
    "bench/4ep": lambda: dict(UNLEARN, epochs=4),
    "bench/8ep": lambda: dict(UNLEARN, epochs=8),
    "bench/16ep": lambda: dict(UNLEARN, epochs=16),
    "bench/lr2e-3": lambda: dict(UNLEARN, lr=2e-3),
    "bench/lr3e-3": lambda: dict(UNLEARN, lr=3e-3),
    "bench/lr1e-2": lambda: dict(UNLEARN, lr=1e-2),
    "bench/soft": lambda: dict(UNLEARN, relabel="soft"),
    "bench/topk": lambda: dict(UNLEARN, relabel="topk"),
    "bench/argmax": lambda: dict(UNLEARN, relabel="argmax"),
    "bench/distill": lambda: dict(UNLEARN, remain_target="distill"),
    "recommended": lambda: _recommended(),
    "recommended/8ep": lambda: _recommended(epochs=8),
    "recommended/soft": lambda: _recommended(relabel="soft"),
    "recommended/distill": lambda: _recommended(remain_target="distill"),
    "recommended/distill/8ep": lambda: _recommended(remain_target="distill", epochs=8),
    "recommended/lr1e-3": lambda: _recommended(lr=1e-3),
    "bench/distill/lr3e-3": lambda: dict(UNLEARN, remain_target="distill", lr=3e-3),
    "bench/distill/8ep": lambda: dict(UNLEARN, remain_target="distill", epochs=8),
}
# A name "setting+step": that setting, then a post-step on the head (head_steps.py; "+hft" is the head
# fine-tuned 1 epoch on the remain set, lr 1e-2, backbone frozen: bench_attacks.py's "unlearned + head
# fine-tune"). The unlearning run of a setting is shared by all its post-steps.
SHOWN = ("loss/threshold", "confidence/threshold", "entropy/threshold", "modified_entropy/threshold", "all/logistic")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), 1)
    return -(logp.exp() * logp).sum(1)


def measure(name, model, f, r, test, refs, mean, std) -> dict:
    lf, lr_, lt = (predict_logits(model, x, mean, std) for x in (f[0], r[0], test[0]))
    other = test[1] != 0
    phi_f = logit_confidence(lf, f[1])
    ref_phi = np.stack([logit_confidence(predict_logits(m, f[0], mean, std), f[1]) for m in refs])
    row = {"model": name, "forget": accuracy(lf, f[1]), "remain": accuracy(lr_, r[1]), "test": accuracy(lt, test[1]),
           "H forget": float(entropy(lf).mean()), "H test other": float(entropy(lt[other]).mean()),
           "phi forget": float(phi_f.mean()), "phi refs": float(ref_phi.mean())}
    pop = attack_suite(model, f, test, refs, mean=mean, std=std, match_classes=False)
    same = attack_suite(model, f, test, refs, mean=mean, std=std)
    row.update({k.split("/")[0]: pop.attacks[k]["auc"] for k in SHOWN})
    row["u-lira"] = pop.ulira["auc"]
    row["z mean"] = pop.per_example["mean"]
    row["same: loss"] = same.attacks["loss/threshold"]["auc"]
    row["same: entropy"] = same.attacks["entropy/threshold"]["auc"]
    row["same: u-lira"] = same.ulira["auc"]
    return row


def representation(row, model, test, original, retrain, mean, std):
    rep = representation_checks(model, test, [0], original=original, retrain=retrain, mean=mean, std=std)
    row.update({"probe": rep["probe"]["accuracy"], "probe retrain": rep["probe_retrain"]["accuracy"],
                "head only": str(rep["head_only_forgetting"])})
    return row


def run_settings(names, original, f, r, test, refs, mean, std, seed, retrain):
    """One row per name: the unlearning run (once per setting), then its post-step, if any."""
    unlearned, rows = {}, []
    for name in names:
        base, _, step = name.partition("+")
        if base not in unlearned:
            t0 = time.perf_counter()
            fields = dict(CONFIGS[base](), seed=seed)
            res = fu.unlearn(original, f, r, config=fu.UnlearnConfig(**fields), mean=mean, std=std, progress=False)
            unlearned[base] = (res.model, time.perf_counter() - t0)
        model, t_unlearn = unlearned[base]
        t0 = time.perf_counter()
        if step:
            model = head_step(step, model, f, r, mean, std, seed)
        t_step = time.perf_counter() - t0
        row = measure(name, model, f, r, test, refs, mean, std)
        row = representation(row, model, test, original, retrain, mean, std)
        row.update({"unlearn s": t_unlearn, "step s": t_step})
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    return rows


def table(rows) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float)
                                     else str(r[c]) for c in cols) + " |")
    return "\n".join(out)


def main(argv=None):
    global N_FORGET
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/attacks")
    p.add_argument("--data-dir")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--train-epochs", type=int, default=5)
    p.add_argument("--refs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    splits = data.load_fashion_mnist(args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    test = subset(splits["test"], args.test_size, args.seed)
    f, r = forget.split(train[0], train[1], forget.by_class(train[1], 0))
    N_FORGET = len(f[1])
    mean, std = data.channel_stats(train[0])
    arch = {"name": "allcnn", "in_channels": 1, "num_classes": 10, "width": args.width}
    tag = f"w{args.width}_n{args.train_size}_e{args.train_epochs}_s{args.seed}"
    path = lambda n: os.path.join(args.out, f"{n}_{tag}.safetensors")  # noqa: E731
    original = trained(path("original"), arch, train, args, mean, std, args.seed, "original")
    retrain = trained(path("retrain"), arch, r, args, mean, std, args.seed, "retrain")
    refs = [trained(path(f"ref{k}"), arch, r, args, mean, std, args.seed + 1 + k, f"reference {k}")
            for k in range(args.refs)]
    print(f"device: {device_name(torch.device('cpu'))}; {versions()}; commit {commit()}; seed {args.seed}", flush=True)
    rows = [measure("original", original, f, r, test, refs, mean, std),
            measure("retrain", retrain, f, r, test, refs, mean, std)]
    if len(refs) > 1:
        # The noise floor: reference 0 is another retrain (another seed); its references are the
        # retrain and the other references, so it is judged like every other model, against K others.
        rows.append(measure("another retrain", refs[0], f, r, test, [retrain, *refs[1:]], mean, std))
    names = list(filter(None, args.configs.split(",")))
    rows = [representation(row, m, test, original, retrain, mean, std)
            for row, m in zip(rows, [original, retrain, refs[0]][:len(rows)])]
    print(table(rows), flush=True)
    rows = [dict(row, **{"unlearn s": None, "step s": None}) for row in rows]
    rows += run_settings(names, original, f, r, test, refs, mean, std, args.seed, retrain)
    attacks = [k.split("/")[0] for k in SHOWN]
    rows = [dict(row, **{"max gap": max(abs(row[a] - rows[1][a]) for a in attacks)}) for row in rows]
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "commit": commit(), "versions": versions(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
