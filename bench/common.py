"""Timing and CSV helpers shared by every benchmark in bench/."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

CSV_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")


DATASETS = ("fashion-mnist", "retina")


def load_splits(dataset: str = "fashion-mnist", data_dir: str | None = None):
    """(name, splits) of a bundled data set: fashion-mnist (the default; sklearn digits when
    it cannot be found) or retina (RetinaMNIST's 28 px fundus photographs, 5 grades, RGB)."""
    from fastunlearn.data import io as data

    if dataset == "retina":
        root = data_dir or os.environ.get("FASTUNLEARN_DATA") or ""
        path = os.path.join(root, "retinamnist.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"retina: no retinamnist.npz in {root or 'the current folder'} "
                                    "(give --data-dir or set FASTUNLEARN_DATA)")
        return "retinamnist", data.load_medmnist(path)
    if dataset != "fashion-mnist":
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return data.load_default(data_dir)


def resized(x: torch.Tensor, size: int = 0, channels: int = 0, chunk: int = 64) -> torch.Tensor:
    """uint8 images resized to size x size (bilinear) and/or repeated to ``channels``, a chunk
    at a time, so no float copy of the whole set is ever held (3 x 512 x 512 float32 is 3 MB
    an image)."""
    if not size and not channels:
        return x
    out = None
    for i in range(0, x.shape[0], chunk):
        t = x[i:i + chunk].float()
        if size:
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        if channels and channels != t.shape[1]:
            t = t.repeat(1, channels // t.shape[1], 1, 1)
        t = t.round_().clamp_(0, 255).to(torch.uint8)
        if out is None:
            out = torch.empty((x.shape[0],) + tuple(t.shape[1:]), dtype=torch.uint8)
        out[i:i + chunk] = t
    return out


def model_label(arch: str, width: float) -> str:
    """The model's name in tables and CSV rows: the width only where the architecture takes one."""
    return f"{arch}-w{width}" if arch in ("allcnn", "smallcnn") else arch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    return ", ".join(parts)


def commit() -> str:
    """The code's commit: $FASTUNLEARN_COMMIT when set (a copy of the tree whose git HEAD is
    stale, as on a lent GPU machine), else git's HEAD."""
    if os.environ.get("FASTUNLEARN_COMMIT"):
        return os.environ["FASTUNLEARN_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, *, warmup: int = 3, reps: int = 20, min_seconds: float = 0.0):
    """(p20, p50, p80) of fn's wall time in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
        return p20, p50, p80
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10)
    return q[1], statistics.median(times), q[7]


def append_csv(rows: list[dict], path: str | None = None):
    """Append rows to a CSV, with device/versions/commit/time added to each.

    Rows may carry different keys; the header is the union, and an existing file whose
    header lacks a new key is rewritten with the wider header (old rows get blanks).
    """
    path = path or os.environ.get("FASTUNLEARN_BENCH_CSV", CSV_DEFAULT)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = [dict(r, versions=versions(), commit=commit(), timestamp=stamp) for r in rows]
    keys: list[str] = []
    old_rows: list[dict] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            old_rows = list(reader)
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(old_rows + rows)
    os.replace(tmp, path)
    return path


def add_run_args(ap):
    """--device, --threads, --reps, --csv, --no-csv: the options every op benchmark shares."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to benchmark on (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per case on CPU (default 20)")
    ap.add_argument("--csv", default=None, help="CSV to append rows to (default bench/results.csv or "
                    "$FASTUNLEARN_BENCH_CSV)")
    ap.add_argument("--no-csv", action="store_true", help="print the table only")


def apply_run_args(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def report(rows: list[dict], title: str, cols: list[str], args, device: torch.device):
    """Print the rows as a table under title; append them to the CSV with the device name
    unless --no-csv."""
    print(f"\n{title}")
    print_table(rows, cols)
    if not args.no_csv:
        common = {"device": device_name(device)}
        print(f"\nappended {len(rows)} rows to {append_csv([dict(common, **r) for r in rows], args.csv)}")


def print_table(rows: list[dict], cols: list[str]):
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
