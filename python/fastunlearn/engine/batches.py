"""The fine-tune's batches: where the data is staged, how a batch's rows are gathered and
augmented, and how long a stretch of steps took."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from fastunlearn.data.augment import augment_mode, crop_at, flip_where
from fastunlearn.data.streaming import DatasetRows


def stage(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Put a data tensor where the train step gathers from: on the device when it fits in a
    quarter of the free memory, else pinned host memory (batches are copied asynchronously).
    device carries its index (validate.canonical_device), as tensors' devices do. A
    DatasetRows (a Dataset read in batches) stays where it is."""
    if isinstance(x, DatasetRows) or x.device == device:
        return x
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.numel() * x.element_size() < free // 4:
            return x.to(device, non_blocking=True)
        return x.pin_memory() if not x.is_pinned() else x
    return x.to(device)


def gather(src: torch.Tensor, idx: torch.Tensor, host_idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Rows of src on dev: src is staged on dev (gathered there with idx, the indices on the
    device) or, too big for it, in pinned host memory (gathered with the same indices on the
    host, host_idx). Neither path copies indices between host and device: that would make
    every step wait for the device."""
    if src.device.type == "cpu" and dev.type != "cpu":
        return src[host_idx].to(dev, non_blocking=True)
    return src[idx]


def draw_augment(mode: str, count: int, pad: int, gen: torch.Generator) -> dict:
    """One epoch's crop offsets and flips for ``count`` samples (CPU tensors)."""
    crop, flip = augment_mode(mode)
    out = {}
    if crop:
        out["oy"] = torch.randint(0, 2 * pad + 1, (count,), generator=gen)
        out["ox"] = torch.randint(0, 2 * pad + 1, (count,), generator=gen)
    if flip:
        out["flip"] = torch.rand(count, generator=gen) < 0.5
    return out


def params_on(params: Optional[dict], dev: torch.device) -> Optional[dict]:
    """Augmentation parameters (draw_augment's) copied to dev, or None."""
    return None if params is None else {k: v.to(dev, non_blocking=True) for k, v in params.items()}


def apply_augment(x: torch.Tensor, params: dict, idx: torch.Tensor, pad: int) -> torch.Tensor:
    """The batch x (rows idx of its set) with those rows' crops and flips; params on x's device."""
    idx = idx.to(x.device)
    if "oy" in params:
        x = crop_at(x, pad, params["oy"][idx], params["ox"][idx])
    if "flip" in params:
        x = flip_where(x, params["flip"][idx])
    return x


class Clock:
    """Seconds of a stretch of steps. On CUDA from events, so that stopping the clock does
    not wait for the device: ``stop`` returns a function that reads the time when called."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.t0 = self.ev0 = None

    def _event(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.dev))  # the engine's device, not the current one
        return ev

    def start(self):
        if self.cuda:
            self.ev0 = self._event()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> Callable[[], float]:
        if not self.cuda:
            dt = time.perf_counter() - self.t0
            return lambda: dt
        ev0, ev1 = self.ev0, self._event()

        def read():
            ev1.synchronize()
            return ev0.elapsed_time(ev1) / 1e3

        return read
