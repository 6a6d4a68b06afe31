"""Multi-process runs under torch.distributed (torchrun): sharded search, data-parallel
fine-tune, rank-0 I/O.

When a process group is initialised, fu.boundary_relabel and fu.unlearn split the forget
set into contiguous shards, one per rank, search their shard, and all-gather the O(N)
outputs. Each sample draws its noise from counters fixed by its index in the whole forget
set, so every rank ends with exactly the labels one process would compute.

The fine-tune then runs under DistributedDataParallel: config.batch_size is the global
batch, every rank draws the same seeded batch order and takes a contiguous slice of each
global batch (see FinetuneEngine). Every rank must hold the same model, data and config;
only rank 0 writes checkpoints and output files.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastunlearn.data.source import ImageSource
from fastunlearn.engine.search import SearchResult, run_search


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
    check_same_on_every_rank(torch.device(device), forget_samples=n)
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
    rechecked = None if part.rechecked is None else gather_rows(part.rechecked, counts, 1, dev)
    return SearchResult(fields["relabels"], fields["success"], fields["margin"], targets, fields["steps"], rechecked)


# ----------------------------------------------------------- data-parallel fine-tune
def barrier(device: Optional[torch.device] = None) -> None:
    """Wait for every rank (no-op in one process)."""
    if world()[1] == 1:
        return
    if device is not None and device.type == "cuda" and dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device from the rank, which is wrong when a
        # rank's model is not on cuda:rank.
        dist.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of ``t`` over every rank, returned on t's device."""
    if world()[1] == 1:
        return t
    wire = t.to(_comm_device(device))
    dist.all_reduce(wire, op=dist.ReduceOp.SUM)
    return wire.to(t.device)


def gather_states(state: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's 1-D ``state`` (e.g. an RNG state), stacked as (world, len)."""
    size = world()[1]
    return gather_rows(state.unsqueeze(0), [1] * size, 0, device)


def broadcast_state(module: torch.nn.Module, device: torch.device, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or only its buffers) into every rank's
    ``module``, in place."""
    if world()[1] == 1:
        return
    cd = _comm_device(device)
    tensors = list(module.buffers()) if buffers_only else list(module.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            # Collectives need dense, contiguous tensors; channels_last weights are neither.
            wire = t.detach().to(cd).contiguous()
            dist.broadcast(wire, src=0)
            if wire.data_ptr() != t.data_ptr():
                t.copy_(wire)


def check_same_on_every_rank(device: torch.device, **values: int) -> None:
    """Raise on every rank when the ranks disagree on these sizes: they would otherwise take
    different numbers of steps and wait for each other forever."""
    size = world()[1]
    if size == 1:
        return
    mine = torch.tensor([list(values.values())], dtype=torch.int64)
    every = gather_rows(mine, [1] * size, 0, device)
    for j, name in enumerate(values):
        column = every[:, j].tolist()
        if len(set(column)) > 1:
            raise ValueError(f"every rank must hold the same data and config under torch.distributed: "
                             f"{name} is {column} across ranks 0..{size - 1}")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (which keeps its parameters: they are shared)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index], output_device=index)
    return DistributedDataParallel(model)


def init_from_env(device: Optional[str] = None) -> torch.device:
    """Join the process group torchrun describes in the environment, if any, and return this
    rank's device.

    Under torchrun (WORLD_SIZE > 1) with CUDA, the rank runs on cuda:LOCAL_RANK (unless
    ``device`` names an index) with NCCL; on CPU it uses gloo. Outside torchrun it only
    resolves ``device`` (default: cuda when available).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dev
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"rank device {dev} does not exist: this node has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most that many processes per node")
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return dev
