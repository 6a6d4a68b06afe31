"""Multi-process runs under torch.distributed (torchrun): sharded search, rank-0 I/O.

When a process group is initialised, fu.boundary_relabel and fu.unlearn split the forget
set into contiguous shards, one per rank, search their shard, and all-gather the O(N)
outputs. Each sample draws its noise from counters fixed by its index in the whole forget
set, so every rank ends with exactly the labels one process would compute.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .search import SearchResult, run_search
from .source import ImageSource


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous, balanced shard [start, stop) of n rows for a rank."""
    return n * rank // size, n * (rank + 1) // size


def _comm_device(device: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    backend = dist.get_backend()
    return device if backend == "nccl" else torch.device("cpu")


def gather_rows(t: torch.Tensor, counts: list[int], dim: int, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (shards may differ in length by one)."""
    longest = max(counts)
    pad = list(t.shape)
    pad[dim] = longest - t.shape[dim]
    cd = _comm_device(device)
    # gloo moves neither bool nor int16: widen them for the trip.
    wire = torch.int32 if t.dtype in (torch.bool, torch.int16) else t.dtype
    src = t.to(wire).to(cd)
    src = torch.cat([src, torch.zeros(pad, dtype=src.dtype, device=cd)], dim=dim)
    parts = [torch.empty_like(src) for _ in counts]
    dist.all_gather(parts, src.contiguous())
    out = torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim=dim).cpu()
    return out.to(t.dtype)


def sharded_search(model, source: ImageSource, config, *, device, refreshes: int = 1, frozen=None,
                   progress: bool = False, **kw) -> SearchResult:
    """run_search over this rank's shard, then all-gather: every rank gets the whole result."""
    rank, size = world()
    if size == 1:
        return run_search(model, source, None, config, device=device, refreshes=refreshes, frozen=frozen,
                          progress=progress, **kw)
    n = len(source)
    start, stop = shard_bounds(n, rank, size)
    counts = [shard_bounds(n, r, size)[1] - shard_bounds(n, r, size)[0] for r in range(size)]
    part = run_search(model, source.subset(start, stop), None, config, device=device, refreshes=refreshes,
                      frozen=frozen, progress=progress and rank == 0, index_base=start, n_total=n, **kw)
    dev = torch.device(device)
    fields = {}
    for name in ("relabels", "success", "margin", "steps"):
        fields[name] = gather_rows(getattr(part, name), counts, 1, dev)
    targets: Optional[torch.Tensor] = None
    if config.relabel in ("soft", "topk"):
        targets = gather_rows(part.targets, counts, 1, dev)
    return SearchResult(fields["relabels"], fields["success"], fields["margin"], targets, fields["steps"])
