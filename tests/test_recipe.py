"""UnlearnConfig.recommended(): the rule, the checks, and a class forgotten to retrain's quality."""

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn.data import forget
from fastunlearn.data import io as data
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval.metrics import accuracy, predict_logits


class DigitNet(nn.Module):
    """A network no benchmark or other test uses: two conv stages, a flattening head named ``logits``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.logits = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        return self.logits(self.body(x).flatten(1))


def test_plain_defaults_stay_the_papers():
    cfg = fu.UnlearnConfig()
    assert (cfg.relabel, cfg.lr, cfg.epochs, cfg.remain_reg, cfg.batchnorm) == ("argmax", 1e-5, 10, 0.0, "train")


def test_recommended_settings_and_the_epoch_rule():
    from fastunlearn.config import RECIPE_EPOCHS, RECIPE_STEPS

    cfg = fu.UnlearnConfig.recommended()
    assert cfg.relabel == "nearest_incorrect" and cfg.batchnorm == "frozen" and cfg.remain_reg > 1
    assert cfg.head_refit_epochs > 0 and cfg.head_refit_samples >= 1, "the recipe re-fits the head"
    assert fu.UnlearnConfig.recommended(head_refit_epochs=0).head_refit_epochs == 0
    lo, hi = RECIPE_EPOCHS
    # Whole epochs, as many as come nearest RECIPE_STEPS steps, within the bounds.
    for n, batch in ((1, 64), (10, 64), (64, 64), (65, 64), (200, 64), (300, 64), (378, 64), (1000, 64),
                     (100000, 64), (640, 32), (97, 7)):
        e = fu.UnlearnConfig.recommended(forget_size=n, batch_size=batch).epochs
        per_epoch = -(-n // batch)
        assert lo <= e <= hi
        for other in range(lo, hi + 1):  # no other count in the bounds comes nearer
            assert abs(e * per_epoch - RECIPE_STEPS) <= abs(other * per_epoch - RECIPE_STEPS), (n, batch, e, other)
    assert fu.UnlearnConfig.recommended(forget_size=20, epochs=1).epochs == 1, "an override wins"
    with pytest.raises(ValueError, match="forget_size"):
        fu.UnlearnConfig.recommended(forget_size=0)
    with pytest.raises(ValueError, match="batchnorm"):
        fu.UnlearnConfig.recommended(batchnorm="eval")


def test_frozen_batchnorm_keeps_the_running_statistics(digits_model):
    from conftest import DIGITS_MEAN as mean
    from conftest import DIGITS_STD as std

    model, x, y = digits_model
    f = y == 3
    cfg = fu.UnlearnConfig.recommended(epochs=1)
    frozen = fu.unlearn(model, (x[f], y[f]), (x[~f], y[~f]), config=cfg, mean=mean, std=std, progress=False)
    moving = fu.unlearn(model, (x[f], y[f]), (x[~f], y[~f]), config=cfg.replace(batchnorm="train"), mean=mean,
                        std=std, progress=False)
    stats = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        assert torch.equal(frozen.model.state_dict()[k], model.state_dict()[k])
    assert any(not torch.equal(moving.model.state_dict()[k], model.state_dict()[k]) for k in stats)
    assert any(not torch.equal(frozen.model.state_dict()[k], model.state_dict()[k])
               for k in model.state_dict() if k not in stats), "the weights still train"
    assert all(not m._forward_pre_hooks for m in frozen.model.modules())


def test_recommended_forgets_a_class_to_retrains_quality():
    # A class of digits is 10 % of the training data. Original and retrain share recipe and seed.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    splits = data.load_digits()
    x, y = splits["train"]
    mean, std = data.channel_stats(x)
    f, r = forget.split(x, y, forget.by_class(y, 5))

    def train(pair):
        torch.manual_seed(0)
        return train_classifier(DigitNet(), pair, 8, mean=mean, std=std, seed=0, progress=False)

    original, retrain = train(splits["train"]), train(r)
    cfg = fu.UnlearnConfig.recommended(forget_size=len(f[1]), remain_size=len(r[1]))
    res = fu.unlearn(original, f, r, config=cfg, mean=mean, std=std, progress=False)

    def acc(model, pair):
        return accuracy(predict_logits(model, pair[0], mean, std), pair[1])

    before = acc(original, f)
    assert before > 0.9, "the original must know the class for the test to mean anything"
    assert acc(res.model, f) <= acc(retrain, f) + 0.03
    assert abs(acc(res.model, r) - acc(retrain, r)) <= 0.02
