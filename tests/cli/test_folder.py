"""--data folder:DIR on the command line: the same results as the same images given as an
array file, the metadata rule read from the folder's manifest, and bad folders refused in one
line before anything is written."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from fastunlearn.cli import main as cli
from fastunlearn.cli.common import load_splits, subset
from fastunlearn.data.checkpoint import load_model
from fastunlearn.runtime import manifest

N = 480
COMMON = ["--device", "cpu", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The same digits as a PNG folder with a manifest (label, site) and as a MedMNIST .npz."""
    root = tmp_path_factory.mktemp("folder")
    _, splits = load_splits("digits")
    x, y = subset(splits["train"], N, 0)
    folder = root / "imgs"
    folder.mkdir()
    rows = []
    for i in range(N):
        name = f"img{i:04d}.png"
        Image.fromarray(x[i, 0].numpy()).save(folder / name)
        rows.append({"path": name, "label": int(y[i]), "site": "A" if i % 4 == 0 else "B"})
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "site"])
        w.writeheader()
        w.writerows(rows)
    arr = x[:, 0].numpy()
    npz = root / "same.npz"
    np.savez(npz, train_images=arr, train_labels=y.numpy()[:, None], val_images=arr[:8],
             val_labels=y.numpy()[:8, None], test_images=arr, test_labels=y.numpy()[:, None])
    model = root / "orig.safetensors"
    assert cli.main(["train", "--data", str(npz), "--arch", "smallcnn", "--width", "8", "--train-epochs", "3",
                     "--out", str(model), "--no-time-estimate", *COMMON]) == 0
    return {"folder": str(folder), "npz": str(npz), "model": str(model), "csv": str(folder / "labels.csv")}


def unlearn(images, out, data, *extra):
    return cli.main(["unlearn", "--model", images["model"], "--out", str(out), "--data", data, "--epochs", "1",
                     "--lr", "1e-3", "--forget-rule", "site == A", *extra, *COMMON])


def test_unlearn_from_a_folder_equals_the_same_images_as_tensors(images, tmp_path):
    a, b = tmp_path / "folder.safetensors", tmp_path / "tensors.safetensors"
    # The folder's rule reads its own manifest; the array file's the same CSV given as --metadata.
    assert unlearn(images, a, "folder:" + images["folder"], "--test-data", images["folder"]) == 0
    assert unlearn(images, b, images["npz"], "--metadata", images["csv"]) == 0
    ma, meta_a = load_model(str(a))
    mb, _ = load_model(str(b))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    original, _ = load_model(images["model"])
    assert any(not torch.equal(sa[k], v) for k, v in original.state_dict().items())  # it did change
    forget = meta_a["provenance"]["forget"]
    assert forget["count"] == N // 4
    assert meta_a["provenance"]["data_args"]["data"] == "folder:" + images["folder"]
    # verify rebuilds the forget set from the folder the manifest records, and re-runs the metrics.
    assert cli.main(["verify", "--manifest", manifest.manifest_path(str(a)), "--device", "cpu"]) == 0


def test_report_from_a_folder(images, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["report", "--models", images["model"], "--data", "folder:" + images["folder"], "--forget-rule",
            "site == A", "--no-tsne", "--out", str(out), *COMMON]
    assert cli.main(args + ["--test-data", images["folder"]]) == 0
    assert (out / "report.md").is_file()
    capsys.readouterr()
    assert cli.main(args[:-len(COMMON) - 2] + ["--out", str(tmp_path / "r2"), *COMMON]) == 2
    assert "--test-data" in capsys.readouterr().err


def test_eval_from_a_folder_without_a_test_set(images, capsys):
    rc = cli.main(["eval", "--model", images["model"], "--data", "folder:" + images["folder"],
                   "--forget-class", "3", *COMMON])
    assert rc == 0
    out = capsys.readouterr().out
    assert "forget" in out and "remain" in out


@pytest.mark.parametrize("case", ["missing file", "missing column", "no folder"])
def test_a_bad_folder_is_one_line_and_writes_nothing(images, tmp_path, capsys, case):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    (folder / "labels.csv").write_text("path,label\na.png,0\ngone.png,1\n")
    data, extra, want = "folder:" + str(folder), [], "gone.png"
    if case == "missing column":
        (folder / "labels.csv").write_text("path,label\na.png,0\n")
        extra, want = ["--label-column", "diagnosis"], "diagnosis"
    elif case == "no folder":
        data, want = "folder:" + str(tmp_path / "nowhere"), "nowhere"
    out = tmp_path / "u.safetensors"
    capsys.readouterr()
    rc = unlearn(images, out, data, *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and want in err and "\n" not in err, err
    assert not out.exists() and not (tmp_path / "u.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
