"""Distribution over attack seeds of E / p_r of the delta found at a fixed radius, cold or warm from the default
chain's delta at --from-radius (the default chain's attacked delta there), per attack setting."""
from __future__ import annotations
import json, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, __import__("os").path.dirname(__file__))
from basins import picked_inputs, point_parser
from robbench.margin import estimate_probability, fit_warm_start
from robbench.protocols import call_attack
from robbench_plugins.attacks import expected_damage
from margin_convergence import environment, FP32

def main():
    ap = point_parser()
    ap.add_argument("--radius", type=float, default=3.75); ap.add_argument("--from-radius", type=float, default=2.5)
    ap.add_argument("--seeds", type=int, default=8); ap.add_argument("--tries", required=True)
    a = ap.parse_args()
    pts = picked_inputs(a)
    x, ids, run, attack = pts.x, pts.ids, pts.run, pts.attack; D = attack.defaults
    g = torch.Generator().manual_seed(123)
    for mc, model in pts.models(a.beta):
        _, calls = pts.default_chain(model)
        src = torch.zeros_like(x)
        for pids, rad, d, warm in calls:
            for i, pid in enumerate(pids.tolist()):
                if abs(float(rad[i]) - a.from_radius) < 1e-6:
                    src[ids.tolist().index(pid)] = d[i]
        R = torch.full((len(ids),), a.radius, dtype=x.dtype)
        init = fit_warm_start(x, src, R)
        fr = torch.full_like(R, a.from_radius)
        for name, ov in json.loads(a.tries).items():
            ov = dict(ov); warm = ov.pop("_warm", False)
            Es, Ps = [], []
            for s in range(a.seeds):
                gen = torch.Generator().manual_seed(1000 + s)
                with environment(FP32):
                    out = call_attack(attack, model, x, R, params={**D, **ov}, generator=gen,
                                      init=init if warm else None, point_ids=ids, init_radius=fr if warm else None)
                with torch.no_grad():
                    Es.append(expected_damage(model, x, out.delta, n_samples=2048, generator=g))
                    Ps.append(estimate_probability(model, x, out.delta, r=run["r"], n_samples=8192, seed=7,
                                                   stream_ids=ids).p)
            E, P = torch.stack(Es), torch.stack(Ps)
            for b in range(len(ids)):
                print(f"  {name:24s} point {int(pts.positions[b])}: E " + " ".join(f"{v:.2f}" for v in E[:, b].tolist())
                      + "  p " + " ".join(f"{v:.2f}" for v in P[:, b].tolist()), flush=True)
main()
