"""The frozen copy of a model the search runs on."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn.nn.fold import fold_batchnorm


def frozen_copy(model: nn.Module, device: torch.device, channels_last: Optional[bool] = None,
                fold: bool = True) -> nn.Module:
    """A copy of the model for the search: eval mode, no weight gradients. The input is untouched.

    channels_last (default: on) is the faster layout for the search's convolutions on CPU
    (bench/RESULTS.md); on GPUs it is the layout the bf16 convolution kernels want.
    fold: BatchNorm layers that follow a convolution are folded into it (see
    fold_batchnorm); the copy computes the same function with fewer passes over memory.
    """
    frozen = copy.deepcopy(model).to(device).eval()
    set_requires_grad(frozen, False)
    if fold:
        fold_batchnorm(frozen)
    if channels_last is None:
        channels_last = any(m.weight.dim() == 4 for m in frozen.modules() if isinstance(m, nn.Conv2d))
    if channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)
    return frozen


def set_requires_grad(model: nn.Module, flag: bool) -> nn.Module:
    """Module.requires_grad_ parameter by parameter, which a TorchScript module (whose
    requires_grad_ raises) allows too."""
    for p in model.parameters():
        p.requires_grad_(flag)
    return model


def compiled(frozen: nn.Module) -> nn.Module:
    """torch.compile of a frozen copy, made once per copy and kept with it, so every later
    search on the same copy (an Unlearner's, a sweep's) reuses the compiled code. The chunk
    sizes vary (the last chunk, the active set under early exit), so shapes are left for
    Dynamo to mark dynamic after the first recompile rather than pinned."""
    if isinstance(frozen, torch._dynamo.eval_frame.OptimizedModule):
        return frozen
    fn = frozen.__dict__.get("_fastunlearn_compiled")
    if fn is None:
        fn = torch.compile(frozen)
        # Past nn.Module.__setattr__, which would register the wrapper as a submodule of the
        # module it wraps.
        object.__setattr__(frozen, "_fastunlearn_compiled", fn)
    return fn
