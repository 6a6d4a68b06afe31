"""What the commands check before any work, and how their errors speak: the output path is
usable and overwrites no input, and a message names the flag the user typed (--lr), not the
Python field behind it (UnlearnConfig.lr)."""

from __future__ import annotations

import os
import re
import sys


def check_output(path: str, inputs=(), force: bool = False, flag: str = "--out") -> None:
    """Refuse an output path before any work: its folder must exist and be writable, it must
    not be a folder, and it must not be one of ``inputs`` unless ``force``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {flag} {path}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: the folder {folder} is not writable")
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise SystemExit(f"error: {flag} {path} exists and is not writable")
    for given in filter(None, inputs):
        if os.path.exists(given) and os.path.exists(path) and os.path.samefile(given, path) and not force:
            raise SystemExit(f"error: {flag} {path} is also an input ({given}); writing it would replace the "
                             "original. Choose another name, or pass --force to overwrite it")


def check_output_folder(path: str, flag: str = "--out") -> None:
    """A folder output (a report): it may be created, but its parent must exist and be writable."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise SystemExit(f"error: {flag} {path}: the folder is not writable")
        return
    if os.path.exists(path):
        raise SystemExit(f"error: {flag} {path} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SystemExit(f"error: {flag} {path}: its parent folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: its parent folder {parent} is not writable")


_FIELD = re.compile(r"\b(?:UnlearnConfig|config)\.([a-z_]+)")


def as_flags(message: str) -> str:
    """A library message with each config field (UnlearnConfig.lr, config.remain_reg) written
    as the command-line flag that sets it (--lr, --remain-reg)."""
    return _FIELD.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def say(args, line: str) -> None:
    """A progress line on stderr, unless --no-progress."""
    if not getattr(args, "no_progress", False):
        print(line, file=sys.stderr, flush=True)
