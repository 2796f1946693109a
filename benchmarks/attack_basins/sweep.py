"""Fixed-direction sweep of the saved verification deltas: p_r along delta_v / ||delta_v|| at R * f, 8192 samples."""
import sys, torch
sys.path.insert(0, "benchmarks")
from margin_convergence import trained_models
from basins import load_inputs, run_parser
from robbench.margin import estimate_probability, fit_warm_start
ap = run_parser(); ap.add_argument("--save"); ap.add_argument("--beta"); ap.add_argument("--pick")
ap.add_argument("--factors", default="0.90,0.94,0.96,0.98,1.0")
a = ap.parse_args(); FACTORS = [float(v) for v in a.factors.split(",")]
cfg, regs, data, x, ids, run = load_inputs(a)
for mc, model in trained_models(cfg, regs, data):
    if a.beta not in mc.label: continue
    s = torch.load(f"{a.save}_{mc.label}.pt")
    for j in [int(v) for v in a.pick.split(",")]:
        i = int((s["sel"] == j).nonzero()[0, 0]); R = float(s["R"][j]); d = s["cands"][int(s["which"][i])][i:i+1]; xi = x[j:j+1]
        row = []
        for f in FACTORS:
            dd = fit_warm_start(xi, d, torch.tensor([R * f], dtype=x.dtype))
            p = float(estimate_probability(model, xi, dd, r=run["r"], n_samples=8192, seed=11, stream_ids=ids[j:j+1]).p)
            row.append(f"{f:.2f}R={R*f:.3f}: p {p:.3f} (|d| {float(dd.norm()):.3f})")
        print(f"{mc.label} point {j} R {R:.3f}: " + "  ".join(row))
