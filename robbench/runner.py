"""Runs a configuration: trains or loads each model, runs every (attack, estimator) job on the chosen
test points, and writes each result to the run's database as soon as it exists.

Failures stay local: a model that cannot be trained, that yields NaN, or an estimator that raises,
marks only its own rows as errors (with the message) and the run goes on.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from robbench import terminal
from robbench.config import (AttackConfig, ConfigError, ModelConfig, RunConfig, attack_configs,
                             estimator_params, model_configs, stable_hash)
from robbench.paths import cache_dir
from robbench.leaderboard import write_leaderboard
from robbench.plugins import Registries
from robbench.protocols import ARRAYS_KEY, DataOptions, EstimationContext, SplitData
from robbench.store import ResultRow, ResultStore, RunRecord


@dataclass(frozen=True)
class Job:
    """One (model configuration, attack, estimator) triple; ``attack`` is None for attack-free estimators."""

    key: str
    model: ModelConfig
    attack: AttackConfig | None
    estimator: str
    params: dict[str, Any]

    @property
    def attack_label(self) -> str:
        return self.attack.label if self.attack else ""


def model_key(cfg: RunConfig, model: ModelConfig) -> str:
    return stable_hash({"family": model.family, "params": model.params, "seed": model.seed,
                        "train": cfg.to_dict()["train"], "dataset": cfg.dataset, "data_dir": cfg.data_dir})


def plan_jobs(cfg: RunConfig, regs: Registries) -> list[Job]:
    """Every job the configuration defines, in execution order (grouped by model)."""
    attacks = attack_configs(cfg, regs)
    jobs = []
    for model in model_configs(cfg, regs):
        for name in cfg.estimators:
            est = regs.estimators.get(name)
            params = estimator_params(cfg, regs, name)
            for attack in attacks if est.needs_attack else [None]:
                identity = {"model": model_key(cfg, model), "estimator": name, "params": params,
                            "attack": None if attack is None else [attack.name, attack.params]}
                jobs.append(Job(stable_hash(identity), model, attack, name, params))
    return jobs


def select_points(data: SplitData, count: int, seed: int) -> torch.Tensor:
    """Test-set indices of the evaluation points: a seeded permutation's prefix, so asking for more
    points later keeps the earlier ones (and their stored results)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.test_x), generator=gen)
    if count > len(order):
        raise ConfigError(f"bad value for 'points': {count}; the test split holds only {len(order)} points")
    return order[:count]


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"bad value for 'device': {name!r}; CUDA is not available here (allowed: cpu)")
    return torch.device(name)


def load_data(cfg: RunConfig, regs: Registries) -> SplitData:
    spec = regs.datasets.get(cfg.dataset)
    return spec.load(DataOptions(data_dir=Path(cfg.data_dir) if cfg.data_dir else None, seed=0))


class Runner:
    """Executes a RunConfig into a run directory."""

    def __init__(self, cfg: RunConfig, regs: Registries, run_dir: Path, *, console: Console | None = None,
                 retrain: bool = False, progress: bool = True):
        self.cfg, self.regs, self.run_dir = cfg, regs, Path(run_dir)
        self.console = console or terminal.console()
        self.retrain, self.progress = retrain, progress
        self.device = resolve_device(cfg.device)
        self.jobs = plan_jobs(cfg, regs)

    # --- public --------------------------------------------------------------------------------
    def run(self, *, evaluate: bool = True) -> ResultStore:
        """Train/load every model and (if ``evaluate``) run every pending job. Returns the store."""
        # Data and points first: an invocation that cannot start writes nothing.
        data = load_data(self.cfg, self.regs)
        point_ids = select_points(data, self.cfg.points, self.cfg.seed)
        store = ResultStore(self.run_dir)
        store.record_run(RunRecord(self.cfg.to_dict(), [job.key for job in self.jobs],
                                   sorted({model_key(self.cfg, job.model) for job in self.jobs}),
                                   [int(p) for p in point_ids]))
        board_current = False
        by_model: dict[str, list[Job]] = {}
        for job in self.jobs:
            by_model.setdefault(model_key(self.cfg, job.model), []).append(job)
        for model_cfg in model_configs(self.cfg, self.regs):
            jobs = by_model.get(model_key(self.cfg, model_cfg), [])
            pending = {}
            for job in jobs:
                # --retrain recomputes every result: stored ones came from the previous weights.
                done = set() if self.retrain else store.done_points(job.key)
                pending[job.key] = [int(p) for p in point_ids if int(p) not in done]
            if evaluate and not any(pending.values()):
                self.console.print(f"[dim]{model_cfg.label} seed {model_cfg.seed}: all results stored, skipped[/dim]")
                continue
            model = self._train_or_load(model_cfg, data, store)
            if model is None:
                self._fail_rows(store, jobs, pending, "model could not be trained or loaded (see models table)")
                board_current = False
                continue
            if evaluate:
                self._evaluate_model(model, model_cfg, jobs, pending, data, store)
                write_leaderboard(store, self.run_dir)  # after each model: a crash keeps a current board
                board_current = True
        if evaluate and not board_current:  # all results were stored already, or failures came last
            write_leaderboard(store, self.run_dir)
        return store

    # --- steps ---------------------------------------------------------------------------------
    def _train_or_load(self, model_cfg: ModelConfig, data: SplitData, store: ResultStore) -> torch.nn.Module | None:
        from robbench.training import TrainConfig, train_or_load

        family = self.regs.models.get(model_cfg.family)
        key = model_key(self.cfg, model_cfg)
        t = self.cfg.train
        self.console.print(f"[bold]{model_cfg.label}[/bold] seed {model_cfg.seed}")
        try:
            trained = train_or_load(
                family, model_cfg.params, data,
                TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=model_cfg.seed,
                            patience=t.patience),
                cache_dir=cache_dir() / "models", device=self.device, retrain=self.retrain,
                progress=self.progress, dataset_name=self.cfg.dataset)
        except Exception as err:  # a broken model fails its own rows only
            store.record_model(key, model_cfg.label, model_cfg.seed, {"error": _describe(err)})
            self.console.print(f"[red]  training failed: {escape(_describe(err))}[/red]")
            return None
        elbo = trained.test_elbo if math.isfinite(trained.test_elbo) else None
        store.record_model(key, model_cfg.label, model_cfg.seed,
                           {"test_elbo": elbo, "train_seconds": trained.train_seconds,
                            "from_cache": trained.from_cache, "cache_key": trained.cache_key,
                            "ready_built": not family.trainable})
        if not family.trainable:
            how = "ready-built (no training)"
        else:
            how = "loaded from cache" if trained.from_cache else f"trained in {trained.train_seconds:.1f}s"
        self.console.print(f"  {how}" + (f", test ELBO {elbo:.1f} nats" if elbo is not None else ""))
        return trained.model.to(self.device).eval()

    def _evaluate_model(self, model: torch.nn.Module, model_cfg: ModelConfig, jobs: list[Job],
                        pending: dict[str, list[int]], data: SplitData, store: ResultStore) -> None:
        check = self._nonfinite_encoder(model, data, [p for ps in pending.values() for p in ps])
        if check:
            self._fail_rows(store, jobs, pending, check)
            return
        batches = [(job, ids[i:i + self.cfg.point_batch]) for job in jobs
                   for ids in [pending[job.key]] for i in range(0, len(ids), self.cfg.point_batch)]
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=self.console, disable=not self.progress,
                      transient=False) as bar:
            task = bar.add_task("estimating", total=sum(len(ids) for _, ids in batches))
            for job, ids in batches:
                name = f"{job.estimator}" + (f" × {job.attack_label}" if job.attack else "")
                bar.update(task, description=name)
                store.write(self._run_batch(model, model_cfg, job, ids, data))
                bar.advance(task, len(ids))
            bar.update(task, description="estimated")

    def _run_batch(self, model: torch.nn.Module, model_cfg: ModelConfig, job: Job, ids: list[int],
                   data: SplitData) -> list[ResultRow]:
        estimator = self.regs.estimators.get(job.estimator)
        attack = self.regs.attacks.get(job.attack.name) if job.attack else None
        x = data.test_x[ids].to(self.device)
        ctx = EstimationContext(model=model, attack=attack, attack_params=job.attack.params if job.attack else {},
                                params=dict(job.params), point_ids=torch.tensor(ids), seed=self.cfg.seed,
                                device=self.device)
        start = time.perf_counter()
        try:
            results = estimator(ctx, x)
            if len(results) != len(ids):
                raise RuntimeError(f"estimator {job.estimator} returned {len(results)} results for {len(ids)} points")
            error = None
        except Exception as err:
            results, error = [{} for _ in ids], _describe(err)
            self.console.print(f"[red]  {job.estimator} failed on {escape(model_cfg.label)}: {escape(error)}[/red]")
        seconds = (time.perf_counter() - start) / len(ids)
        rows = []
        for point, metrics in zip(ids, results):
            self._save_arrays(job, point, metrics.pop(ARRAYS_KEY, None))
            problem = error or _nonfinite_metric(metrics)
            rows.append(ResultRow(job.key, point, model_cfg.label, model_cfg.seed, job.attack_label,
                                  job.estimator, "error" if problem else "ok", metrics, problem, seconds))
        return rows

    def _save_arrays(self, job: Job, point: int, arrays: dict[str, torch.Tensor] | None) -> None:
        """Keep an estimator's tensors (e.g. adversarial inputs) for the first points, for reports."""
        if not arrays:
            return
        folder = arrays_dir(self.run_dir, job.key)
        kept = len(list(folder.iterdir())) if folder.exists() else 0
        if kept >= self.cfg.keep_arrays:
            return
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        tmp = folder / f"{point}.pt.tmp"
        torch.save(tensors, tmp)
        tmp.replace(folder / f"{point}.pt")

    def _nonfinite_encoder(self, model: torch.nn.Module, data: SplitData, ids: list[int]) -> str | None:
        if not ids:
            return None
        try:
            with torch.no_grad():
                mu, sigma = model.encode(data.test_x[sorted(set(ids))].to(self.device))
        except Exception as err:
            return f"encode() raised {_describe(err)}"
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            return "model produced NaN or infinity in encode(x)"
        return None

    def _fail_rows(self, store: ResultStore, jobs: list[Job], pending: dict[str, list[int]], message: str) -> None:
        store.write(ResultRow(job.key, p, job.model.label, job.model.seed, job.attack_label, job.estimator,
                              "error", {}, message, 0.0) for job in jobs for p in pending[job.key])
        self.console.print(f"[red]  {escape(message)}[/red]")


def arrays_dir(run_dir: Path, job_key: str) -> Path:
    """Where the tensors an estimator returned under ``ARRAYS_KEY`` are kept: one ``<point>.pt`` each
    (load with ``torch.load(path, weights_only=True)``)."""
    return Path(run_dir) / "arrays" / job_key


def _nonfinite_metric(metrics: dict[str, Any]) -> str | None:
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"non-finite value for {key!r}: {value}"
    return None


def _describe(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    place = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(err).__name__}: {err}{place}"
