"""What Ctrl-C prints and the status it ends ``robbench`` with (used by :mod:`robbench.launch` while the
command line is imported and by :func:`robbench.cli.main` once it runs). Imports nothing heavy."""
from __future__ import annotations

from typing import Sequence

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def interrupted_message(argv: Sequence[str]) -> str:
    """The one line printed when Ctrl-C stops the command ``argv`` (the arguments after ``robbench``)."""
    # Rows are committed one batch at a time and files are renamed into place, so nothing written is
    # half-done; the run directory's lock is released with the process.
    command = next((a for a in argv if not a.startswith("-")), "")
    resume = ("; the results stored so far are kept: rerun the same command to resume"
              if command in ("run", "train", "reproduce") else "")
    return f"robbench: interrupted{resume}"
