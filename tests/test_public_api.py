"""The public surface: every fu.* name, and every command, flag and default of the CLI, as
recorded in tests/cli/cli_surface.json from the command line as it stood before the package
was split into subpackages."""

import argparse
import json
import os

import fastunlearn as fu
from fastunlearn.cli.main import build_parser

PUBLIC = ["UnlearnConfig", "UnlearnResult", "Unlearner", "__version__", "backends", "boundary_relabel", "compose",
          "evaluate", "interpolate", "report", "sweep", "unlearn"]


def test_public_names():
    assert sorted(fu.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(fu, name) is not None, name
    assert callable(fu.unlearn) and isinstance(fu.UnlearnConfig(), fu.UnlearnConfig)


def surface(parser: argparse.ArgumentParser) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, sp in sub.choices.items():
        out[name] = {"/".join(a.option_strings) or a.dest: repr(a.default) for a in sp._actions if a.dest != "help"}
        defaults = sorted((k, v.__name__ if callable(v) else v) for k, v in sp._defaults.items())
        out[name]["<set_defaults>"] = repr(defaults)
    return out


def test_every_command_flag_and_default():
    with open(os.path.join(os.path.dirname(__file__), "cli", "cli_surface.json")) as f:
        want = json.load(f)
    got = surface(build_parser())
    assert sorted(got) == sorted(want)
    for command in want:
        assert got[command] == want[command], command
