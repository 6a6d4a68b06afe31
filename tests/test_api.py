"""The public API: bad input is refused before any work, the user's model is never touched."""

import copy

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu


def small_model(classes=4, channels=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, classes))


def data(gen, n=24, classes=4, channels=3, uint8=True):
    x = torch.randint(0, 256, (n, channels, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=gen)
    return (x if uint8 else x.float() / 255), y


FAST = fu.UnlearnConfig(epochs=1, batch_size=8, lr=1e-2)


def test_unlearn_returns_new_model_and_leaves_input_untouched(gen):
    model = small_model()
    model.train()
    before = copy.deepcopy(model.state_dict())
    forget, remain = data(gen), data(gen, n=40)
    res = fu.unlearn(model, forget, remain, config=FAST.replace(remain_reg=1.0), progress=False)
    assert res.model is not model
    assert model.training, "the input model's mode changed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    assert any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())
    assert res.relabels.shape == (24,) and res.success.dtype == torch.bool
    assert len(res.history) == 1 and res.seconds > 0
    assert res.backend in ("cpu", "torch")


@pytest.mark.parametrize("refresh,expected", [("once", 1), ("epoch", 3), ("iteration", 3)])
def test_refresh_modes(gen, refresh, expected):
    res = fu.unlearn(small_model(), data(gen), config=FAST.replace(epochs=3, refresh=refresh, gamma=0.1),
                     progress=False)
    assert res.search.refreshes == expected
    if expected > 1:  # fresh noise every refresh
        assert not torch.equal(res.search.margin[0], res.search.margin[1])


def test_auto_refresh_is_once_when_deterministic():
    assert fu.UnlearnConfig().refresh_mode == "once"
    assert fu.UnlearnConfig(gamma=0.1).refresh_mode == "iteration"
    assert fu.UnlearnConfig(random_start=True).refresh_mode == "iteration"


def test_boundary_relabel_matches_unlearn_first_refresh(gen):
    model = small_model()
    x, y = data(gen)
    labels, ok = fu.boundary_relabel(model, x, y, config=FAST)
    res = fu.unlearn(model, (x, y), config=FAST, progress=False)
    assert torch.equal(labels, res.relabels) and torch.equal(ok, res.success)


def test_dataset_input(gen):
    x, y = data(gen)
    ds = torch.utils.data.TensorDataset(x, y)
    a = fu.boundary_relabel(small_model(), ds, config=FAST)
    b = fu.boundary_relabel(small_model(), x, y, config=FAST)
    assert torch.equal(a[0], b[0])


# ---------------------------------------------------------------- bad input
def bad_cases(gen):
    x, y = data(gen)
    xf = x.float() / 255
    nan = xf.clone()
    nan[0, 0, 0, 0] = float("nan")

    class Flat(nn.Module):
        def forward(self, t):
            return t.mean(dim=(2, 3))[:, :1].squeeze(1)  # (N,) instead of (N, classes)

    return {
        "rank": (dict(forget=(x[:, 0], y)), ValueError, r"\(N, C, H, W\).*add a channel"),
        "label shape": (dict(forget=(x, y[:-1])), ValueError, "24 images but 23 labels"),
        "float labels": (dict(forget=(x, y.float())), TypeError, "labels must be integers"),
        "labels out of range": (dict(forget=(x, y + 10)), ValueError, r"labels must lie in \[0, 4\)"),
        "empty forget": (dict(forget=(x[:0], y[:0])), ValueError, "forget is empty"),
        "same object": (dict(forget=(x, y), remain="same"), ValueError, "same object"),
        "same images": (dict(forget=(x, y), remain=(x, y)), ValueError, "same images"),
        "nan": (dict(forget=(nan, y)), ValueError, "NaN/Inf"),
        "outside [0,1]": (dict(forget=(xf * 2 - 0.5, y)), ValueError, r"pixels in \[0, 1\].*mean/std"),
        "mean length": (dict(forget=(x, y), mean=[0.5, 0.5], std=[0.2, 0.2]), ValueError,
                        r"one value per image channel \(3\), got 2"),
        "only mean": (dict(forget=(x, y), mean=[0.5] * 3), ValueError, "both mean and std"),
        "bad model output": (dict(forget=(x, y), model=Flat()), ValueError, r"logits of shape \(N, classes\)"),
        "model not a module": (dict(forget=(x, y), model=lambda t: t), TypeError, "nn.Module"),
        "wrong image dtype": (dict(forget=(x.to(torch.int32), y)), TypeError, "float in \\[0, 1\\] or uint8"),
    }


@pytest.mark.parametrize("case", list(bad_cases(torch.Generator().manual_seed(0))))
def test_bad_input_is_refused_before_work(gen, case, monkeypatch):
    kwargs, exc, pattern = bad_cases(gen)[case]
    kwargs = dict(kwargs)
    model = kwargs.pop("model", small_model())
    if kwargs.get("remain") == "same":
        kwargs["remain"] = kwargs["forget"]
    # Any search started before the check fires would be a bug: make it loud.
    import fastunlearn.unlearner as unlearner

    monkeypatch.setattr(unlearner, "sharded_search", lambda *a, **k: pytest.fail("work started before validation"))
    with pytest.raises(exc, match=pattern):
        fu.unlearn(model, config=FAST, progress=False, **kwargs)


def test_data_on_other_device_than_model(gen, monkeypatch):
    # Images on the meta device cannot be read: any work before the check would raise torch's
    # own error instead of this one. The model probe is made loud as well.
    import fastunlearn.data.validate as validate

    monkeypatch.setattr(validate, "num_classes", lambda *a, **k: pytest.fail("the model ran before the device check"))
    x, y = data(gen)
    with pytest.raises(ValueError, match=r"forget images is on meta but the model is on cpu"):
        fu.unlearn(small_model(), (x.to("meta"), y), config=FAST, progress=False)
    with pytest.raises(ValueError, match=r"remain images is on meta but the model is on cpu"):
        fu.unlearn(small_model(), (x, y), (x.to("meta"), y), config=FAST.replace(remain_reg=1.0), progress=False)
    with pytest.raises(ValueError, match=r"forget images is on meta but the model is on cpu"):
        fu.boundary_relabel(small_model(), x.to("meta"), y, config=FAST)


def test_device_check_names_both_devices():
    # No second device needed: the check reads only .device.
    from types import SimpleNamespace

    from fastunlearn.data.validate import check_devices

    model = small_model().to("meta")
    on_gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    with pytest.raises(ValueError, match=r"forget images is on cuda:1 but the model is on meta"):
        check_devices(model, None, **{"forget images": on_gpu1})
    # Host data is streamed to the model's device chunk by chunk; device= overrides the model's.
    assert check_devices(model, None, **{"forget images": torch.zeros(1)}) == torch.device("meta")
    assert check_devices(model, "cpu", **{"forget images": on_gpu1}) == torch.device("cpu")


@pytest.mark.parametrize("field,value,pattern", [
    ("eps", 0.0, "eps must be in"), ("eps", -1.0, "eps must be in"), ("steps", 0, "steps must be an integer >= 1"),
    ("noise", "gumbel", "noise must be one of"), ("relabel", "random", "relabel must be one of"),
    ("lamda_schedule", "cos", "lamda_schedule"), ("refresh", "sometimes", "refresh"), ("lr", 0.0, "lr must be > 0"),
    ("momentum", 1.0, "momentum"), ("batch_size", 0, "batch_size"), ("remain_target", "x", "remain_target"),
    ("eps", 0.001, "one grid step"), ("gamma", -0.1, "gamma"), ("backend", "opencl", "backend"),
])
def test_config_refuses_out_of_range(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        fu.UnlearnConfig(**{field: value})


def test_remain_reg_needs_remain(gen):
    with pytest.raises(ValueError, match="needs a remain set"):
        fu.unlearn(small_model(), data(gen), config=FAST.replace(remain_reg=1.0), progress=False)


def test_interpolate_endpoints_and_midpoint():
    a, b = small_model(), small_model()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    mid = fu.interpolate(a, b, 0.5)
    for (k, pa), pb, pm in zip(a.state_dict().items(), b.state_dict().values(), mid.state_dict().values()):
        if pa.is_floating_point():
            assert torch.allclose(pm, (pa + pb) / 2), k
    assert all(torch.equal(x, y) for x, y in zip(fu.interpolate(a, b, 0.0).state_dict().values(),
                                                 a.state_dict().values()))
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        fu.interpolate(a, b, 1.5)
