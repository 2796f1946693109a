"""``robbench report``: a self-contained report of one or several run directories.

``write_report(path)`` reads every run directory at or below ``path`` (a directory holding
``results.sqlite``; the reproduce command writes one per experiment, e.g. ``DIR/beta``, ``DIR/tau``),
merges their results, checks the paper's claims (:mod:`robbench.claims`), draws the analogue of each
paper figure whose data exist (:mod:`robbench.figures`) and writes ``path/report/report.md`` (PNG files
beside it) and ``path/report/report.html`` (the same content with the PNGs embedded, one file).
A figure whose data the run lacks is replaced by a line saying which estimator/config would produce it.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from robbench.paper import figures
from robbench.paper.claims import (Claim, attack_route, bound_pairs, check_claims, damage_by_route, label_sort_key,
                             parse_label, point_values, preferred_attack)
from robbench.locks import pid_alive
from robbench.rundir import RunDirError
from robbench.settings import RunSettings
from robbench.inputrange import to_range
from robbench.store import ResultRow, ResultStore

REPORT_DIR = "report"
MAX_RECON_POINTS = 4


# --- loading and merging run directories -----------------------------------------------------------
@dataclass
class RunData:
    """Everything the report reads, merged over run directories."""

    run_dirs: list[Path]
    rows: list[ResultRow]                                   # ok and error rows, one per (job, point)
    models: dict[str, dict[str, Any]]                       # model_key -> info (test ELBO, ...)
    configs: list[dict[str, Any]]                           # every recorded RunConfig (as dicts)
    job_config: dict[str, dict[str, Any]] = field(default_factory=dict)   # job key -> its RunConfig
    arrays: dict[str, dict[int, Path]] = field(default_factory=dict)      # job key -> point -> .pt file
    dir_configs: dict[Path, list[dict[str, Any]]] = field(default_factory=dict)  # run dir -> its RunConfigs
    job_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # job key -> merged estimator params
    columns: dict[str, list[Any]] = field(default_factory=dict)  # estimator -> recorded leaderboard columns
    model_dirs: dict[str, Path] = field(default_factory=dict)  # model_key -> the run dir that recorded it
    # run dir -> each invocation's (recorded, provenance record, result rows it wrote), oldest first
    provenance: dict[Path, list[tuple[float, dict[str, Any], int]]] = field(default_factory=dict)
    ran_with: dict[Path, list[dict[str, dict[str, int]]]] = field(default_factory=dict)  # store.ran_with_history
    superseded: int = 0  # stored rows of superseded jobs, left out (see latest_rows)

    @property
    def ok(self) -> list[ResultRow]:
        return [r for r in self.rows if r.status == "ok"]


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, and every run directory below it (sorted)."""
    path = Path(path)
    found = sorted({p.parent for p in path.rglob(ResultStore.FILENAME)})
    if not found:
        raise FileNotFoundError(f"{path} holds no {ResultStore.FILENAME} (nor does any directory below it): "
                                "is it a robbench run directory?")
    return found


def latest_rows(store: ResultStore, data: RunData) -> list[ResultRow]:
    """The store's rows less those of superseded jobs: of the jobs with the same model, training seed,
    estimator, attack, estimator parameters and run seed (they differ in other run settings such as r, or in
    the algorithm version), only the one the latest invocation listed counts (ties: the one written last).
    Without this the report mixed, point by point, the results of two settings in one mean. The rows left
    out are counted in ``data.superseded``."""
    jobs = store.job_params()
    listed: dict[str, int] = {}
    for index, run in enumerate(store.runs()):  # oldest first
        for key in run.jobs:
            listed[key] = index

    def identity(row: ResultRow) -> tuple:
        job = jobs.get(row.job_key)
        if job is None:  # a store without the job's record: nothing to compare, the job stays
            return ("job", row.job_key)
        return (row.model, row.model_seed, row.estimator, row.attack,
                json.dumps(job.get("params"), sort_keys=True, default=str), (job.get("run") or {}).get("seed"))

    rows = store.rows()  # rowid order: a row written later comes later
    newest: dict[tuple, tuple[int, int, str]] = {}
    for position, row in enumerate(rows):
        rank = (listed.get(row.job_key, -1), position, row.job_key)
        ident = identity(row)
        if ident not in newest or rank > newest[ident]:
            newest[ident] = rank
    kept = [row for row in rows if newest[identity(row)][2] == row.job_key]
    data.superseded += len(rows) - len(kept)
    return kept


def load_runs(path: Path) -> RunData:
    """Merge the run directories at or below ``path``. A (job, point) result found twice keeps an ok row."""
    run_dirs = find_run_dirs(path)
    rows: dict[tuple[str, int], ResultRow] = {}
    data = RunData(run_dirs, [], {}, [])
    for run_dir in run_dirs:
        store = ResultStore.open_existing(run_dir)
        try:
            for row in latest_rows(store, data):
                key = (row.job_key, row.point_id)
                if key not in rows or (rows[key].status != "ok" and row.status == "ok"):
                    rows[key] = row
            models = store.models()
            data.models.update(models)
            data.model_dirs.update({key: run_dir for key in models})
            data.job_params.update({key: job["params"] for key, job in store.job_params().items()})
            data.columns.update(store.columns())
            data.provenance[run_dir] = store.provenance_history()
            data.ran_with[run_dir] = store.ran_with_history()
            for run in store.runs():
                data.configs.append(run.config)
                data.dir_configs.setdefault(run_dir, []).append(run.config)
                for job in run.jobs:
                    data.job_config[job] = run.config
        finally:
            store.close()
        arrays_root = run_dir / "arrays"
        if arrays_root.is_dir():
            for job_dir in sorted(arrays_root.iterdir()):
                files = {int(f.name[:-3]): f for f in job_dir.glob("*.pt") if f.name[:-3].isdigit()}
                if files:
                    data.arrays.setdefault(job_dir.name, {}).update(files)
    data.rows = list(rows.values())
    return data


# --- figure data -------------------------------------------------------------------------------------
def _family(label: str) -> str:
    return parse_label(label)[0]


def _by_family(models: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for model in sorted(models, key=label_sort_key):
        out[_family(model)].append(model)
    return dict(out)


def _run_m(data: RunData) -> float:
    ms = {float(c.get("m", RunSettings.m)) for c in data.configs}
    return ms.pop() if len(ms) == 1 else RunSettings.m


def recon_examples(data: RunData) -> dict[str, list[figures.ReconExample]]:
    """Stored attacked inputs: per model, the job with arrays x, x_adv, recon_adv (margin jobs first,
    the model's preferred attack, lowest seed), up to MAX_RECON_POINTS points."""
    import torch

    jobs: dict[str, list[ResultRow]] = defaultdict(list)
    for row in data.ok:
        if row.job_key in data.arrays:
            jobs[row.job_key].append(row)
    candidates: dict[str, list[tuple[tuple, str]]] = defaultdict(list)
    for job_key, job_rows in jobs.items():
        first = job_rows[0]
        route = attack_route(first.attack)
        rank = (first.estimator != "margin", route not in (None, "both"), first.model_seed, first.attack)
        candidates[first.model].append((rank, job_key))
    out: dict[str, list[figures.ReconExample]] = {}
    for model in sorted(candidates, key=label_sort_key):
        for _, job_key in sorted(candidates[model]):
            margins = {r.point_id: r.metrics.get("margin") for r in jobs[job_key]}
            examples = []
            for point, file in sorted(data.arrays[job_key].items())[:MAX_RECON_POINTS]:
                try:
                    arrays = torch.load(file, weights_only=True)
                except Exception:  # a damaged file only loses its own panel
                    continue
                if not all(k in arrays for k in ("x", "x_adv", "recon_adv")):
                    continue
                x, x_adv = arrays["x"].float(), arrays["x_adv"].float()
                note = f"‖δ‖={float((x_adv - x).flatten().norm()):.2f}"
                if isinstance(margins.get(point), (int, float)):
                    note += f"\nR={margins[point]:.2f}"
                recon_adv = arrays["recon_adv"].float()
                recon = arrays["recon"].float() if "recon" in arrays else None
                if "input_range" in arrays:  # images of a model with a declared range: shown mapped onto [0, 1]
                    box = tuple(float(v) for v in arrays["input_range"])
                    x, x_adv, recon_adv = (to_range(t, box, (0.0, 1.0)) for t in (x, x_adv, recon_adv))
                    if recon is not None:
                        recon = to_range(recon, box, (0.0, 1.0))
                examples.append(figures.ReconExample(x.numpy(), x_adv.numpy(), recon_adv.numpy(), note,
                                                     recon.numpy() if recon is not None else None))
            if examples:
                out[model] = examples
                break
    return out


def sweep_groups(data: RunData) -> dict[str, dict[str, list[figures.SweepCurve]]]:
    """panel title -> model -> one SweepCurve per (seed, point) from the sweep estimator. The title is the
    model family; where a family was swept along several attacks' directions (e.g. max_damage and the
    random ``noise`` direction of paper Fig. 7 left), one panel per attack, titled "family — attack"."""
    rows = [r for r in data.ok if r.estimator == "sweep" and isinstance(r.metrics.get("sweep_p"), list)]
    margins = point_values(data.ok, "margin", ("margin",))
    per_model: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        per_model[row.model].append(row)
    out: dict[str, dict[str, list[figures.SweepCurve]]] = {}
    for family, models in _by_family(list(per_model)).items():
        present = {r.attack for model in models for r in per_model[model]}
        first = preferred_attack(present)
        attacks = sorted(present, key=lambda a: (a != first, a))
        for attack in attacks:
            group = {}
            for model in models:
                chosen = sorted((r for r in per_model[model] if r.attack == attack),
                                key=lambda r: (r.model_seed, r.point_id))
                if chosen:
                    group[model] = [figures.SweepCurve(
                        norms=r.metrics["sweep_norms"], p=r.metrics["sweep_p"], lo=r.metrics.get("sweep_p_lo"),
                        hi=r.metrics.get("sweep_p_hi"), crossing=r.metrics.get("sweep_crossing"),
                        margin=margins.get(model, {}).get((r.model_seed, r.point_id))) for r in chosen]
            out[family if len(attacks) == 1 else f"{family} — {attack} direction"] = group
    return out


def _likelihood_params(data: RunData, job_key: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The job's merged parameters as the store recorded them; for stores older than that record, the
    registered estimator's defaults with the run configuration's values."""
    if job_key in data.job_params:
        return data.job_params[job_key]
    config = data.job_config.get(job_key, {})
    return {**defaults, **(config.get("estimator_params", {}) or {}).get("likelihood", {})}


def _likelihood_defaults() -> dict[str, Any]:
    """The registered likelihood estimator's defaults ({} when it is not installed)."""
    from robbench.plugins import get_registries

    estimators = get_registries().estimators
    return dict(estimators.get("likelihood").defaults) if "likelihood" in estimators else {}


def likelihood_levels(data: RunData) -> dict[str, dict[float, dict[str, list[tuple[float, float, ResultRow]]]]]:
    """model -> attack radius L -> {"attack": [...], "noise": [...]} entries (level, value, row), from the
    likelihood jobs of each model's preferred attack; L and the noise sd come from each job's config."""
    defaults = _likelihood_defaults()
    rows = [r for r in data.ok if r.estimator == "likelihood"]
    per_model: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        per_model[row.model].append(row)
    out: dict[str, dict[float, dict[str, list]]] = {}
    for model, model_rows in per_model.items():
        want = preferred_attack({r.attack for r in model_rows})
        levels: dict[float, dict[str, list]] = defaultdict(lambda: {"attack": [], "noise": []})
        for row in model_rows:
            if row.attack != want:
                continue
            params = _likelihood_params(data, row.job_key, defaults)
            if "radius" not in params or "noise_sigma" not in params:
                continue  # an old store whose estimator is no longer installed: the levels are unknown
            radius, noise = float(params["radius"]), float(params["noise_sigma"])
            for kind, level, key in (("attack", radius, "loglik_attack"), ("noise", noise, "loglik_noise")):
                value = row.metrics.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    levels[radius][kind].append((level, float(value), row))
        out[model] = dict(levels)
    return out


def reference_radius(levels: dict[float, Any], default: float) -> float:
    """The attack radius whose likelihood results stand for a model: the estimator's default if run,
    else the radius closest to it."""
    return min(levels, key=lambda L: (abs(L - default), L))


def likelihood_curves_data(data: RunData) -> tuple[dict, dict, int]:
    """(noise, attack) mappings for figures.likelihood_curves, and the number of distinct levels."""
    noise: dict[str, dict[str, list[figures.LevelValues]]] = defaultdict(dict)
    attack: dict[str, dict[str, list[figures.LevelValues]]] = defaultdict(dict)
    n_levels = 0
    for model, levels in sorted(likelihood_levels(data).items(), key=lambda kv: label_sort_key(kv[0])):
        for kind, target in (("noise", noise), ("attack", attack)):
            grouped: dict[float, list[float]] = defaultdict(list)
            for entries in levels.values():
                for level, value, _ in entries[kind]:
                    grouped[level].append(value)
            if grouped:
                target[_family(model)][model] = [figures.LevelValues(lv, vals) for lv, vals in sorted(grouped.items())]
                n_levels = max(n_levels, len(grouped))
    return dict(noise), dict(attack), n_levels


def degradation_pairs(data: RunData) -> dict[str, list[tuple[float, float]]]:
    """model -> [(R, degradation_attack)] at the reference likelihood radius, paired by (seed, point)."""
    margins = point_values(data.ok, "margin", ("margin",))
    default = float(_likelihood_defaults().get("radius", math.inf))  # no default: the smallest radius run
    out: dict[str, list[tuple[float, float]]] = {}
    for model, levels in likelihood_levels(data).items():
        if model not in margins or not levels:
            continue
        ref = reference_radius(levels, default)
        pairs = []
        for _, _, row in levels[ref]["attack"]:
            deg = row.metrics.get("degradation_attack")
            r = margins[model].get((row.model_seed, row.point_id))
            if isinstance(deg, (int, float)) and math.isfinite(deg) and r is not None:
                pairs.append((r, float(deg)))
        if pairs:
            out[model] = pairs
    return dict(sorted(out.items(), key=lambda kv: label_sort_key(kv[0])))


@dataclass
class RowGroups:
    """The rows split by what they measure: ``main`` (the most common run seed and training settings:
    every figure, the leaderboard and the claims), ``retest`` (the main training settings with another run
    seed: the same points measured again with independent streams) and ``variants`` (other training
    settings, by a description of how they differ, e.g. "epochs 60, patience 5")."""

    main: list[ResultRow]
    retest: list[ResultRow] = field(default_factory=list)
    variants: dict[str, list[ResultRow]] = field(default_factory=dict)
    main_train: str = "null"  # the main runs' training settings (JSON)


def _train_difference(train: dict[str, Any], main: dict[str, Any]) -> str:
    keys = sorted(k for k in set(train) | set(main) if train.get(k) != main.get(k))
    return ", ".join(f"{k} {train.get(k)}" for k in keys) or "as the main runs"


def split_rows(data: RunData) -> RowGroups:
    """Split ``data.rows`` by (run seed, training settings) of the run that wrote them (see RowGroups).
    Rows whose run configuration was not recorded count as main."""
    def setup(row: ResultRow) -> tuple[Any, str]:
        cfg = data.job_config.get(row.job_key)
        if cfg is None:
            return None, "null"
        return cfg.get("seed"), json.dumps(cfg.get("train") or {}, sort_keys=True)

    counts: dict[tuple[Any, str], int] = defaultdict(int)
    for row in data.rows:
        counts[setup(row)] += 1
    if not counts:
        return RowGroups([])
    main_seed, main_train = max(counts, key=lambda k: (counts[k], str(k)))
    groups = RowGroups([], main_train=main_train)
    for row in data.rows:
        seed, train = setup(row)
        if seed is None or (seed, train) == (main_seed, main_train):
            groups.main.append(row)
        elif train == main_train:
            groups.retest.append(row)
        else:
            name = _train_difference(json.loads(train), json.loads(main_train))
            groups.variants.setdefault(name, []).append(row)
    return groups


def main_models(data: RunData, main_train: str) -> dict[str, dict[str, Any]]:
    """The trained models of run directories that ran with the main training settings (a directory of
    another training setting, e.g. tau_long, holds models with the same labels but other test ELBOs)."""
    def main_dir(run_dir: Path | None) -> bool:
        configs = data.dir_configs.get(run_dir, []) if run_dir is not None else []
        return not configs or any(json.dumps(c.get("train") or {}, sort_keys=True) == main_train for c in configs)
    return {key: info for key, info in data.models.items() if main_dir(data.model_dirs.get(key))}


def claim_rows(data: RunData) -> list[ResultRow]:
    """The rows the claims read: likelihood rows only at each model's largest attack radius (the paper's
    claim is about large L; results at several radii must not be pooled)."""
    keep: set[str] = set()
    for levels in likelihood_levels(data).values():
        if levels:
            keep |= {row.job_key for _, _, row in levels[max(levels)]["attack"]}
    return [r for r in data.rows if r.estimator != "likelihood" or r.job_key in keep]


DISTRIBUTION_QUANTITIES = (("R", "margin", ("margin",)),
                           ("mean σ(x)", "mean_sigma", ("encoder_stats", "bound")),
                           ("‖J_μ‖_F", "jacobian_frobenius", ("encoder_stats", "bound")))


def distribution_groups(data: RunData) -> dict[str, dict[str, dict[str, list[float]]]]:
    out: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    for name, metric, estimators in DISTRIBUTION_QUANTITIES:
        values = point_values(data.ok, metric, estimators)
        for model in sorted(values, key=label_sort_key):
            out[_family(model)][name][model] = list(values[model].values())
    return {k: dict(v) for k, v in out.items()}


# --- report blocks -------------------------------------------------------------------------------------
@dataclass
class Block:
    """One piece of the report: kind is h1, h2, p, table (head + rows of cells), image (path + caption)."""

    kind: str
    text: str = ""
    head: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    path: Path | None = None


@dataclass
class FigureSpec:
    """A paper figure: a title, what it shows, what would produce it, and how to draw it from RunData
    (returning None when the data are absent, else the PNG path and an extra caption sentence)."""

    name: str
    title: str
    caption: str
    needs: str
    draw: Callable[[RunData, Path], tuple[Path, str] | None]


def _draw_recon(data: RunData, path: Path) -> tuple[Path, str] | None:
    examples = recon_examples(data)
    if not examples:
        return None
    return figures.reconstructions(examples, path), (
        "Under each triple: the attack norm ‖δ‖ and, where measured, the margin R at that point. The margin "
        "estimator keeps the attack at the smallest radius it found not robust (just above R), so every "
        "reconstruction shows what a just-sufficient attack does; more robust models need visibly larger "
        "perturbations for the same effect.")


def _draw_routes(data: RunData, path: Path) -> tuple[Path, str] | None:
    found = damage_by_route(data.ok)
    damage = {m: {r: list(v.values()) for r, v in e.items() if r != "_est"} for m, e in found.items()}
    damage = {m: d for m, d in damage.items() if len(d) >= 2}
    if not damage:
        return None
    used = sorted({found[m]["_est"] for m in damage})
    return figures.damage_by_route(damage, path), f"Damage from estimator(s): {', '.join(used)}."


def _draw_sweeps(data: RunData, path: Path) -> tuple[Path, str] | None:
    groups = sweep_groups(data)
    if not groups:
        return None
    return figures.sweeps(groups, _run_m(data), path), ""


def _draw_bound(data: RunData, path: Path) -> tuple[Path, str] | None:
    pairs, vacuous = bound_pairs(data.ok)
    pairs = {m: pairs[m] for m in sorted(pairs, key=label_sort_key)}
    if not pairs:
        return None
    return figures.bound_vs_margin(pairs, path), f"{vacuous} points with a vacuous bound (p_r(x,0) ≤ m) are left out."


def _draw_degradation(data: RunData, path: Path) -> tuple[Path, str] | None:
    pairs = degradation_pairs(data)
    if not pairs:
        return None
    radius = _likelihood_defaults().get("radius")
    where = f"Attack norm L = {float(radius):g} where run (else the closest run)." if radius is not None else ""
    return figures.degradation_vs_margin(pairs, path), where


def _draw_likelihood(data: RunData, path: Path) -> tuple[Path, str] | None:
    noise, attack, n_levels = likelihood_curves_data(data)
    if not noise and not attack:
        return None
    extra = "" if n_levels > 1 else ("Only one perturbation level was run, so each curve is a single point; "
                                     "`robbench reproduce` runs several.")
    return figures.likelihood_curves(noise, attack, path), extra


def _draw_distributions(data: RunData, path: Path) -> tuple[Path, str] | None:
    groups = distribution_groups(data)
    if not groups:
        return None
    return figures.distributions(groups, path), ""


def _draw_sandwich(data: RunData, path: Path) -> tuple[Path, str] | None:
    from robbench.paper.sandwich import draw_sandwich, sandwich_points, summarise

    groups = sandwich_points(data.ok)
    groups = {m: groups[m] for m in sorted(groups, key=label_sort_key)
              if any(p.r_cert is not None for p in groups[m]) and any(p.margin is not None for p in groups[m])}
    if not groups:
        return None
    notes = []
    for model, pts in groups.items():
        s = summarise(pts)
        if s is not None:
            notes.append(f"{model}: mean R_cert {s.mean_r_cert:.3f}, mean R {s.mean_margin:.3f}, R_cert/R {s.ratio:.2f} "
                         f"(min {s.min_ratio:.2f}), R_cert > R at {s.violations} of {s.points} points")
    return draw_sandwich(groups, path), "; ".join(notes) + "."


FIGURES = [
    FigureSpec("fig1_8_reconstructions", "Fig. 1 / 8 — attacked inputs and their reconstructions",
               "Per point: the original input, its reconstruction g(μ(x)), the attacked input x + δ and the "
               "reconstruction of the attacked input. For margin jobs δ is the witness behind R_hi: the smallest-"
               "radius perturbation whose test found p_r ≤ m (‖δ‖ and R under it).",
               "estimator margin storing its arrays x, x_adv, recon_adv (config key keep_arrays > 0)", _draw_recon),
    FigureSpec("fig4_damage_by_route", "Fig. 4 — damage of attacks on μ, σ or both",
               "Distribution over points of the adversarial damage (L2 distance between the reconstruction of "
               "the attacked input and g(μ(x))) when the attack reaches only μ(x), only σ(x), or both.",
               "estimator damage with attack_params {max_damage: {route: [mu, sigma, both]}}", _draw_routes),
    FigureSpec("fig5_7left_sweep", "Fig. 5 / 7-left — p_r versus ‖δ‖ along a fixed direction",
               "For a fixed input and attack direction, the probability that a reconstruction falls within r of "
               "g(μ(x)) as the perturbation grows; the dashed line is m, the dotted verticals mark where p_r falls "
               "to m (the margin R along that direction); triangles: the margin R of the margin estimator (the worst "
               "direction its attack found). Panels titled “— noise direction” follow a random direction (attack "
               "noise), as the paper's Fig. 7 left.",
               "estimator sweep (with an attack, e.g. max_damage)", _draw_sweeps),
    FigureSpec("fig6abc_bound_vs_margin", "Fig. 6 a–c — Theorem 1 bound versus empirical margin",
               "Each dot is a network–input pair; orange: least-squares line; red: y = x (points above it "
               "have a margin larger than the bound); ρ: Pearson correlation.",
               "estimators margin and bound on the same models", _draw_bound),
    FigureSpec("fig6def_degradation_vs_margin", "Fig. 6 d–f — likelihood degradation versus R",
               "Relative log-likelihood degradation |log p(x|z*) − log p(x|z)| / |log p(x|z)| under a "
               "maximum-damage attack against the empirical margin of the same point.",
               "estimators margin and likelihood on the same models", _draw_degradation),
    FigureSpec("fig7_9b_likelihood", "Fig. 7 centre/right and 9b — likelihood under noise and under attack",
               "log p(x | z*) of the original x given the embedding z* = μ(x*) of a noisy (left) or attacked "
               "(right) x*, against the noise sd σ_ε and the attack norm L; mean ± sd over points.",
               "estimator likelihood, run at several radius / noise_sigma values", _draw_likelihood),
    FigureSpec("fig9acd_distributions", "Fig. 9 a/c/d — distributions of R, σ and ‖J_μ‖_F",
               "Distributions over points of the margin R, the encoder σ(x) (mean over latent dimensions) and "
               "the Frobenius norm of the encoder-mean Jacobian, by configuration.",
               "estimators margin and encoder_stats over a beta_vae / sigma_offset_vae sweep", _draw_distributions),
    FigureSpec("certified_sandwich", "Certified margins — R_cert ≤ R_true ≤ R per point",
               "For every point: the certified radius R_cert (green; holds over the whole L2 ball with the run "
               "confidence), the attack margin R (black, an upper estimate with its interval) and the paper's "
               "first-order Theorem 1 bound (orange, not a guarantee for a nonlinear encoder).",
               "estimators certified and margin (and bound) on the same models", _draw_sandwich),
]


def _config_summary(data: RunData) -> list[list[str]]:
    """One row per run directory: the union over the configurations recorded in it."""
    def union(configs: list[dict[str, Any]], key: str) -> str:
        return ", ".join(dict.fromkeys(str(v) for c in configs for v in (c.get(key) or [])))

    def params(configs: list[dict[str, Any]], key: str) -> str:
        seen = dict.fromkeys(json.dumps(c.get(key) or {}, sort_keys=True) for c in configs)
        return "; ".join(s for s in seen if s != "{}")

    cells = []
    for run_dir in data.run_dirs:
        configs = data.dir_configs.get(run_dir, [])
        if not configs:
            continue
        cells.append([str(run_dir), " ".join(filter(None, [union(configs, "models"), params(configs, "model_params")])),
                      " ".join(filter(None, [union(configs, "attacks"), params(configs, "attack_params")])),
                      " ".join(filter(None, [union(configs, "estimators"), params(configs, "estimator_params")])),
                      union([{"v": [c.get("points")]} for c in configs], "v"),
                      union([{"v": [c.get("model_seeds")]} for c in configs], "v"),
                      union([{"v": [f"r={c.get('r')}, m={c.get('m')}"]} for c in configs], "v"),
                      union([{"v": [(c.get("train") or {}).get("epochs")]} for c in configs], "v"),
                      _epochs_trained(data, run_dir), str(len(configs))])
    return cells


PROVENANCE_HEAD = ["run directory", "recorded (UTC)", "robbench (git commit)", "torch", "Python", "platform, CPU",
                   "device, threads", "backend", "ran (attack engine; Monte Carlo)", "seed, point seed",
                   "rows written"]


def _ran_cell(tally: dict[str, dict[str, int]]) -> str:
    """"compiled 8; cpp 16": what the invocation's ok rows ran with, per kind (robbench.ran_with), rows
    per name when several ran; "—" when its rows used neither (or it wrote none)."""
    from robbench.ran_with import ATTACK_ENGINE, MC_BACKEND

    unrecorded = sum((tally.get("") or {}).values())
    if unrecorded and not (tally.get(ATTACK_ENGINE) or tally.get(MC_BACKEND)):
        return f"not recorded ({unrecorded} row{'s' * (unrecorded != 1)})"  # rows stored before it was recorded
    parts = []
    for kind in (ATTACK_ENGINE, MC_BACKEND):
        names = tally.get(kind) or {}
        parts.append(next(iter(names)) if len(names) == 1 else
                     ", ".join(f"{n} {c} row{'s' * (c != 1)}" for n, c in sorted(names.items())) if names else "—")
    return "; ".join(parts) + (f"; not recorded ({unrecorded} row{'s' * (unrecorded != 1)})" if unrecorded else "")


def _provenance_cells(data: RunData) -> list[list[str]]:
    """One row per invocation of each run directory: what a reader needs to reproduce its rows (versions,
    commit, machine, threads, backend, seeds) and how many of the stored rows it wrote."""
    cells = []
    for run_dir in data.run_dirs:
        ran = data.ran_with.get(run_dir, [])
        for index, (recorded, info, written) in enumerate(data.provenance.get(run_dir, [])):
            env, run = info.get("environment") or {}, info.get("run") or {}
            git = env.get("git") or {}
            commit = (str(git.get("commit", ""))[:12] + (" (dirty)" if git.get("dirty") else "")) if git else "—"
            device = env.get("device") or {}
            seeds = f"{run.get('seed', '—')}, {run.get('point_seed', '— (not recorded)')}"
            cells.append([str(run_dir), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(recorded)),
                          f"{env.get('robbench', '—')} ({commit})",
                          str((env.get("torch") or {}).get("version", "—")),
                          str(env.get("python", "—")), f"{env.get('platform', '—')}, {device.get('cpu', '—')}",
                          f"{device.get('name', run.get('device', '—'))}, {device.get('threads', '—')}",
                          str(run.get("backend", "—")), _ran_cell(ran[index] if index < len(ran) else {}),
                          seeds, str(written)])
    return cells


def _epochs_trained(data: RunData, run_dir: Path) -> str:
    """The epochs the run directory's models actually trained ("12-31 of 60" when early stopping cut
    some short; "—" when none was recorded, e.g. ready-built models or checkpoints older than the record)."""
    infos = [info for key, info in data.models.items() if data.model_dirs.get(key) == run_dir]
    done = sorted(int(i["epochs_trained"]) for i in infos if isinstance(i.get("epochs_trained"), int))
    if not done:
        return "—"
    budgets = sorted({int(i["epochs"]) for i in infos if isinstance(i.get("epochs"), int)})
    span = f"{done[0]}" if done[0] == done[-1] else f"{done[0]}-{done[-1]}"
    return span + (f" of {budgets[-1]}" if budgets and done[0] < budgets[-1] else "")


def _leaderboard_blocks(data: RunData) -> list[Block]:
    from robbench.leaderboard import display_columns, leaderboard_rows, table_cells

    try:
        declarations = {**data.columns}
        declarations.update({k: v for k, v in _registered_columns(data).items() if k not in declarations})
        records = leaderboard_rows(data.rows, data.models, declarations, _run_confidence(data))
        head, cells, _ = table_cells(records, display_columns(declarations, _run_confidence(data)))
    except Exception as err:  # the report still shows the figures and claims
        return [Block("p", f"The leaderboard could not be built: {type(err).__name__}: {err}")]
    return [Block("table", head=head, cells=cells)]


def _registered_columns(data: RunData) -> dict[str, list[Any]]:
    from robbench.leaderboard import registered_declarations

    return registered_declarations(sorted({r.estimator for r in data.rows}))


def _run_confidence(data: RunData) -> float:
    levels = {float(c.get("confidence", RunSettings.confidence)) for c in data.configs}
    return levels.pop() if len(levels) == 1 else RunSettings.confidence


def build_blocks(data: RunData, out_dir: Path) -> tuple[list[Block], list[Claim]]:
    """The report's content; draws the figures into ``out_dir``."""
    blocks = [Block("h1", "robbench report"),
              Block("p", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from "
                         f"{len(data.run_dirs)} run "
                         f"director{'y' if len(data.run_dirs) == 1 else 'ies'}; {len(data.ok)} ok results, "
                         f"{len(data.rows) - len(data.ok)} failed. Paper: Camuto et al. 2021, “Towards a "
                         "Theoretical Understanding of the Robustness of Variational Autoencoders”."),
              Block("table", head=["run directory", "models", "attacks", "estimators", "points", "seeds",
                                   "r, m", "epochs", "epochs trained", "runs"], cells=_config_summary(data))]
    if data.superseded:
        blocks.append(Block("p", f"{data.superseded} stored rows were superseded and are left out: a later "
                                 "invocation in the same run directory ran the same model, estimator and attack "
                                 "with the same estimator parameters and run seed but other run settings (e.g. r) "
                                 "or another algorithm version; only that job's rows count."))
    provenance = _provenance_cells(data)
    if provenance:
        blocks += [Block("p", "Provenance: each invocation that wrote to these run directories, with what it ran "
                              "with (leaderboard.json holds the full record: package versions, settings)."),
                   Block("table", head=PROVENANCE_HEAD, cells=provenance)]
    groups = split_rows(data)
    extra = len(data.rows) - len(groups.main)
    # figures and the leaderboard: the main runs only (models trained otherwise have the same labels)
    data = dataclasses.replace(data, rows=groups.main, models=main_models(data, groups.main_train))
    claims = check_claims(claim_rows(data), retest=groups.retest, variants=groups.variants)
    blocks += [Block("h2", "The paper's claims in this run"),
               Block("p", "Verdicts are computed from the stored results: per-configuration means with 95% "
                          "Student-t intervals, Spearman rank correlations over points, paired differences. "
                          "See robbench/paper/claims.py for the exact rules."
                          + (f" {extra} rows of retest runs (another run seed: {len(groups.retest)}) and of other "
                             f"training settings ({', '.join(sorted(groups.variants)) or 'none'}) enter the claims "
                             "only; figures and the leaderboard show the main runs." if extra else "")),
               Block("table", head=["claim", "verdict", "evidence"],
                     cells=[[c.statement, c.verdict, c.evidence] for c in claims])]
    blocks += _claim_detail_blocks(claims)
    blocks += [Block("h2", "Figures")]
    for spec in FIGURES:
        blocks.append(Block("h3", spec.title))
        try:
            drawn = spec.draw(data, out_dir / f"{spec.name}.png")
        except Exception as err:  # one broken figure must not cost the others
            blocks.append(Block("p", f"Not drawn: {type(err).__name__}: {err}"))
            continue
        if drawn is None:
            blocks.append(Block("p", f"Not produced: this run has no data for it. It needs {spec.needs}."))
        else:
            png, extra = drawn
            blocks.append(Block("image", text=f"{spec.caption} {extra}".strip(), path=png))
    blocks += [Block("h2", "Leaderboard"),
               Block("p", f"Per (model configuration, attack): mean R with its {100 * _run_confidence(data):.10g}% interval over points and "
                          "seeds, and the means of the other estimators.")]
    blocks += _leaderboard_blocks(data)
    return blocks, claims


def _num(value: Any, spec: str = ".2f") -> str:
    return "—" if not isinstance(value, (int, float)) or not math.isfinite(value) else format(value, spec)


def _claim_detail_blocks(claims: list[Claim]) -> list[Block]:
    """Per-configuration tables behind the bound claim (reliability, corrected ρ, ρ with each factor) and
    behind the paired τ claims (per-seed means and paired differences)."""
    from robbench.paper.claims import BOUND_FACTORS

    blocks: list[Block] = []
    bound = next((c for c in claims if c.key == "bound" and c.table), None)
    if bound is not None:
        head = ["configuration", "n", "ρ(bound, R)", "rel(R)", "rel(bound)", "ρ corrected"]
        head += [f"ρ(R, {label})" for _, label in BOUND_FACTORS]
        cells = [[t["config"], str(t["n"]), _num(t["pearson"]), _num(t.get("reliability_R")),
                  _num(t.get("reliability_bound")), _num(t.get("pearson_corrected"))]
                 + [_num(t.get(f"pearson_{name}")) for name, _ in BOUND_FACTORS] for t in bound.table]
        blocks += [Block("h3", "Bound and margin within each configuration"),
                   Block("p", "Pearson correlations over the configuration's points (networks × inputs). rel: "
                              "test–retest reliability, the correlation between two measurements of the same "
                              "points with independent attack and Monte Carlo streams (— where no retest ran); "
                              "ρ corrected = ρ / √(rel(R) · rel(bound)). The last columns correlate R with each "
                              "factor of the bound min σ · (Φ⁻¹(p0) − Φ⁻¹(m)) / ‖J_μ‖_F."),
                   Block("table", head=head, cells=cells)]
    for claim in claims:
        if not claim.key.startswith(("R_tau_paired", "sweep_noise_tau")) or not claim.table:
            continue
        seeds = claim.table[0]["seeds"]
        head = ["configuration", "mean", "paired Δ (95% CI over seeds)", "seeds up"] + [
            f"seed {s}" for s in claim.table[0]["seed_ids"]]
        cells = [[t["config"], _num(t["mean"], ".3f"),
                  "—" if t is claim.table[0] else f"{_num(t['diff'], '.3f')} [{_num(t['diff_lo'], '.3f')}, "
                                                  f"{_num(t['diff_hi'], '.3f')}]",
                  "—" if t is claim.table[0] else f"{t['seeds_up']}/{seeds}"]
                 + [_num(v, ".3f") for v in t["per_seed"]] for t in claim.table]
        blocks += [Block("h3", f"Paired by seed: {claim.statement}"), Block("table", head=head, cells=cells)]
    return blocks


# --- rendering ---------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_md(blocks: list[Block], out_dir: Path) -> str:
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(b.kind[1]) + f" {b.text}")
        elif b.kind == "p":
            parts.append(b.text)
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.head) + " |", "|" + "|".join("---" for _ in b.head) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.cells]
            parts.append("\n".join(lines))
        elif b.kind == "image" and b.path is not None:
            parts.append(f"![{b.path.stem}]({b.path.relative_to(out_dir).as_posix()})\n\n*{b.text}*")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[Block]) -> str:
    """One self-contained HTML file: the PNGs are embedded as data URIs."""
    esc = html.escape
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in b.head)
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.cells)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{esc(b.path.stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(b.text)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;"
             "padding:3px 6px;vertical-align:top}img{max-width:100%}figcaption{font-style:italic}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>robbench report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


STAGING_PREFIX = ".staging-"


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the staging folders (``.staging-<pid>-<random>``) in ``out_dir`` whose writer is gone (a
    ``robbench report`` killed half-way); another live report's stays. Returns what was removed."""
    removed = []
    for folder in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def write_report(run_dir: Path, *, console: Console | None = None) -> Path:
    """Write ``run_dir/report/report.md`` (+ PNGs) and ``report.html`` for the run directory (or the
    directory of run directories) ``run_dir``; returns the path of report.md.

    Everything is drawn and rendered in a staging folder inside ``report/`` first and renamed into place
    only when all of it was written: a failure half-way (disk full) leaves the previous report whole."""
    run_dir = Path(run_dir)
    data = load_runs(run_dir)
    out_dir = run_dir / REPORT_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} is a file; the report is written into a folder of that name: move the file")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    # inside report/: the renames stay on one file system even where report/ links to another one; the
    # writer's pid in the name lets a later report recognise the folder of a killed one
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out_dir))
    try:
        blocks, claims = build_blocks(data, staging)
        texts = {"report.md": render_md(blocks, staging), "report.html": render_html(blocks)}
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        figure_names = {b.path.name for b in blocks if b.kind == "image" and b.path is not None}
        for name in sorted(figure_names) + list(texts):  # figures first: report.md never links a missing one
            os.replace(staging / name, out_dir / name)
        for old in out_dir.glob("*.png"):  # a figure whose data vanished must not linger
            if old.name not in figure_names:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    md_path = out_dir / "report.md"
    if console is not None:
        for claim in claims:
            color = {"supported": "green", "partly supported": "yellow", "not supported": "red"}.get(claim.verdict, "dim")
            console.print(f"[{color}]{claim.verdict:>22}[/{color}]  {claim.statement}")
        drawn = sum(b.kind == "image" for b in blocks)
        console.print(f"report: {md_path} and report.html ({drawn}/{len(FIGURES)} figures)")
    return md_path
