"""head_refit: the classifier head re-trained on cached remain features, and the config path to it."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn.head_refit import refit_head, remain_subset
from fastunlearn.nn.models import AllCNN, resnet


def user_sequential(classes=4):
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(20, classes))


class ScaledLogits(nn.Module):
    """A head followed by more work: its inputs alone do not give the logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 4)

    def forward(self, x):
        return 2.0 * self.head(self.body(x)) + 1.0


ARCHS = {
    "allcnn": lambda: AllCNN(in_channels=3, num_classes=4, width=0.05),
    "resnet18": lambda: resnet(18, num_classes=4, in_channels=3, width=4),
    "sequential": user_sequential,
    "scaled": ScaledLogits,
}


def data(n=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def trained_model(arch):
    torch.manual_seed(0)
    m = ARCHS[arch]()
    m.train()
    with torch.no_grad():
        for _ in range(3):  # BatchNorm running statistics away from their initial values
            m(data(64, seed=5)[0])
    return m.eval()


def test_one_step_by_hand():
    # Backbone: flatten (no weights); head: Linear(2, 2) at zero. One batch of both samples, lr 1:
    # the logits are 0, softmax (0.5, 0.5); dCE/dlogits = (p - onehot) / N; W <- W - dW.
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    y = torch.tensor([0, 1])
    out = refit_head(model, (x, y), epochs=1, lr=1.0, batch_size=2)
    want = torch.tensor([[0.25, -0.25], [-0.25, 0.25]])
    assert torch.allclose(out[1].weight, want, atol=1e-7)
    assert torch.allclose(out[1].bias, torch.zeros(2), atol=1e-7)
    assert torch.equal(model[1].weight, torch.zeros(2, 2)), "the input model is not modified"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_equals_compose_head_finetune(arch, monkeypatch):
    # The cached features (or, for "scaled", the fallback through the backbone) give the result of
    # compose's head fine-tune trained through the backbone (its cached path turned off here).
    compose = importlib.import_module("fastunlearn.compose")  # the module: the package exports a function

    model = trained_model(arch)
    before = copy.deepcopy(model.state_dict())
    x, y = data()
    mean, std = [0.5, 0.4, 0.5], [0.3, 0.3, 0.2]
    got = refit_head(model, (x, y), epochs=2, lr=0.05, batch_size=32, mean=mean, std=std, seed=3)
    monkeypatch.setattr(compose, "fit_head_cached", lambda *a, **k: False)
    want = fu.compose(model, model, remain=(x, y), finetune="head", epochs=2, lr=0.05, batch_size=32, mean=mean,
                      std=std, seed=3, progress=False)
    head = {"allcnn": "classifier", "resnet18": "fc", "sequential": "5", "scaled": "head"}[arch]
    changed = False
    for (k, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
        if k.startswith(head + "."):
            changed |= not torch.equal(a, before[k])
        else:
            assert torch.equal(a, before[k]), f"{k}: the backbone and its statistics stay frozen"
    assert changed, "the head was trained"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k}: the input model is not modified"
    assert all(p.requires_grad for p in got.parameters())


def test_samples_is_a_seeded_subset():
    model = trained_model("sequential")
    x, y = data(200)
    idx = remain_subset(200, 60, seed=1)
    assert idx.numel() == 60 and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 60
    assert remain_subset(200, 200, 1) is None and remain_subset(200, None, 1) is None
    a = refit_head(model, (x, y), epochs=2, lr=0.05, samples=60, seed=1)
    b = refit_head(model, (x[idx], y[idx]), epochs=2, lr=0.05, seed=1)
    c = refit_head(model, (x, y), epochs=2, lr=0.05, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[5].weight, c[5].weight)


@pytest.mark.parametrize("kw, match", [(dict(epochs=-1), "epochs"), (dict(lr=0.0), "lr"),
                                       (dict(samples=0), "samples"), (dict(epochs=True), "epochs")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        refit_head(user_sequential(), data(), **kw)


@pytest.mark.parametrize("field, value", [("head_refit_epochs", -1), ("head_refit_epochs", 1.5),
                                          ("head_refit_lr", 0.0), ("head_refit_samples", 0),
                                          ("head_refit_samples", True)])
def test_config_checks(field, value):
    with pytest.raises(ValueError, match=field):
        fu.UnlearnConfig(**{field: value})


def test_unlearn_runs_the_refit_when_the_config_says_so():
    assert fu.UnlearnConfig().head_refit_epochs == 0, "the paper's loop has no head re-fit"
    model = trained_model("sequential")
    x, y = data(200)
    f = y == 2
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    cfg = fu.UnlearnConfig(relabel="nearest_incorrect", remain_reg=1.0, lr=1e-2, epochs=2, batchnorm="frozen",
                           precision="fp32", seed=4)
    plain = fu.unlearn(model, forget, remain, config=cfg, progress=False)
    refit = fu.unlearn(model, forget, remain, config=cfg.replace(head_refit_epochs=3, head_refit_lr=0.05,
                                                                 head_refit_samples=100), progress=False)
    # The forget images go in with the labels of the run's (deterministic, single) search, as
    # many as the 100 re-fit images hold per remain class.
    from fastunlearn.head_refit import gone_classes

    kept = gone_classes(forget[0], forget[1], plain.search, remain[1], 100, 4)
    per_class = -(-100 // len(remain[1].unique()))
    assert len(forget[1]) > per_class == len(kept[1]), "the case must cut the forget rows"
    want = refit_head(plain.model, remain, forget=kept, epochs=3, lr=0.05, batch_size=128, samples=100, seed=4)
    for a, b in zip(refit.model.state_dict().values(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(refit.model[5].weight, plain.model[5].weight)
    assert refit.timings["head_refit"] > 0 and plain.timings["head_refit"] == 0
    # remain_reg 0 reads no remain set for the fine-tune, but the re-fit still needs one.
    with pytest.raises(ValueError, match="needs a remain set"):
        fu.unlearn(model, forget, config=cfg.replace(remain_reg=0.0, head_refit_epochs=1), progress=False)
    alone = fu.unlearn(model, forget, remain, config=cfg.replace(remain_reg=0.0, head_refit_epochs=1),
                       progress=False)
    without = fu.unlearn(model, forget, config=cfg.replace(remain_reg=0.0), progress=False)
    assert not torch.equal(alone.model[5].weight, without.model[5].weight)


def test_forget_rows_train_with_their_labels():
    # forget=(x, labels) is the same as those rows appended to the remain set (after its subset).
    model = trained_model("sequential")
    x, y = data(200)
    fx, fl = data(30, seed=9)
    idx = remain_subset(200, 80, seed=2)
    a = refit_head(model, (x, y), forget=(fx, fl), epochs=2, lr=0.05, samples=80, seed=2)
    b = refit_head(model, (torch.cat([x[idx], fx]), torch.cat([y[idx], fl])), epochs=2, lr=0.05, seed=2)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    # The fallback path (something after the head) takes the same rows.
    scaled = trained_model("scaled")
    c = refit_head(scaled, (x, y), forget=(fx, fl), epochs=1, lr=0.05, seed=2)
    d = fu.compose(scaled, scaled, remain=(torch.cat([x, fx]), torch.cat([y, fl])), finetune="head", epochs=1,
                   lr=0.05, batch_size=128, seed=2, progress=False)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(c.parameters(), d.parameters()))
    with pytest.raises(ValueError, match="forget images"):
        refit_head(model, (x, y), forget=(torch.rand(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)))


def test_only_forget_rows_of_classes_gone_from_the_remain_set_join_the_refit():
    from fastunlearn.engine.search import SearchResult
    from fastunlearn.head_refit import gone_classes

    fx = torch.rand(5, 3, 6, 6)
    fy = torch.tensor([2, 2, 1, 2, 3])
    search = SearchResult.__new__(SearchResult)
    search.relabels, search.targets = torch.tensor([[0, 0, 0, 0, 0], [1, 3, 0, 0, 1]]), None
    # Class 2 is gone from the remain set, classes 1 and 3 are not (a subgroup of them was forgotten).
    remain_y = torch.tensor([0, 1, 3, 1, 0, 3, 1, 0, 3])  # 3 rows per class: no cut
    x, labels = gone_classes(fx, fy, search, remain_y)
    assert torch.equal(x, fx[[0, 1, 3]]) and torch.equal(labels, torch.tensor([1, 3, 0])), "the last refresh"
    assert gone_classes(fx, fy, search, torch.tensor([1, 2, 3])) is None
    # A failed argmax search leaves a row its own class: it stays out.
    search.relabels = torch.tensor([[0, 0, 0, 0, 0], [1, 2, 0, 0, 1]])
    x, labels = gone_classes(fx, fy, search, remain_y)
    assert torch.equal(x, fx[[0, 3]]) and torch.equal(labels, torch.tensor([1, 0]))
    # Soft targets: the most likely other class, even where the class itself is the most likely.
    search.targets = torch.zeros(2, 5, 4)
    search.targets[-1] = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.5, 0.1, 0.3, 0.1], [0.0, 1.0, 0.0, 0.0],
                                       [0.2, 0.1, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    x, labels = gone_classes(fx, fy, search, remain_y)
    assert torch.equal(x, fx[[0, 1, 3]]) and torch.equal(labels, torch.tensor([1, 0, 3]))


def test_each_gone_class_keeps_as_many_rows_as_the_refit_holds_per_remain_class():
    from fastunlearn.engine.search import SearchResult
    from fastunlearn.head_refit import gone_classes

    gen = torch.Generator().manual_seed(5)
    fy = torch.cat([torch.full((40,), 7), torch.full((9,), 8), torch.full((30,), 2)])
    fy = fy[torch.randperm(len(fy), generator=gen)]
    fx = torch.rand(len(fy), 1, 4, 4, generator=gen)
    search = SearchResult.__new__(SearchResult)
    search.relabels, search.targets = torch.randint(0, 6, (2, len(fy)), generator=gen), None  # never 7 or 8
    remain_y = torch.randint(0, 7, (700,), generator=gen)  # classes 0-6, class 2 among them
    for samples, per_class in ((None, 100), (70, 10), (1000, 100), (6, 1)):
        x, labels = gone_classes(fx, fy, search, remain_y, samples, seed=3)
        rows = torch.cat([(fx == r).flatten(1).all(1).nonzero().reshape(-1) for r in x])
        assert torch.equal(rows, rows.sort().values), "rows stay in order"
        assert torch.equal(labels, search.relabels[-1][rows])
        kept = fy[rows]
        assert not (kept == 2).any(), "class 2 is still in the remain set"
        assert int((kept == 7).sum()) == min(40, per_class) and int((kept == 8).sum()) == min(9, per_class)
    a = gone_classes(fx, fy, search, remain_y, 70, seed=3)[0]
    assert torch.equal(a, gone_classes(fx, fy, search, remain_y, 70, seed=3)[0]), "seeded"
    assert not torch.equal(a, gone_classes(fx, fy, search, remain_y, 70, seed=4)[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_head_inputs_run_channels_last_and_leave_the_models_layout(layout):
    from fastunlearn.data.pixels import Normalizer
    from fastunlearn.nn.head_fit import head_inputs
    from fastunlearn.nn.layout import model_is_channels_last

    model = trained_model("allcnn").to(memory_format=layout)
    x, _ = data(70, seed=4)
    norm = Normalizer(torch.tensor([0.5, 0.4, 0.5]), torch.tensor([0.3, 0.3, 0.2]), 3, torch.device("cpu"))
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(model_is_channels_last(m)))
    feats, logits = head_inputs(model, model.classifier, x, norm, "cpu", batch_size=32)
    hook.remove()
    assert seen == [True] * 3, "the feature pass runs channels_last (3 batches)"
    assert model_is_channels_last(model) == (layout == torch.channels_last), "the layout is put back"
    with torch.no_grad():
        want = model.to(memory_format=torch.contiguous_format)(norm(x))  # x: floats in [0, 1]
    assert torch.allclose(logits, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.classifier(feats), want, rtol=1e-4, atol=1e-5)


def test_a_head_that_cannot_be_cached_is_tried_once_then_trained_through_the_backbone(monkeypatch):
    import fastunlearn.nn.head_fit as head_fit_mod

    calls = []
    real = head_fit_mod._feature_pass

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(head_fit_mod, "_feature_pass", counted)
    scaled = trained_model("scaled")  # something runs after the head: its inputs cannot stand for it
    x, y = data()
    fx, fl = data(30, seed=9)
    got = refit_head(scaled, (x, y), forget=(fx, fl), epochs=1, lr=0.05, seed=2)
    assert len(calls) == 1, "one feature pass, then the loop through the backbone"
    want = fu.compose(scaled, scaled, remain=(torch.cat([x, fx]), torch.cat([y, fl])), finetune="head", epochs=1,
                      lr=0.05, batch_size=128, seed=2, progress=False)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(got.parameters(), want.parameters()))
