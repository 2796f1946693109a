"""What Ctrl-C prints and the status it ends ``robbench`` with (:func:`run_interruptible`: used by
:mod:`robbench.launch` around the import of the command line and by :func:`robbench.cli.main` around the
command). Imports nothing heavy."""
from __future__ import annotations

import sys
from typing import Callable, Sequence

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def interrupted_message(argv: Sequence[str]) -> str:
    """The one line printed when Ctrl-C stops the command ``argv`` (the arguments after ``robbench``)."""
    # Rows are committed one batch at a time and files are renamed into place, so nothing written is
    # half-done; the run directory's lock is released with the process.
    command = next((a for a in argv if not a.startswith("-")), "")
    resume = ("; the results stored so far are kept: rerun the same command to resume"
              if command in ("run", "train", "reproduce") else "")
    return f"robbench: interrupted{resume}"


def run_interruptible(command: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """``command(argv)`` (``sys.argv[1:]`` when None); Ctrl-C inside it prints :func:`interrupted_message`
    and returns :data:`INTERRUPTED`, without a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        return command(args)
    except KeyboardInterrupt:
        print(interrupted_message(args), file=sys.stderr)
        return INTERRUPTED
