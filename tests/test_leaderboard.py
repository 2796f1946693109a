"""Leaderboard aggregation and rendering from stored rows (pure functions, hand-checked numbers)."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from robbench.leaderboard import leaderboard_rows, mean_ci, render_csv, render_json, render_markdown
from robbench.store import ResultRow


def _row(model, attack, estimator, point, metrics, status="ok", seed=0, error=None):
    return ResultRow("k-" + model + attack + estimator, point, model, seed, attack, estimator, status, metrics,
                     error, 0.5)


def _rows():
    rows = []
    for p, (margin, bound, sigma) in enumerate([(1.0, 0.5, 0.1), (2.0, 0.9, 0.2), (3.0, 1.6, 0.3)]):
        rows.append(_row("big", "max_damage", "margin", p, {"margin": margin, "undecided": 0}))
        rows.append(_row("big", "", "bound", p, {"bound": bound}))
        rows.append(_row("big", "", "encoder_stats", p, {"min_sigma": sigma, "jacobian_frobenius": 10.0}))
        rows.append(_row("small", "max_damage", "margin", p, {"margin": margin / 10, "undecided": int(p == 0)}))
        rows.append(_row("small", "", "bound", p, {"bound": None, "bound_status": "vacuous"}))
    rows.append(_row("small", "max_damage", "margin", 3, {}, status="error", error="boom"))
    return rows


def test_mean_ci_matches_student_t():
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))  # t_{0.975, 2} * sd / sqrt(n)
    assert math.isnan(mean_ci([5.0])[1])


def test_aggregates_per_model_and_attack():
    records = leaderboard_rows(_rows(), {"a": {"model": "big", "test_elbo": -100.0}})
    assert [r["model"] for r in records] == ["big", "small"]  # sorted by mean R
    big, small = records
    assert big["margin_mean"] == pytest.approx(2.0)
    assert big["bound_mean"] == pytest.approx(1.0)
    assert big["pearson"] == pytest.approx(0.9878291611472619)  # numpy.corrcoef([.5,.9,1.6],[1,2,3])
    assert big["min_sigma_mean"] == pytest.approx(0.2)
    assert big["test_elbo"] == -100.0 and big["points"] == 3 and big["failed"] == 0
    assert small["vacuous"] == 3 and "bound_mean" not in small and "pearson" not in small
    assert small["undecided"] == 1 and small["failed"] == 1 and small["errors"] == ["boom"]


def test_renderers_agree():
    records = leaderboard_rows(_rows())
    md = render_markdown(records)
    assert md.splitlines()[0].startswith("| model | attack | mean R | R 95% CI |")
    assert "| big | max_damage | 2.000 | [-0.484, 4.484] |" in md
    table = list(csv.DictReader(io.StringIO(render_csv(records))))
    assert float(table[0]["margin_mean_ci_lo"]) == pytest.approx(records[0]["margin_mean_ci_lo"])
    assert "margin_lo" not in table[0]  # the per-point bracket is not the interval of the mean
    assert json.loads(render_json(records))["rows"][1]["model"] == "small"


def test_columns_come_from_declarations_not_names():
    """A made-up estimator's declarations alone decide the columns, their order, format and ranking."""
    from robbench.leaderboard import display_columns
    from robbench.protocols import MetricColumn

    decl = {"speed": [MetricColumn("speed_mean", "mean speed", "speed", "mean", "lower", ".1f", rank=True),
                      MetricColumn("speed", "speed {level}% CI", "speed", "ci", "lower", ".2f"),
                      MetricColumn("stalled", "stalled", "stalled", "count_true", "lower", "d", order=1)]}
    rows = [_row(model, "", "speed", p, {"speed": v * (1 + p), "stalled": p == 0, "margin": 99.0})
            for model, v in (("slow", 10.0), ("fast", 1.0)) for p in range(3)]
    records = leaderboard_rows(rows, None, decl, confidence=0.9)
    assert [r["model"] for r in records] == ["fast", "slow"]  # direction "lower": the smallest first
    assert records[0]["speed_mean"] == pytest.approx(2.0) and records[0]["stalled"] == 1
    assert "margin_mean" not in records[0]  # not declared by this estimator: not a column
    lo, hi = records[0]["speed_lo"], records[0]["speed_hi"]
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - 2.0 == pytest.approx(2.919985580355516 / math.sqrt(3))
    md = render_markdown(records, display_columns(decl, 0.9))
    assert md.splitlines()[0] == "| model | attack | stalled | mean speed | speed 90% CI | seeds | points | failed | wall s |"
    assert f"| fast | — | 1 | 2.0 | [{lo:.2f}, {hi:.2f}] |" in md


def test_bad_declarations_are_rejected():
    from robbench.protocols import MetricColumn

    with pytest.raises(ValueError, match="unknown aggregation 'mode'"):
        MetricColumn("x", "x", "x", "mode")
    with pytest.raises(ValueError, match="paired"):
        MetricColumn("x", "x", "x", "pearson")
    col = MetricColumn("r", "ρ", "bound", "pearson", paired=("margin", "margin"))
    assert MetricColumn.from_dict(col.to_dict()) == col
    col = MetricColumn("m", "m", "margin", "mean", censored="censored", censored_value="margin_lo",
                       infinite=("status", "unbounded"))
    assert MetricColumn.from_dict(col.to_dict()) == col


def test_censored_points_are_never_averaged_as_values():
    """Two points robust at the cap 10: counted, the mean becomes a restricted mean shown as a lower
    bound with an open interval, the median stays exact (fewer than half censored)."""
    rows = [_row("m", "a", "margin", p, {"margin": v, "margin_lo": v - 0.1, "margin_hi": v + 0.1, "censored": False})
            for p, v in enumerate([1.0, 2.0, 3.0])]
    rows += [_row("m", "a", "margin", p, {"margin": None, "margin_lo": 10.0, "margin_hi": None, "censored": True})
             for p in (3, 4)]
    (rec,) = leaderboard_rows(rows)
    assert rec["censored"] == 2 and rec["margin_mean_lower_bound"]
    assert rec["margin_mean"] == pytest.approx((1 + 2 + 3 + 10 + 10) / 5)
    assert math.isinf(rec["margin_mean_ci_hi"]) and rec["margin_median"] == 3.0
    md = render_markdown([rec])
    assert "≥ 5.200" in md and ", ∞)" in md
    assert json.loads(render_json([rec]))["rows"][0]["margin_mean_ci_hi"] == "inf"
    # more than half censored: no median
    more = rows + [_row("m", "a", "margin", 5, {"margin": None, "margin_lo": 10.0, "censored": True})]
    assert leaderboard_rows(more)[0]["margin_median"] is None


def test_interval_of_the_mean_clusters_by_seed():
    """With several trained networks the interval is over per-seed means (the network is the unit)."""
    rows = [_row("m", "a", "margin", p, {"margin": base + 0.01 * p}, seed=seed)
            for seed, base in enumerate([1.0, 2.0, 3.0]) for p in range(20)]
    (rec,) = leaderboard_rows(rows)
    means = [1.095, 2.095, 3.095]
    assert rec["margin_mean_ci_unit"] == "seed"
    _, lo, hi = mean_ci(means)
    assert rec["margin_mean_ci_lo"] == pytest.approx(lo) and rec["margin_mean_ci_hi"] == pytest.approx(hi)
    _, lo_points, _ = mean_ci([r.metrics["margin"] for r in rows])
    assert rec["margin_mean_ci_lo"] < lo_points  # 60 "independent" points would claim far too much


def test_zero_jacobian_bound_is_infinite():
    rows = [_row("m", "", "bound", 0, {"bound": None, "bound_status": "unbounded", "bound_point": None}),
            _row("m", "", "bound", 1, {"bound": 0.5, "bound_status": "ok", "bound_point": 0.6})]
    (rec,) = leaderboard_rows(rows)
    assert math.isinf(rec["bound_mean"]) and rec["vacuous"] == 0
    assert "∞" in render_markdown([rec])


def test_portfolio_rows_count_which_attack_set_each_margin():
    """margin.portfolio=true: each stored row names the attack that set its margin (margin_attack); the
    leaderboard tallies them, most frequent first, and leaves the column out for a single attack."""
    label = "portfolio(max_damage+latent)"
    setters = ["latent", "max_damage", "latent", "latent", "max_damage"]
    rows = [_row("m", label, "margin", p, {"margin": 1.0 + p, "margin_attack": a}) for p, a in enumerate(setters)]
    rows += [_row("m", "max_damage", "margin", p, {"margin": 2.0 + p, "margin_attack": "max_damage"})
             for p in range(3)]
    records = {rec["attack"]: rec for rec in leaderboard_rows(rows)}
    assert records[label]["margin_set_by"] == "latent 3, max_damage 2"
    assert "margin_set_by" not in records["max_damage"]
    md = render_markdown(list(records.values()))
    assert "R set by" in md.splitlines()[0] and "| latent 3, max_damage 2 |" in md
    assert json.loads(render_json([records[label]]))["rows"][0]["margin_set_by"] == "latent 3, max_damage 2"
    assert "margin_set_by" in next(csv.DictReader(io.StringIO(render_csv([records[label]]))))


def test_the_interval_header_shows_the_confidence_it_was_computed_at():
    """confidence 0.9999999999 was headed 'R 100% CI' (six significant digits)."""
    from robbench.leaderboard import display_columns
    from robbench.plugins import get_registries

    margin = get_registries().estimators.get("margin")
    headers = {c.key: c.header for c in display_columns({"margin": margin.columns}, 0.9999999999)}
    assert "R 99.99999999% CI" in headers.values()
    headers = {c.key: c.header for c in display_columns({"margin": margin.columns}, 0.95)}
    assert "R 95% CI" in headers.values()


def test_a_column_two_estimators_declare_holds_one_estimators_values_whatever_the_order():
    """damage and likelihood both declare "mean damage", each at its own radius. Per point the value written
    last won, so the column held damage's mean (11.59) or likelihood's (2.55) on the same stored results
    depending only on the order of --estimators (seen on the main command's beta = 1 model, 5 points). It
    now takes the first declaring estimator by name that has rows: damage."""
    damage = [_row("m", "max_damage", "damage", p, {"damage": 10.0 + p}) for p in range(3)]
    likelihood = [_row("m", "max_damage", "likelihood", p, {"damage": 2.0 + p, "loglik_attack": -100.0})
                  for p in range(3)]
    for rows in (damage + likelihood, likelihood + damage):
        (rec,) = leaderboard_rows(rows)
        assert rec["damage_mean"] == pytest.approx(11.0)
    (rec,) = leaderboard_rows(likelihood)
    assert rec["damage_mean"] == pytest.approx(3.0)  # alone, likelihood's own damage fills it


def test_a_shared_column_says_whose_values_it_shows_when_its_first_estimators_rows_all_failed():
    """Every damage row of a record failed: the "mean damage" column silently took likelihood's damage
    (another quantity at another radius) under the same header. It now says so: "3.00 (from likelihood)",
    <key>_from (damage_mean_from) in the record, the CSV and the JSON. Where damage did not run at all, or
    some of its rows are ok, nothing is marked (those are the column's own values)."""
    damage = [_row("m", "max_damage", "damage", p, {}, status="error", error="boom") for p in range(3)]
    likelihood = [_row("m", "max_damage", "likelihood", p, {"damage": 2.0 + p, "loglik_attack": -100.0})
                  for p in range(3)]
    for rows in (damage + likelihood, likelihood + damage):
        (rec,) = leaderboard_rows(rows)
        assert rec["damage_mean"] == pytest.approx(3.0) and rec["damage_mean_from"] == "likelihood"
        assert rec["failed"] == 3
        assert "| 3.00 (from likelihood) |" in render_markdown([rec])
        (line,) = csv.DictReader(io.StringIO(render_csv([rec])))
        assert line["damage_mean_from"] == "likelihood"
        assert json.loads(render_json([rec]))["rows"][0]["damage_mean_from"] == "likelihood"
    (rec,) = leaderboard_rows(likelihood)
    assert "damage_mean_from" not in rec and "(from" not in render_markdown([rec])
    # one damage row ok, two failed: the column holds that one point's damage, never likelihood's
    damage[0] = _row("m", "max_damage", "damage", 0, {"damage": 10.0})
    (rec,) = leaderboard_rows(damage + likelihood)
    assert rec["damage_mean"] == pytest.approx(10.0) and "damage_mean_from" not in rec
