"""The Ray executor: models and batches as Ray tasks, results written by the coordinator only.

This is the only robbench module that imports ``ray`` (install with ``pip install "robbench[ray]"``).

- **Where.** ``address=None`` starts a local Ray instance sized to this machine (all its CPUs and GPUs);
  ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` joins a running cluster. If Ray is already
  initialised in this process (a notebook, a test), that instance is used as it is.
- **Tasks.** One task per (model configuration, seed) makes the model ready: it trains it, or rebuilds it
  from the cached checkpoint the coordinator ships; then one task per batch evaluates it with
  :func:`robbench.execute.evaluate_batch`, exactly as the local executor does. Each task declares
  ``num_cpus=task_cpus`` (and runs torch with that many threads) and, when the run's device is CUDA,
  ``num_gpus=task_gpus``; Ray picks the GPU, so ``cuda:N`` means "a GPU" here.
- **Models are trained once.** The coordinator looks the checkpoint up in its cache; a model that is
  not there is trained by one task, whose checkpoint the coordinator then writes to its cache. Batch
  tasks receive the checkpoint through Ray's object store (a reference, fetched once per worker process,
  which keeps the two most recent models built).
- **Only the coordinator writes.** Workers return results; :meth:`RayExecutor.run` yields each one as
  its task finishes, and the runner writes it to ``results.sqlite`` at once, so a killed coordinator
  resumes like a local run.
- **Faults.** A task whose worker dies, or that raises outside the estimator, is retried up to
  ``max_retries`` times; then its rows (a model's pending rows, or a batch's) fail with the error stored.
  An estimator's own exception fails its rows at once, as locally (retrying would fail again).
- **What workers need.** robbench and every plugin the run uses, installed on every node (workers find
  plugins through the same entry points); see the README for a third-party plugin through ``runtime_env``.
"""
from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import ray
import torch
from ray.exceptions import RayError, RayTaskError
from torch import nn

from robbench.config import ConfigError
from robbench.execute import Batch, JobSpec, PointResult, describe_error, evaluate_batch
from robbench.paths import cache_dir
from robbench.plugins import Registries, get_registries
from robbench.prepare import ModelSpec, prepare_shipped, training_failed
from robbench.protocols import SplitData, VAEModel
from robbench.training import checkpoint_path, model_from_payload, read_checkpoint, write_checkpoint
from robbench.work import BatchDone, Event, ModelReady, ModelWork


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """ConfigError, within ``timeout`` seconds, when nothing accepts a TCP connection at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``); an address without a port is left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        start = (f"ray start --head --port={port}" if not address.startswith("ray://")
                 else "ray start --head (Ray Client listens on port 10001)")
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({err.strerror or err}); start one there with "
                          f"`{start}`, or check --ray-address (auto joins the Ray running on this machine)") from None


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
_MODELS: OrderedDict[str, nn.Module] = OrderedDict()  # this worker process's built models, newest last
_KEEP_MODELS = 2


class WorkerError(RuntimeError):
    """An exception raised in a task, as its description only: plugin exceptions may not survive pickling
    (a custom ``__init__``), and the coordinator needs the message for the failed rows."""


def _plain_errors(task):
    """Run ``task`` with any exception re-raised as a :class:`WorkerError` (still retried by Ray)."""
    @functools.wraps(task)
    def run(*args: Any) -> Any:
        try:
            return task(*args)
        except Exception as err:
            raise WorkerError(describe_error(err)) from None
    return run


def _worker_device(name: str) -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned the task: inside, that GPU is "cuda".
    return "cuda" if name.startswith("cuda") else name


def _prepare_task(spec: ModelSpec, data: SplitData, cached: dict[str, Any] | None, check_ids: list[int],
                  check_batch: int, threads: int) -> tuple[dict[str, Any] | None, tuple[dict[str, Any], str | None]]:
    """Make one model ready on this worker. Returns (checkpoint payload or None, (models-table info, problem))."""
    torch.set_num_threads(threads)
    spec = replace(spec, device=_worker_device(spec.device))
    prepared = prepare_shipped(spec, data, get_registries(), cached, check_ids=check_ids, check_batch=check_batch)
    payload = prepared.payload if cached is None and prepared.problem is None else None
    return payload, (prepared.info, prepared.problem)


def _estimate_task(holder: list[Any], job: JobSpec, x: torch.Tensor, point_ids: list[int],
                   threads: int) -> list[PointResult]:
    """Evaluate one batch. ``holder[0]``: an object reference to the model's checkpoint payload (or to a
    live model, for :meth:`RayExecutor.map`), kept in a list so Ray does not fetch it when the model is
    already built in this process."""
    torch.set_num_threads(threads)
    job = replace(job, run=replace(job.run, device=_worker_device(job.run.device)))
    return evaluate_batch(job, _worker_model(holder[0], job.run.device), x, point_ids)


def _worker_model(ref: Any, device: str) -> nn.Module:
    """The model behind ``ref``, built once per worker process (keyed by the object, so two different
    checkpoints can never be confused, whatever the run or model key)."""
    key = f"{ref.hex()}@{device}"
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    shipped = ray.get(ref)
    if isinstance(shipped, dict):
        model, _ = model_from_payload(shipped, get_registries().models.get, device=device)
    else:
        model = shipped.to(device).eval()
    model.requires_grad_(False)  # as the local executor's models: attacks differentiate inputs only
    _MODELS[key] = model
    while len(_MODELS) > _KEEP_MODELS:
        _MODELS.popitem(last=False)
    return model


_prepare_remote = ray.remote(_plain_errors(_prepare_task))
_estimate_remote = ray.remote(_plain_errors(_estimate_task))


# ---------------------------------------------------------------------------------------------
# Coordinator side
# ---------------------------------------------------------------------------------------------
@dataclass
class RayExecutor:
    """Runs a run's models and batches as Ray tasks (see the module docstring).

    address: None (start a local Ray), "auto", "HOST:PORT" or "ray://HOST:PORT"; registries: the
    coordinator's (for cache look-ups; workers use their own plugin registries); task_cpus: CPUs each
    task declares (and torch threads it uses); task_gpus: GPUs each task declares when the device is CUDA
    (fractions share a GPU); max_retries: retries of a task whose worker died or that raised;
    init_options: extra ``ray.init`` keywords (e.g. ``runtime_env``) when this executor connects Ray.
    """

    address: str | None = None
    registries: Registries | None = None
    task_cpus: float = 1.0
    task_gpus: float = 1.0
    max_retries: int = 2
    init_options: dict[str, Any] = field(default_factory=dict)
    runs_here = False  # the coordinator's own device is not where work runs

    # --- batch level: robbench.evaluate(..., executor=RayExecutor()) ------------------------------
    def map(self, model: VAEModel, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[PointResult]]]:
        """Evaluate batches of one live model (shipped once through the object store), in completion order."""
        self.connect()
        holder = [ray.put(model)]
        pending = {self._submit_batch(holder, batch): batch for batch in batches}
        while pending:
            for ref in self._ready(pending):
                batch = pending.pop(ref)
                yield batch, self._batch_results(ref, batch)

    # --- run level: the runner's WorkExecutor -------------------------------------------------------
    def run(self, work: Sequence[ModelWork], data: SplitData, *, progress: bool = False) -> Iterator[Event]:
        """Prepare every model (a task each), then run its batches (a task each); yield events as tasks
        finish. Writes only checkpoints the workers trained, into the coordinator's cache."""
        self.connect()
        data_ref = ray.put(data)
        models: dict[Any, tuple[ModelWork, Any, bool]] = {}  # report ref -> (work, checkpoint ref, built by the task)
        batches: dict[Any, Batch] = {}
        for item in work:
            cached = self._cached_payload(item.model, data)
            cached_ref = None if cached is None else ray.put(cached)
            payload_ref, report_ref = self._options(_prepare_remote, item.model.device, num_returns=2).remote(
                item.model, data_ref, cached_ref, item.check_ids, item.check_batch, self._threads())
            models[report_ref] = (item, payload_ref if cached_ref is None else cached_ref, cached_ref is None)
        while models or batches:
            for ref in self._ready({**models, **batches}):
                if ref in batches:
                    batch = batches.pop(ref)
                    yield BatchDone(batch, self._batch_results(ref, batch), running=len(models) + len(batches))
                    continue
                item, model_ref, built = models.pop(ref)
                info, problem = self._model_report(ref)
                if problem is None and built:
                    self._store_checkpoint(item.model, data, model_ref, info)
                if problem is None:
                    holder = [model_ref]
                    for batch in item.batches:
                        batches[self._submit_batch(holder, batch)] = batch
                yield ModelReady(item, info, problem, running=len(models) + len(batches))

    # --- helpers ------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Use the Ray instance of this process, or join ``address``, or start a local one."""
        if ray.is_initialized():
            return
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
        if self.address is not None and self.address != "auto":
            _check_reachable(self.address)  # Ray itself retries an address with nothing behind it for minutes
        try:
            ray.init(**({} if self.address is None else {"address": self.address}), **{**quiet, **self.init_options})
        except ConnectionError as err:  # an OSError, which callers would take for a file-system error
            if self.address == "auto":
                raise ConfigError("--ray-address auto found no running Ray on this machine; start one with "
                                  "`ray start --head`, or leave --ray-address out to start a local Ray for this "
                                  "run") from err
            raise ConfigError(f"cannot connect to the Ray cluster at {self.address}: {err}") from err

    def _options(self, remote: Any, device: str, **extra: Any) -> Any:
        gpus = self.task_gpus if device.startswith("cuda") else 0
        return remote.options(num_cpus=self.task_cpus, num_gpus=gpus, max_retries=self.max_retries,
                              retry_exceptions=True, **extra)

    def _threads(self) -> int:
        return max(1, int(self.task_cpus))

    def _submit_batch(self, holder: list[Any], batch: Batch) -> Any:
        return self._options(_estimate_remote, batch.job.run.device).remote(
            holder, batch.job, batch.x, batch.point_ids, self._threads())

    @staticmethod
    def _ready(pending: dict[Any, Any]) -> list[Any]:
        """Every finished task of ``pending``, waiting until there is at least one."""
        refs = list(pending)
        ready, _ = ray.wait(refs, num_returns=1)
        more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return list(dict.fromkeys(ready + more))

    def _batch_results(self, ref: Any, batch: Batch) -> list[PointResult]:
        try:
            return ray.get(ref)
        except RayError as err:
            message = self._describe(err)
            return [PointResult(p, {}, None, message) for p in batch.point_ids]

    def _model_report(self, ref: Any) -> tuple[dict[str, Any], str | None]:
        try:
            return ray.get(ref)
        except RayError as err:
            message = self._describe(err)
            return {"error": message}, training_failed(message)

    def _describe(self, err: RayError) -> str:
        """The task's own error when it raised, else Ray's first line (worker died, node lost, ...)."""
        cause = getattr(err, "cause", None) if isinstance(err, RayTaskError) else None
        if isinstance(cause, WorkerError):
            text = str(cause)
        elif isinstance(cause, BaseException):
            text = describe_error(cause)
        else:
            lines = str(err).strip().splitlines()
            text = f"{type(err).__name__}: {lines[0] if lines else ''}"
        return f"{text} [ray task failed after {self.max_retries} retries]"

    def _cached_payload(self, spec: ModelSpec, data: SplitData) -> dict[str, Any] | None:
        """The coordinator's cached checkpoint of ``spec`` (None: train it, or a ready-built family)."""
        path = self._checkpoint_file(spec, data)
        if path is None or spec.retrain or not path.is_file():
            return None
        try:
            return read_checkpoint(path)
        except Exception as err:  # a corrupt or stale file is retrained rather than fatal
            warnings.warn(f"could not load cached checkpoint {path} ({err}); retraining")
            return None

    def _checkpoint_file(self, spec: ModelSpec, data: SplitData) -> Path | None:
        try:
            family = (self.registries or get_registries()).models.get(spec.family)
        except Exception:  # an unknown family fails in its task, with the message stored
            return None
        if not family.trainable:
            return None
        return checkpoint_path(family, spec.params, data, spec.train, cache_dir=cache_dir() / "models",
                               dataset_name=spec.dataset)[1]

    def _store_checkpoint(self, spec: ModelSpec, data: SplitData, payload_ref: Any, info: dict[str, Any]) -> None:
        """Write a checkpoint a worker trained into the coordinator's cache (the only writer of files);
        nothing for a ready-built family."""
        path = self._checkpoint_file(spec, data)
        if path is None:
            return
        try:
            write_checkpoint(path, ray.get(payload_ref))
        except Exception as err:  # the results stand without the cache file; say so in the models table
            info["cache_error"] = describe_error(err)
