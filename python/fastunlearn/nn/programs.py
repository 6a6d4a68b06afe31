"""Saved programs as models to unlearn: TorchScript files (torch.jit.save) and torch.export
files (torch.export.save, .pt2).

Unlearning fine-tunes a copy of the model, so a program must have trainable parameters, a
train / eval switch, and survive copy.deepcopy:

* TorchScript: supported. copy.deepcopy of a ScriptModule gives parameters that autograd
  records as clones (not leaves, so they cannot be trained); ScriptedModel wraps the module
  and copies it without autograd. Its BatchNorm layers follow train() / eval(), but they are
  not torch.nn.BatchNorm modules, so the fine-tune cannot hold them at their running
  statistics (batchnorm="frozen").
* torch.export: supported when the program was exported in eval mode (model.eval() before
  torch.export.export) with a dynamic batch dimension. An exported graph fixes each
  BatchNorm's and dropout's mode when it is exported; train() / eval() change nothing in it.
  So a graph exported in eval mode fine-tunes with its BatchNorm at the running statistics
  (batchnorm="frozen") and without dropout, and a graph exported in train mode is refused
  (the search needs the eval-mode function).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
import zipfile
from typing import Optional

import torch
from torch import nn

PROGRAM = "program:"
TORCHSCRIPT = "TorchScript"
EXPORT = "torch.export"
# What to do instead when a program cannot be unlearned.
INSTEAD = ("bring the model as code instead: --model-factory package.module:function or --arch NAME, with "
           "--weights FILE (its state_dict) and --train-epochs 0 (fastunlearn train)")


def program_kind(path: str) -> Optional[str]:
    """TORCHSCRIPT or EXPORT for a file torch.jit.save or torch.export.save wrote, else None."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
        return EXPORT
    if any("/code/" in n for n in names) and any(n.endswith("/data.pkl") for n in names):
        return TORCHSCRIPT
    return None


class ScriptedModel(nn.Module):
    """A TorchScript module (``program``) that copy.deepcopy copies into trainable parameters."""

    def __init__(self, program: torch.jit.ScriptModule):
        super().__init__()
        self.program = program

    def forward(self, x):
        return self.program(x)

    def __deepcopy__(self, memo):
        with torch.no_grad():  # else every copied parameter is a recorded clone, not a leaf
            out = ScriptedModel(copy.deepcopy(self.program, memo))
        for p, q in zip(out.parameters(), self.parameters(), strict=True):
            p.requires_grad_(q.requires_grad)
        return out.train(self.training)


def _has_script_batch_norm(model: nn.Module) -> bool:
    return any("BatchNorm" in getattr(m, "original_name", "") for m in model.modules())


def _graph_modes(gm: torch.fx.GraphModule) -> tuple:
    """(BatchNorm in eval mode?, BatchNorm or dropout in train mode?) in an exported graph."""
    eval_bn = train_ops = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "batch_norm" in target:
            if "no_training" in target or (target.startswith("aten.batch_norm") and node.args[5] is False):
                eval_bn = True
            else:
                train_ops = True
        elif "dropout" in target:
            train_ops = train_ops or "native_dropout" in target or (len(node.args) > 2 and node.args[2] is True)
    return eval_bn, train_ops


def _load_export(path: str) -> nn.Module:
    ep = torch.export.load(path)
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder"][-1:]  # the user's input follows the weights
    val = inputs[0].meta.get("val") if inputs else None
    if val is not None and isinstance(val.shape[0], int):
        raise ValueError(f"{path} was exported with a fixed batch size of {val.shape[0]}; unlearning runs it on "
                         "batches of other sizes. Export it with a dynamic batch dimension: "
                         "torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    gm = ep.module()
    # ExportedProgram.module() forbids train() / eval(); the graph's modes are fixed anyway (see above).
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    if _graph_modes(gm)[1]:
        raise ValueError(f"{path} was exported in train mode (its graph runs BatchNorm with batch statistics or "
                         "dropout), which an exported graph cannot switch off for the search. Export it in eval "
                         f"mode (model.eval() before torch.export.export), or {INSTEAD}")
    return gm


@contextlib.contextmanager
def _quiet():
    """torch's deprecation notices on torch.jit.load and on copying an exported graph's tree
    specs say nothing about the user's program: kept off the command's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def load_program(path: str) -> nn.Module:
    """The model a TorchScript or torch.export file holds, checked to be trainable and
    deep-copyable; a ValueError saying what to do instead when it is not."""
    with _quiet():
        return _load_program(path)


def _load_program(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"program file {path} does not exist (a model file unlearned from a program names "
                                "it by its path: put it back there)")
    kind = program_kind(path)
    if kind is None:
        raise ValueError(f"{path} is not a TorchScript (torch.jit.save) or torch.export (torch.export.save) file")
    try:
        model = ScriptedModel(torch.jit.load(path, map_location="cpu")) if kind == TORCHSCRIPT else _load_export(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: the {kind} program cannot be loaded ({' '.join(str(e).split())[:300]})") from None
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{path}: the {kind} program has no trainable parameters (a frozen program, such as "
                         f"torch.jit.freeze writes, holds its weights as constants); save it unfrozen, or {INSTEAD}")
    try:
        copy.deepcopy(model)
    except Exception as e:  # whatever the program holds that cannot be copied
        raise ValueError(f"{path}: the {kind} program cannot be copied ({type(e).__name__}: {e}); fastunlearn "
                         f"never changes the given model in place, so it needs a copy: {INSTEAD}") from None
    return model


def batchnorm_modes(model: nn.Module) -> tuple:
    """The fine-tune BatchNorm modes ("train", "frozen") a model loaded by load_program allows."""
    if isinstance(model, ScriptedModel) and _has_script_batch_norm(model):
        return ("train",)
    if isinstance(model, torch.fx.GraphModule) and _graph_modes(model)[0]:
        return ("frozen",)
    return ("train", "frozen")
