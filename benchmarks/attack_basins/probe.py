"""At a fixed radius (each point's default R), how good are different attacks? E (4096 draws, route both) and
p_r (sigma clean, 16384 samples) of the delta each returns. Also the default chain's final delta, re-attacked."""
from __future__ import annotations
import json, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, __import__("os").path.dirname(__file__))
from basins import picked_inputs, point_parser
from robbench.margin import estimate_probability
from robbench.protocols import call_attack
from robbench_plugins.attacks import expected_damage
from margin_convergence import environment, FP32

def main():
    a = point_parser().parse_args()
    pts = picked_inputs(a)
    x, ids, run, attack = pts.x, pts.ids, pts.run, pts.attack; D = attack.defaults
    g = torch.Generator().manual_seed(123)
    for mc, model in pts.models(a.beta):
        res, calls = pts.default_chain(model)
        R = torch.tensor(res["margin"], dtype=x.dtype)
        last = torch.zeros_like(x); lastr = torch.zeros(len(ids))
        for pids, rad, d, warm in calls:
            for i, pid in enumerate(pids.tolist()):
                j = ids.tolist().index(pid); last[j] = d[i]; lastr[j] = rad[i]
        from robbench.margin import fit_warm_start
        init = fit_warm_start(x, last, R)
        def score(delta):
            with torch.no_grad():
                e = expected_damage(model, x, delta, n_samples=4096, generator=g)
                p = estimate_probability(model, x, delta, r=run["r"], n_samples=16384, seed=7, stream_ids=ids).p
            return " ".join(f"E={float(e[b]):.4f} p={float(p[b]):.3f}" for b in range(len(ids)))
        print(f"R default {R.tolist()}  last attacked radius {lastr.tolist()}")
        print(f"  {'chain delta rescaled':34s} {score(init)}")
        tries = {"cold default": ({}, False), "cold restarts4": ({"restarts": 4}, False),
                 "cold restarts16": ({"restarts": 16}, False),
                 "cold eta_x10": ({"eta_samples": 40, "eval_samples": 80}, False),
                 "cold eval_x4": ({"eval_samples": 32}, False),
                 "warm default": ({}, True), "warm eta_x4 eval_x4": ({"eta_samples": 16, "eval_samples": 32}, True),
                 "warm eta_x10": ({"eta_samples": 40, "eval_samples": 80}, True),
                 "warm eta_x10 steps_x10": ({"eta_samples": 40, "eval_samples": 80, "warm_refine_steps": 400, "steps": 400,
                                             "min_step": 0.001}, True),
                 "warm eval_x10 restarts4": ({"eval_samples": 80, "restarts": 4}, True)}
        for seed in (1, 2):
            for name, (ov, warm) in tries.items():
                gen = torch.Generator().manual_seed(1000 + seed)
                with environment(FP32):
                    out = call_attack(attack, model, x, R, params={**D, **ov}, generator=gen,
                                      init=init if warm else None, point_ids=ids,
                                      init_radius=R if warm else None)
                print(f"  s{seed} {name:31s} {score(out.delta)}", flush=True)
main()
