"""Speed-up of ``--executor ray`` over the local executor on the ``beta`` reproduction config, and Ray's
per-task overhead. A benchmark, not a test: it prints figures, it asserts nothing about time.

    python benchmarks/ray_speedup.py --quick            # beta with configs/quick.yaml (minutes on 2 cores)
    python benchmarks/ray_speedup.py                    # the full beta config (5 seeds x 3 betas x 25 points)
    python benchmarks/ray_speedup.py --quick --json out.json

What is timed (same machine, same cache, results checked equal):
1. the models are trained once first (``robbench train``-like, not timed), so both runs load them, and
   the C++ kernel is built (or loaded) first, so neither run pays for compiling it;
2. the local run (one process, as ``robbench run``, torch's default threads), and again with one torch
   thread (what each Ray task uses: the speed-up that parallel tasks alone bring);
3. the Ray run on a local Ray with ``--cpus`` CPUs (default: all of this machine's), Ray's start-up
   timed apart;
4. per-task overhead: the same one-point batch evaluated ``--tasks`` times in this process (with torch's
   default threads, and with one thread like a Ray task) and as Ray tasks one after another (submit,
   wait, fetch), on a ready-built 8x8 linear-Gaussian model; overhead = Ray round trip - one-thread local.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="apply configs/quick.yaml (8 points, 1 seed)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--tasks", type=int, default=30, help="tasks for the overhead measurement")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--skip-default-threads", action="store_true",
                        help="time the local run with one torch thread only (not also with torch's default)")
    args = parser.parse_args(argv)

    import ray

    from robbench.executors.ray import RayExecutor

    console = Console(stderr=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    figures = {"cpus": args.cpus, "machine_cpus": os.cpu_count(), "ray_start_s": time.perf_counter() - t0,
               "torch_threads_local": torch.get_num_threads(), "quick": args.quick}
    figures.update(task_overhead(RayExecutor(), args.tasks))
    figures.update(beta_speedup(args.quick, console, default_threads=not args.skip_default_threads))
    ray.shutdown()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def task_overhead(executor, tasks: int) -> dict[str, float]:
    """Seconds per one-point batch: in this process, and as a Ray task round trip (one at a time)."""
    from robbench_plugins.analytic import LinearGaussianVAE
    from robbench.execute import Batch, JobSpec, LocalExecutor
    from robbench.plugins import get_registries
    from robbench.settings import RunSettings

    est = get_registries().estimators.get("encoder_stats")
    job = JobSpec("encoder_stats", None, {}, dict(est.defaults), RunSettings())
    model = LinearGaussianVAE((1, 8, 8), 4)
    batch = Batch(job, [0], torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    list(executor.map(model, [batch]))  # warm-up: workers started, modules imported
    local = LocalExecutor()
    timings = {}
    for name, threads in (("task_local_s", torch.get_num_threads()), ("task_local_1thread_s", 1)):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            for _ in range(tasks):
                list(local.map(model, [batch]))
            timings[name] = (time.perf_counter() - t0) / tasks
        finally:
            torch.set_num_threads(before)
    t0 = time.perf_counter()
    for _ in range(tasks):
        list(executor.map(model, [batch]))
    timings["task_ray_roundtrip_s"] = (time.perf_counter() - t0) / tasks
    timings["task_overhead_s"] = timings["task_ray_roundtrip_s"] - timings["task_local_1thread_s"]
    return timings


def beta_speedup(quick: bool, console: Console, *, default_threads: bool = True) -> dict[str, float]:
    """Wall seconds of the beta config run locally and on Ray (models trained beforehand), results compared."""
    from robbench.config import build_config, validate_against_plugins
    from robbench.executors.ray import RayExecutor
    from robbench.plugins import get_registries
    from robbench.paper.reproduce import experiments
    from robbench.runner import Runner
    from robbench.store import ResultStore

    values = next(exp for exp in experiments(quick=quick) if exp.name == "beta").configs[0]
    regs = get_registries()
    cfg = build_config(values)
    validate_against_plugins(cfg, regs)
    out = Path(tempfile.mkdtemp(prefix="robbench-ray-bench-"))
    quiet = Console(quiet=True)
    from robbench import kernels

    t0 = time.perf_counter()
    kernels.load()  # build or load the C++ kernel before anything is timed
    kernel_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    Runner(cfg, regs, out / "train", console=quiet, progress=False).run(evaluate=False).close()
    train_s = time.perf_counter() - t0
    timings = {}
    threads_now = torch.get_num_threads()
    # local: as `robbench run` (torch's default threads); local_1thread: one thread, as each Ray task uses.
    runs = [("local", None, threads_now)] if default_threads else []
    runs += [("local_1thread", None, 1), ("ray", RayExecutor(), threads_now)]
    for name, executor, threads in runs:
        console.print(f"beta{' (quick)' if quick else ''}: {name} run ...")
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            Runner(cfg, regs, out / name, console=quiet, progress=False, executor=executor).run().close()
            timings[name] = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads_now)
    rows = {}
    for name in timings:
        store = ResultStore.open_existing(out / name)
        rows[name] = {(r.job_key, r.point_id): (r.status, r.metrics) for r in store.rows()}
        store.close()
    jobs = Runner(cfg, regs, out / "local", console=quiet, progress=False).jobs
    models = len({(job.model.label, job.model.seed) for job in jobs})
    batches = len(jobs) * -(-cfg.points // cfg.point_batch)
    figures = {"beta_models": models, "beta_ray_tasks": models + batches, "beta_rows": len(rows["ray"]),
               "beta_results_equal": all(r == rows["ray"] for r in rows.values()),
               "beta_pretrain_s": train_s, "kernel_load_s": kernel_s,
               "beta_local_1thread_s": timings["local_1thread"], "beta_ray_s": timings["ray"],
               "beta_speedup_vs_1thread": timings["local_1thread"] / timings["ray"]}
    if "local" in timings:
        figures.update(beta_local_s=timings["local"], beta_speedup=timings["local"] / timings["ray"])
    return figures


if __name__ == "__main__":
    sys.exit(main())
