"""The ``robbench`` console script's entry point (and ``python -m robbench``'s).

It imports nothing heavy itself: the command line (:mod:`robbench.cli`) imports torch, about 1.5 s in
which a Ctrl-C used to end in a traceback from deep inside torch's import, before ``cli.main`` could
catch it. Here that import runs inside the same handling: one line on stderr and status 130.
"""
from __future__ import annotations

from typing import Sequence

from robbench.interrupt import run_interruptible


def _import_and_run(argv: list[str]) -> int:
    from robbench.cli import main as cli_main  # imports torch

    return cli_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``robbench`` command; returns its exit status (130 when interrupted, even during imports)."""
    return run_interruptible(_import_and_run, argv)
