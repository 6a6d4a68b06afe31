"""reference.py against independent computations."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastunlearn import reference as R

# Random123 known-answer vectors for philox4x32-10: (counter, key as (k0, k1)) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = R.philox4x32(torch.tensor([ctr], dtype=torch.int64), key[0] | (key[1] << 32))
    assert tuple(int(v) for v in out[0]) == expected


def grid_image(gen, shape):
    return torch.randint(0, 256, shape, generator=gen).float() / 255


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 11), (4, 3, 8, 8)])
@pytest.mark.parametrize("noise", R.NOISE_KINDS)
def test_step_stays_in_ball_and_on_grid(gen, shape, noise):
    u0 = grid_image(gen, shape)
    eps = float(torch.empty(1).uniform_(0.02, 0.3, generator=gen))
    u = u0
    for t in range(4):  # several steps so the projection is exercised from inside the ball
        g = torch.randn(shape, generator=gen)
        u = R.boundary_step(u, u0, g, eps=eps, alpha=eps / 1.5, lamda=0.3, gamma=0.5, noise=noise, quantize=255,
                            seed=7, offset=t * u.numel())
        assert bool(((u - u0).abs() <= eps + 1e-6).all())
        assert bool(((u >= 0) & (u <= 1)).all())
        k = u.double() * 255
        assert torch.allclose(k, k.round(), atol=1e-4)


def test_fgsm_without_rounding_is_clamped_sign_step(gen):
    u0 = torch.rand(5, 3, 9, 9, generator=gen)
    g = torch.randn(u0.shape, generator=gen)
    eps = 0.1
    out = R.boundary_step(u0, u0, g, eps=eps, alpha=eps, quantize=0)
    assert torch.allclose(out, (u0 + eps * g.sign()).clamp(0, 1), atol=1e-7)


def test_fgsm_on_grid_moves_whole_grid_steps(gen):
    k = torch.randint(0, 256, (6, 1, 7, 5), generator=gen)
    g = torch.randn(k.shape, generator=gen)
    g[0, 0, 0, 0] = 0.0  # sign(0) = 0: no move
    steps = 20
    out = R.boundary_step(k.float() / 255, k.float() / 255, g, eps=steps / 255, alpha=steps / 255)
    expected = (k + steps * g.sign().long()).clamp(0, 255)
    assert torch.equal((out.double() * 255).round().long(), expected)
    assert out[0, 0, 0, 0] == k[0, 0, 0, 0].float() / 255


def test_half_step_ball_rounds_inward(gen):
    # eps = 0.1 puts the ball edge half-way between grid points (25.5 steps): the result must
    # land on the inner grid point, never outside the ball.
    k = torch.randint(30, 220, (500,), generator=gen).reshape(5, 1, 10, 10)
    g = torch.randn(k.shape, generator=gen)
    out = R.boundary_step(k.float() / 255, k.float() / 255, g, eps=0.1, alpha=0.1)
    moved = (out.double() * 255).round().long() - k
    assert torch.equal(moved.abs(), torch.full_like(moved, 25))


def test_lamda_pulls_back_to_origin(gen):
    u0 = torch.rand(3, 2, 6, 6, generator=gen) * 0.5 + 0.25
    u = (u0 + (torch.rand(u0.shape, generator=gen) - 0.5) * 0.1).clamp(0, 1)
    alpha = 0.01
    out = R.boundary_step(u, u0, torch.zeros_like(u), eps=0.2, alpha=alpha, lamda=2.0, quantize=0)
    expected = u - alpha * torch.sign(u - u0)
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-6)


def test_std_chain_rule(gen):
    # With lamda the relative size of g and the pull matters, so dividing by std changes signs.
    c = 3
    std = torch.tensor([0.1, 1.0, 10.0])
    u0 = torch.rand(4, c, 5, 5, generator=gen) * 0.5 + 0.25
    u = (u0 + (torch.rand(u0.shape, generator=gen) - 0.5) * 0.1).clamp(0, 1)
    gn = torch.randn(u0.shape, generator=gen)
    lam, alpha = 3.0, 0.02
    out = R.boundary_step(u, u0, gn, eps=0.3, alpha=alpha, lamda=lam, quantize=0, mean=[0.5] * c, std=std)
    d = gn / std.reshape(1, c, 1, 1) - lam * (u - u0)
    assert torch.allclose(out, (u + alpha * d.sign()).clamp(0, 1), atol=1e-6)


# Every bound is 5 standard errors of its statistic over N_STAT draws: a correct generator fails
# one check in about 1.7 million (two-sided normal tail), and the seed is printed for a replay.
N_STAT = 200_000
FIVE_SE = 5 / math.sqrt(N_STAT)  # five standard errors of the mean of a unit-variance draw
CAUCHY_QUARTILE_SE = FIVE_SE * math.sqrt(3 / 16) * 2 * math.pi  # sqrt(p (1 - p)) / density at the quartile


@pytest.mark.parametrize("kind,check", [
    ("normal", lambda z: (abs(z.mean()) < FIVE_SE, abs(z.var() - 1) < FIVE_SE * math.sqrt(2))),
    ("laplace", lambda z: (abs(z.mean()) < FIVE_SE * math.sqrt(2), abs(z.var() - 2) < FIVE_SE * math.sqrt(20))),
    ("uniform", lambda z: (abs(z.mean()) < FIVE_SE * math.sqrt(1 / 3),
                           abs(z.var() - 1 / 3) < FIVE_SE * math.sqrt(4 / 45), z.min() > -1, z.max() < 1)),
    ("cauchy", lambda z: (abs(z.median()) < FIVE_SE * math.pi / 2, abs(z.quantile(0.25) + 1) < CAUCHY_QUARTILE_SE,
                          abs(z.quantile(0.75) - 1) < CAUCHY_QUARTILE_SE)),
])
def test_noise_statistics(kind, check, gen):
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    z = R.philox_noise(N_STAT, kind, seed, offset=int(torch.randint(0, 2**40, (1,), generator=gen)))
    assert all(bool(c) for c in check(z)), (kind, seed)


def test_noise_offsets_are_positions_in_one_stream():
    a = R.philox_noise(1000, "normal", 3, offset=0)
    b = R.philox_noise(1000, "normal", 3, offset=250)
    assert torch.equal(a[250:], b[:750])
    c = R.philox_noise(1000, "normal", 3, offset=10**9)
    assert abs(float(torch.corrcoef(torch.stack([a, c]))[0, 1])) < 0.15
    assert not torch.equal(R.philox_noise(1000, "normal", 4, offset=0), a)


def test_unknown_lamda_schedule_is_refused():
    # The values are checked against DESIGN.md by hand in test_oracles.py.
    with pytest.raises(ValueError, match="lamda_schedule"):
        R.lamda_at(1.0, "cosine", 0, 1)


def test_relabel_modes_against_python_loops(gen):
    n, k = 40, 7
    logits = torch.randn(n, k, generator=gen)
    logits[0] = 1.0  # all tied: argmax is 0
    logits[1, 2] = logits[1, 5] = logits[1].max() + 1  # tie between 2 and 5
    y = torch.randint(0, k, (n,), generator=gen)
    y[1] = 2
    out = {m: R.relabel_check(logits, y, mode=m, topk=3, want_grad=True) for m in R.RELABEL_MODES}
    for i in range(n):
        row = logits[i].tolist()
        best = max(range(k), key=lambda j: (row[j], -j))
        others = [j for j in range(k) if j != y[i]]
        best_other = max(others, key=lambda j: (row[j], -j))
        assert out["argmax"].relabel[i] == best
        assert out["nearest_incorrect"].relabel[i] == best_other
        assert bool(out["argmax"].success[i]) == (best != y[i])
        assert out["argmax"].margin[i] == pytest.approx(row[y[i]] - row[best_other], abs=1e-5)
        p = torch.softmax(logits[i].double(), 0)
        assert torch.allclose(out["soft"].targets[i].double(), p, atol=1e-6)
        top = sorted(range(k), key=lambda j: (-row[j], j))[:3]
        expect = torch.zeros(k, dtype=torch.float64)
        expect[top] = p[top] / p[top].sum()
        assert torch.allclose(out["topk"].targets[i].double(), expect, atol=1e-6)
    assert out["argmax"].relabel[1] == 2 and not out["argmax"].success[1]
    assert out["nearest_incorrect"].relabel[1] == 5
    # dlogits is the gradient of the per-sample cross-entropy.
    z = logits.clone().requires_grad_(True)
    F.cross_entropy(z, y, reduction="sum").backward()
    assert torch.allclose(out["argmax"].dlogits, z.grad, atol=1e-6)


def test_search_fgsm_equals_handwritten(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randint(0, 256, (16, 3, 6, 6), generator=gen).float() / 255
    y = torch.randint(0, 5, (16,), generator=gen)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    res = R.boundary_relabel(model, x, y, eps=0.1, alpha=0.1, mean=mean, std=std)
    m = torch.tensor(mean).reshape(1, 3, 1, 1)
    s = torch.tensor(std).reshape(1, 3, 1, 1)
    xx = x.clone().requires_grad_(True)
    F.cross_entropy(model((xx - m) / s), y).backward()
    lo = torch.ceil(((x - 0.1).clamp(min=0) * 255 - 1e-4)) / 255
    hi = torch.floor((x + 0.1).clamp(max=1) * 255 + 1e-4) / 255
    adv = torch.minimum(torch.maximum(torch.floor((x + 0.1 * xx.grad.sign()) * 255 + 0.5) / 255, lo), hi)
    with torch.no_grad():
        expect = model((adv - m) / s).argmax(1)
    assert torch.equal(res.relabel, expect)
