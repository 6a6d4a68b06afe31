"""bench/zoo.py: every model of the zoo builds, runs a forward and a backward at a tiny size,
and every entry's flags parse in every bench that runs it."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))

import zoo  # noqa: E402

# (name, channels, size): the entry's input, shrunk where the model allows it.
TINY = [("clinic-cnn", 1, 12), ("resnet18-cifar", 3, 8), ("resnet50", 3, 32), ("vit-tiny", 3, 8)]


@pytest.mark.parametrize("name,channels,size", TINY)
def test_model_forward_backward(name, channels, size):
    torch.manual_seed(0)
    model = zoo.build(name, channels, 7, size)
    x = torch.randn(3, channels, size, size, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 7)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name,channels,size", TINY)
def test_head_is_found(name, channels, size):
    """fastunlearn finds each model's linear head, whatever its name."""
    from fastunlearn.nn.models import head_of

    model = zoo.build(name, channels, 7, size)
    _, head = head_of(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7


def test_vit_rejects_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of patch"):
        zoo.TinyViT(image_size=30)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.build("lenet", 1, 10, 28)
    with pytest.raises(SystemExit, match="unknown entries"):
        zoo.selected("allcnn-w1,lenet")


@pytest.mark.parametrize("bench", ["search", "e2e", "revision"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_entry_flags_parse(bench, device):
    import bench_e2e
    import bench_revision
    import bench_search

    parse = {"search": bench_search.parse, "e2e": bench_e2e.parse, "revision": bench_revision.parse}[bench]
    for name in zoo.NAMES:
        args = parse(zoo.zoo_argv(name, bench, device) + ["--device", device])
        assert args.arch in ("allcnn",) or zoo.is_zoo_arch(args.arch)
        assert args.zoo is None
    resnet50 = parse(zoo.zoo_argv("resnet50", bench, device))
    assert resnet50.size == (zoo.RESNET50_CPU_SIZE if device == "cpu" else zoo.RESNET50_SIZE[(device, bench)])


def test_strip_drops_flags_and_their_values():
    argv = ["--zoo", "--n", "8", "--csv", "a.csv", "--zoo=vit-tiny", "--reps", "2", "--zoo", "clinic-cnn"]
    assert zoo._strip(argv, ("--zoo", "--csv")) == ["--n", "8", "--reps", "2"]
