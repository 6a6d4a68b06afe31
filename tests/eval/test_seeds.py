"""Mean +- std over seeds: fu.report(seeds=...) and fu.sweep(seeds=...)."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import DIGITS_MEAN, DIGITS_STD

import fastunlearn as fu
from fastunlearn.eval import baselines
from fastunlearn.eval import seeds as S
from fastunlearn.nn.models import SmallCNN


def test_mean_std_and_aggregate():
    assert S.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert S.mean_std([0.5]) == (0.5, 0.0)
    rows = [{"a": {"x": 1.0, "y": 0.0, "name": "n"}}, {"a": {"x": 3.0, "y": 0.0}}]
    assert S.aggregate(rows) == {"a": {"x": 2.0, "x_std": pytest.approx(np.sqrt(2)), "y": 0.0, "y_std": 0.0}}
    with pytest.raises(ValueError, match="distinct"):
        S.check_seeds([1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        S.check_seeds([])


def test_for_seed_resolves_each_kind_of_entry():
    m0, m1 = SmallCNN(in_channels=1, num_classes=3, width=2), SmallCNN(in_channels=1, num_classes=3, width=2)
    assert S.for_seed(m0, 5, 1, 2) is m0
    assert S.for_seed([m0, m1], 5, 1, 2) is m1
    assert S.for_seed((m0, 2.5), 5, 1, 2) == (m0, 2.5)  # a (model, seconds) pair, not two seeds
    assert S.for_seed(lambda s: s * 10, 5, 1, 2) == 50
    with pytest.raises(ValueError, match="one per seed"):
        S.for_seed([m0, m1, m0], 5, 0, 2)


def test_report_over_three_seeds(digits_model, tmp_path, one_thread):
    model, x, y = digits_model
    f = y == 0
    forget, remain = (x[f][:80], y[f][:80]), (x[~f][:600], y[~f][:600])
    test = (x[~f][600:900], y[~f][600:900])
    test = (torch.cat([test[0], x[f][80:]]), torch.cat([test[1], y[f][80:]]))
    made = []

    def finetuned(seed):
        made.append(seed)
        return baselines.finetune_remain(model, remain, epochs=1, lr=0.05, seed=seed, mean=DIGITS_MEAN, std=DIGITS_STD)

    rep = fu.report({"original": model, "ft": finetuned}, forget, remain, test, out_dir=str(tmp_path), retrain="ft",
                    mean=DIGITS_MEAN, std=DIGITS_STD, tsne=False, seeds=[0, 1, 2])
    assert made == [0, 1, 2]
    table = list(csv.DictReader(open(rep.paths["csv"])))
    assert [r["method"] for r in table] == ["original", "ft"]
    assert {"forget_acc", "forget_acc_std", "mia_lr", "mia_lr_std", "gap", "gap_std"} <= set(table[0])
    per_seed = json.load(open(rep.paths["json"]))["per_seed"]
    assert sorted(per_seed) == ["0", "1", "2"]
    for method in ("original", "ft"):
        for col in ("forget_acc", "mia_lr", "test_acc"):
            vals = [per_seed[s][method][col] for s in ("0", "1", "2")]
            assert rep.rows[method][col] == pytest.approx(np.mean(vals))
            assert rep.rows[method][f"{col}_std"] == pytest.approx(np.std(vals, ddof=1))
            assert float(table[["original", "ft"].index(method)][f"{col}_std"]) == pytest.approx(
                np.std(vals, ddof=1), rel=1e-5, abs=1e-9)
    assert rep.rows["original"]["forget_acc_std"] == 0.0  # the same model under every seed
    assert rep.rows["ft"]["seconds_std"] >= 0
    for s in (0, 1, 2):
        assert os.path.exists(tmp_path / f"seed_{s}" / "table.csv")
    assert "+-" in rep.markdown and "seed 2" in rep.markdown


def test_sweep_over_seeds(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = SmallCNN(in_channels=1, num_classes=3, width=4).eval()
    x = torch.randint(0, 256, (60, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (60,), generator=gen)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    grid = {"relabel": ["nearest_incorrect"], "gamma": [0.5], "remain_reg": [1.0], "remain_target": ["labels"],
            "lr": [0.05], "epochs": [1, 2], "batchnorm": ["train"], "compose": [None]}
    base = fu.UnlearnConfig(batch_size=16, backend="torch")
    res = fu.sweep(model, forget, remain, max_forget_acc=0.5, grid=grid, base=base, seeds=[3, 4])
    one = [fu.sweep(model, forget, remain, max_forget_acc=0.5, grid=grid, base=base.replace(seed=s)) for s in (3, 4)]
    summary = res.seed_summary
    assert summary["seeds"] == [3, 4] and len(summary["points"]) == 2
    assert res.config.seed == 3
    want = [p.forget_acc for p in (o.chosen for o in one)]
    assert summary["forget_acc"][0] == pytest.approx(np.mean(want))
    for point in summary["points"]:
        accs = [next(p.remain_acc for p in o.points if p.settings == point["settings"]) for o in one]
        assert point["remain_acc"] == pytest.approx(np.mean(accs))
        assert point["remain_acc_std"] == pytest.approx(np.std(accs, ddof=1))
