"""Which verification candidates find the stronger optimum, how often, and at what cost (exploration).

For every point of a margin_convergence point set: the default margin R (verify off), then candidate
searches at 0.98 R, each with ``--repeats`` attack seeds; p_hat of every candidate delta from 1024 samples.
Writes JSON (per model: R, per candidate and repeat the p_hat list, CPU seconds of the attack call).

    python benchmarks/attack_basins/candidates.py --models beta_vae --seed 0 --points 25 --repeats 3 --json c0.json
"""
from __future__ import annotations

import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from margin_convergence import trained_models  # noqa: E402
from robbench import montecarlo, stats  # noqa: E402
from basins import load_inputs, run_parser  # noqa: E402
from robbench.inputrange import input_range  # noqa: E402
from robbench.margin import estimate_margin, fit_warm_start  # noqa: E402
from robbench.protocols import call_attack  # noqa: E402

NOPRE = {"presolve_steps": 0, "warm_presolve_steps": 0}


def main() -> None:
    ap = run_parser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", required=True)
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    a = ap.parse_args()
    cfg, regs, data, x, ids, run = load_inputs(a)
    md = regs.estimators.get("margin").defaults
    attack = regs.attacks.get("max_damage")
    ap_ = dict(attack.defaults)
    out = []
    for mc, model in trained_models(cfg, regs, data):
        seed = stats.derive_seed(run["seed"], "margin")
        res = estimate_margin(model, x, attack, ap_, r=run["r"], m=run["m"], confidence=run["confidence"],
                              max_radius=md["max_radius"], tolerance=md["tolerance"],
                              rel_tolerance=md["rel_tolerance"], samples_initial=md["samples_initial"],
                              samples_max=md["samples_max"], samples_growth=md["samples_growth"], seed=seed,
                              point_ids=ids, warm_attack_params={"restarts": int(md["warm_restarts"])},
                              stop_when_undecided=md["stop_when_undecided"], samples_locate=md["samples_locate"],
                              refine=int(md["refine"]))
        R = res.margin.clone()
        ok = (~res.at_cap) & (R > 0)
        rho = (0.98 * R).to(x.dtype)
        rho[~ok] = 1.0
        box = input_range(model)
        with torch.no_grad():
            mu0, sigma0 = model.encode(x)
            center = model.decode(mu0).flatten(1)
        wit = res.witness_delta

        def p_hat(delta: torch.Tensor, tag: int) -> list[float]:
            with torch.no_grad():
                mu, _ = model.encode(x + delta)
            k = montecarlo.count_within(model, mu, sigma0, center, run["r"], 1024,
                                        seed=stats.derive_seed(seed, "cand-screen", tag), stream_ids=ids)
            return (k.double() / 1024).tolist()

        rec = {"model": mc.label, "R": R.tolist(), "ok": ok.tolist(), "cands": {}}
        for rep in range(a.repeats):
            gen = torch.Generator().manual_seed(stats.derive_seed(seed, "cand-attack", rep))

            def att(rr, params, init=None, init_radius=None):
                return call_attack(attack, model, x, rr, params=params, generator=gen, init=init, point_ids=ids,
                                   init_radius=init_radius).delta.detach()

            one = {**ap_, "restarts": 1}
            alt = {**one, **NOPRE}
            specs = {
                "c0": lambda: att(rho, one),
                "c1": lambda: att(rho, alt),
                "c2": lambda: att(rho, {**ap_, **NOPRE}, fit_warm_start(x, att(rho * 1.25 / 0.98, alt), rho, box),
                                  rho * 1.25 / 0.98),
                "c0_up": lambda: att(rho, ap_, fit_warm_start(x, att(rho * 1.25 / 0.98, one), rho, box),
                                     rho * 1.25 / 0.98),
                "c1_down": lambda: att(rho, {**ap_, **NOPRE}, fit_warm_start(x, att(rho * 0.75 / 0.98, alt), rho, box),
                                       rho * 0.75 / 0.98),
                "neg_w": lambda: att(rho, {**ap_, **NOPRE}, fit_warm_start(x, -wit, rho, box), res.hi.to(x.dtype)),
                "c1_r3": lambda: att(rho, {**alt, "restarts": 3}),
                "c0_r2": lambda: att(rho, {**one, "restarts": 2}),
                "c0_r3": lambda: att(rho, {**one, "restarts": 3}),
                "c1_r2": lambda: att(rho, {**alt, "restarts": 2}),
            }
            specs = {k: v for k, v in specs.items() if not a.only or k in a.only.split(",")}
            for name, fn in specs.items():
                t0 = time.process_time()
                d = fn()
                cpu = time.process_time() - t0
                rec["cands"].setdefault(name, []).append({"p": p_hat(d, rep), "cpu": cpu})
        print(mc.label, {n: round(sum(r["cpu"] for r in v) / len(v), 3) for n, v in rec["cands"].items()}, flush=True)
        out.append(rec)
    json.dump(out, open(a.json, "w"))


if __name__ == "__main__":
    main()
