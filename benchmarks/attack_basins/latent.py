"""Latent picture of the chains' deltas: mu(x+delta)-mu(x) (units of sigma(x)) for the default (fp32) and eta_x10
chains, and cosines between deltas."""
from __future__ import annotations
import sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, __import__("os").path.dirname(__file__))
from basins import picked_inputs, point_parser

a = point_parser().parse_args()
pts = picked_inputs(a)
x, ids = pts.x, pts.ids
torch.set_printoptions(precision=2, sci_mode=False, linewidth=200)
for mc, model in pts.models(a.beta):
    chains = {name: pts.default_chain(model, ov)[1]
              for name, ov in {"fp32": {}, "eta_x10": {"eta_samples": 40, "eval_samples": 80}}.items()}
    mu0, s0 = model.encode(x)
    print("sigma(x):", s0.detach())
    for b, pid in enumerate(ids.tolist()):
        print(f"point {int(pts.positions[b])}")
        ds = {}
        for name, calls in chains.items():
            for pids, rad, d, warm in calls:
                sel = (pids == pid).nonzero().squeeze(1)
                if sel.numel() == 0: continue
                i = int(sel[0]); r = float(rad[i])
                mu1, s1 = model.encode(x[b:b+1] + d[i:i+1])
                ds[(name, round(r, 3))] = d[i].flatten()
                print(f"  {name:8s} rho {r:.3f} dmu/sig {((mu1 - mu0[b:b+1]) / s0[b:b+1]).detach()[0]}  |dmu/sig| {float(((mu1 - mu0[b:b+1]) / s0[b:b+1]).norm()):.2f}"
                      f" sig ratio {float((s1/s0[b:b+1]).mean()):.2f}")
        keys = list(ds)
        for k1 in keys:
            print(f"  cos {k1}: " + " ".join(f"{float(torch.nn.functional.cosine_similarity(ds[k1], ds[k2], 0)):.2f}" for k2 in keys))
