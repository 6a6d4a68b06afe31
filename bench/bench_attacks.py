"""Proof of forgetting on FashionMNIST class 0: the attack suite and the representation checks
for the original, the retrained and the unlearned models (and a head-only control).

Data and models (a narrow CPU-sized version of bench_quality.py's recipe):
  train   a seeded --train-size subset of the FashionMNIST training split (cli.common.subset)
  forget  every class-0 (T-shirt/top) image of it; remain = the rest
  test    a seeded --test-size subset of the test split (the non-members)
  models  AllCNN (--width) trained --train-epochs epochs (one-cycle, lr 0.05, batch 128);
          retrain and the K reference models (--refs) are the same recipe on the remain set,
          seeds seed .. seed + K (the retrain is not among the references)
  unlearned  fu.unlearn with the sweep's choice in bench_quality (nearest_incorrect, remain_reg 1
          on labels, lr 1e-3, batch 64) at --epochs epochs (default 4, the audit setting: twice the
          sweep's 2, which with the head fine-tune below brings the population attacks to the retrain's)
  unlearned + head fine-tune  the unlearned model's head fine-tuned 1 epoch on the remain set
          (lr 1e-2, backbone frozen: the sweep's "head_ft" composition)
  recipe  fu.unlearn with UnlearnConfig.recommended(forget_size=...): the one-call recipe, its head
          re-fit included
  head-only control  the original's backbone with the retrained model's head (fu.compose):
          forgetting in the head alone

Two framings of the attacks: non-members = test images of class 0 ("same class", the
default of attack_suite) and = every test image ("population", the framing of SalUn's MIA).

    FASTUNLEARN_DATA=/work/shared/data python bench/bench_attacks.py --out runs/attacks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_csv, commit, device_name, versions  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.data import forget  # noqa: E402
from fastunlearn.data import io as data  # noqa: E402
from fastunlearn.data.checkpoint import atomic_write_text, load_model, save_model  # noqa: E402
from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval.attacks import attack_suite  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

UNLEARN = dict(relabel="nearest_incorrect", remain_reg=1.0, remain_target="labels", lr=1e-3, epochs=2, batch_size=64)
# The audit setting's unlearning epochs: twice UNLEARN's (bench/RESULTS.md, "why the unlearned model's
# attack AUCs differ from the retrain's").
AUDIT_EPOCHS = 4
SHOWN = ("loss/threshold", "confidence/threshold", "entropy/threshold", "modified_entropy/threshold", "all/logistic")


def trained(path, arch, d, args, mean, std, seed, desc):
    """The model at ``path`` when a previous run left it, else trained and saved."""
    if os.path.exists(path):
        return load_model(path)[0]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    m = train_classifier(create_model(**arch), d, args.train_epochs, mean=mean, std=std, seed=seed,
                         progress=not args.no_progress, desc=desc)
    save_model(m, path, arch, mean=mean, std=std, seconds=time.perf_counter() - t0)
    return m


def row(name, suite, rep=None):
    r = {"model": name, **{a: suite.attacks[a]["auc"] for a in SHOWN}}
    r["tpr1_loss"] = suite.attacks["loss/threshold"]["tpr_at_1pct_fpr"]
    r["ulira"] = None if suite.ulira is None else suite.ulira["auc"]
    r["z_mean"] = suite.per_example["mean"]
    r["z_above_2"] = suite.per_example["share_above_2"]
    return r


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(("-" if r.get(c) is None else (f"{r[c]:.3f}" if isinstance(r[c], float)
                                                                       else str(r[c]))) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/attacks")
    p.add_argument("--data-dir")
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--train-epochs", type=int, default=5)
    p.add_argument("--refs", type=int, default=2)
    p.add_argument("--lr", type=float, default=UNLEARN["lr"], help="the unlearning fine-tune's learning rate")
    p.add_argument("--epochs", type=int, default=AUDIT_EPOCHS, help="the unlearning fine-tune's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    splits = data.load_fashion_mnist(args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    test = subset(splits["test"], args.test_size, args.seed)
    f, r = forget.split(train[0], train[1], forget.by_class(train[1], 0))
    mean, std = data.channel_stats(train[0])
    arch = {"name": "allcnn", "in_channels": 1, "num_classes": 10, "width": args.width}
    tag = f"w{args.width}_n{args.train_size}_e{args.train_epochs}_s{args.seed}"
    path = lambda n: os.path.join(args.out, f"{n}_{tag}.safetensors")  # noqa: E731
    original = trained(path("original"), arch, train, args, mean, std, args.seed, "original")
    retrain = trained(path("retrain"), arch, r, args, mean, std, args.seed, "retrain")
    refs = [trained(path(f"ref{k}"), arch, r, args, mean, std, args.seed + 1 + k, f"reference {k}")
            for k in range(args.refs)]
    cfg = fu.UnlearnConfig(**dict(UNLEARN, seed=args.seed, lr=args.lr, epochs=args.epochs))
    res = fu.unlearn(original, f, r, config=cfg, mean=mean, std=std,
                     progress=not args.no_progress)
    # The sweep's "head_ft" step: the head fine-tuned on the remain set, backbone frozen.
    head_ft = fu.compose(res.model, res.model, remain=r, finetune="head", epochs=1, lr=1e-2, mean=mean, std=std,
                         seed=args.seed, progress=False)
    # The library's one-call recipe (head re-fit included), as a user would call it.
    recipe = fu.unlearn(original, f, r, config=fu.UnlearnConfig.recommended(forget_size=len(f[1]), seed=args.seed),
                        mean=mean, std=std, progress=not args.no_progress)
    models = {"original": original, "retrain": retrain, "unlearned": res.model, "unlearned + head fine-tune": head_ft,
              "recipe": recipe.model, "original backbone + retrain head": fu.compose(original, retrain)}
    rep = fu.report(models, f, r, test, out_dir=args.out, mean=mean, std=std, tsne=False, attacks="all",
                    attack_kw=dict(reference_models=refs), title="FashionMNIST class 0: proof of forgetting")
    ev = json.load(open(rep.paths["json"]))["evidence"]
    same = [row(n, attack_suite(m, f, test, refs, mean=mean, std=std)) for n, m in models.items()]
    pop = [row(n, attack_suite(m, f, test, refs, mean=mean, std=std, match_classes=False))
           for n, m in models.items()]
    cols = ["model", *SHOWN, "tpr1_loss", "ulira", "z_mean", "z_above_2"]
    reps = [{"model": n, "forget_acc": rep.rows[n]["forget_acc"], "test_acc": rep.rows[n]["test_acc"],
             "head_forget_acc": e["representation"]["output_forget_acc"],
             "probe": e["representation"]["probe"]["accuracy"],
             "probe_retrain": (e["representation"]["probe_retrain"] or {}).get("accuracy"),
             "cka_original": e["representation"]["cka_original"], "cka_retrain": e["representation"]["cka_retrain"],
             "head_only": str(e["representation"]["head_only_forgetting"])} for n, e in ev.items()]
    out = [f"device: {device_name(torch.device('cpu'))}; {versions()}; commit {commit()}",
           f"train {len(train[1])} (forget {len(f[1])}, remain {len(r[1])}), test {len(test[1])}, AllCNN width "
           f"{args.width}, {args.train_epochs} epochs, K = {args.refs} references; "
           f"unlearning { {k: getattr(cfg, k) for k in UNLEARN} }; "
           f"total {time.perf_counter() - t_start:.0f} s", "",
           "Non-members = test images of class 0 (AUC; TPR at 1 % FPR of the loss attack):", table(same, cols), "",
           "Non-members = every test image:", table(pop, cols), "",
           "Representation (test set, probe: class 0 vs rest, balanced, held out):",
           table(reps, list(reps[0])), ""]
    text = "\n".join(out)
    print(text)
    atomic_write_text(os.path.join(args.out, "bench_attacks.md"), text)
    dev = device_name(torch.device("cpu"))
    append_csv([dict(r, bench="attacks", framing=fr, device=dev, width=args.width, train_size=args.train_size)
                for fr, rows in (("same class", same), ("population", pop)) for r in rows])


if __name__ == "__main__":
    main()
