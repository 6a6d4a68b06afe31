"""The fine-tune's batches announced ahead to the sets read from a Dataset
(data.streaming.DatasetRows), so that their DataLoader workers decode while a step runs."""

from __future__ import annotations

from fastunlearn.data.streaming import DatasetRows
from fastunlearn.engine.distributed import rank_rows


def plan_epoch(fx, rx, perm, remain_host, remain_at, batch, per_epoch, bs, rank, world):
    """Announce the epoch's batches, from ``batch`` on, to the sets read from a Dataset, so
    that their workers decode ahead: the rows the fine-tune's loop takes, in its order."""
    if not isinstance(fx, DatasetRows) and not isinstance(rx, DatasetRows):
        return
    n, forget, remain = perm.shape[0], [], []
    for b in range(batch, per_epoch):
        rows = slice(b * bs, min(n, (b + 1) * bs))
        if world > 1:
            rows, _ = rank_rows(rows, rank, world)
        forget.append(perm[rows])
        if remain_at is not None:
            rrows = slice(remain_at[b], remain_at[b + 1])
            if world > 1:
                rrows, _ = rank_rows(rrows, rank, world)
            remain.append(remain_host[rrows])
    if isinstance(fx, DatasetRows):
        fx.plan(forget)
    if isinstance(rx, DatasetRows):
        rx.plan(remain)
