"""Plain supervised training: the original models to unlearn from, and retrained references."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastunlearn.config import TRAIN_PRECISIONS, UnlearnConfig
from fastunlearn.data.augment import augment_mode, random_crop, random_flip
from fastunlearn.data.io import as_tensors
from fastunlearn.data.validate import resolve_device
from fastunlearn.eval.metrics import prepare
from fastunlearn.nn.fuse import batch_norm_fusion_on, fuse_batch_norm_relu
from fastunlearn.nn.layout import channels_last_input, default_channels_last
from fastunlearn.runtime.precision import resolve_precision

SCHEDULES = ("onecycle", "cosine", "constant")


def train_classifier(model: torch.nn.Module, train, epochs: int, lr: float = 0.05, batch_size: int = 128,
                     mean=None, std=None, device=None, seed: int = 0, augment: Union[bool, str] = False,
                     weight_decay: float = 5e-4, progress: bool = True, desc: str = "train",
                     schedule: str = "onecycle", momentum: float = 0.9,
                     label_smoothing: float = 0.0, precision: str = "fp32") -> torch.nn.Module:
    """A trained copy of ``model`` (the input is never modified), returned in eval mode.

    SGD with momentum and a one-cycle (default), cosine or constant learning rate, cross-
    entropy loss. ``train`` is an (x, y) pair or a Dataset; x may stay uint8 on the CPU,
    each batch is moved and converted on ``device`` (default: where the model is).
    ``augment``: True (= "crop+flip"), "crop", "flip" or False; crop pads by H/8.
    ``precision``: "fp32", "bf16" (autocast) or "auto" (bf16 on GPUs and on CPUs with native
    bf16, as UnlearnConfig's). The run is reproducible for a given seed on CPU and leaves the
    global RNG untouched.

    The step runs as the fine-tune's does (finetune.FinetuneEngine): convolutional models in
    channels_last, and on CPU each BatchNorm2d (+ the ReLU after it) through the native
    batch_norm_relu op, faster than plain PyTorch (bench/bench_train_eval.py measures it).
    The model comes back in the default (contiguous) layout.
    """
    _check_train_args(epochs, lr, batch_size, schedule, precision)
    crop, flip = augment_mode(augment)
    x, y = as_tensors(train, "train")
    n = x.shape[0]
    if n == 0:
        raise ValueError("train is empty")
    dev = resolve_device(model, device)
    net = copy.deepcopy(model).to(dev)
    if epochs == 0:
        return net.eval()

    autocast = resolve_precision(precision, dev, net, tuple(x.shape[1:]))
    fuse = batch_norm_fusion_on(dev, False, UnlearnConfig())  # the fine-tune's default rule
    channels_last = default_channels_last(net, dev, autocast, fused_batch_norm=fuse)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    steps_per_epoch = math.ceil(n / batch_size)
    # A trailing batch of one sample would break BatchNorm in train mode.
    drop_single = n % batch_size == 1 and n > 1
    if drop_single:
        steps_per_epoch -= 1
    total = steps_per_epoch * epochs
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = _scheduler(opt, schedule, lr, total)
    batches = _Batches(x, y, dev, batch_size, crop, flip, max(1, x.shape[-1] // 8), mean, std, channels_last)

    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)  # dropout and any other module-level randomness
        g = torch.Generator().manual_seed(seed)
        net.train()
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        undo = fuse_batch_norm_relu(net) if fuse else (lambda: None)
        try:
            for epoch in range(epochs):
                _train_epoch(net, batches, torch.randperm(n, generator=g), steps_per_epoch, g, opt, sched,
                             autocast, label_smoothing, bar if progress else None, epoch)
        finally:
            undo()
            bar.close()
    if channels_last:
        net = net.to(memory_format=torch.contiguous_format)
    return net.eval()


def _check_train_args(epochs, lr, batch_size, schedule, precision) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be one of {TRAIN_PRECISIONS} (fp16 would need loss scaling), "
                         f"got {precision!r}")


def _scheduler(opt, schedule: str, lr: float, total: int):
    if schedule == "onecycle":
        # OneCycleLR divides by its warm-up's length in steps, pct_start * total - 1: zero for a
        # 0.25 warm-up of 4 steps. Such a run warms up over 0.3 of its steps instead.
        pct = 0.25 if 0.25 * total != 1 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=pct)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return None


@dataclass(frozen=True)
class _Batches:
    """The training set and how a batch of it becomes model input on the device."""
    x: torch.Tensor
    y: torch.Tensor
    dev: torch.device
    batch_size: int
    crop: bool
    flip: bool
    pad: int
    mean: object
    std: object
    channels_last: bool

    def take(self, order: torch.Tensor, s: int, g: torch.Generator):
        """Batch s of the epoch's order: (input, labels), augmented with g's draws."""
        idx = order[s * self.batch_size:(s + 1) * self.batch_size]
        xb = self.x[idx.to(self.x.device)].to(self.dev, non_blocking=True)
        yb = self.y[idx.to(self.y.device)].to(self.dev, non_blocking=True)
        xb = prepare(xb)
        if self.crop:
            xb = random_crop(xb, self.pad, g)
        if self.flip:
            xb = random_flip(xb, g)
        xb = prepare(xb, self.mean, self.std)
        if self.channels_last:
            xb = channels_last_input(xb)
        return xb, yb


def _train_epoch(net, batches: _Batches, order, steps: int, g, opt, sched, autocast, label_smoothing, bar,
                 epoch: int) -> None:
    """One epoch of SGD steps in the given order; bar (None: no progress) shows the running loss
    and accuracy."""
    dev = batches.dev
    seen = correct = 0
    loss_sum = 0.0
    for s in range(steps):
        xb, yb = batches.take(order, s, g)
        with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if bar is not None:
            seen += yb.shape[0]
            loss_sum += float(loss.detach()) * yb.shape[0]
            correct += int((logits.argmax(1) == yb).sum())
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}",
                            acc=f"{correct / seen:.3f}", refresh=False)
            bar.update(1)
