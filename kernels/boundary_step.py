"""boundary_step in Triton: one fused elementwise pass (semantics: reference.boundary_step).

Each program owns BLOCK consecutive memory positions of u / u0 / grad (all in u's layout,
contiguous or channels_last). It maps each position to its channel (for 1/std) and to its
logical NCHW index (for the Philox counter, so the draws do not depend on the layout),
draws the noise, and writes the projected, quantised step. Same noise stream as the C++
and CUDA backends (kernels/philox.py mirrors csrc/philox.h).

Registered as the custom op ``fastunlearn::boundary_step_triton`` through
``torch.library.triton_op``, so torch.compile traces into the kernel.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastunlearn.nn.layout import is_channels_last
from fastunlearn.ops.boundary_step_meta import empty_output

from .philox import add64, noise_from_bits, philox_2of4

# The interpreter pays per operation, not per element, so it gets far larger blocks.
_BLOCK = 2**15 if os.environ.get("TRITON_INTERPRET") == "1" else 1024
_MASK32 = 0xFFFFFFFF


@triton.jit(do_not_specialize=["C", "HW", "seed_lo", "seed_hi", "off_lo", "off_hi"])
def _boundary_step_kernel(u_ptr, u0_ptr, g_ptr, out_ptr, inv_std_ptr, numel, C, HW,
                          eps, alpha, lamda, gamma, q, seed_lo, seed_hi, off_lo, off_hi,
                          NOISE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_STD: tl.constexpr,
                          QUANTIZE: tl.constexpr, CHANNELS_LAST: tl.constexpr, INDEX32: tl.constexpr,
                          BLOCK: tl.constexpr):
    # A plain launch passes Python floats as fp32 scalars; Inductor (torch.compile around
    # the op, torch 2.11) passes them as fp64. The CUDA and CPU kernels compute in fp32, and
    # tl.div_rn takes fp32 only: cast once here.
    eps = tl.cast(eps, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    lamda = tl.cast(lamda, tl.float32)
    gamma = tl.cast(gamma, tl.float32)
    q = tl.cast(q, tl.float32)
    # int64 program offsets: numel can pass 2**31.
    pid = tl.program_id(0).to(tl.int64)
    m = pid * BLOCK + tl.arange(0, BLOCK)
    mask = m < numel
    uf = tl.load(u_ptr + m, mask=mask, other=0.0).to(tl.float32)
    u0f = tl.load(u0_ptr + m, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + m, mask=mask, other=0.0).to(tl.float32)

    if HAS_STD or HAS_NOISE:
        # 32-bit division where it fits: 64-bit division is emulated on GPUs.
        if INDEX32:
            mi = m.to(tl.int32)
            cc = C.to(tl.int32)
            hw_n = HW.to(tl.int32)
        else:
            mi = m
            cc = C.to(tl.int64)
            hw_n = HW.to(tl.int64)
        if CHANNELS_LAST:
            # memory (n, hw, c) -> logical (n, c, hw)
            c = mi % cc
            pix = mi // cc
            logical = ((pix // hw_n) * cc + c) * hw_n + pix % hw_n
        else:
            c = (mi // hw_n) % cc
            logical = mi
        if HAS_STD:
            g = g * tl.load(inv_std_ptr + c, mask=mask, other=1.0)
    d = g - lamda * (uf - u0f)
    if HAS_NOISE:
        if INDEX32:
            l_lo = logical.to(tl.uint32)  # non-negative, same bits
            l_hi = l_lo * 0
        else:
            l_lo = (logical & 0xFFFFFFFF).to(tl.uint32)
            l_hi = (logical >> 32).to(tl.uint32)
        c0, c1 = add64(l_lo, l_hi, off_lo.to(tl.uint32), off_hi.to(tl.uint32))
        x0, x1 = philox_2of4(c0, c1, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
        d = d + gamma * noise_from_bits(x0, x1, NOISE)

    # sign(d); a NaN d passes through, as torch.sign does.
    sg = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, d))
    v = uf + alpha * sg
    lo = tl.maximum(u0f - eps, 0.0)
    hi = tl.minimum(u0f + eps, 1.0)
    if QUANTIZE:
        # Shrink the bounds to the grid points inside the ball (1e-4 grid units of slack
        # for bounds meant to sit on the grid), so rounding never leaves it.
        lo = tl.div_rn(tl.ceil(lo * q - 1e-4), q)
        hi = tl.div_rn(tl.floor(hi * q + 1e-4), q)
        v = tl.div_rn(tl.floor(v * q + 0.5), q)
    # Written so a NaN v survives, as torch.maximum / torch.minimum propagate it.
    v = tl.where(v < lo, lo, v)
    v = tl.where(v > hi, hi, v)
    tl.store(out_ptr + m, v.to(out_ptr.dtype.element_ty), mask=mask)


def _boundary_step(u: torch.Tensor, u0: torch.Tensor, grad: torch.Tensor, eps: float, alpha: float,
                   lamda: float, gamma: float, noise: int, quantize: int, seed: int, offset: int,
                   mean: Optional[torch.Tensor], std: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton backend of fastunlearn.ops.boundary_step; arguments as torch.ops.fastunlearn.boundary_step."""
    out = empty_output(u, u0, grad, eps, alpha, lamda, gamma, noise, quantize, seed, offset, mean, std)
    fmt = torch.channels_last if is_channels_last(out) else torch.contiguous_format
    c = u.shape[1]
    # One memory index walks all three tensors, in u's layout.
    uc, u0c, gc = (t.contiguous(memory_format=fmt) for t in (u, u0, grad))
    numel = uc.numel()
    if numel == 0:
        return out
    inv_std = None
    if std is not None:
        inv_std = std.to(device=u.device, dtype=torch.float32).reciprocal().contiguous()
    seed &= 2**64 - 1
    offset &= 2**64 - 1
    grid = (triton.cdiv(numel, _BLOCK),)
    wrap_triton(_boundary_step_kernel)[grid](
        uc, u0c, gc, out, inv_std if inv_std is not None else uc, numel, c, numel // (u.shape[0] * c),
        float(eps), float(alpha), float(lamda), float(gamma), float(quantize),
        seed & _MASK32, seed >> 32, offset & _MASK32, offset >> 32,
        NOISE=int(noise), HAS_NOISE=float(gamma) != 0.0, HAS_STD=inv_std is not None,
        QUANTIZE=int(quantize) > 0, CHANNELS_LAST=fmt is torch.channels_last, INDEX32=numel < 2**31,
        BLOCK=_BLOCK)
    return out


_NAME = "fastunlearn::boundary_step_triton"
if os.environ.get("TRITON_INTERPRET") == "1":
    # torch cannot trace an interpreted kernel (wrap_triton hands it back unwrapped, and a
    # triton_op's fake / functional pass would run it on fake tensors). An opaque custom
    # op with a shape-only fake keeps torch.compile and opcheck working; the kernel then
    # runs eagerly inside the compiled graph.
    boundary_step_triton = torch.library.custom_op(_NAME, _boundary_step, mutates_args=())
    boundary_step_triton.register_fake(empty_output)
else:
    boundary_step_triton = triton_op(_NAME, _boundary_step, mutates_args=())
