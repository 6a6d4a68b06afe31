"""The fine-tune's losses: cross-entropy to the relabels (hard or soft) on the forget set, and
to the labels or the original model's predictions on the remain set. reference.py defines the
same losses independently, for the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of CE to a probability target (hard labels go to F.cross_entropy)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def forget_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE to the relabels: class indices (N,) or probabilities (N, K)."""
    if target.dim() == 1:
        return F.cross_entropy(logits.float(), target)
    return soft_cross_entropy(logits, target)


def remain_loss(logits: torch.Tensor, y_true: torch.Tensor, teacher_logits, remain_target: str,
                raw_teacher: bool = False) -> torch.Tensor:
    """CE to the true labels ("labels") or to the original model's softmax ("distill"; its raw
    logits as the target with raw_teacher, as the published code does)."""
    if remain_target == "labels":
        return F.cross_entropy(logits.float(), y_true)
    teacher = teacher_logits.float()
    return soft_cross_entropy(logits, teacher if raw_teacher else torch.softmax(teacher, dim=1))
