"""``robbench bench --margin``: end-to-end margin estimation per backend, where its time goes.

The workload is the main command's: its models (by default the three beta-VAEs, beta in {0.1, 1, 10},
trained or loaded from the checkpoint cache by the normal training path), its data set and points, its
margin job (``margin`` estimator with the default attack and parameters). Each backend runs the same
batch through :func:`robbench.execute.evaluate_batch` in this one process, backends interleaved within
each repetition (order rotated between repetitions, so slow phases of a shared machine hit all). The
split: time inside the attack (a timing wrapper around the registered attack), inside
:func:`robbench.montecarlo.count_within` (:func:`robbench.montecarlo.observe`), and the rest (encoding,
bisection bookkeeping). The margins of every backend and repetition must be identical (asserted).

Throughput during the Monte Carlo phase: executed decoder FLOPs (2 x multiply-adds of the linear layers
per decoded sample, the last layer left out for samples a screen decided without it and the columns an
early exit skipped, counted twice for bf16-pass samples recomputed in fp32) per Monte Carlo second;
"% peak" (:func:`peak_fraction`) is that work's time at the measured large-GEMM peaks of the precisions it
ran in (bf16 last layers at the bf16 peak, the rest at the fp32 peak) over the Monte Carlo time.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.table import Table
from torch import nn

from robbench import montecarlo
from robbench.config import RunConfig, model_configs
from robbench.execute import JobSpec, evaluate_batch
from robbench.paths import cache_dir
from robbench.plugins import Registries
from robbench.protocols import call_attack
from robbench.registry import Registry

MARGIN_KEYS = ("margin", "margin_lo", "margin_hi", "samples", "undecided", "at_cap")


class TimedAttack:
    """Wraps an attack; ``seconds`` accumulates the wall time of its calls (everything else is forwarded)."""

    def __init__(self, inner: Any):
        self.inner, self.seconds = inner, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, model: Any, x: torch.Tensor, rho: torch.Tensor, **kwargs: Any) -> Any:
        _sync(x)
        start = time.perf_counter()
        try:
            return call_attack(self.inner, model, x, rho, **kwargs)
        finally:
            _sync(x)
            self.seconds += time.perf_counter() - start


def _sync(x: torch.Tensor) -> None:
    """Wait for queued CUDA work on x's device before reading a clock (no-op on the CPU)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


@dataclass
class MarginRow:
    """One (model, backend, repetition) run of the margin job on all its points. Times in seconds;
    ``samples_per_point``: decoder samples per point (the estimator's ``samples``, mean); ``mc_samples``:
    all samples count_within decoded or screened; GFLOP: executed decoder work in the Monte Carlo phase."""

    model: str
    backend: str
    repeat: int
    points: int
    whole_s: float
    attack_s: float
    montecarlo_s: float
    other_s: float
    samples_per_point: float
    mc_samples: int
    mc_calls: int
    precision: str
    screened_fraction: float
    gflop: float
    gflops: float
    peak_gflops: float | None
    peak_fraction: float | None
    margins: list[float | None] = dataclasses.field(default_factory=list)
    exit_saved_fraction: float = 0.0  # last layers an early exit did not compute / mc_samples
    bf16_gflop: float = 0.0  # of gflop, the last layers run in bf16 (the rest, rechecks included, is fp32)


def peak_fraction(row: MarginRow, peaks: dict[str, float]) -> float | None:
    """Executed work over the time it would take at the measured peaks, each part at its own precision's
    peak (bf16 last layers at the bf16 peak; hidden layers, fp32 last layers and fp32 rechecks at the fp32
    peak): the fraction of the peak of the precisions used that the Monte Carlo phase reached."""
    fp32 = row.gflop - row.bf16_gflop
    if not row.gflop or row.montecarlo_s <= 0 or "fp32" not in peaks or (row.bf16_gflop and "bf16" not in peaks):
        return None
    ideal = fp32 / peaks["fp32"] + (row.bf16_gflop / peaks["bf16"] if row.bf16_gflop else 0.0)
    return ideal / row.montecarlo_s


def linear_flops(model: nn.Module) -> tuple[float, float]:
    """(FLOPs per decoded sample of the decoder's linear layers, FLOPs of its last linear layer); (0, 0)
    for decoders that are not an ``nn.Module`` with ``nn.Linear`` layers."""
    dec = getattr(model, "decoder", None)
    lins = [m for m in dec.modules() if isinstance(m, nn.Linear)] if isinstance(dec, nn.Module) else []
    total = float(sum(2 * m.in_features * m.out_features for m in lins))
    return total, (float(2 * lins[-1].in_features * lins[-1].out_features) if lins else 0.0)


def margin_job(cfg: RunConfig, regs: Registries) -> JobSpec:
    """The run's ``margin`` job (first attack), as the runner would plan it."""
    from robbench.runner import plan_jobs

    jobs = [j for j in plan_jobs(cfg, regs) if j.estimator == "margin"]
    if not jobs:
        from robbench.config import ConfigError
        raise ConfigError("bad value for 'estimators': the margin benchmark needs the 'margin' estimator; "
                          f"got {', '.join(cfg.estimators)}")
    return jobs[0].spec()


def trained_models(cfg: RunConfig, regs: Registries, data: Any, *, progress: bool = False
                   ) -> list[tuple[str, nn.Module]]:
    """(label, model) of every model configuration of ``cfg``, trained or loaded from the cache exactly as
    ``robbench run`` does (same cache directory and keys)."""
    from robbench.training import train_or_load

    out = []
    for mc in model_configs(cfg, regs):
        trained = train_or_load(regs.models.get(mc.family), mc.params, data, cfg.train.for_seed(mc.seed),
                                cache_dir=cache_dir() / "models", device=torch.device(cfg.device),
                                progress=progress, dataset_name=cfg.dataset)
        out.append((mc.label, trained.model.eval()))
    return out


@torch.no_grad()
def warm_up(model: nn.Module, x: torch.Tensor, backends: Sequence[str]) -> None:
    """One small count_within per backend before timing: the one-time costs (extension load, the cpp
    screen's cached spectral norm) are not part of any repetition."""
    mu, sigma = model.encode(x)
    center = model.decode(mu).flatten(1)
    for name in backends:
        montecarlo.count_within(model, mu, sigma, center, 1.0, 64, seed=0, backend=name)


def _timed_registries(regs: Registries, attack_name: str) -> tuple[Registries, TimedAttack]:
    timed = TimedAttack(regs.attacks.get(attack_name))
    attacks: Registry = Registry("attack")
    attacks.add(attack_name, timed, regs.attacks.source(attack_name))
    return dataclasses.replace(regs, attacks=attacks), timed


def run_margin_once(job: JobSpec, model: nn.Module, x: torch.Tensor, point_ids: Sequence[int], backend: str,
                    regs: Registries) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the margin job with ``backend``; returns (timings and counts, per-point metrics)."""
    timed_regs, timed = _timed_registries(regs, job.attack)
    spec = dataclasses.replace(job, run=dataclasses.replace(job.run, backend=backend))
    with montecarlo.observe() as calls:
        _sync(x)
        start = time.perf_counter()
        results = evaluate_batch(spec, model, x, point_ids, registries=timed_regs, raise_errors=True)
        _sync(x)
        whole = time.perf_counter() - start
    mc = sum(c.seconds for c in calls)
    names = {c.backend for c in calls}
    info = {"whole_s": whole, "attack_s": timed.seconds, "montecarlo_s": mc, "other_s": whole - timed.seconds - mc,
            "mc_samples": sum(c.samples for c in calls), "mc_calls": len(calls),
            "screened": sum(c.screened for c in calls),
            "exit_saved": sum(c.last_layer_saved for c in calls),
            "bf16_samples": sum(c.bf16_samples for c in calls), "rechecked": sum(c.rechecked for c in calls),
            "precision": ",".join(sorted({c.precision for c in calls})) or "-",
            "backend": ",".join(sorted(names)) or backend}
    return info, [r.metrics for r in results]


def margin_rows(cfg: RunConfig, regs: Registries, backends: Sequence[str], *, repeats: int = 2,
                peaks: dict[str, float] | None = None, progress: Any = None,
                between: Any = None) -> list[MarginRow]:
    """Run the margin job of ``cfg`` on each of its models with each backend, ``repeats`` times,
    backends interleaved (order rotated per repetition). Every metric of every point must be identical
    across backends and repetitions; ``between()`` (if given) runs after each run
    (the CLI re-measures the GEMM peak there: on a shared machine one window can be slow). Raises AssertionError when two runs of a model
    give different margins, intervals or sample counts."""
    from robbench.runner import load_data, select_points

    job = margin_job(cfg, regs)
    data = load_data(cfg, regs)
    point_ids = [int(p) for p in select_points(data, cfg.points, cfg.points_seed())]
    x = data.test_x[point_ids].to(cfg.device)
    rows: list[MarginRow] = []
    for label, model in trained_models(cfg, regs, data):
        flops, last = linear_flops(model)
        warm_up(model, x[:1], backends)
        reference: tuple[str, list[dict[str, Any]]] | None = None
        for rep in range(repeats):
            order = list(backends[rep % len(backends):]) + list(backends[:rep % len(backends)])
            for name in order:
                info, metrics = run_margin_once(job, model, x, point_ids, name, regs)
                missing = [k for k in MARGIN_KEYS if k not in metrics[0]]
                if missing:
                    raise RuntimeError(f"the margin job's rows lack {missing}; got {sorted(metrics[0])}")
                got = [dict(m) for m in metrics]  # every metric: identical decisions give identical rows
                if reference is None:
                    reference = (name, got)
                elif got != reference[1]:
                    bad = next(i for i, (a, b) in enumerate(zip(got, reference[1])) if a != b)
                    raise AssertionError(f"{label}: backend {name} (repeat {rep}) gives point {point_ids[bad]} "
                                         f"{got[bad]}, backend {reference[0]} gave {reference[1][bad]}")
                screened = info["screened"]
                # executed: every decoded sample's hidden layers, the last layers not skipped (screen, early
                # exit) and the fp32 recomputations of bf16-pass samples the band left undecided
                gflop = (flops * info["mc_samples"] - last * (screened + info["exit_saved"])
                         + last * info["rechecked"]) / 1e9
                gflops = gflop / info["montecarlo_s"] if info["montecarlo_s"] > 0 else 0.0
                peak = (peaks or {}).get("bf16" if info["bf16_samples"] else "fp32")
                samples = [m.get("samples") or 0 for m in metrics]
                row = MarginRow(label, info["backend"], rep, len(point_ids), info["whole_s"], info["attack_s"],
                                info["montecarlo_s"], info["other_s"], sum(samples) / max(1, len(samples)),
                                info["mc_samples"], info["mc_calls"], info["precision"],
                                screened / info["mc_samples"] if info["mc_samples"] else 0.0, gflop, gflops, peak,
                                None, [m.get("margin") for m in metrics],
                                info["exit_saved"] / info["mc_samples"] if info["mc_samples"] else 0.0,
                                last * info["bf16_samples"] / 1e9)
                row.peak_fraction = peak_fraction(row, peaks or {})
                rows.append(row)
                if progress is not None:
                    progress(row)
                if between is not None:
                    between()
    return rows


def summarize(rows: Sequence[MarginRow], reference: str = "torch") -> dict[str, dict[str, Any]]:
    """Per (model, backend): median and range of whole / attack / Monte Carlo seconds over the repetitions,
    and the ratio of the reference's median to this backend's (Monte Carlo and whole)."""
    out: dict[str, dict[str, Any]] = {}
    keys = sorted({(r.model, r.backend) for r in rows}, key=lambda k: (k[0], k[1] != reference, k[1]))
    med = {}
    for model, backend in keys:
        sel = [r for r in rows if r.model == model and r.backend == backend]
        stats = {}
        for field in ("whole_s", "attack_s", "montecarlo_s", "other_s", "gflops"):
            vals = sorted(getattr(r, field) for r in sel)
            stats[field] = {"median": _median(vals), "min": vals[0], "max": vals[-1]}
        med[(model, backend)] = stats
        out[f"{model} / {backend}"] = stats
    for (model, backend), stats in med.items():
        ref = med.get((model, reference))
        if ref is not None:
            stats["montecarlo_ratio"] = ref["montecarlo_s"]["median"] / max(stats["montecarlo_s"]["median"], 1e-12)
            stats["whole_ratio"] = ref["whole_s"]["median"] / max(stats["whole_s"]["median"], 1e-12)
    return out


def _median(vals: Sequence[float]) -> float:
    vals = sorted(vals)
    n = len(vals)
    return math.nan if n == 0 else (vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2]))


SCREENED_NOTE = ("screened: share of the Monte Carlo samples the Lipschitz screen decided; the cpp engine runs it "
                 "adaptively (screen=\"auto\": skipped after calls where it decided < 1/8), so the share depends "
                 "on the earlier calls on the same model (warm-up, earlier repetitions); counts do not")


def render(rows: Sequence[MarginRow], peaks: dict[str, float], threads: int) -> Table:
    """One line per run: split, samples per point, executed GFLOP/s and % of the measured peak."""
    table = Table(title=f"robbench margin benchmark ({threads} threads; measured GEMM peak: "
                        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()) + ")",
                  caption=SCREENED_NOTE)
    for head in ("model", "backend", "rep", "points", "whole [s]", "attack [s]", "Monte Carlo [s]", "other [s]",
                 "samples/point", "precision", "screened", "exit skip", "GFLOP/s (MC)", "% peak"):
        table.add_column(head, justify="left" if head in ("model", "backend", "precision") else "right")
    for r in rows:
        table.add_row(r.model, r.backend, str(r.repeat), str(r.points), f"{r.whole_s:.2f}", f"{r.attack_s:.2f}",
                      f"{r.montecarlo_s:.2f}", f"{r.other_s:.2f}", f"{r.samples_per_point:,.0f}", r.precision,
                      f"{100 * r.screened_fraction:.1f}%", f"{100 * r.exit_saved_fraction:.0f}%", f"{r.gflops:.1f}",
                      "-" if r.peak_fraction is None else f"{100 * r.peak_fraction:.0f}%")
    return table


def render_summary(summary: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="median (min-max) over repetitions; ratio = torch median / this backend's median")
    for head in ("model / backend", "whole [s]", "attack [s]", "Monte Carlo [s]", "MC ratio", "whole ratio"):
        table.add_column(head, justify="left" if head == "model / backend" else "right")

    def span(d: dict[str, float]) -> str:
        return f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"

    for key, s in summary.items():
        table.add_row(key, span(s["whole_s"]), span(s["attack_s"]), span(s["montecarlo_s"]),
                      f"{s['montecarlo_ratio']:.2f}x" if "montecarlo_ratio" in s else "-",
                      f"{s['whole_ratio']:.2f}x" if "whole_ratio" in s else "-")
    return table


def margin_config(path: Path | None) -> RunConfig:
    """The main command's configuration (defaults of ``robbench run``), with a YAML file's keys on top."""
    from robbench.config import build_config, load_yaml

    return build_config(load_yaml(path) if path else {})
