"""Models the package does not define, named by a string that a model file records so that
it can be built again: ``torchvision:NAME`` (torchvision.models.get_model) and
``factory:package.module:function`` (a function of the user's, imported by name) and
``program:PATH`` (a TorchScript or torch.export file, see nn.programs).

A factory is called with the recorded keyword arguments (``num_classes`` when given) and
must return an nn.Module; the module must be importable wherever the model file is loaded.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from fastunlearn.nn.programs import PROGRAM, load_program

TORCHVISION = "torchvision:"
FACTORY = "factory:"


def is_external(name: str) -> bool:
    return name.startswith(TORCHVISION) or name.startswith(FACTORY) or name.startswith(PROGRAM)


def _torchvision(name: str, **kwargs) -> nn.Module:
    try:
        models = importlib.import_module("torchvision.models")
    except ImportError as e:
        raise ImportError(f"the model {TORCHVISION}{name} needs the package torchvision, which cannot be imported "
                          f"here ({e}); install torchvision built for this torch, or use --model-factory") from None
    try:
        return models.get_model(name, weights=None, **kwargs)
    except (ValueError, KeyError) as e:
        raise ValueError(f"torchvision has no model {name!r} ({e})") from None


def _factory(spec: str, **kwargs) -> nn.Module:
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"a model factory is named package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"model factory {spec}: cannot import {module_name} ({e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"model factory {spec}: {module_name} has no function {function!r}")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build(name: str, weights: Optional[str] = None, **kwargs) -> nn.Module:
    """The model ``name`` names (torchvision:NAME or factory:module:function, built with
    ``kwargs``; program:PATH, loaded from PATH, kwargs unused); ``weights``: a state_dict
    file to load (.safetensors, or a torch file)."""
    if name.startswith(PROGRAM):
        model = load_program(name[len(PROGRAM):])
    elif name.startswith(TORCHVISION):
        model = _torchvision(name[len(TORCHVISION):], **kwargs)
    elif name.startswith(FACTORY):
        model = _factory(name[len(FACTORY):], **kwargs)
    else:
        raise ValueError(f"{name!r} names no external model (expected {TORCHVISION}NAME, {FACTORY}module:function "
                         f"or {PROGRAM}PATH)")
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model``; a ValueError naming the file when it does not fit."""
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--weights {path} does not fit the model: {' '.join(str(e).split())[:300]}") from None
