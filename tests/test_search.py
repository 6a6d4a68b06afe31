"""The search engine against reference.py on a trained model and real data (sklearn digits)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fastunlearn import UnlearnConfig, reference
from fastunlearn.search import run_search

MEAN, STD = [0.3], [0.35]


@pytest.fixture(scope="module")
def trained():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).mul(255).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2,
                          padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xf = (x.float() / 255 - MEAN[0]) / STD[0]
    for _ in range(8):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert (model(xf).argmax(1) == y).float().mean() > 0.9
    return model, x[:300], y[:300]


def ref_labels(model, x, y, cfg, refresh=0):
    res = reference.boundary_relabel(
        model, x.float() / 255, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, mode=cfg.relabel,
        topk=cfg.topk, lamda=cfg.lamda, lamda_schedule=cfg.lamda_schedule, gamma=cfg.gamma, noise=cfg.noise,
        quantize=cfg.quantize, seed=cfg.seed, refresh=refresh, early_exit=cfg.early_exit, mean=MEAN, std=STD)
    return res


def test_fgsm_matches_reference_exactly(trained):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.1, steps=1, precision="fp32")
    res = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    ref = ref_labels(model, x, y, cfg)
    assert torch.equal(res.relabels[0], ref.relabel)
    assert torch.equal(res.success[0], ref.success)
    assert torch.allclose(res.margin[0], ref.margin, atol=1e-4)
    assert 0.05 < float(res.success[0].float().mean())  # the step does move samples across


@pytest.mark.parametrize("noise", ["normal", "cauchy"])
def test_multistep_noisy_search_matches_reference(trained, noise):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.15, steps=5, gamma=0.02, lamda=0.5, lamda_schedule="inverse", noise=noise,
                        relabel="nearest_incorrect", seed=11, precision="fp32")
    res = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu", refreshes=2)
    for r in range(2):
        ref = ref_labels(model, x, y, cfg, refresh=r)
        agree = (res.relabels[r] == ref.relabel).float().mean()
        assert agree >= 0.99, f"refresh {r}: {agree:.4f}"
    assert not torch.equal(res.success[0], res.success[1]) or not torch.equal(res.margin[0], res.margin[1])


def test_result_does_not_depend_on_chunk_size(trained):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.1, steps=4, gamma=0.05, seed=5, relabel="soft", precision="fp32")
    outs = [run_search(model, x, y, cfg.replace(search_batch_size=b), mean=MEAN, std=STD, device="cpu")
            for b in (7, 64, 300)]
    for o in outs[1:]:
        assert torch.equal(o.relabels, outs[0].relabels)
        assert torch.equal(o.steps, outs[0].steps)
        assert torch.allclose(o.targets, outs[0].targets, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_early_exit_keeps_samples_that_had_not_crossed(trained, gamma):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.2, steps=6, gamma=gamma, seed=3, precision="fp32")
    fast = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    slow = run_search(model, x, y, cfg.replace(early_exit=False), mean=MEAN, std=STD, device="cpu")
    never_stopped = fast.steps[0] == cfg.steps
    assert bool((fast.steps[0] < cfg.steps).any()), "no sample stopped early: the test would prove nothing"
    assert torch.equal(fast.relabels[0][never_stopped], slow.relabels[0][never_stopped])
    assert torch.equal(fast.margin[0][never_stopped], slow.margin[0][never_stopped])
    # Stopped samples had crossed when they stopped.
    assert bool(fast.success[0][~never_stopped].all())


def test_dataset_streaming_equals_tensor(trained):
    model, x, y = trained

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    cfg = UnlearnConfig(eps=0.1, steps=2, gamma=0.1, seed=9, search_batch_size=50, precision="fp32")
    a = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    b = run_search(model, Digits(), y, cfg, mean=MEAN, std=STD, device="cpu")
    assert torch.equal(a.relabels, b.relabels)


def test_matches_authors_style_fgsm(trained):
    from fastunlearn.authors import authors_search

    model, x, y = trained
    # eps on the 1/255 grid: their round-after-clamp and our inward rounding then agree.
    cfg = UnlearnConfig(eps=20 / 255, steps=1, precision="fp32")
    ours = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    test_model = __import__("copy").deepcopy(model)  # theirs computes weight grads on its copy
    theirs, ok = authors_search(test_model, x.float() / 255, y, cfg, torch.tensor(MEAN), torch.tensor(STD))
    agree = float((ours.relabels[0] == theirs).float().mean())
    # Their float32 cross-entropy backward rounds the gradient of very confident samples;
    # everything else must agree.
    assert agree >= 0.99, agree
    assert float(ok.float().mean()) > 0.05
