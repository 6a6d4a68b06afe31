"""fu.report writes the table, the plots and the markdown page, with the right columns."""

import csv
import json
import os

import pytest
import torch

import fastunlearn as fu
from fastunlearn.eval.plots import front_plot, tradeoff_curves
from fastunlearn.eval.report import TABLE_COLUMNS, markdown_table
from fastunlearn.eval.sweep import SweepPoint, pareto_front
from fastunlearn.nn.models import SmallCNN

PNG = b"\x89PNG\r\n\x1a\n"


def sets(gen, classes=3):
    x = torch.randint(0, 256, (90, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (90,), generator=gen)
    f = y[:60] == 0
    tr_x, tr_y = x[:60], y[:60]
    return (tr_x[f], tr_y[f]), (tr_x[~f], tr_y[~f]), (x[60:], y[60:])


def models(seed, classes=3):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=classes, width=3).eval()


def is_png(path):
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == PNG and os.path.getsize(path) > 1000


def test_report_writes_every_file_with_the_right_columns(gen, tmp_path):
    forget, remain, test = sets(gen)
    ms = {"original": models(0), "retrain": (models(1), 12.5), "unlearned": (models(2), 0.7)}
    rep = fu.report(ms, forget, remain, test, out_dir=str(tmp_path), mean=[0.5], std=[0.3], tsne_points=30,
                    title="tiny", notes={"why": "test"},
                    tradeoff=[{"method": m, "fraction": f, "forget_acc": f / 2, "remain_acc": 0.9, "test_acc": 0.8,
                               "mia_lr": 0.5} for m in ("retrain", "ours") for f in (0.1, 0.5, 1.0)])
    with open(rep.paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    header = list(rows[0].keys())
    assert header == list(TABLE_COLUMNS) + [f"test_acc_c{c}" for c in range(3)]
    assert [r["method"] for r in rows] == list(ms)
    for r in rows:
        for c in ("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "gap"):
            assert 0 <= float(r[c]) <= 1, (c, r[c])
    assert float(rows[1]["gap"]) == 0.0, "the retrained model's gap to itself is zero"
    assert rows[0]["seconds"] == "" and float(rows[1]["seconds"]) == 12.5
    assert rows[0]["x_retrain"] == "" and float(rows[1]["x_retrain"]) == 1.0
    assert float(rows[2]["x_retrain"]) == pytest.approx(0.7 / 12.5)
    for key in ("mia_hist", "tsne", "tradeoff"):
        assert is_png(rep.paths[key]), key
    md = open(rep.paths["markdown"]).read()
    assert md == rep.markdown and "| unlearned |" in md and "| 0.06x |" in md
    for key in ("mia_hist", "tsne", "tradeoff"):
        assert f"]({os.path.basename(rep.paths[key])})" in md
    meta = json.load(open(rep.paths["json"]))
    assert meta["notes"] == {"why": "test"} and set(meta["rows"]) == set(ms)
    ev = fu.evaluate(ms["unlearned"][0], forget, remain, test, mean=[0.5], std=[0.3], max_shadow=2000)
    assert float(rows[2]["forget_acc"]) == pytest.approx(ev["forget_acc"], abs=1e-5)
    assert float(rows[2]["mia_lr"]) == pytest.approx(ev["mia_lr"], abs=1e-5)


def test_report_without_retrain_or_tsne(gen, tmp_path):
    forget, remain, test = sets(gen)
    rep = fu.report({"a": models(3)}, forget, remain, test, out_dir=str(tmp_path), retrain=None, tsne=False)
    assert "gap" not in rep.rows["a"] and "tsne" not in rep.paths
    with pytest.raises(ValueError, match="retrain='retrain' is not among"):
        fu.report({"a": models(3)}, forget, remain, test, out_dir=str(tmp_path))
    with pytest.raises(TypeError, match="nn.Module"):
        fu.report({"a": 3}, forget, remain, test, out_dir=str(tmp_path), retrain=None)


def test_markdown_table_formats_percentages():
    md = markdown_table({"m": {"forget_acc": 0.0312, "mia_lr": 0.51234, "seconds": 1.5}})
    assert "| m | 3.12 | 0.512 | 1.50 |" in md


def test_front_and_tradeoff_plots(tmp_path, gen):
    p = [SweepPoint({}, float(a), float(b)) for a, b in torch.rand(12, 2, generator=gen)]
    assert is_png(front_plot(p, str(tmp_path / "front.png"), front=pareto_front(p), chosen=p[0]))
    with pytest.raises(ValueError, match="no rows"):
        tradeoff_curves([], str(tmp_path / "t.png"))
