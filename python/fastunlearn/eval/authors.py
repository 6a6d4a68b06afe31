"""An op-for-op rewrite of the authors' unlearning loop, the baseline of every benchmark.

It keeps their structure and costs: for each forget batch of 64 the frozen copy computes a
full backward (weight gradients included), the noise is drawn on the host side of the
chain as a separate tensor, the step is a chain of separate eager ops, and the relabel is a
second forward that builds an autograd graph; a remain batch is drawn every iteration
whether or not it is used. With published=False their known defects are left out: the
normalisation is the dataset's own (given as mean/std), the lambda term is in pixel space and
pulls, and targets are labels. With published=True the step is theirs op for op: the input
is the loader's normalised image, the gradient is the batch-mean fp32 cross-entropy's w.r.t.
it (a confident sample's underflows to 0 and it does not move), the image is mapped to their
attack space with their fixed constants (ATTACK_MEAN / ATTACK_STD, whatever the dataset), the
lambda term is + lamda (normalised iterate - attack-space original) indexed by the 1-based
global iteration, and the step is clamped, then rounded half to even on the 1/255 grid of
that space; use_logits / logit_preprocess give their raw-logit and top-3 targets. By default
data comes from memory (tensors), which only makes this baseline faster
than the original, whose loader decodes one PIL image at a time; loading="pil" serves the
same batches that way (a PIL image per sample, then ToTensor, as torchvision's datasets do).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastunlearn.config import UnlearnConfig
from fastunlearn.data.pixels import as_pixels
from fastunlearn.runtime.determinism import worker_seeding


def _norm(u, mean, std):
    if mean is None:
        return u
    return (u - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


def _draw(kind, shape, device):
    if kind == "normal":
        return torch.randn(shape, device=device)
    if kind == "cauchy":
        return torch.distributions.Cauchy(0.0, 1.0).sample(shape).to(device)
    if kind == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample(shape).to(device)
    return torch.distributions.Uniform(-1.0, 1.0).sample(shape).to(device)


# The constants of their attack's (inverse) normalisation, used for every dataset; the third
# mean is 0.2265 as published. A one-channel image takes the first of each.
ATTACK_MEAN = (0.4914, 0.4822, 0.2265)
ATTACK_STD = (0.2023, 0.1994, 0.2010)


def _per_channel(x, fn):
    if x.shape[1] not in (1, 3):
        raise ValueError(f"the published attack takes 1 or 3 channels, got {x.shape[1]}")
    y = x.clone()
    for c in range(x.shape[1]):
        y[:, c] = fn(y[:, c], ATTACK_MEAN[c], ATTACK_STD[c])
    return y


def attack_inverse(x):
    """Their inverse_normalize: normalised image -> their attack space."""
    return _per_channel(x, lambda v, m, s: v * s + m)


def attack_normalize(u):
    """Their normalize: attack space -> model input."""
    return _per_channel(u, lambda v, m, s: (v - m) / s)


def _lamda(cfg: UnlearnConfig, iteration: int, total: int) -> float:
    # Their schedules count the outer iteration, 1-based.
    if cfg.lamda_schedule == "inverse":
        return cfg.lamda / iteration
    if cfg.lamda_schedule == "exponential":
        return cfg.lamda * math.exp(-cfg.lamda_rate * iteration)
    if cfg.lamda_schedule == "linear":
        return cfg.lamda * (1 - iteration / total)
    return cfg.lamda


def fgsm_perturb(test_model, x, y, cfg: UnlearnConfig, mean, std, iteration=1, total=1):
    """Their FGSM.perturb on one batch: full backward, eager step chain, round after clamp."""
    test_model.zero_grad()
    x_adv = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(test_model(_norm(x_adv, mean, std)), y)
    loss.backward()  # weights have requires_grad=True in their frozen copy: weight grads too
    z = _draw(cfg.noise, x_adv.shape, x.device)  # drawn even when gamma = 0, as they do
    g = x_adv.grad.detach()
    if cfg.lamda > 0:
        d = g - _lamda(cfg, iteration, total) * (x_adv.detach() - x) + cfg.gamma * z
    else:
        d = g + cfg.gamma * z
    step = cfg.step_size
    x_new = x_adv.detach() + d.sign() * step
    delta = torch.clamp(x_new - x, -cfg.eps, cfg.eps)
    x_new = torch.clamp(x + delta, 0.0, 1.0)
    return torch.round(x_new * 255) / 255


def fgsm_perturb_published(test_model, x, y, cfg: UnlearnConfig, iteration=1, total=1, z=None):
    """Their FGSM.perturb as published, on a batch x of normalised images.

    Returns the model input of the adversarial image (their attack-space normalisation).
    z: the noise; drawn here (and drawn even when gamma = 0, as they do) when None.
    """
    test_model.zero_grad()
    x_nat = attack_inverse(x.detach().clone())
    x_adv = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(test_model(x_adv), y)  # mean over the batch, fp32
    loss.backward()
    if z is None:
        z = _draw(cfg.noise, x_adv.shape, x.device)
    g = x_adv.grad.detach()
    if cfg.lamda > 0:
        lam = _lamda(cfg, iteration, total)
        d = g + lam * (x_adv.detach() - x_nat) + cfg.gamma * z
    else:
        d = g + cfg.gamma * z
    u = attack_inverse(x_adv.detach()) + d.sign() * cfg.eps
    u = x_nat + torch.clamp(u - x_nat, -cfg.eps, cfg.eps)
    u = torch.clamp(u, 0.0, 1.0)
    return attack_normalize(torch.round(u * 255) / 255)


def published_targets(adv_logits, use_logits=False, logit_preprocess=False, top_k=3):
    """Their fine-tune targets: argmax labels, or the raw logits (top-k of them, divided by
    their sum, with logit_preprocess) as cross-entropy probabilities."""
    if not use_logits:
        return torch.argmax(adv_logits, dim=1)
    if not logit_preprocess:
        return adv_logits
    vals, idx = torch.topk(adv_logits, top_k, dim=1)
    sparse = torch.zeros_like(adv_logits).scatter_(1, idx, vals)
    return sparse / sparse.sum(dim=1, keepdim=True)


def authors_search(test_model, x, y, cfg: UnlearnConfig, mean=None, std=None, batch_size=64, published=False,
                   epoch=0, epochs=1):
    """Their inner search over a forget set, batch by batch, with the relabel forward.

    published=True: their step as published (fgsm_perturb_published) on the images
    normalised with mean/std; the batches are taken in order and batch b of epoch ``epoch``
    is iteration epoch * batches + b + 1 of epochs * batches, the lambda schedule's clock.
    Returns (relabels, success) like the engine, for label agreement checks.
    """
    labels = []
    batches = math.ceil(x.shape[0] / batch_size)
    for b, i in enumerate(range(0, x.shape[0], batch_size)):
        xb = x[i:i + batch_size]
        yb = y[i:i + batch_size]
        test_model.eval()
        if published:
            x_adv = fgsm_perturb_published(test_model, _norm(xb, mean, std), yb, cfg, epoch * batches + b + 1,
                                           epochs * batches)
            adv_logits = test_model(x_adv)
        else:
            x_adv = fgsm_perturb(test_model, xb, yb, cfg, mean, std)
            adv_logits = test_model(_norm(x_adv, mean, std))  # builds a graph, as theirs does
        labels.append(torch.argmax(adv_logits, dim=1))
    relabels = torch.cat(labels)
    return relabels, relabels != y


class PILImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images served one at a time the way torchvision's datasets serve
    them: each sample becomes a PIL image ("L" for one channel, "RGB" for three), then
    ToTensor's conversion (CHW float in [0, 1]). Gives the same numbers as the tensors."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"PIL loading needs uint8 (N, 1 or 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        self.x, self.y = x, y

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        from PIL import Image

        a = self.x[i]
        img = Image.fromarray(a[0].numpy(), mode="L") if a.shape[0] == 1 else Image.fromarray(
            a.permute(1, 2, 0).numpy(), mode="RGB")
        t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
        return t.float().div(255), int(self.y[i])


def authors_unlearn(model: nn.Module, forget, remain, cfg: UnlearnConfig, mean=None, std=None, device=None,
                    progress=False, loading: str = "memory", workers: int = 0, published: bool = False,
                    use_logits: bool = False, logit_preprocess: bool = False):
    """Their whole loop (search redone every iteration, then one SGD step). Returns (model, seconds).

    loading: "memory" (the batches are slices of tensors already on the device) or "pil"
    (each batch is decoded sample by sample through a DataLoader with ``workers`` worker
    processes, then copied to the device, inside the timed loop). Both draw the same
    batches, so they return the same model. published / use_logits / logit_preprocess: their
    step and targets as published (see the module docstring).
    """
    if loading not in ("memory", "pil"):
        raise ValueError(f"loading must be 'memory' or 'pil', got {loading!r}")
    device = torch.device(device or next(model.parameters()).device)
    fx, fy = forget
    rx, ry = remain
    if loading == "pil":
        if importlib.util.find_spec("PIL") is None:
            raise ImportError("loading='pil' needs Pillow (pip install pillow)")
        f_set, r_set = PILImages(fx, fy), PILImages(rx, ry)
    else:
        fx, rx = as_pixels(fx, device), as_pixels(rx, device)
        fy, ry = fy.to(device), ry.to(device)
    mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    test_model = copy.deepcopy(model).to(device)
    unlearn_model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(unlearn_model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.batch_size
    batches_per_epoch = math.ceil(fx.shape[0] / b)
    total = cfg.epochs * batches_per_epoch

    def batches(n):
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, b):
                yield perm[i:i + b]

    forget_gen, remain_gen = batches(fx.shape[0]), batches(rx.shape[0])
    # Drawn in the loop's order up front, so that loaders reading ahead draw the same batches.
    order = [(next(forget_gen), next(remain_gen)) for _ in range(total)]
    if loading == "pil":
        loader = dict(num_workers=workers, pin_memory=device.type == "cuda", **worker_seeding(cfg.seed))
        f_iter = iter(torch.utils.data.DataLoader(f_set, batch_sampler=[f.tolist() for f, _ in order], **loader))
        r_iter = iter(torch.utils.data.DataLoader(r_set, batch_sampler=[r.tolist() for _, r in order], **loader))
    bar = None
    if progress:
        bar = tqdm(total=total, desc="authors' loop", leave=False)
    for itr, (fi, ri) in enumerate(order):
        if loading == "pil":
            x, y = (t.to(device, non_blocking=True) for t in next(f_iter))
            x_rem, y_rem = (t.to(device, non_blocking=True) for t in next(r_iter))  # loaded, used or not
        else:
            x, y = fx[fi], fy[fi]
            x_rem, y_rem = rx[ri], ry[ri]  # loaded every iteration, used or not
        test_model.eval()
        xn, xrn = _norm(x, mean, std), _norm(x_rem, mean, std)
        if published:
            adv_logits = test_model(fgsm_perturb_published(test_model, xn, y, cfg, itr + 1, total))
            target = published_targets(adv_logits.detach(), use_logits, logit_preprocess)
        else:
            x_adv = fgsm_perturb(test_model, x, y, cfg, mean, std, itr + 1, total)
            adv_logits = test_model(_norm(x_adv, mean, std))
            target = torch.argmax(adv_logits, dim=1)
        unlearn_model.train()
        unlearn_model.zero_grad()
        optimizer.zero_grad()
        if cfg.remain_reg > 0:  # the remain forward first, as theirs
            remain_logits = unlearn_model(xrn)
            if published and use_logits:
                with torch.no_grad():
                    remain_target = test_model(xrn)
            else:
                remain_target = y_rem
            remain_contrib = F.cross_entropy(remain_logits, remain_target) * cfg.remain_reg
        else:
            remain_contrib = 0
        loss = F.cross_entropy(unlearn_model(xn), target) + remain_contrib
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if bar is not None:
        bar.close()
    return unlearn_model.eval(), time.perf_counter() - t0
