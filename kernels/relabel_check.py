"""relabel_check in Triton: argmax / best other class / margin / targets / dlogits per row.

Semantics are reference.relabel_check's. A program owns ROWS rows (one for large K)
and walks them in BLOCK_K-wide column blocks:

* pass 1 keeps the running max with its first index, the same for the classes other
  than y, and the online sum of exp(x - running max), in one read of the logits;
* top-k makes k - 1 more passes, each picking the best element strictly after the
  previous pick in (logit desc, index asc) order, so no selection has to be stored;
* the last pass writes targets / dlogits.

Ties break to the lowest index (``tl.max(..., return_indices_tie_break_left=True)`` inside
a block, a strict ``>`` across blocks), as torch.argmax does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastunlearn.ops.relabel_check_meta import empty_outputs

# A column index no real element has; sorts after every real one on ties.
_NO_INDEX = tl.constexpr(2**31 - 1)
# Logits per program per block step. The interpreter pays per operation, not per
# element, so it gets far larger tiles (more rows per program).
_TILE = 2**16 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
_MAX_BLOCK_K = 4096  # wider rows loop over blocks


@triton.jit
def _relabel_check_kernel(logits_ptr, y_ptr, relabel_ptr, success_ptr, margin_ptr, targets_ptr, dlogits_ptr,
                          n, k, topk_passes, topk_all,
                          MODE: tl.constexpr, WANT_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # int64 row offsets: N * K can pass 2**31 for large batches of large vocabularies.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    base = rows * k
    yv = tl.load(y_ptr + rows, mask=row_ok, other=0)
    cols0 = tl.arange(0, BLOCK_K)
    want_probs: tl.constexpr = MODE >= 2 or WANT_GRAD

    best_v = tl.full([ROWS], float("-inf"), tl.float32)
    best_i = tl.zeros([ROWS], tl.int32)  # torch.argmax of an all -inf row is 0
    oth_v = tl.full([ROWS], float("-inf"), tl.float32)
    oth_i = tl.zeros([ROWS], tl.int32)
    s_run = tl.zeros([ROWS], tl.float32)  # sum of exp(x - best_v) so far
    for start in range(0, k, BLOCK_K):
        cols = start + cols0
        msk = row_ok[:, None] & (cols[None, :] < k)
        x = tl.load(logits_ptr + base[:, None] + cols[None, :], mask=msk, other=float("-inf")).to(tl.float32)
        bv, bi = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
        xo = tl.where(cols[None, :] == yv[:, None], float("-inf"), x)
        ov, oi = tl.max(xo, axis=1, return_indices=True, return_indices_tie_break_left=True)
        if want_probs:
            new_m = tl.maximum(best_v, bv)
            # exp(-inf - (-inf)) would be NaN; shifting by 0 instead gives the right 0.
            m_safe = tl.where(new_m == float("-inf"), 0.0, new_m)
            s_run = s_run * tl.exp(best_v - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        upd = bv > best_v
        best_i = tl.where(upd, bi + start, best_i)
        best_v = tl.where(upd, bv, best_v)
        upd_o = ov > oth_v
        oth_i = tl.where(upd_o, oi + start, oth_i)
        oth_v = tl.where(upd_o, ov, oth_v)

    if MODE == 1:
        tl.store(relabel_ptr + rows, oth_i.to(tl.int64), mask=row_ok)
    else:
        tl.store(relabel_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    tl.store(success_ptr + rows, best_i.to(tl.int64) != yv, mask=row_ok)
    x_y = tl.load(logits_ptr + base + yv, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(margin_ptr + rows, x_y - oth_v, mask=row_ok)

    if want_probs:
        m_safe = tl.where(best_v == float("-inf"), 0.0, best_v)
        # Rows past n have s_run = 0; keep their (unstored) values finite.
        inv_s = 1.0 / tl.where(row_ok, s_run, 1.0)
        # Top-k membership: at or before the last pick in (value desc, index asc) order.
        # With k >= classes every element is a member (last = (-inf, _NO_INDEX)).
        last_v = tl.where(topk_all != 0, float("-inf"), best_v)
        last_i = tl.where(topk_all != 0, _NO_INDEX, best_i)
        inv_sel = inv_s
        if MODE == 3:
            sel = tl.full([ROWS], 1.0, tl.float32)  # exp(max - max) of the first pick
            for _ in range(0, topk_passes):
                cand_v = tl.full([ROWS], float("-inf"), tl.float32)
                cand_i = tl.full([ROWS], _NO_INDEX, tl.int32)
                for start in range(0, k, BLOCK_K):
                    cols = start + cols0
                    msk = row_ok[:, None] & (cols[None, :] < k)
                    x = tl.load(logits_ptr + base[:, None] + cols[None, :], mask=msk,
                                other=float("-inf")).to(tl.float32)
                    after = (x < last_v[:, None]) | ((x == last_v[:, None]) & (cols[None, :] > last_i[:, None]))
                    xe = tl.where(after & msk, x, float("-inf"))
                    bv, bi = tl.max(xe, axis=1, return_indices=True, return_indices_tie_break_left=True)
                    # An all -inf block may name an ineligible lane; such picks only
                    # decide about elements whose probability is 0, so targets agree.
                    upd = bv > cand_v
                    cand_i = tl.where(upd, bi + start, cand_i)
                    cand_v = tl.where(upd, bv, cand_v)
                last_v = cand_v
                last_i = cand_i
                sel += tl.exp(cand_v - m_safe)
            inv_sel = tl.where(topk_all != 0, inv_s, 1.0 / sel)
        e_other = tl.zeros([ROWS], tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + cols0
            msk = row_ok[:, None] & (cols[None, :] < k)
            offs = base[:, None] + cols[None, :]
            x = tl.load(logits_ptr + offs, mask=msk, other=float("-inf")).to(tl.float32)
            e = tl.exp(x - m_safe[:, None])
            p = e * inv_s[:, None]
            if MODE == 2:
                tl.store(targets_ptr + offs, p, mask=msk)
            if MODE == 3:
                member = (x > last_v[:, None]) | ((x == last_v[:, None]) & (cols[None, :] <= last_i[:, None]))
                tl.store(targets_ptr + offs, tl.where(member, e * inv_sel[:, None], 0.0), mask=msk)
            if WANT_GRAD:
                not_y = cols[None, :] != yv[:, None]
                tl.store(dlogits_ptr + offs, p, mask=msk & not_y)
                e_other += tl.sum(tl.where(msk & not_y, e, 0.0), axis=1)
        if WANT_GRAD:
            # y's entry is -(sum of the other probabilities), summed directly: p_y - 1 in
            # float keeps no correct digit once p_y is within an ulp of 1.
            # Below one half, p_y - 1 does not cancel and is the more accurate of the two.
            p_y = tl.exp(x_y - m_safe) * inv_s
            g_y = tl.where(p_y < 0.5, p_y - 1.0, -e_other * inv_s)
            tl.store(dlogits_ptr + base + yv, g_y, mask=row_ok)


def _launch_config(n: int, k: int):
    """(ROWS, BLOCK_K, num_warps): small K packs several rows per program."""
    block_k = min(triton.next_power_of_2(max(k, 1)), _MAX_BLOCK_K)
    rows = max(1, min(_TILE // block_k, triton.next_power_of_2(max(n, 1))))
    tile = rows * block_k
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return rows, block_k, num_warps


def _relabel_check(logits: torch.Tensor, y: torch.Tensor, mode: int, topk: int,
                   want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same arguments and outputs as torch.ops.fastunlearn.relabel_check (mode as a code)."""
    relabel, success, margin, targets, dlogits = empty_outputs(logits, y, mode, topk, want_grad)
    logits = logits.contiguous()
    y = y.contiguous()
    n, k = logits.shape
    if n > 0:
        torch._check(k >= 1, lambda: "relabel_check: logits need at least one class")
        rows, block_k, num_warps = _launch_config(n, k)
        kk = min(int(topk), k)
        topk_all = int(kk >= k)
        passes = 0 if topk_all or mode != 3 else kk - 1
        grid = (triton.cdiv(n, rows),)
        wrap_triton(_relabel_check_kernel)[grid](
            logits, y, relabel, success, margin, targets, dlogits, n, k, passes, topk_all,
            MODE=int(mode), WANT_GRAD=bool(want_grad), ROWS=rows, BLOCK_K=block_k, num_warps=num_warps)
    return relabel, success, margin, targets, dlogits


_NAME = "fastunlearn::relabel_check_triton"
if os.environ.get("TRITON_INTERPRET") == "1":
    # torch cannot trace an interpreted kernel (wrap_triton hands it back unwrapped, and
    # a triton_op's fake / functional pass would run it on fake tensors). An opaque
    # custom op with a shape-only fake keeps torch.compile and opcheck working; the
    # kernel then runs eagerly inside the compiled graph.
    relabel_check_triton = torch.library.custom_op(_NAME, _relabel_check, mutates_args=())
    relabel_check_triton.register_fake(empty_outputs)
else:
    relabel_check_triton = triton_op(_NAME, _relabel_check, mutates_args=())
