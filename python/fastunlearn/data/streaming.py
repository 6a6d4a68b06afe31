"""A Dataset's images read on demand, in batches decoded by DataLoader workers.

``DatasetRows`` stands where the engine otherwise holds an (N, C, H, W) tensor: it has the
shape, dtype and device of one, and indexing it with a slice or an index tensor reads only
those rows. Two access patterns are made fast:

* the fine-tune announces each epoch's batches (``plan``) before drawing them, so workers
  decode the next batches while the current one trains (pinned memory when the step runs
  on a GPU; the uint8 pixels are converted and normalised on the device);
* the search reads rows in order (``read``), prefetched block by block.

Any other read (a probe of two rows, an index list that was not planned) decodes in the
calling process. Nothing is kept once a batch is handed out, so memory does not grow with
the number of images.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.utils.data

from fastunlearn.data.io import _pil_to_array as pil_to_array

SEQUENTIAL_BLOCK = 32  # rows per prefetched block of an in-order read


def default_workers() -> int:
    """DataLoader workers when none are asked for: up to 4, leaving a core to the step."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def image_tensor(img) -> torch.Tensor:
    """An item's image as a tensor: tensors pass, arrays are wrapped, PIL images become
    (C, H, W) uint8 arrays."""
    if isinstance(img, torch.Tensor):
        return img
    if hasattr(img, "getbands"):
        img = pil_to_array(img)
    return torch.from_numpy(np.asarray(img))


def stack_images(items) -> torch.Tensor:
    """A DataLoader collate: the images of (image, label) items as one (B, C, H, W) tensor."""
    x = torch.stack([image_tensor(item[0]) for item in items])
    return x.unsqueeze(1) if x.dim() == 3 else x


def _item_image(dataset, i: int, name: str) -> torch.Tensor:
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"{name}: dataset item {i} must be an (image, label) pair, got {type(item).__name__}")
    return image_tensor(item[0])


class DatasetRows:
    """The images of ``dataset`` as a lazily read (N, C, H, W) array.

    workers: DataLoader worker processes for planned and in-order reads (0: decode in this
    process). pin: pinned host batches, for an asynchronous copy to a GPU.
    """

    def __init__(self, dataset, name: str = "data", workers: Optional[int] = None, pin: bool = False):
        self.dataset, self.name = dataset, name
        self.workers = default_workers() if workers is None else int(workers)
        self.pin = pin
        first = _item_image(dataset, 0, name)
        first = first.unsqueeze(0) if first.dim() == 2 else first
        if first.dim() != 3:
            raise ValueError(f"{name}: images must be (C, H, W) or (H, W), item 0 has shape {tuple(first.shape)}")
        self.shape = torch.Size((len(dataset), *first.shape))
        self.dtype = first.dtype
        self.device = torch.device("cpu")
        self._planned: list = []
        self._batches = None
        self._seq = None  # (next row, iterator, leftover rows) of an in-order read
        self._passes = _Passes()
        self._loader = None

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 4

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1 and stop - start >= SEQUENTIAL_BLOCK:
                return self.read(start, stop)  # a pass in order (evaluation): prefetched
            index = torch.arange(start, stop, step)
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1).cpu()
        if self._planned and torch.equal(self._planned[0], index):
            self._planned.pop(0)
            batch = next(self._batches)
            if not self._planned:
                self._batches = None  # the workers stop
            return batch
        if index.numel() == 0:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return stack_images([self.dataset[int(i)] for i in index.tolist()])

    def plan(self, batches: list) -> None:
        """The index batches that will be asked for next, in order: workers start on them."""
        self._planned = [torch.as_tensor(b, dtype=torch.int64).reshape(-1).cpu() for b in batches]
        self._seq = None  # one pass at a time: an in-order read starts again when asked
        self._batches = self._start([b.tolist() for b in self._planned]) if self._planned else None

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop), prefetched in order: consecutive reads continue one stream."""
        if stop <= start:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        if self._seq is None or not self._seq[0] <= start:
            self._planned, self._batches = [], None  # one pass at a time: planned batches are read directly
            n, b = len(self), SEQUENTIAL_BLOCK
            self._seq = [start, self._start(list(range(s, min(s + b, n))) for s in range(start, n, b)), None]
        pos, it, left = self._seq
        parts, have = [], pos
        if left is not None:
            parts.append(left)
            have += left.shape[0]
        while have < stop:
            parts.append(next(it))
            have += parts[-1].shape[0]
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = rows[start - pos:stop - pos]
        # Rows from ``start`` on stay until the next read: a retried chunk reads them again.
        self._seq = [start, it, rows[start - pos:]]
        return out

    def _start(self, batches):
        """A pass over ``batches`` (lists of row indices), decoded by the workers. One
        DataLoader serves every pass, so its workers start once (they stay until this object
        is dropped); a new pass ends the previous one."""
        self._passes.batches = batches
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._passes, num_workers=self.workers, pin_memory=self.pin,
                collate_fn=stack_images, persistent_workers=self.workers > 0)
        return iter(self._loader)


class _Passes:
    """A DataLoader's batch sampler whose batches are set before each pass."""

    def __init__(self):
        self.batches = ()

    def __iter__(self):
        return iter(self.batches)


def known_labels(dataset) -> Optional[torch.Tensor]:
    """The labels of a Dataset when they are known without reading its items: its
    ``targets`` (image_folder's, torchvision's), a TensorDataset's second tensor, or those of
    a Subset's dataset at its indices. None otherwise."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = known_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None and isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    if targets is None or len(targets) != len(dataset):
        return None
    return torch.as_tensor(targets).to(torch.int64).reshape(-1)


def dataset_labels(dataset, name: str) -> torch.Tensor:
    """All labels of a Dataset as int64: known_labels when it has them (no image decoded),
    else read item by item."""
    known = known_labels(dataset)
    if known is not None:
        return known
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"{name}: dataset item {i} must be an (image, label) pair, got {type(item).__name__}")
        labels.append(int(item[1]))
    return torch.tensor(labels, dtype=torch.int64)
