"""Philox 4x32-10 and the noise transforms in Triton, the same stream as csrc/philox.h.

The convention is reference.py's: the 64-bit counter ``offset + i`` of logical element i
goes in words (c0, c1), zeros in (c2, c3), the 64-bit seed is the key (k0 = low word), and
output words 0 and 1 give the uniforms ``(2 * (x >> 9) + 1) * 2**-24``.

The transforms are csrc/philox.h's polynomial kernels, not tl.log / tl.cos: the
arguments are uniforms on a 2**-24 grid, so range reduction is exact and the sign of
cos(2 pi u2) and the poles of tan(pi (u1 - 1/2)) come out right; the hardware's fast
log would also lose the sign of log(w) for w just below 1. Every function works on
uint32 / float32 tensors of any shape.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastunlearn.ops.boundary_step_meta import NOISE_CODES

PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(10)

# Noise codes: the op schema's, from their one definition (ops.boundary_step_meta.NOISE_CODES).
NORMAL: tl.constexpr = tl.constexpr(NOISE_CODES["normal"])
LAPLACE: tl.constexpr = tl.constexpr(NOISE_CODES["laplace"])
CAUCHY: tl.constexpr = tl.constexpr(NOISE_CODES["cauchy"])
UNIFORM: tl.constexpr = tl.constexpr(NOISE_CODES["uniform"])

_PI: tl.constexpr = tl.constexpr(3.14159265358979323846)


@triton.jit
def philox_2of4(c0, c1, k0, k1):
    """Words 0 and 1 of Philox4x32-10 for counter (c0, c1, 0, 0), key (k0, k1); all uint32."""
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1


@triton.jit
def add64(lo, hi, add_lo, add_hi):
    """(lo, hi) + (add_lo, add_hi) as 64-bit numbers held in uint32 word pairs."""
    s_lo = lo + add_lo
    carry = (s_lo < lo).to(tl.uint32)
    return s_lo, hi + add_hi + carry


@triton.jit
def uniform_from_bits(x):
    # 2 * (x >> 9) + 1 < 2**24: the conversion to float32 is exact.
    return (((x >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def log_pos(x):
    """Natural log of positive normal float32 (Cephes logf)."""
    b = x.to(tl.uint32, bitcast=True)
    e = (b >> 23).to(tl.int32) - 126
    m = ((b & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)  # x = m * 2**e, m in [0.5, 1)
    small = m < 0.70710678118654752440
    e = tl.where(small, e - 1, e)
    m = (m + tl.where(small, m, 0.0)) - 1.0
    z = m * m
    y = 7.0376836292e-2 * m - 1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m - 1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m - 1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m - 2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    fe = e.to(tl.float32)
    y = y + -2.12194440e-4 * fe
    y = y + -0.5 * z
    return (m + y) + 0.693359375 * fe


@triton.jit
def sinpi_small(t):
    """sin(pi t) for |t| <= 1/4."""
    x = t * _PI
    z = x * x
    p = -1.9515295891e-4 * z + 8.3321608736e-3
    p = p * z - 1.6666654611e-1
    return x + x * z * p


@triton.jit
def cospi_small(t):
    """cos(pi t) for |t| <= 1/4."""
    x = t * _PI
    z = x * x
    p = 2.443315711809948e-5 * z - 1.388731625493765e-3
    p = p * z + 4.166664568298827e-2
    return 1.0 - 0.5 * z + z * z * p


@triton.jit
def normal_from(u1, u2):
    """Box-Muller sqrt(-2 log u1) cos(2 pi u2), with exact reduction of u2."""
    r = tl.sqrt_rn(-2.0 * log_pos(u1))
    a = tl.where(u2 > 0.5, 1.0 - u2, u2)  # cos(2 pi u2) = cos(2 pi a), a in (0, 1/2]
    lo = a <= 0.125
    hi = a > 0.375
    t = tl.where(lo, a, tl.where(hi, 0.5 - a, a - 0.25))  # |t| <= 1/8, exact
    c = cospi_small(2.0 * t)
    s = sinpi_small(2.0 * t)
    return r * tl.where(lo, c, tl.where(hi, -c, -s))


@triton.jit
def laplace_from(u1):
    """-sign(v) log1p(-2|v|), v = u1 - 1/2; 1 - 2|v| = 2 min(u1, 1 - u1) is exact."""
    w = 2.0 * tl.where(u1 < 0.5, u1, 1.0 - u1)
    lg = log_pos(w)
    return tl.where(u1 < 0.5, lg, -lg)


@triton.jit
def cauchy_from(u1):
    """tan(pi (u1 - 1/2)); past |v| = 1/4 it is cot(pi (1/2 - |v|)), an exact argument."""
    v = u1 - 0.5
    a = tl.abs(v)
    near = a <= 0.25
    t = tl.where(near, a, 0.5 - a)
    s = sinpi_small(t)
    c = cospi_small(t)
    m = tl.div_rn(tl.where(near, s, c), tl.where(near, c, s))
    return tl.where(v < 0.0, -m, m)


@triton.jit
def noise_from_bits(x0, x1, NOISE: tl.constexpr):
    """The float32 noise value of one Philox draw (words x0, x1), NOISE a code above."""
    u1 = uniform_from_bits(x0)
    if NOISE == NORMAL:
        z = normal_from(u1, uniform_from_bits(x1))
    elif NOISE == LAPLACE:
        z = laplace_from(u1)
    elif NOISE == CAUCHY:
        z = cauchy_from(u1)
    else:
        z = 2.0 * u1 - 1.0
    return z
