"""Bringing a model trained elsewhere: `train --weights FILE --train-epochs 0` saves it
untrained as a model file with the user's --mean / --std, and `unlearn` on that file gives
what the Python API gives on the same model with the same normalisation and seed."""

import sys

import pytest
import torch

import fastunlearn as fu
from fastunlearn.cli import main as cli
from fastunlearn.cli.common import load_splits, subset
from fastunlearn.data.checkpoint import load_model, read_header
from fastunlearn.data.forget import by_class, split

COMMON = ["--device", "cpu", "--no-progress", "--seed", "2"]
FACTORY = """
from torch import nn


def tiny(num_classes):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, num_classes))
"""
MEAN, STD = 0.3, 0.25


@pytest.fixture
def brought(tmp_path, monkeypatch):
    """A model 'trained elsewhere': the factory's module with seeded weights, as a state_dict file."""
    (tmp_path / "site_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import site_models

    torch.manual_seed(5)
    model = site_models.tiny(10)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    yield model, str(tmp_path / "weights.pt")
    sys.modules.pop("site_models", None)


def _bring(tmp_path, weights, *extra):
    out = tmp_path / "orig.safetensors"
    rc = cli.main(["train", "--model-factory", "site_models:tiny", "--weights", weights, "--train-epochs", "0",
                   "--data", "digits", "--train-size", "300", "--out", str(out), *extra, *COMMON])
    return rc, out


def test_train_epochs_0_saves_the_weights_with_the_users_normalisation(brought, tmp_path):
    model, weights = brought
    rc, out = _bring(tmp_path, weights, "--mean", str(MEAN), "--std", str(STD))
    assert rc == 0
    saved, meta = load_model(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    assert meta["mean"] == [MEAN] and meta["std"] == [STD]
    assert meta["provenance"]["config"]["train_epochs"] == 0
    assert meta["provenance"]["config"]["weights"]["path"] == weights


def test_unlearning_a_brought_model_equals_the_api(brought, tmp_path):
    model, weights = brought
    rc, orig = _bring(tmp_path, weights, "--mean", str(MEAN), "--std", str(STD))
    assert rc == 0
    out = tmp_path / "forgot.safetensors"
    assert cli.main(["unlearn", "--model", str(orig), "--out", str(out), "--data", "digits", "--forget-class", "3",
                     "--epochs", "2", "--lr", "1e-2", *COMMON]) == 0
    got, meta = load_model(str(out))
    assert meta["mean"] == [MEAN] and meta["std"] == [STD]
    _, splits = load_splits("digits")
    x, y = subset(splits["train"], 300, 2)
    f, r = split(x, y, by_class(y, [3]))
    want = fu.unlearn(model, f, r, config=fu.UnlearnConfig(epochs=2, lr=1e-2, seed=2), mean=[MEAN], std=[STD],
                      device="cpu", progress=False).model
    for k, v in want.state_dict().items():
        assert torch.allclose(got.state_dict()[k], v, atol=1e-6), k
    assert any(not torch.equal(got.state_dict()[k], v) for k, v in model.state_dict().items())


def test_without_mean_and_std_the_training_images_statistics_are_kept(brought, tmp_path):
    rc, out = _bring(tmp_path, brought[1])
    assert rc == 0
    assert read_header(str(out))[1]["mean"] != [MEAN]


@pytest.mark.parametrize("extra, want", [
    (["--no-weights"], "--weights"),
    (["--mean", "0.1,0.2", "--std", "0.2,0.2"], "1 channel"),
    (["--mean", "0.1"], "--mean and --std together"),
    (["--mean", "a", "--std", "0.2"], "comma-separated"),
    (["--mean", "0.1", "--std", "0"], "> 0"),
])
def test_bad_bring_flags_are_one_line_and_write_nothing(brought, tmp_path, capsys, extra, want):
    if extra == ["--no-weights"]:
        out = tmp_path / "orig.safetensors"
        rc = cli.main(["train", "--arch", "smallcnn", "--train-epochs", "0", "--data", "digits", "--out", str(out),
                       *COMMON])
    else:
        rc, out = _bring(tmp_path, brought[1], *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and want in err and "\n" not in err, err
    assert not out.exists()
