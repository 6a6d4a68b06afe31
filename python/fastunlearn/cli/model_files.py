"""Model files and their normalisation on the command line: --mean / --std (the per-channel
normalisation a model expects, on the [0, 1] pixel scale) and the models a command may be
given (a fastunlearn .safetensors file, or a TorchScript / torch.export program)."""

from __future__ import annotations

import math
import os
from typing import Optional

from fastunlearn.data.checkpoint import load_model
from fastunlearn.nn.programs import INSTEAD, PROGRAM, batchnorm_modes, load_program, program_kind


def parse_channels(text: Optional[str], flag: str) -> Optional[list]:
    """'0.485,0.456,0.406' as a list of floats; None when the flag was not given."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: expected one number per channel, comma-separated "
                         "(e.g. 0.485,0.456,0.406)") from None
    if not all(math.isfinite(v) for v in values):
        raise SystemExit(f"error: {flag} {text!r}: the values must be finite numbers")
    return values


def normalisation(args, channels: int) -> tuple:
    """(mean, std) from --mean / --std, checked against the images' channels; (None, None)
    when neither is given."""
    mean, std = _given_normalisation(args)
    if mean is None:
        return None, None
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) != channels:
            raise SystemExit(f"error: {flag} gives {len(values)} value(s), but the images have {channels} "
                             f"channel(s); give one per channel")
    if any(s <= 0 for s in std):
        raise SystemExit(f"error: --std must be > 0 for every channel, got {std}")
    return mean, std


def add_normalisation_args(p, what: str, when_not_given: str) -> None:
    p.add_argument("--mean", help=f"per-channel mean {what} expects, on the [0, 1] pixel scale, comma-separated "
                   f"(e.g. 0.485,0.456,0.406); with --std (when not given: {when_not_given})")
    p.add_argument("--std", help="per-channel standard deviation, on the [0, 1] pixel scale, comma-separated; "
                   "with --mean")


def _given_normalisation(args) -> tuple:
    mean = parse_channels(getattr(args, "mean", None), "--mean")
    std = parse_channels(getattr(args, "std", None), "--std")
    if (mean is None) != (std is None):
        raise SystemExit(f"error: give --mean and --std together (got only {'--mean' if mean else '--std'})")
    return mean, std


def load_model_file(path: str, device, args=None) -> tuple:
    """(model in eval mode, meta) of --model PATH: a fastunlearn model file, or a TorchScript /
    torch.export program (see nn.programs), whose normalisation is --mean / --std when given
    (else the program takes pixels on the [0, 1] scale). The meta of a program names it as
    its architecture (program:PATH), so the model files written from it load it again."""
    mean, std = _given_normalisation(args)
    kind = program_kind(path)
    if kind is None:
        model, meta = load_model(path, device)
        if mean is not None and (mean, std) != (meta.get("mean"), meta.get("std")):
            raise SystemExit(f"error: {path} records its normalisation (mean {meta.get('mean')}, std "
                             f"{meta.get('std')}); --mean / --std apply to TorchScript and torch.export files")
        return model, meta
    model = load_program(path).to(device).eval()
    meta = {"arch": {"name": PROGRAM + os.path.abspath(path)}, "program": kind}
    if mean is not None:
        meta.update(mean=mean, std=std)
    return model, meta


def check_batchnorm_mode(model, meta: dict, batchnorm: str) -> None:
    """Refuse a --batchnorm mode a program's BatchNorm layers cannot run in (see nn.programs)."""
    if "program" not in meta or batchnorm in batchnorm_modes(model):
        return
    if batchnorm == "train":
        raise SystemExit("error: this torch.export program was exported in eval mode: its BatchNorm layers keep "
                         "their running statistics, so it fine-tunes with --batchnorm frozen only (or " + INSTEAD + ")")
    raise SystemExit("error: the BatchNorm layers of a TorchScript program cannot be held at their running "
                     "statistics; pass --batchnorm train (or " + INSTEAD + ")")
