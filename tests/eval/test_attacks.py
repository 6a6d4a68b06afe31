import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastunlearn.eval import attacks as A


def test_roc_auc_matches_sklearn_with_ties(gen):
    from sklearn.metrics import roc_auc_score, roc_curve

    for trial in range(20):
        n = int(torch.randint(4, 300, (1,), generator=gen))
        labels = torch.randint(0, 2, (n,), generator=gen).numpy()
        labels[:2] = [0, 1]
        # Rounded scores: many ties, some between a member and a non-member.
        scores = torch.randn(n, generator=gen).mul(3).round().numpy() + 0.5 * labels * (trial % 2)
        assert A.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, thr = A.roc_curve(scores, labels)
        sf, st, sthr = roc_curve(labels, scores, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sf)
        np.testing.assert_allclose(tpr, st)
        np.testing.assert_allclose(thr[1:], sthr[1:])


def test_tpr_at_fpr_on_constructed_scores():
    neg = np.arange(1000, dtype=float)  # 1,000 non-members at 0 .. 999
    # 30 above every non-member, 20 between the top two, 10 just above the 10th highest,
    # 5 just below it, 35 below all.
    pos = np.r_[np.full(30, 1e4), np.full(20, 998.5), np.full(10, 990.5), np.full(5, 989.5), np.full(35, -1.0)]
    s = np.r_[pos, neg]
    lab = np.r_[np.ones(100), np.zeros(1000)]
    fpr, tpr, _ = A.roc_curve(s, lab)
    assert A.tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.30)
    assert A.tpr_at_fpr(fpr, tpr, 0.001) == pytest.approx(0.50)
    assert A.tpr_at_fpr(fpr, tpr, 0.009) == pytest.approx(0.60)
    assert A.tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(0.65)
    summ = A.roc_summary(s, lab)
    assert summ["tpr_at_1pct_fpr"] == pytest.approx(0.65)
    assert summ["tpr_at_0.1pct_fpr"] == pytest.approx(0.50)
    # 500 non-members cannot resolve an FPR of 0.1 %.
    few = A.roc_summary(np.r_[pos, neg[:500]], np.r_[np.ones(100), np.zeros(500)])
    assert few["tpr_at_0.1pct_fpr"] is None and few["tpr_at_1pct_fpr"] is not None


def test_roc_rejects_bad_input():
    with pytest.raises(ValueError, match="both members"):
        A.roc_auc([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        A.roc_auc([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        A.roc_auc([np.nan, 2.0], [0, 1])


def test_signals_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    s = A.signals(logits, y)
    p = torch.softmax(logits.double(), 1).numpy()
    mentr0 = -(1 - p[0, 0]) * np.log(p[0, 0]) - p[0, 1] * np.log(1 - p[0, 1]) - p[0, 2] * np.log(1 - p[0, 2])
    np.testing.assert_allclose(s["modified_entropy"][0], -mentr0, rtol=1e-12)
    mentr1 = -(2 / 3) * np.log(1 / 3) - 2 * (1 / 3) * np.log(2 / 3)
    np.testing.assert_allclose(s["modified_entropy"][1], -mentr1, rtol=1e-12)
    np.testing.assert_allclose(s["confidence"], [p[0, 0], 1 / 3], rtol=1e-12)
    np.testing.assert_allclose(s["loss"], np.log([p[0, 0], 1 / 3]), rtol=1e-6)
    np.testing.assert_allclose(s["entropy"][1], -np.log(3), rtol=1e-12)
    phi = A.logit_confidence(logits, y)
    np.testing.assert_allclose(phi, np.log([p[0, 0] / (1 - p[0, 0]), 0.5]), rtol=1e-12)
    # Finite where p_y rounds to 1 in float64.
    assert np.isfinite(A.logit_confidence(torch.tensor([[80.0, 0.0]]), torch.tensor([0]))).all()
    assert np.isfinite(A.signals(torch.tensor([[80.0, 0.0]]), torch.tensor([1]))["modified_entropy"]).all()


def test_threshold_and_logistic_attacks_on_separable_and_mixed_scores(gen):
    lab = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    sep = np.r_[np.linspace(1, 2, 200), np.linspace(-2, -1, 200)]
    t = A.threshold_attack(sep, lab)
    assert t["accuracy"] == 1.0 and t["auc"] == 1.0
    # The logistic attack learns the direction: reversed scores are just as separable for it.
    lg, held = A.logistic_attack(-sep, lab)
    assert lg["auc"] == 1.0 and held.shape == (400,)
    assert A.threshold_attack(-sep, lab)["auc"] == 0.0
    same = torch.randn(400, generator=gen).numpy()
    mixed = A.threshold_attack(same, lab)
    assert 0.35 < mixed["auc"] < 0.65 and 0.35 < mixed["accuracy"] < 0.65


def test_ulira_test_separates_shifted_members(gen):
    k, n = 4, 300
    ref_m = torch.randn(k, n, generator=gen).numpy()
    ref_n = torch.randn(k, n, generator=gen).numpy()
    member_like = ref_m.mean(0) + 3 + 0.1 * torch.randn(n, generator=gen).numpy()
    unseen = ref_n.mean(0) + 0.1 * torch.randn(n, generator=gen).numpy()
    out, z_m, z_n = A.ulira_test(member_like, unseen, ref_m, ref_n)
    assert out["auc"] > 0.95 and out["k"] == k and out["fixed_variance"] is True
    assert out["members_rejected"] > 0.8 and out["nonmembers_rejected"] < 0.2
    out0, _, _ = A.ulira_test(ref_m.mean(0) + 0.1 * torch.randn(n, generator=gen).numpy(), unseen, ref_m, ref_n)
    assert 0.35 < out0["auc"] < 0.65
    with pytest.raises(ValueError, match="same K"):
        A.ulira_test(member_like, unseen, ref_m, ref_n[:2])


def test_ulira_z_by_hand():
    # K = 2 references; per-sample means 1, 4 (members) and 2 (non-member); per-sample variances
    # (ddof 1) 2, 8 and 2, pooled 4.
    ref_m, ref_n = np.array([[0.0, 2.0], [2.0, 6.0]]), np.array([[1.0], [3.0]])
    phi_m, phi_n = np.array([3.0, 4.0]), np.array([0.0])
    out, z_m, z_n = A.ulira_test(phi_m, phi_n, ref_m, ref_n, alpha=0.2)
    np.testing.assert_allclose(z_m, [1.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(z_n, [-1.0], rtol=1e-12)
    # One-sided p-values 1 - Phi(z): 0.159 and 0.5 for the members, 0.84 for the non-member.
    assert out["fixed_variance"] is True and out["members_rejected"] == 0.5 and out["nonmembers_rejected"] == 0.0
    assert out["auc"] == 1.0
    _, z_m, z_n = A.ulira_test(phi_m, phi_n, ref_m, ref_n, fixed_variance=False)
    np.testing.assert_allclose(z_m, [2 / np.sqrt(2), 0.0], rtol=1e-12)
    np.testing.assert_allclose(z_n, [-2 / np.sqrt(2)], rtol=1e-12)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _digits():
    """The sklearn digits with fixed pixel noise: each image carries detail a model can only
    memorise, so a model trained on it is measurably more sure of it than of unseen ones."""
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1), y


FIT = dict(epochs=100, lr=0.05, batch_size=64, weight_decay=0.0, schedule="constant")


def _fit(model, x, y, seed):
    from fastunlearn.engine.train import train_classifier

    return train_classifier(model, (x, y), seed=seed, progress=False, **FIT)


@pytest.fixture(scope="module")
def digits_members(one_thread):
    """A model trained on forget + remain (it saw the forget set) and one trained on remain
    only (it did not), the digits split into forget 200 / remain 200 / test the rest."""
    x, y = _digits()
    f, r, t = (x[:200], y[:200]), (x[200:400], y[200:400]), (x[400:], y[400:])
    torch.manual_seed(0)
    base = _mlp()
    saw = _fit(base, torch.cat([f[0], r[0]]), torch.cat([f[1], r[1]]), 0)
    unseen = _fit(base, *r, 1)
    return dict(forget=f, remain=r, test=t, saw=saw, unseen=unseen, base=base)


def test_attack_suite_tells_a_model_that_saw_the_forget_set(digits_members):
    d = digits_members
    before = {k: v.clone() for k, v in d["saw"].state_dict().items()}
    d["saw"].train()
    s_in = A.attack_suite(d["saw"], d["forget"], d["test"], seed=0)
    assert d["saw"].training  # the mode and the weights are left as they were
    d["saw"].eval()
    assert all(torch.equal(before[k], v) for k, v in d["saw"].state_dict().items())
    s_out = A.attack_suite(d["unseen"], d["forget"], d["test"], seed=0)
    assert s_in.nonmember_classes is None and s_in.n_members == 200
    assert set(s_in.attacks) == {f"{sig}/{kind}" for sig in A.SIGNALS for kind in A.ATTACK_KINDS} | {"all/logistic"}
    for name in ("loss/threshold", "modified_entropy/threshold", "all/logistic"):
        assert s_in.attacks[name]["auc"] > 0.68, (name, s_in.attacks[name])
        assert abs(s_out.attacks[name]["auc"] - 0.5) < 0.1, (name, s_out.attacks[name])
        assert s_in.attacks[name]["auc"] > s_out.attacks[name]["auc"] + 0.15
    assert s_in.per_example["kind"] == "test_population" and len(s_in.per_example["score"]) == 200
    assert s_in.per_example["mean"] > s_out.per_example["mean"]
    json.dumps(s_in.to_dict())  # plain numbers only
    assert "curves" not in s_in.to_dict() and "loss/threshold" in s_in.curves


def test_attack_suite_with_reference_models(digits_members):
    d = digits_members
    refs = A.train_references(d["base"], d["remain"], 2, seed=10, **FIT)
    s_in = A.attack_suite(d["saw"], d["forget"], d["test"], reference_models=refs)
    s_out = A.attack_suite(d["unseen"], d["forget"], d["test"], reference_models=refs)
    print("u-lira", s_in.ulira, s_out.ulira)
    assert s_in.ulira["k"] == 2 and s_in.per_example["kind"] == "reference_models"
    assert s_in.ulira["auc"] > 0.75 and abs(s_out.ulira["auc"] - 0.5) < 0.12
    assert s_in.ulira["members_rejected"] > s_out.ulira["members_rejected"]
    json.dumps(s_in.to_dict())
    with pytest.raises(ValueError, match="max_samples"):
        A.train_references(d["base"], d["remain"], 1, max_samples=10)
    with pytest.raises(TypeError, match="reference_models\\[0\\]"):
        A.attack_suite(d["saw"], d["forget"], d["test"], reference_models=[3])


def test_nonmembers_of_the_forget_classes():
    ty = torch.tensor([0] * 20 + [1] * 20 + [2] * 20)
    tx = torch.arange(60.0).reshape(60, 1, 1, 1)
    x, y, classes = A._nonmembers(torch.tensor([1, 1]), tx, ty, True)
    assert classes == [1] and torch.equal(y, torch.ones(20, dtype=torch.int64))
    _, y_all, none = A._nonmembers(torch.tensor([1, 1]), tx, ty, False)
    assert none is None and y_all.numel() == 60


def test_attack_suite_trains_its_references_when_asked(digits_members):
    d = digits_members
    s = A.attack_suite(d["saw"], d["forget"], d["test"], remain=d["remain"], train_references_k=1,
                       reference_settings=FIT)
    assert s.ulira["k"] == 1 and s.per_example["kind"] == "reference_models"
    assert s.ulira["auc"] > 0.65
    with pytest.raises(ValueError, match="needs the remain set"):
        A.attack_suite(d["saw"], d["forget"], d["test"], train_references_k=1)


def test_load_references_from_files(tmp_path):
    from fastunlearn.data.checkpoint import save_model
    from fastunlearn.nn.models import create_model

    torch.manual_seed(3)
    m = create_model("smallcnn", in_channels=1, num_classes=4)
    path = tmp_path / "ref.safetensors"
    save_model(m, str(path), arch={"name": "smallcnn", "in_channels": 1, "num_classes": 4})
    loaded = A.load_references([str(path), path, m])
    assert len(loaded) == 3 and loaded[2] is m
    for r in loaded[:2]:
        assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), m.state_dict().values(), strict=True))
