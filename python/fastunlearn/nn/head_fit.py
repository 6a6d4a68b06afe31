"""Fit a classifier head on its cached inputs: the head's inputs on a set of images computed
once (backbone frozen, in eval mode, no gradients), then the head alone trained on them.

With a frozen backbone every epoch maps an image to the same head input, so training on the
cached inputs gives the result of training through the backbone, for one forward pass
instead of one per epoch. Used by compose's head fine-tune and by the recipe's head re-fit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from fastunlearn.data.pixels import Normalizer, as_pixels
from fastunlearn.nn.layout import channels_last_input, default_channels_last, model_is_channels_last
from fastunlearn.runtime.progress import progress_bar

# Images per forward pass of the feature pass.
FEATURE_BATCH = 512


@contextlib.contextmanager
def _train_step_layout(model: nn.Module, device):
    """The model in the layout the train step would use (nn.layout.default_channels_last:
    channels_last for conv models, where a small CNN's forward runs several times faster on
    CPU), put back in its own layout on exit. Yields whether that layout is channels_last."""
    was_cl = model_is_channels_last(model)
    cl = default_channels_last(model, torch.device(device))
    if cl != was_cl:
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    try:
        yield cl
    finally:
        if cl != was_cl:
            model.to(memory_format=torch.channels_last if was_cl else torch.contiguous_format)


@torch.no_grad()
def _feature_pass(model: nn.Module, head: nn.Module, x, norm: Normalizer, device, cl: bool, batch_size: int):
    """head_inputs with the model already in its layout (``cl``: channels_last inputs)."""
    caught, calls = [], []

    def hook(module, args):
        calls.append(len(args))
        if len(args) == 1 and isinstance(args[0], torch.Tensor):
            caught.append(args[0].detach().float())

    model.eval()
    handle = head.register_forward_pre_hook(hook)
    logits = []
    try:
        for i in range(0, len(x), batch_size):
            calls.clear()
            u = norm(as_pixels(x[i:i + batch_size], device))
            logits.append(model(channels_last_input(u) if cl else u).float())
            if calls != [1] or len(caught) != len(logits):
                return None
    finally:
        handle.remove()
    feats, logits = torch.cat(caught), torch.cat(logits)
    probe = slice(0, min(len(feats), 64))
    again = head(feats[probe]).float()
    if again.shape != logits[probe].shape or not torch.allclose(again, logits[probe], rtol=1e-4, atol=1e-4):
        return None
    return feats, logits


def head_inputs(model: nn.Module, head: nn.Module, x, norm: Normalizer, device, batch_size: int = FEATURE_BATCH):
    """(inputs of ``head``, logits of ``model``) on images ``x``, the model in eval mode.

    The pass runs in the train step's layout (_train_step_layout); the model is put back in
    its own layout afterwards.

    Returns None when the head is not called exactly once per forward with one tensor, or when
    its output is not the model's output (something runs after it): its inputs alone then do
    not determine the logits, and the head cannot be trained on them.
    """
    with _train_step_layout(model, device) as cl:
        return _feature_pass(model, head, x, norm, device, cl, batch_size)


def fit_head_cached(model: nn.Module, head: nn.Module, parts, norm: Normalizer, device, epochs: int, lr: float,
                    batch_size: int, seed: int, progress: bool) -> bool:
    """Train ``head`` (in place) on its cached inputs over the images of every (x, y) in
    ``parts``, concatenated in order: one feature pass per part, in one layout switch. Returns
    False, having trained nothing, at the first part whose head inputs cannot stand for the
    head (head_inputs' None): the caller then trains through the backbone."""
    feats = []
    with _train_step_layout(model, device) as cl:
        for x, _ in parts:
            got = _feature_pass(model, head, x, norm, device, cl, FEATURE_BATCH)
            if got is None:
                return False
            feats.append(got[0])
    y = torch.cat([torch.as_tensor(t).reshape(-1).long().cpu() for _, t in parts])
    train_head(head, torch.cat(feats), y, epochs, lr, batch_size, seed, progress)
    return True


def train_head(head: nn.Module, feats: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
               seed: int, progress: bool) -> nn.Module:
    """SGD (momentum 0.9) on the cross-entropy of ``head(feats)`` against ``y``, in place.

    The batches are those of compose.finetune_on_remain's loop through the backbone with the
    same seed: a fresh seeded permutation of the rows each epoch."""
    head.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    y = y.to(feats.device)
    for e in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        bar = progress_bar((n + batch_size - 1) // batch_size, progress, f"head re-fit {e + 1}/{epochs}")
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size].to(feats.device)
            loss = nn.functional.cross_entropy(head(feats[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        bar.close()
    return head.eval()
