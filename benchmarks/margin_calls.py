"""Replay the Monte Carlo calls of a real margin run, per backend variant, in one process.

``robbench bench --margin`` times whole margin runs in wall-clock seconds, which a shared machine
distorts (one slow window can double a run). This script records every ``count_within`` call the main
command's margin job makes on each trained beta-VAE (mu, sigma, center, r2, samples, seeds: the exact
Monte Carlo workload, attacked points included), then replays the recorded calls with ``torch``, ``cpp``
with an fp32 last layer (ROBBENCH_PRECISION=fp32), the same with the early exit (ROBBENCH_EARLY_EXIT=1),
the bf16 last layer without the refinement of undecided rows (ROBBENCH_BAND_REFINE=0, bounds.h part 4)
and ``cpp`` as shipped (bf16 last layer with the rigorous band where the CPU has native bf16),
interleaved, order rotated, measuring CPU seconds of this process (use ``--threads 1``). Counts of every
call are asserted equal to torch's, call by call; per variant it also reports the bf16-pass samples and
how many of them the band left to the fp32 recheck.

Run: ``ROBBENCH_CACHE=... python benchmarks/margin_calls.py [--repeats 2] [--threads 1] [--json out.json]``.
Prints per model the minimum over repetitions of each variant's total and the torch/variant ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from robbench import bench, kernels
from robbench.backends import TorchBackend
from robbench.execute import evaluate_batch
from robbench.paper import margin_bench
from robbench.plugins import get_registries

# (label, backend, environment)
VARIANTS = (("torch", "torch", {}), ("cpp fp32", "cpp", {"ROBBENCH_PRECISION": "fp32"}),
            ("cpp fp32 + early exit", "cpp", {"ROBBENCH_PRECISION": "fp32", "ROBBENCH_EARLY_EXIT": "1"}),
            ("cpp bf16, no refinement", "cpp", {"ROBBENCH_BAND_REFINE": "0"}), ("cpp", "cpp", {}))
ENV_KEYS = ("ROBBENCH_PRECISION", "ROBBENCH_EARLY_EXIT", "ROBBENCH_BAND_REFINE")


def record_calls() -> list[tuple[str, torch.nn.Module, list[dict[str, Any]]]]:
    """Run the margin job of the main command once per trained model (backend cpp) and keep every
    count_within call's arguments: [(model label, model, [call kwargs])]."""
    from robbench.runner import load_data, select_points

    regs = get_registries()
    cfg = margin_bench.margin_config(None)
    job = margin_bench.margin_job(cfg, regs)
    spec = dataclasses.replace(job, run=dataclasses.replace(job.run, backend="cpp"))
    data = load_data(cfg, regs)
    ids = [int(p) for p in select_points(data, cfg.points, cfg.points_seed())]  # as margin_rows picks them
    out: list[tuple[str, torch.nn.Module, list[dict[str, Any]]]] = []
    original = kernels.CppBackend.count_within

    def recording(self, model, mu, sigma, center, r2, n_samples, **kw):
        out[-1][2].append(dict(mu=mu.clone(), sigma=sigma.clone(), center=center.clone(), r2=r2.clone(),
                               n_samples=n_samples, **{k: v.clone() if torch.is_tensor(v) else v
                                                       for k, v in kw.items()}))
        return original(self, model, mu, sigma, center, r2, n_samples, **kw)

    kernels.CppBackend.count_within = recording
    try:
        for label, model in margin_bench.trained_models(cfg, regs, data):
            out.append((label, model, []))
            evaluate_batch(spec, model, data.test_x[ids], ids, registries=regs, raise_errors=True)
    finally:
        kernels.CppBackend.count_within = original
    return out


def replay(model: torch.nn.Module, calls: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """CPU seconds of the calls per variant (min over repetitions, all repetitions), counts asserted equal."""
    backends = {"torch": TorchBackend(), "cpp": kernels.CppBackend()}
    times: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
    band: dict[str, list[int]] = {}
    reference = None
    saved = {k: os.environ.pop(k) for k in ENV_KEYS if k in os.environ}
    try:
        for rep in range(repeats):
            for label, backend, env in VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]:
                os.environ.update(env)
                start = time.process_time()
                results = [backends[backend].count_within(model, **c) for c in calls]
                times[label].append(time.process_time() - start)
                for k in env:
                    os.environ.pop(k)
                counts = [r.counts for r in results]
                band[label] = [sum(r.bf16_samples for r in results), sum(r.rechecked for r in results)]
                if reference is None:
                    reference = (label, counts)
                assert all(torch.equal(a, b) for a, b in zip(counts, reference[1])), \
                    f"{label} counts differ from {reference[0]}'s"
    finally:
        os.environ.update(saved)
    best = {k: min(v) for k, v in times.items()}
    return {"calls": len(calls), "samples": sum(c["mu"].shape[0] * c["n_samples"] for c in calls),
            "cpu_s": times, "min_cpu_s": best, "bf16_samples_rechecked": band,
            "torch_over": {k: best["torch"] / v for k, v in best.items() if v > 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"environment": bench.environment(), "models": {}}
    for label, model, calls in record_calls():
        row = replay(model, calls, args.repeats)
        results["models"][label] = row
        print(f"{label}: {row['calls']} calls, {row['samples']:,} samples; min CPU s "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["min_cpu_s"].items()) + "; torch / variant "
              + ", ".join(f"{k} {v:.2f}x" for k, v in row["torch_over"].items()) + "; bf16 pass / rechecked "
              + ", ".join(f"{k} {v[0]:,}/{v[1]:,}" for k, v in row["bf16_samples_rechecked"].items() if v[0]),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
