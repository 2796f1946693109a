"""Where robbench keeps things between runs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Trained-model checkpoints and built extensions: ``$ROBBENCH_CACHE`` or ``~/.cache/robbench``."""
    root = os.environ.get("ROBBENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "robbench"
