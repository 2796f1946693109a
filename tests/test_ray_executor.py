"""The Ray executor on a local 2-CPU Ray instance (one per module): same results as the local executor,
a worker killed mid-task is survived, a killed coordinator resumes, bounded retries end in error rows."""
from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import install_thirdparty
from robbench import hookimpl
from robbench.config import build_config, validate_against_plugins
from robbench.runner import Runner
from robbench.store import ResultStore

ray = pytest.importorskip("ray")
from robbench.executors.ray import RayExecutor  # noqa: E402  (needs ray)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance with 2 CPUs whose workers have the third-party demo plugin 'installed' and
    see $ROBBENCH_TP_KILL (the fault-injection marker). Yields (GCS address, marker path, plugin dir)."""
    root = tmp_path_factory.mktemp("ray")
    site = install_thirdparty(root / "site")
    marker = root / "kill-marker"
    with pytest.MonkeyPatch.context() as mp:  # the raylet and its workers inherit this environment
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        mp.setenv("ROBBENCH_TP_KILL", str(marker))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address, marker, site
    finally:
        ray.shutdown()


def _config(regs, **values):
    base = {"dataset": "tp_blobs", "models": ["tp_linear"], "attacks": ["tp_constant"],
            "estimators": ["tp_damage", "encoder_stats"], "points": 6, "point_batch": 2}
    cfg = build_config({**base, **values})
    validate_against_plugins(cfg, regs)
    return cfg


def _run(cfg, regs, run_dir, executor=None, console=None):
    store = Runner(cfg, regs, run_dir, console=console or Console(quiet=True), progress=console is not None,
                   executor=executor).run()
    store.close()


def _metrics(run_dir):
    store = ResultStore.open_existing(run_dir)
    rows = {(r.job_key, r.point_id): (r.status, r.metrics) for r in store.rows()}
    store.close()
    return rows


def _row_counts(run_dir):
    with sqlite3.connect(Path(run_dir) / "results.sqlite") as conn:
        return conn.execute("SELECT job_key, point_id, COUNT(*) FROM results GROUP BY job_key, point_id").fetchall()


def _board_without_times(run_dir):
    """leaderboard.csv without the wall-time column (the one number that may differ between runs)."""
    lines = (Path(run_dir) / "leaderboard.csv").read_text().splitlines()
    drop = lines[0].split(",").index("seconds")
    return [",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines]


def test_ray_and_local_give_the_same_results_and_train_each_model_once(fresh_plugins, ray_cluster, tmp_path,
                                                                        monkeypatch):
    """Two trained models (beta_vae on 8x8 digits, 1 epoch, 2 seeds) and a ready-built one: the local run
    trains in this process; the Ray run trains in Ray tasks (its own empty cache), the coordinator caches
    the checkpoints, and a second Ray run loads them instead of training."""
    regs = fresh_plugins.get_registries()
    trained = dict(dataset="digits", models=["beta_vae"], model_seeds=[0, 1], points=4, train={"epochs": 1},
                   model_params={"beta_vae": {"hidden": 32, "latent_dim": 4, "beta": [1.0]}})
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache-local"))
    _run(_config(regs, **trained), regs, tmp_path / "local")
    _run(_config(regs), regs, tmp_path / "local-linear")
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache-ray"))
    _run(_config(regs, **trained), regs, tmp_path / "ray", RayExecutor())
    _run(_config(regs), regs, tmp_path / "ray-linear", RayExecutor())

    for local, remote in (("local", "ray"), ("local-linear", "ray-linear")):
        assert _metrics(tmp_path / remote) == _metrics(tmp_path / local)
        assert _board_without_times(tmp_path / remote) == _board_without_times(tmp_path / local)
    assert len(_metrics(tmp_path / "ray")) == 2 * 2 * 4 and all(s == "ok" for s, _ in _metrics(tmp_path / "ray").values())
    assert len(list((tmp_path / "cache-ray" / "models").glob("beta_vae-*.pt"))) == 2  # written by the coordinator
    store = ResultStore.open_existing(tmp_path / "ray")
    assert [m["from_cache"] for m in store.models().values()] == [False, False]
    store.close()

    _run(_config(regs, **trained), regs, tmp_path / "ray-again", RayExecutor())
    store = ResultStore.open_existing(tmp_path / "ray-again")
    assert [m["from_cache"] for m in store.models().values()] == [True, True]  # shared, not retrained
    store.close()
    assert _metrics(tmp_path / "ray-again") == _metrics(tmp_path / "local")


def test_a_worker_killed_during_an_estimation_task_is_retried(fresh_plugins, ray_cluster, tmp_path):
    _, marker, _ = ray_cluster
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, estimators=["tp_pixel_mean", "tp_damage"])
    _run(cfg, regs, tmp_path / "clean")
    marker.write_text("once")  # the first tp_pixel_mean task to see it SIGKILLs its worker
    _run(cfg, regs, tmp_path / "faulty", RayExecutor(max_retries=2))
    assert not marker.exists()  # a worker did die
    assert _metrics(tmp_path / "faulty") == _metrics(tmp_path / "clean")
    counts = _row_counts(tmp_path / "faulty")
    assert len(counts) == 2 * 6 and {n for _, _, n in counts} == {1}  # every (job, point) exactly once


def test_a_task_that_keeps_dying_fails_its_rows_after_bounded_retries(fresh_plugins, ray_cluster, tmp_path):
    _, marker, _ = ray_cluster
    regs = fresh_plugins.get_registries()
    cfg = _config(regs, attacks=[], estimators=["tp_pixel_mean", "encoder_stats"], points=2)
    marker.write_text("always")
    shown = io.StringIO()
    try:
        _run(cfg, regs, tmp_path / "run", RayExecutor(max_retries=1), Console(file=shown, width=200))
    finally:
        marker.unlink(missing_ok=True)
    rows = ResultStore.open_existing(tmp_path / "run").rows()
    by_estimator = {e: [r for r in rows if r.estimator == e] for e in ("tp_pixel_mean", "encoder_stats")}
    assert len(rows) == 4 and all(r.status == "ok" for r in by_estimator["encoder_stats"])
    failed = by_estimator["tp_pixel_mean"]
    assert all(r.status == "error" for r in failed)
    assert "after 1 retries" in failed[0].error and "Worker" in failed[0].error  # Ray's worker-died error
    # The coordinator's one display: 3 tasks (the model, a batch per job), the dying one counted as failed.
    assert "3/3" in shown.getvalue() and "failed 1" in shown.getvalue()


class CoordinatorOnly:
    """An estimator registered in this process only: Ray workers do not have it (a plugin missing on a node)."""

    name = "coordinator_only"
    description = "test: exists on the coordinator, not on the workers"
    defaults = {}
    needs_attack = False

    def __call__(self, ctx, x):
        return [{"one": 1.0} for _ in x]


class CoordinatorOnlyPlugin:
    @hookimpl
    def register_estimators(self, register):
        register(CoordinatorOnly())


def test_a_task_that_raises_is_retried_then_fails_its_rows_with_the_error(fresh_plugins, ray_cluster, tmp_path):
    plugin = CoordinatorOnlyPlugin()
    fresh_plugins.register_plugin(plugin, name="coordinator-only")
    try:
        regs = fresh_plugins.get_registries()
        cfg = _config(regs, attacks=[], estimators=["coordinator_only", "encoder_stats"], points=2)
        _run(cfg, regs, tmp_path / "run", RayExecutor(max_retries=1))
    finally:
        fresh_plugins.unregister_plugin(plugin)
    rows = ResultStore.open_existing(tmp_path / "run").rows()
    failed = [r for r in rows if r.estimator == "coordinator_only"]
    assert len(rows) == 4 and all(r.status == "ok" for r in rows if r.estimator == "encoder_stats")
    assert len(failed) == 2 and all(r.status == "error" for r in failed)
    assert "unknown estimator 'coordinator_only'" in failed[0].error and "after 1 retries" in failed[0].error


def test_coordinator_killed_mid_run_resumes_without_duplicates(ray_cluster, tmp_path):
    """A CLI coordinator joins the module's cluster (--ray-address), is SIGKILLed once some rows are
    stored, and a rerun finishes: stored rows are kept as they were, none is written twice."""
    address, _, site = ray_cluster
    env = {**os.environ, "PYTHONPATH": str(site), "ROBBENCH_CACHE": str(tmp_path / "cache")}
    config = tmp_path / "run.yaml"
    config.write_text("dataset: tp_blobs\nmodels: [tp_linear]\nattacks: []\nestimators: [tp_pixel_mean]\n"
                      "points: 8\npoint_batch: 1\nexecutor: ray\n"
                      "estimator_params: {tp_pixel_mean: {seconds: 0.5}}\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "robbench.cli", "run", "--config", str(config), "--out", str(out),
           "--ray-address", address, "--no-progress"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not _stored(out):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    before = {(r.job_key, r.point_id): r for r in ResultStore.open_existing(out).rows()}
    assert 0 < len(before) < 8
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts = _row_counts(out)
    assert len(counts) == 8 and {n for _, _, n in counts} == {1}
    with sqlite3.connect(out / "results.sqlite") as conn:
        created = dict(((k, p), c) for k, p, c in conn.execute("SELECT job_key, point_id, created FROM results"))
        kept = {(k, p): c for k, p, c in conn.execute("SELECT job_key, point_id, created FROM results")
                if (k, p) in before}
    assert len(kept) == len(before) and all(created[key] == kept[key] for key in before)  # not recomputed
    assert all(r.status == "ok" for r in ResultStore.open_existing(out).rows())


def _stored(run_dir: Path) -> bool:
    path = run_dir / "results.sqlite"
    if not path.exists():
        return False
    try:
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0] >= 2
    except sqlite3.Error:
        return False


def test_ray_executor_for_robbench_evaluate(fresh_plugins, ray_cluster):
    """The batch-level ``map``: a live model shipped once, batches in any order, same rows as locally."""
    import torch

    import robbench
    from robbench_plugins.analytic import LinearGaussianVAE

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    model = LinearGaussianVAE((1, 8, 8), 4)
    local = robbench.evaluate(model, x, attacks=[], estimators=["encoder_stats"], batch_size=2)
    remote = robbench.evaluate(model, x, attacks=[], estimators=["encoder_stats"], batch_size=2,
                               executor=RayExecutor())
    assert sorted(remote.rows, key=lambda r: r["point"]) == local.rows

