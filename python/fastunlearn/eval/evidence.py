"""Evidence of forgetting for fu.evaluate(..., attacks=...): the attack suite and the
representation checks of one model, as plain JSON-ready dicts. fu.evaluate is this module's
evaluate: eval.metrics.evaluate, plus that evidence when asked."""

from __future__ import annotations

from typing import Optional

import torch

from fastunlearn.data.io import as_tensors
from fastunlearn.eval import metrics
from fastunlearn.eval.attacks import attack_suite
from fastunlearn.eval.representation import representation_checks

EVIDENCE_KINDS = ("all", "suite", "representation")


def evidence(model, forget, test, *, what: str = "all", remain=None, original=None, retrain=None,
             reference_models=None, train_references_k: int = 0, reference_settings: Optional[dict] = None,
             layer: Optional[str] = None, mean=None, std=None, device=None, batch_size: int = 512, seed: int = 0,
             match_classes: bool = True, max_probe_samples: int = 4000) -> dict:
    """{"attacks": attack_suite(...).to_dict()} and / or {"representation": representation_checks(...)}.

    what: "all", "suite" (the attacks) or "representation". The representation checks run on
    the test set, the forget classes being those of the forget set; ``original`` and
    ``retrain`` (models) add CKA to them and the retrain's probe.
    """
    if what not in EVIDENCE_KINDS:
        raise ValueError(f"attacks must be one of {EVIDENCE_KINDS} (or None), got {what!r}")
    if forget is None or test is None:
        raise ValueError("attacks need the forget and the test set")
    out = {}
    if what in ("all", "suite"):
        out["attacks"] = attack_suite(model, forget, test, reference_models, remain=remain,
                                      train_references_k=train_references_k, reference_settings=reference_settings,
                                      mean=mean, std=std, device=device, batch_size=batch_size, seed=seed,
                                      match_classes=match_classes).to_dict()
    if what in ("all", "representation"):
        classes = torch.unique(as_tensors(forget, "forget")[1]).tolist()
        out["representation"] = representation_checks(model, test, classes, original=original, retrain=retrain,
                                                      layer=layer, mean=mean, std=std, device=device, seed=seed,
                                                      max_samples=max_probe_samples)
    return out


def evaluate(model, forget=None, remain=None, test=None, mean=None, std=None, device=None,
             batch_size: int = 512, per_class: bool = False, mia: bool = True, seed: int = 0,
             max_shadow: Optional[int] = None, attacks: Optional[str] = None,
             attack_kw: Optional[dict] = None) -> dict:
    """Metrics of ``model`` on the sets given (eval.metrics.evaluate: forget_acc / remain_acc /
    test_acc, mia_lr, mia_efficacy, per_class). attacks="all" (or "suite" / "representation")
    adds "attacks" (eval.attacks.attack_suite) and / or "representation"
    (eval.representation.representation_checks); attack_kw goes to ``evidence``
    (original=, retrain=, reference_models=, train_references_k=, layer=, ...).
    """
    out = metrics.evaluate(model, forget, remain, test, mean=mean, std=std, device=device, batch_size=batch_size,
                           per_class=per_class, mia=mia, seed=seed, max_shadow=max_shadow)
    if attacks is not None:
        out.update(evidence(model, forget, test, what=attacks, remain=remain, mean=mean, std=std, device=device,
                            batch_size=batch_size, seed=seed, **(attack_kw or {})))
    return out
