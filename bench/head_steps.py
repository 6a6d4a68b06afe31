"""Post-steps on the classifier head of an unlearned model, for study_attack_gap.py.

Each step is a function (model, forget, remain, mean, std, seed) -> a new model, whose
backbone is the input's and whose head is fitted on the backbone's features (computed once:
the backbone is frozen, in eval mode, so its features do not change during the fit).

    hft           the library's head fine-tune (fu.compose, finetune="head"): 1 epoch, lr 1e-2
    ftE           the head fine-tuned E epochs on cached remain features, as hft (SGD lr 1e-2,
                  momentum 0.9, constant lr, batch 128, no weight decay)
    refitE        the head re-initialised and trained E epochs on cached remain features with the
                  original's recipe (train_classifier: SGD lr 0.05, momentum 0.9, weight decay
                  5e-4, one-cycle, batch 128), as a retrain's head is trained
    reinitE       the head re-initialised and trained E epochs with ftE's recipe (SGD lr 1e-2, constant)
    hft+rowE      hft, then the forget class's row of the (linear) head re-initialised and trained E epochs
                  on cached remain features with refitE's recipe, the other rows frozen: only the
                  forgotten class's output is re-fitted, as a retrain's is (never a target)
    lbfgs         the head re-initialised and fitted to convergence by full-batch L-BFGS on
                  cross-entropy + 5e-4 / 2 * |params|^2 (SGD's weight decay as a penalty)
    refitE+relab  refitE with the forget images added, each labelled with the unlearned model's
                  prediction among the other classes (the method's relabelled forget set)
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F

import fastunlearn as fu
from fastunlearn.eval.metrics import predict_logits
from fastunlearn.eval.representation import features
from fastunlearn.nn.head_fit import train_head
from fastunlearn.nn.models import head_of


def _reset(head: torch.nn.Module, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _sgd_fit(head, feats, y, epochs, lr, seed, wd=0.0, onecycle=False, batch=128, module=None):
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps = -(-feats.shape[0] // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps * epochs, pct_start=0.25) \
        if onecycle else None
    g = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(feats.shape[0], generator=g)
        for i in range(0, feats.shape[0], batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy((module or head)(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return head.eval()


def _lbfgs_fit(head, feats, y, wd=5e-4, tol=1e-9, max_iter=5000):
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=50, line_search_fn="strong_wolfe")
    f64 = head.double()
    x = feats.double()

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(f64(x), y) + wd / 2 * sum((p ** 2).sum() for p in f64.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return f64.float().eval()


def _refit_rows(model, feats, y, classes, epochs, seed):
    lin = head_of(model)[1]
    lin = lin[-1] if isinstance(lin, torch.nn.Sequential) else lin
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    bound = 1 / feats.shape[1] ** 0.5
    g = torch.Generator().manual_seed(seed)
    rows = torch.nn.Linear(feats.shape[1], len(classes))
    with torch.no_grad():
        rows.weight.uniform_(-bound, bound, generator=g)
        rows.bias.uniform_(-bound, bound, generator=g)
    cls = torch.as_tensor(classes)

    class Head(torch.nn.Module):
        def forward(self, x):
            z = x @ w0.T + b0
            return z.index_copy(1, cls, rows(x))

    _sgd_fit(rows, feats, y, epochs, 0.05, seed, wd=5e-4, onecycle=True, module=Head())
    with torch.no_grad():
        lin.weight[cls] = rows.weight
        lin.bias[cls] = rows.bias
    return model


def head_step(spec: str, model, f, r, mean, std, seed):
    """The model after post-step ``spec`` (see the module docstring)."""
    if spec.startswith("hft+row"):
        out = head_step("hft", model, f, r, mean, std, seed)
        feats = features(out, r[0], mean=mean, std=std)
        return _refit_rows(out, feats, r[1].long(), sorted(set(f[1].tolist())), int(spec[7:]), seed).eval()
    if spec == "hft":
        return fu.compose(model, model, remain=r, finetune="head", epochs=1, lr=1e-2, mean=mean, std=std,
                          seed=seed, progress=False)
    out = copy.deepcopy(model).eval()
    name, head = head_of(out)
    feats, y = features(out, r[0], mean=mean, std=std), r[1].long()
    m = re.fullmatch(r"(ft|refit|reinit)(\d+)(\+relab)?|lbfgs", spec)
    if m is None:
        raise ValueError(f"unknown head step {spec!r}")
    if m.group(3):
        lf = predict_logits(out, f[0], mean, std)
        lf[torch.arange(len(f[1])), f[1].long()] = float("-inf")
        feats = torch.cat([feats, features(out, f[0], mean=mean, std=std)])
        y = torch.cat([y, lf.argmax(1)])
    if spec == "lbfgs":
        _reset(head, seed)
        _lbfgs_fit(head, feats, y)
    elif m.group(1) in ("ft", "reinit"):
        if m.group(1) == "reinit":
            _reset(head, seed)
        train_head(head, feats, y, int(m.group(2)), 1e-2, 128, seed, False)
    else:
        _reset(head, seed)
        _sgd_fit(head, feats, y, int(m.group(2)), 0.05, seed, wd=5e-4, onecycle=True)
    return out.eval()
