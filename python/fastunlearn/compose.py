"""Composition of unlearning runs: backbone/head swap, remain fine-tune, weight interpolation.

The paper's composition takes the feature extractor of a run that kept remain accuracy and
the classifier head of a run that forgot. ``frozen_batchnorm`` is also here: a context in
which BatchNorm layers normalise with their running statistics and never update them,
whatever mode the training loop puts the model in. A batch made only of forget samples
otherwise rewrites the statistics the remain classes rely on.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn import reference
from fastunlearn.data import validate
from fastunlearn.data.pixels import Normalizer, as_pixels
from fastunlearn.nn.head_fit import fit_head_cached
from fastunlearn.nn.models import head_of
from fastunlearn.runtime.progress import progress_bar

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _set_submodule(root: nn.Module, name: str, module: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _bn_eval_hook(module, inputs):
    # Runs right before forward reads self.training, so a later model.train() cannot undo it.
    module.training = False


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """Within the block, every BatchNorm of ``model`` uses and keeps its running statistics.

    The affine weights still train. Works with any training loop (it installs forward
    pre-hooks, removed on exit), so the loop itself needs no BatchNorm option.
    """
    handles = [m.register_forward_pre_hook(_bn_eval_hook) for m in model.modules() if isinstance(m, _BN_TYPES)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def strip_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Remove frozen_batchnorm's hooks from ``model`` (a deepcopy made inside the block carries them)."""
    for m in model.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _bn_eval_hook:
                del m._forward_pre_hooks[key]
    return model


def compose(backbone: nn.Module, head: nn.Module, *, head_name: Optional[str] = None, remain=None,
            finetune: Optional[str] = None, epochs: int = 1, lr: float = 1e-3, batch_size: int = 128,
            mean=None, std=None, device=None, seed: int = 0, progress: bool = True) -> nn.Module:
    """A new model: the feature extractor of ``backbone`` with the classifier head of ``head``.

    The head is found by name (``.classifier``, ``.fc``, ``.head``, the last layer of a
    Sequential) or given as ``head_name``. finetune: None, "head" (backbone frozen, BatchNorm
    statistics kept) or "full", on ``remain`` with its true labels. Neither input is modified.
    """
    validate.check_model(backbone)
    validate.check_model(head)
    if finetune not in (None, "head", "full"):
        raise ValueError(f"finetune must be None, 'head' or 'full', got {finetune!r}")
    if type(backbone) is not type(head):
        raise TypeError(f"backbone and head must be the same architecture, got {type(backbone).__name__} "
                        f"and {type(head).__name__}")
    name = head_name or head_of(backbone)[0]
    try:
        head_module = head.get_submodule(name)
        backbone.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"both models need a submodule {name!r} (the head): {e}") from e
    out = copy.deepcopy(backbone)
    _set_submodule(out, name, copy.deepcopy(head_module))
    if finetune is None:
        return out.eval()
    if remain is None:
        raise ValueError(f"finetune={finetune!r} needs a remain set: pass remain=(x, y)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    rx, ry = validate.pair(remain, "remain")
    dev = validate.check_devices(out, device, remain=rx)
    mean_t, std_t = validate.mean_std(mean, std, rx.shape[1])
    return finetune_on_remain(out, name, rx, ry, finetune, epochs, lr, batch_size, mean_t, std_t, dev, seed,
                               progress)


def finetune_on_remain(model, head_name, rx, ry, mode, epochs, lr, batch_size, mean, std, dev, seed, progress):
    """Fine-tune ``model`` (in place) on (rx, ry): its head alone (mode "head", backbone frozen) or
    all of it ("full"). A head is trained on its cached inputs (nn.head_fit) unless they cannot
    stand for it."""
    model.to(dev)
    norm = Normalizer(mean, std, rx.shape[1], dev)
    head = model.get_submodule(head_name)
    if mode == "head":
        # A frozen backbone gives each image the same head input every epoch: train on them cached.
        model.requires_grad_(False)
        if fit_head_cached(model, head, [(rx, ry)], norm, dev, epochs, lr, batch_size, seed, progress):
            model.requires_grad_(True)
            return model.eval()
    return finetune_through_model(model, head, rx, ry, mode, epochs, lr, batch_size, norm, dev, seed, progress)


def finetune_through_model(model, head, rx, ry, mode, epochs, lr, batch_size, norm, dev, seed, progress):
    """finetune_on_remain's loop through the whole model: SGD (momentum 0.9) on seeded batches,
    the backbone frozen in eval mode for mode "head"."""
    params = list(head.parameters()) if mode == "head" else list(model.parameters())
    model.requires_grad_(mode == "full")
    head.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = rx.shape[0]
    for e in range(epochs):
        if mode == "head":
            model.eval()  # a frozen backbone keeps its BatchNorm statistics too
            head.train()
        else:
            model.train()
        perm = torch.randperm(n, generator=gen)
        bar = progress_bar((n + batch_size - 1) // batch_size, progress, f"compose fine-tune {e + 1}/{epochs}")
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            if idx.numel() == 1 and mode == "full" and n > 1:
                continue  # one sample cannot give BatchNorm batch statistics
            loss = nn.functional.cross_entropy(model(norm(as_pixels(rx[idx], dev))).float(), ry[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        bar.close()
    model.requires_grad_(True)
    return model.eval()


def interpolate(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """A new model with weights (1 - t) * a + t * b (integer buffers from a)."""
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if type(model_a) is not type(model_b):
        raise TypeError(f"models must share an architecture, got {type(model_a).__name__} and {type(model_b).__name__}")
    ka, kb = set(model_a.state_dict()), set(model_b.state_dict())
    if ka != kb:
        raise ValueError(f"models must have the same state-dict keys; only in a: {sorted(ka - kb)[:4]}, "
                         f"only in b: {sorted(kb - ka)[:4]}")
    return reference.interpolate(model_a, model_b, t)
