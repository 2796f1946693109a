"""A run's work as plain data, the events executing it produces, and the in-process driver.

The runner (the coordinator) turns a configuration into one :class:`ModelWork` per (model configuration,
seed) that still has something to do: how to get the model (a :class:`~robbench.prepare.ModelSpec`) and
the batches to evaluate on it. An executor turns that into a stream of events, in any order except that
a model's :class:`ModelReady` comes before its batches' :class:`BatchDone`:

- an executor with only ``map`` (:class:`robbench.execute.LocalExecutor`, or any batch-level
  :class:`~robbench.execute.Executor`) is driven by :func:`run_in_process`: each model is trained or
  loaded here, then its batches go through ``executor.map``;
- a :class:`WorkExecutor` (e.g. :class:`robbench.executors.ray.RayExecutor`) takes the whole list and
  decides where models are prepared and batches run.

Either way only the caller writes the results store, as each event arrives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, Union, runtime_checkable

from robbench.execute import Batch, Executor, PointResult
from robbench.plugins import Registries
from robbench.prepare import ModelSpec, prepare_model
from robbench.protocols import SplitData


@dataclass
class ModelWork:
    """One model and what to do with it. batches: its pending batches (empty for ``robbench train``);
    check_ids: test points whose encoding must be finite before any batch runs (the batches' points)."""

    model: ModelSpec
    batches: list[Batch] = field(default_factory=list)

    @property
    def check_ids(self) -> list[int]:
        return sorted({p for batch in self.batches for p in batch.point_ids})

    @property
    def check_batch(self) -> int:
        """Points per encode call of the check: the largest batch's, as the batches will run."""
        return max((len(batch.point_ids) for batch in self.batches), default=1)


@dataclass
class ModelReady:
    """A model was prepared (or failed to be). info: its ``models`` table entry; problem: the message its
    pending rows fail with, None when its batches will run. running: tasks in flight after this event."""

    work: ModelWork
    info: dict[str, Any]
    problem: str | None
    running: int = 0


@dataclass
class BatchDone:
    """A batch's results, one per point in the batch's order (failed rows carry the error)."""

    batch: Batch
    results: list[PointResult]
    running: int = 0

    @property
    def failed(self) -> bool:
        return any(not r.ok for r in self.results)


Event = Union[ModelReady, BatchDone]


@runtime_checkable
class WorkExecutor(Protocol):
    """An executor that decides where models are prepared as well as where batches run."""

    def run(self, work: Sequence[ModelWork], data: SplitData, *, progress: bool) -> Iterator[Event]:
        """Prepare every model and evaluate its batches; yield each event as it happens."""


def run_in_process(executor: Executor, work: Sequence[ModelWork], data: SplitData, regs: Registries, *,
                   cache_dir: Path, progress: bool) -> Iterator[Event]:
    """Models one after another in this process (train or load through ``cache_dir``), each model's
    batches through ``executor.map``; the order is the work's order."""
    for item in work:
        prepared = prepare_model(item.model, data, regs, cache_dir=cache_dir, progress=progress,
                                 check_ids=item.check_ids, check_batch=item.check_batch)
        yield ModelReady(item, prepared.info, prepared.problem, running=int(prepared.problem is None
                                                                            and bool(item.batches)))
        if prepared.problem is not None or not item.batches:
            continue
        left = len(item.batches)
        for batch, results in executor.map(prepared.model, item.batches):
            left -= 1
            yield BatchDone(batch, results, running=int(left > 0))
