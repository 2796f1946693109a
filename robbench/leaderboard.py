"""Leaderboards: views over a run's result database.

``leaderboard_rows`` aggregates the stored per-point results into one record per (model
configuration, attack); the ``render_*`` functions are pure formatters of those records (rich table,
Markdown, CSV, JSON) with fixed headers and number formats. Uncertainty sits next to each estimate.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from scipy import stats as scipy_stats

from robbench.store import ResultRow, ResultStore

# (record key, header, format) in display order; a column is shown only when some record has it.
COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "s"),
    ("attack", "attack", "s"),
    ("margin_mean", "mean R", ".3f"),
    ("margin_ci", "R 95% CI", "ci"),
    ("undecided", "undecided", "d"),
    ("bound_mean", "mean bound", ".3f"),
    ("vacuous", "vacuous", "d"),
    ("pearson", "ρ(bound,R)", ".2f"),
    ("slope", "slope", ".2f"),
    ("damage_mean", "mean damage", ".2f"),
    ("min_sigma_mean", "mean min σ", ".4f"),
    ("mean_sigma_mean", "mean σ", ".4f"),
    ("jacobian_mean", "mean ‖J_μ‖_F", ".2f"),
    ("min_r_mean", "mean min r", ".3f"),
    ("loglik_attack_mean", "log p(x|z*) attack", ".1f"),
    ("degradation_attack_mean", "degradation attack", ".3f"),
    ("degradation_noise_mean", "degradation noise", ".3f"),
    ("test_elbo", "test ELBO", ".1f"),
    ("seeds", "seeds", "d"),
    ("points", "points", "d"),
    ("failed", "failed", "d"),
    ("seconds", "wall s", ".1f"),
]

_MEAN_METRICS = {"damage": "damage_mean", "min_sigma": "min_sigma_mean", "mean_sigma": "mean_sigma_mean",
                 "jacobian_frobenius": "jacobian_mean", "min_r": "min_r_mean",
                 "loglik_attack": "loglik_attack_mean", "degradation_attack": "degradation_attack_mean",
                 "degradation_noise": "degradation_noise_mean"}


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over points; a single value gets an interval of NaN width."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def leaderboard_rows(rows: list[ResultRow], models: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Aggregate per-point results into one record per (model label, attack label), sorted by mean R."""
    from robbench.stats import pearson_and_slope

    by_model: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        by_model[row.model].append(row)
    elbos: dict[str, list[float]] = defaultdict(list)
    for info in (models or {}).values():
        if _number(info.get("test_elbo")) is not None:
            elbos[info["model"]].append(info["test_elbo"])

    records = []
    for model, model_rows in by_model.items():
        shared = [r for r in model_rows if r.attack == ""]
        attacks = sorted({r.attack for r in model_rows if r.attack}) or [""]
        for attack in attacks:
            group = shared + [r for r in model_rows if r.attack == attack and attack]
            records.append(_aggregate(model, attack, group, elbos.get(model), pearson_and_slope))
    records.sort(key=lambda rec: (rec.get("margin_mean") is None, -(rec.get("margin_mean") or 0.0), rec["model"]))
    return records


def _aggregate(model: str, attack: str, group: list[ResultRow], elbos: list[float] | None,
               pearson_and_slope: Any) -> dict[str, Any]:
    ok = [r for r in group if r.status == "ok"]
    rec: dict[str, Any] = {"model": model, "attack": attack or "—",
                           "seeds": len({r.model_seed for r in group}),
                           "points": len({(r.model_seed, r.point_id) for r in ok}),
                           "failed": sum(r.status != "ok" for r in group),
                           "seconds": sum(r.seconds for r in group)}
    errors = sorted({r.error for r in group if r.error})
    if errors:
        rec["errors"] = errors
    margins = {(r.model_seed, r.point_id): _number(r.metrics.get("margin")) for r in ok if r.estimator == "margin"}
    margin_values = [v for v in margins.values() if v is not None]
    if margin_values:
        mean, lo, hi = mean_ci(margin_values)
        rec.update(margin_mean=mean, margin_lo=lo, margin_hi=hi,
                   undecided=sum(bool(r.metrics.get("undecided")) for r in ok if r.estimator == "margin"))
    bound_rows = [r for r in ok if r.estimator == "bound"]
    if bound_rows:
        bounds = {(r.model_seed, r.point_id): _number(r.metrics.get("bound")) for r in bound_rows}
        finite = [v for v in bounds.values() if v is not None]
        rec["vacuous"] = len(bounds) - len(finite)
        if finite:
            rec["bound_mean"] = sum(finite) / len(finite)
        pairs = [(bounds[k], margins[k]) for k in bounds if bounds[k] is not None and margins.get(k) is not None]
        if len(pairs) >= 3:
            fit = pearson_and_slope([p[0] for p in pairs], [p[1] for p in pairs])
            if _number(fit.pearson) is not None:
                rec.update(pearson=fit.pearson, slope=fit.slope)
    for metric, column in _MEAN_METRICS.items():
        values = [v for r in ok for v in [_number(r.metrics.get(metric))] if v is not None]
        if values:
            rec[column] = sum(values) / len(values)
    if elbos:
        rec["test_elbo"] = sum(elbos) / len(elbos)
    return rec


# --- rendering ---------------------------------------------------------------------------------
def _visible_columns(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    def present(key: str) -> bool:
        probe = "margin_mean" if key == "margin_ci" else key
        return any(probe in rec for rec in records)
    return [col for col in COLUMNS if present(col[0])]


def _cell(rec: dict[str, Any], key: str, fmt: str) -> str:
    if fmt == "ci":
        lo, hi = rec.get("margin_lo"), rec.get("margin_hi")
        return "—" if lo is None or not math.isfinite(lo) else f"[{lo:.3f}, {hi:.3f}]"
    value = rec.get(key)
    if value is None:
        return "—"
    return format(value, fmt) if fmt != "s" else str(value)


def render_rich(records: list[dict[str, Any]], title: str = "robbench leaderboard") -> Table:
    table = Table(title=title, header_style="bold")
    cols = _visible_columns(records)
    for _, header, fmt in cols:
        table.add_column(header, justify="left" if fmt == "s" else "right", no_wrap=fmt in ("s", "ci"))
    for rec in records:
        table.add_row(*(escape(_cell(rec, key, fmt)) for key, _, fmt in cols))
    return table


def render_markdown(records: list[dict[str, Any]]) -> str:
    cols = _visible_columns(records)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join(":---" if f == "s" else "---:" for _, _, f in cols) + "|"]
    lines += ["| " + " | ".join(_cell(rec, k, f) for k, _, f in cols) + " |" for rec in records]
    return "\n".join(lines) + "\n"


def render_csv(records: list[dict[str, Any]]) -> str:
    keys = [k for k, _, f in _visible_columns(records) if f != "ci"]
    if any("margin_mean" in rec for rec in records):
        keys[keys.index("margin_mean") + 1:keys.index("margin_mean") + 1] = ["margin_lo", "margin_hi"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def render_json(records: list[dict[str, Any]]) -> str:
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
             for rec in records]
    return json.dumps(clean, indent=2) + "\n"


def write_leaderboard(store: ResultStore, run_dir: Path, *,
                      console: Console | None = None) -> list[dict[str, Any]]:
    """Aggregate the latest configuration's results in ``store`` and write leaderboard.{md,csv,json}."""
    latest = store.latest_run()
    if latest is None:
        rows, models = store.rows(), store.models()
    else:  # only what the latest invocation asked for: its jobs, its points, its models
        points, model_keys = set(latest.points), set(latest.model_keys)
        rows = [row for row in store.rows(latest.jobs) if row.point_id in points]
        models = {key: info for key, info in store.models().items() if key in model_keys}
    records = leaderboard_rows(rows, models)
    run_dir = Path(run_dir)
    (run_dir / "leaderboard.md").write_text(render_markdown(records))
    (run_dir / "leaderboard.csv").write_text(render_csv(records))
    (run_dir / "leaderboard.json").write_text(render_json(records))
    if console is not None:
        console.print(render_rich(records, title=f"robbench leaderboard — {run_dir}"))
        failures = [(rec["model"], rec["attack"], err) for rec in records for err in rec.get("errors", [])]
        for model, attack, err in failures:
            console.print(f"[red]failed rows for {escape(model)} / {escape(attack)}: {escape(err)}[/red]")
    return records
