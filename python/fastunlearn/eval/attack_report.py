"""The attack and representation section of fu.report(..., attacks="all").

For every model: the attack suite (forget vs unseen test samples), and the representation
checks on the test set against the original and the retrained model when the report has
them. Reference models for the U-LiRA-style test are loaded or trained once and shared by
every model. Writes attacks.csv (one row per model and attack), roc.png (log-FPR ROC curves),
per_example.png (per-example score histograms), and returns the markdown section.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.data.io import as_tensors
from fastunlearn.eval.attack_plots import per_example_histograms, roc_curves
from fastunlearn.eval.attacks import attack_suite, load_references, train_references
from fastunlearn.eval.evidence import EVIDENCE_KINDS
from fastunlearn.eval.representation import UNCHANGED_FEATURES_CKA, representation_checks

ATTACK_CSV_COLUMNS = ("method", "attack", "accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


@dataclass
class AttackSection:
    evidence: dict  # {model name: {"attacks": ..., "representation": ...}}, JSON-ready
    paths: dict = field(default_factory=dict)
    markdown: str = ""


def _references(models: dict, remain, reference_models, train_references_k, reference_settings, retrain_key,
                mean, std, device, seed):
    if reference_models is not None:
        return load_references(reference_models)
    if train_references_k:
        if remain is None:
            raise ValueError("train_references_k needs the remain set")
        base = models[retrain_key] if retrain_key in models else next(iter(models.values()))
        return train_references(base, remain, train_references_k, seed=seed + 1000, mean=mean, std=std,
                                device=device, **(reference_settings or {}))
    return None


def attack_section(models: dict, forget, remain, test, out_dir: str, *, what: str = "all",
                   retrain: Optional[str] = "retrain", original: Optional[str] = "original", reference_models=None,
                   train_references_k: int = 0, reference_settings: Optional[dict] = None,
                   layer: Optional[str] = None, mean=None, std=None, device=None, seed: int = 0,
                   match_classes: bool = True) -> AttackSection:
    """Score every model of {name: nn.Module}; see the module docstring for the files."""
    if what not in EVIDENCE_KINDS:
        raise ValueError(f"attacks must be one of {EVIDENCE_KINDS}, got {what!r}")
    refs = _references(models, remain, reference_models, train_references_k, reference_settings, retrain, mean, std,
                       device, seed) if what in ("all", "suite") else None
    classes = torch.unique(as_tensors(forget, "forget")[1]).tolist()
    evidence, curves, scores = {}, {}, {}
    for name, model in models.items():
        ev = {}
        if what in ("all", "suite"):
            suite = attack_suite(model, forget, test, refs, mean=mean, std=std, device=device, seed=seed,
                                 match_classes=match_classes)
            ev["attacks"] = suite.to_dict()
            curves[name] = suite.curves
            scores[name] = (suite.per_example["score"], suite.per_example["kind"])
        if what in ("all", "representation"):
            # The retrained model is its own reference: never flagged, CKA 1 to itself.
            ev["representation"] = representation_checks(
                model, test, classes, original=models.get(original) if name != original else None,
                retrain=models.get(retrain), layer=layer, mean=mean, std=std, device=device, seed=seed)
        evidence[name] = ev
    section = AttackSection(evidence)
    if curves:
        section.paths["roc"] = roc_curves(curves, os.path.join(out_dir, "roc.png"),
                                          title="membership attacks: forget (members) vs unseen test samples")
        section.paths["per_example"] = per_example_histograms(scores, os.path.join(out_dir, "per_example.png"),
                                                              title="per-example score of each forget sample")
        section.paths["attacks_csv"] = os.path.join(out_dir, "attacks.csv")
        atomic_write_text(section.paths["attacks_csv"], _csv(evidence))
    section.markdown = _markdown(evidence, section.paths, out_dir)
    return section


def _csv(evidence: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ATTACK_CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for name, ev in evidence.items():
        rows = dict(ev["attacks"]["attacks"])
        if ev["attacks"]["ulira"] is not None:
            rows["u-lira"] = ev["attacks"]["ulira"]
        for attack, r in rows.items():
            w.writerow({"method": name, "attack": attack, **{c: ("" if r.get(c) is None else f"{r[c]:.6g}")
                                                             for c in ATTACK_CSV_COLUMNS[2:]}})
    return buf.getvalue()


def _num(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _attack_table(evidence: dict) -> list:
    names = [n for n, ev in evidence.items() if "attacks" in ev]
    if not names:
        return []
    attacks = list(evidence[names[0]]["attacks"]["attacks"])
    lines = ["| attack: AUC (TPR at 1 % FPR) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in attacks:
        cells = [f"{_num(evidence[n]['attacks']['attacks'][a]['auc'])} "
                 f"({_num(evidence[n]['attacks']['attacks'][a]['tpr_at_1pct_fpr'])})" for n in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if all(evidence[n]["attacks"]["ulira"] is not None for n in names):
        cells = [f"{_num(evidence[n]['attacks']['ulira']['auc'])} "
                 f"({_num(evidence[n]['attacks']['ulira']['tpr_at_1pct_fpr'])})" for n in names]
        lines.append("| U-LiRA-style (K = " + str(evidence[names[0]]["attacks"]["ulira"]["k"]) + ") | "
                     + " | ".join(cells) + " |")
    return lines


def _representation_table(evidence: dict) -> list:
    names = [n for n, ev in evidence.items() if "representation" in ev]
    if not names:
        return []
    lines = ["| method | head forget acc | probe acc | retrain probe acc | CKA to original | CKA to retrain | "
             "head-only forgetting |", "|---" * 7 + "|"]
    for n in names:
        r = evidence[n]["representation"]
        lines.append(f"| {n} | {_num(r['output_forget_acc'])} | {_num(r['probe']['accuracy'])} | "
                     f"{_num(r['probe_retrain'] and r['probe_retrain']['accuracy'])} | {_num(r['cka_original'])} | "
                     f"{_num(r['cka_retrain'])} | {'**yes**' if r['head_only_forgetting'] else 'no'} |")
    return lines


def _markdown(evidence: dict, paths: dict, out_dir: str) -> str:
    lines = ["## Membership attacks", "",
             "Forget samples (members) against unseen test samples of the same classes. AUC 0.5: the forget set "
             "looks unseen; below 0.5 it looks less familiar than unseen data. Compare each model with the "
             "retrained one.", ""]
    lines += _attack_table(evidence) + [""]
    for cap, key in (("ROC curves (log FPR)", "roc"), ("Per-example scores", "per_example")):
        if paths.get(key):
            lines += [f"![{cap}]({os.path.relpath(paths[key], out_dir)})", ""]
    rep = _representation_table(evidence)
    if rep:
        flagged = [n for n, ev in evidence.items() if ev.get("representation", {}).get("head_only_forgetting")]
        lines += ["## Representation checks", "",
                  "A linear probe on the frozen features at the head's input: can it still tell the forget classes "
                  "from the rest (balanced, held out; chance 0.5)? Head-only forgetting: the head no longer predicts "
                  f"the forget classes but the features are the original's (CKA >= {UNCHANGED_FEATURES_CKA}) or hold "
                  "the classes better "
                  "than the retrained model's.", ""] + rep + [""]
        lines += [f"**Head-only forgetting flagged for: {', '.join(flagged)}** (the head stopped predicting the "
                  "class, the features still hold it)." if flagged else "No model is flagged for head-only "
                  "forgetting.", ""]
    return "\n".join(lines)
