"""Real-data quality: forget one FashionMNIST class with a narrow AllCNN on the CPU.

Takes a few minutes; the data comes from Debian's dataset-fashion-mnist package (the
Makefile installs it) or $FASTUNLEARN_DATA. One original model, trained once per module,
is unlearned twice: by plain Boundary Unlearning (gamma = lambda = 0) and by the paper's
perturbed, pulled-back search (gamma > 0, lambda > 0, several steps).
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

FORGET_CLASS = 0


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


@pytest.fixture(scope="module")
def original(fashion):
    """The trained model every test here unlearns, with its data split and its metrics."""
    (x, y), test = fashion
    mean, std = data.channel_stats(x)
    model = train_classifier(create_model("allcnn", in_channels=1, num_classes=10, width=0.25), (x, y), epochs=3,
                             mean=mean, std=std, seed=0, progress=False)
    f, r = forget.split(x, y, forget.by_class(y, FORGET_CLASS))
    before = measure(model, f, r, test, mean, std)
    print(f"original: {before}")
    assert before["forget_acc"] > 0.5, "the original model must know the class for the check to mean anything"
    return dict(model=model, mean=mean, std=std, forget=f, remain=r, test=test, before=before)


def measure(model, f, r, test, mean, std):
    """evaluate's metrics, plus the test accuracy on the classes kept."""
    out = metrics.evaluate(model, f, r, test, mean, std, max_shadow=1000)
    keep = test[1] != FORGET_CLASS
    kept = (test[0][keep], test[1][keep])
    out["kept_test_acc"] = metrics.evaluate(model, test=kept, mean=mean, std=std, mia=False)["test_acc"]
    return out


def unlearn_and_measure(original, cfg):
    o = original
    res = unlearn(o["model"], o["forget"], o["remain"], config=cfg, mean=o["mean"], std=o["std"], progress=False)
    after = measure(res.model, o["forget"], o["remain"], o["test"], o["mean"], o["std"])
    print(f"unlearned ({cfg}): {after}\nseconds: {res.timings}")
    return after


def test_forget_one_class_keeps_remain(original):
    cfg = UnlearnConfig(relabel="nearest_incorrect", lr=1e-3, epochs=3, remain_reg=1.0)
    after = unlearn_and_measure(original, cfg)
    before = original["before"]
    assert after["forget_acc"] < 0.10
    assert after["remain_acc"] > before["remain_acc"] - 0.05


def test_perturbed_pulled_back_search_forgets_and_keeps(original):
    # The paper's method proper: noise (gamma) and a pull back to the image (lambda) in a
    # several-step search, on the original this run trained. The relabel reads the nearest wrong
    # class off the search's end point; with the argmax relabel a sample keeps its true label
    # unless the search crossed, and how much of the class crossed varied with the original
    # (bench/RESULTS.md, the quality test's settings). One search (refresh "once").
    cfg = UnlearnConfig(relabel="nearest_incorrect", lr=1e-3, epochs=3, remain_reg=1.0, steps=3, gamma=0.05,
                        lamda=0.5, lamda_schedule="inverse", refresh="once")
    after = unlearn_and_measure(original, cfg)
    before = original["before"]
    assert after["forget_acc"] < 0.10
    assert after["kept_test_acc"] > before["kept_test_acc"] - 0.05
    # The forget class looks unseen to the SVC attack (trained on remain vs test): nearly all of
    # its samples are called non-members, at least as many as for the original model.
    assert after["mia_efficacy"] > 0.9 and after["mia_efficacy"] >= before["mia_efficacy"]
