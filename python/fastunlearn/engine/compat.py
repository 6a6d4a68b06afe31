"""compat="authors": the published code's arithmetic, as flags of the search engine.

The published attack maps the loader's normalised image x back to an "attack space" with
fixed constants (ATTACK_MEAN / ATTACK_STD, whatever the dataset; the third mean is 0.2265 as
published), u = x * std_a + mean_a, steps and rounds there, and feeds the model
(u - mean_a) / std_a. Under compat the engine searches in that space: its u0 is the attack-space
image and its normaliser uses the attack constants, so the model sees what theirs sees.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastunlearn import reference
from fastunlearn.data.pixels import Normalizer

ATTACK_MEAN = (0.4914, 0.4822, 0.2265)
ATTACK_STD = (0.2023, 0.1994, 0.2010)


def attack_constants(channels: int) -> tuple[tuple, tuple]:
    """(mean, std) of the published attack for 1 (the first of each) or 3 channels."""
    if channels not in (1, 3):
        raise ValueError(f'compat="authors" takes 1- or 3-channel images (the published attack), got {channels}')
    return ATTACK_MEAN[:channels], ATTACK_STD[:channels]


def attack_normalizer(channels: int, device) -> Normalizer:
    mean, std = attack_constants(channels)
    return Normalizer(mean, std, channels, device)


def to_attack_space(u: torch.Tensor, data_norm: Normalizer, attack_norm: Normalizer) -> torch.Tensor:
    """Pixels -> the loader's normalised image -> their attack space, in float32."""
    x = data_norm(u.float())
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * attack_norm.std.reshape(shape) + attack_norm.mean.reshape(shape)


def batch_mean_grad(logits: torch.Tensor, y: torch.Tensor, nu: torch.Tensor, rows: torch.Tensor, n_total: int,
                    batch_size: int) -> torch.Tensor:
    """Their input gradient: fp32 cross-entropy averaged over the batch each row sits in, w.r.t.
    the normalised input. Row i of the forget set is in batch i // batch_size (the batches taken
    in order; the last one may be short). Each sample's gradient does not depend on the others
    (the frozen model is in eval mode), so a chunk of any size gives each row what its batch
    gives it, underflow included (a confident sample's p_y rounds to 1)."""
    loss = F.cross_entropy(logits.float(), y, reduction="none")
    last = (n_total - 1) // batch_size
    size = torch.where(torch.div(rows, batch_size, rounding_mode="floor") == last, n_total - last * batch_size,
                       batch_size)
    scale = 1.0 / size.to(torch.float32)
    (g,) = torch.autograd.grad(loss, nu, grad_outputs=scale.to(loss.dtype))
    return g


def iteration_lamdas(cfg, refresh: int, refreshes: int, rows: torch.Tensor, n_total: int) -> torch.Tensor:
    """lambda of each row on their clock: the 1-based global iteration of the batch it sits in.

    Sample i of the forget set is in batch i // batch_size of each epoch (the batches taken in
    order), so in epoch ``refresh`` its iteration is refresh * batches + i // batch_size + 1 of
    refreshes * batches.
    """
    batches = math.ceil(n_total / cfg.batch_size)
    it = refresh * batches + torch.div(rows, cfg.batch_size, rounding_mode="floor")
    vals = [reference.lamda_at(cfg.lamda, cfg.lamda_schedule, int(t), refreshes * batches, rate=cfg.lamda_rate)
            for t in it.tolist()]
    return torch.tensor(vals, dtype=torch.float32, device=rows.device)


def published_targets(logits: torch.Tensor, mode: str, topk: int):
    """Their fine-tune targets for the soft modes, or None for hard labels: relabel="soft" is
    their use_logits (the raw logits, used as cross-entropy probabilities), relabel="topk" their
    logit_preprocess (the top-k logits, the rest 0, divided by their sum)."""
    if mode == "soft":
        return logits.float().clone()
    if mode != "topk":
        return None
    vals, idx = torch.topk(logits.float(), topk, dim=1)
    sparse = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, idx, vals)
    return sparse / sparse.sum(dim=1, keepdim=True)


def with_published_targets(rc, logits: torch.Tensor, cfg):
    """A relabel_check result with its soft / top-k targets replaced by the published ones."""
    targets = published_targets(logits, cfg.relabel, cfg.topk)
    return rc if targets is None else rc._replace(targets=targets)
