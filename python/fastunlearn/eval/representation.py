"""Representation-level checks: has the forgotten class left the features, or only the head?

An unlearned model can stop predicting a class while its features still separate that class
from the others, so that a new head (a linear probe) recovers it at once ("Are we truly
forgetting?", UUEF). Composition swaps heads, which makes this the failure to look for.

    features(model, x)                 features at a named layer; by default the input of the head
    linear_probe(feats, target)        held-out balanced accuracy of a logistic regression (torch)
    linear_cka(a, b)                   linear CKA between two feature sets of the same samples
    representation_checks(model, ...)  the probe, CKA to the original / the retrain, and the
                                       head_only_forgetting flag

Every result is plain floats / bools / None (JSON-ready).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastunlearn.data.io import as_tensors
from fastunlearn.eval.metrics import accuracy, inference_copy, predict_logits
from fastunlearn.nn.models import head_of

# Without a retrained reference, a probe at least this far above chance (0.5, balanced
# binary) on features whose model no longer predicts the class flags head-only forgetting.
# Features of a model that never saw a class often still separate it (a retrain's probe can
# score far above chance), so this rule over-flags; give the retrain or the original.
PROBE_MARGIN_NO_REFERENCE = 0.25
# With a retrain, the probe must beat the retrain's probe by this much.
PROBE_MARGIN_VS_RETRAIN = 0.05
# With the original, features this close to its features (linear CKA) count as unchanged.
UNCHANGED_FEATURES_CKA = 0.99


def features(model, x, layer: Optional[str] = None, at: str = "input", mean=None, std=None, device=None,
             batch_size: int = 512, return_logits: bool = False):
    """(N, D) float32 CPU features of ``model`` on images ``x``, flattened per sample.

    layer: a submodule name (model.get_submodule); None is the classifier head
    (models.head_of). at: "input" or "output" of that module. The hook sits on the copy that
    predict_logits runs (the model itself is untouched); in that copy a BatchNorm that follows
    a convolution is folded into it, so such a BatchNorm's input is already normalised.
    return_logits: (features, logits).
    """
    if at not in ("input", "output"):
        raise ValueError(f"at must be 'input' or 'output', got {at!r}")
    net = inference_copy(model, device)
    name = head_of(net)[0] if layer is None else layer
    try:
        module = net.get_submodule(name)
    except AttributeError as e:
        names = [n for n, _ in net.named_modules() if n]
        raise ValueError(f"the model has no layer {name!r}; its layers are {names}") from e
    caught = []

    def hook(m, inp, out):
        t = inp[0] if at == "input" else out
        caught.append(torch.flatten(t.detach().float(), 1).contiguous().cpu())

    h = module.register_forward_hook(hook)
    try:
        logits = predict_logits(net, x, mean, std, batch_size, device)
    finally:
        h.remove()
    feats = torch.cat(caught)
    return (feats, logits) if return_logits else feats


def _center(x) -> torch.Tensor:
    t = torch.as_tensor(x).detach().cpu().double()
    if t.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    return t - t.mean(0, keepdim=True)


def _hsic_unbiased(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012)'s unbiased HSIC of two Gram matrices with zeroed diagonals."""
    n = k.shape[0]
    tl = (k * m).sum()
    return (tl + k.sum() * m.sum() / ((n - 1) * (n - 2)) - 2 * (k.sum(0) @ m.sum(0)) / (n - 2)) / (n * (n - 3))


def linear_cka(a, b, unbiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) of two (N, D1), (N, D2) feature sets of the same N
    samples, in float64. The standard estimator: ||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F) on
    column-centred features; unbiased=True uses the unbiased HSIC (Nguyen et al. 2021),
    whose value for independent features is near 0 at any N (needs N >= 4).
    Invariant to orthogonal transforms and isotropic scaling of either set."""
    x, y = _center(a), _center(b)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same samples in both sets, got {x.shape[0]} and {y.shape[0]} rows")
    if unbiased:
        if x.shape[0] < 4:
            raise ValueError(f"the unbiased CKA needs at least 4 samples, got {x.shape[0]}")
        k, m = x @ x.T, y @ y.T
        k.fill_diagonal_(0)
        m.fill_diagonal_(0)
        den = torch.sqrt(_hsic_unbiased(k, k) * _hsic_unbiased(m, m))
        return float(_hsic_unbiased(k, m) / den) if den > 0 else 0.0
    num = (y.T @ x).square().sum()
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den) if den > 0 else 0.0


def _balanced_split(target: torch.Tensor, test_fraction: float, seed: int):
    """Train / test indices with as many positives as negatives in each (seeded)."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(target).flatten(), torch.nonzero(~target).flatten()
    m = min(pos.numel(), neg.numel())
    if m < 4:
        raise ValueError(f"linear_probe needs at least 4 samples of each side, got {pos.numel()} positives and "
                         f"{neg.numel()} negatives")
    pos, neg = pos[torch.randperm(pos.numel(), generator=g)[:m]], neg[torch.randperm(neg.numel(), generator=g)[:m]]
    n_test = max(2, int(round(m * test_fraction)))
    return torch.cat([pos[n_test:], neg[n_test:]]), torch.cat([pos[:n_test], neg[:n_test]])


def linear_probe(feats, target, *, test_fraction: float = 0.3, seed: int = 0, weight_decay: float = 1e-3,
                 max_iter: int = 200) -> dict:
    """Can a linear classifier tell target samples (True) from the rest on frozen features?

    Both sides are cut to the same size (seeded) and split train / test; a logistic
    regression (L-BFGS in float64, L2 ``weight_decay``, features standardised on the train
    part) is fitted on the train part. Returns {"accuracy": held-out accuracy, "chance": 0.5,
    "n_train", "n_test"}.
    """
    x = torch.as_tensor(feats).detach().cpu().double()
    t = torch.as_tensor(target).detach().cpu().bool().reshape(-1)
    if x.dim() != 2 or x.shape[0] != t.numel():
        raise ValueError(f"linear_probe needs (N, D) features and N targets, got {tuple(x.shape)} and {t.numel()}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    tr, te = _balanced_split(t, test_fraction, seed)
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp(min=1e-8)
    xtr, xte = (x[tr] - mu) / sd, (x[te] - mu) / sd
    ytr = t[tr].double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = float(((xte @ w + b > 0) == t[te]).double().mean())
    return {"accuracy": acc, "chance": 0.5, "n_train": int(tr.numel()), "n_test": int(te.numel())}


def head_only_forgetting(output_forget_acc: float, probe_acc: float, retrain_probe_acc: Optional[float] = None,
                         cka_original: Optional[float] = None, forgotten_below: float = 0.5) -> bool:
    """The rule: the model's own head no longer recovers the forget classes (accuracy on
    them below ``forgotten_below``), yet its features still hold them: the features are
    unchanged from the original's (CKA >= UNCHANGED_FEATURES_CKA, when the original is
    known), or a linear probe recovers the classes PROBE_MARGIN_VS_RETRAIN better than on a
    retrained model's features (when that is known), or, with neither reference, the probe
    is PROBE_MARGIN_NO_REFERENCE above chance (0.5)."""
    if output_forget_acc >= forgotten_below:
        return False
    if cka_original is not None and cka_original >= UNCHANGED_FEATURES_CKA:
        return True
    if retrain_probe_acc is not None:
        return probe_acc > retrain_probe_acc + PROBE_MARGIN_VS_RETRAIN
    if cka_original is not None:
        return False
    return probe_acc > 0.5 + PROBE_MARGIN_NO_REFERENCE


def _subsample(x, y, max_samples: int, seed: int):
    if x.shape[0] <= max_samples:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return x[idx], y[idx]


def representation_checks(model, data, forget_classes: Sequence[int], *, original=None, retrain=None,
                          layer: Optional[str] = None, mean=None, std=None, device=None, seed: int = 0,
                          max_samples: int = 4000, unbiased_cka: bool = False) -> dict:
    """Probe and CKA of ``model``'s features on ``data`` (x, y), best a held-out set with
    every class (the test set), subsampled to ``max_samples`` (seeded).

    Returns {"layer", "probe", "probe_retrain", "cka_original", "cka_retrain", "cka",
    "output_forget_acc", "head_only_forgetting"}; entries needing a model not given are None.
    """
    x, y = _subsample(*as_tensors(data, "data"), max_samples, seed)
    target = torch.isin(y.cpu(), torch.as_tensor(list(forget_classes), dtype=y.dtype))
    if not bool(target.any()):
        raise ValueError(f"representation_checks: no sample of the forget classes {list(forget_classes)} in data")
    kw = dict(layer=layer, mean=mean, std=std, device=device)
    feats, logits = features(model, x, return_logits=True, **kw)
    out = {"layer": layer or "input of the head", "probe": linear_probe(feats, target, seed=seed),
           "probe_retrain": None, "cka_original": None, "cka_retrain": None,
           "cka": "linear, " + ("unbiased HSIC" if unbiased_cka else "standard (biased) HSIC"),
           "output_forget_acc": accuracy(logits[target], y[target])}
    if original is not None:
        out["cka_original"] = linear_cka(feats, features(original, x, **kw), unbiased_cka)
    if retrain is not None:
        rf = features(retrain, x, **kw)
        out["cka_retrain"] = linear_cka(feats, rf, unbiased_cka)
        out["probe_retrain"] = linear_probe(rf, target, seed=seed)
    out["head_only_forgetting"] = head_only_forgetting(
        out["output_forget_acc"], out["probe"]["accuracy"],
        None if out["probe_retrain"] is None else out["probe_retrain"]["accuracy"], out["cka_original"])
    return out
