"""The ``robbench`` command line: run, train, plugins, leaderboard, bench, report, reproduce.

Every name and value is checked against the registered plugins before any work starts; a bad one
exits with status 2 and a message saying what is allowed. Precedence: defaults < --config YAML < flags.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import re
import sqlite3
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robbench.config import (ConfigError, RepeatedValueWarning, RunConfig, build_config, load_yaml,
                             parse_param_flag, validate_against_plugins, validate_runtime)
from robbench import rundir, terminal
from robbench.interrupt import run_interruptible
from robbench.entries import EntryError, MergeError
from robbench.plugins import get_registries
from robbench.locks import FileLock
from robbench.registry import UnknownNameError
from robbench.rundir import RunDirError
from robbench.settings import RunSettings
from robbench.store import StoreError

USAGE_ERROR = 2
WRITE_ERROR = 1  # a write failed (disk full, a file size limit): the input was fine, rerunning resumes


def _backend_choices() -> str:
    """``{auto,torch,cpp,...}``: the registered backends, for --backend's help."""
    try:
        return "{" + ",".join(["auto"] + get_registries().backends.names()) + "}"
    except Exception:  # noqa: BLE001 - a broken plugin must not break --help; validation reports it
        return "NAME"


# Flags of `run`; `train` takes only those marked True (it trains models and evaluates nothing).
def _add_run_arguments(p: argparse.ArgumentParser, *, train: bool = False) -> None:
    def add(*names: str, used_by_train: bool, **kwargs: Any) -> None:
        if used_by_train or not train:
            p.add_argument(*names, **kwargs)

    add("--config", used_by_train=True, type=Path, help="YAML file with RunConfig keys (flags override it)")
    add("--models", used_by_train=True, help="comma-separated model families, e.g. beta_vae,vae (default beta_vae)")
    add("--attacks", used_by_train=False, help="comma-separated attacks (default max_damage)")
    add("--estimators", used_by_train=False, help="comma-separated estimators (default margin,bound,encoder_stats)")
    add("--dataset", used_by_train=True, help="data set name (default mnist: 5,000 embedded digits)")
    add("--data-dir", used_by_train=True,
        help="directory with local data files (MNIST/Fashion-MNIST IDX, CIFAR-10, npz arrays, image folders)")
    add("--points", used_by_train=False, type=int, help="number of test points to evaluate (default 25)")
    add("--seed", used_by_train=False, type=int,
        help=f"seed for point selection, attacks and Monte Carlo (default {RunSettings.seed})")
    add("--model-seeds", used_by_train=True, help="comma-separated training seeds per configuration (default 0)")
    add("--r", used_by_train=False, type=float,
        help=f"r of r-robustness, the output-space radius (default {RunSettings.r:g})")
    add("--m", used_by_train=False, type=float, help=f"probability threshold m (default {RunSettings.m})")
    add("--confidence", used_by_train=False, type=float,
        help=f"confidence of the reported intervals (default {RunSettings.confidence})")
    if not train:
        p.add_argument("--backend", metavar=_backend_choices(),
                       help="Monte Carlo backend: auto (default) or a registered one (robbench plugins lists them)")
    add("--device", used_by_train=True, metavar="{cpu,cuda,cuda:N}",
        help=f"where models run (default {RunSettings.device})")
    add("--units", used_by_train=False,
        help="l2 (default) or rms: r and the estimators' input sizes (e.g. margin.max_radius) "
             "as per-pixel RMS of the input-range width")
    add("--executor", used_by_train=True, help="where models train and batches run: local or ray (default local)")
    add("--ray-address", used_by_train=True,
        help="executor ray: join this cluster (auto, HOST:PORT or ray://HOST:PORT); "
             "default: start a local Ray sized to this machine")
    add("--threads", used_by_train=True, type=int,
        help="torch CPU threads for estimation in this process (default: torch's default; local executor)")
    add("--epochs", used_by_train=True, type=int, help="training epochs (default 15)")
    add("--param", used_by_train=True, action="append", default=[], metavar="NAME.KEY=VALUE",
        help="plugin parameter, VALUE in YAML syntax, e.g. beta_vae.beta=[0.1,1,10]; repeatable")
    add("--out", used_by_train=True, type=Path, help="run directory (default runs/<models>__<attacks>__<dataset>)")
    add("--retrain", used_by_train=True, action="store_true", help="train even when a cached checkpoint exists")
    add("--no-progress", used_by_train=True, action="store_true", help="no progress bars")
    add("--dry-run", used_by_train=True, action="store_true",
        help="check the configuration and print the jobs it defines; train and write nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robbench", description="Benchmark the adversarial robustness of VAEs (Camuto et al., AISTATS 2021).")
    from robbench import __version__
    parser.add_argument("--version", action="version", version=f"robbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_arguments(sub.add_parser("run", help="train/load models and estimate their robustness"))
    _add_run_arguments(sub.add_parser("train", help="train (or find cached) models without evaluating"), train=True)
    sub.add_parser("plugins", help="list every registered model, data set, attack and estimator")
    lb = sub.add_parser("leaderboard", help="show and rewrite the leaderboard of a run directory, or merge several")
    lb.add_argument("run_dir", type=Path, nargs="?")
    lb.add_argument("--merge", type=Path, nargs="+", metavar="DIR_OR_JSON",
                    help="run directories or exported entries files to merge into one leaderboard; refused "
                         "when their settings (data set, r, m, units, confidence, attacks, estimators) differ")
    lb.add_argument("--out", type=Path, help="with --merge: directory for the merged leaderboard.{md,csv,json}")
    export = sub.add_parser("export", help="write one validated JSON entry per model configuration of a run")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, help="output file (default RUN_DIR/entries.json; missing folders are made)")
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
    flags = {key: getattr(args, key, None) for key in ("models", "attacks", "estimators", "dataset", "data_dir",
                                                      "points", "seed", "r", "m", "confidence", "backend",
                                                      "device", "units", "executor", "ray_address",
                                                      "threads")}
    values.update({k: v for k, v in flags.items() if v is not None})
    if args.model_seeds is not None:
        try:
            values["model_seeds"] = [int(s) for s in args.model_seeds.split(",")]
        except ValueError:
            raise ConfigError(f"bad value for 'model_seeds': {args.model_seeds!r}; allowed: integers like 0,1,2") from None
    if getattr(args, "epochs", None) is not None:
        values["train"] = {**_mapping("train", values.get("train")), "epochs": args.epochs}
    for flag in args.param:
        section, name, key, value = parse_param_flag(flag, regs)
        params = values[section] = _mapping(section, values.get(section))
        params[name] = _mapping(f"{section}.{name}", params.get(name))
        params[name][key] = value
    cfg = build_config(values)
    validate_against_plugins(cfg, regs)
    validate_runtime(cfg, regs)
    return cfg


def _mapping(key: str, value: Any) -> dict[str, Any]:
    """A copy of ``value`` when it is a mapping or absent (None), for a flag to add to; else ConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"bad value for {key!r}: {value!r}; allowed: a mapping (flags add keys to it)")
    return dict(value)


def default_run_dir(cfg: RunConfig, config_path: Path | None) -> Path:
    if config_path is not None:
        return Path("runs") / config_path.stem
    return Path("runs") / f"{'+'.join(cfg.models)}__{'+'.join(cfg.attacks)}__{cfg.dataset}"


@contextlib.contextmanager
def _notes(console: Console):
    """Print what the block warned as :class:`RepeatedValueWarning` as ``robbench: note: ...`` lines (each
    text once); other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RepeatedValueWarning)
        yield
    for text in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RepeatedValueWarning)):
        console.print(f"robbench: note: {escape(text)}")
    for w in caught:
        if not issubclass(w.category, RepeatedValueWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def warn_plugin_failures(console: Console) -> None:
    """A yellow warning per installed plugin that failed to load and was skipped (run, train, bench,
    reproduce: the commands that use plugins)."""
    from robbench.plugins import plugin_failures

    for failure in plugin_failures():
        console.print(f"[yellow]warning: plugin {escape(failure.name)} failed to load and was skipped "
                      f"(see robbench plugins): {escape(failure.error)}[/yellow]")


def cmd_run(args: argparse.Namespace, console: Console, *, evaluate: bool) -> int:
    from robbench.leaderboard import write_leaderboard
    from robbench.runner import Runner

    warn_plugin_failures(console)  # first: a name the run then misses may be why
    with _notes(console):
        cfg = config_from_args(args)
    run_dir = args.out = args.out or default_run_dir(cfg, args.config)  # out: also for the write-error message
    runner = Runner(cfg, get_registries(), run_dir, console=console, retrain=args.retrain,
                    progress=not args.no_progress)
    jobs = len(runner.jobs) if evaluate else len({(job.model.label, job.model.seed) for job in runner.jobs})
    what = f"{_count(jobs, 'job')} × {_count(cfg.points, 'point')}" if evaluate else _count(jobs, "model")
    if args.dry_run:
        runner.load_inputs(evaluate=evaluate)  # the data set is read (nothing written): a run that cannot load it fails here
        rundir.check(run_dir)  # as the run would, creating nothing
        console.print(f"robbench: configuration valid: {what} → {run_dir} (dry run: nothing done)")
        return 0
    console.print(f"robbench: {what} → {run_dir}")
    with rundir.claimed(run_dir):  # one invocation per run directory at a time
        store = runner.run(evaluate=evaluate)
        try:
            if evaluate:
                write_leaderboard(store, run_dir, console=console)
                console.print(f"results: {store.path}; leaderboard.md/.csv/.json in {run_dir}")
        finally:
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
    failures = plugin_failures()
    for failure in failures:
        console.print(f"[red]plugin {escape(failure.name)} ({escape(failure.target)}, from {escape(failure.source)}) "
                      f"failed to load and was skipped: {escape(failure.error)}[/red]")
    return 1 if failures else 0  # a check of the installation: a script or CI step must see the failure


def cmd_leaderboard(args: argparse.Namespace, console: Console) -> int:
    from robbench.leaderboard import write_leaderboard
    from robbench.store import ResultStore

    if args.merge:
        return cmd_merge(args, console)
    if args.out is not None:
        raise ConfigError(f"--out goes with --merge; a run's own leaderboard.md/.csv/.json are rewritten in "
                          f"{args.run_dir or 'RUN_DIR'} (copy them, or export the run: robbench export RUN_DIR --out FILE)")
    if args.run_dir is None:
        raise ConfigError("robbench leaderboard: give a RUN_DIR, or --merge DIR [DIR ...]")
    store = ResultStore.open_existing(args.run_dir)
    # While a run holds the directory it rewrites the files itself: then only show the board.
    lock = FileLock(Path(args.run_dir) / rundir.LOCK_NAME)
    try:
        free = lock.try_acquire()
    except OSError:  # a read-only directory: show, do not write
        free = False
    try:
        write_leaderboard(store, args.run_dir, console=console, write_files=free)
        if not free:
            console.print(f"[yellow]note: leaderboard files not rewritten: {escape(str(args.run_dir))} is in use "
                          "or not writable[/yellow]")
    finally:
        lock.release()
        store.close()
    return 0


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    import json

    from robbench.atomic import replace_texts
    from robbench.entries import _clean, merge
    from robbench.leaderboard import render_csv, render_markdown, render_rich

    sources = ([args.run_dir] if args.run_dir else []) + list(args.merge)
    with _notes(console):
        records, columns, settings = merge(sources)
    console.print(render_rich(records, columns, title=f"robbench leaderboard — merged from {len(sources)} sources"))
    if args.out:
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out}: a file of that name exists; give a directory for the merged "
                              "leaderboard")
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"format": "robbench-leaderboard/1", "settings": settings,
               "sources": [str(s) for s in sources], "rows": [_clean(rec) for rec in records]}
        # replaced whole: a failed write keeps the previous merged set (robbench.atomic)
        replace_texts(args.out, {"leaderboard.md": render_markdown(records, columns),
                                 "leaderboard.csv": render_csv(records, columns),
                                 "leaderboard.json": json.dumps(doc, indent=2, default=str) + "\n"})
        console.print(f"merged leaderboard.md/.csv/.json in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from robbench.entries import export_run

    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out}: that is a directory; give a file name")
    path = export_run(args.run_dir, args.out)
    console.print(f"entries written to {path}")
    return 0


# A token that starts with a minus and a digit ('-1,2', '-1e-3', '-.5') is a value: no option starts so.
_MINUS_VALUE = re.compile(r"-\.?\d")


def attach_minus_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--opt -1,2`` written ``--opt=-1,2`` where ``--opt`` takes one value: argparse reads
    a token that starts with '-' and is not a plain number ('-1,2', '-1e-3') as an option and fails with
    "expected one argument", though seeds may be negative (settings.SEED_RANGE). An unambiguous abbreviation
    of the option's name (``--model-seed``) is read as argparse reads it."""
    actions = dict(parser._option_string_actions)
    for action in parser._actions:  # the subcommand's parser, found by its name in argv
        if isinstance(action, argparse._SubParsersAction):
            command = next((a for a in argv if a in action.choices), None)
            if command is not None:
                actions.update(action.choices[command]._option_string_actions)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        action = actions.get(token)
        if action is None and token.startswith("--") and "=" not in token:  # argparse's abbreviations
            matches = {id(a): a for option, a in actions.items() if option.startswith(token)}
            action = next(iter(matches.values())) if len(matches) == 1 else None
        if (action is not None and action.nargs is None and i + 1 < len(argv)
                and _MINUS_VALUE.match(argv[i + 1])):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        if token == "--":  # what follows is positional
            out += argv[i:]
            break
        out.append(token)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The ``robbench`` command; returns the exit status (0, 2 for bad input, 130 when interrupted)."""
    return run_interruptible(_main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_minus_values(parser, argv))
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
            warn_plugin_failures(console)  # a backend plugin may be the one that failed
            return bench_module.run(args)
        if args.command == "reproduce":
            from robbench.paper import reproduce as reproduce_module
            warn_plugin_failures(console)  # an experiment skipped for a missing plugin: say why
            return reproduce_module.run(args)
        if args.command == "report":
            from robbench.paper.report import write_report
            write_report(args.run_dir, console=console)
            return 0
    except (UnknownNameError, ConfigError, FileNotFoundError, EntryError, MergeError, RunDirError,
            StoreError) as err:
        print(f"robbench: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except (sqlite3.DatabaseError, OSError) as err:
        failure = write_failure(err, getattr(args, "out", None))
        if failure is not None:  # no room to write: the input was fine, rerunning resumes
            print(f"robbench: error: {failure}", file=sys.stderr)
            return WRITE_ERROR
        if not isinstance(err, sqlite3.DatabaseError):
            raise
        # a results.sqlite damaged after it was opened, read-only or locked
        print(f"robbench: error: the results database cannot be used: {err}", file=sys.stderr)
        return USAGE_ERROR
    parser.error(f"unknown command {args.command}")
    return USAGE_ERROR


# Errors of a write that failed for lack of room or a limit, not because of the data or the input.
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_SQLITE = ("disk i/o error", "database or disk is full")
# Free space below which a failed write is put down to a full disk (a few SQLite pages and its journal).
FULL_BELOW_BYTES = 16 * 2 ** 20


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _free_bytes(folder: Path) -> int | None:
    """Free space on the disk holding ``folder`` (its nearest existing ancestor), or None if unknown."""
    import shutil

    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_failure(err: BaseException, out: Any) -> str | None:
    """The message for a write that failed for lack of room or a limit (disk full, quota, a file size
    limit) or with SQLite's generic I/O error, or None for any other error. SQLite says "disk I/O error"
    for any failed write, so the disk is called full only when its free space says so. Every result is
    committed in its own transaction and every file renamed into place, so what was written before stays
    usable and the same command resumes. ``out``: the run directory (None: unknown)."""
    if isinstance(err, sqlite3.OperationalError) and str(err).lower() in _FULL_SQLITE:
        where = f"{Path(out) / 'results.sqlite'}" if out else "the results database"
        free = _free_bytes(Path(out) if out else Path.cwd())
        if free is not None and free < FULL_BELOW_BYTES:
            return (f"could not write {where}: {err}; its disk is full ({_size(free)} free); the results stored "
                    "so far are kept: free space and rerun the same command to resume")
        room = "its free space is unknown" if free is None else f"its disk has {_size(free)} free, so it is not full"
        return (f"could not write {where}: {err} (an I/O error on the results database; {room}: a file size "
                "limit (ulimit -f), a quota, a failing disk or network file system?); the results stored so far "
                "are kept: rerun the same command to resume once the cause is fixed")
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        what = f"could not write {err.filename or 'a file'}: {err.strerror or err}"
        fix = "lift the limit" if err.errno == errno.EFBIG else "free space"
        return f"{what}; the results stored so far are kept: {fix} and rerun the same command to resume"
    return None


if __name__ == "__main__":
    sys.exit(main())
