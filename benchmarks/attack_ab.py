"""Interleaved A/B of max_damage settings in the margin estimator: each candidate against a reference,
on the same points and Monte Carlo streams, in one process (load hits all alike).

    python benchmarks/attack_ab.py --models beta_vae --ref '{}' \
        --cands '{"two_eta": {"eta_samples": 2}, "screen": {"_margin": {"screen_samples": 128}}}'

A candidate is a JSON object of attack parameters; its "_margin" key holds margin-estimator overrides, its
"_env" key environment variables set while it runs (the compiled engine's A/B switches, e.g.
'{"no_small": {"_env": {"ROBBENCH_ATTACK_SMALL": "off"}}}'; they are read at each op call).
With --repeat n every candidate runs n times, interleaved, and keeps its fastest times (margins do not change).
Prints per model and candidate: mean R, attack wall / CPU seconds, encoder/decoder rows, Monte Carlo
seconds, samples per point, and against the reference the change of mean R, the mean |change| per point
and the worst point's |change|. Runs at --threads (default 1, the steadiest on a shared machine); at more
threads the CPU seconds sum the threads, so read the wall seconds beside them.
"""
import argparse
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import margin_convergence as mcv  # noqa: E402
from robbench.cli import _add_run_arguments, config_from_args
from robbench.plugins import get_registries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_run_arguments(parser)
    parser.add_argument("--cands", required=True, help="JSON object: name -> attack overrides (+ \"_margin\")")
    parser.add_argument("--ref", default="{}", help="the reference's overrides (JSON; default: the defaults)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per candidate, interleaved; fastest kept")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = mcv.margin_inputs(cfg, regs)
    margin_defaults = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage")
    cands = {"ref": json.loads(args.ref), **json.loads(args.cands)}
    for mc, model in mcv.trained_models(cfg, regs, data):
        res: dict[str, dict] = {}
        for _ in range(max(args.repeat, 1)):
            for name, cand in cands.items():  # interleaved, so a change of load hits every candidate alike
                cand = dict(cand)
                margin_over = cand.pop("_margin", {})
                with mcv.environment(cand.pop("_env", {})):
                    r = mcv.measure(model, x, ids, attack, {**attack.defaults, **cand},
                                    {**margin_defaults, **margin_over}, run)
                if name in res:
                    for key in ("attack_s", "attack_cpu_s", "mc_s"):
                        r[key] = min(r[key], res[name][key])
                res[name] = r
        for name, r in res.items():
            finite = [v for v in r["margin"] if v == v]
            line = (f"{mc.label:20s} {name:12s} R {sum(finite) / max(len(finite), 1):.4f} attack {r['attack_s']:.2f}s "
                    f"cpu {r['attack_cpu_s']:.2f}s rows {r['attack_rows'] / 1e3:.1f}k MC {r['mc_s']:.2f}s "
                    f"whole {r['attack_s'] + r['mc_s']:.2f}s "
                    f"samples/point {r['samples_per_point']:.0f}")
            if name != "ref":
                cmp = mcv.compare(res["ref"]["margin"], r["margin"])
                worst = max(abs(o / b - 1) for b, o in zip(res["ref"]["margin"], r["margin"]) if b == b and o == o)
                line += (f"  dR {100 * cmp['mean_change']:+.2f}% |dR| {100 * cmp['mean_abs_change']:.2f}%"
                         f"  max {100 * worst:.2f}%  cpu x{r['attack_cpu_s'] / res['ref']['attack_cpu_s']:.2f}"
                         f"  wall x{r['attack_s'] / res['ref']['attack_s']:.2f}")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
