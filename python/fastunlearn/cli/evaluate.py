"""`fastunlearn eval`: forget / remain / test accuracy, MIA, and the gap to a retrained model."""

from __future__ import annotations

import json

from fastunlearn.cli.common import add_common, add_data_args, device_of, metrics_table, prepare_data
from fastunlearn.cli.folder import count, model_input
from fastunlearn.cli.model_files import add_normalisation_args, load_model_file
from fastunlearn.cli.provenance import apply_recorded, check_data
from fastunlearn.cli.safety import check_output, say
from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.data.classes import describe
from fastunlearn.eval.metrics import evaluate, gap


def cmd_eval(args):
    dev = device_of(args)
    if args.json:
        check_output(args.json, [args.model, args.retrain], flag="--json")
    files = [("model", args.model)] + ([("retrain", args.retrain)] if args.retrain else [])
    loaded = {label: (path, *load_model_file(path, dev, args)) for label, path in files}
    apply_recorded(args, loaded["model"][2], args.model)
    name, _, train, f, r, test = prepare_data(args)
    rows = {}
    for label, (path, model, meta) in loaded.items():
        check_data(meta, path, name, train[0])
        say(args, f"evaluating {label} ({path}) on {len(f[1])} forget, {len(r[1])} remain, {count(test)} test images")
        rows[label] = evaluate(model, model_input(f), model_input(r), model_input(test), meta.get("mean"),
                               meta.get("std"), dev, per_class=args.per_class, max_shadow=5000)
    if args.retrain:
        rows["model"]["gap"] = gap(rows["model"], rows["retrain"])
    print(metrics_table(rows, ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "gap")))
    if args.per_class:
        for label, m in rows.items():
            print(f"{label} per-class test accuracy: "
                  + ", ".join(f"{describe(name, c)}: {100 * a:.1f}%" for c, a in m["per_class"]["test"].items()))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2, default=str))


def add_parser(sub, fmt):
    e = sub.add_parser("eval", help="forget / remain / test accuracy, MIA, gap to a retrained model",
                       formatter_class=fmt, description="Evaluate a model on the forget, remain and test sets. "
                       "MIA-LR: logistic regression on per-sample loss, test vs forget (0.5 = indistinguishable). "
                       "MIA-eff: fraction of forget samples an SVC on confidence calls non-members.")
    e.add_argument("--model", required=True, help="the model file to score; its recorded training subset "
                   "(--train-size) is used unless given; or a TorchScript / torch.export program (see unlearn)")
    e.add_argument("--retrain", help="a model retrained without the forget set, to report the gap")
    e.add_argument("--per-class", action="store_true", help="also print per-class test accuracy")
    e.add_argument("--json", help="write the metrics as JSON here")
    add_normalisation_args(e, "a program --model / --retrain", "none; a model file records its own")
    add_data_args(e)
    add_common(e)
    e.set_defaults(func=cmd_eval)
