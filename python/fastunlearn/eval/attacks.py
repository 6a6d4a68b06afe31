"""Membership-inference attacks on the forget set: evidence that a model no longer carries it.

Every attack asks the same question: can the forget samples (members of the original
training set) be told apart from unseen samples (non-members, drawn from the test set) by
what the model outputs on them? An attack scores each sample, higher = more member-like;
ROC AUC 0.5 means the two groups look alike. An AUC below 0.5 means the forget samples
look *less* familiar to the model than unseen data, which is itself a trace of unlearning.

Signals (Song & Mittal 2021; SalUn's evaluation), each oriented member-like = higher:
    loss              minus the cross-entropy of the true label
    confidence        softmax probability of the true label
    entropy           minus the entropy of the softmax
    modified_entropy  minus Song & Mittal's Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)

Attacks on each signal: "threshold" (the signal itself; accuracy from a threshold fitted on
the other folds) and "logistic" (a logistic regression, cross-validated, so it also learns
the direction). Each reports held-out balanced accuracy, ROC AUC and TPR at 1 % and 0.1 %
FPR (None where the non-members are too few to resolve that FPR).

With reference models that never saw the forget set (retrained without it), the offline
U-LiRA-style test compares each sample's logit-scaled confidence phi = log p_y - log(1 - p_y)
under the model with its distribution under the references (Carlini et al. 2022, offline;
Triantafillou et al. 2024): z = (phi - mean_ref) / std_ref. z is the per-example score; its
AUC over forget (members) against test samples (non-members) is the test's AUC.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from fastunlearn.data.checkpoint import load_model
from fastunlearn.data.io import as_tensors
from fastunlearn.eval.baselines import retrain
from fastunlearn.eval.metrics import inference_copy, per_sample_loss, predict_logits

SIGNALS = ("loss", "confidence", "entropy", "modified_entropy")
ATTACK_KINDS = ("threshold", "logistic")
FPR_TARGETS = (0.01, 0.001)
# A tiny probability keeps every log finite on a sample the model is certain about.
_TINY = 1e-30


def _key(fpr: float) -> str:
    return f"tpr_at_{100 * fpr:g}pct_fpr"


# ----- ROC --------------------------------------------------------------------------------------------------------


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    s, lab = s.reshape(-1), lab.reshape(-1).astype(bool)
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {lab.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if lab.all() or not lab.any():
        raise ValueError(f"ROC needs both members (label 1) and non-members (label 0), got {int(lab.sum())} "
                         f"members of {lab.size}")
    return s, lab


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting "member" for score >= threshold, one point per
    distinct score from the highest down, starting at (0, 0) with threshold +inf. Tied
    scores move together, so a tie is one diagonal step (as sklearn draws it)."""
    s, lab = _scores_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, lab = s[order], lab[order]
    last_of_value = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(lab)[last_of_value]
    fp = (last_of_value + 1) - tp
    tpr = np.r_[0.0, tp / lab.sum()]
    fpr = np.r_[0.0, fp / (~lab).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (trapezoids; a tie between a member and a non-member counts 1/2)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among ROC points whose FPR is at most ``target`` (no interpolation)."""
    if not 0 <= target <= 1:
        raise ValueError(f"target FPR must be in [0, 1], got {target!r}")
    ok = np.asarray(fpr) <= target + 1e-12
    return float(np.max(np.asarray(tpr)[ok]))


def roc_summary(scores, labels, fprs: Sequence[float] = FPR_TARGETS) -> dict:
    """{"auc", "tpr_at_<x>pct_fpr"...}: each TPR is None when there are fewer than 1 / FPR
    non-members (the FPR cannot be resolved)."""
    s, lab = _scores_labels(scores, labels)
    fpr, tpr, _ = roc_curve(s, lab)
    n_neg = int((~lab).sum())
    out = {"auc": roc_auc(s, lab)}
    for f in fprs:
        out[_key(f)] = tpr_at_fpr(fpr, tpr, f) if n_neg * f >= 1 else None
    return out


# ----- signals ----------------------------------------------------------------------------------------------------


def signals(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """{signal: (N,) float64 numpy array} for each of SIGNALS, member-like = higher."""
    logits = logits.detach().double().cpu()
    y = y.detach().cpu().reshape(-1, 1)
    logp = torch.log_softmax(logits, 1)
    p = logp.exp()
    p_y = p.gather(1, y).flatten()
    log1mp = torch.log1p(-p.clamp(max=1 - 1e-16)).clamp(min=math.log(_TINY))
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, y, False)
    mentr = -(1 - p_y) * logp.gather(1, y).flatten() - (p * log1mp * others).sum(1)
    out = {"loss": -per_sample_loss(logits, y.flatten()).double(), "confidence": p_y,
           "entropy": (p * logp).sum(1), "modified_entropy": -mentr}
    return {k: v.numpy() for k, v in out.items()}


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """phi = log p_y - log(1 - p_y), computed as z_y - logsumexp_{j != y} z_j (finite even
    where p_y rounds to 1): the statistic whose spread over models LiRA models as Gaussian."""
    logits = logits.detach().double().cpu()
    y = y.detach().cpu().reshape(-1, 1)
    z_y = logits.gather(1, y).flatten()
    others = logits.scatter(1, y, float("-inf"))
    return (z_y - torch.logsumexp(others, 1)).numpy()


# ----- attacks ----------------------------------------------------------------------------------------------------


def _folds(labels: np.ndarray, n_splits: int, seed: int) -> list:
    from sklearn.model_selection import StratifiedKFold

    k = max(2, min(n_splits, int(labels.sum()), int((~labels).sum())))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels))


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred[labels].mean() + (~pred[~labels]).mean()) / 2)


def threshold_attack(scores, labels, n_splits: int = 5, seed: int = 0) -> dict:
    """The score as the attack: ROC summary on all samples, and the held-out balanced
    accuracy of the threshold that maximises it on the other folds (placed midway between
    two distinct scores), averaged over the folds."""
    s, lab = _scores_labels(scores, labels)
    accs = []
    for tr, te in _folds(lab, n_splits, seed):
        fpr, tpr, thr = roc_curve(s[tr], lab[tr])
        i = int(np.argmax(tpr - fpr))
        # Midway to the next lower score: the margin is shared between the two sides.
        t = (thr[i] + thr[i + 1]) / 2 if 0 < i < thr.size - 1 else thr[i]
        accs.append(_balanced_accuracy(s[te] >= t, lab[te]))
    return {"accuracy": float(np.mean(accs)), **roc_summary(s, lab)}


def logistic_attack(features, labels, n_splits: int = 5, seed: int = 0) -> tuple[dict, np.ndarray]:
    """A logistic regression on standardised features (N,) or (N, F); its held-out
    probabilities (each sample scored by the model fitted on the other folds) give the
    accuracy and the ROC summary. Returns (summary, held-out scores)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    x = np.clip(x.reshape(x.shape[0], -1), -1e6, 1e6)
    lab = np.asarray(labels).astype(bool)
    held = np.empty(lab.size)
    for tr, te in _folds(lab, n_splits, seed):
        clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced"))
        clf.fit(x[tr], lab[tr])
        held[te] = clf.predict_proba(x[te])[:, 1]
    return {"accuracy": _balanced_accuracy(held >= 0.5, lab), **roc_summary(held, lab)}, held


# ----- reference models and the U-LiRA-style test -----------------------------------------------------------------


def load_references(reference_models) -> list:
    """Reference models as modules: each item an nn.Module or the path of a .safetensors
    file written by fastunlearn (data.checkpoint.save_model)."""
    out = []
    for i, r in enumerate(reference_models):
        if isinstance(r, torch.nn.Module):
            out.append(r)
        elif isinstance(r, (str, bytes)) or hasattr(r, "__fspath__"):
            out.append(load_model(r)[0])
        else:
            raise TypeError(f"reference_models[{i}] must be an nn.Module or a model file path, got {type(r).__name__}")
    return out


def train_references(model, remain, k: int, *, max_samples: int = 20000, seed: int = 0, mean=None, std=None,
                     device=None, progress: bool = False, **retrain_kw) -> list:
    """k models of ``model``'s architecture trained from scratch on ``remain`` alone (seeds
    seed .. seed + k - 1, eval.baselines.retrain's recipe): references that never saw the forget
    set. Refused above ``max_samples`` remain samples, where k retrains are a job of their own."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"train_references: k must be an integer >= 1, got {k!r}")
    n = as_tensors(remain, "remain")[0].shape[0]
    if n > max_samples:
        raise ValueError(f"train_references: the remain set has {n} samples, more than max_samples={max_samples}; "
                         "train the references apart and pass them as reference_models")
    return [retrain(model, remain, seed=seed + i, mean=mean, std=std, device=device, progress=progress,
                    **retrain_kw).model for i in range(k)]


def _gaussian_z(phi: np.ndarray, ref: np.ndarray, fixed_variance: bool) -> np.ndarray:
    """(phi - mean over references) / std over references, per sample; with fixed_variance
    one std pooled over all samples (LiRA's choice when the references are few)."""
    mu = ref.mean(0)
    var = ref.var(0, ddof=1) if ref.shape[0] > 1 else np.zeros_like(mu)
    sd = np.sqrt(var.mean()) if fixed_variance else np.sqrt(var)
    return (phi - mu) / np.maximum(sd, 1e-6)


def ulira_test(phi_members: np.ndarray, phi_nonmembers: np.ndarray, ref_members: np.ndarray,
               ref_nonmembers: np.ndarray, fixed_variance: Optional[bool] = None,
               alpha: float = 0.05) -> tuple[dict, np.ndarray, np.ndarray]:
    """Offline U-LiRA-style test from logit-scaled confidences: the model's phi per sample and
    the references' (K, N) phi. Returns (summary, z of members, z of non-members): summary
    holds the ROC summary of z over members vs non-members, K, and the share of members and
    of non-members whose one-sided p-value 1 - Phi(z) is below ``alpha`` (on non-members it
    should be about alpha)."""
    from scipy.stats import norm

    k = ref_members.shape[0]
    if k < 1 or ref_nonmembers.shape[0] != k:
        raise ValueError(f"ulira_test needs the same K >= 1 references for both sets, got {ref_members.shape[0]} and "
                         f"{ref_nonmembers.shape[0]}")
    if fixed_variance is None:
        fixed_variance = k < 8
    pooled = np.concatenate([ref_members, ref_nonmembers], 1)
    z_all = _gaussian_z(np.concatenate([phi_members, phi_nonmembers]), pooled, fixed_variance)
    z_m, z_n = z_all[:phi_members.size], z_all[phi_members.size:]
    lab = np.r_[np.ones(z_m.size, bool), np.zeros(z_n.size, bool)]
    out = roc_summary(z_all, lab)
    out.update(k=int(k), fixed_variance=bool(fixed_variance), alpha=float(alpha),
               members_rejected=float((norm.sf(z_m) < alpha).mean()),
               nonmembers_rejected=float((norm.sf(z_n) < alpha).mean()))
    return out, z_m, z_n


# ----- the suite --------------------------------------------------------------------------------------------------


@dataclass
class AttackSuite:
    """What attack_suite returns. ``to_dict()`` holds plain floats / None / lists (JSON-ready);
    ``curves`` ({attack: (fpr, tpr)} numpy arrays, for plots) stays out of it.

    attacks      {"<signal>/<threshold|logistic>": {accuracy, auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr}},
                 plus "all/logistic" on the four signals together.
    per_example  {"kind", "score": one z per forget sample, "mean", "share_above_2"}: kind
                 "reference_models" (the U-LiRA z) or "test_population" (phi against the
                 non-members' phi under the same model, when no references are given).
    ulira        the offline U-LiRA-style test (ulira_test) or None without references.
    """

    attacks: dict
    per_example: dict
    ulira: Optional[dict]
    n_members: int
    n_nonmembers: int
    nonmember_classes: Optional[list]
    curves: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("curves")
        return d


def _nonmembers(forget_y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, match_classes: bool, min_count: int = 10):
    """Test samples of the forget set's classes when match_classes and there are enough of
    them (so a class-forgetting run is judged against unseen samples of the same class),
    else the whole test set. Returns (x, y, classes or None)."""
    classes = sorted(torch.unique(forget_y).tolist())
    if match_classes and set(classes) != set(torch.unique(ty).tolist()):
        keep = torch.isin(ty, torch.tensor(classes, dtype=ty.dtype))
        if int(keep.sum()) >= min_count:
            return tx[keep], ty[keep], [int(c) for c in classes]
    return tx, ty, None


def _phi(model, x, y, mean, std, batch_size, device) -> np.ndarray:
    return logit_confidence(predict_logits(model, x, mean, std, batch_size, device), y)


def _per_example(z: np.ndarray, kind: str) -> dict:
    return {"kind": kind, "score": [float(v) for v in z], "mean": float(np.mean(z)),
            "share_above_2": float(np.mean(z > 2))}


def _signal_attacks(sig_m: dict, sig_n: dict, n_splits: int, seed: int) -> tuple[dict, dict]:
    attacks, curves = {}, {}
    lab = np.r_[np.ones(next(iter(sig_m.values())).size, bool), np.zeros(next(iter(sig_n.values())).size, bool)]
    for name in SIGNALS:
        s = np.r_[sig_m[name], sig_n[name]]
        attacks[f"{name}/threshold"] = threshold_attack(s, lab, n_splits, seed)
        curves[f"{name}/threshold"] = roc_curve(s, lab)[:2]
        attacks[f"{name}/logistic"], held = logistic_attack(s, lab, n_splits, seed)
        curves[f"{name}/logistic"] = roc_curve(held, lab)[:2]
    every = np.stack([np.r_[sig_m[k], sig_n[k]] for k in SIGNALS], 1)
    attacks["all/logistic"], held = logistic_attack(every, lab, n_splits, seed)
    curves["all/logistic"] = roc_curve(held, lab)[:2]
    return attacks, curves


def attack_suite(model, forget, test, reference_models=None, *, remain=None, train_references_k: int = 0,
                 reference_settings: Optional[dict] = None, mean=None, std=None, device=None, batch_size: int = 512,
                 seed: int = 0, n_splits: int = 5, match_classes: bool = True) -> AttackSuite:
    """Every attack on ``model``: forget samples (members) against test samples (non-members).

    reference_models: models (or model files) trained without the forget set, for the
    U-LiRA-style test and the per-example z. train_references_k > 0 trains that many on
    ``remain`` instead (train_references, small data only; reference_settings go to it).
    match_classes: compare against test samples of the forget set's classes (see _nonmembers).
    This is the U-LiRA game (forgotten samples against unseen samples of the same distribution).
    With match_classes=False on a forgotten class, the non-members are mostly other classes,
    so the U-LiRA-style AUC asks whether the class's own output is as low as the references',
    a test of the class rather than of its samples; two retrains can differ widely on it when
    the references are few.
    """
    fx, fy = as_tensors(forget, "forget")
    tx, ty = as_tensors(test, "test")
    nx, ny, classes = _nonmembers(fy.cpu(), tx, ty.cpu(), match_classes)
    if fy.numel() < 2 or ny.numel() < 2:
        raise ValueError(f"attack_suite needs at least 2 forget and 2 non-member samples, got {fy.numel()} and "
                         f"{ny.numel()}")
    net = inference_copy(model, device)
    lm = predict_logits(net, fx, mean, std, batch_size, device)
    ln = predict_logits(net, nx, mean, std, batch_size, device)
    attacks, curves = _signal_attacks(signals(lm, fy), signals(ln, ny), n_splits, seed)
    phi_m, phi_n = logit_confidence(lm, fy), logit_confidence(ln, ny)
    refs = None
    if reference_models is not None:
        refs = load_references(reference_models)
    elif train_references_k:
        if remain is None:
            raise ValueError("train_references_k > 0 needs the remain set: pass remain=(x, y)")
        refs = train_references(model, remain, train_references_k, seed=seed, mean=mean, std=std, device=device,
                                **(reference_settings or {}))
    ulira = None
    if refs:
        ref_m = np.stack([_phi(r, fx, fy, mean, std, batch_size, device) for r in refs])
        ref_n = np.stack([_phi(r, nx, ny, mean, std, batch_size, device) for r in refs])
        ulira, z_m, z_n = ulira_test(phi_m, phi_n, ref_m, ref_n)
        lab = np.r_[np.ones(z_m.size, bool), np.zeros(z_n.size, bool)]
        curves["u-lira"] = roc_curve(np.r_[z_m, z_n], lab)[:2]
        per_example = _per_example(z_m, "reference_models")
    else:
        sd = max(float(np.std(phi_n, ddof=1)), 1e-6)
        per_example = _per_example((phi_m - phi_n.mean()) / sd, "test_population")
    return AttackSuite(attacks, per_example, ulira, int(fy.numel()), int(ny.numel()), classes, curves)
