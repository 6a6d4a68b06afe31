"""`fastunlearn verify --manifest FILE.json`: check an output against the manifest written
beside it. The SHA-256 of every file it names (output, input model, models and files of a
report) and of the forget-index list are recomputed, and the metrics are re-run on the saved
model files (an unlearned model, or every model of a report); each check prints ok or
MISMATCH, and the exit status is 1 on any mismatch.

Rebuilding the forget set and re-running the metrics needs the data specification that the
command line records; a manifest written from Python, where the data were tensors, has none,
and verify then says that these were not checked."""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from fastunlearn.cli.common import device_of, prepare_data, subset
from fastunlearn.cli.folder import model_input
from fastunlearn.cli.provenance import DATA_ARGS
from fastunlearn.data.checkpoint import load_model
from fastunlearn.eval.metrics import evaluate
from fastunlearn.eval.report import report
from fastunlearn.runtime import manifest

# Metrics re-run on the same machine match to rounding; across machines float sums may differ a little.
TOLERANCE = 1e-4
METRIC_KEYS = ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy")


def _file_checks(record: dict) -> list:
    files = [("output", record.get("output") or {}), ("input model", record.get("input_model") or {})]
    files += [(f"model {name}", m) for name, m in (record.get("models") or {}).items()]
    files += [(f"report file {name}", m) for name, m in (record.get("outputs") or {}).items()]
    checks = []
    for what, entry in files:
        path, want = entry.get("path"), entry.get("sha256")
        if not path or not want:
            continue
        if not os.path.isfile(path):
            checks.append((f"{what} {path}", False, "missing"))
            continue
        got = manifest.sha256_file(path)
        checks.append((f"{what} {path} sha256", got == want, "" if got == want else f"now {got[:16]}..., "
                       f"recorded {want[:16]}..."))
    return checks


def _data_namespace(record: dict, device) -> argparse.Namespace:
    saved = record.get("data_args") or {}
    args = argparse.Namespace(**{k: saved.get(k) for k in DATA_ARGS}, device=device)
    args.data = args.data or "auto"
    args.seed = args.seed or 0
    return args


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), abs_tol=TOLERANCE)


def _metric_checks(record: dict, f, r, test, dev) -> list:
    rows = record.get("metrics") or {}
    want = rows.get("unlearned")
    path = (record.get("output") or {}).get("path")
    if not want or not path or not os.path.isfile(path):
        return []
    model, meta = load_model(path, dev)
    got = evaluate(model, model_input(f), model_input(r), model_input(test), meta.get("mean"), meta.get("std"), dev,
                   max_shadow=5000)
    checks = []
    for k in METRIC_KEYS:
        if k in want:
            ok = _close(got.get(k), want[k])
            checks.append((f"metric {k}", ok, "" if ok else f"now {got.get(k)}, recorded {want[k]}"))
    return checks


def _report_metric_checks(record: dict, f, r, test, dev) -> tuple:
    """Re-score the report's model files on the rebuilt sets, with the report's settings."""
    want = record.get("metrics") or {}
    entries = record.get("models") or {}
    if not want or set(entries) != set(want):
        return [], ["the metrics: the report scored models passed as modules, which have no file to re-score"]
    missing = [e["path"] for e in entries.values() if not os.path.isfile(e["path"])]
    if missing:
        return [], [f"the metrics: model file {missing[0]} is missing"]
    models = {name: load_model(e["path"], dev)[0] for name, e in entries.items()}
    settings, sub = record.get("settings") or {}, record.get("test_subset") or {}
    test = subset(test, sub.get("size"), sub.get("seed") or 0)
    with tempfile.TemporaryDirectory(prefix="fastunlearn-verify-") as tmp:
        rep = report(models, model_input(f), model_input(r), model_input(test), out_dir=tmp,
                     retrain=settings.get("retrain"), mean=settings.get("mean"), std=settings.get("std"),
                     device=dev, tsne=False, seed=settings.get("seed") or 0,
                     max_shadow=settings.get("max_shadow") or 2000)
    checks = []
    for name, row in want.items():
        for k in METRIC_KEYS + ("gap",):
            if k in row:
                got = rep.rows[name].get(k)
                ok = _close(got, row[k])
                checks.append((f"metric {k} of {name}", ok, "" if ok else f"now {got}, recorded {row[k]}"))
    return checks, []


def _data_checks(record: dict, args, dev) -> tuple:
    """(checks, what was not checked) of the forget-index list and the metrics, on the data
    rebuilt from the manifest's data specification."""
    data = _data_namespace(record, args.device)
    try:
        _, _, _, f, r, test = prepare_data(data)
    except SystemExit as e:
        return [("forget set", False, f"cannot be rebuilt: {e.code}")], []
    checks = []
    forget = record.get("forget") or {}
    if forget.get("indices_sha256"):
        got = manifest.sha256_indices(data.forget_index)
        ok = got == forget["indices_sha256"]
        checks.append(("forget-index list sha256", ok, "" if ok else f"now {got[:16]}... ({len(f[1])} "
                       f"images), recorded {forget['indices_sha256'][:16]}... ({forget.get('count')} images)"))
        if not ok:
            return checks, ["the metrics: the forget set they were computed on is not the one rebuilt"]
    if args.no_metrics:
        return checks, ["the metrics (--no-metrics)"]
    if record.get("kind") == "report":
        more, unchecked = _report_metric_checks(record, f, r, test, dev)
        return checks + more, unchecked
    more = _metric_checks(record, f, r, test, dev)
    return checks + more, [] if more else ["the metrics: the manifest records none for its output"]


def cmd_verify(args):
    record = manifest.read(args.manifest)
    dev = device_of(args)
    checks, unchecked = _file_checks(record), []
    if record.get("data_args"):
        more, unchecked = _data_checks(record, args, dev)
        checks += more
    else:
        unchecked.append("the forget set and the metrics: the manifest records no data specification (data passed "
                         "to the Python API as tensors), so neither can be rebuilt")
    for what, ok, detail in checks:
        print(f"{'ok      ' if ok else 'MISMATCH'} {what}" + (f": {detail}" if detail else ""))
    for what in unchecked:
        print(f"not checked: {what}")
    bad = sum(not ok for _, ok, _ in checks)
    if not checks:
        raise SystemExit(f"error: {args.manifest} names nothing that can be checked")
    print(f"{args.manifest}: {len(checks) - bad} of {len(checks)} checks match" + ("" if not bad else
                                                                                  f"; {bad} MISMATCH"))
    return 1 if bad else 0


def add_parser(sub, fmt):
    v = sub.add_parser("verify", help="check an output against its manifest (hashes, forget list, metrics)",
                       formatter_class=fmt, description=__doc__.split("\n\n")[0].replace("\n", " ")
                       .removeprefix("`fastunlearn verify --manifest FILE.json`: "))
    v.add_argument("--manifest", required=True, help="a manifest JSON written beside a model or a report")
    v.add_argument("--no-metrics", action="store_true", help="check the hashes only (skip re-running the metrics)")
    v.add_argument("--device", help="cpu, cuda, ... for re-running the metrics (when not given: cuda if available)")
    v.set_defaults(func=cmd_verify)
