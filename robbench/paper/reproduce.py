"""``robbench reproduce``: run the paper's MNIST experiments from the ready configs, then write the report.

Experiments (each a ready config in ``robbench/paper/configs``, run into its own sub-directory of ``--out``):

- ``beta``       β-VAE β ∈ {0.1, 1, 10}: margins, bound, encoder statistics, fixed-direction sweeps;
- ``tau``        σ-offset VAE τ ∈ {0, 0.1, 0.5, 1}: the same estimators;
- ``routes``     maximum-damage attacks on μ, σ or both (Fig. 4);
- ``likelihood`` likelihood under attack and noise, once per (radius, noise sd) level;
- ``tau_long``   the τ family trained up to 60 epochs with early stopping (patience 5): margins, encoder statistics;
- ``tau_noise``  the τ family: p_r along a fixed random direction (attack ``noise``, estimator ``sweep``; Fig. 7 left);
- ``retest``     margins and bounds of ``beta`` and ``tau`` (τ > 0) measured again on the same points and networks
                 with independent attack and Monte Carlo streams (``configs/retest.yaml``): their reliability.

Models are trained once and cached (by configuration hash), so later experiments reuse them.
``--quick`` applies ``configs/quick.yaml`` on top of each config (fewer points, one seed, short training)
and runs fewer likelihood levels. An experiment whose plugins are missing is skipped with a message.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robbench import terminal

CONFIG_DIR = Path(__file__).parent / "configs"
EXPERIMENTS = ("beta", "tau", "routes", "likelihood", "tau_long", "tau_noise", "retest")
RETEST_OF = ("beta", "tau")  # the experiments ``retest`` re-measures
RETEST_TAU = [0.1, 0.5, 1.0]  # tau = 0 is the beta = 1 VAE, retested with the beta family
# (attack radius L, noise sd) per likelihood run: the curves of Fig. 7 centre/right and 9b.
LIKELIHOOD_LEVELS = ((0.5, 0.1), (1.0, 0.3), (2.0, 0.5), (4.0, 0.8))
QUICK_LIKELIHOOD_LEVELS = ((1.0, 0.3), (3.0, 0.6))


@dataclass
class Experiment:
    """One experiment: a sub-directory and the config mappings run into it, in order."""

    name: str
    configs: list[dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small scale (configs/quick.yaml): a few minutes on 2 CPU cores")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the runs and the report (default runs/reproduce[-quick])")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the full MNIST IDX files (default: the embedded 5,000 digits)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of the experiments: {', '.join(EXPERIMENTS)}")
    parser.add_argument("--backend", default=None, help="Monte Carlo backend: auto or a registered one")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N]")
    parser.add_argument("--executor", default=None, help="local (default) or ray (see robbench run --help)")
    parser.add_argument("--ray-address", default=None, help="executor ray: join this cluster (auto, HOST:PORT, ray://...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_overrides(values: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into ``values``; estimator_params / attack_params only for the estimators / attacks
    the config uses (the config rejects parameters of plugins a run does not use)."""
    over = dict(over)
    merged = values
    for section, used in (("estimator_params", "estimators"), ("attack_params", "attacks")):
        given = {k: v for k, v in (over.pop(section, None) or {}).items() if k in values.get(used, [])}
        if given:
            merged = _deep_merge(merged, {section: given})
    return _deep_merge(merged, over)


def experiments(*, quick: bool = False, data_dir: str | None = None,
                overrides: dict[str, Any] | None = None) -> list[Experiment]:
    """The experiments with their config mappings (not yet validated against the plugins)."""
    from robbench.config import load_yaml

    extra = dict(overrides or {})
    if data_dir is not None:  # the full MNIST IDX files replace the embedded 5,000 digits
        extra.update(data_dir=str(data_dir), dataset="mnist_full")
    quick_over = load_yaml(CONFIG_DIR / "quick.yaml") if quick else {}
    out = []
    for name in EXPERIMENTS:
        if name == "retest":
            retest = load_yaml(CONFIG_DIR / "retest.yaml")
            configs = []
            for base in RETEST_OF:
                values = _apply_overrides(_apply_overrides(load_yaml(CONFIG_DIR / f"{base}.yaml"), quick_over), extra)
                values = _deep_merge(values, retest)
                values["estimator_params"] = {k: v for k, v in (values.get("estimator_params") or {}).items()
                                              if k in values["estimators"]}
                if base == "tau":
                    values["model_params"] = _deep_merge(values["model_params"],
                                                         {"sigma_offset_vae": {"tau": list(RETEST_TAU)}})
                configs.append(values)
            out.append(Experiment(name, configs))
            continue
        values = _apply_overrides(_apply_overrides(load_yaml(CONFIG_DIR / f"{name}.yaml"), quick_over), extra)
        if name == "likelihood":
            levels = QUICK_LIKELIHOOD_LEVELS if quick else LIKELIHOOD_LEVELS
            configs = [_apply_overrides(values, {"estimator_params": {"likelihood": {"radius": radius,
                                                                                     "noise_sigma": noise}}})
                       for radius, noise in levels]
        else:
            configs = [values]
        out.append(Experiment(name, configs))
    return out


def run(args: argparse.Namespace) -> int:
    """Run every experiment (or ``--only`` some) into ``args.out`` and write the report there."""
    from robbench.config import ConfigError, build_config, validate_against_plugins
    from robbench.plugins import get_registries
    from robbench.registry import UnknownNameError
    from robbench import rundir
    from robbench.paper.report import write_report
    from robbench.runner import Runner

    console = terminal.console()
    out = Path(args.out) if args.out else Path("runs") / ("reproduce-quick" if args.quick else "reproduce")
    given = getattr(args, "only", None)
    only = set(EXPERIMENTS if given is None else [s.strip() for s in given.split(",") if s.strip()])
    unknown = only - set(EXPERIMENTS)
    if unknown or not only:  # `--only ''` is no selection, not all of them
        raise ConfigError(f"bad value for --only: {', '.join(sorted(unknown)) or repr(given)}; allowed: "
                          f"{', '.join(EXPERIMENTS)} (comma-separated)")
    overrides = {k: v for k, v in (("backend", getattr(args, "backend", None)),
                                   ("device", getattr(args, "device", None)),
                                   ("executor", getattr(args, "executor", None)),
                                   ("ray_address", getattr(args, "ray_address", None))) if v is not None}
    regs = get_registries()
    # The user's flags are checked before any experiment: a typo must not read as a missing plugin (an
    # experiment whose plugins are missing is skipped; a bad --backend would have skipped them all).
    validate_against_plugins(build_config(dict(overrides)), regs)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    for exp in experiments(quick=args.quick, data_dir=args.data_dir, overrides=overrides):
        if exp.name not in only:
            continue
        t0 = time.perf_counter()
        for values in exp.configs:
            try:
                cfg = build_config(values)
                validate_against_plugins(cfg, regs)
            except (ConfigError, UnknownNameError) as err:
                console.print(f"[yellow]reproduce: skipping experiment {exp.name}: {err}[/yellow]")
                break
            console.rule(f"{exp.name} → {out / exp.name}")
            with rundir.claimed(out / exp.name):
                Runner(cfg, regs, out / exp.name, console=console,
                       progress=not getattr(args, "no_progress", False)).run().close()
        timings[exp.name] = time.perf_counter() - t0
    if not any((out / name / "results.sqlite").exists() for name in EXPERIMENTS):
        console.print("[red]reproduce: no experiment ran; nothing to report[/red]")
        return 1
    t0 = time.perf_counter()
    write_report(out, console=console)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    (out / "timings.json").write_text(json.dumps({"quick": bool(args.quick), "seconds": timings}, indent=2) + "\n")
    console.print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0
