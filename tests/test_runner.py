"""The runner: results written as produced, resume after a crash, failures kept to their own rows."""
from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from robbench import hookimpl
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.config import build_config, validate_against_plugins
from robbench.protocols import ModelFamily
from robbench.runner import Runner
from robbench.store import ResultStore


class Crash(BaseException):
    """Stands in for the process being killed (not an Exception, so the runner cannot swallow it)."""


class CountingEstimator:
    name = "counting"
    description = "test: reports mean pixel, counts calls, may crash after a number of batches"
    defaults = {}
    needs_attack = False

    def __init__(self):
        self.seen: list[int] = []
        self.batches = 0
        self.crash_after: int | None = None  # an attribute, not a parameter: the job key stays the same

    def __call__(self, ctx, x):
        if self.batches == self.crash_after:
            raise Crash()
        self.batches += 1
        self.seen += [int(p) for p in ctx.point_ids]
        return [{"pixel_mean": float(xi.mean())} for xi in x]


class NanVAE(LinearGaussianVAE):
    def encode(self, x):
        mu, sigma = super().encode(x)
        return mu * float("nan"), sigma


class SmallBatchVAE(torch.nn.Module):
    """Encodes at most 2 points per call, as a big encoder whose memory holds only the run's point_batch
    (no ``loss``: a ready-built model without one has no test ELBO, which is taken in batches of 1024)."""

    def __init__(self, input_shape):
        super().__init__()
        self.inner = LinearGaussianVAE(input_shape, 4)
        self.input_shape, self.latent_dim = self.inner.input_shape, self.inner.latent_dim

    def encode(self, x):
        if x.shape[0] > 2:
            raise RuntimeError(f"out of memory: {x.shape[0]} points in one call")
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)


class RunnerTestPlugin:
    def __init__(self):
        self.counting = CountingEstimator()

    @hookimpl
    def register_estimators(self, register):
        register(self.counting)

    @hookimpl
    def register_models(self, register):
        register(ModelFamily(name="nan_model", description="test: encoder yields NaN",
                             build=lambda p, s: NanVAE(s, 4), trainable=False))
        register(ModelFamily(name="broken_model", description="test: cannot be built",
                             build=lambda p, s: 1 / 0, trainable=False))
        register(ModelFamily(name="small_batch_model", description="test: encodes at most 2 points a call",
                             build=lambda p, s: SmallBatchVAE(s), trainable=False))


@pytest.fixture
def plugin(fresh_plugins):
    plugin = RunnerTestPlugin()
    fresh_plugins.register_plugin(plugin, name="runner-test")
    yield plugin
    fresh_plugins.unregister_plugin(plugin)


def _config(regs, **values):
    base = {"dataset": "tp_blobs", "models": ["tp_linear"], "attacks": [], "points": 8, "point_batch": 2}
    cfg = build_config({**base, **values})
    validate_against_plugins(cfg, regs)
    return cfg


def _run(cfg, regs, run_dir):
    return Runner(cfg, regs, run_dir, console=Console(quiet=True), progress=False).run()


def test_crash_loses_nothing_and_rerun_resumes(plugin, fresh_plugins, tmp_path):
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, estimators=["counting"])
    plugin.counting.crash_after = 2
    with pytest.raises(Crash):
        _run(cfg, regs, tmp_path)
    first = list(plugin.counting.seen)
    assert len(first) == 4  # two batches of two points were reported before the "kill"
    stored = {r.point_id: r.metrics["pixel_mean"] for r in ResultStore.open_existing(tmp_path).rows()}
    assert sorted(stored) == sorted(first)

    # Rerunning the same configuration computes only the missing points and keeps the others.
    plugin.counting.crash_after, plugin.counting.seen = None, []
    rows = _run(cfg, regs, tmp_path).rows()
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    assert len(plugin.counting.seen) == 4 and set(plugin.counting.seen).isdisjoint(first)
    assert {r.point_id: r.metrics["pixel_mean"] for r in rows if r.point_id in stored} == stored

    # A third run finds everything done and computes nothing.
    plugin.counting.seen = []
    _run(cfg, regs, tmp_path)
    assert plugin.counting.seen == []


def test_point_batch_is_left_out_of_the_job_key_so_a_run_resumes_across_it(plugin, fresh_plugins, tmp_path):
    """point_batch is not keyed, on purpose (README, "Same seed, same numbers"): a point's random streams come
    from its id, so another batching changes a result only through the float rounding of the model's
    products, and the batches a point falls in already change for a fixed point_batch (a resumed run, a run
    whose points grew). Keying it would not make rows reproducible, only discard stored work: a run cut off
    at point_batch 2 resumes at point_batch 4, computing only the missing points."""
    from robbench.runner import plan_jobs

    regs = fresh_plugins.get_registries()
    small, large = (_config(regs, estimators=["counting"], point_batch=b) for b in (2, 4))
    assert [j.key for j in plan_jobs(small, regs)] == [j.key for j in plan_jobs(large, regs)]
    plugin.counting.crash_after = 1
    with pytest.raises(Crash):
        _run(small, regs, tmp_path)
    first = list(plugin.counting.seen)
    plugin.counting.crash_after, plugin.counting.seen, plugin.counting.batches = None, [], 0
    rows = _run(large, regs, tmp_path).rows()
    assert len(rows) == 8 and all(r.status == "ok" for r in rows)
    assert len(first) == 2 and sorted(plugin.counting.seen + first) == sorted(r.point_id for r in rows)
    assert plugin.counting.batches == 2  # 6 points in batches of 4


def test_broken_models_fail_only_their_rows(plugin, fresh_plugins, tmp_path):
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, models=["nan_model", "broken_model", "tp_linear"], estimators=["encoder_stats"])
    store = _run(cfg, regs, tmp_path)
    rows = store.rows()
    by_model = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    assert all(r.status == "error" and "NaN" in r.error for r in by_model["nan_model"])
    assert all(r.status == "error" for r in by_model["broken_model"])
    assert "ZeroDivisionError" in json.dumps(store.models())
    assert len(by_model["tp_linear"]) == 8 and all(r.status == "ok" for r in by_model["tp_linear"])
    board = json.loads((tmp_path / "leaderboard.json").read_text())["rows"]
    failed = {rec["model"]: rec["failed"] for rec in board}
    assert failed == {"nan_model": 8, "broken_model": 8, "tp_linear": 0}
    assert any("NaN" in e for rec in board if rec["model"] == "nan_model" for e in rec["errors"])


def test_the_encoder_check_encodes_no_more_points_a_call_than_the_run(plugin, fresh_plugins, tmp_path):
    """The check before estimation encoded all of a model's points in one call (memory on a big encoder):
    a model that runs at point_batch 2 failed every row with "encode() raised ... out of memory"."""
    regs = fresh_plugins.get_registries()
    small = {"models": ["small_batch_model"], "estimators": ["encoder_stats"], "points": 8}
    cfg = _config(regs, **small, point_batch=2)
    rows = _run(cfg, regs, tmp_path).rows()
    assert len(rows) == 8 and all(r.status == "ok" for r in rows), {r.error for r in rows}
    # and a model that breaks on the run's batches still fails at the check, with its message
    rows = _run(_config(regs, **small, point_batch=4), regs, tmp_path / "b").rows()
    assert all(r.status == "error" and "out of memory: 4 points" in r.error for r in rows), {r.error for r in rows}


def test_points_are_a_stable_prefix(plugin, fresh_plugins, tmp_path):
    """Asking for more points keeps the earlier ones, so their stored results are reused."""
    regs = fresh_plugins.get_registries()
    _run(_config(regs, estimators=["counting"], points=4), regs, tmp_path)
    first = set(plugin.counting.seen)
    plugin.counting.seen.clear()
    _run(_config(regs, estimators=["counting"], points=8), regs, tmp_path)
    assert len(first) == 4 and len(plugin.counting.seen) == 4 and first.isdisjoint(plugin.counting.seen)


def test_leaderboard_shows_only_the_latest_invocation(plugin, fresh_plugins, tmp_path):
    regs = fresh_plugins.get_registries()
    _run(_config(regs, estimators=["counting"], points=8), regs, tmp_path)
    _run(_config(regs, estimators=["counting"], points=3), regs, tmp_path)
    board = json.loads((tmp_path / "leaderboard.json").read_text())["rows"]
    assert [rec["points"] for rec in board] == [3]


def test_an_invocation_that_cannot_start_writes_nothing(plugin, fresh_plugins, tmp_path):
    from robbench.config import ConfigError

    regs = fresh_plugins.get_registries()
    _run(_config(regs, estimators=["counting"], points=4), regs, tmp_path)
    before = (tmp_path / "leaderboard.json").read_text()
    with pytest.raises(ConfigError, match="test split holds only 40 points"):
        _run(_config(regs, estimators=["counting"], points=5000), regs, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError):
        _run(_config(regs, estimators=["counting"], points=5000), regs, tmp_path)
    from robbench.leaderboard import write_leaderboard
    write_leaderboard(ResultStore.open_existing(tmp_path), tmp_path)
    assert (tmp_path / "leaderboard.json").read_text() == before


def test_retrain_recomputes_stored_results(plugin, fresh_plugins, tmp_path):
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, estimators=["counting"], points=4)
    _run(cfg, regs, tmp_path)
    plugin.counting.seen = []
    Runner(cfg, regs, tmp_path, console=Console(quiet=True), progress=False, retrain=True).run()
    assert len(plugin.counting.seen) == 4


def test_numpy_metrics_are_stored_not_fatal(tmp_path):
    import numpy as np

    from robbench.store import ResultRow

    store = ResultStore(tmp_path)
    store.write([ResultRow("j", 0, "m", 0, "", "e", "ok",
                           {"flag": np.bool_(True), "x": np.float32(0.5), "v": np.arange(2)}, None, 0.1)])
    assert store.rows()[0].metrics == {"flag": True, "x": 0.5, "v": [0, 1]}


def test_margin_portfolio_takes_the_per_point_worst_attack(plugin, fresh_plugins, tmp_path):
    """--attacks max_damage,noise with margin.portfolio=true: one job per model whose per-point margin is
    the smaller of the two single-attack margins (same Monte Carlo streams), naming the attack that set it."""
    regs = fresh_plugins.get_registries()
    params = {"rel_tolerance": 0.05, "samples_max": 1024, "keep_witness": False}
    common = {"attacks": ["max_damage", "noise"], "estimators": ["margin"], "points": 4, "point_batch": 4}
    single = _run(_config(regs, **common, estimator_params={"margin": params}), regs, tmp_path / "single").rows()
    both = _run(_config(regs, **common, estimator_params={"margin": {**params, "portfolio": True}}), regs,
                tmp_path / "portfolio").rows()
    assert {r.attack for r in both} == {"portfolio(max_damage+noise)"} and len(both) == 4
    by_attack = {(r.attack, r.point_id): r.metrics for r in single}
    setters = []
    for row in both:
        md, noise = by_attack[("max_damage", row.point_id)], by_attack[("noise", row.point_id)]
        assert row.metrics["margin"] == min(md["margin"], noise["margin"])
        setters.append(row.metrics["margin_attack"])
        chosen = md if row.metrics["margin_attack"] == "max_damage" else noise
        assert row.metrics["margin_hi"] == chosen["margin_hi"]
    assert "max_damage" in setters  # the noise direction is far from the worst one


def test_portfolio_jobs_are_keyed_apart_from_those_of_before_the_alpha_split(plugin, fresh_plugins):
    """Since session 7 a portfolio's attacks each run at alpha / K; run folders made before (each member at the
    whole alpha, so the kept interval could spend K x alpha) must not be resumed as if they held at the stated
    confidence: the portfolio's attack entry carries a marker that the job key hashes."""
    from robbench.runner import keyed_params, model_key, plan_jobs, stable_hash
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, attacks=["max_damage", "noise"], estimators=["margin"], points=4, point_batch=4,
                  estimator_params={"margin": {"portfolio": True}})
    (job,) = plan_jobs(cfg, regs)
    assert job.attack.params["portfolio_alpha"] == "split"
    before = {k: v for k, v in job.attack.params.items() if k != "portfolio_alpha"}  # the attack entry of before
    keyed = {**keyed_params(regs.estimators.get("margin"), job.params), **job.run.hashed()}
    identity = {"model": model_key(cfg, job.model), "estimator": "margin", "params": keyed}
    assert job.key == stable_hash({**identity, "attack": [job.attack.name, job.attack.params]})
    assert job.key != stable_hash({**identity, "attack": [job.attack.name, before]})
