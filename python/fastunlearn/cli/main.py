"""The `fastunlearn` command: demo, train, retrain, unlearn, eval, compose, report, verify, backends, bench, tune."""

from __future__ import annotations

import argparse
import sys

from fastunlearn.cli import backends, bench, compose, demo, evaluate, report, train, tune, unlearn, verify
from fastunlearn.cli.folder import write_skipped
from fastunlearn.cli.resume import Interrupted
from fastunlearn.cli.safety import as_flags

DESCRIPTION = """\
Targeted unlearning of image classifiers: make a trained model forget a class, part of
a class, or every sample matching a metadata rule, keep its accuracy elsewhere, and show
it with accuracy and membership-inference metrics.

Images are handled in pixel space ([0, 1] or uint8); normalisation (mean/std) is stored
with the model and applied inside. Model files are safetensors written by `train`,
`unlearn` or `compose`.
"""

EPILOG = """\
examples:
  fastunlearn demo                                   # train, forget class 0, compare with retraining
  fastunlearn train --data digits --arch smallcnn --out orig.safetensors
  fastunlearn unlearn --model orig.safetensors --data digits --forget-class 3 --out forgot.safetensors
  torchrun --nproc_per_node=4 -m fastunlearn.cli unlearn --model orig.safetensors --data digits \\
      --forget-class 3 --out forgot.safetensors      # 4 processes; --batch-size is the global batch
  fastunlearn eval --model forgot.safetensors --data digits --forget-class 3
  fastunlearn unlearn --model retina.safetensors --data retina --data-dir DIR \\
      --forget-rule "device == Topcon NW400" --metadata retina_meta.csv --out r2.safetensors
  fastunlearn compose --backbone a.safetensors --head b.safetensors --out c.safetensors
  fastunlearn tune --model orig.safetensors --data digits    # time the speed settings once, cache the choice
"""


COMMANDS = (demo, train, unlearn, evaluate, compose, report, verify, backends, bench, tune)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default once: not when the help already says it, nor when it is None or off."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or "when not given" in text:
            return text
        return super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(prog="fastunlearn", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, HelpFormatter)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = args.func(args)
        if rc in (None, 0):
            write_skipped(args)
    except Interrupted as e:
        print(e.message, file=sys.stderr)
        return 130
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)  # a refusal: "error: ..." in one line
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: fastunlearn {args.command} stopped; nothing more was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as e:
        # One line, the flags as the user typed them; never a traceback for bad input (a missing
        # optional package, such as torchvision for --arch torchvision:NAME, included).
        print(as_flags(f"error: {e}"), file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
