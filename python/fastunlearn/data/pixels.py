"""Pixels: images as they arrive (uint8 or float in [0, 1]) to float32, and the per-channel
normalisation a model expects."""

from __future__ import annotations

import torch


class Normalizer:
    def __init__(self, mean, std, channels, device):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
        if self.mean is None and self.std is not None:
            self.mean = torch.zeros(channels, device=device)
        if self.std is None and self.mean is not None:
            self.std = torch.ones(channels, device=device)

    def __call__(self, u):
        if self.mean is None:
            return u
        shape = (1, -1) + (1,) * (u.dim() - 2)
        return (u - self.mean.reshape(shape)) / self.std.reshape(shape)


def as_pixels(x: torch.Tensor, device) -> torch.Tensor:
    """x on ``device`` as float32 pixels: uint8 divided by 255, any other dtype cast."""
    x = x.to(device, non_blocking=True)
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 1]: uint8 is divided by 255; float32 passes through, other floats are cast."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"to_float: images must be uint8 or float, got {x.dtype}")
    return x.float()
