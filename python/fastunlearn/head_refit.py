"""Re-fit a model's classifier head on the remain set, on features computed once.

An unlearning fine-tune that pushes the forget set across the boundary also tilts the head
against the remain classes. A few epochs of the head alone on the remain set (backbone and
BatchNorm statistics frozen) bring the remain accuracy back, and cost almost nothing when the
head is trained on its cached inputs (nn.head_fit): one forward pass over the remain images
instead of one per epoch. On top of compose's head fine-tune this takes a seeded subset of the
remain set and the relabelled forget images of classes gone from it, each set read in batches.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn.compose import finetune_through_model
from fastunlearn.data import validate
from fastunlearn.data.pixels import Normalizer
from fastunlearn.nn.head_fit import fit_head_cached
from fastunlearn.nn.models import head_of

# Rows per SGD step of a config's head re-fit (UnlearnConfig.head_refit_*): compose's default batch.
HEAD_REFIT_BATCH = 128


def remain_subset(n: int, samples: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """Sorted indices of a seeded ``samples`` of ``n`` rows, or None for all of them."""
    if samples is None or samples >= n:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:samples].sort().values


def gone_classes(fx, fy, search, remain_y, samples: Optional[int] = None, seed: int = 0):
    """(images, labels) of the forget rows whose class the remain set no longer has, or None.

    The head re-fit trains on them so that it does not hand a forgotten class back (a retrain
    never predicts it). Rows of a class the remain set still holds (a subgroup, part of a class)
    stay out: a retrain still gives most of them their true class, not the relabel.

    Labels: the last refresh's relabels; with soft targets the most likely other class under
    them. A row whose label is still its own class (a failed argmax search) stays out.
    Each gone class keeps at most as many rows as the re-fit's remain images hold per class
    (``samples`` of them, None: all; a seeded choice), so that a re-fit on a small remain subset
    is not mostly relabelled forget images."""
    fy = torch.as_tensor(fy).reshape(-1).cpu()
    remain_y = torch.as_tensor(remain_y).reshape(-1).cpu()
    if search.targets is not None:
        labels = search.targets[-1].cpu().float().scatter(1, fy[:, None], float("-inf")).argmax(1)
    else:
        labels = search.relabels[-1].cpu()
    gone = ~torch.isin(fy, remain_y) & (labels != fy)
    if not bool(gone.any()):
        return None
    n_remain = len(remain_y) if samples is None else min(samples, len(remain_y))
    per_class = -(-n_remain // max(1, len(remain_y.unique())))
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in fy[gone].unique():
        rows = (gone & (fy == c)).nonzero().reshape(-1)
        keep.append(rows[torch.randperm(len(rows), generator=gen)[:per_class]])
    idx = torch.cat(keep).sort().values
    return fx[idx], labels[idx]


def refit_head(model: nn.Module, remain, *, forget=None, epochs: int = 1, lr: float = 1e-2, batch_size: int = 128,
               samples: Optional[int] = None, head_name: Optional[str] = None, mean=None, std=None, device=None,
               seed: int = 0, progress: bool = False) -> nn.Module:
    """A new model: ``model`` with its classifier head re-trained on ``remain`` (x, y), backbone frozen.

    The head's inputs on the remain images are computed once (no gradients, BatchNorm on its
    running statistics) and the head is trained on them for ``epochs`` epochs of SGD (momentum
    0.9, ``lr``, ``batch_size``, batches in a seeded order). samples: at most this many remain
    images (a seeded subset; None: all). forget: optional (x, labels) trained on too, every row:
    the forget images with the labels the unlearning gave them, so that re-fitting the head on
    the remain classes does not hand the forgotten images back their old class. head_name: the head's submodule (default
    models.head_of). Where the head's output is not the model's output, the head is trained
    through the frozen backbone instead (compose.finetune_through_model), with the same result
    and a forward pass per epoch. ``model`` is not modified.
    """
    validate.check_model(model)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be None or an integer >= 1, got {samples!r}")
    rx, ry = validate.pair(remain, "remain")
    if forget is not None:
        forget = validate.pair(forget, "forget")
        if forget[0].shape[1:] != rx.shape[1:]:
            raise ValueError(f"forget images must have the remain images' shape {tuple(rx.shape[1:])} per sample, "
                             f"got {tuple(forget[0].shape[1:])}")
    out = copy.deepcopy(model)
    dev = validate.check_devices(out, device, remain=rx)
    out.to(dev)
    mean_t, std_t = validate.mean_std(mean, std, rx.shape[1])
    return refit_head_(out, rx, ry, forget=forget, epochs=epochs, lr=lr, batch_size=batch_size, samples=samples,
                       head_name=head_name, mean=mean_t, std=std_t, device=dev, seed=seed, progress=progress)


def refit_head_(model: nn.Module, rx, ry, *, forget=None, epochs: int, lr: float, batch_size: int,
                samples: Optional[int], head_name: Optional[str], mean, std, device, seed: int,
                progress: bool) -> nn.Module:
    """refit_head on checked inputs, modifying ``model`` (already on ``device``) itself."""
    if epochs == 0:
        return model.eval()
    idx = remain_subset(len(ry), samples, seed)
    if idx is not None:
        rx, ry = rx[idx], ry[idx]
    parts = [(rx, ry)] + ([forget] if forget is not None else [])
    name = head_name or head_of(model)[0]
    head = model.get_submodule(name)
    norm = Normalizer(mean, std, rx.shape[1], device)
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        if not fit_head_cached(model, head, parts, norm, device, epochs, lr, batch_size, seed, progress):
            # x[0:len(x)]: the whole set as one tensor (a Dataset's rows are read in batches otherwise).
            x = torch.cat([x[0:len(x)] for x, _ in parts])
            y = torch.cat([torch.as_tensor(t).reshape(-1).long().cpu() for _, t in parts])
            return finetune_through_model(model, head, x, y, "head", epochs, lr, batch_size, norm, device, seed,
                                          progress)
    finally:
        for p, g in zip(model.parameters(), was):
            p.requires_grad_(g)
    return model.eval()


def config_refit_(model: nn.Module, config, forget, search, remain, *, mean, std, device,
                  progress: bool) -> nn.Module:
    """The head re-fit ``config.head_refit_*`` asks for after an unlearning run, on ``model``
    itself (on ``device``): ``config.head_refit_samples`` remain images and the forget rows of
    gone classes (gone_classes, labelled from the run's ``search``). fu.unlearn and fu.sweep
    both end a run with it."""
    (fx, fy), (rx, ry) = forget, remain
    gone = gone_classes(fx, fy, search, ry, config.head_refit_samples, config.seed)
    return refit_head_(model, rx, ry, forget=gone, epochs=config.head_refit_epochs, lr=config.head_refit_lr,
                       batch_size=HEAD_REFIT_BATCH, samples=config.head_refit_samples, head_name=None, mean=mean,
                       std=std, device=device, seed=config.seed, progress=progress)
