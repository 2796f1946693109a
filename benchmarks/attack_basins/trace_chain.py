"""Trace the bisection of chosen points: per attacked radius, the attack's delta scored precisely
(E_eta distance along route both with 4096 draws; p_r at sigma(x) clean with 16384 samples), per variant."""
from __future__ import annotations
import json, sys
import torch
sys.path.insert(0, "benchmarks")
from margin_convergence import environment, measure, trained_models, FP32
from basins import load_inputs, pick_points, run_parser
from robbench.margin import estimate_probability
from robbench_plugins.attacks import expected_damage

class Rec:
    def __init__(self, attack):
        self.attack, self.calls = attack, []
        self.name, self.description, self.defaults = attack.name, attack.description, attack.defaults
    def __call__(self, model, x, radius, **kw):
        from robbench.protocols import call_attack
        res = call_attack(self.attack, model, x, radius, **kw)
        self.calls.append((kw.get("point_ids").clone(), radius.clone(), res.delta.clone(), kw.get("init") is not None))
        return res

def main():
    ap = run_parser()
    ap.add_argument("--pick", default="9,20"); ap.add_argument("--beta", default="10.0")
    ap.add_argument("--variants", required=True)
    a = ap.parse_args()
    cfg, regs, data, x, ids, run = load_inputs(a)
    x, ids = pick_points(x, ids, a.pick)
    md = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage")
    g = torch.Generator().manual_seed(123)
    for mc, model in trained_models(cfg, regs, data):
        if a.beta not in mc.label: continue
        for name, ov in json.loads(a.variants).items():
            ov = dict(ov); env = ov.pop("_env", FP32)
            rec = Rec(attack)
            with environment(env):
                res = measure(model, x, ids, rec, {**attack.defaults, **ov}, md, run)
            print(f"== {name}: R " + " ".join(f"{m:.3f}" for m in res["margin"]))
            for j, pid in enumerate(ids.tolist()):
                rows = []
                for pids, rad, d, warm in rec.calls:
                    sel = (pids == pid).nonzero().squeeze(1)
                    if sel.numel() == 0: continue
                    i = int(sel[0]); xi = x[j:j+1]; di = d[i:i+1]
                    with torch.no_grad():
                        ed = float(expected_damage(model, xi, di, n_samples=4096, generator=g))
                        em = float(expected_damage(model, xi, di, route="mu", n_samples=4096, generator=g))
                        pr = estimate_probability(model, xi, di, r=run["r"], n_samples=16384, seed=7,
                                                  stream_ids=torch.tensor([pid])).p
                    rows.append(f"{float(rad[i]):.3f}{'w' if warm else 'c'} E={ed:.3f} Emu={em:.3f} p={float(pr):.3f}")
                print(f"  point {pick[j].item()} (id {pid}): " + " | ".join(rows))
if __name__ == "__main__":
    main()
