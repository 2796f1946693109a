"""Decoder samples per point against accuracy, for designs of the margin estimator, on the main command's
models (or any run config): the same points, attack and seeds, so the designs differ only in where and
how many Monte Carlo samples they draw.

    python benchmarks/margin_samples.py --threads 1                 # the three beta-VAEs, 25 points
    python benchmarks/margin_samples.py --designs bisect,refine --json out.json

Designs (the margin estimator's defaults unless said otherwise):
  bisect     the earlier design: sequential tests up to samples_max (32768) at every bisection radius,
             stop at the first undecided one, straight-line crossing of the final bracket (refine 0)
  refine     the defaults: tests capped at samples_locate (2048) while bisecting, stop at the first
             undecided one, then `refine` (2) top-ups at the fitted crossing, probit-linear fit of the
             tests near it
  reference  refine with 5x finer target (rel_tolerance 0.002: standard error ~0.1% of R), 3 rounds
             of up to 2^17 samples, with another seed (independent attack draws and Monte Carlo
             streams): the yardstick the other designs' margins are compared with
Reported per model: samples per point (mean, median), attack encoder/decoder rows, RMS / max relative
difference of R from ``reference``, median interval width (hi - lo) / R, and how often [lo, hi]
contains the reference R.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch

from margin_convergence import Counting, Timed, margin_inputs, trained_models
from robbench import stats
from robbench.cli import _add_run_arguments, config_from_args
from robbench.margin import estimate_margin
from robbench.plugins import get_registries

DESIGNS: dict[str, dict[str, Any]] = {
    "bisect": {"refine": 0, "samples_locate": None, "stop_when_undecided": True},
    "refine": {},
    "reference": {"refine": 3, "rel_tolerance": 0.002, "samples_max": 2 ** 17, "samples_locate": 8192,
                  "stop_when_undecided": False},
}


def measure(model, x, ids, attack, attack_params, p, run) -> dict[str, Any]:
    timed, model = Timed(attack), Counting(model)
    warm = {} if p.get("warm_steps") is None else {"steps": int(p["warm_steps"])}
    warm["restarts"] = int(p["warm_restarts"])
    res = estimate_margin(model, x, timed, attack_params, r=run["r"], m=run["m"], confidence=run["confidence"],
                          max_radius=p["max_radius"], tolerance=p["tolerance"], rel_tolerance=p["rel_tolerance"],
                          samples_initial=p["samples_initial"], samples_max=p["samples_max"],
                          samples_growth=p["samples_growth"], samples_locate=p.get("samples_locate"),
                          refine=int(p.get("refine", 0)), seed=stats.derive_seed(run["seed"], "margin"),
                          point_ids=ids, backend=run["backend"], warm_attack_params=warm,
                          stop_when_undecided=p["stop_when_undecided"])
    nan = torch.full_like(res.margin, float("nan"))
    return {"margin": torch.where(res.at_cap, nan, res.margin).tolist(), "lo": res.lo.tolist(),
            "hi": res.hi.tolist(), "samples": res.samples.tolist(), "attack_rows": timed.rows,
            "attack_s": timed.seconds, "undecided": int(res.undecided.sum()),
            "tests_per_point": float(res.tests.double().mean())}


def summary(v: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float]:
    s = torch.tensor(v["samples"], dtype=torch.float64)
    out = {"samples_mean": float(s.mean()), "samples_median": float(s.median())}
    pts = [i for i, (m, r) in enumerate(zip(v["margin"], ref["margin"] if ref else v["margin"]))
           if m == m and r == r and r > 0]
    widths = sorted((v["hi"][i] - v["lo"][i]) / v["margin"][i] for i in pts)
    out["width_median_pct"] = 100 * widths[len(widths) // 2] if widths else float("nan")
    if ref is not None and pts:
        d = [v["margin"][i] / ref["margin"][i] - 1.0 for i in pts]
        out["rms_diff_pct"] = 100 * math.sqrt(sum(e * e for e in d) / len(d))
        out["max_abs_diff_pct"] = 100 * max(abs(e) for e in d)
        out["mean_diff_pct"] = 100 * sum(d) / len(d)
        out["ref_in_interval"] = sum(v["lo"][i] <= ref["margin"][i] <= v["hi"][i] for i in pts) / len(pts)
    out["points"] = len(pts)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_run_arguments(parser)
    parser.add_argument("--designs", default="bisect,refine,reference")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)  # --threads comes with the run arguments
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = margin_inputs(cfg, regs)
    defaults = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage")
    names = args.designs.split(",")
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__, "points": cfg.points,
                           "designs": {n: DESIGNS[n] for n in names}, "models": []}
    for mc, model in trained_models(cfg, regs, data):
        rec: dict[str, Any] = {"model": mc.label, "seed": mc.seed}
        for name in names:  # the reference draws its own attack and Monte Carlo streams (another seed)
            seed = stats.derive_seed(cfg.seed, "reference") if name == "reference" else cfg.seed
            rec[name] = measure(model, x, ids, attack, dict(attack.defaults), {**defaults, **DESIGNS[name]},
                                {**run, "seed": seed})
        ref = rec.get("reference")
        print(f"{mc.label} seed {mc.seed}")
        for name in names:
            rec[name]["summary"] = sm = summary(rec[name], ref if name != "reference" else None)
            line = (f"  {name:9s} samples/point {sm['samples_mean']:8.0f} (median {sm['samples_median']:7.0f})  "
                    f"tests/point {rec[name]['tests_per_point']:4.1f}  attack rows {rec[name]['attack_rows'] / 1e6:6.2f} M  width median {sm['width_median_pct']:6.2f}%")
            if "rms_diff_pct" in sm:
                line += (f"  vs reference: rms {sm['rms_diff_pct']:.2f}%  max {sm['max_abs_diff_pct']:.2f}%  "
                         f"mean {sm['mean_diff_pct']:+.2f}%  ref in [lo, hi] {sm['ref_in_interval']:.2f}")
            print(line, flush=True)
        out["models"].append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
