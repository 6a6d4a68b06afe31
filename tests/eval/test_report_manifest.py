"""fu.report writes manifest.json beside its files, which `fastunlearn verify` accepts and
which catches a changed model file; the manifest is never half-written."""

import json
import os

import pytest
import torch

import fastunlearn as fu
from fastunlearn.cli import main as cli
from fastunlearn.data import checkpoint
from fastunlearn.nn.models import create_model
from fastunlearn.runtime import manifest

ARCH = {"name": "smallcnn", "in_channels": 1, "num_classes": 3, "width": 3}


def sets(gen):
    x = torch.randint(0, 256, (90, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (90,), generator=gen)
    f = y[:60] == 0
    return (x[:60][f], y[:60][f]), (x[:60][~f], y[:60][~f]), (x[60:], y[60:])


def model_files(tmp_path):
    paths = {}
    for seed, name in enumerate(("original", "retrain")):
        torch.manual_seed(seed)
        paths[name] = str(tmp_path / f"{name}.safetensors")
        checkpoint.save_model(create_model(**ARCH).eval(), paths[name], ARCH, mean=[0.5], std=[0.25])
    return paths


def test_report_from_python_writes_a_manifest_verify_accepts_and_a_changed_byte_fails(gen, tmp_path, capsys):
    forget, remain, test = sets(gen)
    paths = model_files(tmp_path)
    out = str(tmp_path / "rep")
    rep = fu.report(paths, forget, remain, test, out_dir=out, tsne=False, device="cpu")
    record = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert rep.paths["manifest"] == os.path.join(out, "manifest.json")
    assert record["kind"] == "report" and record["metrics"] == json.loads(json.dumps(rep.rows))
    assert record["models"]["original"] == {"path": os.path.abspath(paths["original"]),
                                            "sha256": manifest.sha256_file(paths["original"])}
    assert record["settings"]["mean"] == [0.5] and record["counts"]["test"] == 30
    assert set(record["outputs"]) >= {"csv", "json", "markdown"}
    assert cli.main(["verify", "--manifest", rep.paths["manifest"], "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "MISMATCH" not in said and "not checked: the forget set and the metrics" in said
    data = bytearray(open(paths["retrain"], "rb").read())
    data[len(data) // 2] ^= 1
    open(paths["retrain"], "wb").write(bytes(data))
    assert cli.main(["verify", "--manifest", rep.paths["manifest"], "--device", "cpu"]) == 1
    said = capsys.readouterr().out
    assert f"MISMATCH model retrain {os.path.abspath(paths['retrain'])} sha256" in said
    assert "1 MISMATCH" in said


def test_report_manifest_is_never_half_written(gen, tmp_path, monkeypatch):
    forget, remain, test = sets(gen)
    out = tmp_path / "rep"

    def half_then_fail(path, text):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text[: len(text) // 2])
            raise OSError("disk full")

        checkpoint.atomic_write(path, write)

    monkeypatch.setattr(manifest, "atomic_write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        fu.report(model_files(tmp_path), forget, remain, test, out_dir=str(out), tsne=False, device="cpu")
    assert "manifest.json" not in os.listdir(out)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
