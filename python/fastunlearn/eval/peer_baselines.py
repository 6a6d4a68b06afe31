"""Baselines the unlearning literature compares against, in the harness of baseline_harness.py.

salun      SalUn (Fan et al., 2024): a weight-saliency mask (the largest |gradient| of the
           forget loss) limits random-label training (forget set to random wrong labels,
           remain set to its labels) to the salient weights.
l1_sparse  l1-sparse unlearning (Jia et al., 2023): fine-tune on the remain set with an l1
           penalty on the weights whose weight decays linearly to 0 over the run.
ssd        Selective Synaptic Dampening (Foster et al., 2024), retrain-free: weights whose
           diagonal Fisher importance on the forget set exceeds ``alpha`` times their importance
           on the training set (forget + remain) are scaled by min(lamda * I_D / I_f, 1).

Same calling convention as baselines.py: keyword settings, mean / std / device / seed, and a
Baseline(model, seconds, name, settings) back; the input model is never modified.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from fastunlearn.data import validate
from fastunlearn.data.validate import resolve_device
from fastunlearn.eval.baseline_harness import Baseline, check_schedule, sgd_loop, timed
from fastunlearn.eval.metrics import prepare


def _mean_grads(model, data, batch_size: int, mean, std, dev, transform=None) -> dict:
    """{parameter name: mean over batches of transform(gradient of the batch-mean
    cross-entropy)} (the gradient itself without transform): the per-weight statistics
    SalUn and SSD rank weights by."""
    net = copy.deepcopy(model).to(dev).eval()
    net.requires_grad_(True)
    x, y = data
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    batches = 0
    for i in range(0, x.shape[0], batch_size):
        xb, yb = prepare(x[i:i + batch_size].to(dev), mean, std), y[i:i + batch_size].to(dev)
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(xb).float(), yb).backward()
        for n, p in net.named_parameters():
            if p.grad is not None:
                total[n] += transform(p.grad) if transform is not None else p.grad
        batches += 1
    return {n: t / max(1, batches) for n, t in total.items()}


def saliency_mask(model, forget, *, threshold: float = 0.5, batch_size: int = 128, mean=None, std=None,
                  device=None) -> dict:
    """{parameter name: 0/1 mask}: 1 for the ``threshold`` share of weights (all layers
    together) with the largest |gradient| of the forget set's cross-entropy (SalUn's mask)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    f = validate.pair(forget, "forget")
    dev = resolve_device(model, device)
    grads = {n: g.abs() for n, g in _mean_grads(model, f, batch_size, mean, std, dev).items()}
    flat = torch.cat([g.flatten() for g in grads.values()])
    k = max(1, int(round(threshold * flat.numel())))
    cut = torch.topk(flat, k).values[-1]
    return {n: (g >= cut).to(g.dtype) for n, g in grads.items()}


def salun(model, forget, remain, *, epochs: int = 1, lr: float = 1e-3, threshold: float = 0.5, batch_size: int = 64,
          num_classes=None, mean=None, std=None, device=None, seed: int = 0) -> Baseline:
    """SalUn: random-label training of forget + remain, updating only the salient weights."""
    check_schedule(epochs, lr)
    f, r = validate.pair(forget, "forget"), validate.pair(remain, "remain")
    k = num_classes or int(max(int(f[1].max()), int(r[1].max()))) + 1
    if k < 2:
        raise ValueError(f"salun needs at least 2 classes, got {k}")
    gen = torch.Generator().manual_seed(seed + 7)

    def loss(net, fb, rb):
        shift = torch.randint(1, k, fb[1].shape, generator=gen).to(fb[1].device)
        return F.cross_entropy(net(fb[0]).float(), (fb[1] + shift) % k) + F.cross_entropy(net(rb[0]).float(), rb[1])

    def run():
        mask = saliency_mask(model, f, threshold=threshold, mean=mean, std=std, device=device)

        def masked(net):
            for n, p in net.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(mask[n])

        return sgd_loop(model, f, r, "forget", loss, epochs, lr, batch_size, mean, std, device, seed, grad_hook=masked)

    return timed("salun", dict(epochs=epochs, lr=lr, threshold=threshold), run)


def l1_sparse(model, remain, *, epochs: int = 2, lr: float = 0.01, alpha: float = 5e-4, batch_size: int = 128,
              mean=None, std=None, device=None, seed: int = 0) -> Baseline:
    """l1-sparse: fine-tune on the remain set with alpha_t * ||theta||_1, alpha_t falling
    linearly from ``alpha`` to 0 over the steps."""
    check_schedule(epochs, lr)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    r = validate.pair(remain, "remain")
    steps = max(1, epochs * max(1, -(-r[0].shape[0] // batch_size)))
    state = {"step": 0}

    def loss(net, _, rb):
        a = alpha * (1 - state["step"] / steps)
        state["step"] += 1
        l1 = sum(p.abs().sum() for p in net.parameters())
        return F.cross_entropy(net(rb[0]).float(), rb[1]) + a * l1

    return timed("l1_sparse", dict(epochs=epochs, lr=lr, alpha=alpha), lambda: sgd_loop(
        model, None, r, "remain", loss, epochs, lr, batch_size, mean, std, device, seed))


def ssd(model, forget, remain, *, alpha: float = 10.0, lamda: float = 1.0, batch_size: int = 128, mean=None,
        std=None, device=None, seed: int = 0) -> Baseline:
    """SSD: dampen the weights far more important to the forget set than to the training set."""
    if not alpha > 0 or not lamda > 0:
        raise ValueError(f"alpha and lamda must be > 0, got {alpha!r} and {lamda!r}")
    f, r = validate.pair(forget, "forget"), validate.pair(remain, "remain")
    dev = resolve_device(model, device)

    def run():
        every = (torch.cat([f[0], r[0].to(f[0].device)]), torch.cat([f[1], r[1].to(f[1].device)]))
        i_f = _mean_grads(model, f, batch_size, mean, std, dev, transform=torch.square)
        i_d = _mean_grads(model, every, batch_size, mean, std, dev, transform=torch.square)
        out = copy.deepcopy(model).to(dev)
        with torch.no_grad():
            for n, p in out.named_parameters():
                hit = i_f[n] > alpha * i_d[n]
                scale = (lamda * i_d[n] / i_f[n].clamp(min=torch.finfo(i_f[n].dtype).tiny)).clamp(max=1.0)
                p.mul_(torch.where(hit, scale, torch.ones_like(scale)))
        return out.eval()

    return timed("ssd", dict(alpha=alpha, lamda=lamda), run)
