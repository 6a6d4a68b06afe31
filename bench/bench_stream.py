"""Unlearning from image files on disk: decode, search and fine-tune throughput, and peak memory.

Writes N JPEG images (3 x SIZE x SIZE, 512 distinct pictures under N names) and a
labels.csv into --root (a temporary folder by default; reused when it already holds the
same N and SIZE), loads them with fastunlearn.data.image_folder.load_image_folder and runs
fu.unlearn with the whole folder as the forget set. Reports, per repetition:

* decode: images/s of a DataLoader pass over the folder with --workers workers;
* search / fine-tune / job: images/s of each phase (forget images / phase seconds) and of
  the whole call;
* bound: "loader" when the job from files runs below 0.8x the job from tensors (the same
  images decoded beforehand, a subset of up to --tensor-subset of them unless --tensors),
  else "compute";
* peak RSS of this process and of its largest child (the workers);
* on a GPU, its mean utilisation (percent, sampled every --util-interval seconds by
  torch.cuda.utilization, else nvidia-smi) during the job from files and the job from
  tensors: whether decoding keeps the GPU busy.

--tensors runs the same job from the whole set held as tensors and prints the ratio
files / tensors (the acceptance figure at 64 px with 2 workers).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, commit, device_name, print_table, sync, versions  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.data.image_folder import load_image_folder  # noqa: E402
from fastunlearn.data.streaming import stack_images  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

CLASSES = 5


def generate(root: str, n: int, size: int, seed: int = 0) -> None:
    """N JPEGs under root/img and root/labels.csv (path, label, site); skipped when a
    previous run left the same N and size."""
    from PIL import Image

    stamp = os.path.join(root, ".generated")
    if os.path.exists(stamp) and open(stamp).read() == f"{n} {size}":
        return
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(512):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        noise = rng.integers(0, 32, (size, size, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR)) // 8 * 7 + noise
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        pictures.append(buf.getvalue())
    tmp = os.path.join(root, "labels.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site"])
        for i in range(n):
            rel = f"img/{i:07d}.jpg"
            with open(os.path.join(root, rel), "wb") as g:
                g.write(pictures[i % len(pictures)])
            w.writerow([rel, i % CLASSES, "AB"[i % 2]])
    os.replace(tmp, os.path.join(root, "labels.csv"))
    with open(stamp, "w") as f:
        f.write(f"{n} {size}")


def tiny_model(seed: int = 0) -> nn.Module:
    """Two strided convs: a model cheap enough for 224 px images by the ten thousand on a CPU."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))


def make_model(args) -> nn.Module:
    if args.arch == "tiny":
        return tiny_model(args.seed)
    torch.manual_seed(args.seed)
    kw = {"width": args.width} if args.arch == "allcnn" else {}
    if args.arch.startswith("resnet") and args.imagenet_stem:
        kw["small_input"] = False
    return create_model(args.arch, in_channels=3, num_classes=CLASSES, **kw)


def decode_rate(ds, workers: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=stack_images)
    t0 = time.perf_counter()
    count = sum(batch.shape[0] for batch in loader)
    return count / (time.perf_counter() - t0)


def _read_utilization(device: torch.device):
    """The GPU's utilisation in percent now: torch.cuda.utilization (needs pynvml), else
    nvidia-smi; None when neither can say."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no pynvml, or a driver it cannot query
        pass
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                              "-i", str(index)], capture_output=True, text=True, timeout=5)
        return float(out.stdout.strip().splitlines()[0])
    except Exception:  # no nvidia-smi, or output it cannot parse
        return None


class UtilizationSampler:
    """Samples the GPU's utilisation in a thread while the block runs; .mean() is their
    mean in percent (None on a CPU, or when nothing could be read)."""

    def __init__(self, device: torch.device, interval: float):
        self.device, self.interval, self.samples = device, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            value = _read_utilization(self.device)
            if value is None:
                return
            self.samples.append(value)

    def __enter__(self):
        if self.device.type == "cuda" and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_job(model, forget, cfg, device, interval: float = 0.0):
    """(the unlearning's timings, the GPU's mean utilisation during it or None)."""
    sync(device)
    with UtilizationSampler(device, interval) as util:
        res = fu.unlearn(model, forget, config=cfg, mean=[0.5] * 3, std=[0.25] * 3, device=device, progress=False)
        sync(device)
    return res.timings, util.mean()


def peak_rss_mib() -> tuple[float, float]:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def as_tensors(ds, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    sub = torch.utils.data.Subset(ds, range(rows))
    x = torch.cat(list(torch.utils.data.DataLoader(sub, batch_size=256, num_workers=2, collate_fn=stack_images)))
    return x, ds.targets[:rows].clone()


def one_rep(args, ds, device, rep: int) -> dict:
    n = len(ds)
    cfg = fu.UnlearnConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01, loader_workers=args.workers,
                           search_batch_size=args.search_batch_size, seed=args.seed)
    dec = decode_rate(ds, args.workers)
    t, util = run_job(make_model(args), ds, cfg, device, args.util_interval)
    row = {"rep": rep, "n": n, "size": args.size, "workers": args.workers, "epochs": args.epochs, "arch": args.arch,
           "decode_ips": dec, "search_ips": n / t["search"], "finetune_ips": n * args.epochs / t["finetune"],
           "job_ips": n / t["total"], "job_s": t["total"], "search_s": t["search"], "gpu_util_pct": util}
    rows = n if args.tensors else min(n, args.tensor_subset)
    x, y = as_tensors(ds, rows)
    tt, tensor_util = run_job(make_model(args), (x, y), cfg, device, args.util_interval)
    del x, y
    row["tensor_gpu_util_pct"] = tensor_util
    row["tensor_job_ips"] = rows / tt["total"]
    row["files_over_tensors"] = row["tensor_job_ips"] / row["job_ips"]
    row["bound"] = "loader" if row["job_ips"] < 0.8 * row["tensor_job_ips"] else "compute"
    row["rss_mib"], row["child_rss_mib"] = peak_rss_mib()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="images to write and forget (default 20,000)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    ap.add_argument("--root", help="folder for the images (default: a temporary one, removed afterwards)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (UnlearnConfig.loader_workers)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--search-batch-size", type=int, default=None)
    ap.add_argument("--arch", default="tiny", help="tiny (default), or a fastunlearn.nn.models name: allcnn, resnet18")
    ap.add_argument("--width", type=float, default=0.25, help="AllCNN width")
    ap.add_argument("--imagenet-stem", action="store_true",
                    help="resnet: the ImageNet stem (7x7 stride 2 + max pool) for 224 px images")
    ap.add_argument("--util-interval", type=float, default=0.5,
                    help="seconds between GPU utilisation samples (0: none)")
    ap.add_argument("--tensors", action="store_true", help="compare with the whole set as tensors (needs the RAM)")
    ap.add_argument("--tensor-subset", type=int, default=2048, help="images of the tensor run without --tensors")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="fastunlearn-stream-")
    root = args.root or tmp.name
    try:
        t0 = time.perf_counter()
        generate(root, args.n, args.size, args.seed)
        print(f"{args.n} JPEGs of 3x{args.size}x{args.size} in {root} ({time.perf_counter() - t0:.1f} s to write)")
        t0 = time.perf_counter()
        ds = load_image_folder(root)
        print(f"header check of {len(ds)} files: {time.perf_counter() - t0:.2f} s")
        rows = []
        for r in range(args.reps):
            rows.append(one_rep(args, ds, device, r))
            print(f"rep {r}: {rows[-1]}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\n{device_name(device)}, {versions()}, commit {commit()}")
    print_table(rows, ["rep", "n", "size", "workers", "decode_ips", "search_ips", "finetune_ips", "job_ips", "job_s",
                       "tensor_job_ips", "files_over_tensors", "bound", "gpu_util_pct", "tensor_gpu_util_pct",
                       "rss_mib", "child_rss_mib"])
    if not args.no_csv:
        path = append_csv([dict(r, bench="stream", device=device_name(device)) for r in rows], args.csv)
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
