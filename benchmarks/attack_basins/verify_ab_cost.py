"""Session 7's verification against session 8's (the default) on the main command's trained beta-VAEs, interleaved
in one process (per model: s7, s8, s8, s7), 25 margin_convergence points per model and seed, 1 thread: process
CPU seconds of the whole estimate (bisection + verification), decoder samples, flagged / lowered points.

    python benchmarks/attack_basins/verify_ab_cost.py SEED [SEED ...]

Session 7's verification is set through robbench.margin's constants (first re-bisection test at 0.98 R, capped
at samples_locate like the later ones, an even alpha split over the 15 tests, flag level m - 0.03), as in
benchmarks/verify_ablation.py.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from basins import load_inputs, run_parser  # noqa: E402
from margin_convergence import trained_models  # noqa: E402  (basins puts benchmarks/ on the path)
from robbench import margin as M  # noqa: E402
from robbench import stats  # noqa: E402

S8 = dict(VERIFY_TOP=M.VERIFY_TOP, VERIFY_FIRST_SHARE=M.VERIFY_FIRST_SHARE, VERIFY_GAP=M.VERIFY_GAP)
S7 = dict(VERIFY_TOP=0.98, VERIFY_FIRST_SHARE=1 / 15, VERIFY_GAP=0.03)
SCHEDULE = stats.sample_schedule


def use(variant: str) -> None:
    for key, value in (S7 if variant == "s7" else S8).items():
        setattr(M, key, value)
    stats.sample_schedule = (lambda a, b, g=4: SCHEDULE(a, min(b, 2048), g)) if variant == "s7" else SCHEDULE


def main() -> None:
    cpu_total = {"s7": 0.0, "s8": 0.0}
    samples_total = {"s7": 0, "s8": 0}
    for seed in sys.argv[1:]:
        args = run_parser().parse_args(["--models", "beta_vae", "--seed", seed, "--points", "25", "--threads", "1"])
        cfg, regs, data, x, ids, run = load_inputs(args)
        md = regs.estimators.get("margin").defaults
        attack = regs.attacks.get("max_damage")
        for mc, model in trained_models(cfg, regs, data):
            rec: dict[str, list] = {"s7": [], "s8": []}
            for variant in ("s7", "s8", "s8", "s7"):
                use(variant)
                t0 = time.process_time()
                res = M.estimate_margin(
                    model, x, attack, dict(attack.defaults), r=run["r"], m=run["m"], confidence=run["confidence"],
                    max_radius=md["max_radius"], tolerance=md["tolerance"], rel_tolerance=md["rel_tolerance"],
                    samples_initial=md["samples_initial"], samples_max=md["samples_max"],
                    samples_growth=md["samples_growth"], seed=stats.derive_seed(run["seed"], "margin"), point_ids=ids,
                    backend=run["backend"], warm_attack_params={"restarts": int(md["warm_restarts"])},
                    stop_when_undecided=md["stop_when_undecided"], samples_locate=md["samples_locate"],
                    refine=int(md["refine"]), verify=True)
                rec[variant].append((time.process_time() - t0, int(res.samples.sum()),
                                     int(res.verify_flagged.sum()), int(res.verified_lower.sum())))
            cpu = {v: sum(r[0] for r in rec[v]) / 2 for v in rec}
            n = {v: rec[v][0][1] for v in rec}
            for v in rec:
                cpu_total[v] += cpu[v]
                samples_total[v] += n[v]
            print(f"seed {seed} {mc.label}: cpu s7 {cpu['s7']:.3f} s8 {cpu['s8']:.3f} "
                  f"({100 * (cpu['s8'] / cpu['s7'] - 1):+.1f} %); "
                  f"samples s7 {n['s7']} s8 {n['s8']} ({100 * (n['s8'] / n['s7'] - 1):+.1f} %); flagged/lowered "
                  f"s7 {rec['s7'][0][2]}/{rec['s7'][0][3]} s8 {rec['s8'][0][2]}/{rec['s8'][0][3]}", flush=True)
    print(f"total: cpu s7 {cpu_total['s7']:.2f} s8 {cpu_total['s8']:.2f} "
          f"({100 * (cpu_total['s8'] / cpu_total['s7'] - 1):+.1f} %); samples s7 {samples_total['s7']} s8 "
          f"{samples_total['s8']} ({100 * (samples_total['s8'] / samples_total['s7'] - 1):+.1f} %)")


if __name__ == "__main__":
    main()
