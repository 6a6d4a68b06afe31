"""One test per row of the README table "Where fastunlearn's default differs from the published
code": each shows the difference with compat off and its absence with compat="authors", against
eval/authors.py (the published step written out op for op) or the published expression itself."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastunlearn import UnlearnConfig
from fastunlearn.data.pixels import Normalizer
from fastunlearn.engine import compat
from fastunlearn.eval import authors
from fastunlearn.ops import boundary_step
from fastunlearn.ops.relabel_check import relabel_check

LOADER = ([0.5], [0.5])  # the published FashionMNIST loader's normalisation


def _published_step(u, u0, d, eps, alpha):
    """Their clamper on an attack-space iterate: ball, then [0, 1], then round half to even."""
    v = u0 + torch.clamp(u + torch.sign(d) * alpha - u0, -eps, eps)
    return torch.round(torch.clamp(v, 0.0, 1.0) * 255) / 255


def test_rounding_can_leave_the_ball_only_under_compat():
    # u0 off the grid (their u0 is an attack-space image): the ball's edge falls between grid points.
    u0 = torch.full((1, 1, 2, 2), 0.5 + 0.2 / 255)
    g = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    eps = 2 / 255
    off = boundary_step(u0, u0, g, eps=eps, alpha=eps, backend="torch")
    on = boundary_step(u0, u0, g, eps=eps, alpha=eps, compat="authors")
    assert float((off - u0).abs().max()) <= eps + 1e-7
    assert float((on - u0).abs().max()) > eps + 0.2 / 255
    assert torch.equal(on, _published_step(u0, u0, g, eps, eps))
    assert not torch.equal(off, on)


def _linear(weight):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model.eval()


def _default_grad(model, nu, y):
    """The default search's input gradient: per sample, d CE_i / d n(u)."""
    nu = nu.detach().requires_grad_(True)
    logits = model(nu)
    rc = relabel_check(logits.detach(), y, want_grad=True)
    return torch.autograd.grad(logits, nu, grad_outputs=rc.dlogits)[0]


def _compat_grad(model, nu, y, batch_size):
    nu = nu.detach().requires_grad_(True)
    rows = torch.arange(len(y))
    return compat.batch_mean_grad(model(nu), y, nu, rows, len(y), batch_size)


def _published_grads(model, nu, y, batch_size):
    """Their gradient: F.cross_entropy (mean over the batch) backward, batch by batch."""
    out = []
    for i in range(0, len(y), batch_size):
        x = nu[i:i + batch_size].detach().clone().requires_grad_(True)
        F.cross_entropy(model(x), y[i:i + batch_size]).backward()
        out.append(x.grad)
    return torch.cat(out)


def test_gradient_scale_is_the_batch_mean_only_under_compat(gen):
    model = _linear(torch.randn(10, 16, generator=gen))
    nu = torch.randn(70, 1, 4, 4, generator=gen)
    y = torch.randint(0, 10, (70,), generator=gen)
    theirs = _published_grads(model, nu, y, 64)  # a batch of 64, then a short one of 6
    off, on = _default_grad(model, nu, y), _compat_grad(model, nu, y, 64)
    torch.testing.assert_close(on, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(off[:64] / 64, theirs[:64], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(off[64:] / 6, theirs[64:], rtol=1e-4, atol=1e-7)
    assert (off - theirs).abs().max() > 0.1 * theirs.abs().max()


def test_confident_sample_underflow_is_theirs_only_under_compat():
    # Logits 0 and -gap. Their gradient is (softmax - onehot) / 64 in float32: at gap 95 its
    # small entry is a subnormal (~1e-43), so the sample still moves; at gap 101 it rounds to 0
    # and the sample does not move. The default's fused relabel kernel flushes softmax entries
    # below float32's smallest normal, so from a gap of about 88 on its gradient is 0.
    if torch.tensor(1e-43, dtype=torch.float32) == 0:
        pytest.fail("this CPU flushes float32 subnormals to zero; the underflow check needs them")
    model = _linear(torch.tensor([[0.0], [-100.0]]))
    nu = torch.full((64, 1, 1, 1), 1.01)
    nu[:32] = 0.95
    y = torch.zeros(64, dtype=torch.int64)
    theirs = _published_grads(model, nu, y, 64)
    off, on = _default_grad(model, nu, y), _compat_grad(model, nu, y, 64)
    assert theirs[:32].ne(0).all() and not theirs[32:].any()
    assert torch.equal(torch.sign(on), torch.sign(theirs))
    assert not off.any()
    u0 = torch.full((64, 1, 1, 1), 100 / 255)  # on the grid, so rounding alone does not move it
    moved = boundary_step(u0, u0, on, eps=0.1, alpha=0.1, compat="authors") != u0
    assert moved[:32].all() and not moved[32:].any()


def test_lambda_term_mixes_spaces_only_under_compat(gen):
    # g = 0 and u = u0: the default pull (u - u0) is 0, so nothing moves; theirs is
    # lamda (n(u) - u0), the normalised iterate minus the original, which is not 0.
    u0 = torch.randint(1, 255, (2, 1, 4, 4), generator=gen).float() / 255
    g = torch.zeros_like(u0)
    mean, std = torch.tensor([0.4914]), torch.tensor([0.2023])
    kw = dict(eps=0.1, alpha=0.1, lamda=0.05, mean=mean, std=std)
    off = boundary_step(u0, u0, g, backend="torch", **kw)
    on = boundary_step(u0, u0, g, compat="authors", **kw)
    assert torch.equal(off, u0)
    nu = (u0 - 0.4914) / 0.2023
    assert torch.equal(on, _published_step(u0, u0, 0.05 * (nu - u0), 0.1, 0.1))
    assert not torch.equal(on, u0)


def test_normalisation_is_their_attack_constants_only_under_compat(gen):
    pixels = torch.randint(0, 256, (3, 1, 5, 5), generator=gen).float() / 255
    data = Normalizer(*LOADER, 1, "cpu")
    attack = compat.attack_normalizer(1, "cpu")
    loader_image = data(pixels)
    u0_on = compat.to_attack_space(pixels, data, attack)
    torch.testing.assert_close(u0_on, authors.attack_inverse(loader_image), rtol=0, atol=1e-7)
    assert (u0_on - pixels).abs().max() > 0.1  # the default searches the pixels themselves
    torch.testing.assert_close(attack(u0_on), loader_image, rtol=0, atol=1e-6)  # the model input at t = 0
    mean3, _ = compat.attack_constants(3)
    assert mean3[2] == 0.2265 == authors.ATTACK_MEAN[2]  # the published constant, typo included


@pytest.mark.parametrize("relabel", ["soft", "topk"])
def test_soft_targets_are_their_logits_only_under_compat(gen, relabel):
    logits = torch.randn(8, 10, generator=gen) * 3
    y = torch.randint(0, 10, (8,), generator=gen)
    cfg = UnlearnConfig(relabel=relabel, topk=3, compat="authors")
    rc = relabel_check(logits, y, mode=relabel, topk=3)
    on = compat.with_published_targets(rc, logits, cfg).targets
    theirs = authors.published_targets(logits, use_logits=True, logit_preprocess=relabel == "topk")
    torch.testing.assert_close(on, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rc.targets.sum(1), torch.ones(8))  # the default: probabilities
    assert (rc.targets - theirs).abs().max() > 0.1
