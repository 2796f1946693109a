"""Margins of chosen points of a margin_convergence point set under attack variants (one knob at a time).

    python hard.py --seed 2 --points 25 --pick 9,20 --variants '{"default": {}, "eta_x2": {"eta_samples": 8}}'
Variants: name -> attack param overrides (fp32 engine unless "_env" is given). Margin defaults of the estimator.
"""
from __future__ import annotations
import json, sys, time
import torch
sys.path.insert(0, "benchmarks")
from margin_convergence import environment, measure, FP32
from basins import picked_inputs, point_parser

def main():
    ap = point_parser()
    ap.add_argument("--variants", required=True)
    ap.add_argument("--margin", default="{}", help="margin overrides")
    a = ap.parse_args()
    pts = picked_inputs(a)
    x, ids, run, attack = pts.x, pts.ids, pts.run, pts.attack
    md = {**pts.margin_params, **json.loads(a.margin)}
    for mc, model in pts.models(a.beta):
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
