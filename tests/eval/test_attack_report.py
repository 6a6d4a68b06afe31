"""fu.evaluate(attacks=...) and fu.report(attacks=...): the evidence is there when asked, JSON-ready,
and the default outputs are as before."""

import json
import os

import pytest
import torch
from conftest import DIGITS_MEAN, DIGITS_STD

import fastunlearn as fu
from fastunlearn.eval import baselines


@pytest.fixture(scope="module")
def digits_case(digits_model):
    model, x, y = digits_model
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    test = (x[:500], y[:500])
    rest_x, rest_y = x[500:], y[500:]
    f = rest_y == 0
    forget, remain = (rest_x[f], rest_y[f]), (rest_x[~f], rest_y[~f])
    # A head that never predicts class 0 on the original features: forgetting in the head only.
    head_only = baselines.reinitialised(model, 0)
    head_only.load_state_dict(model.state_dict())
    with torch.no_grad():
        head_only[-1].bias[0] = -1e4
    return model, head_only, forget, remain, test


def test_evaluate_default_output_is_unchanged_and_attacks_add_evidence(digits_case, one_thread):
    model, head_only, forget, remain, test = digits_case
    kw = dict(forget=forget, remain=remain, test=test, mean=DIGITS_MEAN, std=DIGITS_STD)
    plain = fu.evaluate(model, **kw)
    assert set(plain) == {"forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy"}
    out = fu.evaluate(head_only, attacks="all", attack_kw=dict(original=model), **kw)
    assert {k: out[k] for k in plain} == fu.evaluate(head_only, **kw)
    json.dumps(out)
    assert out["attacks"]["nonmember_classes"] == [0]
    assert "loss/threshold" in out["attacks"]["attacks"] and out["attacks"]["ulira"] is None
    rep = out["representation"]
    assert rep["output_forget_acc"] < 0.05 and rep["probe"]["accuracy"] > 0.9
    assert rep["cka_original"] == pytest.approx(1.0, abs=1e-6)  # the same features
    assert rep["head_only_forgetting"] is True
    only = fu.evaluate(model, forget=forget, test=test, mean=DIGITS_MEAN, std=DIGITS_STD, attacks="representation")
    assert "attacks" not in only and only["representation"]["head_only_forgetting"] is False
    with pytest.raises(ValueError, match="attacks must be one of"):
        fu.evaluate(model, forget=forget, test=test, attacks="everything")


def test_report_with_attacks_writes_the_section(digits_case, tmp_path, one_thread):
    model, head_only, forget, remain, test = digits_case
    models = {"original": model, "head only": head_only}
    plain = fu.report(models, forget, remain, test, out_dir=str(tmp_path / "plain"), retrain=None,
                      mean=DIGITS_MEAN, std=DIGITS_STD, tsne=False)
    assert not {"roc", "per_example", "attacks_csv"} & set(plain.paths)
    assert "evidence" not in json.load(open(plain.paths["json"]))
    rep = fu.report(models, forget, remain, test, out_dir=str(tmp_path / "ev"), retrain=None, mean=DIGITS_MEAN,
                    std=DIGITS_STD, tsne=False, attacks="all", attack_kw=dict(reference_models=[head_only]))
    for key in ("roc", "per_example", "attacks_csv"):
        assert os.path.getsize(rep.paths[key]) > 0
    assert rep.rows == plain.rows
    ev = json.load(open(rep.paths["json"]))["evidence"]
    assert ev["head only"]["representation"]["head_only_forgetting"] is True
    assert ev["original"]["attacks"]["ulira"]["k"] == 1
    assert "## Membership attacks" in rep.markdown and "Head-only forgetting flagged for: head only" in rep.markdown
    lines = open(rep.paths["attacks_csv"]).read().splitlines()
    assert lines[0].startswith("method,attack,accuracy,auc") and len(lines) == 1 + 2 * 10
