"""`fastunlearn report`: one table, plots and a markdown page comparing model files."""

from __future__ import annotations

import os

from fastunlearn.cli.common import add_common, add_data_args, device_of, prepare_data, subset
from fastunlearn.cli.folder import model_input
from fastunlearn.cli.model_files import add_normalisation_args, load_model_file
from fastunlearn.cli.provenance import apply_recorded, check_data, data_args, data_record, forget_record
from fastunlearn.cli.safety import check_output_folder, say
from fastunlearn.data.classes import class_names
from fastunlearn.data.provenance import file_record
from fastunlearn.eval.report import report


def cmd_report(args):
    dev = device_of(args)
    check_output_folder(args.out)
    names = args.names or [os.path.splitext(os.path.basename(m))[0] for m in args.models]
    if len(names) != len(args.models):
        raise SystemExit(f"error: --names gives {len(names)} names for {len(args.models)} --models")
    files = list(zip(names, args.models)) + ([("retrain", args.retrain)] if args.retrain else [])
    loaded = [(name, path, *load_model_file(path, dev, args)) for name, path in files]
    meta0 = loaded[0][3]
    apply_recorded(args, meta0, args.models[0])
    data_name, _, train, f, r, test = prepare_data(args)
    test = subset(test, args.test_size, args.seed)
    if test is None:
        raise SystemExit("error: report needs a test set; with --data folder:DIR pass --test-data DIR")
    models = {}
    for name, path, model, meta in loaded:
        check_data(meta, path, data_name, train[0])
        models[name] = model if name == "retrain" else (model, meta.get("seconds"))
    say(args, f"scoring {len(models)} models on {len(f[1])} forget, {len(r[1])} remain and {len(test[1])} test "
        f"images{'' if args.no_tsne else ' (and a t-SNE, the slow part; --no-tsne skips it)'}")
    prov = {"data": data_record(args, data_name, train), "forget": forget_record(args), "data_args": data_args(args),
            "test_subset": {"size": args.test_size, "seed": args.seed},
            "models": {name: file_record(path) for name, path, _, _ in loaded}}
    rep = report(models, model_input(f), model_input(r), model_input(test), out_dir=args.out,
                 retrain="retrain" if args.retrain else None,
                 mean=meta0.get("mean"), std=meta0.get("std"), device=dev, title=args.title or "",
                 tsne=not args.no_tsne, seed=args.seed, class_names=class_names(data_name),
                 progress=not args.no_progress, provenance=prov)
    print(rep.markdown.split("\n## ")[0])
    print(f"wrote {', '.join(sorted(os.path.basename(p) for p in rep.paths.values()))} to {args.out}")


def add_parser(sub, fmt):
    rp = sub.add_parser("report", help="one table + plots + markdown page comparing model files",
                        formatter_class=fmt, description="Score several model files on the same forget / remain / "
                        "test sets: accuracies (also per class), MIA-LR, MIA-efficacy, gap to a retrained model, "
                        "time; write table.csv, metrics.json, mia_hist.png, tsne.png, report.md and manifest.json to "
                        "--out. "
                        "The training subset is the one the first model file records, unless --train-size is given.")
    rp.add_argument("--models", nargs="+", required=True, help="model files to compare (the original included)")
    rp.add_argument("--names", nargs="+", help="a row name per --models file (default: file names)")
    rp.add_argument("--retrain", help="a model retrained without the forget set (the gap reference)")
    rp.add_argument("--out", required=True, help="folder for the report")
    rp.add_argument("--title", help="title of report.md (when not given: none)")
    rp.add_argument("--test-size", type=int, default=2000, help="test images used (seeded subset)")
    rp.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure (the slow part)")
    add_normalisation_args(rp, "the program --models (TorchScript / torch.export)",
                           "none; a model file records its own")
    add_data_args(rp)
    add_common(rp)
    rp.set_defaults(func=cmd_report)
