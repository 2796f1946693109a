"""Trace the bisection of chosen points: per attacked radius, the attack's delta scored precisely
(E_eta distance along route both with 4096 draws; p_r at sigma(x) clean with 16384 samples), per variant."""
from __future__ import annotations
import json, sys
import torch
sys.path.insert(0, "benchmarks")
from basins import picked_inputs, point_parser
from margin_convergence import FP32
from robbench.margin import estimate_probability
from robbench_plugins.attacks import expected_damage

def main():
    ap = point_parser()
    ap.add_argument("--variants", required=True)
    a = ap.parse_args()
    pts = picked_inputs(a)
    x, ids, run = pts.x, pts.ids, pts.run
    g = torch.Generator().manual_seed(123)
    for mc, model in pts.models(a.beta):
        for name, ov in json.loads(a.variants).items():
            ov = dict(ov); env = ov.pop("_env", FP32)
            res, calls = pts.default_chain(model, ov, env)
            print(f"== {name}: R " + " ".join(f"{m:.3f}" for m in res["margin"]))
            for j, pid in enumerate(ids.tolist()):
                rows = []
                for pids, rad, d, warm in calls:
                    sel = (pids == pid).nonzero().squeeze(1)
                    if sel.numel() == 0: continue
                    i = int(sel[0]); xi = x[j:j+1]; di = d[i:i+1]
                    with torch.no_grad():
                        ed = float(expected_damage(model, xi, di, n_samples=4096, generator=g))
                        em = float(expected_damage(model, xi, di, route="mu", n_samples=4096, generator=g))
                        pr = estimate_probability(model, xi, di, r=run["r"], n_samples=16384, seed=7,
                                                  stream_ids=torch.tensor([pid])).p
                    rows.append(f"{float(rad[i]):.3f}{'w' if warm else 'c'} E={ed:.3f} Emu={em:.3f} p={float(pr):.3f}")
                print(f"  point {pts.positions[j].item()} (id {pid}): " + " | ".join(rows))
if __name__ == "__main__":
    main()
