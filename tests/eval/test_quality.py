"""Real-data quality: forget one FashionMNIST class with a narrow AllCNN on the CPU.

Takes a few minutes; the data comes from Debian's dataset-fashion-mnist package (the
Makefile installs it) or $FASTUNLEARN_DATA.
"""

import pytest
import torch

from fastunlearn import UnlearnConfig, unlearn
from fastunlearn.data import forget
from fastunlearn.data import io as data
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval import metrics
from fastunlearn.nn.models import create_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion():
    try:
        splits = data.load_fashion_mnist()
    except FileNotFoundError as e:
        pytest.fail(f"FashionMNIST is needed for the quality check: {e}")
    g = torch.Generator().manual_seed(0)
    x, y = splits["train"]
    idx = torch.randperm(len(y), generator=g)[:6000]
    tidx = torch.randperm(len(splits["test"][1]), generator=g)[:2000]
    return (x[idx], y[idx]), (splits["test"][0][tidx], splits["test"][1][tidx])


def test_forget_one_class_keeps_remain(fashion):
    (x, y), test = fashion
    mean, std = data.channel_stats(x)
    model = train_classifier(create_model("allcnn", in_channels=1, num_classes=10, width=0.25), (x, y), epochs=3,
                             mean=mean, std=std, seed=0, progress=False)
    f, r = forget.split(x, y, forget.by_class(y, 0))
    before = metrics.evaluate(model, f, r, test, mean, std, mia=False)
    cfg = UnlearnConfig(relabel="nearest_incorrect", lr=1e-3, epochs=3, remain_reg=1.0)
    res = unlearn(model, f, r, config=cfg, mean=mean, std=std, progress=False)
    after = metrics.evaluate(res.model, f, r, test, mean, std, max_shadow=1000)
    print(f"original: {before}\nunlearned: {after}\nseconds: {res.timings}")
    assert before["forget_acc"] > 0.5, "the original model must know the class for the check to mean anything"
    assert after["forget_acc"] < 0.10
    assert after["remain_acc"] > before["remain_acc"] - 0.05
