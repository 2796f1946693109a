"""Leaderboards: views over a run's result database, built from the columns estimators declare.

``leaderboard_rows`` aggregates the stored per-point results into one record per (model
configuration, attack); which metrics appear, how they summarise (mean, interval, counts, correlation)
and how they format comes from each estimator's :class:`~robbench.protocols.MetricColumn` declarations,
so a third-party estimator's columns appear like the built-in ones and this module names no metric.
The ``render_*`` functions are pure formatters of those records (rich table, Markdown, CSV, JSON) with
fixed headers and number formats. Uncertainty sits next to each estimate.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from scipy import stats as scipy_stats

from robbench.atomic import replace_texts
from robbench.protocols import MetricColumn
from robbench.settings import RunSettings
from robbench.stats import pearson_and_slope
from robbench.store import ResultRow, ResultStore

Declarations = dict[str, list[MetricColumn]]  # estimator name -> the columns it declares


@dataclass(frozen=True)
class DisplayColumn:
    """A rendered column: the record key, its heading and format ("s" text, "ci" an interval whose
    ends are ``<key>_lo`` / ``<key>_hi`` formatted with ``spec``)."""

    key: str
    header: str
    format: str
    spec: str = ""


# The harness's own columns (not metrics): before and after the estimators' columns.
HEAD = [DisplayColumn("model", "model", "s"), DisplayColumn("attack", "attack", "s")]
TAIL = [DisplayColumn("test_elbo", "test ELBO", ".1f"), DisplayColumn("seeds", "seeds", "d"),
        DisplayColumn("points", "points", "d"), DisplayColumn("failed", "failed", "d"),
        DisplayColumn("seconds", "wall s", ".1f")]


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval over points; a single value gets an interval of NaN width."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def clustered_mean_ci(values: dict[tuple[int, int], float], level: float = 0.95
                      ) -> tuple[float, float, float, str]:
    """Mean over points and an interval that respects the design: points are nested in trained networks
    (seeds), so with >= 2 seeds the interval is the Student-t interval over the per-seed means (the
    network is the unit; df = seeds - 1); with one seed it is the t interval over points, which speaks
    for that one network only. values: {(seed, point): value}. Returns (mean, lo, hi, unit)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for (seed, _), v in values.items():
        by_seed[seed].append(v)
    mean = sum(values.values()) / len(values)
    if len(by_seed) < 2:
        _, lo, hi = mean_ci(list(values.values()), level)
        return mean, lo, hi, "point"
    _, lo, hi = mean_ci([sum(v) / len(v) for v in by_seed.values()], level)
    return mean, lo, hi, "seed"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


# --- declarations ------------------------------------------------------------------------------
def registered_declarations(names: Iterable[str] | None = None) -> Declarations:
    """The columns the registered estimators declare (all, or those in ``names`` that are registered)."""
    from robbench.plugins import get_registries

    estimators = get_registries().estimators
    wanted = estimators.names() if names is None else [n for n in names if n in estimators]
    return {n: list(getattr(estimators.get(n), "columns", ()) or ()) for n in wanted}


def merged_columns(declarations: Declarations) -> list[MetricColumn]:
    """One column per key (the first declaration wins), ordered by ``order`` then first appearance."""
    seen: dict[str, MetricColumn] = {}
    for columns in declarations.values():
        for col in columns:
            seen.setdefault(col.key, col)
    ranked = sorted(enumerate(seen.values()), key=lambda item: (item[1].order, item[0]))
    return [col for _, col in ranked]


def display_columns(declarations: Declarations, confidence: float = RunSettings.confidence) -> list[DisplayColumn]:
    """Every column a leaderboard of these estimators may show, in display order."""
    level = f"{100 * confidence:.10g}"  # :g rounded 99.99999999 to "100"
    metric = [DisplayColumn(c.key, c.header.replace("{level}", level), "ci" if c.aggregation == "ci" else c.format,
                            c.format) for c in merged_columns(declarations)]
    return HEAD + metric + TAIL


# --- aggregation -------------------------------------------------------------------------------
def leaderboard_rows(rows: list[ResultRow], models: dict[str, dict[str, Any]] | None = None,
                     declarations: Declarations | None = None,
                     confidence: float = RunSettings.confidence) -> list[dict[str, Any]]:
    """Aggregate per-point results into one record per (model label, attack label), best first by the
    ranking column (the one declared with ``rank=True``), then by model label. ``declarations``:
    estimator -> columns (default: what the registered estimators of these rows declare)."""
    if declarations is None:
        declarations = registered_declarations(sorted({r.estimator for r in rows}))
    columns = merged_columns(declarations)
    readers = {col.key: {name for name, cols in declarations.items() if any(c.key == col.key for c in cols)}
               for col in columns}
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
        for i, attack in enumerate(attacks):
            group = shared + [r for r in model_rows if r.attack == attack and attack]
            # Rows of attack-free estimators appear in every attack's record (their metrics belong to the
            # model), but their failures and time are counted once, on the first record.
            rec = _structure(model, attack, group, elbos.get(model), count_shared=i == 0)
            ok = [r for r in group if r.status == "ok"]
            failed_only = {r.estimator for r in group} - {r.estimator for r in ok}
            for col in columns:
                rec.update(_aggregate(col, [r for r in ok if r.estimator in readers[col.key]], ok, confidence,
                                      readers[col.key] & failed_only))
            records.append(rec)
    return sorted(records, key=_ranking(columns))


def _structure(model: str, attack: str, group: list[ResultRow], elbos: list[float] | None,
               count_shared: bool = True) -> dict[str, Any]:
    ok = [r for r in group if r.status == "ok"]
    counted = group if count_shared else [r for r in group if r.attack]
    rec: dict[str, Any] = {"model": model, "attack": attack or "—",
                           "seeds": len({r.model_seed for r in group}),
                           "points": len({(r.model_seed, r.point_id) for r in ok}),
                           "failed": sum(r.status != "ok" for r in counted),
                           "seconds": sum(r.seconds for r in counted)}
    errors = sorted({r.error for r in counted if r.error})
    if errors:
        rec["errors"] = errors
    if elbos:
        rec["test_elbo"] = sum(elbos) / len(elbos)
    return rec


def _aggregate(col: MetricColumn, rows: list[ResultRow], ok: list[ResultRow], confidence: float,
               failed_only: set[str] = frozenset()) -> dict[str, Any]:
    """The record entries of one column over the ok rows of the estimators declaring it ({} when none).
    ``failed_only``: declaring estimators whose every row of the record failed."""
    reporting = sorted({r.estimator for r in rows if col.metric in r.metrics})
    declaring = sorted(set(reporting) | failed_only)
    source = None
    if len(declaring) > 1:
        # several estimators report this column's metric (damage and likelihood both report "damage", each at
        # its own radius): a point would get one value from each and the last row would win, so the column
        # depended on the order of --estimators. It holds the values of the first such estimator by name.
        # Where every row of that one failed, the next one's values are shown but marked "(from NAME)"
        # (<key>_from): never another estimator's quantity silently under the same header.
        chosen = declaring[0] if declaring[0] in reporting or not reporting else reporting[0]
        source = chosen if chosen != declaring[0] else None
        rows = [r for r in rows if r.estimator == chosen]
    if not rows:
        return {}
    out = _aggregate_rows(col, rows, ok, confidence)
    return {**out, f"{col.key}_from": source} if out and source else out


def _aggregate_rows(col: MetricColumn, rows: list[ResultRow], ok: list[ResultRow],
                    confidence: float) -> dict[str, Any]:
    if col.aggregation in ("mean", "ci", "median"):
        return _summary(col, rows, confidence)
    if col.aggregation == "count_true":
        return {col.key: sum(bool(r.metrics.get(col.metric)) for r in rows)}
    if col.aggregation == "tally":
        return _tally(col, rows)
    if col.aggregation == "count_missing":
        return {col.key: sum(_number(r.metrics.get(col.metric)) is None and not _infinite(col, r) for r in rows)}
    # pearson / slope / ratio / count_above against another estimator's metric, point by point
    xs = {(r.model_seed, r.point_id): _number(r.metrics.get(col.metric)) for r in rows}
    other_est, other_metric = col.paired
    ys = {(r.model_seed, r.point_id): _number(r.metrics.get(other_metric)) for r in ok if r.estimator == other_est}
    pairs = [(xs[k], ys[k]) for k in xs if xs[k] is not None and ys.get(k) is not None]
    if col.aggregation == "ratio":
        ratios = [x / y for x, y in pairs if y > 0]
        return {col.key: sum(ratios) / len(ratios)} if ratios else {}
    if col.aggregation == "count_above":
        return {col.key: sum(x > y for x, y in pairs)} if pairs else {}
    if len(pairs) < 3:
        return {}
    fit = pearson_and_slope([p[0] for p in pairs], [p[1] for p in pairs])
    if _number(fit.pearson) is None:
        return {}
    return {col.key: fit.pearson if col.aggregation == "pearson" else fit.slope}


def _tally(col: MetricColumn, rows: list[ResultRow]) -> dict[str, Any]:
    """"a 14, b 11": points per distinct text value, most frequent first; {} when there is none or every
    value is the row's own attack label (a single attack, not a portfolio)."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        value = r.metrics.get(col.metric)
        if isinstance(value, str):
            counts[value] += 1
    if not counts or set(counts) <= {r.attack for r in rows}:
        return {}
    return {col.key: ", ".join(f"{v} {n}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}


def _infinite(col: MetricColumn, row: ResultRow) -> bool:
    return col.infinite is not None and row.metrics.get(col.infinite[0]) == col.infinite[1]


def _summary(col: MetricColumn, rows: list[ResultRow], confidence: float) -> dict[str, Any]:
    """mean / ci / median of a column, censoring- and seed-aware (see :class:`MetricColumn`)."""
    values: dict[tuple[int, int], float] = {}
    censored = infinite = 0
    for r in rows:
        if col.censored is not None and r.metrics.get(col.censored):
            limit = _number(r.metrics.get(col.censored_value)) if col.censored_value else None
            if limit is not None:
                values[(r.model_seed, r.point_id)] = limit
                censored += 1
        elif _infinite(col, r):
            infinite += 1
        elif _number(r.metrics.get(col.metric)) is not None:
            values[(r.model_seed, r.point_id)] = float(r.metrics[col.metric])
    if col.aggregation == "mean" and infinite:
        return {col.key: math.inf}
    if not values:
        return {}
    flag = {f"{col.key}_lower_bound": True} if censored else {}
    if col.aggregation == "mean":
        return {col.key: sum(values.values()) / len(values), **flag}
    if col.aggregation == "median":
        ordered, n = sorted(values.values()), len(values)
        if censored >= n / 2:  # censored values sit at the top of the order: the median is unknown
            return {col.key: None}
        return {col.key: ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])}
    _, lo, hi, unit = clustered_mean_ci(values, confidence)
    return {f"{col.key}_lo": lo, f"{col.key}_hi": math.inf if censored else hi, f"{col.key}_unit": unit}


def _ranking(columns: list[MetricColumn]):
    rank = next((c for c in columns if c.rank), None)
    sign = -1.0 if rank is None or rank.direction != "lower" else 1.0

    def key(rec: dict[str, Any]) -> tuple:
        value = rec.get(rank.key) if rank is not None else None
        return (value is None, sign * (value or 0.0), rec["model"])
    return key


# --- rendering ---------------------------------------------------------------------------------
def _visible(records: list[dict[str, Any]], columns: list[DisplayColumn]) -> list[DisplayColumn]:
    def present(col: DisplayColumn) -> bool:
        probe = f"{col.key}_lo" if col.format == "ci" else col.key
        return any(probe in rec for rec in records)
    return [col for col in columns if present(col)]


def _columns_for(records: list[dict[str, Any]], columns: list[DisplayColumn] | None) -> list[DisplayColumn]:
    return _visible(records, columns if columns is not None else display_columns(registered_declarations()))


def _cell(rec: dict[str, Any], col: DisplayColumn) -> str:
    text = _value_cell(rec, col)
    source = rec.get(f"{col.key}_from")  # the first declaring estimator's rows all failed: say whose values
    return f"{text} (from {source})" if source and text != "—" else text


def _value_cell(rec: dict[str, Any], col: DisplayColumn) -> str:
    if col.format == "ci":
        lo, hi = rec.get(f"{col.key}_lo"), rec.get(f"{col.key}_hi")
        if lo is None or not math.isfinite(lo):
            return "—"
        unit = " (seeds)" if rec.get(f"{col.key}_unit") == "seed" else ""
        end = "∞)" if hi is None or math.isinf(hi) else f"{hi:{col.spec}}]"
        return f"[{lo:{col.spec}}, {end}{unit}"
    value = rec.get(col.key)
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if col.format == "s":
        return str(value)
    # a restricted mean (censored points at their lower limit) is a lower bound of the mean
    return ("≥ " if rec.get(f"{col.key}_lower_bound") else "") + format(value, col.format)


def render_rich(records: list[dict[str, Any]], columns: list[DisplayColumn] | None = None,
                title: str = "robbench leaderboard") -> Table:
    table = Table(title=title, header_style="bold")
    cols = _columns_for(records, columns)
    for col in cols:
        table.add_column(col.header, justify="left" if col.format == "s" else "right",
                         no_wrap=col.format in ("s", "ci"))
    for rec in records:
        table.add_row(*(escape(_cell(rec, col)) for col in cols))
    return table


def table_cells(records: list[dict[str, Any]], columns: list[DisplayColumn] | None = None
                ) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headers, formatted cells per record, which columns are text) of the visible columns: what every
    table renderer (here and in reports) lays out."""
    cols = _columns_for(records, columns)
    return [c.header for c in cols], [[_cell(rec, c) for c in cols] for rec in records], [c.format == "s" for c in cols]


def render_markdown(records: list[dict[str, Any]], columns: list[DisplayColumn] | None = None) -> str:
    head, cells, text = table_cells(records, columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(":---" if t else "---:" for t in text) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def render_csv(records: list[dict[str, Any]], columns: list[DisplayColumn] | None = None) -> str:
    keys = []
    for col in _columns_for(records, columns):
        keys += [f"{col.key}_lo", f"{col.key}_hi", f"{col.key}_unit"] if col.format == "ci" else [col.key]
        for extra in ("lower_bound", "from"):
            if any(f"{col.key}_{extra}" in rec for rec in records):
                keys.append(f"{col.key}_{extra}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


LEADERBOARD_FORMAT = "robbench-leaderboard/1"


def render_json(records: list[dict[str, Any]], provenance: dict[str, Any] | None = None) -> str:
    """{"format", "settings", "models", "environment", "rows": [one record per model and attack]}; the
    provenance parts are null for a run directory written before they were recorded. In the rows +inf
    (an open interval end, an unbounded bound) is written as the string "inf", NaN as null."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return None if isinstance(v, float) and math.isnan(v) else v
    clean = [{k: plain(v) for k, v in rec.items()} for rec in records]
    prov = provenance or {}
    doc = {"format": LEADERBOARD_FORMAT, "settings": prov.get("settings"), "run": prov.get("run"),
           "models": prov.get("models"), "environment": prov.get("environment"), "rows": clean}
    return json.dumps(doc, indent=2, default=str) + "\n"


def latest_board(store: ResultStore) -> tuple[list[dict[str, Any]], list[DisplayColumn]]:
    """(records, display columns) of what the latest invocation asked for: its jobs, its points, its models."""
    latest = store.latest_run()
    if latest is None:
        rows, models = store.rows(), store.models()
    else:  # only what the latest invocation asked for: its jobs, its points, its models
        points, model_keys = set(latest.points), set(latest.model_keys)
        rows = [row for row in store.rows(latest.jobs) if row.point_id in points]
        # In planned order (jobs, then points), not the order rows were written: means are float sums, so
        # rows that came back from a remote executor, or a resumed run, in another order must not change
        # the last digits. The planned order is the order a fresh local run writes.
        job_at, point_at = {key: i for i, key in enumerate(latest.jobs)}, {p: i for i, p in enumerate(latest.points)}
        rows.sort(key=lambda row: (job_at[row.job_key], point_at[row.point_id]))
        models = {key: info for key, info in store.models().items() if key in model_keys}
    confidence = float((latest.config if latest else {}).get("confidence", RunSettings.confidence))
    declarations = store_declarations(store, {r.estimator for r in rows})
    return leaderboard_rows(rows, models, declarations, confidence), display_columns(declarations, confidence)


def sort_records(records: list[dict[str, Any]], declarations: Declarations) -> list[dict[str, Any]]:
    """Leaderboard order (the declared ranking column, best first, then model) of records from anywhere."""
    return sorted(records, key=_ranking(merged_columns(declarations)))


def store_declarations(store: ResultStore, estimators: Iterable[str]) -> Declarations:
    """The columns recorded in the store for these estimators; estimators an older store has no record
    of fall back to what their registered plugin declares now."""
    names = sorted(set(estimators))
    recorded = store.columns()
    missing = [n for n in names if n not in recorded]
    return {**{n: recorded[n] for n in names if n in recorded}, **registered_declarations(missing)}


def write_leaderboard(store: ResultStore, run_dir: Path, *, console: Console | None = None,
                      write_files: bool = True) -> list[dict[str, Any]]:
    """Aggregate the latest configuration's results in ``store``, write leaderboard.{md,csv,json} (unless
    ``write_files`` is False) and print the board to ``console`` when given."""
    records, columns = latest_board(store)
    run_dir = Path(run_dir)
    # All three files are written to temporaries first and renamed only then, so a kill leaves the
    # previous complete set (or, mid-rename, files of two consecutive boards), never a missing file.
    texts = {"leaderboard.md": render_markdown(records, columns), "leaderboard.csv": render_csv(records, columns),
             "leaderboard.json": render_json(records, store.provenance())}
    if write_files:
        replace_texts(run_dir, texts, fault="leaderboard-write")
    latest = store.latest_run()
    models = {k: v for k, v in store.models().items() if latest is None or k in set(latest.model_keys)}
    if console is not None:
        console.print(render_rich(records, columns, title=f"robbench leaderboard — {run_dir}"))
        failures = [(rec["model"], rec["attack"], err) for rec in records for err in rec.get("errors", [])]
        for model, attack, err in failures:
            console.print(f"[red]failed rows for {escape(model)} / {escape(attack)}: {escape(err)}[/red]")
        no_elbo = missing_elbo(store, latest, models)
        if no_elbo:
            console.print(f"[yellow]note: test ELBO not shown for {', '.join(map(escape, no_elbo))}: "
                          f"the store's models table has no record of {'it' if len(no_elbo) == 1 else 'them'}"
                          f"{' (the table is missing)' if 'models' in store.missing_tables else ''}; "
                          "rerun the same `robbench run` command to record it again[/yellow]")
    return records


def missing_elbo(store: ResultStore, latest: Any, models: dict[str, dict[str, Any]]) -> list[str]:
    """Model labels of the latest invocation that have result rows but no record in the models table."""
    if latest is None:
        return []
    recorded = {info.get("model") for info in models.values()}
    labels = sorted({row.model for row in store.rows(latest.jobs)})
    return [label for label in labels if label not in recorded]
