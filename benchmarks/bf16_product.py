"""GFLOP/s of the bf16 last layer's product: oneDNN's brgemm ukernel with fp32 output (``Bf16Product``,
``csrc/common/bf16_product.h``) vs ``at::mm_out`` with bf16 output (what the cpp backend's band ran before),
at the Monte Carlo chunk shapes (n rows x K = 256 -> P = 784), as a fraction of the measured 2048^3 bf16
``torch.mm`` peak (:func:`robbench.bench.measure_peak`, at the same thread count).

Both products are timed inside C++ (``robbench::bf16_product_timing``: alternating rounds of ``--calls``
products each, no Python per call); each repeat gives one figure per variant, the table shows the median
and the range over ``--repeats``. Use ``--threads 1`` on a shared machine.

Run: ``ROBBENCH_CACHE=... python benchmarks/bf16_product.py [--threads 1] [--repeats 7] [--calls 50]``.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from robbench import bench, kernels

ROWS = (64, 128, 256, 512)
K, P = 256, 784


def measure(n: int, repeats: int, calls: int, seed: int = 0) -> dict[str, list[float]]:
    """GFLOP/s per repeat of both products of an (n, K) ReLU-like bf16 ĥ and a (K, P) bf16 Ŵ^T."""
    g = torch.Generator().manual_seed(seed)
    hb = torch.randn(n, K, generator=g).relu().bfloat16()
    wt = (torch.randn(K, P, generator=g) * 0.05).bfloat16()
    flop = 2.0 * n * K * P
    out: dict[str, list[float]] = {"brgemm": [], "mm": []}
    for _ in range(repeats):
        us_brgemm, us_mm = torch.ops.robbench.bf16_product_timing(hb, wt, calls)
        out["brgemm"].append(flop / us_brgemm / 1e3)
        out["mm"].append(flop / us_mm / 1e3)
    return out


def render(rows: dict[int, dict[str, list[float]]], peak: float) -> str:
    """Markdown table: per row count, median [min-max] GFLOP/s of each product, ratio, % of the bf16 peak."""
    lines = ["| rows | brgemm, fp32 out (GFLOP/s) | at::mm, bf16 out (GFLOP/s) | ratio | brgemm % of peak |",
             "|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        b, m = statistics.median(r["brgemm"]), statistics.median(r["mm"])
        lines.append(f"| {n} | {b:.0f} [{min(r['brgemm']):.0f}-{max(r['brgemm']):.0f}] | "
                     f"{m:.0f} [{min(r['mm']):.0f}-{max(r['mm']):.0f}] | {b / m:.2f}x | {100 * b / peak:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="products per timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit(f"extension failed to build: {kernels.build_error()}")
    peak = bench.measure_peak(torch.bfloat16)
    rows = {n: measure(n, args.repeats, args.calls) for n in ROWS}
    peak_after = bench.measure_peak(torch.bfloat16)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}, "
          f"bf16 peak (2048^3 torch.mm) {peak:.0f} GFLOP/s before, {peak_after:.0f} after")
    print(render(rows, max(peak, peak_after)))


if __name__ == "__main__":
    main()
