"""The execution seam: one function evaluates a batch of (job, points) into per-point results, and an
executor decides where batches run.

- :class:`JobSpec` describes a job in plain, picklable data: estimator and attack *names*, their merged
  parameters and the :class:`~robbench.settings.RunSettings`. A worker process rebuilds everything
  else from the plugin registries.
- :func:`evaluate_batch` runs one estimator on one batch of points and returns one
  :class:`PointResult` per point. It writes nothing: ``Runner`` and ``robbench.evaluate`` both call it,
  and only the coordinator (the runner) writes the results store.
- An :class:`Executor` maps :class:`Batch` es to results. :class:`LocalExecutor` runs them one after
  the other in this process; a cluster executor (e.g. Ray) would ship the model once, call
  :func:`evaluate_batch` in its workers and yield results as they come back, in any order.
"""
from __future__ import annotations

import importlib
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from robbench.imagefit import fit_if_needed
from robbench.inputrange import DEFAULT_RANGE, input_range
from robbench.checks import PluginOutputError, check_estimator_rows, checked
from robbench import ran_with
from robbench.plugins import Registries, get_registries
from robbench.protocols import ARRAYS_KEY, EstimationContext, VAEModel
from robbench.settings import RunSettings
from robbench.units import absolute_settings


# attack_params key of a portfolio job (robbench.runner.portfolio_attack): [[attack name, params], ...]
PORTFOLIO_KEY = "portfolio_members"


@dataclass(frozen=True)
class JobSpec:
    """One (estimator, attack) evaluation, as plain data.

    key: the job's content hash ("" where results are not stored); estimator / attack: registered
    names (attack None for estimators with ``needs_attack = False``); attack_params / params: the
    plugins' merged parameters; run: the run-wide settings.
    """

    estimator: str
    attack: str | None
    attack_params: dict[str, Any]
    params: dict[str, Any]
    run: RunSettings
    key: str = ""
    # The input range batch inputs are in when they must still be fitted to the model's shape and declared
    # range (the runner's data sets: [0, 1]); None: they are already as the model takes them (evaluate()).
    data_range: tuple[float, float] | None = None


@dataclass
class Batch:
    """A job and the points to evaluate it on: point_ids (B,) test-set indices, x (B, *input_shape);
    model_key: which of the run's models it runs on ("" when there is only the caller's one)."""

    job: JobSpec
    point_ids: list[int]
    x: Tensor
    model_key: str = ""


@dataclass
class PointResult:
    """One point's outcome: the estimator's metrics (arrays split off), or the error that replaced them.
    seconds: the batch's wall time divided by its points."""

    point: int
    metrics: dict[str, Any]
    arrays: dict[str, Tensor] | None = None
    error: str | None = None
    seconds: float = 0.0
    # what the batch actually ran: {"attack_engine": "compiled", "mc_backend": "cpp"} (robbench.ran_with)
    ran_with: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def evaluate_batch(job: JobSpec, model: VAEModel, x: Tensor, point_ids: Sequence[int], *,
                   registries: Registries | None = None, raise_errors: bool = False) -> list[PointResult]:
    """Run ``job`` on x: (B, *input_shape) in the model's input range (moved to ``job.run.device``) with test-set ids
    ``point_ids`` (B,). Returns B results in the order of ``point_ids``. An estimator that raises or
    returns the wrong number of rows fails every point of the batch (with the message), unless
    ``raise_errors``; a non-finite float metric fails its own point. The model is wrapped in
    :class:`robbench.checks.CheckedModel`; an invalid attack result or a NaN from the model
    (:class:`~robbench.checks.PluginOutputError`) reruns the batch point by point, so it fails only the
    points it occurs on."""
    regs = registries or get_registries()
    model = checked(model)  # NaN/inf from encode or decode fails the points that saw it (no-op if wrapped)
    estimator = regs.estimators.get(job.estimator)
    params, attack_params = dict(job.params), dict(job.attack_params)
    if PORTFOLIO_KEY in attack_params:  # the estimator gets the first member and the rest in its params
        members = [(name, regs.attacks.get(name), dict(p)) for name, p in attack_params[PORTFOLIO_KEY]]
        (_, attack, attack_params), params["portfolio_attacks"] = members[0], members[1:]
    else:
        attack = regs.attacks.get(job.attack) if job.attack is not None else None
    device = torch.device(job.run.device)
    ids = [int(p) for p in point_ids]
    params, run = absolute_settings(estimator, params, job.run, model)  # units: rms -> L2 sizes
    ctx = EstimationContext(model=model, attack=attack, attack_params=attack_params,
                            params=params, point_ids=torch.tensor(ids, dtype=torch.int64), run=run)
    box = input_range(model)
    start = time.perf_counter()
    try:
        with ran_with.recording() as ran:
            rows = estimator(ctx, fit_if_needed(x.to(device), job.data_range, model))
        results = check_estimator_rows(job.estimator, rows, len(ids), estimator)
        error = None
    except PluginOutputError as err:
        if raise_errors:
            raise
        if len(ids) > 1:  # a plugin broke its contract: rerun point by point so only the broken points fail
            return [res for i, p in enumerate(ids)
                    for res in evaluate_batch(job, model, x[i:i + 1], [p], registries=regs)]
        results, error = [{}], describe_error(err)
    except Exception as err:
        if raise_errors:
            raise
        results, error = [{} for _ in ids], describe_error(err)
    seconds = (time.perf_counter() - start) / max(1, len(ids))
    used = ran_with.summary(ran) if error is None else None
    out = []
    for point, metrics in zip(ids, results):
        metrics = dict(metrics)
        arrays = metrics.pop(ARRAYS_KEY, None) or None
        if arrays and box != DEFAULT_RANGE:  # so figures can map the images back to [0, 1]
            arrays = {**arrays, "input_range": torch.tensor(box)}
        problem = error or (None if raise_errors else nonfinite_metric(metrics))
        out.append(PointResult(point, metrics, arrays, problem, seconds, used))
    return out


class Executor(Protocol):
    """Decides where batches run. ``map`` yields every batch exactly once with its results, in any
    order; it never writes the store (the caller does, as results arrive)."""

    def map(self, model: VAEModel, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[PointResult]]]:
        """Evaluate each batch with ``model`` (already on the batches' device for local execution)."""


@dataclass
class LocalExecutor:
    """Runs batches in this process, one after another, in the given order."""

    registries: Registries | None = None
    raise_errors: bool = False

    def map(self, model: VAEModel, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[PointResult]]]:
        """Evaluate each batch in this process, in order, yielding (batch, one result per point)."""
        model = checked(model)  # once per model, so per-model caches (the decoder plan) are kept
        for batch in batches:
            yield batch, evaluate_batch(batch.job, model, batch.x, batch.point_ids, registries=self.registries,
                                        raise_errors=self.raise_errors)


# Executors by name (the ``executor`` config key / ``--executor``): a class, or "module:Class" so that an
# optional dependency (Ray) is imported only when its executor is asked for; each is constructed as
# ``cls(registries=..., **options)``. INSTALL says how to get what an executor needs.
EXECUTORS: dict[str, type | str] = {"local": "robbench.execute:LocalExecutor", "ray": "robbench.executors.ray:RayExecutor"}
INSTALL = {"ray": 'pip install "robbench[ray]"  (from a checkout: pip install -e ".[ray]")'}


class ExecutorUnavailable(RuntimeError):
    """An executor whose optional dependency is not installed; the message says how to install it."""


def executor_class(name: str) -> type:
    """The class of the executor called ``name``; ValueError for an unknown name, ExecutorUnavailable
    when its dependency is missing."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(sorted(EXECUTORS))}")
    if not isinstance(EXECUTORS[name], str):
        return EXECUTORS[name]
    module, _, attr = EXECUTORS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        missing = (err.name or "").split(".")[0]
        if not missing or missing == "robbench":
            raise
        raise ExecutorUnavailable(f"the {name} executor needs {missing!r}, which is not installed; "
                                  f"install it with: {INSTALL.get(name, 'pip install ' + missing)}") from None


def make_executor(name: str = "local", **options: Any) -> Executor:
    """An executor by name (see :data:`EXECUTORS`), built with ``options``."""
    return executor_class(name)(**options)


def configured_executor(name: str, *, registries: Registries | None = None,
                        ray_address: str | None = None) -> Executor:
    """The executor of a run configuration's ``executor`` / ``ray_address`` keys. Imports an optional
    dependency here, before any work, so a missing one fails early (ExecutorUnavailable)."""
    options: dict[str, Any] = {"registries": registries}
    if ray_address is not None:  # the configuration allows an address only with executor: ray
        options["address"] = ray_address
    return make_executor(name, **options)


def nonfinite_metric(metrics: dict[str, Any]) -> str | None:
    """The first float metric that is NaN or infinite, described; None when all are finite."""
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"non-finite value for {key!r}: {value}"
    return None


def describe_error(err: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, for the results store; an error that names its
    own origin (a plugin's malformed output: :class:`~robbench.checks.EstimatorOutputError`) is located there
    instead, not at robbench's check."""
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    if getattr(err, "origin", None):
        place = f" ({err.origin})"
    return f"{type(err).__name__}: {err}{place}"
