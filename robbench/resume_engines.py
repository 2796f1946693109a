"""A resumed job never mixes attack engines: its rows come from one resolved engine, or the run stops.

The attack parameter ``engine: auto`` is part of the job key as "auto"; it resolves to the compiled
engine where the extension loads and to ``torch`` where it does not (no compiler, a failed build), and
the two engines' margins differ slightly (README, "attack engines"). Each row records what ran
(``ResultRow.ran_with``, :mod:`robbench.ran_with`), so a resume can tell. A resume whose new rows would
come from another engine than the job's stored rows is refused with :class:`EngineMismatchError`
(a :class:`~robbench.config.ConfigError`: exit 2), naming the ways out; it is not silently recomputed,
which would throw away results the user may have spent hours on. Two checks:

- before any work (:func:`check_before_work`): stored rows of a pending job ran the compiled engine and
  the extension does not load here (the case of a resume on a machine without a compiler);
- when a batch's rows arrive, before they are written (:func:`check_batch`): the general case (the
  other direction, whose outcome depends on the model, which only the worker has; remote workers).

The Monte Carlo backend is recorded too but not checked: every backend's decisions must equal the fp32
torch reference's on the same samples (the :class:`~robbench.backends.Backend` contract, tested sample
by sample), so a job resumed on another backend gets the same numbers. Rows stored before engines were
recorded (``ran_with`` NULL) cannot be compared and are not.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from robbench.config import ConfigError
from robbench.ran_with import ATTACK_ENGINE
from robbench.store import ResultStore


class EngineMismatchError(ConfigError):
    """A resume would store rows of another attack engine under a job key whose rows ran one engine."""


def stored_engines(store: ResultStore, job_keys: Iterable[str]) -> dict[str, Counter]:
    """job key -> Counter(attack engine -> stored ok rows) for the jobs whose ok rows recorded one."""
    out: dict[str, Counter] = {}
    for row in store.rows(list(job_keys)):
        engine = (row.ran_with or {}).get(ATTACK_ENGINE)
        if row.status == "ok" and engine:
            out.setdefault(row.job_key, Counter())[engine] += 1
    return out


def _ways_out(attack_label: str, stored: Iterable[str]) -> str:
    """What the user can do instead; ``stored``: the engines of the job's stored rows."""
    name = attack_label.split("(")[0] or "the attack"
    where = ("Resume where the compiled extension builds (a C++ compiler and ninja), or write"
             if "compiled" in stored else "Write")
    return (f"{where} to another --out, or choose the engine explicitly (--param {name}.engine=torch or "
            "=compiled: a job key of its own, so nothing is mixed), or recompute everything here with --retrain")


def check_before_work(stored: dict[str, Counter], jobs: list[Any], pending: dict[str, list[int]]) -> None:
    """Raise EngineMismatchError when a job with points still to run stored compiled-engine rows and the
    compiled extension does not load here (its ``auto`` would resolve to torch). Builds the extension if
    needed (the run's first work anyway on that engine). ``jobs``: objects with key, estimator,
    attack_label and model.label (robbench.runner.Job)."""
    compiled = [job for job in jobs if pending.get(job.key) and "compiled" in stored.get(job.key, ())]
    if not compiled:
        return
    from robbench import kernels

    if kernels.load():  # the compiled engine's op lives in the one compiled extension
        return
    job = compiled[0]
    more = f" (and {len(compiled) - 1} more job(s))" if len(compiled) > 1 else ""
    raise EngineMismatchError(
        f"job {job.key[:12]} ({job.estimator}, {job.model.label}, {job.attack_label}){more}: its "
        f"{sum(stored[job.key].values())} stored rows ran the compiled attack engine, but the compiled "
        f"extension does not load here ({kernels.build_error() or 'unavailable'}), so engine=auto would run "
        f"the remaining {len(pending[job.key])} point(s) on the torch engine, whose margins differ slightly; "
        f"robbench does not mix the two under one job key. {_ways_out(job.attack_label, stored[job.key])}.")


def check_batch(stored: dict[str, Counter], job: Any, ran: list[dict[str, str] | None]) -> None:
    """Raise EngineMismatchError when one batch of ``job`` (not yet written; ``ran``: each ok result's
    ``ran_with``) ran another attack engine than the job's stored rows; else count it into ``stored``."""
    new = Counter((r or {}).get(ATTACK_ENGINE) for r in ran)
    new.pop(None, None)
    before = stored.get(job.key)
    if before and set(new) - set(before):
        raise EngineMismatchError(
            f"job {job.key[:12]} ({job.estimator}, {job.model.label}, {job.attack_label}): its "
            f"{sum(before.values())} stored rows ran the {'+'.join(sorted(before))} attack engine, this "
            f"invocation runs {'+'.join(sorted(new))} (engine=auto resolves per machine), whose margins "
            f"differ slightly; robbench does not mix the two under one job key, and this batch of {len(ran)} "
            f"point(s) was not stored. {_ways_out(job.attack_label, before)}.")
    if new:
        stored.setdefault(job.key, Counter()).update(new)
