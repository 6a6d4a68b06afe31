"""--skip-unreadable: a folder with a corrupt and a missing file is refused in one line before
anything is written; with the flag the job runs on the other images and the skipped rows are
listed beside its output (or printed when it writes no file)."""

import csv

import pytest
from PIL import Image

from fastunlearn.cli import main as cli
from fastunlearn.cli.common import load_splits, subset
from fastunlearn.runtime import manifest

N = 160
COMMON = ["--device", "cpu", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Digits as PNG files with a manifest; row 5 is a corrupt file and row 9 a missing one."""
    root = tmp_path_factory.mktemp("skip") / "imgs"
    root.mkdir()
    _, splits = load_splits("digits")
    x, y = subset(splits["train"], N, 0)
    rows = []
    for i in range(N):
        name = f"img{i:04d}.png"
        if i == 4:
            (root / name).write_bytes(b"not a png at all")
        elif i != 8:
            Image.fromarray(x[i, 0].numpy()).save(root / name)
        rows.append({"path": name, "label": int(y[i]), "site": "A" if i % 4 == 1 else "B"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "site"])
        w.writeheader()
        w.writerows(rows)
    return root


def _train(folder, out, *extra):
    return cli.main(["train", "--data", f"folder:{folder}", "--arch", "smallcnn", "--width", "4",
                     "--train-epochs", "1", "--out", str(out), "--no-time-estimate", *extra, *COMMON])


def _listed(path):
    with open(path, newline="") as f:
        return [(r["split"], r["path"].rsplit("/", 1)[-1], r["manifest_row"], r["reason"].split(":")[0])
                for r in csv.DictReader(f)]


WANT = [("train", "img0004.png", "5", "unreadable"), ("train", "img0008.png", "9", "missing")]


def test_without_the_flag_one_line_names_both_files_and_nothing_is_written(folder, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert _train(folder, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "img0004.png" in err and "row 5" in err and "img0008.png" in err and "row 9" in err, err
    assert "--skip-unreadable" in err and "skip_unreadable=True" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_with_the_flag_train_unlearn_and_eval_run_and_list_the_skipped(folder, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert _train(folder, model, "--skip-unreadable") == 0
    err = capsys.readouterr().err
    listed = tmp_path / "m.skipped.csv"
    assert "left out 2 image file(s)" in err and str(listed) in err, err
    assert _listed(listed) == WANT
    forgot = tmp_path / "f.safetensors"
    assert cli.main(["unlearn", "--model", str(model), "--out", str(forgot), "--data", f"folder:{folder}",
                     "--forget-rule", "site == A", "--epochs", "1", "--skip-unreadable", *COMMON]) == 0
    out = capsys.readouterr().out
    assert f"forgetting {N // 4} of {N - 2} training images" in out, out  # rows 5 and 9 were site B
    assert _listed(tmp_path / "f.skipped.csv") == WANT
    # verify rebuilds the same forget set: the flag is recorded with the data.
    assert cli.main(["verify", "--manifest", manifest.manifest_path(str(forgot)), "--device", "cpu"]) == 0
    # eval writes no file: the rows are printed.
    assert cli.main(["eval", "--model", str(forgot), "--data", f"folder:{folder}", "--forget-rule", "site == A",
                     "--skip-unreadable", *COMMON]) == 0
    err = capsys.readouterr().err
    assert "img0004.png" in err and "img0008.png" in err and "split,path,manifest_row,reason" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.safetensors", "m.manifest.json", "m.skipped.csv", "f.safetensors", "f.manifest.json", "f.skipped.csv"])


def test_the_flag_with_a_clean_folder_writes_no_list(tmp_path):
    root = tmp_path / "clean"
    root.mkdir()
    for c in range(2):
        (root / str(c)).mkdir()
        for i in range(6):
            Image.new("L", (8, 8), color=40 * c + i).save(root / str(c) / f"{i}.png")
    assert _train(root, tmp_path / "m.safetensors", "--skip-unreadable") == 0
    assert not (tmp_path / "m.skipped.csv").exists()
