"""Memory layout: channels_last models, inputs and tensors."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def model_is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are in channels_last (the first weight that can tell decides)."""
    for p in model.parameters():
        # A weight with one input channel (or a 1x1 kernel) is contiguous in both layouts
        # and says nothing: the first one that can tell decides.
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def channels_last_input(u: torch.Tensor) -> torch.Tensor:
    """u (N, C, H, W) in channels_last, with strides that say so even when C == 1.

    With one channel both layouts hold the same bytes and u.contiguous(channels_last) keeps
    the NCHW strides, so PyTorch takes u for NCHW (suggest_memory_format). A convolution's
    backward then converts its output gradient to NCHW to match its input (cuDNN backward:
    grad_output.to(input.suggest_memory_format())): in every step of a 1-channel model, a
    copy and cuDNN's own layout conversions around the first layer's weight gradient, and in
    the search a copy of the first activation's gradient.
    """
    if u.dim() != 4:
        return u
    u = u.contiguous(memory_format=torch.channels_last)
    if u.shape[1] == 1 and u.stride(1) != 1:
        u = u.as_strided(u.shape, (u.shape[2] * u.shape[3], 1, u.shape[3], 1))
    return u


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor stored channels_last (and not also contiguous, as a tensor with C == 1 or H * W == 1 is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules())


def default_channels_last(model: nn.Module, device: torch.device, autocast: Optional[torch.dtype] = None,
                          fused_batch_norm: bool = True) -> bool:
    """channels_last for conv models, except under CPU bf16 autocast with BatchNorm layers
    that run unfused.

    GPUs: the layout the bf16 convolution kernels want. CPU: oneDNN's convolutions are
    faster in channels_last, and PyTorch's CPU BatchNorm is slow in it at few channels; with
    BatchNorm (+ ReLU) fused (fuse_batch_norm_relu, the CPU default) the channels_last step
    is the fastest at every width measured; unfused under bf16, NCHW is faster
    (bench/RESULTS.md).
    """
    if not has_conv(model):
        return False
    if device.type == "cpu" and autocast is not None and not fused_batch_norm:
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return True
