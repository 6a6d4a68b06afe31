"""Model files and their normalisation on the command line: --mean / --std (the per-channel
normalisation a model expects, on the [0, 1] pixel scale) and the models a command may be
given (a fastunlearn .safetensors file, or a TorchScript / torch.export program)."""

from __future__ import annotations

import math
from typing import Optional


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
    mean = parse_channels(getattr(args, "mean", None), "--mean")
    std = parse_channels(getattr(args, "std", None), "--std")
    if (mean is None) != (std is None):
        raise SystemExit(f"error: give --mean and --std together (got only {'--mean' if mean else '--std'})")
    if mean is None:
        return None, None
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) != channels:
            raise SystemExit(f"error: {flag} gives {len(values)} value(s), but the images have {channels} "
                             f"channel(s); give one per channel")
    if any(s <= 0 for s in std):
        raise SystemExit(f"error: --std must be > 0 for every channel, got {std}")
    return mean, std


def add_normalisation_args(p, what: str) -> None:
    p.add_argument("--mean", help=f"per-channel mean {what} expects, on the [0, 1] pixel scale, comma-separated "
                   "(e.g. 0.485,0.456,0.406); with --std")
    p.add_argument("--std", help="per-channel standard deviation, on the [0, 1] pixel scale, comma-separated; "
                   "with --mean")
