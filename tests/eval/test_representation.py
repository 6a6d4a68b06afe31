import json

import pytest
import torch
import torch.nn as nn

from fastunlearn.eval import representation as R


def _orthogonal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_identity_invariances_and_independence(gen, unbiased):
    x = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    assert R.linear_cka(x, x, unbiased) == pytest.approx(1.0, abs=1e-10)
    y = x[:, :12] @ torch.randn(12, 12, generator=gen, dtype=torch.float64) + torch.randn(
        300, 12, generator=gen, dtype=torch.float64)
    base = R.linear_cka(x, y, unbiased)
    assert 0.05 < base < 0.99
    assert R.linear_cka(x @ _orthogonal(20, gen), y, unbiased) == pytest.approx(base, abs=1e-10)
    assert R.linear_cka(x, 7.5 * y @ _orthogonal(12, gen), unbiased) == pytest.approx(base, abs=1e-10)
    assert R.linear_cka(x + 3.0, y - 1.0, unbiased) == pytest.approx(base, abs=1e-10)  # centring
    indep = torch.randn(3000, 10, generator=gen, dtype=torch.float64)
    other = torch.randn(3000, 10, generator=gen, dtype=torch.float64)
    assert abs(R.linear_cka(indep[:1000], other[:1000], unbiased)) < 0.05


def test_cka_matches_a_direct_formula(gen):
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 4, generator=gen, dtype=torch.float64) + x[:, :4]
    h = torch.eye(50, dtype=torch.float64) - 1 / 50
    k, m = h @ x @ x.T @ h, h @ y @ y.T @ h
    want = (k * m).sum() / torch.sqrt((k * k).sum() * (m * m).sum())
    assert R.linear_cka(x, y) == pytest.approx(float(want), rel=1e-10)
    with pytest.raises(ValueError, match="same samples"):
        R.linear_cka(x, y[:10])


def test_probe_on_features_that_hold_and_do_not_hold_the_class(gen):
    n = 1200
    target = torch.rand(n, generator=gen) < 0.2
    noise = torch.randn(n, 16, generator=gen)
    holds = noise.clone()
    holds[:, 3] += 4.0 * target  # one direction carries the class (Bayes accuracy 0.977)
    p = R.linear_probe(holds, target, seed=1)
    assert p["accuracy"] > 0.9 and p["chance"] == 0.5 and p["n_test"] > 50
    q = R.linear_probe(noise, target, seed=1)
    assert abs(q["accuracy"] - 0.5) < 0.12
    assert R.linear_probe(holds, target, seed=1) == p  # seeded
    with pytest.raises(ValueError, match="at least 4"):
        R.linear_probe(noise[:10], torch.tensor([True] + [False] * 9))


def test_head_only_rule():
    assert R.head_only_forgetting(0.0, 0.95)
    assert not R.head_only_forgetting(0.0, 0.6)
    assert not R.head_only_forgetting(0.9, 0.99)  # the head still predicts the class: not forgotten at all
    assert not R.head_only_forgetting(0.0, 0.95, retrain_probe_acc=0.93)
    assert R.head_only_forgetting(0.0, 0.95, retrain_probe_acc=0.80)
    # Features unchanged from the original's: flagged whatever the probe says.
    assert R.head_only_forgetting(0.0, 0.93, retrain_probe_acc=0.93, cka_original=0.999)
    assert not R.head_only_forgetting(0.0, 0.93, retrain_probe_acc=0.93, cka_original=0.95)
    assert not R.head_only_forgetting(0.0, 0.95, cka_original=0.95)  # the original is the reference, not chance
    assert not R.head_only_forgetting(0.6, 0.95, cka_original=1.0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.body(x))


def test_features_default_to_the_head_input_and_named_layers(gen):
    torch.manual_seed(0)
    net = _Net()
    x = torch.rand(10, 1, 2, 2, generator=gen)
    f, logits = R.features(net, x, return_logits=True)
    with torch.no_grad():
        want = net.body(x)
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, net.fc(want).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(R.features(net, x, layer="body.1", at="output"),
                               net.body[1](x.flatten(1)).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        R.features(net, x, layer="nope")


def test_representation_checks_flag_a_head_swap(gen):
    """Features that hold class 0 behind a head that never predicts it: head-only forgetting.
    A model whose features lost the class is not flagged."""
    n = 600
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 1, 2, 2, generator=gen) * 0.3
    x[:, 0, 0, 0] += (y == 0).float() * 2.0
    x[:, 0, 0, 1] += (y == 1).float() * 2.0
    x[:, 0, 1, 0] += (y == 2).float() * 2.0
    keeps = nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(4, 3))
    lost = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 3))
    with torch.no_grad():
        keeps[2].weight.zero_()
        keeps[2].bias.zero_()
        keeps[2].weight[1, 1] = keeps[2].weight[2, 2] = 1.0  # class 0 never wins
        keeps[2].bias[1] = 10.0
        lost[1].weight.copy_(torch.diag(torch.tensor([0.0, 0.0, 0.0, 1.0])))  # keeps only a pixel no class marks
        lost[1].bias.zero_()
        lost[2].weight.copy_(keeps[2].weight)
        lost[2].bias.copy_(keeps[2].bias)
    out = R.representation_checks(keeps, (x, y), [0], original=keeps, retrain=lost, seed=0)
    json.dumps(out)
    assert out["output_forget_acc"] < 0.1
    assert out["probe"]["accuracy"] > 0.9 and out["probe_retrain"]["accuracy"] < 0.7
    assert out["cka_original"] == pytest.approx(1.0, abs=1e-9)
    assert out["head_only_forgetting"] is True
    out_lost = R.representation_checks(lost, (x, y), [0], seed=0)
    assert out_lost["head_only_forgetting"] is False and out_lost["cka_original"] is None
