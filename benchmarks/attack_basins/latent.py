"""Latent picture of the chains' deltas: mu(x+delta)-mu(x) (units of sigma(x)) for the default (fp32) and eta_x10
chains, and cosines between deltas."""
from __future__ import annotations
import sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, __import__("os").path.dirname(__file__))
from margin_convergence import environment, measure, trained_models, FP32
from basins import load_inputs, pick_points, run_parser
from trace_chain import Rec

ap = run_parser(); ap.add_argument("--pick", default="9,20")
a = ap.parse_args()
cfg, regs, data, x, ids, run = load_inputs(a)
x, ids = pick_points(x, ids, a.pick)
md = dict(regs.estimators.get("margin").defaults); attack = regs.attacks.get("max_damage"); D = attack.defaults
torch.set_printoptions(precision=2, sci_mode=False, linewidth=200)
for mc, model in trained_models(cfg, regs, data):
    if "10.0" not in mc.label: continue
    chains = {}
    for name, ov in {"fp32": {}, "eta_x10": {"eta_samples": 40, "eval_samples": 80}}.items():
        rec = Rec(attack)
        with environment(FP32):
            measure(model, x, ids, rec, {**D, **ov}, md, run)
        chains[name] = rec.calls
    mu0, s0 = model.encode(x)
    print("sigma(x):", s0.detach())
    for b, pid in enumerate(ids.tolist()):
        print(f"point {int(pick[b])}")
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
