"""Plain supervised training: the original models to unlearn from, and retrained references."""

from __future__ import annotations

import copy
import math
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
    crop, flip = augment_mode(augment)
    x, y = as_tensors(train, "train")
    n = x.shape[0]
    if n == 0:
        raise ValueError("train is empty")
    dev = resolve_device(model, device)
    net = copy.deepcopy(model).to(dev)
    if epochs == 0:
        return net.eval()

    autocast = resolve_precision(precision, dev)
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
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        sched = None
    pad = max(1, x.shape[-1] // 8)

    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)  # dropout and any other module-level randomness
        g = torch.Generator().manual_seed(seed)
        net.train()
        bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
        undo = fuse_batch_norm_relu(net) if fuse else (lambda: None)
        try:
            for epoch in range(epochs):
                order = torch.randperm(n, generator=g)
                seen = correct = 0
                loss_sum = 0.0
                for s in range(steps_per_epoch):
                    idx = order[s * batch_size:(s + 1) * batch_size]
                    xb = x[idx.to(x.device)].to(dev, non_blocking=True)
                    yb = y[idx.to(y.device)].to(dev, non_blocking=True)
                    xb = prepare(xb)
                    if crop:
                        xb = random_crop(xb, pad, g)
                    if flip:
                        xb = random_flip(xb, g)
                    xb = prepare(xb, mean, std)
                    if channels_last:
                        xb = channels_last_input(xb)
                    with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                        logits = net(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    if progress:
                        seen += yb.shape[0]
                        loss_sum += float(loss.detach()) * yb.shape[0]
                        correct += int((logits.argmax(1) == yb).sum())
                        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}",
                                        acc=f"{correct / seen:.3f}", refresh=False)
                    bar.update(1)
        finally:
            undo()
            bar.close()
    if channels_last:
        net = net.to(memory_format=torch.contiguous_format)
    return net.eval()
