"""The margin with and without ``verify`` on a margin_convergence point set: R per point, flags, and the CPU
seconds (1 thread) of each part: the bisection's attack, its Monte Carlo, and the verification's candidate
attacks, screen and re-bisection. Both variants run in one process on the same points (interleaved per model).

    python benchmarks/attack_basins/verify_eval.py --models beta_vae --seed 0 --points 25 --json v0.json
Optionally ``--reference ref.json`` ({model label: [R per point]}) prints the mean excess over it and the
points more than 2 % above it.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

sys.path.insert(0, "benchmarks")
from margin_convergence import trained_models  # noqa: E402
from robbench import margin as margin_mod  # noqa: E402
from robbench import stats  # noqa: E402
from basins import load_inputs, run_parser  # noqa: E402

PARTS = ("verification_candidates", "screen_candidates", "bisect_direction")
ORDER = ("off", "on", "s6", "s6", "on", "off")  # interleaved: each variant's CPU is the mean of its two runs


def s6_candidates(model: Any, x: torch.Tensor, attack: Any, attack_params: dict[str, Any], radius: torch.Tensor,
                  chain_delta: torch.Tensor, chain_radius: torch.Tensor, *, seed: int, point_ids: torch.Tensor
                  ) -> list[torch.Tensor]:
    """Session 6's candidates (commit b77a4da): c0 one start; c1 no pre-solve; c2 c1 at 1.25 R rescaled."""
    from robbench.inputrange import input_range
    from robbench.protocols import call_attack
    one = {"restarts": 1} if "restarts" in attack_params else {}
    alt = {**attack_params, **{k: 0 for k in margin_mod.NO_PRESOLVE if k in attack_params}}
    gen = torch.Generator(device=x.device).manual_seed(stats.derive_seed(seed, "margin-verify-attack"))

    def at(rho, params, init=None, init_radius=None):
        return call_attack(attack, model, x, rho, params=params, generator=gen, init=init, point_ids=point_ids,
                           init_radius=init_radius).delta.detach()

    big = radius * (1.25 / 0.98)
    c2 = at(radius, alt, margin_mod.fit_warm_start(x, at(big, {**alt, **one}), radius, input_range(model)), big)
    return [at(radius, {**attack_params, **one}), at(radius, {**alt, **one}), c2]


def s6_screen(model: Any, x: torch.Tensor, cands: list[torch.Tensor], *, r: float, m: float, center: torch.Tensor,
              sigma0: torch.Tensor, sigma_at: str, seed: int, point_ids: torch.Tensor, backend: str):
    """Session 6's screen: 1024 samples for every candidate."""
    from robbench import montecarlo
    p = []
    for c, d in enumerate(cands):
        with torch.no_grad():
            mu, sp = model.encode(x + d)
        k = montecarlo.count_within(model, mu, sigma0 if sigma_at == "clean" else sp, center, r, 1024,
                                    seed=stats.derive_seed(seed, "margin-verify-screen", c), stream_ids=point_ids,
                                    backend=backend).cpu()
        p.append(k.double() / 1024)
    p_min, which = torch.stack(p).min(0)
    return p_min, which, torch.full_like(which, 1024 * len(cands))


def timed_parts() -> tuple[dict[str, Any], dict[str, Any]]:
    """Wrap the verification's parts in robbench.margin with process-CPU timers; returns the running totals."""
    cpu: dict[str, Any] = {name: 0.0 for name in PARTS}
    impl: dict[str, Any] = {}
    for name in PARTS:
        impl[name] = impl[name + "_current"] = getattr(margin_mod, name)

        def wrapper(*a: Any, _name: str = name, **kw: Any) -> Any:
            t0 = time.process_time()
            try:
                out = impl[_name + "_current"](*a, **kw)
                if _name == "screen_candidates":
                    cpu["screen_samples"] = cpu.get("screen_samples", 0) + int(out[2].sum())
                return out
            finally:
                cpu[_name] += time.process_time() - t0
        setattr(margin_mod, name, wrapper)
    return cpu, impl


class TimedAttack:
    """The attack with its process-CPU seconds counted."""

    def __init__(self, attack: Any) -> None:
        self.attack, self.cpu = attack, 0.0
        self.name, self.defaults = attack.name, attack.defaults

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.process_time()
        try:
            return self.attack(*a, **kw)
        finally:
            self.cpu += time.process_time() - t0


def run_margin(model: Any, x: torch.Tensor, ids: torch.Tensor, attack: Any, md: dict[str, Any], run: dict[str, Any],
               variant: str, cpu: dict[str, float], impl: dict[str, Any]) -> dict[str, Any]:
    """One margin run: variant "off" (no verification), "on" (this library's), "s6" (session 6's candidates
    and screen in the same verification frame)."""
    verify = variant != "off"
    for name in ("verification_candidates", "screen_candidates"):
        impl[name + "_current"] = (s6_candidates if name == "verification_candidates" else s6_screen) \
            if variant == "s6" else impl[name]
    timed = TimedAttack(attack)
    before = {k: cpu.get(k, 0) for k in (*PARTS, "screen_samples")}
    t0 = time.process_time()
    res = margin_mod.estimate_margin(
        model, x, timed, dict(attack.defaults), r=run["r"], m=run["m"], confidence=run["confidence"],
        max_radius=md["max_radius"], tolerance=md["tolerance"], rel_tolerance=md["rel_tolerance"],
        samples_initial=md["samples_initial"], samples_max=md["samples_max"], samples_growth=md["samples_growth"],
        seed=stats.derive_seed(run["seed"], "margin"), point_ids=ids, backend=run["backend"],
        warm_attack_params={"restarts": int(md["warm_restarts"])}, stop_when_undecided=md["stop_when_undecided"],
        samples_locate=md["samples_locate"], refine=int(md["refine"]), verify=verify)
    total = time.process_time() - t0
    parts = {k: cpu[k] - before[k] for k in PARTS}
    screen_samples = cpu.get("screen_samples", 0) - before["screen_samples"]
    chain_attack = timed.cpu - parts["verification_candidates"]
    margin = torch.where(res.at_cap, torch.full_like(res.margin, float("nan")), res.margin)
    out = {"margin": margin.tolist(), "total_cpu": total, "attack_cpu": chain_attack,
           "mc_cpu": total - chain_attack - sum(parts.values()), **{k + "_cpu": v for k, v in parts.items()},
           "samples": res.samples.tolist(), "screen_samples": screen_samples}
    if verify:
        out.update(flagged=res.verify_flagged.tolist(), lowered=res.verified_lower.tolist(),
                   verify_p=res.verify_p.tolist())
    return out


def summary(name: str, R: list[float], ref: list[float]) -> str:
    pairs = [(a, b) for a, b in zip(R, ref) if a == a and b == b]
    ex = [a / b - 1 for a, b in pairs]
    worst = max(range(len(ex)), key=lambda i: ex[i])
    return (f"{name:8s} mean excess {100 * (sum(a for a, _ in pairs) / sum(b for _, b in pairs) - 1):+.2f} %  "
            f">2 %: {sum(e > 0.02 for e in ex)}  worst {100 * ex[worst]:+.1f} % (point {worst})")


def main() -> None:
    ap = run_parser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--reference", default=None)
    ap.add_argument("--vseed", type=int, default=0,
                    help="offset added to the verification candidates' seed (how much of a catch is luck)")
    ap.add_argument("--variants", default=",".join(ORDER), help="run order (each name once or twice)")
    a = ap.parse_args()
    cfg, regs, data, x, ids, run = load_inputs(a)
    md = regs.estimators.get("margin").defaults
    attack = regs.attacks.get("max_damage")
    cpu, impl = timed_parts()
    if a.vseed:
        base = impl["verification_candidates"]

        def shifted(*args: Any, seed: int, **kw: Any) -> Any:
            return base(*args, seed=seed + a.vseed, **kw)
        impl["verification_candidates"] = shifted
    order = a.variants.split(",")
    ref = json.load(open(a.reference)) if a.reference else {}
    out = []
    for mc, model in trained_models(cfg, regs, data):
        rec: dict[str, Any] = {"model": mc.label}
        for variant in order:
            one = run_margin(model, x, ids, attack, md, run, variant, cpu, impl)
            if variant in rec:  # second run: same R (deterministic), CPU averaged
                assert one["margin"] == rec[variant]["margin"], variant
                for key in [k for k in one if k.endswith("_cpu")]:
                    rec[variant][key] = 0.5 * (rec[variant][key] + one[key])
            else:
                rec[variant] = one
        off = rec["off"]
        print(f"{mc.label}: off cpu {off['total_cpu']:.2f} (attack {off['attack_cpu']:.2f}, mc {off['mc_cpu']:.2f})")
        for name in [v for v in ("on", "s6") if v in rec]:
            on = rec[name]
            print(f"  {name}: flagged {sum(on['flagged'])} lowered {sum(on['lowered'])}; cpu {on['total_cpu']:.2f} "
                  f"(attack {on['attack_cpu']:.2f}, mc {on['mc_cpu']:.2f}, candidates "
                  f"{on['verification_candidates_cpu']:.2f}, screen {on['screen_candidates_cpu']:.2f} "
                  f"[{on['screen_samples'] / len(ids):.0f} samples/point], re-bisection "
                  f"{on['bisect_direction_cpu']:.2f})", flush=True)
        if mc.label in ref:
            for name in [v for v in ("off", "on", "s6") if v in rec]:
                print("   " + summary(name, rec[name]["margin"], ref[mc.label]), flush=True)
        out.append(rec)
    json.dump(out, open(a.json, "w"))


if __name__ == "__main__":
    main()
