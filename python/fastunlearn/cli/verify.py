"""`fastunlearn verify --manifest FILE.json`: check an output against the manifest written
beside it. The SHA-256 of every file it names (output, input model, models of a report) and
of the forget-index list are recomputed, and an unlearned model's metrics are re-run on the
saved model; each check prints ok or MISMATCH, and the exit status is 1 on any mismatch."""

from __future__ import annotations

import argparse
import math
import os

from fastunlearn.cli.common import device_of, prepare_data
from fastunlearn.cli.folder import model_input
from fastunlearn.cli.provenance import DATA_ARGS
from fastunlearn.data.checkpoint import load_model
from fastunlearn.eval.metrics import evaluate
from fastunlearn.runtime import manifest

# Metrics re-run on the same machine match to rounding; across machines float sums may differ a little.
TOLERANCE = 1e-4
METRIC_KEYS = ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy")


def _file_checks(record: dict) -> list:
    files = [("output", record.get("output") or {}), ("input model", record.get("input_model") or {})]
    files += [(f"model {name}", m) for name, m in (record.get("models") or {}).items()]
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


def cmd_verify(args):
    record = manifest.read(args.manifest)
    dev = device_of(args)
    checks = _file_checks(record)
    forget = record.get("forget") or {}
    if forget.get("indices_sha256") and record.get("data_args"):
        data = _data_namespace(record, args.device)
        try:
            _, _, _, f, r, test = prepare_data(data)
        except SystemExit as e:
            checks.append(("forget set", False, f"cannot be rebuilt: {e.code}"))
        else:
            got = manifest.sha256_indices(data.forget_index)
            ok = got == forget["indices_sha256"]
            checks.append(("forget-index list sha256", ok, "" if ok else f"now {got[:16]}... ({len(f[1])} "
                           f"images), recorded {forget['indices_sha256'][:16]}... ({forget.get('count')} images)"))
            if ok and not args.no_metrics:
                checks += _metric_checks(record, f, r, test, dev)
    for what, ok, detail in checks:
        print(f"{'ok      ' if ok else 'MISMATCH'} {what}" + (f": {detail}" if detail else ""))
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
