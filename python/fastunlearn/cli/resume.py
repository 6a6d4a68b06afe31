"""Checkpoints, resume and Ctrl-C for a command's fine-tune: --checkpoint-dir, --checkpoint-every,
--resume, and one line (the step reached, the command that resumes) instead of a traceback."""

from __future__ import annotations

import os
import shlex

CHECKPOINT_FILE = "checkpoint.pt"


class Interrupted(SystemExit):
    """Ctrl-C during a run: exits with 130 after its one-line message."""

    def __init__(self, message: str):
        super().__init__(130)
        self.message = message


def add_resume_args(p) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", help="write a resumable checkpoint (checkpoint.pt) here during the fine-tune")
    g.add_argument("--checkpoint-every", type=int,
                   help="fine-tune steps between checkpoints (when not given: one epoch's steps)")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from this checkpoint.pt, with the same data and settings as the run that wrote it")


def resume_command(argv, checkpoint: str) -> str:
    """The command line that continues an interrupted run from ``checkpoint``."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if not a.startswith("--resume="):
            rest.append(a)
    return shlex.join(["fastunlearn", *rest, "--resume", checkpoint])


def run_resumable(args, call, n_forget: int, config):
    """Run ``call(**checkpoint kwargs)`` with the checkpoint flags; Ctrl-C raises Interrupted
    with the step reached and, when checkpoints were written, the command that resumes."""
    every = args.checkpoint_every
    if every is not None and every < 1:
        raise SystemExit(f"error: --checkpoint-every must be >= 1, got {every}")
    if args.checkpoint_dir:
        if not os.path.isdir(args.checkpoint_dir):
            raise SystemExit(f"error: --checkpoint-dir {args.checkpoint_dir} does not exist (create it first)")
        every = every or -(-n_forget // config.batch_size)
    elif every:
        raise SystemExit("error: --checkpoint-every needs --checkpoint-dir")
    if args.resume and not os.path.isfile(args.resume):
        raise SystemExit(f"error: --resume {args.resume}: no such checkpoint file")
    reached = {"step": 0, "total": None}

    def on_step(step, info):
        reached["step"], reached["total"] = step, info["total"]

    try:
        return call(checkpoint_dir=args.checkpoint_dir, checkpoint_every=every or 0, resume=args.resume,
                    on_step=on_step)
    except KeyboardInterrupt:
        where = (f"at step {reached['step']} of {reached['total']}" if reached["total"]
                 else "before the fine-tune started")
        saved = os.path.join(args.checkpoint_dir, CHECKPOINT_FILE) if args.checkpoint_dir else None
        if saved and os.path.isfile(saved):
            hint = "resume with: " + resume_command(getattr(args, "argv", []), saved)
        else:
            hint = "no checkpoint was written; add --checkpoint-dir DIR to make the run resumable"
        raise Interrupted(f"interrupted {where}; nothing was written to {args.out}; {hint}") from None
