"""The bf16 / fp16 search's doubt: how close each sample's decisions came to going the other way,
and which samples must be searched again in fp32."""

from __future__ import annotations

import math

import torch


class Doubt:
    """Per row: the closest call among the decisions the search made, and the logit path length."""

    def __init__(self, m, dev):
        self.gap = torch.full((m,), math.inf, device=dev)
        self.path = torch.zeros(m, device=dev)
        self.zmax = torch.zeros(m, device=dev)
        self.prev = None

    def step(self, rows, logits, t):
        if self.prev is None:
            # In the logits' own dtype: exact, and half the memory of fp32 for bf16.
            self.prev = logits.new_zeros(self.gap.shape[0], logits.shape[1])
        if t > 0:
            dz = logits.float() - self.prev[rows].float()
            # Centred: a shift common to all classes changes no decision.
            self.path[rows] += (dz - dz.mean(1, keepdim=True)).norm(dim=1)
        self.prev[rows] = logits

    def exit_check(self, rows, logits, y, rc, done, mode, topk):
        self.gap[rows] = torch.minimum(self.gap[rows], rc.margin.abs())
        # A row that stops here is relabelled from these logits.
        self.final(rows[done], logits[done], y[done], rc.margin[done], mode, topk)

    def final(self, rows, logits, y, margin, mode, topk):
        z = logits.float()
        self.zmax[rows] = z.abs().amax(1)
        self.gap[rows] = torch.minimum(self.gap[rows], decision_gap(z, y, margin, mode, topk))

    def unsure(self, recheck_margin: float, resolution: float, per_sample: int) -> torch.Tensor:
        """Rows whose closest decision lay within the rounding noise of the search.

        resolution * zmax is the rounding unit of the last logits. The flipped gradient signs
        are the components below the gradient's rounding error, a fraction ~resolution of the
        per_sample inputs; stepping the wrong way, they move the logits by ~sqrt(that count)
        / per_sample of the path the whole step moved them, hence sqrt(resolution / per_sample)
        * path. Both are orders of magnitude; recheck_margin carries the constant, measured
        on 8x8 digits and 28x28 FashionMNIST (the sqrt(1 / per_sample) is what lets one
        margin serve both).
        """
        noise = resolution * self.zmax + math.sqrt(resolution / per_sample) * self.path
        # Written as "not >=" so that a NaN from an overflowed logit counts as unsure.
        return ~(self.gap >= recheck_margin * noise)


def decision_gap(z, y, margin, mode, topk):
    """How far the logits are from changing a decision of the relabel check.

    argmax, soft: top-1 minus top-2 (this also bounds |margin|, so it covers success);
    nearest_incorrect: the best other class minus the next one, and |margin|; topk also
    the k-th minus the (k+1)-th, which decides the set of classes kept.
    """
    k = z.shape[1]
    if k < 2:
        return torch.full_like(margin, math.inf)
    if mode == "nearest_incorrect":
        gap = margin.abs()
        if k > 2:
            others = z.scatter(1, y.unsqueeze(1), -math.inf).topk(2, dim=1).values
            gap = torch.minimum(gap, others[:, 0] - others[:, 1])
        return gap
    kk = min(k, int(topk) + 1) if mode == "topk" else 2
    top = z.topk(max(2, kk), dim=1).values
    gap = top[:, 0] - top[:, 1]
    if mode == "topk" and int(topk) < k:
        gap = torch.minimum(gap, top[:, int(topk) - 1] - top[:, int(topk)])
    return gap
