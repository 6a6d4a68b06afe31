"""Baselines: each returns a new model and its time, leaves the input untouched, and moves the
model the way its loss says."""

import copy

import pytest
import torch

from fastunlearn.engine.train import train_classifier
from fastunlearn.eval import baselines, metrics
from fastunlearn.nn.models import SmallCNN


def setup(gen, classes=3, n=60):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = SmallCNN(in_channels=1, num_classes=classes, width=4).eval()
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=gen)
    f = y == 0
    return model, (x[f], y[f]), (x[~f], y[~f])


def forget_loss(model, forget):
    return float(metrics.per_sample_loss(metrics.predict_logits(model, forget[0]), forget[1]).mean())


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", baselines.BASELINES)
def test_every_baseline_returns_a_new_model(name, gen):
    model, forget, remain = setup(gen)
    before = copy.deepcopy(model)
    settings = {"retrain": {"epochs": 1}, "boundary_shrink": {"epochs": 1, "lr": 1e-2}, "scrub": {"epochs": 1}}
    out = baselines.run_all(model, forget, remain, names=[name], settings={name: settings.get(name, {})})[name]
    assert same(model, before), "the input model must be untouched"
    assert out.name == name and out.seconds > 0 and not out.model.training
    assert not same(out.model, model)
    assert out.model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_neggrad_raises_the_forget_loss(gen):
    model, forget, _ = setup(gen)
    out = baselines.neggrad(model, forget, epochs=2, lr=1e-2)
    assert forget_loss(out.model, forget) > forget_loss(model, forget)


def trained_setup(gen, classes=3, n=90):
    """A model trained to know every class: class c is a bright vertical band at columns 2c..2c+2
    over noise."""
    model, _, _ = setup(gen, classes, n)
    y = torch.arange(n) % classes
    pattern = torch.zeros(classes, 1, 8, 8)
    for c in range(classes):
        pattern[c, 0, :, 2 * c:2 * c + 3] = 1.0
    x = ((0.6 * pattern[y] + 0.4 * torch.rand(n, 1, 8, 8, generator=gen)) * 255).round().to(torch.uint8)
    model = train_classifier(model, (x, y), epochs=10, lr=0.05, batch_size=32, seed=0, progress=False)
    f = y == 0
    return model, (x[f], y[f]), (x[~f], y[~f])


def forget_accuracy(model, forget):
    return metrics.accuracy(metrics.predict_logits(model, forget[0]), forget[1])


def test_random_labels_and_neggrad_plus_lower_forget_accuracy(gen):
    # The model knows the forget class first, so a drop is the baselines' doing.
    model, forget, remain = trained_setup(gen)
    before = forget_accuracy(model, forget)
    assert before > 0.9, f"the trained model must know the forget class (accuracy {before:.2f})"
    rl = baselines.random_labels(model, forget, remain, epochs=10, lr=0.05)
    assert forget_accuracy(rl.model, forget) < before - 0.5
    ngp = baselines.neggrad_plus(model, forget, remain, epochs=3, lr=0.05, alpha=0.5)
    assert forget_loss(ngp.model, forget) > forget_loss(model, forget)


def test_retrain_starts_from_a_fresh_init(gen):
    model, _, remain = setup(gen)
    fresh = baselines.reinitialised(model, seed=3)
    assert same(fresh, baselines.reinitialised(model, seed=3))
    assert not same(fresh, model)


def test_bad_arguments(gen):
    model, forget, remain = setup(gen)
    with pytest.raises(ValueError, match="unknown baselines"):
        baselines.run_all(model, forget, remain, names=["salun2"])
    with pytest.raises(ValueError, match="alpha"):
        baselines.neggrad_plus(model, forget, remain, alpha=2.0)
    with pytest.raises(ValueError, match="epochs"):
        baselines.neggrad(model, forget, epochs=-1)
