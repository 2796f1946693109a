"""The one rich console every robbench command prints through."""
from __future__ import annotations

import sys
from functools import lru_cache

from rich.console import Console


@lru_cache(maxsize=1)
def console() -> Console:
    """The terminal's console; when output goes to a file or a CI log, a 200-column one (rich would assume
    80 there and fold the wide leaderboard and progress bars)."""
    return Console() if sys.stdout.isatty() else Console(width=200)
