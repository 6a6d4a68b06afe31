"""The training harness every baseline shares (eval/baselines.py, eval/peer_baselines.py): the
Baseline record, the schedule checks, seeded SGD over the forget and / or remain set, timing."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastunlearn.data.validate import resolve_device
from fastunlearn.eval.metrics import prepare


@dataclass
class Baseline:
    model: nn.Module
    seconds: float
    name: str
    settings: dict = field(default_factory=dict)


def check_schedule(epochs, lr):
    """Raise on an epoch count that is not an integer >= 0 or a learning rate that is not > 0."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")


class Stream:
    """Endless seeded shuffled batches of one set."""

    def __init__(self, x, y, batch, gen, dev):
        self.x, self.y, self.batch, self.gen, self.dev = x, y, batch, gen, dev
        self.queue = []

    def next(self):
        if not self.queue:
            perm = torch.randperm(self.x.shape[0], generator=self.gen)
            self.queue = [perm[i:i + self.batch] for i in range(0, len(perm), self.batch)]
        idx = self.queue.pop(0)
        return self.x[idx].to(self.dev), self.y[idx].to(self.dev)


def sgd_loop(model, forget, remain, steps_of, loss_fn, epochs, lr, batch_size, mean, std, device, seed, momentum=0.9,
             weight_decay=0.0, grad_hook=None):
    """SGD for ``epochs`` passes over the set ``steps_of`` names ("forget" or "remain");
    each step gets a batch of both sets (None where a set is absent) and loss_fn(model, f, r).
    grad_hook(model), when given, runs between backward and the step (to mask gradients)."""
    dev = resolve_device(model, device)
    net = copy.deepcopy(model).to(dev)
    net.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    streams = {k: (Stream(*d, batch_size, gen, dev) if d is not None else None)
               for k, d in (("forget", forget), ("remain", remain))}
    n = (forget if steps_of == "forget" else remain)[0].shape[0]
    steps = epochs * max(1, -(-n // batch_size))

    def batch(k):
        s = streams[k]
        if s is None:
            return None
        x, y = s.next()
        return prepare(x, mean, std), y

    net.train()
    for _ in range(steps):
        loss = loss_fn(net, batch("forget"), batch("remain"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook(net)
        opt.step()
    return net.eval()


def timed(name, settings, fn):
    """Baseline(fn(), its wall time in seconds (CUDA synchronised), name, settings)."""
    t0 = time.perf_counter()
    model = fn()
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        torch.cuda.synchronize(p.device)
    return Baseline(model, time.perf_counter() - t0, name, settings)
