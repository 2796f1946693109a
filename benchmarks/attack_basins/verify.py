"""Prototype (script only, library unchanged): a verification attack at the final radius.

1. default margin estimation (the estimator's defaults, default attack engine) -> R per point;
2. at 0.98 R (uncensored points): cold default attack, cold attack WITHOUT the mean-decoder pre-solve,
   and that one found at 1.25 R rescaled down and refined (presolve_steps=0: random starts refined on the expectation);
3. p_hat of each candidate from --n samples (sigma clean, fresh streams); flag when the smallest <= m - --gap;
4. flagged points: two more margin estimations with warm_restarts=1 (default attack; no pre-solve attack); R = min of the three.
CPU seconds of each part (1 thread). Prints R before/after per flagged point."""
from __future__ import annotations
import json, sys, time
import torch
sys.path.insert(0, "benchmarks")
from margin_convergence import environment, measure, trained_models, FP32
from basins import load_inputs, run_parser
from robbench.margin import estimate_probability, fit_warm_start
from robbench_plugins.attacks import expected_damage
from robbench.protocols import call_attack
from robbench import stats

ALT = {"presolve_steps": 0, "warm_presolve_steps": 0}


class FixedDirection:
    """An 'attack' returning a fixed direction per point id, scaled to the radius (box-limited): the margin
    estimator's bisection then runs along it (paper Fig. 5), Monte Carlo only."""
    name, description = "fixed_direction", "fixed direction per point"

    def __init__(self, ids, dirs):
        self.dirs = {int(i): d for i, d in zip(ids.tolist(), dirs)}
        self.defaults = {}

    def __call__(self, model, x, radius, *, params=None, generator=None, init=None, point_ids=None):
        from robbench.protocols import AttackResult
        d = torch.stack([self.dirs[int(i)] for i in point_ids.tolist()])
        delta = fit_warm_start(x, d, radius)
        return AttackResult(delta=delta, damage=torch.zeros(x.shape[0]))

def main():
    ap = run_parser()
    ap.add_argument("--n", type=int, default=2048); ap.add_argument("--gap", type=float, default=0.03)
    ap.add_argument("--restarts", type=int, default=1); ap.add_argument("--json"); ap.add_argument("--save")
    ap.add_argument("--fixed", action="store_true", help="re-estimate flagged points along the verification delta's direction")
    ap.add_argument("--eps", type=float, default=0.02); ap.add_argument("--up", type=float, default=1.25)
    a = ap.parse_args()
    cfg, regs, data, x, ids, run = load_inputs(a)
    md = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage"); D = attack.defaults
    out = []
    for mc, model in trained_models(cfg, regs, data):
        base = measure(model, x, ids, attack, dict(D), md, run)
        R = torch.tensor(base["margin"], dtype=torch.float64)
        ok = torch.isfinite(R) & (R > 0)
        sel = ok.nonzero().squeeze(1)
        c0 = time.process_time()
        rv = (R[sel] * (1 - a.eps)).to(x.dtype)
        gen = torch.Generator().manual_seed(stats.derive_seed(cfg.seed, "verify-attack"))
        # candidates at 0.98 R: default attack cold (mean-decoder pre-solve), no pre-solve cold, and no pre-solve
        # found at 1.25 R then rescaled down and refined
        cands = [call_attack(attack, model, x[sel], rv, params={**D, "restarts": a.restarts}, generator=gen,
                             point_ids=ids[sel]).delta,
                 call_attack(attack, model, x[sel], rv, params={**D, **ALT, "restarts": a.restarts},
                             generator=gen, point_ids=ids[sel]).delta]
        if a.up > 0:
            big = (R[sel] * a.up).to(x.dtype)
            d_big = call_attack(attack, model, x[sel], big, params={**D, **ALT, "restarts": a.restarts},
                                generator=gen, point_ids=ids[sel]).delta
            cands.append(call_attack(attack, model, x[sel], rv, params={**D, **ALT}, generator=gen,
                                     init=fit_warm_start(x[sel], d_big, rv), point_ids=ids[sel], init_radius=big).delta)
        c1 = time.process_time()
        ps = []
        for c, d in enumerate(cands):
            with torch.no_grad():
                ps.append(estimate_probability(model, x[sel], d, r=run["r"], n_samples=a.n,
                                               seed=stats.derive_seed(cfg.seed, "verify-mc", c), stream_ids=ids[sel]).p)
        p, which = torch.stack(ps).min(0)
        c2 = time.process_time()
        flag = sel[p <= run["m"] - a.gap]
        fixed = R.clone(); re = None
        if flag.numel() and a.fixed:
            pos = torch.tensor([int((sel == i).nonzero()[0, 0]) for i in flag.tolist()])
            dirs = torch.stack(cands)[which[pos], pos]
            re = measure(model, x[flag], ids[flag], FixedDirection(ids[flag], dirs), {}, md, run)
            alt = torch.tensor(re["margin"], dtype=torch.float64)
            fixed[flag] = torch.minimum(fixed[flag], torch.nan_to_num(alt, nan=float("inf")))
        elif flag.numel():
            for params, env in (({**D}, {}), ({**D, **ALT}, FP32)):  # two chains with a fresh start per radius
                with environment(env):
                    re = measure(model, x[flag], ids[flag], attack, params, {**md, "warm_restarts": 1}, run)
                alt = torch.tensor(re["margin"], dtype=torch.float64)
                fixed[flag] = torch.minimum(fixed[flag], torch.nan_to_num(alt, nan=float("inf")))
        c3 = time.process_time()
        default_cpu = base["attack_cpu_s"] + base["mc_s"]
        rec = {"model": mc.label, "R": R.tolist(), "fixed": fixed.tolist(), "p_verify": p.tolist(),
               "flagged": flag.tolist(), "p_candidates": torch.stack(ps).tolist(), "caught_by": which.tolist(), "default_attack_cpu_s": base["attack_cpu_s"], "default_mc_s": base["mc_s"],
               "verify_attack_cpu_s": c1 - c0, "verify_mc_cpu_s": c2 - c1, "reestimate_cpu_s": c3 - c2}
        out.append(rec)
        if a.save:
            torch.save({"sel": sel, "cands": cands, "which": which, "R": R, "p": p}, f"{a.save}_{mc.label}.pt")
        fin = lambda t: float(t[torch.isfinite(t)].mean())
        print(f"{mc.label}: default mean R {fin(R):.4f} -> {fin(fixed):.4f} ({100*(fin(fixed)/fin(R)-1):+.2f}%); flagged "
              + ", ".join(f"{int(i)}: {R[i]:.3f}->{fixed[i]:.3f} (p_v {float(p[(sel==i).nonzero()[0,0]]):.3f} by c{int(which[(sel==i).nonzero()[0,0]])})" for i in flag)
              + f"\n   cpu s: default attack {base['attack_cpu_s']:.2f} + MC {base['mc_s']:.2f}; verify attack {c1-c0:.2f},"
              f" verify MC {c2-c1:.2f}, re-estimation {c3-c2:.2f}  (extra {100*(c3-c0)/default_cpu:.0f}% of the estimation;"
              f" verify alone {100*(c2-c0)/default_cpu:.0f}%)   p_v min/median {float(p.min()):.3f}/{float(p.median()):.3f}", flush=True)
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
