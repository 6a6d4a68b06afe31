"""--model given a saved program: a TorchScript file and a torch.export file of a small conv
net unlearn to the weights the same net gives as a model file (same weights, normalisation and
seed); the output loads again; the forms that cannot be fine-tuned are refused in one line,
saying what to do instead, before anything is written."""

import sys

import pytest
import torch

from fastunlearn.cli import main as cli
from fastunlearn.data.checkpoint import load_model, read_header
from fastunlearn.runtime import manifest

COMMON = ["--device", "cpu", "--no-progress", "--seed", "4"]
DATA = ["--data", "digits", "--train-size", "300"]
NORM = ["--mean", "0.3", "--std", "0.25"]
FACTORY = """
from torch import nn


def net(num_classes=10, bn=False):
    torch_bn = [nn.BatchNorm2d(6)] if bn else []
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), *torch_bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(96, num_classes))


def net_bn(num_classes=10):
    return net(num_classes, bn=True)
"""


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "clinic_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import clinic_nets

    yield clinic_nets
    sys.modules.pop("clinic_nets", None)


def _eager_file(tmp_path, nets, name, model):
    """The net as a model file, brought with train --train-epochs 0 (the reference)."""
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "eager.safetensors"
    assert cli.main(["train", "--model-factory", f"clinic_nets:{name}", "--weights", str(tmp_path / "w.pt"),
                     "--train-epochs", "0", "--out", str(out), *NORM, *DATA, *COMMON]) == 0
    return str(out)


def _programs(tmp_path, model):
    x = torch.rand(2, 1, 8, 8)
    script, exported = tmp_path / "net.pt", tmp_path / "net.pt2"
    torch.jit.save(torch.jit.script(model.eval()), script)
    ep = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, exported)
    return str(script), str(exported)


def _unlearn(model, out, *extra):
    return cli.main(["unlearn", "--model", model, "--out", str(out), "--forget-class", "3", "--epochs", "2",
                     "--lr", "1e-2", *extra, *DATA, *COMMON])


def _weights(path):
    model, _ = load_model(str(path))
    return [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]


def _same(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for va, vb in zip(wa, wb, strict=True):
        assert torch.allclose(va, vb, atol=1e-5), (va - vb).abs().max()


@pytest.mark.parametrize("name, batchnorm", [("net", "train"), ("net_bn", "train"), ("net_bn", "frozen")])
def test_programs_unlearn_as_the_eager_model(tmp_path, nets, name, batchnorm):
    torch.manual_seed(0)
    model = getattr(nets, name)(10)
    eager = _eager_file(tmp_path, nets, name, model)
    script, exported = _programs(tmp_path, model)
    ref = tmp_path / "ref.safetensors"
    assert _unlearn(eager, ref, "--batchnorm", batchnorm) == 0
    assert any(not torch.equal(a, b) for a, b in zip(_weights(ref), _weights(eager), strict=True))
    # TorchScript BatchNorm follows train(); an exported graph's keeps its eval mode (frozen only).
    supported = [script] if batchnorm == "train" and name == "net_bn" else (
        [exported] if name == "net_bn" else [script, exported])
    for program in supported:
        out = tmp_path / f"from_{program.rsplit('.', 1)[-1]}.safetensors"
        assert _unlearn(program, out, "--batchnorm", batchnorm, *NORM) == 0, program
        _same(out, ref)
        arch, meta = read_header(str(out))
        assert arch == {"name": "program:" + program} and meta["mean"] == [0.3]
        assert cli.main(["eval", "--model", str(out), "--forget-class", "3", *DATA, *COMMON]) == 0


@pytest.mark.parametrize("case, want", [
    ("export with BatchNorm, --batchnorm train", "--batchnorm frozen"),
    ("TorchScript with BatchNorm, --batchnorm frozen", "--batchnorm train"),
    ("export with a fixed batch size", "dynamic batch dimension"),
    ("export in train mode", "eval mode"),
    ("frozen TorchScript", "no trainable parameters"),
    ("a state_dict file", "not a safetensors model file"),
])
def test_programs_that_cannot_be_unlearned_are_refused(tmp_path, nets, capsys, case, want):
    torch.manual_seed(0)
    model = nets.net_bn(10).eval()
    x = torch.rand(2, 1, 8, 8)
    path, extra = tmp_path / "prog.pt2", []
    if case.startswith("export with BatchNorm"):
        path = _programs(tmp_path, model)[1]
    elif case.startswith("TorchScript with BatchNorm"):
        path, extra = _programs(tmp_path, model)[0], ["--batchnorm", "frozen"]
    elif case == "export with a fixed batch size":
        torch.export.save(torch.export.export(model, (x,)), path)
    elif case == "export in train mode":
        torch.export.save(torch.export.export(model.train(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},)),
                          path)
    elif case == "frozen TorchScript":
        path = tmp_path / "frozen.pt"
        torch.jit.save(torch.jit.freeze(torch.jit.script(model)), path)
    else:
        path = tmp_path / "sd.pt"
        torch.save(model.state_dict(), path)
    for p in tmp_path.glob("*.py"):
        p.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert _unlearn(str(path), tmp_path / "out.safetensors", *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # torch may add its warnings
    assert len(errors) == 1 and want in errors[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_program_file_is_never_changed(tmp_path, nets):
    torch.manual_seed(0)
    script, exported = _programs(tmp_path, nets.net(10))
    before = {p: open(p, "rb").read() for p in (script, exported)}
    for program in (script, exported):
        out = tmp_path / f"o{program[-1]}.safetensors"
        assert _unlearn(program, out) == 0
        # verify loads the output through the program it names and re-runs the metrics.
        assert cli.main(["verify", "--manifest", manifest.manifest_path(str(out)), "--device", "cpu"]) == 0
    assert all(open(p, "rb").read() == b for p, b in before.items())
