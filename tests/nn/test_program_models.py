"""nn.programs: which files are programs, the TorchScript wrapper's copies, the BatchNorm modes
each form allows, and the library's unlearn on a loaded program against the eager module."""

import copy

import pytest
import torch
from torch import nn

import fastunlearn as fu
from fastunlearn.nn.programs import EXPORT, TORCHSCRIPT, ScriptedModel, batchnorm_modes, load_program, program_kind


def net(bn: bool):
    torch.manual_seed(0)
    mid = [nn.BatchNorm2d(4)] if bn else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *mid, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3)).eval()


def save_both(tmp_path, model):
    script, exported = str(tmp_path / "m.pt"), str(tmp_path / "m.pt2")
    torch.jit.save(torch.jit.script(model), script)
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), exported)
    return script, exported


def test_program_kind(tmp_path):
    script, exported = save_both(tmp_path, net(False))
    torch.save(net(False).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "t.txt").write_text("x")
    assert program_kind(script) == TORCHSCRIPT and program_kind(exported) == EXPORT
    assert program_kind(str(tmp_path / "sd.pt")) is None and program_kind(str(tmp_path / "t.txt")) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_program(str(tmp_path / "gone.pt"))


def test_the_wrapper_copies_into_trainable_leaves():
    m = ScriptedModel(torch.jit.script(nn.Sequential(nn.Linear(3, 2))))
    c = copy.deepcopy(m)
    assert all(p.is_leaf and p.requires_grad for p in c.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(c.parameters(), m.parameters(), strict=True))
    with torch.no_grad():
        next(c.parameters()).add_(1.0)
    assert not torch.equal(next(c.parameters()), next(m.parameters()))  # a copy, not a view


def test_batchnorm_modes(tmp_path):
    for bn, want in ((False, (("train", "frozen"), ("train", "frozen"))), (True, (("train",), ("frozen",)))):
        script, exported = save_both(tmp_path, net(bn))
        assert (batchnorm_modes(load_program(script)), batchnorm_modes(load_program(exported))) == want, bn


@pytest.mark.parametrize("bn, batchnorm, form", [(False, "train", 0), (False, "train", 1), (True, "train", 0),
                                                 (True, "frozen", 1)])
def test_unlearn_on_a_program_equals_the_eager_module(tmp_path, bn, batchnorm, form):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
    cfg = fu.UnlearnConfig(epochs=1, lr=1e-2, batch_size=8, seed=1, batchnorm=batchnorm)
    run = lambda m: fu.unlearn(m, (x[:10], y[:10]), (x[10:], y[10:]), config=cfg, device="cpu",  # noqa: E731
                               progress=False).model
    want = [v for k, v in run(net(bn)).state_dict().items() if "num_batches" not in k]
    program = load_program(save_both(tmp_path, net(bn))[form])
    before = [v.clone() for v in program.state_dict().values()]
    got = [v for k, v in run(program).state_dict().items() if "num_batches" not in k]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert all(torch.equal(a, b) for a, b in zip(program.state_dict().values(), before, strict=True))  # not in place
