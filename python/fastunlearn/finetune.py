"""The outer fine-tune (Algorithms 2 and 3) on the relabelled forget set.

loss = CE(f_w(u_f), y_b) + rho * R, with R the cross-entropy of a remain batch to its true
labels or to the original model's outputs (distillation). SGD with momentum, the
authors' batch size, learning rate and epochs by default. The forget and remain batches
go through the model in separate forwards, as in the authors' code, so each batch sets
BatchNorm statistics on its own.

Batch order comes from one seeded generator, so a run is reproducible, and a run resumed
from a checkpoint continues with the exact batches it would have seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import reference
from .config import UnlearnConfig
from .search import SearchResult, _as_pixels, _Normalizer, _progress, resolve_precision


@dataclass
class FinetuneState:
    """Everything needed to continue a fine-tune: the epoch reached and the RNG state."""

    epoch: int = 0
    history: list = field(default_factory=list)


def _batches(n: int, batch: int, gen: torch.Generator):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch] for i in range(0, n, batch)]


class _RemainStream:
    """Endless seeded shuffled batches of the remain set."""

    def __init__(self, n, batch, gen):
        self.n, self.batch, self.gen = n, batch, gen
        self.queue = []

    def next(self):
        if not self.queue:
            self.queue = _batches(self.n, self.batch, self.gen)
        return self.queue.pop(0)


def finetune(model: nn.Module, forget_x: torch.Tensor, search: SearchResult, config: UnlearnConfig, *,
             remain=None, teacher: Optional[nn.Module] = None, mean=None, std=None, device=None,
             progress: bool = True, probe: Optional[Callable[[nn.Module], dict]] = None,
             start_epoch: int = 0, history: Optional[list] = None, optimizer_state=None,
             on_epoch_end: Optional[Callable] = None) -> tuple[nn.Module, list]:
    """Fine-tune ``model`` in place (the caller passes its own copy). Returns (model, history).

    search: the precomputed relabels; epoch e uses refresh ``e % search.refreshes``.
    remain: (x, y) or None. teacher: the frozen original, needed for remain_target="distill".
    probe: called with the model after each epoch; its dict goes into the history.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    n = forget_x.shape[0]
    norm = _Normalizer(mean, std, forget_x.shape[1], device)
    autocast = resolve_precision(config.precision, device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    rho = config.remain_reg
    use_remain = rho > 0 and remain is not None
    if rho > 0 and remain is None:
        raise ValueError("config.remain_reg > 0 needs a remain set: pass remain=(x, y)")
    if use_remain and config.remain_target == "distill" and teacher is None:
        raise ValueError("remain_target='distill' needs the original model as teacher")

    # Batch order for every epoch is drawn from one generator; skipping the epochs already
    # done replays the same draws, so a resumed run sees the batches it would have seen.
    gen = torch.Generator().manual_seed(config.seed)
    remain_gen = torch.Generator().manual_seed(config.seed + 1)
    remain_stream = _RemainStream(remain[0].shape[0], config.batch_size, remain_gen) if use_remain else None
    history = list(history or [])
    for e in range(config.epochs):
        batches = _batches(n, config.batch_size, gen)
        remain_idx = [remain_stream.next() for _ in batches] if use_remain else None
        if e < start_epoch:
            continue
        targets = search.train_targets(e % search.refreshes)
        model.train()
        t0 = time.perf_counter()
        total = forget_total = remain_total = 0.0
        bar = _progress(len(batches), progress, f"fine-tune {e + 1}/{config.epochs}")
        for b, idx in enumerate(batches):
            u = _as_pixels(forget_x[idx], device)
            tgt = targets[idx].to(device)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss_f = reference.forget_loss(model(norm(u)), tgt)
                loss = loss_f
                if use_remain:
                    ridx = remain_idx[b]
                    ur = _as_pixels(remain[0][ridx], device)
                    yr = remain[1][ridx].to(device)
                    teacher_logits = None
                    if config.remain_target == "distill":
                        with torch.no_grad():
                            teacher_logits = teacher(norm(ur))
                    loss_r = reference.remain_loss(model(norm(ur)), yr, teacher_logits, config.remain_target)
                    loss = loss_f + rho * loss_r
                    remain_total += float(loss_r.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            forget_total += float(loss_f.detach())
            bar.update(1)
        bar.close()
        row = {"epoch": e + 1, "loss": total / len(batches), "forget_loss": forget_total / len(batches),
               "seconds": time.perf_counter() - t0}
        if use_remain:
            row["remain_loss"] = remain_total / len(batches)
        if probe is not None:
            row.update(probe(model))
            model.train()
        history.append(row)
        if on_epoch_end is not None:
            on_epoch_end(e + 1, model, opt, history)
    model.eval()
    return model, history
