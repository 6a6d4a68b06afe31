"""SalUn, l1-sparse and SSD: each returns a new model, leaves the input untouched, and lowers
the forget accuracy of a model trained on the forget set."""

import copy

import pytest
import torch
from conftest import DIGITS_MEAN, DIGITS_STD

from fastunlearn.eval import baselines, metrics
from fastunlearn.eval import peer_baselines as P


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def acc(model, data):
    return metrics.accuracy(metrics.predict_logits(model, data[0], DIGITS_MEAN, DIGITS_STD), data[1])


@pytest.fixture(scope="module")
def digits_split(digits_model):
    model, x, y = digits_model
    f = y == 0
    return model, (x[f], y[f]), (x[~f], y[~f])


@pytest.mark.parametrize("name,settings", [
    ("salun", dict(epochs=3, lr=0.02)),
    ("l1_sparse", dict(epochs=3, lr=0.1, alpha=2e-2)),
    ("ssd", dict(alpha=5.0, lamda=1.0)),
])
def test_peer_baseline_forgets_and_leaves_the_input(digits_split, name, settings, one_thread):
    model, forget, remain = digits_split
    before = copy.deepcopy(model)
    out = baselines.run_all(model, forget, remain, names=[name], mean=DIGITS_MEAN, std=DIGITS_STD,
                            settings={name: settings})[name]
    assert same(model, before), "the input model must be untouched"
    assert out.name == name and out.seconds > 0 and not out.model.training and out.model is not model
    f0, f1 = acc(model, forget), acc(out.model, forget)
    r0, r1 = acc(model, remain), acc(out.model, remain)
    print(name, f"forget {f0:.3f} -> {f1:.3f}, remain {r0:.3f} -> {r1:.3f}")
    assert f1 < f0 - 0.3
    assert r1 > 0.5  # the rest still works


def test_saliency_mask_keeps_the_share_asked(digits_split):
    model, forget, _ = digits_split
    mask = P.saliency_mask(model, forget, threshold=0.25, mean=DIGITS_MEAN, std=DIGITS_STD)
    total = sum(m.numel() for m in mask.values())
    kept = sum(float(m.sum()) for m in mask.values())
    assert set(mask) == {n for n, _ in model.named_parameters()}
    assert abs(kept / total - 0.25) < 0.01
    with pytest.raises(ValueError, match="threshold"):
        P.saliency_mask(model, forget, threshold=0.0)


def test_salun_moves_only_salient_weights(digits_split):
    model, forget, remain = digits_split
    mask = P.saliency_mask(model, forget, threshold=0.1, mean=DIGITS_MEAN, std=DIGITS_STD)
    out = P.salun(model, forget, remain, epochs=1, lr=0.01, threshold=0.1, mean=DIGITS_MEAN, std=DIGITS_STD)
    params = dict(model.named_parameters())
    for n, p in out.model.named_parameters():
        moved = (p.detach() != params[n].detach())
        assert not bool((moved & (mask[n] == 0)).any()), n


def test_ssd_rejects_bad_settings(digits_split):
    model, forget, remain = digits_split
    with pytest.raises(ValueError, match="alpha and lamda"):
        P.ssd(model, forget, remain, alpha=0.0)
