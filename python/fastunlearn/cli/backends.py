"""`fastunlearn backends`: which fused-op backends are available, and why not."""

from __future__ import annotations

from fastunlearn.runtime.backends import backends


def cmd_backends(args):
    for k, v in backends().items():
        print(f"{k:7s} {v}")


def add_parser(sub, fmt):
    b = sub.add_parser("backends", help="which fused-op backends are available, and why not")
    b.set_defaults(func=cmd_backends)
