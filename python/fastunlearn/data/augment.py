"""Image augmentation of a batch on its device: random crop (zero padding) and left-right flip,
shared by train_classifier and the fine-tune."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastunlearn.config import AUGMENT_MODES


def augment_mode(augment) -> tuple[bool, bool]:
    """(crop, flip) for an augment setting: True, False / None, or one of AUGMENT_MODES."""
    if augment is True:
        return True, True
    if augment is False or augment is None:
        return False, False
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be True, False or one of {AUGMENT_MODES}, got {augment!r}")
    return "crop" in augment, "flip" in augment


def crop_at(x: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor) -> torch.Tensor:
    """Zero-pad (N, C, H, W) x by ``pad`` and take sample i's H x W window at (oy[i], ox[i]),
    offsets in [0, 2 pad]; (pad, pad) gives the sample back. Any dtype, on x's device."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (oy.to(x.device)[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox.to(x.device)[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    b = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[b, ch, rows, cols]


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Sample i mirrored left-right where flip[i]."""
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset, independently per sample."""
    n = x.shape[0]
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return crop_at(x, pad, oy, ox)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return flip_where(x, torch.rand(x.shape[0], generator=g) < 0.5)
