"""The ``robbench`` command line: run, train, plugins, leaderboard, bench, report, reproduce.

Every name and value is checked against the registered plugins before any work starts; a bad one
exits with status 2 and a message saying what is allowed. Precedence: defaults < --config YAML < flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robbench.config import (ConfigError, RunConfig, build_config, load_yaml, parse_param_flag,
                             validate_against_plugins)
from robbench import terminal
from robbench.entries import EntryError, MergeError
from robbench.plugins import get_registries
from robbench.registry import UnknownNameError
from robbench.settings import RunSettings

USAGE_ERROR = 2


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML file with RunConfig keys (flags override it)")
    p.add_argument("--models", help="comma-separated model families, e.g. beta_vae,vae (default beta_vae)")
    p.add_argument("--attacks", help="comma-separated attacks (default max_damage)")
    p.add_argument("--estimators", help="comma-separated estimators (default margin,bound,encoder_stats)")
    p.add_argument("--dataset", help="data set name (default mnist: 5,000 embedded digits)")
    p.add_argument("--data-dir", help="directory with local data files (MNIST/Fashion-MNIST IDX, CIFAR-10 binary)")
    p.add_argument("--points", type=int, help="number of test points to evaluate (default 25)")
    p.add_argument("--seed", type=int, help=f"seed for point selection, attacks and Monte Carlo (default {RunSettings.seed})")
    p.add_argument("--model-seeds", help="comma-separated training seeds per configuration (default 0)")
    p.add_argument("--r", type=float, help=f"r of r-robustness, the output-space radius (default {RunSettings.r:g})")
    p.add_argument("--m", type=float, help=f"probability threshold m (default {RunSettings.m})")
    p.add_argument("--confidence", type=float, help=f"confidence of the reported intervals (default {RunSettings.confidence})")
    p.add_argument("--backend", help="Monte Carlo backend: auto (default) or a registered one (robbench plugins lists them)")
    p.add_argument("--device", help=f"cpu or cuda[:N] (default {RunSettings.device})")
    p.add_argument("--units", help="l2 (default) or rms: r and the estimators' input sizes (e.g. margin.max_radius) "
                                   "as per-pixel RMS of the input-range width")
    p.add_argument("--executor", help="where models train and batches run: local or ray (default local)")
    p.add_argument("--ray-address", help="executor ray: join this cluster (auto, HOST:PORT or ray://HOST:PORT); "
                                         "default: start a local Ray sized to this machine")
    p.add_argument("--epochs", type=int, help="training epochs (default 15)")
    p.add_argument("--param", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="plugin parameter, VALUE in YAML syntax, e.g. beta_vae.beta=[0.1,1,10]; repeatable")
    p.add_argument("--out", type=Path, help="run directory (default runs/<models>__<attacks>__<dataset>)")
    p.add_argument("--retrain", action="store_true", help="train even when a cached checkpoint exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robbench", description="Benchmark the adversarial robustness of VAEs (Camuto et al., AISTATS 2021).")
    from robbench import __version__
    parser.add_argument("--version", action="version", version=f"robbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(sub.add_parser("run", help="train/load models and estimate their robustness"))
    _add_run_arguments(sub.add_parser("train", help="train (or find cached) models without evaluating"))
    sub.add_parser("plugins", help="list every registered model, data set, attack and estimator")
    lb = sub.add_parser("leaderboard", help="show and rewrite the leaderboard of a run directory, or merge several")
    lb.add_argument("run_dir", type=Path, nargs="?")
    lb.add_argument("--merge", type=Path, nargs="+", metavar="DIR_OR_JSON",
                    help="run directories or exported entries files to merge into one leaderboard; refused "
                         "when their settings (data set, r, m, units, confidence, attacks, estimators) differ")
    lb.add_argument("--out", type=Path, help="with --merge: directory for the merged leaderboard.{md,csv,json}")
    export = sub.add_parser("export", help="write one validated JSON entry per model configuration of a run")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="output file (default RUN_DIR/entries.json)")
    bench = sub.add_parser("bench", help="compare Monte Carlo backends (compiled kernel vs pure PyTorch)")
    from robbench import bench as bench_module
    bench_module.add_arguments(bench)
    report = sub.add_parser("report", help="write report.md/.html with the paper's figures for a run directory")
    report.add_argument("run_dir", type=Path)
    reproduce = sub.add_parser("reproduce", help="run the paper's MNIST experiments and write the report")
    from robbench.paper import reproduce as reproduce_module
    reproduce_module.add_arguments(reproduce)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Merge defaults, the YAML file and the flags into a validated RunConfig."""
    regs = get_registries()
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = {"models": args.models, "attacks": args.attacks, "estimators": args.estimators,
             "dataset": args.dataset, "data_dir": args.data_dir, "points": args.points, "seed": args.seed,
             "r": args.r, "m": args.m, "confidence": args.confidence, "backend": args.backend,
             "device": args.device, "units": args.units, "executor": args.executor,
             "ray_address": args.ray_address}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.model_seeds is not None:
        try:
            values["model_seeds"] = [int(s) for s in args.model_seeds.split(",")]
        except ValueError:
            raise ConfigError(f"bad value for 'model_seeds': {args.model_seeds!r}; allowed: integers like 0,1,2") from None
    if args.epochs is not None:
        values["train"] = {**values.get("train", {}), "epochs": args.epochs}
    for flag in args.param:
        section, name, key, value = parse_param_flag(flag, regs)
        values.setdefault(section, {}).setdefault(name, {})[key] = value
    cfg = build_config(values)
    validate_against_plugins(cfg, regs)
    return cfg


def default_run_dir(cfg: RunConfig, config_path: Path | None) -> Path:
    if config_path is not None:
        return Path("runs") / config_path.stem
    return Path("runs") / f"{'+'.join(cfg.models)}__{'+'.join(cfg.attacks)}__{cfg.dataset}"


def cmd_run(args: argparse.Namespace, console: Console, *, evaluate: bool) -> int:
    from robbench.leaderboard import write_leaderboard
    from robbench.runner import Runner

    from robbench.plugins import plugin_failures

    cfg = config_from_args(args)
    for failure in plugin_failures():
        console.print(f"[yellow]warning: plugin {escape(failure.name)} failed to load and was skipped "
                      f"(see robbench plugins): {escape(failure.error)}[/yellow]")
    run_dir = args.out or default_run_dir(cfg, args.config)
    runner = Runner(cfg, get_registries(), run_dir, console=console, retrain=args.retrain,
                    progress=not args.no_progress)
    console.print(f"robbench: {len(runner.jobs)} jobs × {cfg.points} points → {run_dir}")
    store = runner.run(evaluate=evaluate)
    if evaluate:
        write_leaderboard(store, run_dir, console=console)
        console.print(f"results: {store.path}; leaderboard.md/.csv/.json in {run_dir}")
    store.close()
    return 0


def _format_defaults(defaults: dict[str, Any]) -> str:
    """``key=value`` per parameter (values as YAML would read them), for ``robbench plugins``."""
    import json

    def show(value: Any) -> str:
        text = json.dumps(value, default=str) if not isinstance(value, str) else (value or '""')
        return text if len(text) <= 40 else text[:37] + "..."

    return ", ".join(f"{key}={show(value)}" for key, value in defaults.items()) or "—"


def cmd_plugins(console: Console) -> int:
    from robbench.plugins import plugin_failures

    regs = get_registries()
    table = Table(title="registered robbench plugins", header_style="bold")
    for column in ("kind", "name", "from", "parameters (defaults)", "description"):
        table.add_column(column)
    for kind, registry in regs.by_kind().items():
        for name in registry.names():
            obj = registry.get(name)
            # Plugin text is shown as written: escape it so "[lo, hi]" is not read as rich markup.
            table.add_row(kind, name, escape(registry.source(name)),
                          escape(_format_defaults(dict(getattr(obj, "defaults", {}) or {}))),
                          escape(getattr(obj, "description", "").split("\n")[0]))
    console.print(table)
    for failure in plugin_failures():
        console.print(f"[red]plugin {escape(failure.name)} ({escape(failure.target)}, from {escape(failure.source)}) "
                      f"failed to load and was skipped: {escape(failure.error)}[/red]")
    return 0


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    from robbench.leaderboard import write_leaderboard
    from robbench.store import ResultStore

    if args.merge:
        return cmd_merge(args, console)
    if args.run_dir is None:
        raise ConfigError("robbench leaderboard: give a RUN_DIR, or --merge DIR [DIR ...]")
    store = ResultStore.open_existing(args.run_dir)
    write_leaderboard(store, args.run_dir, console=console)
    store.close()
    return 0


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    import json

    from robbench.entries import _clean, merge
    from robbench.leaderboard import render_csv, render_markdown, render_rich

    sources = ([args.run_dir] if args.run_dir else []) + list(args.merge)
    records, columns, settings = merge(sources)
    console.print(render_rich(records, columns, title=f"robbench leaderboard — merged from {len(sources)} sources"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "leaderboard.md").write_text(render_markdown(records, columns))
        (args.out / "leaderboard.csv").write_text(render_csv(records, columns))
        doc = {"format": "robbench-leaderboard/1", "settings": settings,
               "sources": [str(s) for s in sources], "rows": [_clean(rec) for rec in records]}
        (args.out / "leaderboard.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        console.print(f"merged leaderboard.md/.csv/.json in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from robbench.entries import export_run

    path = export_run(args.run_dir, args.out)
    console.print(f"entries written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = terminal.console()
    try:
        if args.command in ("run", "train"):
            return cmd_run(args, console, evaluate=args.command == "run")
        if args.command == "plugins":
            return cmd_plugins(console)
        if args.command == "leaderboard":
            return cmd_leaderboard(args, console)
        if args.command == "export":
            return cmd_export(args, console)
        if args.command == "bench":
            from robbench import bench as bench_module
            return bench_module.run(args)
        if args.command == "reproduce":
            from robbench.paper import reproduce as reproduce_module
            return reproduce_module.run(args)
        if args.command == "report":
            from robbench.paper.report import write_report
            write_report(args.run_dir, console=console)
            return 0
    except (UnknownNameError, ConfigError, FileNotFoundError, EntryError, MergeError) as err:
        print(f"robbench: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    parser.error(f"unknown command {args.command}")
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
