"""`fastunlearn backends`: which fused-op backends are available, and why not."""

from __future__ import annotations

from fastunlearn.runtime.backends import backends


def cmd_backends(args):
    for k, v in backends().items():
        print(f"{k:7s} {v}")


def add_parser(sub, fmt):
    b = sub.add_parser("backends", help="which fused-op backends are available, and why not", formatter_class=fmt,
                       description="List the backends of the fused ops (torch, cpu, cuda, triton), each with "
                       "whether it can run here and, if not, why. `--backend auto` picks the fastest available.")
    b.set_defaults(func=cmd_backends)
