"""The paper's claims, checked against a run's stored results.

Each check takes the per-point result rows (``ResultRow`` from :mod:`robbench.store`, any number of run
directories merged) and returns a :class:`Claim` whose verdict and evidence are computed from those rows
only: per-configuration means with 95% Student-t intervals, Spearman rank correlations, paired
differences. A claim whose data the run lacks is reported as ``not tested in this run`` together with
what would test it.

Verdicts:
- trends (R, sigma, ||J_mu||_F, likelihood vs beta or tau): points are nested in trained networks
  (seeds), so the unit of the trend test is the network: *supported* when the Spearman correlation
  between the parameter and the per-network mean agrees with the claimed direction at p < 0.05 (with a
  single network per configuration the points are the units, and the evidence says so: it then speaks
  for those networks only); *partly supported* when the configuration means lean the claimed way
  (Spearman of the means in the claimed direction) without a significant trend; otherwise *not
  supported*. Per-configuration intervals are over per-seed means (see
  :func:`robbench.leaderboard.clustered_mean_ci`). Censored margins (R >= cap) enter at the cap: rank
  tests treat them as the largest values, which they are.
- mu- vs sigma-attacks: *supported* when, for every model, the paired mean damage difference
  (route mu minus route sigma, same points) has a 95% interval above 0; *partly supported* when the
  mean of mu exceeds sigma for most models; otherwise *not supported*.
- bound vs margin: *supported* when the pooled Pearson rho >= 0.5 with p < 0.05 and the median rho
  within one configuration is >= 0.5 too; *partly supported* when the pooled rho > 0 with p < 0.05;
  otherwise *not supported*. Identical configurations reached by two families (the sigma-offset VAE with
  tau = 0 is the beta = 1 VAE: same networks, same numbers) are counted once in the pooled statistics.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from scipy import stats as scipy_stats

from robbench.leaderboard import clustered_mean_ci, mean_ci
from robbench.store import ResultRow

SUPPORTED = "supported"
PARTLY = "partly supported"
NOT_SUPPORTED = "not supported"
NOT_TESTED = "not tested in this run"

PointKey = tuple[int, int]  # (model_seed, point_id)


@dataclass
class Claim:
    """One claim of the paper and what this run says about it."""

    key: str
    statement: str
    verdict: str
    evidence: str                     # the numbers, in one or two sentences
    table: list[dict[str, Any]] = field(default_factory=list)  # per-configuration numbers behind it


# --- labels ------------------------------------------------------------------------------------
_LABEL = re.compile(r"^(?P<name>[^()]+?)(?:\((?P<params>.*)\))?$")


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """``beta_vae(beta=1.0)`` -> (``beta_vae``, {"beta": 1.0}); values are floats where they parse."""
    match = _LABEL.match(label.strip())
    if not match:
        return label, {}
    params: dict[str, Any] = {}
    for part in (match.group("params") or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            try:
                params[key.strip()] = float(value)
            except ValueError:
                params[key.strip()] = value.strip()
    return match.group("name").strip(), params


def model_info(rows: Iterable[ResultRow]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Model label -> (family, parameters) as the store keeps them beside the label; rows from stores
    older than that fall back to :func:`parse_label`."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for row in rows:
        if row.model not in out or (row.model_family is not None and out[row.model][0] != row.model_family):
            if row.model_family is not None:
                params = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                          for k, v in (row.model_params or {}).items()}
                out[row.model] = (row.model_family, params)
            else:
                out.setdefault(row.model, parse_label(row.model))
    return out


def attack_route(label: str) -> str | None:
    """The max_damage route of an attack label: ``max_damage(route=mu)`` -> mu; plain ``max_damage`` -> both."""
    name, params = parse_label(label)
    if name != "max_damage":
        return None
    return str(params.get("route", "both"))


# --- selecting per-point values ----------------------------------------------------------------
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _value(row: ResultRow, metric: str) -> float | None:
    """The metric's number; a censored margin (R >= cap, stored as None) counts as its cap."""
    if metric == "margin" and row.metrics.get("censored"):
        return _number(row.metrics.get("margin_lo"))
    return _number(row.metrics.get(metric))


def preferred_attack(labels: Iterable[str]) -> str | None:
    """The attack whose margins stand for a model: plain max_damage, else route both, else the first."""
    labels = sorted(set(labels))
    for want in ("max_damage", "max_damage(route=both)"):
        if want in labels:
            return want
    return labels[0] if labels else None


def point_values(rows: list[ResultRow], metric: str, estimators: tuple[str, ...],
                 attack: str | None = None) -> dict[str, dict[PointKey, float]]:
    """model label -> {(seed, point): value} for ``metric`` from the first estimator in ``estimators``
    that has it for that model. ``attack`` None: attack-free rows, or for attacked estimators the
    model's :func:`preferred_attack`; otherwise that attack label exactly."""
    by_model: dict[str, list[ResultRow]] = defaultdict(list)
    for row in rows:
        if row.status == "ok" and row.estimator in estimators and _value(row, metric) is not None:
            by_model[row.model].append(row)
    out: dict[str, dict[PointKey, float]] = {}
    for model, model_rows in by_model.items():
        for est in estimators:
            chosen = [r for r in model_rows if r.estimator == est]
            if not chosen:
                continue
            labels = {r.attack for r in chosen}
            want = attack if attack is not None else ("" if "" in labels else preferred_attack(labels))
            values = {(r.model_seed, r.point_id): _value(r, metric) for r in chosen if r.attack == want}
            if values:
                out[model] = values
                break
    return out


# --- helpers -----------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _ci_text(mean: float, lo: float, hi: float) -> str:
    return f"{_fmt(mean)} [{_fmt(lo)}, {_fmt(hi)}]" if math.isfinite(lo) else f"{_fmt(mean)} [n=1]"


def _spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    res = scipy_stats.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def _pvalue_text(p: float) -> str:
    return "p=nan" if not math.isfinite(p) else (f"p={p:.2g}" if p >= 1e-4 else "p<1e-4")


# --- trend claims ------------------------------------------------------------------------------
def trend_claim(rows: list[ResultRow], *, key: str, statement: str, family: str, param: str,
                metric: str, estimators: tuple[str, ...], direction: int, symbol: str,
                how_to_test: str) -> Claim:
    """Does ``metric`` grow (direction +1) or shrink (-1) with the ``family``'s parameter ``param``?
    Tested with the network (training seed) as the unit when there are several per configuration."""
    values = point_values(rows, metric, estimators)
    info = model_info(rows)
    configs: dict[float, dict[tuple[str, int, int], float]] = defaultdict(dict)
    for model, points in values.items():
        name, params = info.get(model) or parse_label(model)
        if name == family and isinstance(params.get(param), float):
            configs[params[param]].update({(model, s, p): v for (s, p), v in points.items()})
    if len(configs) < 2:
        return Claim(key, statement, NOT_TESTED,
                     f"needs {metric} for at least two {family} configurations ({how_to_test}); "
                     f"this run has {len(configs)}.")
    levels = sorted(configs)
    table, networks = [], []
    for level in levels:
        by_net: dict[tuple[str, int], list[float]] = defaultdict(list)
        for (model, seed, _), v in configs[level].items():
            by_net[(model, seed)].append(v)
        mean, lo, hi, unit = clustered_mean_ci({(hash(k[:2]), k[2]): v for k, v in configs[level].items()})
        networks += [(level, sum(v) / len(v)) for v in by_net.values()]
        table.append({"config": f"{family}({param}={level:g})", param: level, "n": len(configs[level]),
                      "networks": len(by_net), "mean": mean, "lo": lo, "hi": hi, "ci_unit": unit})
    means = [t["mean"] for t in table]
    rho_means, _ = _spearman(levels, means)
    by_network = len(networks) > len(levels)  # some configuration has several trained networks
    if by_network:
        rho, p_value = _spearman([n[0] for n in networks], [n[1] for n in networks])
        unit_text = f"over {len(networks)} trained networks (per-seed means)"
    else:
        xs = [level for level in levels for _ in configs[level]]
        ys = [v for level in levels for v in configs[level].values()]
        rho, p_value = _spearman(xs, ys)
        unit_text = (f"over {len(ys)} points of one network per configuration (speaks for these networks "
                     "only; train several seeds to test the configurations)")
    significant = math.isfinite(rho) and direction * rho > 0 and p_value < 0.05
    if significant:
        verdict = SUPPORTED
    elif math.isfinite(rho_means) and direction * rho_means > 0:
        verdict = PARTLY
    else:
        verdict = NOT_SUPPORTED
    chain = ", ".join(f"{param}={t[param]:g}: {_ci_text(t['mean'], t['lo'], t['hi'])}" for t in table)
    claimed = "increasing" if direction > 0 else "decreasing"
    evidence = (f"mean {symbol} (95% CI{', over seeds' if by_network else ''}) by {param}: {chain}; claimed "
                f"{claimed}: Spearman of means {_fmt(rho_means)}, trend test {unit_text}: Spearman "
                f"{_fmt(rho)} ({_pvalue_text(p_value)}).")
    return Claim(key, statement, verdict, evidence, table)


# --- mu vs sigma attacks -----------------------------------------------------------------------
DAMAGE_ESTIMATORS = ("damage", "probability", "likelihood")


def damage_by_route(rows: list[ResultRow]) -> dict[str, dict[str, Any]]:
    """model -> {"_est": estimator, route: {(seed, point): damage}} for max_damage attacks, taking each
    model's damage from the first of DAMAGE_ESTIMATORS that has it (for any route)."""
    found: dict[tuple[str, str], dict[str, dict[PointKey, float]]] = defaultdict(dict)
    for row in rows:
        route = attack_route(row.attack)
        damage = _number(row.metrics.get("damage"))
        if row.status == "ok" and row.estimator in DAMAGE_ESTIMATORS and route is not None and damage is not None:
            found[(row.model, row.estimator)].setdefault(route, {})[(row.model_seed, row.point_id)] = damage
    out: dict[str, dict[str, Any]] = {}
    for model in sorted({model for model, _ in found}, key=label_sort_key):
        for est in DAMAGE_ESTIMATORS:  # the first estimator that measured this model speaks for it
            if (model, est) in found:
                out[model] = {"_est": est, **found[(model, est)]}
                break
    return out


def routes_claim(rows: list[ResultRow]) -> Claim:
    """Do attacks routed through mu do more damage than attacks routed through sigma (paper Fig. 4)?"""
    statement = "Attacks on the encoder mean μ do far more damage than attacks on σ."
    per_model = {m: e for m, e in damage_by_route(rows).items() if "mu" in e and "sigma" in e}
    table, ahead, clear = [], 0, 0
    for model, entry in per_model.items():
        common = sorted(set(entry["mu"]) & set(entry["sigma"]))
        if not common:
            continue
        diffs = [entry["mu"][k] - entry["sigma"][k] for k in common]
        mu_mean = sum(entry["mu"][k] for k in common) / len(common)
        sig_mean = sum(entry["sigma"][k] for k in common) / len(common)
        d_mean, d_lo, d_hi = mean_ci(diffs)
        rec = {"config": model, "estimator": entry["_est"], "n": len(common), "mu": mu_mean,
               "sigma": sig_mean, "diff": d_mean, "diff_lo": d_lo, "diff_hi": d_hi}
        if "both" in entry:
            both = [entry["both"][k] for k in common if k in entry["both"]]
            if both:
                rec["both"] = sum(both) / len(both)
        table.append(rec)
        ahead += mu_mean > sig_mean
        clear += math.isfinite(d_lo) and d_lo > 0
    if not table:
        return Claim("routes", statement, NOT_TESTED,
                     "needs attack damage for max_damage with route mu and route sigma on the same points "
                     "(estimator damage, attack_params: {max_damage: {route: [mu, sigma, both]}}).")
    if clear == len(table):
        verdict = SUPPORTED
    elif ahead > len(table) / 2:
        verdict = PARTLY
    else:
        verdict = NOT_SUPPORTED
    parts = [f"{t['config']}: μ {_fmt(t['mu'])} vs σ {_fmt(t['sigma'])}"
             + (f" (both {_fmt(t['both'])})" if "both" in t else "")
             + f", paired diff {_ci_text(t['diff'], t['diff_lo'], t['diff_hi'])}, n={t['n']}" for t in table]
    evidence = (f"mean damage by route; μ > σ in {ahead}/{len(table)} models, with the 95% interval of the "
                f"paired difference above 0 in {clear}/{len(table)}: " + "; ".join(parts) + ".")
    return Claim("routes", statement, verdict, evidence, table)


# --- bound vs margin ---------------------------------------------------------------------------
def bound_pairs(rows: list[ResultRow]) -> tuple[dict[str, list[tuple[float, float]]], int]:
    """model -> [(bound, margin)] over points with a non-vacuous bound and a margin; and the number of
    vacuous bounds among points that have a margin."""
    margins = point_values(rows, "margin", ("margin",))
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    vacuous = 0
    for row in rows:
        if row.status != "ok" or row.estimator != "bound":
            continue
        margin = margins.get(row.model, {}).get((row.model_seed, row.point_id))
        if margin is None:
            continue
        bound = _number(row.metrics.get("bound"))
        if bound is None:
            vacuous += 1
        else:
            pairs[row.model].append((bound, margin))
    return dict(pairs), vacuous


def bound_claim(rows: list[ResultRow]) -> Claim:
    statement = "The Theorem 1 bound correlates strongly with the empirical margin R."
    pairs, vacuous = bound_pairs(rows)
    pairs = distinct_configurations(pairs)
    pooled = [p for model in pairs for p in pairs[model]]
    if len(pooled) < 3:
        return Claim("bound", statement, NOT_TESTED,
                     "needs at least 3 points with both a non-vacuous bound and a margin (estimators bound and "
                     f"margin on the same models); this run has {len(pooled)} ({vacuous} vacuous).")
    table = []
    for model in sorted(pairs, key=label_sort_key):
        b, r = zip(*pairs[model])
        rho = _pearson(list(b), list(r))[0] if len(b) >= 3 else math.nan
        below = sum(bb <= rr for bb, rr in pairs[model])
        table.append({"config": model, "n": len(b), "pearson": rho, "bound_below_margin": below})
    rho, p = _pearson([p[0] for p in pooled], [p[1] for p in pooled])
    per_model_rho = sorted(t["pearson"] for t in table if math.isfinite(t["pearson"]))
    # pooling across configurations alone can make a correlation out of between-model differences, so
    # the typical correlation within one configuration (the paper's Fig. 6 panels) must be strong too
    median = per_model_rho[len(per_model_rho) // 2] if len(per_model_rho) % 2 else (
        sum(per_model_rho[len(per_model_rho) // 2 - 1:len(per_model_rho) // 2 + 1]) / 2 if per_model_rho else rho)
    if math.isfinite(rho) and rho >= 0.5 and p < 0.05 and median >= 0.5:
        verdict = SUPPORTED
    elif math.isfinite(rho) and rho > 0 and p < 0.05:
        verdict = PARTLY
    else:
        verdict = NOT_SUPPORTED
    below = sum(t["bound_below_margin"] for t in table)
    per_model = "; ".join(f"{t['config']}: ρ={_fmt(t['pearson'])} (n={t['n']})" for t in table)
    evidence = (f"pooled Pearson ρ={_fmt(rho)} ({_pvalue_text(p)}, n={len(pooled)}); median ρ within one "
                f"configuration {_fmt(median)}: {per_model}; "
                f"bound ≤ R at {below}/{len(pooled)} points; {vacuous} vacuous bounds left out.")
    return Claim("bound", statement, verdict, evidence, table)


def distinct_configurations(per_model: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Keep one of several model labels with identical per-point data: one configuration reached by two
    families (sigma_offset_vae(tau=0.0) is beta_vae(beta=1.0), trained and evaluated identically) must
    count once in pooled statistics. The first label in sort order is kept."""
    out: dict[str, list[Any]] = {}
    seen: list[list[Any]] = []
    for model in sorted(per_model, key=label_sort_key):
        data = sorted(per_model[model])
        if data in seen:
            continue
        seen.append(data)
        out[model] = per_model[model]
    return out


def _pearson(x: list[float], y: list[float]) -> tuple[float, float]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    res = scipy_stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def label_sort_key(label: str) -> tuple[str, tuple]:
    name, params = parse_label(label)
    return name, tuple(sorted((k, v if isinstance(v, float) else math.inf, str(v)) for k, v in params.items()))


# --- all claims --------------------------------------------------------------------------------
SIGMA_ESTIMATORS = ("encoder_stats", "bound")


def check_claims(rows: list[ResultRow]) -> list[Claim]:
    """Every claim the report states, in the paper's order."""
    beta_cfg = "models: [beta_vae] with beta: [0.1, 1, 10]"
    tau_cfg = "models: [sigma_offset_vae] with tau: [0, 0.1, 0.5, 1]"
    return [
        trend_claim(rows, key="R_beta", statement="The robustness margin R grows with β.", family="beta_vae",
                    param="beta", metric="margin", estimators=("margin",), direction=+1, symbol="R",
                    how_to_test=f"estimator margin, {beta_cfg}"),
        trend_claim(rows, key="R_tau", statement="The robustness margin R grows with the σ offset τ.",
                    family="sigma_offset_vae", param="tau", metric="margin", estimators=("margin",),
                    direction=+1, symbol="R", how_to_test=f"estimator margin, {tau_cfg}"),
        trend_claim(rows, key="sigma_beta", statement="The encoder σ grows with β.", family="beta_vae",
                    param="beta", metric="mean_sigma", estimators=SIGMA_ESTIMATORS, direction=+1,
                    symbol="σ(x)", how_to_test=f"estimator encoder_stats, {beta_cfg}"),
        trend_claim(rows, key="jacobian_beta", statement="The encoder Jacobian norm ‖J_μ‖_F shrinks with β.",
                    family="beta_vae", param="beta", metric="jacobian_frobenius", estimators=SIGMA_ESTIMATORS,
                    direction=-1, symbol="‖J_μ‖_F", how_to_test=f"estimator encoder_stats, {beta_cfg}"),
        routes_claim(rows),
        bound_claim(rows),
        trend_claim(rows, key="loglik_beta",
                    statement="The likelihood of x under an attacked embedding, log p(x|z*), grows with β "
                              "(at the largest attack norm L run).",
                    family="beta_vae", param="beta", metric="loglik_attack", estimators=("likelihood",),
                    direction=+1, symbol="log p(x|z*)", how_to_test=f"estimator likelihood, {beta_cfg}"),
    ]
