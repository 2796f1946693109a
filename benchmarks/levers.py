"""A/B of the cpp kernel's levers near the boundary, in one process, interleaved.

Workloads: the main command's trained beta-VAEs (25 test points, mu / sigma of the clean inputs, each
point's radius = the median of its sample distances, i.e. p_r ~ 0.5: where the margin's sequential tests
spend their samples) and the standard decoder workload (B = 64) at the median radius. Variants: ``torch``
(reference), ``cpp`` with the fused distance epilogue off (ROBBENCH_FUSED_EPILOGUE=0: the reference's
four-pass epilogue after the same GEMM) and on, both without the early exit (ROBBENCH_EARLY_EXIT=0), and
``cpp`` as shipped (fused epilogue + per-sample early exit of the last layer, adaptive). Counts of every
variant are asserted equal. (4x larger blocks were measured and dropped: benchmarks/README.md.)

Run: ``ROBBENCH_CACHE=... python benchmarks/levers.py [--samples 4096] [--repeats 5] [--json out.json]``.
Prints per workload the median and min-max of each variant's time and of the per-repetition ratios. Times
are CPU seconds of this process (``time.process_time``): with ``--threads 1`` that is the work done,
much less disturbed by other jobs on a shared machine than wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from robbench import bench, montecarlo
from robbench.paper import margin_bench
from robbench.plugins import get_registries

# (label, backend, ROBBENCH_FUSED_EPILOGUE, ROBBENCH_EARLY_EXIT)
VARIANTS = (("torch", "torch", "1", "1"), ("cpp, epilogue unfused", "cpp", "0", "0"),
            ("cpp, fused epilogue", "cpp", "1", "0"), ("cpp, fused + early exit", "cpp", "1", "1"))


def workloads(points: int) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, model, mu, sigma, center) for each trained beta-VAE of the main command and the standard MLP."""
    from robbench.runner import load_data, select_points

    regs = get_registries()
    cfg = margin_bench.margin_config(None)
    data = load_data(cfg, regs)
    ids = [int(p) for p in select_points(data, points, cfg.seed)]
    out = []
    with torch.no_grad():
        for label, model in margin_bench.trained_models(cfg, regs, data):
            mu, sigma = model.encode(data.test_x[ids])
            out.append((label, model, mu, sigma, model.decode(mu).flatten(1)))
        std = bench.StandardDecoderVAE()
        gen = torch.Generator().manual_seed(0)
        mu = torch.randn(64, 10, generator=gen)
        sigma = 0.3 + 0.5 * torch.rand(64, 10, generator=gen)
        out.append(("standard-mlp", std, mu, sigma, std.decode(mu).flatten(1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the levers compared here are the fp32 last layer's; bf16 is the cpp default where native
    os.environ["ROBBENCH_PRECISION"] = "fp32"
    results = {"environment": bench.environment(), "samples": args.samples, "workloads": {}}
    for name, model, mu, sigma, center in workloads(args.points):
        r = montecarlo.sample_distances(model, mu, sigma, center, 256, seed=99).median(1).values
        times: dict[str, list[float]] = {v[0]: [] for v in VARIANTS}
        counts = {}
        for label, backend, fused, early in VARIANTS:  # warm-up (extension load, cached bound constants)
            os.environ["ROBBENCH_FUSED_EPILOGUE"] = fused
            os.environ["ROBBENCH_EARLY_EXIT"] = early
            montecarlo.count_within(model, mu, sigma, center, r, 64, seed=1, backend=backend)
        for rep in range(args.repeats):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for label, backend, fused, early in order:
                os.environ["ROBBENCH_FUSED_EPILOGUE"] = fused
                os.environ["ROBBENCH_EARLY_EXIT"] = early
                t0 = time.process_time()  # CPU time of this (1-thread) process: less sensitive to load
                c = montecarlo.count_within(model, mu, sigma, center, r, args.samples, seed=7, backend=backend)
                times[label].append(time.process_time() - t0)
                counts.setdefault(label, c)
                assert torch.equal(c, counts["torch"] if "torch" in counts else c), f"{name}: {label} differs"
        os.environ.pop("ROBBENCH_FUSED_EPILOGUE", None)
        os.environ.pop("ROBBENCH_EARLY_EXIT", None)
        assert all(torch.equal(c, counts["torch"]) for c in counts.values()), f"{name}: counts differ"
        ref = times["torch"]
        row = {}
        for label, ts in times.items():
            ratios = [a / b for a, b in zip(ref, ts)]
            row[label] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                          "ratio_vs_torch_median": statistics.median(ratios), "ratio_min": min(ratios),
                          "ratio_max": max(ratios)}
        unf, fus = times["cpp, epilogue unfused"], times["cpp, fused epilogue"]
        lever = [a / b for a, b in zip(unf, fus)]
        row["fused_vs_unfused"] = {"median": statistics.median(lever), "min": min(lever), "max": max(lever)}
        ex = [a / b for a, b in zip(fus, times["cpp, fused + early exit"])]
        row["early_exit_vs_fused"] = {"median": statistics.median(ex), "min": min(ex), "max": max(ex)}
        results["workloads"][name] = row
        print(name, f"p~{(counts['torch'].double() / args.samples).mean():.2f}")
        for label, v in row.items():
            print("  ", label, {k: round(x, 3) for k, x in v.items()})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
