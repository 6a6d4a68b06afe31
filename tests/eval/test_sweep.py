"""fu.sweep: the selection rule, the Pareto front, relabel modes read off one soft search."""

import pytest
import torch

import fastunlearn as fu
from fastunlearn.engine.search import run_search
from fastunlearn.eval.sweep import SweepPoint, apply, derive_targets, pareto_front, select
from fastunlearn.nn.models import SmallCNN


def pts(*fr):
    return [SweepPoint({"i": i}, f, r, index=i) for i, (f, r) in enumerate(fr)]


def test_select_best_remain_under_the_forget_limit():
    p = pts((0.10, 0.99), (0.02, 0.90), (0.03, 0.93), (0.00, 0.80), (0.031, 0.98))
    assert select(p, max_forget_acc=0.03).index == 2
    assert select(p, max_forget_acc=0.0).index == 3
    assert select(p, max_forget_acc=0.2).index == 0


def test_select_lowest_forget_when_nothing_qualifies_and_ties():
    p = pts((0.30, 0.99), (0.20, 0.50), (0.20, 0.70), (0.25, 0.95))
    assert select(p, max_forget_acc=0.05).index == 2
    tie = pts((0.01, 0.9), (0.0, 0.9), (0.0, 0.9))
    assert select(tie, max_forget_acc=0.05).index == 1, "equal remain: lower forget, then the earlier point"


def test_select_with_a_target_forget_accuracy():
    # Partial forgetting: a retrained model would still get ~60% on the forget samples.
    p = pts((0.00, 0.95), (0.58, 0.93), (0.62, 0.90), (0.95, 0.96))
    assert select(p, target_forget_acc=0.6).index == 1
    with pytest.raises(ValueError, match="no points"):
        select([])


def test_pareto_front_is_the_non_dominated_set(gen):
    fr = torch.rand(40, 2, generator=gen).tolist()
    p = pts(*fr)
    front = pareto_front(p)
    ids = {q.index for q in front}
    for q in p:
        dominated = any(o.forget_acc <= q.forget_acc and o.remain_acc >= q.remain_acc and
                        (o.forget_acc < q.forget_acc or o.remain_acc > q.remain_acc) for o in p)
        assert (q.index in ids) == (not dominated)
    assert [q.forget_acc for q in front] == sorted(q.forget_acc for q in front)
    # Along the front, lower forget accuracy costs remain accuracy.
    assert [q.remain_acc for q in front] == sorted(q.remain_acc for q in front)


def tiny(gen, n=48, classes=4):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = SmallCNN(in_channels=1, num_classes=classes, width=4).eval()
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("mode", ["argmax", "nearest_incorrect"])
def test_derived_relabels_match_a_search_in_that_mode(mode, gen):
    model, x, y = tiny(gen)
    cfg = fu.UnlearnConfig(eps=0.05, steps=3, quantize=0, backend="torch")
    soft = run_search(model, x, y, cfg.replace(relabel="soft"))
    direct = run_search(model, x, y, cfg.replace(relabel=mode))
    derived = derive_targets(soft, y, mode)
    assert torch.equal(derived.relabels, direct.relabels)
    assert derived.targets is None


def test_soft_incorrect_targets_exclude_the_true_class(gen):
    model, x, y = tiny(gen)
    soft = run_search(model, x, y, fu.UnlearnConfig(relabel="soft", backend="torch"))
    d = derive_targets(soft, y, "soft_incorrect")
    t = d.targets[0]
    torch.testing.assert_close(t.sum(1), torch.ones(len(y)))
    assert float(t[torch.arange(len(y)), y].abs().max()) == 0.0
    with pytest.raises(ValueError, match="relabel must be"):
        derive_targets(soft, y, "random")


def test_sweep_runs_the_grid_and_returns_the_selected_point(gen):
    model, x, y = tiny(gen, n=60)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    grid = {"relabel": ["nearest_incorrect", "soft_incorrect"], "remain_reg": [1.0],
            "remain_target": ["labels"], "lr": [0.05], "epochs": [1, 2], "batchnorm": ["frozen", "train"],
            "compose": [None, "head_ft"]}
    base = fu.UnlearnConfig(batch_size=16, backend="torch")
    res = fu.sweep(model, forget, remain, max_forget_acc=0.5, grid=grid, base=base, mean=[0.5], std=[0.25], keep=1.0)
    plain = [p for p in res.points if p.settings["compose"] is None]
    assert len(plain) == 2 * 2 * 2, "keep=1 runs every fine-tune to every epoch count"
    # The head re-fit runs only for snapshots on the front of the un-composed points.
    front = {(tuple(sorted(p.settings.items()))) for p in pareto_front(plain)}
    composed = [p for p in res.points if p.settings["compose"] is not None]
    assert 1 <= len(composed) <= len(front) + 1
    assert res.spent["runs_per_rung"] == [4, 4] and res.spent["fine_tune_epochs"] == 4 * 2
    assert res.searches == 1, "one search serves every relabel mode and fine-tune setting"
    assert res.chosen is select(res.points, max_forget_acc=0.5)
    assert set(id(p) for p in res.front) <= set(id(p) for p in res.points)
    ev = fu.evaluate(res.model, forget, remain, mean=[0.5], std=[0.25], mia=False)
    assert ev["forget_acc"] == pytest.approx(res.chosen.forget_acc)
    assert ev["remain_acc"] == pytest.approx(res.chosen.remain_acc)
    assert all(set(p.settings) >= {"relabel", "remain_reg", "epochs", "batchnorm", "compose"} for p in res.points)
    assert res.config.epochs == res.chosen.settings["epochs"]
    assert all(not m._forward_pre_hooks for m in res.model.modules()), "no frozen-BatchNorm hook may leak out"
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), res.model.state_dict().values()))


def test_sweep_refuses_bad_grids(gen):
    model, x, y = tiny(gen)
    f = y == 0
    args = (model, (x[f], y[f]), (x[~f], y[~f]))
    with pytest.raises(ValueError, match="grid keys"):
        fu.sweep(*args, grid={"momentum": [0.5]})
    with pytest.raises(ValueError, match="relabel"):
        fu.sweep(*args, grid={"relabel": ["topk"]})
    with pytest.raises(ValueError, match="epochs"):
        fu.sweep(*args, grid={"epochs": [0]})
    with pytest.raises(ValueError, match="max_forget_acc"):
        fu.sweep(*args, max_forget_acc=3)


def test_select_with_each_points_own_heldout_target():
    # The second point forgets to the level it shows on unseen images of the class; the first
    # matches a fixed 0.6 only because its held-out accuracy moved too.
    p = [SweepPoint({"i": 0}, 0.60, 0.90, index=0, heldout_acc=0.40),
         SweepPoint({"i": 1}, 0.45, 0.89, index=1, heldout_acc=0.45),
         SweepPoint({"i": 2}, 0.70, 0.95, index=2, heldout_acc=0.50)]
    assert select(p, target_forget_acc=0.6).index == 0
    assert select(p, target_forget_acc="heldout").index == 1
    with pytest.raises(ValueError, match="heldout_acc"):
        select(pts((0.1, 0.9), (0.2, 0.8)), target_forget_acc="heldout")


def test_diverged_points_are_never_chosen():
    p = pts((0.0, 0.99), (0.02, 0.90), (0.5, 0.5))
    p[0].diverged = True
    assert select(p, max_forget_acc=0.03).index == 1
    assert select(p, target_forget_acc=0.0).index == 1
    assert all(not q.diverged for q in pareto_front(p))
    assert p[0].as_row()["diverged"] is True


def test_sweep_skips_a_diverged_fine_tune(gen):
    model, x, y = tiny(gen, n=60)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    grid = {"relabel": ["nearest_incorrect"], "remain_reg": [1.0], "remain_target": ["labels"],
            "lr": [1e30, 1e-3], "epochs": [2], "batchnorm": ["train"], "compose": [None]}
    res = fu.sweep(model, forget, remain, max_forget_acc=1.0, grid=grid,
                   base=fu.UnlearnConfig(batch_size=16, backend="torch"))
    assert [p.diverged for p in res.points] == [True, False], "lr 1e30 must blow the weights up"
    assert res.chosen is res.points[1]
    assert all(bool(torch.isfinite(v).all()) for v in res.model.state_dict().values() if v.is_floating_point())


def test_sweep_scores_each_point_on_the_heldout_images(gen):
    model, x, y = tiny(gen, n=80)
    f = (y == 0) & (torch.arange(len(y)) % 2 == 0)
    held = (y == 0) & ~f
    forget, remain, heldout = (x[f], y[f]), (x[~f & ~held], y[~f & ~held]), (x[held], y[held])
    grid = {"relabel": ["nearest_incorrect"], "remain_reg": [1.0], "remain_target": ["labels"], "lr": [0.05],
            "epochs": [1, 2], "batchnorm": ["frozen"], "compose": [None, "head_ft"]}
    base = fu.UnlearnConfig(batch_size=16, backend="torch")
    res = fu.sweep(model, forget, remain, heldout=heldout, grid=grid, base=base)
    assert res.rule["target_forget_acc"] == "heldout"
    assert res.chosen is select(res.points, target_forget_acc="heldout")
    ev = fu.evaluate(res.model, forget, test=heldout, mia=False)
    assert ev["test_acc"] == pytest.approx(res.chosen.heldout_acc)
    assert ev["forget_acc"] == pytest.approx(res.chosen.forget_acc)
    assert all(p.heldout_acc is not None and "heldout_acc" in p.as_row() for p in res.points)
    args = (model, forget, remain)
    with pytest.raises(ValueError, match="not both"):
        fu.sweep(*args, heldout=heldout, target_forget_acc=0.5, grid=grid, base=base)
    with pytest.raises(ValueError, match="needs heldout"):
        fu.sweep(*args, target_forget_acc="heldout", grid=grid, base=base)
    with pytest.raises(ValueError, match="target_forget_acc"):
        fu.sweep(*args, target_forget_acc="retrain", grid=grid, base=base)


def test_halving_sweep_continues_only_the_best_runs_and_resumes_exactly(gen):
    model, x, y = tiny(gen, n=96)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    grid = {"relabel": ["nearest_incorrect", "soft_incorrect", "argmax"], "remain_reg": [1.0, 3.0],
            "remain_target": ["labels"], "lr": [0.05], "epochs": [1, 3], "batchnorm": ["train"], "compose": [None]}
    base = fu.UnlearnConfig(batch_size=8, backend="torch")
    res = fu.sweep(model, forget, remain, max_forget_acc=0.5, grid=grid, base=base, keep=1 / 3)
    assert res.spent["runs_per_rung"] == [6, 2]
    assert res.spent["fine_tune_epochs"] == 6 * 1 + 2 * 2
    assert res.chosen is select(res.points, max_forget_acc=0.5)
    # The epoch-3 points were stopped at epoch 1, scored, and resumed: they must equal a
    # run made for 3 epochs in one go.
    for p in [q for q in res.points if q.settings["epochs"] == 3]:
        settings = {k: v for k, v in p.settings.items() if k != "gamma"}
        m, _ = apply(model, forget, remain, settings, base=base)
        ev = fu.evaluate(m, forget, remain, mia=False)
        assert ev["forget_acc"] == pytest.approx(p.forget_acc, abs=1e-12)
        assert ev["remain_acc"] == pytest.approx(p.remain_acc, abs=1e-12)


def test_sweep_budget_in_fine_tune_epochs_is_respected(gen):
    model, x, y = tiny(gen, n=60)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    grid = {"relabel": ["nearest_incorrect", "soft_incorrect"], "remain_reg": [1.0, 3.0], "remain_target": ["labels"],
            "lr": [0.05], "epochs": [1, 2, 4], "batchnorm": ["train"], "compose": [None]}
    base = fu.UnlearnConfig(batch_size=16, backend="torch")
    res = fu.sweep(model, forget, remain, grid=grid, base=base, keep=0.5, budget={"work": 5})
    assert res.spent["fine_tune_epochs"] <= 5
    assert res.spent["stopped_by_budget"]
    assert len(res.points) == 5  # four runs to epoch 1, then one of the two kept to epoch 2
    with pytest.raises(ValueError, match="budget"):
        fu.sweep(model, forget, remain, grid=grid, base=base, budget={"epochs": 3})


def test_sweep_result_save_writes_the_chosen_model_and_the_grid(gen, tmp_path):
    import json

    from fastunlearn.data.checkpoint import load_model
    from fastunlearn.runtime import manifest

    model, x, y = tiny(gen, n=40)
    f = y == 0
    grid = {"relabel": ["nearest_incorrect"], "remain_reg": [1.0], "remain_target": ["labels"], "lr": [0.05],
            "epochs": [1, 2], "batchnorm": ["frozen"], "compose": [None]}
    res = fu.sweep(model, (x[f], y[f]), (x[~f], y[~f]), max_forget_acc=0.5, grid=grid,
                   base=fu.UnlearnConfig(batch_size=16, backend="torch"), mean=[0.5], std=[0.25], keep=1.0)
    arch = {"name": "smallcnn", "in_channels": 1, "num_classes": 4, "width": 4}
    written = res.save(str(tmp_path / "sw"), arch, forget_indices=torch.nonzero(f).flatten(), mean=[0.5])
    path = str(tmp_path / "sw" / "model.safetensors")
    assert written == str(tmp_path / "sw" / "model.manifest.json")
    loaded, meta = load_model(path)
    for k, v in res.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.cpu()), k
    record = json.loads(open(written).read())
    assert record["kind"] == "sweep" and record["grid"]["epochs"] == [1, 2] and len(record["points"]) == 2
    assert record["metrics"]["forget_acc"] == res.chosen.forget_acc
    assert record["config"] == res.config.to_dict() == meta["config"]
    assert record["forget"]["count"] == int(f.sum())
    assert record["output"]["sha256"] == manifest.sha256_file(path)
    assert {k: v for k, v in record.items() if k != "output"} == meta["provenance"]


class _Marker(torch.nn.Module):
    """A stand-in model that only says which run and epoch count it is."""

    def __init__(self, run, epochs):
        super().__init__()
        self.run, self.epochs = run, epochs


@pytest.mark.parametrize("peak", [1, 2, 4])
def test_halving_sweep_chooses_the_full_sweeps_point_on_a_constructed_case(gen, monkeypatch, peak):
    # Every fine-tune is replaced by a table of scores (forget, remain) per (run, epochs): the
    # runs keep their order at every epoch count, and each run's remain accuracy peaks at
    # ``peak`` epochs. The halving sweep must choose the point the full sweep does, for less work.
    from fastunlearn.eval import staged
    from fastunlearn.eval import sweep as sweep_mod

    quality = {0: 0.70, 1: 0.90, 2: 0.80, 3: 0.60}  # run 1 is the best at every epoch count
    table = {(i, e): (0.0, q - 0.05 * abs(e - peak)) for i, q in quality.items() for e in (1, 2, 4)}
    advanced = []

    def advance(self, i, epochs):
        advanced.append((i, epochs))
        return _Marker(i, epochs), 0.0

    def scores(self, model):
        forget_acc, remain_acc = table[(model.run, model.epochs)]
        return forget_acc, remain_acc, None, False

    monkeypatch.setattr(staged.StagedRuns, "advance", advance)
    monkeypatch.setattr(sweep_mod._Inputs, "scores", scores)
    model, x, y = tiny(gen, n=40)
    f = y == 0
    grid = {"relabel": ["nearest_incorrect", "soft_incorrect"], "remain_reg": [3.0, 10.0],
            "remain_target": ["labels"], "epochs": [1, 2, 4]}
    kw = dict(grid=grid, base=fu.UnlearnConfig(batch_size=16, backend="torch"))
    full = fu.sweep(model, (x[f], y[f]), (x[~f], y[~f]), keep=1.0, **kw)
    assert len(advanced) == 4 * 3 and full.spent["fine_tune_epochs"] == 4 * 4
    advanced.clear()
    res = fu.sweep(model, (x[f], y[f]), (x[~f], y[~f]), **kw)
    assert res.chosen.settings == full.chosen.settings
    # Runs in grid order: (nearest_incorrect, 3), (nearest_incorrect, 10), (soft_incorrect, 3), ...
    assert (res.chosen.settings["relabel"], res.chosen.settings["remain_reg"]) == ("nearest_incorrect", 10.0)
    assert res.chosen.settings["epochs"] == peak
    assert [e for i, e in advanced if i != 1] == [1, 1, 1], "only the best run goes past epoch 1"
    assert [e for i, e in advanced if i == 1] == [1, 2, 4]
    assert res.spent["fine_tune_epochs"] == 4 + 1 + 2 < full.spent["fine_tune_epochs"]


def test_default_sweep_runs_the_recipe_at_two_remain_weights(gen):
    from fastunlearn.config import recipe_epochs

    model, x, y = tiny(gen, n=48)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    base = fu.UnlearnConfig.recommended(batch_size=4, backend="torch", head_refit_samples=20)
    res = fu.sweep(model, forget, remain, base=base, mean=[0.5], std=[0.25])
    # nearest_incorrect x remain_reg 3 / 10 on the true labels, BatchNorm frozen, lr 3e-4, for the
    # recipe's epochs of this forget set; one search; each run ends with the base's head re-fit.
    epochs = recipe_epochs(int(f.sum()), 4)
    assert res.spent["runs"] == 2 and res.spent["runs_per_rung"] == [2] and res.spent["rungs"] == [epochs]
    assert {p.settings["remain_reg"] for p in res.points} == {3.0, 10.0}
    assert {(p.settings["relabel"], p.settings["remain_target"], p.settings["batchnorm"], p.settings["lr"],
             p.settings["epochs"]) for p in res.points} == {("nearest_incorrect", "labels", "frozen", 3e-4, epochs)}
    assert res.searches == 1 and res.config.head_refit_epochs == base.head_refit_epochs > 0
    want = fu.unlearn(model, forget, remain, config=res.config, mean=[0.5], std=[0.25], progress=False).model
    for (name, a), b in zip(res.model.state_dict().items(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    # The default base is the recipe; an explicit epochs list replaces the recipe's.
    assert fu.sweep(model, forget, remain, grid={"epochs": [1]}, mean=[0.5], std=[0.25]).spent["rungs"] == [1]


def test_sweep_ends_each_run_with_the_configs_head_refit(gen):
    """base.head_refit_* is honoured as fu.unlearn honours it (each scored run ends with the
    re-fit; the chosen config reproduces the model)."""
    model, x, y = tiny(gen, n=80)
    f = y == 0
    forget, remain = (x[f], y[f]), (x[~f], y[~f])
    base = fu.UnlearnConfig(batch_size=8, backend="torch", precision="fp32", head_refit_epochs=3,
                            head_refit_samples=30, head_refit_lr=0.05)
    grid = {"relabel": ["nearest_incorrect"], "remain_reg": [1.0], "remain_target": ["labels"], "lr": [0.05],
            "epochs": [2], "batchnorm": ["frozen"], "compose": [None]}
    res = fu.sweep(model, forget, remain, max_forget_acc=1.0, grid=grid, base=base, keep=1.0)
    assert res.config.head_refit_epochs == 3 and res.config.epochs == 2
    want = fu.unlearn(model, forget, remain, config=res.config, progress=False).model
    for (name, a), b in zip(res.model.state_dict().items(), want.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    plain = fu.sweep(model, forget, remain, max_forget_acc=1.0, grid=grid, base=base.replace(head_refit_epochs=0),
                     keep=1.0)
    head = [k for k in res.model.state_dict() if k.endswith("weight")][-1]
    assert not torch.allclose(plain.model.state_dict()[head], res.model.state_dict()[head], atol=1e-4)
    others = [k for k in res.model.state_dict() if k != head and not k.startswith(head.rsplit(".", 1)[0])]
    assert all(torch.equal(plain.model.state_dict()[k], res.model.state_dict()[k]) for k in others), "head only"
