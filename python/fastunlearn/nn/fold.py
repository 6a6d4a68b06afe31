"""BatchNorm folding: an eval-mode BatchNorm after a convolution becomes part of its weights."""

from __future__ import annotations

import warnings

import torch
import torch.fx
import torch.nn as nn

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _own_forward(m: nn.Module) -> bool:
    """The module runs its class's forward: no forward set on the instance (as
    finetune.fuse_batch_norm_relu does for a run, where a BatchNorm may also apply the ReLU
    after it)."""
    return "forward" not in m.__dict__


def _foldable_conv(m: nn.Module) -> bool:
    return (any(type(m).forward is c.forward and isinstance(m, c) for c, _ in _CONV_BN)
            and _own_forward(m) and not has_hooks(m) and not torch.nn.utils.parametrize.is_parametrized(m)
            and not torch.nn.parameter.is_lazy(m.weight) and m.weight.is_floating_point())


def _foldable_bn(m: nn.Module, conv: nn.Module) -> bool:
    """An eval-mode BatchNorm of conv's dimensionality, using its running statistics: an
    affine map per channel, which the convolution before it can absorb."""
    bn_type = next(b for c, b in _CONV_BN if isinstance(conv, c))
    return (isinstance(m, bn_type) and type(m).forward is bn_type.forward and _own_forward(m) and not m.training
            and m.track_running_stats and m.running_mean is not None and m.num_features == conv.out_channels
            and not has_hooks(m))


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or m._state_dict_hooks)


def _conv_bn_pairs(model: nn.Module, mods: dict) -> list:
    """(conv name, BatchNorm name) pairs where the BatchNorm takes the convolution's output
    and nothing else does. Plain nn.Sequential runs give them without tracing; other
    models are traced with torch.fx (a model it cannot trace keeps its other BatchNorms).
    mods: dict(model.named_modules())."""
    # A module reachable by two paths, or a weight shared with another module, would carry
    # the fold into places that have no BatchNorm after them.
    seen_mods: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen_mods[id(m)] = seen_mods.get(id(m), 0) + 1
    seen_params: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen_params[id(p)] = seen_params.get(id(p), 0) + 1

    def single(*ms):
        return all(seen_mods[id(m)] == 1 and all(seen_params[id(p)] == 1 for p in m.parameters(recurse=False))
                   for m in ms)

    pairs, taken = [], set()
    for name, seq in mods.items():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue  # a Sequential subclass with its own forward may use its children otherwise (the
            # isinstance test first: reading forward off a TorchScript module class raises)
        kids = list(seq.named_children())
        for (a_name, a), (b_name, b) in zip(kids, kids[1:]):
            if _foldable_conv(a) and _foldable_bn(b, a) and single(a, b):
                pair = (f"{name}.{a_name}" if name else a_name, f"{name}.{b_name}" if name else b_name)
                pairs.append(pair)
                taken.update(pair)
    left = [n for n, m in mods.items() if n not in taken and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not left:
        return pairs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and the like: keep the pairs found
        return pairs
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or node.target in taken or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and prev.target not in taken):
            continue
        conv, bn = mods.get(prev.target), mods.get(node.target)
        # Each called once, the convolution's output read by the BatchNorm only: then the
        # fold changes nothing else the model computes.
        if (conv is not None and bn is not None and calls[prev.target] == 1 and calls[node.target] == 1
                and len(prev.users) == 1 and _foldable_conv(conv) and _foldable_bn(bn, conv) and single(conv, bn)):
            pairs.append((prev.target, node.target))
            taken.update((prev.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm that directly follows a convolution into its weights and
    bias, in place, and put an Identity where the BatchNorm was. Returns the number folded.

    For a frozen model (eval mode, running statistics) BN(conv(x)) = conv'(x) with
    W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps) per output channel,
    computed in float64. The search then skips a read and a write of every such activation
    in the forward and again in the input backward (bench/RESULTS.md measures the gain).
    Only pairs where
    nothing else reads the convolution's output are folded; modules reachable twice, shared
    weights, hooks and parametrizations are left alone.
    """
    mods = dict(model.named_modules())
    pairs = _conv_bn_pairs(model, mods)
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        w = conv.weight
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + bn.eps)
        b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        w.copy_(w.double() * s.reshape((-1,) + (1,) * (w.dim() - 1)))  # copy_ keeps the weight's layout
        bias = ((b0 - mean) * s + beta).to(device=w.device, dtype=w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=False)
        else:
            conv.bias.copy_(bias)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(mods[parent_name] if parent_name else model, attr, nn.Identity())
    return len(pairs)
