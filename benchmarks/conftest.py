"""Benchmarks are run explicitly: ``python -m pytest benchmarks/ --benchmark-only``.
ROBBENCH_BENCH_QUICK=1 shrinks every workload (smoke run, e.g. in CI)."""
import os

QUICK = os.environ.get("ROBBENCH_BENCH_QUICK") == "1"
