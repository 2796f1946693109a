"""Named crash points, for the crash-and-resume tests.

``ROBBENCH_CRASH_AT=name`` (or ``name:N``) makes the process SIGKILL itself the first (N-th) time it
reaches ``reached(name)``. Points: ``checkpoint-save`` (checkpoint written to its temporary file, not
yet renamed), ``ext-build`` (extension build lock held, build not finished), ``rows-written`` (a batch of
results committed), ``leaderboard-write`` (leaderboard temporaries written, not yet renamed).
Without the variable a point costs one environment lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "ROBBENCH_CRASH_AT"
_seen: dict[str, int] = {}


def reached(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
