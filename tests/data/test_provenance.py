"""Model files with their provenance from the Python API: UnlearnResult.save writes the run
manifest into the file's header and beside it, through the same function as the command line,
and an error part-way leaves no file at all."""

import json
import os

import pytest
import torch

import fastunlearn as fu
from fastunlearn.cli import main as cli
from fastunlearn.data import checkpoint
from fastunlearn.data.checkpoint import load_model
from fastunlearn.data.io import load_digits
from fastunlearn.nn.models import create_model
from fastunlearn.runtime import manifest

ARCH = {"name": "smallcnn", "in_channels": 1, "num_classes": 10, "width": 8}
MEAN, STD = [0.3], [0.35]


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory):
    """(an UnlearnResult of a small CNN on the digits, the original's model file, forget indices)."""
    torch.manual_seed(0)
    model = create_model(**ARCH).eval()
    orig = str(tmp_path_factory.mktemp("orig") / "orig.safetensors")
    checkpoint.save_model(model, orig, ARCH, mean=MEAN, std=STD)
    x, y = load_digits()["train"]
    idx = list(range(0, 40, 2))
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[idx] = False
    res = fu.unlearn(model, (x[idx], y[idx]), (x[keep][:300], y[keep][:300]),
                     config=fu.UnlearnConfig(epochs=1, steps=3), mean=MEAN, std=STD, device="cpu", progress=False)
    return res, orig, idx


def test_save_round_trip_records_the_provenance_in_the_file_and_beside_it(tmp_path, unlearned):
    res, orig, idx = unlearned
    path = str(tmp_path / "u.safetensors")
    written = res.save(path, ARCH, input_model=orig, forget_indices=idx, metrics={"forget_acc": 0.25},
                       mean=MEAN, std=STD)
    assert written == manifest.manifest_path(path) == str(tmp_path / "u.manifest.json")
    model, meta = load_model(path)
    for k, v in res.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.cpu()), k
    prov = meta["provenance"]
    assert meta["config"] == res.config.to_dict() == prov["config"]
    assert meta["mean"] == MEAN and prov["kind"] == "unlearn"
    assert prov["forget"] == {"count": 20, "indices_sha256": manifest.sha256_indices(idx)}
    assert prov["input_model"]["sha256"] == manifest.sha256_file(orig)
    assert prov["counts"]["forget"] == 20 and prov["metrics"] == {"forget_acc": 0.25}
    beside = json.loads(open(written).read())
    assert beside["output"] == {"path": os.path.abspath(path), "sha256": manifest.sha256_file(path)}
    assert {k: v for k, v in beside.items() if k != "output"} == prov


def test_verify_accepts_a_saved_result_and_catches_one_changed_byte(tmp_path, unlearned, capsys):
    res, orig, idx = unlearned
    path = str(tmp_path / "u.safetensors")
    written = res.save(path, ARCH, input_model=orig, forget_indices=idx)
    assert cli.main(["verify", "--manifest", written, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "not checked: the forget set and the metrics" in out
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    open(path, "wb").write(bytes(data))
    assert cli.main(["verify", "--manifest", written, "--device", "cpu"]) == 1
    assert "MISMATCH output" in capsys.readouterr().out


def _fail(*args, **kwargs):
    raise OSError("disk full")


def _half_write(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(b"\0" * 64)
    raise OSError("disk full")


@pytest.mark.parametrize("where", ["model", "manifest"])
def test_an_error_mid_write_leaves_no_file(tmp_path, unlearned, monkeypatch, where):
    res, orig, idx = unlearned
    if where == "model":
        monkeypatch.setattr(checkpoint, "save_file", _half_write)
    else:
        monkeypatch.setattr(manifest, "record_beside", _fail)
    with pytest.raises(OSError, match="disk full"):
        res.save(str(tmp_path / "u.safetensors"), ARCH, input_model=orig)
    assert os.listdir(tmp_path) == []


def test_an_error_mid_write_keeps_the_previous_files(tmp_path, unlearned, monkeypatch):
    res, orig, idx = unlearned
    path = str(tmp_path / "u.safetensors")
    written = res.save(path, ARCH)
    before = {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)}
    monkeypatch.setattr(manifest, "record_beside", _fail)
    with pytest.raises(OSError):
        res.save(path, ARCH, input_model=orig)
    assert {p: open(tmp_path / p, "rb").read() for p in os.listdir(tmp_path)} == before
    assert sorted(before) == sorted([os.path.basename(path), os.path.basename(written)])
