"""Peak memory of a search streamed from a Dataset far larger than the chunk.

200,000 uint8 images of 3x64x64 (2.4 GB if materialised) come from a Dataset that builds
each one on demand; the engine holds one chunk at a time and keeps only O(N) outputs, so
the process's peak RSS stays near its size before the search. Prints the RSS before and
after, the peak, and what materialising the set would have cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, device_name  # noqa: E402

from fastunlearn import UnlearnConfig  # noqa: E402
from fastunlearn.engine.search import run_search  # noqa: E402


class SyntheticImages(torch.utils.data.Dataset):
    """N deterministic uint8 images made on demand from a small bank (nothing big is stored)."""

    def __init__(self, n, shape=(3, 64, 64), classes=10, bank=256):
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.bank = torch.randint(0, 256, (bank,) + shape, generator=g, dtype=torch.uint8)
        self.classes = classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = self.bank[i % len(self.bank)].roll(shifts=i // len(self.bank), dims=-1)
        return img, i % self.classes


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)).eval()
    ds = SyntheticImages(args.n)
    cfg = UnlearnConfig(eps=0.1, steps=1, search_batch_size=args.chunk, precision="fp32")
    before = rss_mb()
    t0 = time.perf_counter()
    res = run_search(model, ds, None, cfg, device="cpu", progress=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    full = args.n * 3 * 64 * 64 / 2**20
    row = {"bench": "search-memory", "device": device_name(torch.device("cpu")), "n": args.n, "input": "3x64x64 uint8",
           "chunk": args.chunk, "rss_before_mb": round(before, 1), "rss_after_mb": round(rss_mb(), 1),
           "peak_rss_mb": round(peak, 1), "materialised_mb": round(full, 1), "seconds": round(secs, 1),
           "samples_per_s": round(args.n / secs, 1), "crossed": float(res.success.float().mean())}
    for k, v in row.items():
        print(f"{k:16s} {v}")
    print(f"appended to {append_csv([row], args.csv)}")


if __name__ == "__main__":
    main()
