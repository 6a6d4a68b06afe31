"""One fine-tune run: its state (generators, batch order, position, loss sums, history) as
one object, FinetuneRun, and the epoch loop as its methods. The state is what a checkpoint
holds, so a resumed run continues with exactly the steps it would have taken. The train step
itself is the engine's (finetune.FinetuneEngine.step)."""

from __future__ import annotations

import itertools
import math
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastunlearn.config import UnlearnConfig
from fastunlearn.engine import distributed
from fastunlearn.engine.batches import Clock, apply_augment, draw_augment, gather, params_on, stage
from fastunlearn.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_FREE,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
    search_to_dict,
    to_cpu,
)
from fastunlearn.engine.errors import StopRun, diverged
from fastunlearn.engine.prefetch import plan_epoch
from fastunlearn.engine.probe import Probe
from fastunlearn.engine.search import SearchResult
from fastunlearn.runtime.progress import progress_bar


@dataclass(frozen=True)
class RunOptions:
    """How a run reports, saves and stops (FinetuneEngine.run's keyword arguments)."""
    progress: bool
    probe: Probe
    checkpoint_dir: Optional[str]
    checkpoint_every: int
    on_step: Optional[Callable]
    max_steps: Optional[int]


@dataclass(frozen=True)
class RunData:
    """The run's fixed inputs, staged where the step gathers from, and the sizes they give."""
    fx: torch.Tensor
    targets: list  # one per search refresh; epoch e trains on targets[e % len(targets)]
    rx: Optional[torch.Tensor]
    ry: Optional[torch.Tensor]
    n: int
    n_remain: Optional[int]
    use_remain: bool
    # The published loop draws a remain batch every iteration, used or not, from the same
    # random stream as the forget batches; compat="authors" draws the same batches.
    draw_remain: bool
    authors: bool
    bs: int
    per_epoch: int
    aug_pad: int
    total: int

    @classmethod
    def stage(cls, forget_x, search: SearchResult, remain, cfg: UnlearnConfig, dev: torch.device) -> "RunData":
        fx = stage(forget_x, dev)
        targets = [stage(search.train_targets(r), dev) for r in range(search.refreshes)]
        use_remain = cfg.remain_reg > 0
        rx = ry = n_remain = None
        if use_remain:
            rx, ry = stage(remain[0], dev), stage(remain[1], dev)
            n_remain = rx.shape[0]
        authors = cfg.compat == "authors"
        draw_remain = use_remain or (authors and remain is not None)
        if draw_remain and not use_remain:
            n_remain = len(remain[1])
        n, bs = forget_x.shape[0], cfg.batch_size
        per_epoch = (n + bs - 1) // bs
        return cls(fx=fx, targets=targets, rx=rx, ry=ry, n=n, n_remain=n_remain, use_remain=use_remain,
                   draw_remain=draw_remain, authors=authors, bs=bs, per_epoch=per_epoch,
                   aug_pad=max(1, fx.shape[-1] // 8) if fx.dim() == 4 else 0, total=cfg.epochs * per_epoch)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's batch order on the device (and on the host, for rows kept there)."""
    perm_dev: torch.Tensor
    remain_host: Optional[torch.Tensor]
    remain_dev: Optional[torch.Tensor]
    remain_at: Optional[list]  # remain batch b is rows remain_at[b]:remain_at[b + 1]
    aug_f: Optional[dict]
    aug_r: Optional[dict]
    targets: torch.Tensor


def check_run_args(engine, forget_x, remain, checkpoint_dir, checkpoint_every) -> None:
    """Refuse a run the engine cannot do, saying what it needs."""
    cfg = engine.config
    if distributed.world()[1] != engine.world:
        raise RuntimeError(f"this engine was built for {engine.world} process(es), the process group now has "
                           f"{distributed.world()[1]}: build a new engine")
    use_remain = cfg.remain_reg > 0
    if use_remain and remain is None:
        raise ValueError(f"config.remain_reg={cfg.remain_reg} needs a remain set: pass remain=(x, y)")
    if use_remain and cfg.remain_target == "distill" and engine.teacher is None:
        raise ValueError("remain_target='distill' needs the original model as teacher")
    if checkpoint_every and not checkpoint_dir:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if cfg.augment is not None and forget_x.dim() != 4:
        raise ValueError(f"config.augment={cfg.augment!r} needs (N, C, H, W) images, got shape "
                         f"{tuple(forget_x.shape)}")


def run_finetune(engine, forget_x, search: SearchResult, remain, *, progress, probe, checkpoint_dir,
                 checkpoint_every, resume, on_step, max_steps) -> list:
    """FinetuneEngine.run without its model transforms: check, stage, seed, loop. Returns the history."""
    check_run_args(engine, forget_x, remain, checkpoint_dir, checkpoint_every)
    opts = RunOptions(progress=progress, probe=Probe(probe, engine.mean, engine.std, engine.device),
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, on_step=on_step,
                      max_steps=max_steps)
    cfg, dev = engine.config, engine.device
    data = RunData.stage(forget_x, search, remain, cfg, dev)
    if engine.world > 1:
        distributed.check_same_on_every_rank(
            dev, forget_samples=data.n, remain_samples=data.n_remain if data.use_remain else 0,
            refreshes=search.refreshes,
            config_crc=zlib.crc32(repr(sorted((k, v) for k, v in cfg.to_dict().items()
                                                 if k not in RESUME_FREE)).encode()),
            max_steps=-1 if max_steps is None else max_steps, checkpoint_every=checkpoint_every,
            resume=int(resume is not None))
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        # The global RNG (dropout, anything stochastic in the model) starts from the seed;
        # each rank from its own, so that ranks do not draw the same dropout masks.
        torch.manual_seed(cfg.seed + engine.rank)
        run = FinetuneRun(engine, data, search, opts, forked=bool(forked))
        if resume is not None:
            run.resume(resume)
        return run.loop()


class FinetuneRun:
    """The state of one run and the steps that advance it. Build it inside the run's
    forked RNG, after seeding the global generator."""

    def __init__(self, engine, data: RunData, search: SearchResult, opts: RunOptions, *, forked: bool):
        self.engine, self.data, self.search, self.opts = engine, data, search, opts
        self.cfg, self.dev = engine.config, engine.device
        self.sharded = engine.world > 1
        self.forked = forked  # whether the run forked (and checkpoints) the CUDA RNG
        seed = self.cfg.seed
        self.gen = torch.Generator().manual_seed(seed)
        self.remain_gen = self.gen if data.authors else torch.Generator().manual_seed(seed + 1)
        self.aug_gen = torch.Generator().manual_seed(seed + 2)
        self.aug_f = self.aug_r = None
        self.remain_queue: list = []
        self.history: list = []
        self.epoch, self.batch, self.step = 0, 0, 0
        self.perm = self.remain_idx = None
        self.acc = torch.zeros(3, dtype=torch.float64, device=self.dev)
        self.epoch_seconds = 0.0
        # Epoch rows wait on the device until they are read: at the end, before a
        # checkpoint, or one epoch late for the progress bar. Reading each at once would
        # stall the host at every epoch end, once per batch in a small revision.
        self.pending: list = []
        self.clock = Clock(self.dev)
        self.bar = None

    # ------------------------------------------------------------ checkpoints
    def resume(self, resume) -> None:
        """Continue from a checkpoint (a path or its loaded dict)."""
        engine, dev = self.engine, self.dev
        state = load_checkpoint(resume) if isinstance(resume, str) else resume
        check_resumable(state, self.cfg, self.data.n)
        engine.model.load_state_dict(state["model"])
        engine.opt.load_state_dict(state["optimizer"])
        engine.drop_graphs()  # the loaded state lives at new addresses
        self.gen.set_state(state["gen"])
        self.remain_gen.set_state(state["remain_gen"])
        if self.cfg.augment is not None:
            self.aug_gen.set_state(state["aug_gen"])
            self.aug_f, self.aug_r = state["aug_f"], state["aug_r"]
        self.remain_queue = list(state["remain_queue"])
        self.history = list(state["history"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.perm, self.remain_idx = state["perm"], state["remain_idx"]
        self.acc = state["acc"].to(dev)
        if self.sharded and engine.rank != 0:
            # The checkpoint holds the loss sums of all ranks; rank 0 carries them on, so
            # that the epoch's all-reduce counts them once.
            self.acc = torch.zeros_like(self.acc)
        self.epoch_seconds = state.get("epoch_seconds", 0.0)
        torch.set_rng_state(rank_rng(state, "torch_rng", engine.rank, engine.world))
        if self.forked and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_rng(state, "cuda_rng", engine.rank, engine.world), dev)

    def snapshot(self, rank_rngs: dict) -> dict:
        engine, dev = self.engine, self.dev
        return {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "n": self.data.n,
                "epoch": self.epoch, "batch": self.batch, "step": self.step, "perm": self.perm,
                "remain_idx": self.remain_idx,
                "model": {k: v.detach().cpu() for k, v in engine.model.state_dict().items()},
                "optimizer": to_cpu(engine.opt.state_dict()),
                "gen": self.gen.get_state(), "remain_gen": self.remain_gen.get_state(),
                "remain_queue": [t.clone() for t in self.remain_queue], "history": list(self.history),
                "aug_gen": self.aug_gen.get_state(), "aug_f": self.aug_f, "aug_r": self.aug_r,
                "acc": self.acc.cpu(), "epoch_seconds": self.epoch_seconds, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(dev) if self.forked else None,
                "search": search_to_dict(self.search), **rank_rngs}

    def write_checkpoint(self) -> None:
        """Write the run's state (rank 0 only); every rank waits until the file is complete."""
        dev, rank = self.dev, self.engine.rank
        self.read_rows()
        rank_rngs = {}
        if self.sharded:
            self.acc = distributed.all_reduce_sum(self.acc, dev)
            rank_rngs["torch_rng_ranks"] = distributed.gather_states(torch.get_rng_state(), dev)
            if self.forked:
                rank_rngs["cuda_rng_ranks"] = distributed.gather_states(torch.cuda.get_rng_state(dev), dev)
        if rank == 0:
            save_checkpoint(os.path.join(self.opts.checkpoint_dir, "checkpoint.pt"), self.snapshot(rank_rngs))
        if self.sharded:
            if rank != 0:
                self.acc = torch.zeros_like(self.acc)  # rank 0 now carries the sums (see resume)
            # Nobody goes on (and possibly stops) before the file is complete.
            distributed.barrier(dev)

    # ------------------------------------------------------------------ loop
    def loop(self) -> list:
        """Train from the current position to config.epochs (or a stop). Returns the history."""
        engine = self.engine
        if self.sharded:
            # DDP synchronised the weights when it was built; reset() and resume loaded
            # them since, on each rank from its own copy.
            distributed.broadcast_state(engine.model, self.dev)
        self.bar = progress_bar(self.data.total, self.opts.progress and engine.rank == 0, "fine-tune",
                                initial=self.step)
        engine.model.train()
        try:
            while self.epoch < self.cfg.epochs:
                self.run_epoch()
        except StopRun:
            pass
        finally:
            self.bar.close()
            engine.opt.zero_grad(set_to_none=True)
            engine.model.eval()
        self.read_rows()
        if self.sharded:
            self.sync_buffers()
        if not all(bool(torch.isfinite(p).all()) for p in engine.model.parameters()):
            raise diverged(self.cfg, "a weight")
        return self.history

    def run_epoch(self) -> None:
        if self.perm is None:
            self.draw_epoch()
        plan = self.plan_epoch()
        self.clock.start()
        while self.batch < self.data.per_epoch:
            self.take_step(plan)
        self.end_epoch(self.clock.stop())

    def next_remain(self) -> torch.Tensor:
        if not self.remain_queue:
            self.remain_queue = list(torch.randperm(self.data.n_remain, generator=self.remain_gen)
                                     .split(self.data.bs))
        return self.remain_queue.pop(0)

    def draw_epoch(self) -> None:
        """The epoch's batch order and augmentation. Drawn at the start of each epoch, whatever
        happens later, so the generators advance the same way in a resumed run."""
        d, aug = self.data, self.cfg.augment
        self.perm = torch.randperm(d.n, generator=self.gen)
        self.remain_idx = [self.next_remain() for _ in range(d.per_epoch)] if d.draw_remain else None
        if aug is not None:
            # Per sample, not per batch position: every rank slices the same draws, so the
            # augmentation does not depend on the world size.
            self.aug_f = draw_augment(aug, d.n, d.aug_pad, self.aug_gen)
            self.aug_r = draw_augment(aug, d.n_remain, d.aug_pad, self.aug_gen) if d.use_remain else None

    def plan_epoch(self) -> EpochPlan:
        """The epoch's indices go to the device once: a per-batch copy from host memory would
        make every step wait for the device."""
        d, dev, engine = self.data, self.dev, self.engine
        perm_dev = self.perm.to(dev, non_blocking=True)
        remain_host = remain_dev = remain_at = None
        if d.use_remain:
            remain_host = torch.cat(self.remain_idx)
            remain_dev = remain_host.to(dev, non_blocking=True)
            remain_at = [0, *itertools.accumulate(r.shape[0] for r in self.remain_idx)]
        plan_epoch(d.fx, d.rx if d.use_remain else None, self.perm, remain_host, remain_at, self.batch, d.per_epoch,
                   d.bs, engine.rank, engine.world)
        return EpochPlan(perm_dev=perm_dev, remain_host=remain_host, remain_dev=remain_dev, remain_at=remain_at,
                         aug_f=params_on(self.aug_f, dev), aug_r=params_on(self.aug_r, dev),
                         targets=d.targets[self.epoch % len(d.targets)])

    def take_step(self, plan: EpochPlan) -> None:
        """One batch: the step, then the counters, a checkpoint when due, and on_step."""
        opts = self.opts
        if opts.max_steps is not None and self.step >= opts.max_steps:
            raise StopRun(f"stopped after max_steps={opts.max_steps}")
        self.acc += self.batch_losses(plan)
        self.batch += 1
        self.step += 1
        self.bar.update(1)
        if opts.checkpoint_every and self.step % opts.checkpoint_every == 0:
            self.epoch_seconds += self.clock.stop()()
            self.write_checkpoint()
            self.clock.start()
        if opts.on_step is not None:
            opts.on_step(self.step, {"epoch": self.epoch, "batch": self.batch, "total": self.data.total})

    def batch_losses(self, plan: EpochPlan) -> torch.Tensor:
        """Gather this rank's rows of the current batch and take the engine's step on them."""
        d, dev, engine, b = self.data, self.dev, self.engine, self.batch
        rows = slice(b * d.bs, min(d.n, (b + 1) * d.bs))
        shares = None
        if self.sharded:
            rows, share_f = distributed.rank_rows(rows, engine.rank, engine.world)
            shares = (share_f, 1.0)
        idx, host_idx = plan.perm_dev[rows], self.perm[rows]
        xf, tf = gather(d.fx, idx, host_idx, dev), gather(plan.targets, idx, host_idx, dev)
        if plan.aug_f is not None:
            xf = apply_augment(xf, plan.aug_f, idx, d.aug_pad)
        if not d.use_remain:
            return engine.step(xf, tf, shares=shares)
        rrows = slice(plan.remain_at[b], plan.remain_at[b + 1])
        if self.sharded:
            rrows, share_r = distributed.rank_rows(rrows, engine.rank, engine.world)
            shares = (share_f, share_r)
        ridx, host_ridx = plan.remain_dev[rrows], plan.remain_host[rrows]
        xr, yr = gather(d.rx, ridx, host_ridx, dev), gather(d.ry, ridx, host_ridx, dev)
        if plan.aug_r is not None:
            xr = apply_augment(xr, plan.aug_r, ridx, d.aug_pad)
        return engine.step(xf, tf, xr, yr, shares=shares)

    def end_epoch(self, seconds: Callable[[], float]) -> None:
        """Queue the epoch's history row (with the probe's numbers) and start the next epoch."""
        model = self.engine.model
        if self.sharded:
            self.acc = distributed.all_reduce_sum(self.acc, self.dev)
            self.sync_buffers()
        extra = {}
        if self.opts.probe:
            model.eval()
            extra = self.opts.probe(model)
            model.train()
        self.pending.append((self.epoch + 1, self.acc / self.data.per_epoch, self.epoch_seconds, seconds, extra))
        # The last epoch but one is read (and checked for divergence) now: reading it does
        # not stall the device, whose queue still holds this epoch.
        self.read_rows(keep=1)
        self.epoch, self.batch, self.perm, self.remain_idx = self.epoch + 1, 0, None, None
        self.acc = torch.zeros(3, dtype=torch.float64, device=self.dev)
        self.epoch_seconds = 0.0

    def read_rows(self, keep: int = 0) -> None:
        """Append the pending epochs' rows to the history, all but the last ``keep``."""
        while len(self.pending) > keep:
            number, mean_losses, carried, seconds, extra = self.pending.pop(0)
            sums = mean_losses.tolist()
            if not all(math.isfinite(v) for v in sums):
                raise diverged(self.cfg, f"the loss of epoch {number}")
            row = {"epoch": number, "loss": sums[0], "forget_loss": sums[1], "seconds": carried + seconds()}
            if self.data.use_remain:
                row["remain_loss"] = sums[2]
            row.update(extra)
            self.history.append(row)
            self.bar.set_postfix(epoch=number, loss=f"{sums[0]:.4f}", refresh=False)

    def sync_buffers(self) -> None:
        # DDP broadcasts rank 0's buffers (BatchNorm running statistics) at the start of each
        # forward, so after the last one each rank holds its own; the probe and the result
        # take rank 0's, as the next forward would.
        distributed.broadcast_state(self.engine.model, self.dev, buffers_only=True)


def rank_rng(state: dict, key: str, rank: int, world: int) -> torch.Tensor:
    """The RNG state this rank saved, or rank 0's when the checkpoint was written by another
    number of processes (or by one)."""
    per_rank = state.get(key + "_ranks")
    if per_rank is not None and per_rank.shape[0] == world:
        return per_rank[rank].clone()
    return state[key]
