"""`fastunlearn report`: one table, plots and a markdown page comparing model files."""

from __future__ import annotations

import os

from fastunlearn.cli.common import add_common, add_data_args, device_of, prepare_data, subset
from fastunlearn.data.checkpoint import load_model
from fastunlearn.eval.report import report


def cmd_report(args):
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


def add_parser(sub, fmt):
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
