"""compose / interpolate / frozen_batchnorm on several architectures, inputs never modified."""

import copy

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn.compose import frozen_batchnorm
from fastunlearn.nn.models import AllCNN, SmallCNN, head_of, resnet


def user_sequential(classes=4):
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(20, classes))


ARCHS = {
    "allcnn": lambda: AllCNN(in_channels=3, num_classes=4, width=0.05),
    "resnet18": lambda: resnet(18, num_classes=4, in_channels=3, width=4),
    "smallcnn": lambda: SmallCNN(in_channels=3, num_classes=4, width=4),
    "sequential": user_sequential,
}
HEADS = {"allcnn": "classifier", "resnet18": "fc", "smallcnn": "classifier", "sequential": "5"}


def perturbed(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=gen) * 0.1)
    return model


def states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compose_swaps_exactly_the_head(arch, gen):
    a = perturbed(ARCHS[arch](), gen)
    b = perturbed(ARCHS[arch](), gen)
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    name = head_of(a)[0]
    assert name == HEADS[arch]
    c = fu.compose(backbone=a, head=b)
    assert states_equal(a, a0) and states_equal(b, b0), "inputs must be untouched"
    head_keys = {f"{name}.{k}" for k in b.get_submodule(name).state_dict()}
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k, v in sc.items():
        want = sb[k] if k in head_keys else sa[k]
        assert torch.equal(v, want), k
    assert head_keys, "the head must own parameters"
    x = torch.rand(5, 3, 12, 12, generator=gen)
    feats = {}
    h = c.get_submodule(name).register_forward_hook(lambda m, i, o: feats.update(inp=i[0]))
    out = c.eval()(x)
    h.remove()
    ref_in = {}
    h = a.get_submodule(name).register_forward_hook(lambda m, i, o: ref_in.update(inp=i[0]))
    a.eval()(x)
    h.remove()
    torch.testing.assert_close(feats["inp"], ref_in["inp"])
    torch.testing.assert_close(out, b.get_submodule(name)(ref_in["inp"]))


@pytest.mark.parametrize("arch", ["allcnn", "sequential"])
def test_compose_head_finetune_moves_only_the_head(arch, gen):
    a = ARCHS[arch]()
    b = perturbed(ARCHS[arch](), gen)
    x = torch.randint(0, 256, (40, 3, 10, 10), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (40,), generator=gen)
    name = head_of(a)[0]
    c0 = fu.compose(a, b)
    c = fu.compose(a, b, remain=(x, y), finetune="head", epochs=2, lr=0.1, batch_size=16, progress=False)
    head_keys = {f"{name}.{k}" for k in c.get_submodule(name).state_dict()}
    moved = [k for k in head_keys if not torch.equal(c.state_dict()[k], c0.state_dict()[k])]
    assert moved, "the head must train"
    for k, v in c.state_dict().items():
        if k not in head_keys:
            assert torch.equal(v, c0.state_dict()[k]), f"{k} changed with a frozen backbone"
    full = fu.compose(a, b, remain=(x, y), finetune="full", epochs=1, lr=0.1, batch_size=16, progress=False)
    assert any(not torch.equal(v, c0.state_dict()[k]) for k, v in full.state_dict().items() if k not in head_keys)
    assert all(p.requires_grad for p in c.parameters())


def test_compose_refuses_bad_input(gen):
    a, b = ARCHS["allcnn"](), ARCHS["smallcnn"]()
    with pytest.raises(TypeError, match="same architecture"):
        fu.compose(a, b)
    with pytest.raises(ValueError, match="finetune must be"):
        fu.compose(a, ARCHS["allcnn"](), finetune="all")
    with pytest.raises(ValueError, match="needs a remain set"):
        fu.compose(a, ARCHS["allcnn"](), finetune="head")
    with pytest.raises(ValueError, match="submodule 'nope'"):
        fu.compose(a, ARCHS["allcnn"](), head_name="nope")


@pytest.mark.parametrize("arch", ["resnet18", "smallcnn"])
def test_interpolate_lerps_floats_and_keeps_counters(arch, gen):
    a, b = perturbed(ARCHS[arch](), gen), perturbed(ARCHS[arch](), gen)
    t = float(torch.rand((), generator=gen))
    m = fu.interpolate(a, b, t)
    for (k, va), vb, vm in zip(a.state_dict().items(), b.state_dict().values(), m.state_dict().values()):
        if va.is_floating_point():
            torch.testing.assert_close(vm, va + t * (vb - va), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(vm, va), k
    with pytest.raises(TypeError, match="share an architecture"):
        fu.interpolate(a, ARCHS["allcnn"](), 0.5)


def test_frozen_batchnorm_keeps_statistics_under_train_mode(gen):
    model = perturbed(ARCHS["smallcnn"](), gen)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.rand(6, 3, 8, 8, generator=gen) * 4 + 2  # far from the running statistics
    with frozen_batchnorm(model):
        model.train()
        out = model(x)
        out.sum().backward()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), f"{k} changed inside frozen_batchnorm"
    torch.testing.assert_close(out, copy.deepcopy(model).eval()(x))
    model.train()
    model(x)  # outside the block BatchNorm updates again
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_strip_frozen_batchnorm_removes_only_its_hooks(gen):
    from fastunlearn.compose import strip_frozen_batchnorm

    model = ARCHS["smallcnn"]()
    mine = model.classifier.register_forward_pre_hook(lambda m, i: None)
    with frozen_batchnorm(model):
        clone = copy.deepcopy(model)
    strip_frozen_batchnorm(clone)
    assert len(clone.classifier._forward_pre_hooks) == 1
    assert all(not m._forward_pre_hooks for n, m in clone.named_modules() if n != "classifier")
    clone.train()
    clone(torch.rand(4, 3, 8, 8, generator=gen))
    assert int(clone.features[0][1].num_batches_tracked) == 1, "BatchNorm must update again after stripping"
    mine.remove()
