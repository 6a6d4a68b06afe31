"""One view over the two ways images arrive: a tensor pair or a Dataset streamed in chunks.

The search and the fine-tune read rows by index range or index list; with a Dataset only
those rows are materialised, so a forget set larger than memory stays bounded.
"""

from __future__ import annotations

from typing import Optional

import torch


class ImageSource:
    """Rows of (N, C, H, W) images (uint8 or float in [0, 1]) with int64 labels."""

    def __init__(self, x, y: Optional[torch.Tensor] = None, name: str = "forget"):
        self.name = name
        if isinstance(x, torch.Tensor):
            if y is None:
                raise ValueError(f"{name}: labels are required with an image tensor")
            self.x, self.dataset = x, None
            self.y = y.to(torch.int64)
        else:
            self.x, self.dataset = None, x
            self.y = None if y is None else y.to(torch.int64)
        self._shape = None

    def __len__(self) -> int:
        return self.x.shape[0] if self.x is not None else len(self.dataset)

    @property
    def is_stream(self) -> bool:
        return self.dataset is not None

    def sample_shape(self) -> tuple:
        if self._shape is None:
            self._shape = tuple(self.rows(0, 1)[0].shape[1:])
        return self._shape

    def rows(self, start: int, stop: int):
        """(images, labels) for rows [start, stop)."""
        if self.x is not None:
            return self.x[start:stop], self.y[start:stop]
        return self.take(range(start, stop))

    def take(self, index):
        """(images, labels) for the given row indices."""
        if self.x is not None:
            idx = torch.as_tensor(index, dtype=torch.int64)
            return self.x[idx], self.y[idx]
        imgs, labels = [], []
        for i in (index.tolist() if isinstance(index, torch.Tensor) else index):
            img, label = self.dataset[int(i)]
            imgs.append(torch.as_tensor(img))
            labels.append(int(label))
        x = torch.stack(imgs)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        y = torch.tensor(labels, dtype=torch.int64) if self.y is None else self.y[torch.as_tensor(list(index))]
        _check_chunk(x, self.name)
        return x, y

    def subset(self, start: int, stop: int) -> "ImageSource":
        """Rows [start, stop) as a source of their own (a view for tensors, lazy for Datasets)."""
        if self.x is not None:
            return ImageSource(self.x[start:stop], self.y[start:stop], self.name)
        ds = torch.utils.data.Subset(self.dataset, range(start, stop))
        return ImageSource(ds, None if self.y is None else self.y[start:stop], self.name)

    def labels(self) -> torch.Tensor:
        """All labels (reads only the labels' part of each item for a Dataset)."""
        if self.y is None:
            self.y = torch.tensor([int(self.dataset[i][1]) for i in range(len(self.dataset))], dtype=torch.int64)
        return self.y


def _check_chunk(x: torch.Tensor, name: str):
    """Streamed rows get the same checks as a tensor input, chunk by chunk."""
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise TypeError(f"{name} images must be float in [0, 1] or uint8, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} images contain NaN/Inf values")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{name} images must be pixels in [0, 1] (or uint8), got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]; pass un-normalised images and give mean/std")
