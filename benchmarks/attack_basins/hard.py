"""Margins of chosen points of a margin_convergence point set under attack variants (one knob at a time).

    python hard.py --seed 2 --points 25 --pick 9,20 --variants '{"default": {}, "eta_x2": {"eta_samples": 8}}'
Variants: name -> attack param overrides (fp32 engine unless "_env" is given). Margin defaults of the estimator.
"""
from __future__ import annotations
import json, sys, time
import torch
sys.path.insert(0, "benchmarks")
from margin_convergence import environment, measure, trained_models, FP32
from basins import load_inputs, pick_points, run_parser

def main():
    ap = run_parser()
    ap.add_argument("--pick", default="9,20")
    ap.add_argument("--beta", default="10.0")
    ap.add_argument("--variants", required=True)
    ap.add_argument("--margin", default="{}", help="margin overrides")
    a = ap.parse_args()
    cfg, regs, data, x, ids, run = load_inputs(a)
    x, ids = pick_points(x, ids, a.pick)
    md = {**regs.estimators.get("margin").defaults, **json.loads(a.margin)}
    attack = regs.attacks.get("max_damage")
    for mc, model in trained_models(cfg, regs, data):
        if a.beta != "all" and a.beta not in mc.label:
            continue
        for name, ov in json.loads(a.variants).items():
            ov = dict(ov); env = ov.pop("_env", FP32); mo = ov.pop("_margin", {})
            import margin_convergence as mcv, functools
            from robbench.margin import estimate_margin
            mcv.estimate_margin = functools.partial(estimate_margin, warm_start=False) if ov.pop("_cold", False) else estimate_margin
            with environment(env):
                res = measure(model, x, ids, attack, {**attack.defaults, **ov}, {**md, **mo}, run)
            print(f"{mc.label} {name:14s} R " + " ".join(f"{m:.3f}" for m in res["margin"]) +
                  f"  attack {res['attack_cpu_s']:.2f} cpu-s rows {res['attack_rows']/1e6:.3f} M", flush=True)

if __name__ == "__main__":
    main()
