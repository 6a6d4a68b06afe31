"""The outer fine-tune (Algorithms 2 and 3) on the relabelled forget set.

loss = CE(f_w(u_f), y_b) + rho * R, with R the cross-entropy of a remain batch to its true
labels or to the original model's outputs (distillation); soft / top-k targets use the
soft cross-entropy. The losses are losses.forget_loss and losses.remain_loss.

Where the time goes, and what this module does about it:

* Data stays where the model is, as uint8 when it arrives as uint8; a batch is gathered
  by index and converted (/255, mean/std, layout) inside the train step, so there is no
  per-sample Python and no host round trip per batch.
* On CUDA the whole eager step (forward(s), loss, backward, fused SGD) is captured in a
  CUDA graph after two warm-up steps per batch shape and replayed: at batch 64 the
  launches of a few hundred small kernels, not the arithmetic, bound an eager step.
  torch.compile can take the step instead (config.compile; then with "reduce-overhead"
  graphs), at a compile cost of tens of seconds. SGD is fused (CUDA) or foreach (CPU).
* Conv models run channels_last (see default_channels_last). On CPU each BatchNorm2d runs
  as one native op fused with the ReLU after it (fuse_batch_norm_relu): PyTorch's CPU
  BatchNorm, unfused and in channels_last, cost more than the convolutions at few channels.
* With remain_reg = 0 the remain set is never read.

BatchNorm: by default the forget and remain batches go through the model in separate
forwards (remain first, then forget, as the authors' loop does), so each batch sets the
batch statistics of its own forward. config.joint_batch=True runs one forward over both.

Batch order comes from seeded generators. A checkpoint holds the model, the optimizer, the
generators, the batch order of the current epoch, the global RNG and the search result,
so a resumed run continues with exactly the steps it would have taken (bitwise on CPU).

More than one process (a torch.distributed process group of size W > 1): the model is
wrapped in DistributedDataParallel and config.batch_size is the global batch. Every rank
draws the same seeded batch order and takes a contiguous slice of each global batch (of
the forget batch and of the remain batch), and weights its loss so that DDP's averaged
gradient is the gradient of the one-process loss, the mean over the whole global batch,
last partial batch included. Without BatchNorm or dropout the result equals a one-process
run up to float rounding. BatchNorm normalises each rank's slice with its own batch
statistics (the usual data-parallel equivalence, not the one-process numbers; running
statistics follow rank 0's slices, which DDP broadcasts at each forward), and dropout
draws its masks per rank. Only rank 0 writes checkpoints, and every rank waits until the
file is complete, so all ranks can resume from the same path.

This module holds the engine and its train step; a run's state and epoch loop are in
engine.loop, batch gathering and augmentation in engine.batches, the per-epoch probe in
engine.probe.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from fastunlearn.compose import frozen_batchnorm
from fastunlearn.config import UnlearnConfig
from fastunlearn.data.pixels import to_float
from fastunlearn.data.validate import resolve_device
from fastunlearn.engine import distributed, losses
from fastunlearn.engine.errors import DivergedError as DivergedError  # re-exported: part of this module's API
from fastunlearn.engine.errors import StopRun as StopRun
from fastunlearn.engine.loop import run_finetune
from fastunlearn.engine.search import SearchResult
from fastunlearn.nn.fuse import batch_norm_fusion_on, fuse_batch_norm_relu
from fastunlearn.nn.layout import channels_last_input, default_channels_last
from fastunlearn.runtime.heap import reuse_freed_memory
from fastunlearn.runtime.phases import phase
from fastunlearn.runtime.precision import resolve_precision


def resolve_compile(setting) -> bool:
    """config.compile resolved: "auto" does not compile. Compiling costs tens of seconds on
    CPUs and GPUs alike, more than a whole default run takes; on CUDA the eager step under a
    CUDA graph already removes the launch overhead."""
    if setting == "auto":
        return False
    return bool(setting)


# Eager steps per batch shape before it is captured: the first ones set up cuDNN plans,
# cuBLAS workspaces and the optimizer's momentum buffers, none of which may happen inside
# a capture.
GRAPH_WARMUP_STEPS = 2
# Each capture keeps its own activation memory; past this many batch shapes (forget x
# remain sizes), new shapes run eagerly.
MAX_GRAPHS = 4


class _GraphedStep:
    """One captured train step for one batch shape: static inputs, the graph, its output."""

    def __init__(self, graph, inputs, out):
        self.graph, self.inputs, self.out = graph, inputs, out

    def __call__(self, *args):
        for static, new in zip(self.inputs, args):
            if static is not None:
                static.copy_(new)
        self.graph.replay()
        return self.out.clone()


class FinetuneEngine:
    """The train step and the epoch loop for one trainable model, reusable across runs.

    ``model`` is trained in place (pass a copy). ``teacher`` is the frozen original, needed
    for remain_target="distill". The compiled step is kept between runs, so a second run
    on the same engine pays no compile time. Built while a process group of several ranks
    is initialised, the engine trains data-parallel (see the module notes); build it on
    every rank with the same model and config.
    """

    def __init__(self, model: nn.Module, config: UnlearnConfig, *, mean=None, std=None, device=None,
                 teacher: Optional[nn.Module] = None, channels_last: Optional[bool] = None,
                 compile_mode: Optional[str] = None, sample_shape: Optional[tuple] = None):
        self.device = resolve_device(model, device)
        self.config = config
        # compat="authors": fp32 throughout, as the published loop.
        self.autocast = None if config.compat == "authors" else resolve_precision(config.precision, self.device,
                                                                                  model, sample_shape)
        self.rank, self.world = distributed.world()
        self.compiled = resolve_compile(config.compile)
        if self.world > 1 and self.compiled:
            # Under DDP the step runs eagerly. DDP all-reduces gradient buckets from autograd
            # hooks during the backward; a compiled step keeps that only when Dynamo splits
            # the graph at the bucket boundaries, and the CUDA default here adds CUDA graphs
            # on top. An eager step keeps the gradient sync plainly correct.
            if config.compile is True:
                warnings.warn("compile=True is ignored under torch.distributed: the data-parallel train step "
                              "runs eagerly", stacklevel=2)
            self.compiled = False
        self.batch_norm_fused = batch_norm_fusion_on(self.device, self.compiled, config)
        self.channels_last = (default_channels_last(model, self.device, self.autocast, self.batch_norm_fused)
                              if channels_last is None else channels_last)
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher = teacher
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.compile_mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.compile_seconds = 0.0
        self._seen = set()
        graph = config.cuda_graph
        if graph != "auto" and graph and (self.device.type != "cuda" or self.world > 1 or self.compiled):
            raise ValueError("cuda_graph=True needs a CUDA device, one process and compile off; got device "
                             f"{self.device}, {self.world} process(es), compile={self.compiled}")
        self.cuda_graph = bool(graph) and self.device.type == "cuda" and self.world == 1 and not self.compiled
        self._graphs: dict = {}
        self._eager_steps: dict = {}
        self.opt = self._make_optimizer()
        self._steps = {}
        self._reset_src: Optional[list] = None  # the state tensors reset() copied from last
        self._reset_dst: list = []
        # What the loss function calls: the model itself, or its DDP wrapper (which shares
        # the parameters, so the optimizer and state_dict of self.model stay the ones to use).
        # DDP copies rank 0's weights into every rank when it is built.
        self.net = self.model if self.world == 1 else distributed.wrap_ddp(self.model, self.device)

    # ----------------------------------------------------------------- pieces
    def _make_optimizer(self):
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.SGD(self.model.parameters(), lr=self.config.lr, momentum=self.config.momentum, **kw)

    def reset(self, state_dict: dict):
        """Load the original weights and clear the optimizer: the next run starts afresh."""
        with torch.no_grad():
            src = list(state_dict.values())
            if self._reset_src is not None and len(src) == len(self._reset_src) and all(
                    a is b for a, b in zip(src, self._reset_src)):
                # The same tensors as last time, already checked: one foreach copy instead
                # of load_state_dict's walk over the modules (a warm revision's reset).
                torch._foreach_copy_(self._reset_dst, src)
            else:
                self.model.load_state_dict(state_dict)
                own = self.model.state_dict(keep_vars=True)
                dst = [own[k] for k in state_dict]
                # The fast path is kept for tensors that copy_ needs no conversion for.
                same = all(a.device == b.device and a.dtype == b.dtype for a, b in zip(src, dst))
                self._reset_src, self._reset_dst = (src, dst) if same else (None, [])
            if self._graphs:
                # The graphs read these buffers at fixed addresses: zero them in place. With
                # dampening 0, SGD's first step from a zero buffer is its first step (buf = g).
                bufs = [st["momentum_buffer"] for st in self.opt.state.values()
                        if st.get("momentum_buffer") is not None]
                if bufs:
                    torch._foreach_zero_(bufs)
            else:
                self.opt.state.clear()
        for p in self.model.parameters():
            p.grad = None

    @property
    def step_mode(self) -> str:
        """How the step runs: compiled, cuda graph (a batch shape replays a capture) or eager."""
        return "compiled" if self.compiled else "cuda graph" if self._graphs else "eager"

    def drop_graphs(self):
        """Forget the captured steps (after anything replaced the tensors they read)."""
        self._graphs.clear()
        self._eager_steps.clear()

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Model input from raw pixels (uint8 or float in [0, 1]), inside the step."""
        u = to_float(x)
        if self.mean is not None:
            shape = (1, -1) + (1,) * (u.dim() - 2)
            u = (u - self.mean.reshape(shape)) / self.std.reshape(shape)
        if self.channels_last and u.dim() == 4:
            u = channels_last_input(u)
        return u

    def _loss_fn(self, use_remain: bool):
        """forward(s) + loss, the part torch.compile takes; flags are fixed per function.

        With several ranks the function takes two more arguments, wf and wr: this rank's
        share of the global forget and remain batch (rows here / rows in the global batch).
        It then returns this rank's share of the global mean losses, whose sum over the
        ranks is the one-process loss.
        """
        cfg = self.config
        rho = float(cfg.remain_reg)
        distill = cfg.remain_target == "distill"
        raw = cfg.compat == "authors"  # their use_logits: the teacher's raw logits as the target
        joint = cfg.joint_batch
        dev_type = self.device.type
        ac = self.autocast
        net = self.net
        # A graph capture must not meet weight casts cached outside it.
        cache = not self.cuda_graph

        def logits_of(nf, nr):
            teacher_logits = None
            if distill:
                with torch.no_grad():
                    teacher_logits = self.teacher(nr)
            if joint:
                logits = net(torch.cat([nf, nr]))
                return logits[:nf.shape[0]], logits[nf.shape[0]:], teacher_logits
            # The authors' order: remain forward first, then forget; each updates the
            # BatchNorm running statistics in that order.
            lr_logits = net(nr)
            return net(nf), lr_logits, teacher_logits

        def loss_fn(xf, tf, xr=None, yr=None):
            nf = self._input(xf)
            with torch.autocast(dev_type, dtype=ac or torch.float32, enabled=ac is not None, cache_enabled=cache):
                if not use_remain:
                    loss_f = losses.forget_loss(net(nf), tf)
                    return loss_f, loss_f.detach(), torch.zeros_like(loss_f).detach()
                lf_logits, lr_logits, teacher_logits = logits_of(nf, self._input(xr))
                loss_r = losses.remain_loss(lr_logits, yr, teacher_logits, cfg.remain_target, raw)
                loss_f = losses.forget_loss(lf_logits, tf)
                return loss_f + rho * loss_r, loss_f.detach(), loss_r.detach()

        def share(mean_loss, logits, weight):
            # A rank whose slice of a short last batch is empty still joins the gradient
            # all-reduce: it contributes zeros (the mean over no rows would be NaN).
            if logits.shape[0] == 0:
                return logits.float().sum() * 0.0
            return mean_loss() * weight

        def sharded_loss_fn(xf, tf, xr=None, yr=None, wf=1.0, wr=1.0):
            nf = self._input(xf)
            with torch.autocast(dev_type, dtype=ac or torch.float32, enabled=ac is not None):
                if not use_remain:
                    logits = net(nf)
                    loss_f = share(lambda: losses.forget_loss(logits, tf), logits, wf)
                    return loss_f, loss_f.detach(), torch.zeros_like(loss_f).detach()
                lf_logits, lr_logits, teacher_logits = logits_of(nf, self._input(xr))
                loss_r = share(lambda: losses.remain_loss(lr_logits, yr, teacher_logits, cfg.remain_target, raw),
                               lr_logits, wr)
                loss_f = share(lambda: losses.forget_loss(lf_logits, tf), lf_logits, wf)
                return loss_f + rho * loss_r, loss_f.detach(), loss_r.detach()

        if self.world > 1:
            return sharded_loss_fn  # never compiled: see __init__
        if self.compiled:
            loss_fn = torch.compile(loss_fn, mode=self.compile_mode, dynamic=False)
        return loss_fn

    def step(self, xf, tf, xr=None, yr=None, shares: Optional[tuple] = None) -> torch.Tensor:
        """One SGD step. Returns (loss, forget_loss, remain_loss) as a (3,) tensor on the device.

        shares: with several ranks, (wf, wr), this rank's fraction of the global forget and
        remain batch; the returned losses are then this rank's part of the global means.
        """
        use_remain = xr is not None
        fn = self._steps.get(use_remain)
        if fn is None:
            fn = self._steps[use_remain] = self._loss_fn(use_remain)
        # Shapes and dtypes: a captured step copies new inputs into its own fixed buffers.
        key = (use_remain, tuple(xf.shape), xf.dtype, tuple(tf.shape), tf.dtype,
               None if xr is None else (tuple(xr.shape), xr.dtype, tuple(yr.shape)))
        if self.cuda_graph and shares is None:
            return self._graph_step(fn, key, xf, tf, xr, yr)
        return self._eager_step(fn, key, xf, tf, xr, yr, shares)

    def _graph_step(self, fn, key, xf, tf, xr, yr):
        graphed = self._graphs.get(key)
        if graphed is not None:
            return graphed(xf, tf, xr, yr)
        if len(self._graphs) >= MAX_GRAPHS:
            return self._eager_step(fn, key, xf, tf, xr, yr, None)  # never captured: no warm-up
        with phase("finetune/capture"):
            return self._warm_up_or_capture(fn, key, xf, tf, xr, yr)

    def _warm_up_or_capture(self, fn, key, xf, tf, xr, yr):
        done = self._eager_steps.get(key, 0)
        if done < GRAPH_WARMUP_STEPS:
            self._eager_steps[key] = done + 1
            # Warm-up on a side stream, as capture asks: lazily made state belongs to it.
            main = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self._eager_step(fn, key, xf, tf, xr, yr, None)
            main.wait_stream(side)
            return out
        inputs = tuple(None if t is None else t.clone() for t in (xf, tf, xr, yr))
        # Gradients are made inside the capture, in its memory pool, so that every replay
        # writes (not accumulates) them where its SGD step reads them.
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss, lf, lr = fn(*inputs)
                out = torch.stack([loss.detach(), lf, lr])
                loss.backward()
                self.opt.step()
        except RuntimeError as e:  # something in the model that a graph cannot hold
            warnings.warn(f"CUDA graph capture of the train step failed, running it eagerly: {e}", stacklevel=3)
            self.cuda_graph = False
            self.opt.zero_grad(set_to_none=True)
            return self._eager_step(fn, key, xf, tf, xr, yr, None)
        graphed = self._graphs[key] = _GraphedStep(graph, inputs, out)
        return graphed(xf, tf, xr, yr)  # the capture recorded the step; the replay runs it

    def _eager_step(self, fn, key, xf, tf, xr, yr, shares):
        first = self.compiled and key not in self._seen
        t0 = time.perf_counter() if first else 0.0
        if self.compiled and self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        if shares is None:
            loss, lf, lr = fn(xf, tf, xr, yr)
        else:
            loss, lf, lr = fn(xf, tf, xr, yr, *shares)
        # Copied out at once: CUDA-graph outputs live in a pool that later replays reuse.
        out = torch.stack([loss.detach(), lf, lr])
        self.opt.zero_grad(set_to_none=True)
        if self.world > 1:
            # DDP averages the gradients over the ranks; the sum of the ranks' shares is the
            # global mean, so each rank backpropagates world x its share.
            (loss * self.world).backward()
        else:
            loss.backward()
        self.opt.step()
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds += time.perf_counter() - t0
            self._seen.add(key)
        return out

    # ------------------------------------------------------------------- run
    def run(self, forget_x: torch.Tensor, search: SearchResult, remain=None, *, progress: bool = True,
            probe=None, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
            resume: Optional[Union[str, dict]] = None, on_step: Optional[Callable] = None,
            max_steps: Optional[int] = None) -> list:
        """Train for config.epochs over the forget set. Returns the history (one dict per epoch).

        forget_x: (N, C, H, W) uint8 or float pixels. search: the relabels (epoch e uses refresh
        e % search.refreshes). remain: (x, y) or None; read only when config.remain_reg > 0.
        probe: (forget_probe, remain_probe) pairs or a callable model -> dict, run after each
        epoch. checkpoint_dir / checkpoint_every: write a checkpoint every N steps (atomic).
        resume: a checkpoint path (or its loaded dict) to continue from. on_step(step, info)
        is called after every step (raise StopRun to stop); max_steps stops after that many
        steps in all (counting steps done before a resume).

        With several ranks, call run on every rank with the same arguments; on_step must stop
        every rank at the same step, or the others wait for it forever. checkpoint_dir must be
        on a file system every rank that resumes can read.
        """
        # On CPU every step frees and reallocates its activations: keep them in the heap.
        # The BatchNorm layers run fused only for the run: the model the caller gets back
        # (and any copy of it) has its own forward methods.
        # batchnorm="frozen": hooks set before the fusion, which leaves a hooked layer unfused.
        frozen = contextlib.ExitStack()
        if self.config.batchnorm == "frozen":
            frozen.enter_context(frozen_batchnorm(self.model))
        undo = fuse_batch_norm_relu(self.model) if self.batch_norm_fused else (lambda: None)
        try:
            with reuse_freed_memory(self.device.type == "cpu"):
                return run_finetune(self, forget_x, search, remain, progress=progress, probe=probe,
                                    checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume,
                                    on_step=on_step, max_steps=max_steps)
        finally:
            undo()
            frozen.close()


def finetune(model: nn.Module, forget_x: torch.Tensor, search: SearchResult, config: UnlearnConfig, *,
             remain=None, teacher: Optional[nn.Module] = None, mean=None, std=None, device=None,
             progress: bool = True, probe=None, **run_kw) -> tuple[nn.Module, list]:
    """Fine-tune ``model`` in place (the caller passes its own copy). Returns (model, history).

    A one-shot FinetuneEngine; keep an engine (or a fastunlearn.Unlearner) to reuse the
    compiled step across runs.
    """
    engine = FinetuneEngine(model, config, mean=mean, std=std, device=device, teacher=teacher,
                            sample_shape=tuple(forget_x.shape[1:]))
    history = engine.run(forget_x, search, remain, progress=progress, probe=probe, **run_kw)
    return engine.model, history
