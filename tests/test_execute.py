"""The execution seam: evaluate_batch, the Executor protocol and the runner as the only store writer."""
from __future__ import annotations

import pickle

import pytest
import torch
from rich.console import Console

from robbench_plugins.analytic import LinearGaussianVAE
from robbench.config import build_config, validate_against_plugins
from robbench.execute import Batch, JobSpec, LocalExecutor, PointResult, evaluate_batch, make_executor
from robbench.plugins import get_registries
from robbench.runner import Runner, plan_jobs
from robbench.settings import RunSettings
from robbench.store import ResultStore


def _spec(**params) -> JobSpec:
    return JobSpec("encoder_stats", None, {}, {**get_registries().estimators.get("encoder_stats").defaults, **params},
                   RunSettings())


def test_evaluate_batch_returns_one_result_per_point_in_order():
    model = LinearGaussianVAE()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    results = evaluate_batch(_spec(), model, x, [7, 3, 5])
    assert [r.point for r in results] == [7, 3, 5]
    assert all(r.ok and r.arrays is None and r.seconds >= 0 for r in results)
    # The analytic model has constant sigma and Jacobian ||A||_F, whatever the point.
    assert results[0].metrics["min_sigma"] == pytest.approx(model.s, rel=1e-6)
    assert results[1].metrics["jacobian_frobenius"] == pytest.approx(float(model.A.norm()), rel=1e-4)


def test_evaluate_batch_turns_an_estimator_error_into_error_rows():
    bad = _spec(jacobian_method="no_such_method")
    x = torch.rand(2, 1, 8, 8)
    results = evaluate_batch(bad, LinearGaussianVAE(), x, [0, 1])
    assert [r.ok for r in results] == [False, False] and all(r.metrics == {} for r in results)
    assert "no_such_method" in results[0].error
    with pytest.raises(ValueError, match="no_such_method"):
        evaluate_batch(bad, LinearGaussianVAE(), x, [0, 1], raise_errors=True)


def test_job_descriptions_and_batches_pickle():
    """What a remote worker receives is plain data: a job spec, point ids and the inputs."""
    batch = Batch(_spec(), [1, 2], torch.rand(2, 1, 8, 8))
    again = pickle.loads(pickle.dumps(batch))
    assert again.job == batch.job and again.point_ids == [1, 2] and torch.equal(again.x, batch.x)
    assert again.job.run.r == RunSettings().r


def test_unknown_executor_lists_the_known_ones():
    assert isinstance(make_executor("local"), LocalExecutor)
    with pytest.raises(ValueError, match="available: local"):
        make_executor("ray_cluster")


class ReversingExecutor:
    """Runs batches in reverse order and records them: stands in for a remote executor whose results
    come back in any order (it shares evaluate_batch with the local one and never touches the store)."""

    def __init__(self):
        self.seen: list[tuple[str, list[int]]] = []

    def map(self, model, batches):
        for batch in reversed(list(batches)):
            self.seen.append((batch.job.estimator, batch.point_ids))
            yield batch, evaluate_batch(pickle.loads(pickle.dumps(batch.job)), model, batch.x, batch.point_ids)


def test_runner_uses_the_given_executor_and_writes_the_store(fresh_plugins, tmp_path):
    regs = fresh_plugins.get_registries()
    cfg = build_config({"dataset": "tp_blobs", "models": ["tp_linear"], "attacks": [], "points": 5,
                        "point_batch": 2, "estimators": ["encoder_stats"]})
    validate_against_plugins(cfg, regs)
    executor = ReversingExecutor()
    Runner(cfg, regs, tmp_path / "remote", console=Console(quiet=True), progress=False, executor=executor).run()
    Runner(cfg, regs, tmp_path / "local", console=Console(quiet=True), progress=False).run()
    assert [len(ids) for _, ids in executor.seen] == [1, 2, 2]
    remote = {r.point_id: r.metrics for r in ResultStore.open_existing(tmp_path / "remote").rows()}
    local = {r.point_id: r.metrics for r in ResultStore.open_existing(tmp_path / "local").rows()}
    assert len(remote) == 5 and remote == local


def test_job_keys_hash_run_settings_but_not_the_device(fresh_plugins):
    regs = fresh_plugins.get_registries()
    base = {"dataset": "tp_blobs", "models": ["tp_linear"], "attacks": [], "estimators": ["encoder_stats"]}
    key = plan_jobs(build_config(base), regs)[0].key
    assert plan_jobs(build_config({**base, "r": 2.0}), regs)[0].key != key
    assert plan_jobs(build_config({**base, "seed": 1}), regs)[0].key != key
    job = plan_jobs(build_config(base), regs)[0]
    assert job.run == RunSettings() and "r" not in job.params  # plugin parameters stay separate


def test_point_result_ok():
    assert PointResult(0, {}).ok and not PointResult(0, {}, error="boom").ok


def test_executor_is_chosen_by_name_in_the_config(fresh_plugins, tmp_path, monkeypatch):
    from robbench import execute
    from robbench.config import ConfigError

    class Named(LocalExecutor):
        used = 0

        def map(self, model, batches):
            Named.used += 1
            yield from super().map(model, batches)

    monkeypatch.setitem(execute.EXECUTORS, "named_test", Named)
    regs = fresh_plugins.get_registries()
    cfg = build_config({"dataset": "tp_blobs", "models": ["tp_linear"], "attacks": [], "points": 2,
                        "estimators": ["encoder_stats"], "executor": "named_test"})
    Runner(cfg, regs, tmp_path, console=Console(quiet=True), progress=False).run()
    assert Named.used == 1 and len(ResultStore.open_existing(tmp_path).rows()) == 2
    with pytest.raises(ConfigError, match="'executor': 'dask'; allowed: local, named_test, ray"):
        build_config({"executor": "dask"})
