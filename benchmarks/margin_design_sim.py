"""The margin estimator's statistical design alone, on exact p_r(rho) curves: no model, no attack.

The test at radius rho draws Binomial(n, p(rho)) counts where p(rho) is the exact worst-case p_r of a
linear-Gaussian VAE (robbench_plugins.analytic: a noncentral chi-square cdf), with the same sequential
schedule, error budget and decision rule as :func:`robbench.margin.estimate_margin`, and runs
:func:`robbench.margin.bisect_margin` on it. So thousands of independent streams cost seconds, and the
design (bisection, refinement, point estimate, interval) is checked in isolation: error of ``margin``
against the exact R, coverage of [margin_lo, margin_hi], samples per point, interval width.

    python benchmarks/margin_design_sim.py [--streams 2000] [--seed 0] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from scipy import stats as sps

from robbench import stats
from robbench.margin import SequentialOutcome, bisect_margin, n_margin_tests

# name: (latent dim k, p_r(x, 0)): p_r(rho) = P(ncx2_k(lambda = rho^2) <= t) with t the chi2_k quantile of
# p_r(x, 0) (sigma_max = s = w = 1). 0.8: as in the known-answer tests; 0.55: p0 near m (small, shallow
# margin); 0.99: a steep curve far from m.
CURVES = {"p0=0.80,k=32": (32, 0.80), "p0=0.55,k=32": (32, 0.55), "p0=0.99,k=8": (8, 0.99),
          "p0=0.80,k=4": (4, 0.80)}


def curve(k: int, p0: float, m: float = 0.5):
    """(p(rho) vectorised, exact R) for a latent dim k and p_r(x, 0) = p0 (sigma_max / s = 1, w s = 1)."""
    t = float(sps.chi2.ppf(p0, k))

    def p(rho: np.ndarray) -> np.ndarray:
        lam = np.asarray(rho, dtype=np.float64) ** 2
        return np.where(lam == 0, sps.chi2.cdf(t, k), sps.ncx2.cdf(t, k, np.maximum(lam, 1e-300)))

    from scipy import optimize
    R = float(optimize.brentq(lambda x: float(p(np.array([x]))[0]) - m, 0.0, 100.0, xtol=1e-13)) if p0 > m else 0.0
    return p, R


def run(p, *, stop_when_undecided: bool, streams: int, m: float, confidence: float, max_radius: float, tolerance: float,
        rel_tolerance: float | None, samples_initial: int, samples_locate: int, samples_max: int,
        growth: int, refine: int, seed: int):
    schedule = stats.sample_schedule(samples_initial, min(samples_locate, samples_max), growth)
    alpha_test = stats.split_alpha(1.0 - confidence, n_margin_tests(max_radius, tolerance, refine))
    alpha_look = stats.split_alpha(alpha_test, len(schedule))
    rng = np.random.default_rng(seed)

    def test(radius, idx, step, n=None):
        prob = p(radius.numpy())
        sizes = schedule if n is None else [n]
        b = radius.shape[0]
        k = np.zeros(b, dtype=np.int64)
        used = np.zeros(b, dtype=np.int64)
        dec = np.zeros(b, dtype=np.int64)
        todo = np.arange(b)
        for size in sizes:
            if todo.size == 0:
                break
            k[todo] += rng.binomial(size - used[todo], prob[todo])
            used[todo] = size
            dec[todo] = stats.decide(torch.from_numpy(k[todo]), torch.from_numpy(used[todo]), m, alpha_look).numpy()
            todo = todo[dec[todo] == stats.UNDECIDED]
        return SequentialOutcome(torch.from_numpy(dec), torch.from_numpy(k), torch.from_numpy(used))

    return bisect_margin(test, streams, m=m, max_radius=max_radius, tolerance=tolerance, rel_tolerance=rel_tolerance,
                         stop_when_undecided=stop_when_undecided, refine=refine, samples_min=samples_initial,
                         samples_max=samples_max)


def summarize(res, R: float) -> dict:
    err = (res.margin / R - 1.0).numpy()
    cover = ((res.lo <= R) & (res.hi >= R)).double().mean().item()
    width = ((res.hi - res.lo) / R).numpy()
    return {"rms_err_pct": 100 * float(np.sqrt((err ** 2).mean())), "mean_err_pct": 100 * float(err.mean()),
            "max_abs_err_pct": 100 * float(np.abs(err).max()), "within_1pct": float((np.abs(err) <= 0.01).mean()),
            "coverage": cover, "width_median_pct": 100 * float(np.median(width)),
            "tests_mean": float(res.tests.double().mean()) if res.tests is not None else float("nan"),
            "samples_mean": float(res.samples.double().mean()), "samples_median": float(res.samples.double().median())}


DESIGNS = {  # name: overrides of the defaults below
    "old (refine 0, cap 32768)": dict(refine=0, samples_locate=32768, stop_when_undecided=True),
    "new (refine 2, locate 2048)": dict(refine=2, samples_locate=2048, stop_when_undecided=True),
    "refine 2, locate 2048, follow p_hat": dict(refine=2, samples_locate=2048, stop_when_undecided=False),
    "refine 1": dict(refine=1, samples_locate=2048, stop_when_undecided=True),
    "refine 3": dict(refine=3, samples_locate=2048, stop_when_undecided=True),
    "old, cap 8192": dict(refine=0, samples_locate=8192, samples_max=8192, stop_when_undecided=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = dict(m=0.5, confidence=0.95, max_radius=10.0, tolerance=0.001, rel_tolerance=0.01,
                samples_initial=128, samples_max=32768, growth=4)
    out = []
    for cname, (k, p0) in CURVES.items():
        p, R = curve(k, p0)
        for dname, over in DESIGNS.items():
            res = run(p, streams=args.streams, seed=args.seed, **{**base, **over})
            row = {"curve": cname, "R": R, "design": dname, **summarize(res, R)}
            out.append(row)
            print(f"{cname:14s} R={R:.4f} {dname:28s} rms {row['rms_err_pct']:.2f}% mean {row['mean_err_pct']:+.2f}% "
                  f"max {row['max_abs_err_pct']:.2f}% cover {row['coverage']:.3f} width {row['width_median_pct']:.1f}% "
                  f"samples {row['samples_mean']:.0f} (median {row['samples_median']:.0f}) tests {row['tests_mean']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"streams": args.streams, "settings": base, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
