"""Plain-PyTorch version of every step of the method.

This module is the definition the fast backends are tested against and the fallback
when no native or Triton backend is available. It favours clarity over speed: the
elementwise ops compute in float64, the search and the fine-tune are straightforward
loops. Nothing here may depend on the native extension or on Triton.

Conventions shared with csrc/ and kernels/ (they must agree bit for bit on the
random draws):

* Noise is Philox 4x32-10 keyed by the 64-bit ``seed``. Element ``i`` of a tensor (its
  position in logical, row-major NCHW order, whatever the memory layout) uses the
  64-bit counter ``offset + i`` in words (c0, c1) and zeros in (c2, c3). Outputs 0 and
  1 of that block give the two uniforms the element needs. Calls whose ranges
  ``[offset, offset + numel)`` do not overlap therefore draw independent noise, and the
  draw does not depend on how a backend launches its threads.
* A uniform is ``(2 * (x >> 9) + 1) * 2**-24``: it is exact in float32 and lies in the
  open interval (0, 1), so log() and tan() never see 0 or 1.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

NOISE_KINDS = ("normal", "laplace", "cauchy", "uniform")
RELABEL_MODES = ("argmax", "nearest_incorrect", "soft", "topk")
LAMDA_SCHEDULES = ("constant", "inverse", "exponential", "linear")

# Philox 4x32 constants (Salmon et al., SC'11).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- noise
def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hi and lo words of the 64-bit product of constant ``a`` and uint32 values ``b``.

    Splitting ``b`` in 16-bit halves keeps every intermediate below 2**63, so int64
    arithmetic never overflows.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2**49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32(counter: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox 4x32-10 on uint32 words held in int64. ``counter``: (..., 4) -> (..., 4)."""
    c = [counter[..., j].to(torch.int64) & _MASK32 for j in range(4)]
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c[0])
        hi1, lo1 = _mulhilo32(PHILOX_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return torch.stack(c, dim=-1)


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float64 uniforms in (0, 1), exact in float32."""
    return ((x >> 9) * 2 + 1).to(torch.float64) * 2.0**-24


def philox_noise(numel: int, kind: str, seed: int, offset: int, device=None) -> torch.Tensor:
    """The float64 noise z_i for counters offset .. offset + numel - 1."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    idx = torch.arange(numel, dtype=torch.int64, device=device) + int(offset)
    ctr = torch.zeros(numel, 4, dtype=torch.int64, device=device)
    ctr[:, 0] = idx & _MASK32
    ctr[:, 1] = (idx >> 32) & _MASK32
    bits = philox4x32(ctr, seed)
    u1 = uniform_from_bits(bits[:, 0])
    if kind == "normal":
        u2 = uniform_from_bits(bits[:, 1])
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    if kind == "laplace":
        v = u1 - 0.5
        return -torch.sign(v) * torch.log1p(-2.0 * v.abs())
    if kind == "cauchy":
        return torch.tan(math.pi * (u1 - 0.5))
    return 2.0 * u1 - 1.0  # uniform(-1, 1)


# ------------------------------------------------------------------ boundary_step
def channel_scale(x: torch.Tensor, v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-channel vector ``v`` (length C = x.shape[1]) shaped to broadcast over x."""
    if v is None:
        return None
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device).reshape(-1)
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def quantize_bounds(lo: torch.Tensor, hi: torch.Tensor, q: int):
    """Shrink [lo, hi] to the grid points inside it, so rounding never leaves the ball.

    The 1e-4 (in grid units) absorbs float error when a bound is meant to be on the
    grid, e.g. eps = 0.2 and q = 255 give bounds exactly 51 steps away.
    """
    return torch.ceil(lo * q - 1e-4) / q, torch.floor(hi * q + 1e-4) / q


def boundary_step(u, u0, grad, *, eps, alpha, lamda=0.0, gamma=0.0, noise="normal",
                  quantize=255, seed=0, offset=0, mean=None, std=None):
    """One perturbed sign-gradient step, computed in float64, returned in u.dtype.

    ``grad`` is the input gradient of the per-sample loss. When ``std`` is given the
    gradient was taken with respect to the normalised input (u - mean) / std, and the
    chain rule divides it by std. ``mean`` does not enter the step; it is accepted so
    the signature matches the other backends.
    """
    del mean  # the chain rule through (u - mean) / std only involves std
    u64, u064, g = (t.to(torch.float64) for t in (u, u0, grad))
    s = channel_scale(u, std)
    if s is not None:
        g = g / s
    d = g
    if lamda:
        d = d - lamda * (u64 - u064)
    if gamma:
        z = philox_noise(u.numel(), noise, seed, offset, device=u.device).reshape(u.shape)
        d = d + gamma * z
    v = u64 + alpha * torch.sign(d)
    lo = torch.clamp(u064 - eps, min=0.0)
    hi = torch.clamp(u064 + eps, max=1.0)
    if quantize:
        lo, hi = quantize_bounds(lo, hi, quantize)
        v = torch.floor(v * quantize + 0.5) / quantize
    v = torch.minimum(torch.maximum(v, lo), hi)
    return v.to(u.dtype)


# ------------------------------------------------------------------ relabel_check
class RelabelResult(NamedTuple):
    relabel: torch.Tensor  # (N,) int64 new hard label
    success: torch.Tensor  # (N,) bool, argmax != y
    margin: torch.Tensor  # (N,) float32, logit[y] - best other logit (<= 0: crossed)
    targets: Optional[torch.Tensor]  # (N, K) float32 soft / top-k targets, else None
    dlogits: Optional[torch.Tensor]  # (N, K) float32 softmax - onehot(y), else None


def relabel_check(logits, y, *, mode="argmax", topk=3, want_grad=False) -> RelabelResult:
    """Boundary check of one iterate, and the seed for the next input-gradient backward."""
    if mode not in RELABEL_MODES:
        raise ValueError(f"mode must be one of {RELABEL_MODES}, got {mode!r}")
    z = logits.to(torch.float64)
    n, k = z.shape
    rows = torch.arange(n, device=z.device)
    top = torch.argmax(z, dim=1)  # first index among ties, like every backend
    others = z.clone()
    others[rows, y] = -math.inf
    best_other = torch.argmax(others, dim=1) if k > 1 else y.clone()
    margin = z[rows, y] - (others[rows, best_other] if k > 1 else torch.full_like(z[:, 0], -math.inf))
    relabel = best_other if mode == "nearest_incorrect" else top
    p = torch.softmax(z, dim=1)
    targets = None
    if mode == "soft":
        targets = p.to(torch.float32)
    elif mode == "topk":
        kk = min(int(topk), k)
        # Stable sort so equal probabilities keep the lowest index first, as argmax does.
        order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :kk]
        sel = torch.zeros_like(p)
        sel.scatter_(1, order, p.gather(1, order))
        targets = (sel / sel.sum(dim=1, keepdim=True)).to(torch.float32)
    dlogits = None
    if want_grad:
        # p_y - 1 cancels even in float64 for a confident sample; -(sum of the others) does not.
        dlogits = p.clone()
        dlogits[rows, y] = 0.0
        dlogits[rows, y] = -dlogits.sum(dim=1)
        dlogits = dlogits.to(torch.float32)
    return RelabelResult(relabel.to(torch.int64), top != y, margin.to(torch.float32), targets, dlogits)


# ------------------------------------------------------------------- schedules
def lamda_at(lamda: float, schedule: str, t: int, horizon: int, rate: float = 0.01) -> float:
    """lambda_t for the 0-based schedule index t of a run of ``horizon`` indices.

    The index is the inner step (horizon = steps T) when T > 1, and the refresh (horizon =
    the number of refreshes) when T = 1. inverse: lamda / (t + 1); exponential:
    lamda exp(-rate (t + 1)); linear: lamda (1 - (t + 1) / horizon), floored at 0 so an index
    past the horizon gives no pull rather than a push away from the original image.
    """
    if schedule == "constant":
        return lamda
    if schedule == "inverse":
        return lamda / (t + 1)
    if schedule == "exponential":
        return lamda * math.exp(-rate * (t + 1))
    if schedule == "linear":
        return lamda * max(0.0, 1.0 - (t + 1) / max(1, horizon))
    raise ValueError(f"lamda_schedule must be one of {LAMDA_SCHEDULES}, got {schedule!r}")


def schedule_index(step: int, steps: int, refresh: int, refreshes: int) -> tuple[int, int]:
    """(index, horizon) of the lambda schedule: the inner step over T when T > 1, else the
    refresh over the number of refreshes (the outer loop is then the only clock)."""
    return (step, steps) if steps > 1 else (refresh, refreshes)


# ----------------------------------------------------------------- inner search
def normalize(u: torch.Tensor, mean, std) -> torch.Tensor:
    if mean is None and std is None:
        return u
    m = channel_scale(u, mean if mean is not None else [0.0] * u.shape[1]).to(u.dtype)
    s = channel_scale(u, std if std is not None else [1.0] * u.shape[1]).to(u.dtype)
    return (u - m) / s


def noise_offset(refresh: int, step: int, steps: int, n_total: int, first: int, per_sample: int) -> int:
    """Counter of the first element of sample ``first`` for a given refresh and step.

    Every (refresh, step) owns a disjoint block of n_total * per_sample counters and each
    sample a fixed slice of it, so the draw does not depend on chunking or on which
    samples are still searching.
    """
    return ((refresh * steps + step) * n_total + first) * per_sample


def random_start_point(u0, eps, quantize, seed, offset):
    """A uniform point of the eps ball around u0 (inside [0, 1], on the grid when quantize)."""
    z = philox_noise(u0.numel(), "uniform", seed, offset, device=u0.device).reshape(u0.shape)
    u064 = u0.to(torch.float64)
    lo = torch.clamp(u064 - eps, min=0.0)
    hi = torch.clamp(u064 + eps, max=1.0)
    v = u064 + eps * z
    if quantize:
        lo, hi = quantize_bounds(lo, hi, quantize)
        v = torch.floor(v * quantize + 0.5) / quantize
    return torch.minimum(torch.maximum(v, lo), hi).to(u0.dtype)


def input_grad(model, u, y, mean, std):
    """Per-sample CE input gradient w.r.t. pixels, and the logits it came from.

    The logits gradient softmax - onehot(y) is formed in float64 (relabel_check): for a
    confident sample p_y - 1 is tiny, and float32 autograd of cross_entropy loses its sign
    pattern to rounding.
    """
    x = u.detach().clone().requires_grad_(True)
    logits = model(normalize(x, mean, std))
    dlogits = relabel_check(logits.detach(), y, want_grad=True).dlogits
    (g,) = torch.autograd.grad(logits, x, grad_outputs=dlogits.to(logits.dtype))
    return g, logits.detach()


def search(model, x0, y, *, eps, alpha, steps=1, lamda=0.0, lamda_schedule="constant", gamma=0.0,
           noise="normal", quantize=255, seed=0, refresh=0, n_total=None, first=0,
           early_exit=True, random_start=False, mean=None, std=None, refreshes=1, lamda_rate=0.01):
    """Algorithm 1 on a batch: returns the last iterate u_T (pixel space).

    ``refresh`` is the refresh index: it selects the noise block and, when steps == 1,
    serves as the schedule's index over ``refreshes``. ``first``/``n_total`` place this batch inside
    the whole forget set so the noise matches a search over the full set.
    """
    n_total = x0.shape[0] if n_total is None else n_total
    per_sample = x0[0].numel()
    u0 = x0
    u = u0.clone()
    if random_start:
        u = random_start_point(u0, eps, quantize, seed, noise_offset(refresh, steps, steps, n_total, first, per_sample))
    active = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    for t in range(steps):
        g, logits = input_grad(model, u, y, mean, std)
        if early_exit and steps > 1 and t > 0:
            active &= logits.argmax(1) == y
            if not active.any():
                break
        lam = lamda_at(lamda, lamda_schedule, *schedule_index(t, steps, refresh, refreshes), rate=lamda_rate)
        u_next = boundary_step(u, u0, g, eps=eps, alpha=alpha, lamda=lam, gamma=gamma, noise=noise,
                               quantize=quantize, seed=seed,
                               offset=noise_offset(refresh, t, steps, n_total, first, per_sample))
        mask = active.reshape((-1,) + (1,) * (u.dim() - 1))
        u = torch.where(mask, u_next, u)
    return u


@torch.no_grad()
def logits_of(model, u, mean, std):
    return model(normalize(u, mean, std))


def boundary_relabel(model, x, y, *, eps, alpha, steps=1, mode="argmax", topk=3, **search_kw):
    """Search, then relabel at the last iterate. Returns the RelabelResult."""
    u = search(model, x, y, eps=eps, alpha=alpha, steps=steps, **search_kw)
    return relabel_check(logits_of(model, u, search_kw.get("mean"), search_kw.get("std")), y, mode=mode, topk=topk)


# ------------------------------------------------------------------ fine-tune
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of CE to a probability target (hard labels go to F.cross_entropy)."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def forget_loss(logits, target):
    if target.dim() == 1:
        return F.cross_entropy(logits.float(), target)
    return soft_cross_entropy(logits, target)


def remain_loss(logits, y_true, teacher_logits, remain_target):
    if remain_target == "labels":
        return F.cross_entropy(logits.float(), y_true)
    return soft_cross_entropy(logits, torch.softmax(teacher_logits.float(), dim=1))


# ------------------------------------------------------------- train step
def batch_norm_relu(x, weight, bias, running_mean=None, running_var=None, *, momentum=0.1, eps=1e-5, relu=True):
    """A training-mode BatchNorm2d, then max(., 0) when relu: the train step's fused layer.

    x (N, C, H, W); weight, bias (C,). Returns (y, mean, invstd) in float64 (y in x's shape):
    mean and the biased variance over (N, H, W) normalise, invstd = 1 / sqrt(var + eps).
    running_mean / running_var, when given, are updated in place as
    torch.nn.functional.batch_norm does: (1 - momentum) * old + momentum * new, with the
    unbiased variance. Differentiable (autograd gives the reference backward); at an
    output of exactly 0 the ReLU's gradient is 0, as torch's is.
    """
    m = x.shape[0] * x.shape[2] * x.shape[3]
    if m <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")
    xd = x.double()
    mean = xd.mean(dim=(0, 2, 3))
    var = xd.var(dim=(0, 2, 3), unbiased=False)
    invstd = 1.0 / torch.sqrt(var + eps)
    shape = (1, -1, 1, 1)
    y = (xd - mean.reshape(shape)) * invstd.reshape(shape) * weight.double().reshape(shape) \
        + bias.double().reshape(shape)
    if relu:
        y = torch.relu(y)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean.double() + momentum * mean.detach())
            running_var.copy_((1 - momentum) * running_var.double() + momentum * var.detach() * m / (m - 1))
    return y, mean, invstd


# ---------------------------------------------------------------- composition
def interpolate(model_a, model_b, t: float):
    """A copy of model_a with floating-point state (1 - t) * a + t * b."""
    out = copy.deepcopy(model_a)
    sb = model_b.state_dict()
    new = {}
    for name, va in model_a.state_dict().items():
        vb = sb[name]
        new[name] = torch.lerp(va, vb.to(va.dtype), t) if va.is_floating_point() else va.clone()
    out.load_state_dict(new)
    return out
