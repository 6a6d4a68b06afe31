"""Unlearning baselines in the same harness as fu.unlearn (same data convention, mean/std, timing).

retrain          a fresh copy of the architecture trained on the remain set (the gold standard).
finetune_remain  "FT": keep training the original on the remain set only (catastrophic forgetting).
neggrad          gradient ascent on the forget set (Golatkar et al., 2020).
neggrad_plus     descent on remain, ascent on forget, weighted alpha / (1 - alpha) (Kurmanji et al., 2023).
random_labels    "RL": fit the forget set to random wrong labels, the remain set to its labels (SalUn's RL).
boundary_shrink  Chen et al. (2023): FGSM to the nearest wrong class, fine-tune on the forget set
                 only (fu.unlearn with gamma = lambda = 0, relabel="nearest_incorrect", rho = 0).
scrub            teacher/student min-max distillation (Kurmanji et al., 2023).
salun, l1_sparse, ssd   SalUn, l1-sparse fine-tuning, selective synaptic dampening (eval/peer_baselines.py).

Every function takes the original model and returns a Baseline(model, seconds, name, settings);
the input model is never modified.
"""

from __future__ import annotations

import copy
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastunlearn.api import unlearn
from fastunlearn.config import UnlearnConfig
from fastunlearn.data import validate
from fastunlearn.data.validate import resolve_device
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval.baseline_harness import Baseline, check_schedule, sgd_loop, timed
from fastunlearn.eval.peer_baselines import l1_sparse, salun, ssd

BASELINES = ("retrain", "finetune_remain", "neggrad", "neggrad_plus", "random_labels", "boundary_shrink", "scrub",
             "salun", "l1_sparse", "ssd")  # the last three: eval/peer_baselines.py


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every layer's parameters reset (the module's own init), seeded."""
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in out.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    return out


def retrain(model, remain, *, epochs: int = 3, lr: float = 0.05, batch_size: int = 128, mean=None, std=None,
            device=None, seed: int = 0, progress: bool = False, **train_kw) -> Baseline:
    """Train a freshly initialised copy of ``model``'s architecture on ``remain`` (train_classifier)."""
    check_schedule(epochs, lr)
    fresh = reinitialised(model, seed)
    return timed("retrain", dict(epochs=epochs, lr=lr, batch_size=batch_size), lambda: train_classifier(
        fresh, remain, epochs, lr=lr, batch_size=batch_size, mean=mean, std=std, device=device, seed=seed,
        progress=progress, desc="retrain", **train_kw))


def finetune_remain(model, remain, *, epochs: int = 1, lr: float = 0.01, batch_size: int = 128, mean=None,
                    std=None, device=None, seed: int = 0) -> Baseline:
    """FT: continue training on the remain set only, constant learning rate."""
    check_schedule(epochs, lr)
    r = validate.pair(remain, "remain")

    def loss(net, f, rb):
        return F.cross_entropy(net(rb[0]).float(), rb[1])

    return timed("finetune_remain", dict(epochs=epochs, lr=lr), lambda: sgd_loop(
        model, None, r, "remain", loss, epochs, lr, batch_size, mean, std, device, seed))


def neggrad(model, forget, *, epochs: int = 1, lr: float = 1e-4, batch_size: int = 64, mean=None, std=None,
            device=None, seed: int = 0) -> Baseline:
    """NegGrad: gradient ascent on the forget set's cross-entropy."""
    check_schedule(epochs, lr)
    f = validate.pair(forget, "forget")

    def loss(net, fb, r):
        return -F.cross_entropy(net(fb[0]).float(), fb[1])

    return timed("neggrad", dict(epochs=epochs, lr=lr), lambda: sgd_loop(
        model, f, None, "forget", loss, epochs, lr, batch_size, mean, std, device, seed))


def neggrad_plus(model, forget, remain, *, epochs: int = 1, lr: float = 1e-3, alpha: float = 0.9,
                 batch_size: int = 64, mean=None, std=None, device=None, seed: int = 0) -> Baseline:
    """NegGrad+: alpha * CE(remain) - (1 - alpha) * CE(forget), one remain batch per forget batch."""
    check_schedule(epochs, lr)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    f, r = validate.pair(forget, "forget"), validate.pair(remain, "remain")

    def loss(net, fb, rb):
        return alpha * F.cross_entropy(net(rb[0]).float(), rb[1]) - (1 - alpha) * F.cross_entropy(
            net(fb[0]).float(), fb[1])

    return timed("neggrad_plus", dict(epochs=epochs, lr=lr, alpha=alpha), lambda: sgd_loop(
        model, f, r, "remain", loss, epochs, lr, batch_size, mean, std, device, seed))


def random_labels(model, forget, remain, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 64,
                  num_classes: Optional[int] = None, mean=None, std=None, device=None, seed: int = 0) -> Baseline:
    """RL: each forget batch gets fresh random labels other than the true one; plus the remain loss."""
    check_schedule(epochs, lr)
    f, r = validate.pair(forget, "forget"), validate.pair(remain, "remain")
    k = num_classes or int(max(int(f[1].max()), int(r[1].max()))) + 1
    if k < 2:
        raise ValueError(f"random_labels needs at least 2 classes, got {k}")
    gen = torch.Generator().manual_seed(seed + 7)

    def loss(net, fb, rb):
        shift = torch.randint(1, k, fb[1].shape, generator=gen).to(fb[1].device)
        wrong = (fb[1] + shift) % k
        return F.cross_entropy(net(fb[0]).float(), wrong) + F.cross_entropy(net(rb[0]).float(), rb[1])

    return timed("random_labels", dict(epochs=epochs, lr=lr), lambda: sgd_loop(
        model, f, r, "forget", loss, epochs, lr, batch_size, mean, std, device, seed))


def boundary_shrink(model, forget, *, epochs: int = 10, lr: float = 1e-5, eps: float = 0.1, batch_size: int = 64,
                    mean=None, std=None, device=None, seed: int = 0) -> Baseline:
    """Boundary Shrink (Chen et al., 2023): FGSM relabel to the nearest wrong class, forget set only."""
    check_schedule(epochs, lr)
    cfg = UnlearnConfig(eps=eps, steps=1, gamma=0.0, lamda=0.0, relabel="nearest_incorrect", epochs=epochs, lr=lr,
                        batch_size=batch_size, remain_reg=0.0, seed=seed)
    t0 = time.perf_counter()
    res = unlearn(model, forget, None, config=cfg, mean=mean, std=std, device=device, progress=False)
    return Baseline(res.model, time.perf_counter() - t0, "boundary_shrink", dict(epochs=epochs, lr=lr, eps=eps))


def scrub(model, forget, remain, *, epochs: int = 2, max_steps: int = 1, lr: float = 5e-4, batch_size: int = 64,
          temperature: float = 4.0, gamma: float = 1.0, mean=None, std=None, device=None,
          seed: int = 0) -> Baseline:
    """SCRUB: the student moves away from the original (teacher) on forget batches (max steps,
    the first ``max_steps`` epochs) and towards it plus the labels on remain batches (min steps)."""
    check_schedule(epochs, lr)
    f, r = validate.pair(forget, "forget"), validate.pair(remain, "remain")
    dev = resolve_device(model, device)
    teacher = copy.deepcopy(model).to(dev).eval()
    teacher.requires_grad_(False)

    def kl(s_logits, t_logits):
        return F.kl_div(F.log_softmax(s_logits.float() / temperature, 1), F.softmax(t_logits.float() / temperature, 1),
                        reduction="batchmean")

    def run():
        student = copy.deepcopy(model).to(dev)
        for e in range(epochs):
            if e < max_steps:
                student = sgd_loop(student, f, None, "forget",
                                   lambda net, fb, _: -kl(net(fb[0]), teacher(fb[0])), 1, lr, batch_size, mean, std,
                                   dev, seed + 2 * e)

            def min_loss(net, _, rb):
                out = net(rb[0])
                return gamma * F.cross_entropy(out.float(), rb[1]) + kl(out, teacher(rb[0]))

            student = sgd_loop(student, None, r, "remain", min_loss, 1, lr, batch_size, mean, std, dev,
                               seed + 2 * e + 1)
        return student

    return timed("scrub", dict(epochs=epochs, max_steps=max_steps, lr=lr), run)


def run_all(model, forget, remain, names=BASELINES[1:], *, mean=None, std=None, device=None, seed: int = 0,
            settings: Optional[dict] = None) -> dict:
    """{name: Baseline} for the named baselines (retrain included only when named).

    settings: {name: {keyword: value}} passed to each baseline (epochs, lr, ...).
    """
    settings = settings or {}
    unknown = set(names) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; expected names from {BASELINES}")
    kw = dict(mean=mean, std=std, device=device, seed=seed)
    calls = {
        "retrain": lambda s: retrain(model, remain, **kw, **s),
        "finetune_remain": lambda s: finetune_remain(model, remain, **kw, **s),
        "neggrad": lambda s: neggrad(model, forget, **kw, **s),
        "neggrad_plus": lambda s: neggrad_plus(model, forget, remain, **kw, **s),
        "random_labels": lambda s: random_labels(model, forget, remain, **kw, **s),
        "boundary_shrink": lambda s: boundary_shrink(model, forget, **kw, **s),
        "scrub": lambda s: scrub(model, forget, remain, **kw, **s),
        "salun": lambda s: salun(model, forget, remain, **kw, **s),
        "l1_sparse": lambda s: l1_sparse(model, remain, **kw, **s),
        "ssd": lambda s: ssd(model, forget, remain, **kw, **s),
    }
    return {n: calls[n](dict(settings.get(n, {}))) for n in names}
