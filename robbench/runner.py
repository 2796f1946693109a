"""Runs a configuration: trains or loads each model, runs every (attack, estimator) job on the chosen
test points, and writes each result to the run's database as soon as it exists.

Failures stay local: a model that cannot be trained, that yields NaN, or an estimator that raises,
marks only its own rows as errors (with the message) and the run goes on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.markup import escape

from robbench import faults, resume_engines, terminal
from robbench.checks import PluginOutputError, checked
from robbench.config import (AttackConfig, ConfigError, ModelConfig, RunConfig, attack_configs,
                             estimator_params, model_configs, stable_hash)
from robbench.execute import PORTFOLIO_KEY, Batch, Executor, JobSpec, PointResult
from robbench.leaderboard import write_leaderboard
from robbench.paths import cache_dir
from robbench.plugins import Registries
from robbench.inputrange import DEFAULT_RANGE, check_in_range, input_range, to_range
from robbench.prepare import ModelSpec, describe_prepared
from robbench.progress import TaskDisplay
from robbench.protocols import DataOptions, SplitData
from robbench.provenance import algorithm_versions, run_provenance
from robbench.settings import RunSettings
from robbench.units import cap_warning
from robbench.store import ResultRow, ResultStore, RunRecord
from robbench.work import Event, ModelReady, ModelWork, WorkExecutor, run_in_process


@dataclass(frozen=True)
class Job:
    """One (model configuration, attack, estimator) triple; ``attack`` is None for attack-free estimators.
    ``params``: the estimator's own parameters; ``run``: the run-wide settings."""

    key: str
    model: ModelConfig
    attack: AttackConfig | None
    estimator: str
    params: dict[str, Any]
    run: RunSettings

    @property
    def attack_label(self) -> str:
        return self.attack.label if self.attack else ""

    def row(self, point: int, status: str, metrics: dict[str, Any], error: str | None, seconds: float,
            ran_with: dict[str, str] | None = None) -> ResultRow:
        """The store row of one point's result: labels for display, family / parameters as data, and the
        attack engine / Monte Carlo backend that ran (:mod:`robbench.ran_with`)."""
        return ResultRow(self.key, point, self.model.label, self.model.seed, self.attack_label, self.estimator,
                         status, metrics, error, seconds, self.model.family, dict(self.model.params),
                         self.attack.name if self.attack else None,
                         dict(self.attack.params) if self.attack else None, ran_with)

    def spec(self) -> JobSpec:
        """The job as plain data for :func:`robbench.execute.evaluate_batch` (and remote workers)."""
        return JobSpec(self.estimator, self.attack.name if self.attack else None,
                       dict(self.attack.params) if self.attack else {}, dict(self.params), self.run, self.key,
                       data_range=DEFAULT_RANGE)  # load_data maps every data set onto [0, 1]


@dataclass
class _ModelPlan:
    """What the coordinator tracks per model: its work, jobs, pending points and batches still out."""

    work: ModelWork
    jobs: list[Job]
    pending: dict[str, list[int]]
    left: int


def model_key(cfg: RunConfig, model: ModelConfig) -> str:
    return stable_hash({"family": model.family, "params": model.params, "seed": model.seed,
                        "train": cfg.to_dict()["train"], "dataset": cfg.dataset, "data_dir": cfg.data_dir})


def plan_jobs(cfg: RunConfig, regs: Registries) -> list[Job]:
    """Every job the configuration defines, in execution order (grouped by model)."""
    attacks = attack_configs(cfg, regs)
    run = cfg.run_settings()
    jobs = []
    for model in model_configs(cfg, regs):
        for name in cfg.estimators:
            est = regs.estimators.get(name)
            params = estimator_params(cfg, regs, name)
            job_attacks = attacks if est.needs_attack else [None]
            if est.needs_attack and params.get("portfolio") and len(attacks) > 1:
                job_attacks = [portfolio_attack(attacks)]  # one job: the per-point worst over all attacks
            for attack in job_attacks:
                # The key hashes the result-defining settings with the estimator's own parameters (as one
                # mapping, the layout older run directories were keyed by, so they keep resuming).
                keyed = {**keyed_params(est, params), **run.hashed()}
                identity = {"model": model_key(cfg, model), "estimator": name, "params": keyed,
                            "attack": None if attack is None else [attack.name, attack.params]}
                jobs.append(Job(stable_hash(identity), model, attack, name, params, run))
    return jobs


def keyed_params(plugin: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a job key hashes: all, except those in the plugin's ``unkeyed`` mapping (parameters
    added later) while they hold the value listed there, which gives the results stored before they
    existed, so those run directories keep their keys and resume; plus the plugin's ``key_versions``
    entries ({parameter: (value, {key: version})}) while their parameter holds that value, so a run
    directory holding an earlier algorithm's rows under the same parameters is not resumed."""
    unkeyed = getattr(plugin, "unkeyed", None) or {}
    keyed = {k: v for k, v in params.items()
             if not (k in unkeyed and type(v) is type(unkeyed[k]) and v == unkeyed[k])}
    # algorithm versions: hashed only while their parameter holds the listed value (e.g. the margin's
    # verification version with verify=true), so the other settings' keys stay those of before
    keyed.update(algorithm_versions(plugin, params))
    return keyed


def portfolio_attack(attacks: list[AttackConfig]) -> AttackConfig:
    """The attack entry of a portfolio job: its members (name, params) in run order, labelled
    ``portfolio(a+b)``; the estimator runs each member and keeps each point's smallest margin
    (:func:`robbench.execute.evaluate_batch` resolves the members)."""
    members = [[a.name, a.params] for a in attacks]
    # "portfolio_alpha": since session 7 the members split alpha (each runs at alpha / K); the marker is
    # hashed into the job key, so run folders made before, whose members each spent the whole alpha, are
    # not resumed as if their intervals held at the stated confidence.
    return AttackConfig(name="portfolio(" + "+".join(a.label for a in attacks) + ")",
                        params={PORTFOLIO_KEY: members, "portfolio_alpha": "split"}, swept=())


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
    """The data set's split, mapped onto [0, 1] when it declares another input range (trainable models
    work in [0, 1]; ready-built ones get their shape and declared range through
    :func:`robbench.imagefit.fit_if_needed`)."""
    spec = regs.datasets.get(cfg.dataset)
    data = spec.load(DataOptions(data_dir=Path(cfg.data_dir) if cfg.data_dir else None, seed=0))
    box = input_range(data)
    for split, part in (("training", data.train_x), ("test", data.test_x)):
        if isinstance(part, torch.Tensor):  # lazily read images are decoded into [0, 1] by construction
            try:
                check_in_range(part, box, what=f"data set {cfg.dataset!r} ({split} split)")
            except ValueError as err:
                hint = "" if "NaN" in str(err) else "; a data set in another range declares it as SplitData.input_range"
                raise ConfigError(f"{err}{hint}") from None
    if box != DEFAULT_RANGE:
        data = SplitData(to_range(data.train_x, box, DEFAULT_RANGE), data.train_y,
                         to_range(data.test_x, box, DEFAULT_RANGE), data.test_y)
    return data


class Runner:
    """Executes a RunConfig into a run directory. The runner is the coordinator: it plans one
    :class:`~robbench.work.ModelWork` per model with pending points, lets the executor prepare the models
    and run the batches (local by default: models trained or loaded here, batches through
    :class:`~robbench.execute.LocalExecutor`; a :class:`~robbench.work.WorkExecutor` such as the Ray
    executor places both itself), and is the only writer of the results store, the arrays and the
    leaderboard, each result as soon as its event arrives."""

    def __init__(self, cfg: RunConfig, regs: Registries, run_dir: Path, *, console: Console | None = None,
                 retrain: bool = False, progress: bool = True, executor: Executor | None = None):
        self.cfg, self.regs, self.run_dir = cfg, regs, Path(run_dir)
        self.console = console or terminal.console()
        self.retrain, self.progress = retrain, progress
        # Before any work: a configured executor whose dependency is missing is a ConfigError (exit 2).
        self.executor = executor or cfg.make_executor(regs)
        # A remote executor places work on its own devices; a local one needs this machine's.
        self.device = (resolve_device(cfg.device) if getattr(self.executor, "runs_here", True)
                       else torch.device(cfg.device))
        self.jobs = plan_jobs(cfg, regs)
        self.by_key = {job.key: job for job in self.jobs}

    # --- public --------------------------------------------------------------------------------
    def run(self, *, evaluate: bool = True) -> ResultStore:
        """Train/load every model and (if ``evaluate``) run every pending job. Returns the store.
        ``cfg.threads``, when set, is torch's CPU thread count in this process for the whole invocation
        (restored afterwards); training keeps its own setting (``TrainConfig.threads``) and remote workers
        theirs."""
        before = torch.get_num_threads()
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._run(evaluate)
        finally:
            torch.set_num_threads(before)

    def load_inputs(self, *, evaluate: bool = True) -> tuple[SplitData, list[int]]:
        """The data set's split and the evaluation points' test-set indices; ConfigError when the data
        cannot be read, holds NaN, has fewer test points than asked for (when ``evaluate``: training only
        checks its models on the points there are), or has no training examples for a model that must be
        trained. What ``--dry-run`` checks, and the first step of a run."""
        data = load_data(self.cfg, self.regs)
        count = self.cfg.points if evaluate else min(self.cfg.points, len(data.test_x))
        point_ids = [int(p) for p in select_points(data, count, self.cfg.points_seed())]
        trainable = sorted({name for name in self.cfg.models if self.regs.models.get(name).trainable})
        if trainable and len(data.train_x) == 0:
            raise ConfigError(f"data set {self.cfg.dataset!r}: the training split is empty, so "
                              f"{', '.join(trainable)} cannot be trained")
        return data, point_ids

    def _run(self, evaluate: bool) -> ResultStore:
        # Data and points first: an invocation that cannot start writes nothing.
        data, point_ids = self.load_inputs(evaluate=evaluate)
        self._array_points = set(point_ids[:self.cfg.keep_arrays])
        self._produced: dict[str, list[dict[str, Any]]] = {}  # job key -> metrics of this invocation's ok rows
        store = ResultStore(self.run_dir)
        work, plans = self._plan_work(store, data, point_ids, evaluate)
        # a resume never mixes attack engines under one job key (robbench.resume_engines), checked before this
        # invocation records anything; --retrain replaces every stored row, so there is nothing to mix
        self._engines = {} if self.retrain else resume_engines.stored_engines(store, self.by_key)
        if evaluate and getattr(self.executor, "runs_here", True):
            resume_engines.check_before_work(self._engines, self.jobs,
                                             {key: p for plan in plans.values() for key, p in plan.pending.items()})
        store.record_run(RunRecord(self.cfg.to_dict(), [job.key for job in self.jobs],
                                   sorted({model_key(self.cfg, job.model) for job in self.jobs}), point_ids))
        store.record_jobs((job.key, job.estimator, job.params, job.run.to_dict()) for job in self.jobs)
        store.record_provenance(run_provenance(self.cfg, self.regs, model_configs(self.cfg, self.regs)))
        for name in self.cfg.estimators:  # the leaderboard is rebuilt from these, plugin installed or not
            columns = getattr(self.regs.estimators.get(name), "columns", ()) or ()
            store.record_columns(name, [col.to_dict() for col in columns])
        board_current = False
        with TaskDisplay(self.console, len(work) + sum(len(w.batches) for w in work), self.progress) as display:
            for event in self._events(work, data):
                plan = plans[event.work.model.key if isinstance(event, ModelReady) else event.batch.model_key]
                if isinstance(event, ModelReady):
                    finished = self._model_ready(store, plan, event)
                    display.model(event.problem is not None, skipped=len(plan.work.batches) if event.problem else 0)
                else:
                    job = self.by_key[event.batch.job.key]
                    # before anything of the batch is kept: a resume that would mix engines is refused
                    resume_engines.check_batch(self._engines, job, [r.ran_with for r in event.results if r.ok])
                    store.write(self._rows(job, event.results))
                    faults.reached("rows-written")
                    plan.left -= 1
                    finished = plan.left == 0
                    display.batch(event.failed)
                    if finished:
                        self._warn_cap(plan.jobs)
                display.running(event.running)
                if evaluate and finished:  # after each model: a crash keeps a current board
                    write_leaderboard(store, self.run_dir)
                board_current = finished
        if evaluate and not board_current:  # all results were stored already, or failures came last
            write_leaderboard(store, self.run_dir)
        return store

    # --- steps ---------------------------------------------------------------------------------
    def _jobs_by_model(self) -> list[tuple[ModelConfig, list[Job]]]:
        by_key: dict[str, list[Job]] = {}
        for job in self.jobs:
            by_key.setdefault(model_key(self.cfg, job.model), []).append(job)
        return [(m, by_key.get(model_key(self.cfg, m), [])) for m in model_configs(self.cfg, self.regs)]

    def _pending(self, store: ResultStore, jobs: list[Job], point_ids: list[int]) -> dict[str, list[int]]:
        """Per job key, the points still to evaluate (--retrain: all, stored ones came from old weights)."""
        pending = {}
        for job in jobs:
            done = set() if self.retrain else store.done_points(job.key)
            pending[job.key] = [p for p in point_ids if p not in done]
        return pending

    def _plan_work(self, store: ResultStore, data: SplitData, point_ids: list[int],
                   evaluate: bool) -> tuple[list[ModelWork], dict[str, "_ModelPlan"]]:
        """One ModelWork per model with something to do (``evaluate``: pending points), in config order."""
        work, plans = [], {}
        recorded = store.models()
        for model_cfg, jobs in self._jobs_by_model():
            pending = self._pending(store, jobs, point_ids)
            # A model whose record (test ELBO) was lost is prepared again to restore it, even when all its
            # results are stored.
            if evaluate and not any(pending.values()) and model_key(self.cfg, model_cfg) in recorded:
                self.console.print(f"[dim]{model_cfg.label} seed {model_cfg.seed}: all results stored, skipped[/dim]")
                continue
            item = ModelWork(self._model_spec(model_cfg), self._batches(jobs, pending, data) if evaluate else [])
            work.append(item)
            plans[item.model.key] = _ModelPlan(item, jobs, pending, len(item.batches))
        return work, plans

    def _model_spec(self, model_cfg: ModelConfig) -> ModelSpec:
        return ModelSpec(model_key(self.cfg, model_cfg), model_cfg.label, model_cfg.seed, model_cfg.family,
                         dict(model_cfg.params), self.cfg.train.for_seed(model_cfg.seed), self.cfg.dataset,
                         str(self.device), self.retrain)

    def _events(self, work: list[ModelWork], data: SplitData) -> Iterator[Event]:
        if isinstance(self.executor, WorkExecutor):
            return self.executor.run(work, data, progress=self.progress)
        return run_in_process(self.executor, work, data, self.regs, cache_dir=cache_dir() / "models",
                              progress=self.progress)

    def _model_ready(self, store: ResultStore, plan: "_ModelPlan", event: ModelReady) -> bool:
        """Record the model; fail its pending rows if it cannot be used. True when the model has no batch left."""
        spec = event.work.model
        store.record_model(spec.key, spec.label, spec.seed, event.info)
        line = describe_prepared(event.info)
        colour = "red" if "error" in event.info else "default"
        self.console.print(f"[bold]{escape(spec.label)}[/bold] seed {spec.seed}: [{colour}]{escape(line)}[/{colour}]")
        if event.problem is not None:
            self._fail_rows(store, plan.jobs, plan.pending, event.problem)
            plan.left = 0
        return plan.left == 0

    def _batches(self, jobs: list[Job], pending: dict[str, list[int]], data: SplitData) -> list[Batch]:
        """Each job's pending points in slices of ``point_batch``, inputs on the CPU (the executor moves them)."""
        step = self.cfg.point_batch
        return [Batch(job.spec(), chunk, data.test_x[chunk], model_key(self.cfg, job.model)) for job in jobs
                for ids in [pending[job.key]] for chunk in (ids[i:i + step] for i in range(0, len(ids), step))]

    def _rows(self, job: Job, results: list[PointResult]) -> list[ResultRow]:
        """Store rows for one batch's results; keeps the first points' arrays and reports a failed batch."""
        errors = sorted({r.error for r in results if r.error and not r.metrics})
        if errors:
            failed = sum(1 for r in results if r.error and not r.metrics)
            some = f" for {failed} of {len(results)} points" if failed < len(results) else ""
            more = f" (and {len(errors) - 1} similar)" if len(errors) > 1 else ""
            self.console.print(f"[red]  {job.estimator} failed on {escape(job.model.label)}{some}: "
                               f"{escape(errors[0])}{more}[/red]")
        rows = []
        for res in results:
            self._save_arrays(job, res.point, res.arrays)
            rows.append(job.row(res.point, "ok" if res.ok else "error", res.metrics, res.error, res.seconds,
                                res.ran_with if res.ok else None))
        self._produced.setdefault(job.key, []).extend(res.metrics for res in results if res.ok)
        return rows

    def _save_arrays(self, job: Job, point: int, arrays: dict[str, torch.Tensor] | None) -> None:
        """Keep an estimator's tensors (e.g. adversarial inputs) for the first points, for reports (a model
        with a declared input range other than [0, 1] has it in them as ``input_range``)."""
        if not arrays:
            return
        # The first keep_arrays points of the planned order: the same files whatever order results arrive in.
        if point not in self._array_points:
            return
        folder = arrays_dir(self.run_dir, job.key)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
        tmp = folder / f"{point}.pt.tmp"
        torch.save(tensors, tmp)
        tmp.replace(folder / f"{point}.pt")

    def _warn_cap(self, jobs: list[Job]) -> None:
        """Warn for each job of a finished model whose margins (this invocation's) often hit the cap."""
        for job in jobs:
            cap = job.params.get("max_radius")
            shown = f"{cap} (units: {job.run.units})" if job.run.units != "l2" else cap
            label = f"{job.model.label} seed {job.model.seed} / {job.attack_label or '-'} / {job.estimator}"
            warning = cap_warning(label, self._produced.get(job.key, []), shown)
            if warning:
                self.console.print(f"[yellow]warning: {escape(warning)}[/yellow]")

    def _fail_rows(self, store: ResultStore, jobs: list[Job], pending: dict[str, list[int]], message: str) -> None:
        store.write(job.row(p, "error", {}, message, 0.0) for job in jobs for p in pending[job.key])
        self.console.print(f"[red]  {escape(message)}[/red]")


def arrays_dir(run_dir: Path, job_key: str) -> Path:
    """Where the tensors an estimator returned under ``ARRAYS_KEY`` are kept: one ``<point>.pt`` each
    (load with ``torch.load(path, weights_only=True)``)."""
    return Path(run_dir) / "arrays" / job_key
