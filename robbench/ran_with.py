"""What actually ran: the resolved attack engine and Monte Carlo backend behind each result.

``--backend auto`` and the attack parameter ``engine: auto`` are stored in the job as "auto"; which
backend and engine they resolve to depends on the machine (the compiled extension loads, or not, and
then both fall back to ``torch``). The torch attack engine's margins differ slightly from the compiled
one's, so a row must say which ran. :func:`evaluate_batch <robbench.execute.evaluate_batch>` runs each
estimator inside :func:`recording`; the code that resolves a choice calls :func:`note`; each row of the
batch stores the summary (``ResultRow.ran_with``, e.g. ``{"attack_engine": "compiled", "mc_backend":
"cpp"}``; a kind absent when nothing of it ran). Resuming a job whose stored rows ran another attack
engine is refused (:func:`robbench.runner.Runner`).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

ATTACK_ENGINE = "attack_engine"  # "compiled" or "torch" (plugins/attacks.py, max_damage)
MC_BACKEND = "mc_backend"  # the Monte Carlo backend's name, e.g. "cpp", "torch" (robbench.montecarlo)

# a context variable, not a module global: a thread started elsewhere (a Ray worker thread, a test's
# thread) records into its own block only
_active: ContextVar[tuple[dict[str, set[str]], ...]] = ContextVar("robbench_ran_with", default=())


def note(kind: str, name: str) -> None:
    """Say that ``name`` ran as ``kind`` (ATTACK_ENGINE, MC_BACKEND) in every enclosing :func:`recording`
    block of this context; nothing happens outside such a block."""
    for record in _active.get():
        record.setdefault(kind, set()).add(name)


@contextmanager
def recording() -> Iterator[dict[str, set[str]]]:
    """Collect the :func:`note` calls made inside the block: kind -> the names that ran."""
    record: dict[str, set[str]] = {}
    token = _active.set(_active.get() + (record,))
    try:
        yield record
    finally:
        _active.reset(token)


def summary(record: dict[str, set[str]]) -> dict[str, str]:
    """kind -> name, several names joined by "+" in name order (a batch whose portfolio members ran on
    different engines, say); {} when nothing was noted."""
    return {kind: "+".join(sorted(names)) for kind, names in sorted(record.items()) if names}
