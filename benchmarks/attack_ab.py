"""Interleaved A/B of max_damage settings in the margin estimator: each candidate against a reference,
on the same points and Monte Carlo streams, in one process (load hits all alike).

    python benchmarks/attack_ab.py --models beta_vae --ref '{}' \
        --cands '{"two_eta": {"eta_samples": 2}, "screen": {"_margin": {"screen_samples": 128}}}'

A candidate is a JSON object of attack parameters; its "_margin" key holds margin-estimator overrides.
Prints per model and candidate: mean R, attack wall / CPU seconds, encoder/decoder rows, Monte Carlo
seconds, samples per point, and against the reference the change of mean R, the mean |change| per point
and the worst point's |change|. Runs at 1 thread (steadiest on a shared machine).
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
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = mcv.margin_inputs(cfg, regs)
    margin_defaults = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage")
    cands = {"ref": json.loads(args.ref), **json.loads(args.cands)}
    for mc, model in mcv.trained_models(cfg, regs, data):
        res = {}
        for name, cand in cands.items():
            cand = dict(cand)
            margin_over = cand.pop("_margin", {})
            r = res[name] = mcv.measure(model, x, ids, attack, {**attack.defaults, **cand},
                                        {**margin_defaults, **margin_over}, run)
            finite = [v for v in r["margin"] if v == v]
            line = (f"{mc.label:20s} {name:12s} R {sum(finite) / max(len(finite), 1):.4f} attack {r['attack_s']:.2f}s "
                    f"cpu {r['attack_cpu_s']:.2f}s rows {r['attack_rows'] / 1e3:.1f}k MC {r['mc_s']:.1f}s "
                    f"samples/point {r['samples_per_point']:.0f}")
            if name != "ref":
                cmp = mcv.compare(res["ref"]["margin"], r["margin"])
                worst = max(abs(o / b - 1) for b, o in zip(res["ref"]["margin"], r["margin"]) if b == b and o == o)
                line += (f"  dR {100 * cmp['mean_change']:+.2f}% |dR| {100 * cmp['mean_abs_change']:.2f}%"
                         f"  max {100 * worst:.2f}%")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
