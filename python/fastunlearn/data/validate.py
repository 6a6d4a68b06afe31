"""Input checks run before any work starts. Each error names the argument, what was
expected and what was seen."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastunlearn.data.io import as_tensors, dataset_length
from fastunlearn.data.pixels import as_pixels
from fastunlearn.data.streaming import DatasetRows, dataset_labels


def canonical_device(device) -> torch.device:
    """The device with its index: "cuda" becomes "cuda:N" for the current device N.

    torch.device("cuda") != torch.device("cuda:0"), while tensors always carry the index;
    a comparison of a tensor's device with an index-less one would wrongly say "elsewhere"
    (and send every batch through host memory)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def pair(data, name: str, *, allow_none: bool = False):
    """(x, y) tensors from a pair or a Dataset, with shape and type checks."""
    if data is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required: give an (x, y) pair or a Dataset")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        # Checked on the raw pair: the loaders' conversion is lenient, the API is not.
        raw_x, raw_y = data
        if hasattr(raw_x, "shape") and len(raw_x.shape) != 4:
            raise ValueError(f"{name} images must be (N, C, H, W), got shape {tuple(raw_x.shape)}"
                             + (" (add a channel dim with x.unsqueeze(1))" if len(raw_x.shape) == 3 else ""))
        if hasattr(raw_y, "dtype") and (str(raw_y.dtype).startswith(("torch.float", "float", "torch.bool", "bool"))):
            raise TypeError(f"{name} labels must be integers (int64), got {raw_y.dtype}")
        if hasattr(raw_x, "dtype") and not str(raw_x.dtype).endswith(("uint8", "float32", "float64", "float16",
                                                                       "bfloat16")):
            raise TypeError(f"{name} images must be float in [0, 1] or uint8, got {raw_x.dtype}")
    x, y = as_tensors(data, name=name)
    if x.dim() != 4:
        raise ValueError(f"{name} images must be (N, C, H, W), got shape {tuple(x.shape)}"
                         + (" (add a channel dim with x.unsqueeze(1))" if x.dim() == 3 else ""))
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} labels must be ({x.shape[0]},) to match the images, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{name} labels must be integers (int64), got {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{name} images contain {bad} NaN/Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} images must be pixels in [0, 1] (or uint8), got values in [{lo:.4g}, {hi:.4g}]; "
                             "pass un-normalised images and give mean/std separately")
    elif x.dtype != torch.uint8:
        raise TypeError(f"{name} images must be float in [0, 1] or uint8, got {x.dtype}")
    return x, y.to(torch.int64)


def stream(data, name: str, *, workers=None, device=None):
    """(images, labels) for a Dataset without reading it whole: the images as DatasetRows
    (item 0 gives the shape; batches are decoded when the search and the fine-tune ask for
    them), the labels from the Dataset's ``targets`` or read item by item."""
    n = dataset_length(data, name)
    y = dataset_labels(data, name)
    if y.shape[0] != n:
        raise ValueError(f"{name}: {n} items but {y.shape[0]} labels")
    pin = device is not None and torch.device(device).type == "cuda"
    x = DatasetRows(data, name, workers=workers, pin=pin)
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"{name} images must be float in [0, 1] or uint8, got {x.dtype}")
    if bool((y < 0).any()):
        raise ValueError(f"{name}: labels must be >= 0, got {int(y.min())}")
    return x, y


def is_stream(data) -> bool:
    """A Dataset (not an (x, y) pair): read in batches rather than as whole tensors."""
    return isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list))


def check_distinct(forget, remain):
    if forget is not None and remain is not None and forget is remain:
        raise ValueError("forget and remain are the same object; the remain set must exclude the forget samples")


def check_same_data(fx, rx):
    if isinstance(fx, DatasetRows) or isinstance(rx, DatasetRows):
        if getattr(fx, "dataset", fx) is getattr(rx, "dataset", rx):
            raise ValueError("forget and remain are the same Dataset; the remain set must exclude the forget samples")
        return
    if fx is rx or (fx.data_ptr() == rx.data_ptr() and fx.shape == rx.shape and fx.numel()):
        raise ValueError("forget and remain hold the same images; the remain set must exclude the forget samples")


def mean_std(mean, std, channels: int):
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither (got only "
                         f"{'mean' if mean is not None else 'std'})")
    if mean is None:
        return None, None
    out = []
    for name, v in (("mean", mean), ("std", std)):
        t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
        if t.numel() != channels:
            raise ValueError(f"{name} must have one value per image channel ({channels}), "
                             f"got {t.numel()}: {t.tolist()}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {t.tolist()}")
        out.append(t)
    if bool((out[1] <= 0).any()):
        raise ValueError(f"std must be positive, got {out[1].tolist()}")
    return out[0], out[1]


def resolve_device(model: nn.Module, device=None) -> torch.device:
    """Where to run: ``device`` (with its index, see canonical_device), else the model's device."""
    return canonical_device(device) if device is not None else model_device(model)


def check_devices(model: nn.Module, device, **tensors):
    """Data given on a device other than the model's is an error unless device= says where to run."""
    if device is not None:
        return canonical_device(device)
    mdev = model_device(model)
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu" and t.device != mdev:
            raise ValueError(f"{name} is on {t.device} but the model is on {mdev}; move one of them, or pass device=")
    return mdev


@torch.no_grad()
def num_classes(model: nn.Module, x: torch.Tensor, mean, std, device) -> int:
    """Probe the model on two samples: its output must be (N, classes)."""
    was_training = model.training
    probe = x[:2].to(device)
    probe = as_pixels(probe, device)
    if mean is not None:
        shape = (1, -1, 1, 1)
        probe = (probe - mean.to(device).reshape(shape)) / std.to(device).reshape(shape)
    model.eval()
    try:
        out = model(probe)
    except Exception as e:
        raise ValueError(f"the model failed on input of shape {tuple(probe.shape)}: {e}") from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
        seen = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (N, classes); "
                         f"for N={probe.shape[0]} it returned {seen}")
    return out.shape[1]


def check_labels(y: torch.Tensor, classes: int, name: str):
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name} labels must lie in [0, {classes}) for a model with {classes} outputs, "
                         f"got range [{lo}, {hi}]")


def pairs(workers=None, device=None, **data):
    """(x, y) for each named set (None stays None; forget is required): tensors, or for a
    Dataset its images as streaming.DatasetRows (read in batches) and its labels. workers
    and device: the DataLoader workers of a Dataset and the device its batches go to."""
    return {k: stream(v, k, workers=workers, device=device) if is_stream(v)
            else pair(v, k, allow_none=(k != "forget")) for k, v in data.items()}
