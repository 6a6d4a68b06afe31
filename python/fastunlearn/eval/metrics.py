"""How well a model has forgotten: accuracies, membership-inference attacks, gap to retraining."""

from __future__ import annotations

import random
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastunlearn.data.io import as_tensors, to_float
from fastunlearn.data.validate import is_stream, resolve_device, stream
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.layout import channels_last_input, model_is_channels_last

GAP_KEYS = ("forget_acc", "remain_acc", "test_acc", "mia_lr")


# The fewest forget (and test) samples mia_lr's five-fold split can score.
MIA_MIN_SAMPLES = 5


def _channel(v, x: torch.Tensor, name: str) -> Optional[torch.Tensor]:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(-1)
    if t.numel() != x.shape[1]:
        raise ValueError(f"{name} must have one value per channel ({x.shape[1]}), got {t.numel()}")
    return t.reshape(1, -1, 1, 1)


def prepare(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """The model input for images x: float in [0, 1], then (x - mean) / std per channel when given."""
    x = to_float(x)
    m, s = _channel(mean, x, "mean"), _channel(std, x, "std")
    if m is not None:
        x = x - m
    if s is not None:
        if bool((s <= 0).any()):
            raise ValueError(f"std must be positive, got {s.flatten().tolist()}")
        x = x / s
    return x


def inference_copy(model, device=None) -> torch.nn.Module:
    """The copy of ``model`` that predict_logits runs: on ``device`` (default: where the
    model is), in eval mode, without weight gradients, each eval-mode BatchNorm that follows
    a convolution folded into it, and channels_last for convolutional models (see
    nn.frozen.frozen_copy). The same function up to float rounding, faster than the model
    as given (bench/bench_train_eval.py measures it). The model itself is not touched (not even its train/eval
    mode).

    predict_logits makes one per call; pass it this copy to predict several sets with one.
    """
    dev = resolve_device(model, device)
    if getattr(model, "_fastunlearn_inference", False) and dev == resolve_device(model):
        return model
    frozen = frozen_copy(model, dev)
    # A plain attribute (not a buffer): it marks the copy, and copies of the copy.
    object.__setattr__(frozen, "_fastunlearn_inference", True)
    return frozen


@torch.no_grad()
def predict_logits(model, x, mean=None, std=None, batch_size: int = 512, device=None) -> torch.Tensor:
    """float32 logits (N, K) on the CPU, computed in eval mode without autograd, on
    inference_copy(model) (the model itself is left as it is)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = inference_copy(model, device)
    dev = resolve_device(net, device)
    cl = model_is_channels_last(net)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = prepare(x[i:i + batch_size].to(dev, non_blocking=True), mean, std)
        if cl and xb.dim() == 4:
            xb = channels_last_input(xb)
        outs.append(net(xb).float().cpu())
    if not outs:
        raise ValueError("predict_logits: x is empty")
    return torch.cat(outs)


def _pred(logits_or_pred: torch.Tensor) -> torch.Tensor:
    return logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred


def accuracy(logits, y) -> float:
    """Fraction of samples whose argmax logit (or given prediction) equals y."""
    pred = _pred(logits)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"accuracy: {pred.shape[0]} predictions for {y.shape[0]} labels")
    if y.numel() == 0:
        raise ValueError("accuracy: no samples")
    return float((pred.cpu() == y.cpu()).double().mean())


def per_class_accuracy(logits, y) -> dict:
    """{class: accuracy} for every class present in y."""
    pred, y = _pred(logits).cpu(), y.cpu()
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"per_class_accuracy: {pred.shape[0]} predictions for {y.shape[0]} labels")
    return {int(c): float((pred[y == c] == c).double().mean()) for c in torch.unique(y).tolist()}


def per_sample_loss(logits, y) -> torch.Tensor:
    """Cross-entropy of each sample (float32, reduction none)."""
    return F.cross_entropy(logits.float(), y.to(logits.device), reduction="none")


def _as_1d(v, name: str) -> np.ndarray:
    a = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    a = a.reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    # CE can overflow to inf on a hopeless sample; a large finite value keeps the
    # classifiers defined without changing any ordering that matters.
    return np.minimum(a, 1e4)


def mia_lr(forget_losses, test_losses, n_splits: int = 5, seed: int = 0, test_size: float = 0.2) -> float:
    """Membership inference as Chen et al. / Nahass et al. report it ("MIA").

    A logistic regression on the per-sample loss separates test samples (label 0) from
    forget samples (label 1). The larger set is subsampled (seeded) to the size of the
    smaller; the score is the mean held-out accuracy over ``n_splits`` stratified shuffle
    splits. 0.5 means the forget set looks like unseen data.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    f = _as_1d(forget_losses, "forget_losses")
    t = _as_1d(test_losses, "test_losses")
    m = min(len(f), len(t))
    if m < MIA_MIN_SAMPLES:
        raise ValueError(f"mia_lr needs at least {MIA_MIN_SAMPLES} forget and {MIA_MIN_SAMPLES} test losses, "
                         f"got {len(f)} and {len(t)}")
    t, f = _balanced(t, f, m, seed)
    xs = np.concatenate([t, f]).reshape(-1, 1)
    labels = np.concatenate([np.zeros(m, dtype=np.int64), np.ones(m, dtype=np.int64)])
    cv = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed)
    scores = cross_val_score(LogisticRegression(), xs, labels, cv=cv, scoring="accuracy")
    return float(np.mean(scores))


def mia_lr_published(forget_losses, test_losses, seed: int = 2022) -> float:
    """MIA-LR exactly as the published code computes it (compat="authors" reports use it).

    The same attack as mia_lr, with their choices: the losses as float32, the larger list cut
    to the smaller's length by Python's random.sample seeded with ``seed``, the features clipped
    to [-100, 100], 5 StratifiedShuffleSplit folds with scikit-learn's default test size (0.1)
    and random_state ``seed``; the mean of the fold accuracies.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score

    f = [np.float32(v) for v in _as_1d(forget_losses, "forget_losses")]
    t = [np.float32(v) for v in _as_1d(test_losses, "test_losses")]
    if min(len(f), len(t)) < 5:
        raise ValueError(f"mia_lr_published needs at least 5 forget and 5 test losses, got {len(f)} and {len(t)}")
    pick = random.Random(seed)
    if len(f) > len(t):
        f = pick.sample(f, len(t))
    elif len(t) > len(f):
        t = pick.sample(t, len(f))
    xs = np.clip(np.array(t + f).reshape(-1, 1), -100, 100)
    labels = np.array([0] * len(t) + [1] * len(f))
    cv = StratifiedShuffleSplit(n_splits=5, random_state=seed)
    return float(np.mean(cross_val_score(LogisticRegression(), xs, labels, cv=cv, scoring="accuracy")))


def _balanced(a: np.ndarray, b: np.ndarray, m: int, seed: int):
    """a and b each cut to m values by a seeded draw without replacement (a first, then b)."""
    rng = np.random.RandomState(seed)
    if len(a) > m:
        a = a[rng.choice(len(a), m, replace=False)]
    if len(b) > m:
        b = b[rng.choice(len(b), m, replace=False)]
    return a, b


def true_class_confidence(logits, y) -> torch.Tensor:
    """Softmax probability of the true label, per sample."""
    p = torch.softmax(logits.float(), dim=1)
    return p.gather(1, y.to(p.device).reshape(-1, 1)).flatten()


def mia_efficacy_from_confidence(remain_conf, test_conf, forget_conf, seed: int = 0,
                                 max_shadow: Optional[int] = None) -> float:
    """SalUn's MIA-efficacy from true-class confidences.

    An RBF SVC (C=3, gamma='auto') is fit on a balanced shadow set, remain = member (1)
    vs test = non-member (0); the score is the fraction of forget samples it calls
    non-members. The larger shadow side is subsampled (seeded); ``max_shadow`` caps
    both sides, since the SVC fit grows quadratically: 10,000 per side takes about half a
    minute on a CPU core, 2,000 about a second.
    """
    from sklearn.svm import SVC

    r = _as_1d(remain_conf, "remain_conf")
    t = _as_1d(test_conf, "test_conf")
    fc = _as_1d(forget_conf, "forget_conf")
    if len(fc) == 0:
        raise ValueError("mia_efficacy: the forget set is empty")
    m = min(len(r), len(t))
    if max_shadow is not None:
        m = min(m, int(max_shadow))
    if m < 2:
        raise ValueError(f"mia_efficacy needs at least 2 remain and 2 test samples, got {len(r)} and {len(t)}")
    r, t = _balanced(r, t, m, seed)
    xs = np.concatenate([r, t]).reshape(-1, 1)
    labels = np.concatenate([np.ones(m), np.zeros(m)])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(xs, labels)
    return float(1.0 - clf.predict(fc.reshape(-1, 1)).mean())


def evaluation_set(data, name: str):
    """(x, y) of an evaluation set: a Dataset is read in batches as it is predicted
    (streaming.DatasetRows), never held whole."""
    return stream(data, name) if is_stream(data) else as_tensors(data, name)


def mia_efficacy(model, remain, test, forget, mean=None, std=None, device=None, batch_size: int = 512,
                 seed: int = 0, max_shadow: Optional[int] = None) -> float:
    """SalUn's MIA-efficacy of ``model``: the fraction of forget samples a confidence-based
    SVC attack (trained on remain vs test) judges not to be training members. Higher = more
    forgotten."""
    conf = {}
    net = inference_copy(model, device)
    for name, data in (("remain", remain), ("test", test), ("forget", forget)):
        x, y = evaluation_set(data, name)
        conf[name] = true_class_confidence(predict_logits(net, x, mean, std, batch_size, device), y)
    return mia_efficacy_from_confidence(conf["remain"], conf["test"], conf["forget"], seed=seed,
                                        max_shadow=max_shadow)


def evaluate(model, forget=None, remain=None, test=None, mean=None, std=None, device=None,
             batch_size: int = 512, per_class: bool = False, mia: bool = True, seed: int = 0,
             max_shadow: Optional[int] = None) -> dict:
    """Metrics of ``model`` on the sets given (each an (x, y) pair or a Dataset).

    Keys: forget_acc / remain_acc / test_acc for the sets given (fractions in [0, 1]);
    with mia=True, mia_lr when forget and test are given and mia_efficacy when all three
    are; per_class = {set: {class: accuracy}} when asked. fu.evaluate is eval.evidence.evaluate:
    this, plus the evidence of forgetting when asked.
    """
    sets = {k: v for k, v in (("forget", forget), ("remain", remain), ("test", test)) if v is not None}
    if not sets:
        raise ValueError("evaluate needs at least one of forget, remain, test")
    logits, labels = {}, {}
    net = inference_copy(model, device)
    for name, data in sets.items():
        x, y = evaluation_set(data, name)
        logits[name] = predict_logits(net, x, mean, std, batch_size, device)
        labels[name] = y.cpu()
    out = {f"{k}_acc": accuracy(logits[k], labels[k]) for k in sets}
    if mia and "forget" in sets and "test" in sets:
        # Too few samples for the attack's cross-validation: None ("n/a"), never an error,
        # so that a one-image forget set still gets its accuracies.
        enough = min(len(labels["forget"]), len(labels["test"])) >= MIA_MIN_SAMPLES
        out["mia_lr"] = mia_lr(per_sample_loss(logits["forget"], labels["forget"]),
                               per_sample_loss(logits["test"], labels["test"]), seed=seed) if enough else None
        if "remain" in sets:
            conf = {k: true_class_confidence(logits[k], labels[k]) for k in sets}
            out["mia_efficacy"] = mia_efficacy_from_confidence(conf["remain"], conf["test"], conf["forget"],
                                                               seed=seed, max_shadow=max_shadow)
    if per_class:
        out["per_class"] = {k: per_class_accuracy(logits[k], labels[k]) for k in sets}
    return out


def gap(metrics: dict, retrain_metrics: dict, keys: Sequence[str] = GAP_KEYS) -> float:
    """Mean |metrics[k] - retrain_metrics[k]| over the keys present in both."""
    # A score that too few samples could not give (None) is left out, as if absent.
    common = [k for k in keys if metrics.get(k) is not None and retrain_metrics.get(k) is not None]
    if not common:
        raise ValueError(f"gap: none of {list(keys)} is in both metric dicts (have {sorted(metrics)} and "
                         f"{sorted(retrain_metrics)})")
    return float(np.mean([abs(float(metrics[k]) - float(retrain_metrics[k])) for k in common]))
