"""relabel_check: the boundary check of one iterate, fused with its logits gradient.

Backends: "cpu" (csrc/relabel_check.cpp), "cuda" (csrc/cuda/relabel_check.cu),
"triton" (kernels/relabel_check.py), "torch" (reference.relabel_check).
"""

from __future__ import annotations

import torch

from .. import _backends, reference
from ..reference import RelabelResult
from ._dispatch import check_same_device, resolve

MODE_CODES = {name: i for i, name in enumerate(reference.RELABEL_MODES)}


def check_args(logits, y, mode, topk):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (N, classes) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"y must be a ({logits.shape[0]},) tensor of labels, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must hold integer labels (int64), got {y.dtype}")
    check_same_device(logits=logits, y=y)
    if mode not in MODE_CODES:
        raise ValueError(f"mode must be one of {tuple(MODE_CODES)}, got {mode!r}")
    if mode == "topk" and int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


def _none_if_empty(t):
    return None if t.numel() == 0 and t.dim() == 1 else t


def relabel_check(logits, y, *, mode="argmax", topk=3, want_grad=False, backend="auto") -> RelabelResult:
    """Relabel, success (argmax != y), margin (logit[y] - best other), targets, dlogits.

    ``targets`` is the softmax (mode="soft") or the renormalised top-k probabilities
    (mode="topk"), else None. ``dlogits`` = softmax(logits) - onehot(y), the gradient of
    the per-sample cross-entropy, when ``want_grad``; else None. Ties go to the lowest
    class index, as torch.argmax does.
    """
    check_args(logits, y, mode, topk)
    y = y.to(torch.int64)
    which = resolve("relabel_check", logits.device, backend)
    if which == "torch":
        return reference.relabel_check(logits, y, mode=mode, topk=topk, want_grad=want_grad)
    call = (logits.contiguous(), y.contiguous(), MODE_CODES[mode], int(topk), bool(want_grad))
    if which == "triton":
        from ..kernels.relabel_check import relabel_check_triton

        out = relabel_check_triton(*call)
    else:
        _backends.native()
        out = torch.ops.fastunlearn.relabel_check(*call)
    relabel, success, margin, targets, dlogits = out
    return RelabelResult(relabel, success, margin, _none_if_empty(targets), _none_if_empty(dlogits))
