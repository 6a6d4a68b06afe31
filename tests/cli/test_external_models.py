"""Any model from the command line: --model-factory package.module:function, --arch
torchvision:NAME (with a stand-in torchvision module; a clear error when the package is
missing), --num-classes and --weights; the model file records the name and loads again."""

import sys
import types

import pytest
import torch
from torch import nn

from fastunlearn.cli import main as cli
from fastunlearn.data.checkpoint import load_model, read_header

DIGITS = ["--data", "digits", "--train-size", "300", "--device", "cpu", "--no-progress", "--no-time-estimate"]
FACTORY = """
from torch import nn


def tiny(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""


def tiny(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "clinic_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "clinic_models:tiny"
    sys.modules.pop("clinic_models", None)


def test_model_factory_trains_records_and_loads_again(tmp_path, factory_module):
    out = tmp_path / "m.safetensors"
    assert cli.main(["train", "--model-factory", factory_module, "--num-classes", "12", "--train-epochs", "1",
                     "--out", str(out), *DIGITS]) == 0
    arch, meta = read_header(str(out))
    assert arch == {"name": "factory:clinic_models:tiny", "num_classes": 12}
    assert meta["provenance"]["config"]["arch"] == arch
    model, _ = load_model(str(out))
    assert isinstance(model, nn.Sequential) and model[-1].out_features == 12
    forgot = tmp_path / "f.safetensors"
    assert cli.main(["unlearn", "--model", str(out), "--out", str(forgot), "--forget-class", "3", "--epochs", "1",
                     *DIGITS[:-1]]) == 0
    assert read_header(str(forgot))[0] == arch


def test_weights_are_the_starting_point(tmp_path, factory_module):
    start = tiny(10)
    torch.save(start.state_dict(), tmp_path / "start.pt")
    out = tmp_path / "m.safetensors"
    assert cli.main(["train", "--model-factory", factory_module, "--weights", str(tmp_path / "start.pt"),
                     "--train-epochs", "1", "--train-lr", "1e-12", "--out", str(out), *DIGITS]) == 0
    model, _ = load_model(str(out))
    for k, v in start.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k


def test_weights_that_do_not_fit_are_one_line_and_write_nothing(tmp_path, factory_module, capsys):
    torch.save(tiny(3).state_dict(), tmp_path / "three.pt")
    out = tmp_path / "m.safetensors"
    rc = cli.main(["train", "--model-factory", factory_module, "--weights", str(tmp_path / "three.pt"),
                   "--out", str(out), *DIGITS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "three.pt" in err and "\n" not in err and not out.exists(), err


@pytest.mark.parametrize("spec,want", [("nowhere_module_xyz:f", "nowhere_module_xyz"), ("clinic_models:nope", "nope"),
                                       ("clinic_models", "package.module:function")])
def test_a_bad_factory_is_named(tmp_path, factory_module, capsys, spec, want):
    out = tmp_path / "m.safetensors"
    rc = cli.main(["train", "--model-factory", spec, "--out", str(out), *DIGITS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and want in err and "\n" not in err and not out.exists(), err


def test_torchvision_missing_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    out = tmp_path / "m.safetensors"
    rc = cli.main(["train", "--arch", "torchvision:resnet18", "--out", str(out), *DIGITS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "torchvision" in err and "install" in err and "\n" not in err and not out.exists(), err


def test_torchvision_arch_with_a_stand_in_module(tmp_path, monkeypatch):
    calls = []

    def get_model(name, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        if name != "tinynet":
            raise ValueError(f"Unknown model {name}")
        return tiny(**kwargs)

    models = types.ModuleType("torchvision.models")
    models.get_model = get_model
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    out = tmp_path / "m.safetensors"
    assert cli.main(["train", "--arch", "torchvision:tinynet", "--num-classes", "10", "--train-epochs", "1",
                     "--out", str(out), *DIGITS]) == 0
    assert calls[0] == ("tinynet", None, {"num_classes": 10})
    assert read_header(str(out))[0] == {"name": "torchvision:tinynet", "num_classes": 10}
    model, _ = load_model(str(out))
    assert model[-1].out_features == 10
    assert cli.main(["train", "--arch", "torchvision:nosuch", "--out", str(tmp_path / "n.safetensors"),
                     *DIGITS]) == 2
