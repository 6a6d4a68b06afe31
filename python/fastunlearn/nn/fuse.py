"""BatchNorm2d (+ the ReLU after it) run through the native batch_norm_relu op during training."""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from fastunlearn.config import UnlearnConfig
from fastunlearn.nn.fold import has_hooks
from fastunlearn.ops.batch_norm_relu import batch_norm_relu
from fastunlearn.runtime import backends as _backends


def _fused_bn_forward(self, x):
    """A BatchNorm2d's forward (bound to the module) that runs ops.batch_norm_relu in training
    mode on float32 / bfloat16 inputs, and the module's own forward otherwise; with
    _fastunlearn_relu set it also applies the ReLU that followed it (which then passes its
    input through)."""
    relu = self._fastunlearn_relu
    if not (self.training and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[0] * x.shape[2] * x.shape[3] > 1):
        y = type(self).forward(self, x)
        return torch.relu(y) if relu else y
    # _BatchNorm.forward's bookkeeping, unchanged.
    factor = 0.0 if self.momentum is None else self.momentum
    if self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
    return batch_norm_relu(x, self.weight, self.bias, *stats, momentum=factor, eps=self.eps, relu=relu)


def _passthrough(self, x):
    return x


def fuse_batch_norm_relu(model: nn.Module) -> Callable[[], None]:
    """Route model's BatchNorm2d layers through ops.batch_norm_relu, each fused with the ReLU
    that follows it in a plain Sequential; returns the function that undoes it.

    Only the modules' forward methods change (their parameters, buffers and state_dict stay),
    so the model trains as before, and copies made meanwhile stay correct. A ReLU is fused
    only when both modules are reached once in the model and neither carries hooks (a hook
    on the BatchNorm would see the ReLU's output), and no global module hook is set.
    """
    seen: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    # The op takes float32 parameters and statistics; a module in another dtype keeps its forward.
    bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d
           and all(t is None or t.dtype == torch.float32 for t in (m.weight, m.bias, m.running_mean))]
    eligible = {id(m) for m in bns}
    if not bns:
        return lambda: None

    global_hooks = any(getattr(_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"))

    fused_relus = []
    relu_after = set()
    if not global_hooks:
        for seq in model.modules():
            if type(seq) is not nn.Sequential:
                continue
            kids = list(seq._modules.values())  # the order forward runs (children() drops repeats)
            for a, b in zip(kids, kids[1:]):
                if (id(a) in eligible and type(b) is nn.ReLU and seen[id(a)] == 1 and seen[id(b)] == 1
                        and not has_hooks(a) and not has_hooks(b)):
                    relu_after.add(id(a))
                    fused_relus.append(b)
    for bn in bns:
        bn._fastunlearn_relu = id(bn) in relu_after
        bn.forward = types.MethodType(_fused_bn_forward, bn)
    for r in fused_relus:
        r.forward = types.MethodType(_passthrough, r)

    def undo():
        for m in bns + fused_relus:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_fastunlearn_relu", None)

    return undo


def batch_norm_fusion_on(device: torch.device, compiled: bool, config: UnlearnConfig) -> bool:
    """Whether a train step routes BatchNorm (+ ReLU) through the native op: by default on
    CPU only; never under torch.compile (which fuses on its own) nor with backend="torch"
    (plain PyTorch asked for) or "triton" (the op has no Triton kernel)."""
    setting = config.fuse_batch_norm
    if setting is False or compiled or config.backend in ("torch", "triton"):
        return False
    if device.type == "cpu":
        return _backends.has_cpu_op("batch_norm_relu")
    return setting is True and device.type == "cuda" and _backends.has_cuda_op("batch_norm_relu")
