"""Does the margin attack converge? R with the default attack versus R with 10x its budget, and the cost
of the default attack versus the earlier one, on the main command's models (or any run config).

    python benchmarks/margin_convergence.py                       # the three beta-VAEs of the quick start
    python benchmarks/margin_convergence.py --points 10 --json out.json
    python benchmarks/margin_convergence.py --models sigma_offset_vae --param sigma_offset_vae.tau=[0,1]

Variants (each the margin estimator's defaults unless said otherwise; same points, same seeds, so the
Monte Carlo streams are common and differences come from the attack):
  default     the default max_damage attack (mean-decoder pre-solve, eta redrawn per step, stall stop;
              on the compiled engine its steps' large products in bf16, ROBBENCH_ATTACK_BF16=steps)
  fp32        the default attack with every product in fp32 (ROBBENCH_ATTACK_BF16=off)
  steps_x10   10x pre-solve and refinement steps, 10x smaller stall tolerance and final step (fp32)
  eta_x10     10x eta draws per step and for scoring (fp32)
  old         the earlier attack and bisection: eta fixed for the whole call (8 draws), 40 steps cold and
              10 warm, absolute tolerance 0.05, no screening (kept for the cost ratio; its R is biased upwards;
              it always runs on the torch engine, as when issue 14's table was measured)
  old_eta4    ``old`` with 4 fixed draws (what ``old`` ran with while the default eta_samples was 4)
Reported per model: mean R, the change of mean R and the mean |change| of R per point relative to
``default`` (the convergence criterion: <= 1% when the budget is multiplied by 10), attack and Monte
Carlo seconds, decoder samples per point; and the excess of ``default`` and ``fp32`` over the long
references steps_x10 / eta_x10 (their mean R change, mean |change| and worst point; the long references
run in fp32, so both are measured against the same optimum). Models come from the model cache (trained when missing).
Rows on max_damage's compiled engine are those its op reports (robbench_plugins.fused_attack.ROWS).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from robbench import stats
from robbench.cli import _add_run_arguments, config_from_args
from robbench.config import model_configs
from robbench.margin import estimate_margin
from robbench.paths import cache_dir
from robbench.plugins import get_registries
from robbench.protocols import call_attack
from robbench.runner import load_data, select_points
from robbench_plugins import fused_attack

OLD_MARGIN = {"tolerance": 0.05, "rel_tolerance": None, "warm_steps": 10, "refine": 0, "samples_locate": None,
              "stop_when_undecided": True, "screen_samples": 0, "verify": False}
OLD_ATTACK = {"eta_redraw": False, "step_size": 0.5, "steps": 40, "eta_samples": 8}


FP32 = {"ROBBENCH_ATTACK_BF16": "off"}  # the compiled engine's products all in fp32


def variants(attack_defaults: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, str]]]:
    """name -> (attack params, margin overrides, environment variables set while it runs)."""
    d = attack_defaults
    return {
        "default": ({}, {}, {}),
        "fp32": ({}, {}, FP32),
        "steps_x10": ({"presolve_steps": 10 * d["presolve_steps"], "steps": 10 * d["steps"],
                       "warm_presolve_steps": 10 * d["warm_presolve_steps"],
                       "warm_refine_steps": 10 * d["warm_refine_steps"],
                       "stall_tol": d["stall_tol"] / 10, "min_step": d["min_step"] / 10}, {}, FP32),
        "eta_x10": ({"eta_samples": 10 * d["eta_samples"], "eval_samples": 10 * d["eval_samples"]}, {}, FP32),
        "old": (OLD_ATTACK, OLD_MARGIN, {}),
        "old_eta4": ({**OLD_ATTACK, "eta_samples": 4}, OLD_MARGIN, {}),
    }


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Sets env's variables for the block and restores the previous values (the compiled engine reads its
    A/B switches at each op call, so variants can be interleaved in one process)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Counting(torch.nn.Module):
    """The model, counting the rows that go through encode() and decode() (a load-independent cost)."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.input_shape, self.latent_dim = model.input_shape, model.latent_dim
        self.decoder = getattr(model, "decoder", None)  # the engine's compiled path reads the plan
        self.rows = {"encode": 0, "decode": 0}

    def encode(self, x):
        self.rows["encode"] += x.shape[0]
        return self.model.encode(x)

    def decode(self, z):
        self.rows["decode"] += z.shape[0]
        return self.model.decode(z)

    def log_likelihood(self, x, recon):
        return self.model.log_likelihood(x, recon)


@dataclass
class Timed:
    """Wraps an attack and adds up the wall and CPU seconds spent in it, and the encoder/decoder rows."""

    attack: Any
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    rows: int = 0

    def __post_init__(self) -> None:
        self.name, self.description, self.defaults = self.attack.name, self.attack.description, self.attack.defaults

    def __call__(self, model, x, radius, *, params, generator, init=None, point_ids=None, init_radius=None):
        start, cpu = time.perf_counter(), time.process_time()
        counted = isinstance(model, Counting)
        before = sum(model.rows.values()) + sum(fused_attack.ROWS.values()) if counted else 0
        try:
            return call_attack(self.attack, _fused_target(model, params, x), x, radius, params=params,
                               generator=generator, init=init, point_ids=point_ids, init_radius=init_radius)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
            if counted:
                self.rows += sum(model.rows.values()) + sum(fused_attack.ROWS.values()) - before


def _fused_target(model: Any, params: dict[str, Any], x: torch.Tensor) -> Any:
    """The model to hand the attack: the wrapped one when max_damage's compiled engine will run on it (it
    reads the networks, not encode/decode, and counts its rows in fused_attack.ROWS), else ``model``."""
    if not isinstance(model, Counting):
        return model
    p = params or {}
    converged = p.get("eta_redraw", True) and p.get("optimizer", "pgd") == "pgd"
    if converged and fused_attack.resolve_engine(p.get("engine", "auto"), model.model, x) is not None:
        return model.model
    return model


def measure(model, x, ids, attack, attack_params, margin_params, run) -> dict[str, Any]:
    timed = Timed(attack)
    model = Counting(model)
    p = margin_params
    warm = {} if p.get("warm_steps") is None else {"steps": int(p["warm_steps"])}
    warm["restarts"] = int(p["warm_restarts"])
    start = time.perf_counter()
    res = estimate_margin(model, x, timed, attack_params, r=run["r"], m=run["m"], confidence=run["confidence"],
                          max_radius=p["max_radius"], tolerance=p["tolerance"], rel_tolerance=p["rel_tolerance"],
                          samples_initial=p["samples_initial"], samples_max=p["samples_max"],
                          samples_growth=p["samples_growth"], seed=stats.derive_seed(run["seed"], "margin"),
                          point_ids=ids, backend=run["backend"], warm_attack_params=warm,
                          stop_when_undecided=p["stop_when_undecided"], samples_locate=p.get("samples_locate"),
                          refine=int(p.get("refine", 0)), screen_samples=int(p.get("screen_samples", 0)),
                          screen_share=float(p.get("screen_share", 0.1)), verify=bool(p.get("verify", False)))
    total = time.perf_counter() - start
    margin = torch.where(res.at_cap, torch.full_like(res.margin, float("nan")), res.margin)
    return {"margin": margin.tolist(), "attack_s": timed.seconds, "attack_cpu_s": timed.cpu_seconds,
            "attack_rows": timed.rows, "mc_s": total - timed.seconds,
            "samples_per_point": float(res.samples.double().mean()), "censored": int(res.at_cap.sum())}


def margin_inputs(cfg: Any, regs: Any) -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The run config's data, its evaluation points x (B, *input_shape) with their ids (B,), and the run
    settings the margin estimator takes (r, m, confidence, backend, seed)."""
    data = load_data(cfg, regs)
    ids = select_points(data, cfg.points, cfg.points_seed())
    run = {"r": cfg.r, "m": cfg.m, "confidence": cfg.confidence, "backend": cfg.backend, "seed": cfg.seed}
    return data, data.test_x[ids], ids, run


def trained_models(cfg: Any, regs: Any, data: Any) -> Iterator[tuple[Any, torch.nn.Module]]:
    """(model config, trained model in eval mode) for every model of the run config: from the model cache,
    trained with the config's training settings on first use."""
    from robbench.training import TrainConfig, train_or_load

    t = cfg.train
    for mc in model_configs(cfg, regs):
        trained = train_or_load(regs.models.get(mc.family), mc.params, data,
                                TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, seed=mc.seed,
                                            patience=t.patience),
                                cache_dir=cache_dir() / "models", device=torch.device("cpu"), progress=False,
                                dataset_name=cfg.dataset)
        yield mc, trained.model.eval()


def compare(base: list[float], other: list[float]) -> dict[str, float]:
    """Margins ``other`` against ``base`` point by point (uncensored points): change of the mean, mean |change|,
    the largest increase and the largest decrease (relative; 0 when none), identical points."""
    pairs = [(b, o) for b, o in zip(base, other) if b == b and o == o and b > 0]
    mean_b = sum(b for b, _ in pairs) / len(pairs)
    mean_o = sum(o for _, o in pairs) / len(pairs)
    rel = [o / b - 1.0 for b, o in pairs]
    return {"mean_change": mean_o / mean_b - 1.0, "mean_abs_change": sum(abs(r) for r in rel) / len(rel),
            "max_up": max([0.0] + rel), "max_down": min([0.0] + rel),
            "identical": sum(b == o for b, o in pairs), "compared": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_run_arguments(parser)
    parser.add_argument("--variants", default="default,fp32,steps_x10,eta_x10,old,old_eta4")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the variants this many times, interleaved, and keep each one's fastest run "
                             "(timings on a shared machine swing with its load; margins do not change)")
    parser.add_argument("--attack-base", default="{}", help="JSON overrides of the attack's defaults that every "
                        "variant starts from, e.g. '{\"refine_step_size\": 0.2}' (to tune the defaults)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)  # --threads comes with the run arguments (1: steadiest timings when shared)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = margin_inputs(cfg, regs)
    margin_defaults = dict(regs.estimators.get("margin").defaults)
    attack = regs.attacks.get("max_damage")
    base = {**attack.defaults, **json.loads(args.attack_base)}
    chosen = variants(base)
    names = args.variants.split(",")
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "points": cfg.points, "models": []}
    for mc, model in trained_models(cfg, regs, data):
        rec: dict[str, Any] = {"model": mc.label, "seed": mc.seed}
        for _ in range(max(args.repeat, 1)):
            for name in names:  # interleaved, so a change of load hits every variant alike
                attack_params, overrides, env = chosen[name]
                with environment(env):
                    res = measure(model, x, ids, attack, {**base, **attack_params},
                                  {**margin_defaults, **overrides}, run)
                if name in rec:
                    for key in ("attack_s", "attack_cpu_s", "mc_s"):
                        res[key] = min(res[key], rec[name][key])
                rec[name] = res
        for name in names:
            if name != "default" and "default" in rec:
                rec[name].update(compare(rec["default"]["margin"], rec[name]["margin"]))
        rec["excess"] = {f"{a}_over_{ref}": compare(rec[ref]["margin"], rec[a]["margin"])
                         for a in ("default", "fp32") for ref in ("steps_x10", "eta_x10") if a in rec and ref in rec}
        out["models"].append(rec)
        print(f"{mc.label} seed {mc.seed}")
        for name in names:
            v = rec[name]
            finite = [m for m in v["margin"] if m == m]
            line = (f"  {name:10s} mean R {sum(finite) / max(len(finite), 1):.4f}  attack {v['attack_s']:6.2f} s"
                    f" (cpu {v['attack_cpu_s']:6.2f} s, {v['attack_rows'] / 1e6:6.2f} M enc/dec rows)"
                    f"  MC {v['mc_s']:6.2f} s  samples/point {v['samples_per_point']:8.0f}")
            if "mean_change" in v:
                line += (f"  vs default: mean R {100 * v['mean_change']:+.2f}%"
                         f"  mean |dR| {100 * v['mean_abs_change']:.2f}%"
                         f"  max {100 * v['max_up']:+.2f}% / {100 * v['max_down']:+.2f}%"
                         f"  identical {v['identical']}/{v['compared']}")
            print(line, flush=True)
        for key, c in rec["excess"].items():
            print(f"  excess {key:26s} mean R {100 * c['mean_change']:+.2f}%"
                  f"  mean |dR| {100 * c['mean_abs_change']:.2f}%"
                  f"  max {100 * c['max_up']:+.2f}% / {100 * c['max_down']:+.2f}%", flush=True)
        for ref in ("old", "old_eta4"):
            if ref not in rec or "default" not in rec:
                continue
            d, o = rec["default"], rec[ref]
            print(f"  attack cost default / {ref}: wall {d['attack_s'] / o['attack_s']:.2f}x, "
                  f"cpu {d['attack_cpu_s'] / o['attack_cpu_s']:.2f}x, enc/dec rows {d['attack_rows'] / o['attack_rows']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
