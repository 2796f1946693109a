"""Both sides of every point's margin: R_cert <= R_true <= R (attack), next to the Theorem 1 bound.

``sandwich_points(rows)`` joins a run's per-point results of the ``certified``, ``margin`` and ``bound``
estimators by (model, seed, point); ``summarise`` gives the per-configuration means, the ratio R_cert / R
and the number of points where the certificate would exceed the attack margin (which must be 0);
``draw_sandwich`` plots them per point (one panel per model configuration).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from robbench.store import ResultRow


@dataclass
class SandwichPoint:
    """One (model, seed, point): ``r_cert`` (certified, None if the certified estimator did not run),
    ``margin`` with its interval [margin_lo, margin_hi] (the smallest over attacks, None if absent),
    ``bound`` (Theorem 1, None if vacuous or absent), the certificate's ``status`` and ``method``."""

    model: str
    seed: int
    point: int
    r_cert: float | None = None
    status: str | None = None
    method: str | None = None
    margin: float | None = None
    margin_lo: float | None = None
    margin_hi: float | None = None
    bound: float | None = None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def sandwich_points(rows: Iterable[ResultRow]) -> dict[str, list[SandwichPoint]]:
    """Per model label, the joined points that have at least a certificate or a margin, sorted by margin."""
    points: dict[tuple[str, int, int], SandwichPoint] = {}
    for row in rows:
        if row.status != "ok" or row.estimator not in ("certified", "margin", "bound"):
            continue
        key = (row.model, row.model_seed, row.point_id)
        pt = points.setdefault(key, SandwichPoint(*key))
        met = row.metrics
        if row.estimator == "certified":
            pt.r_cert, pt.status, pt.method = _num(met.get("r_cert")), met.get("r_cert_status"), met.get("r_cert_method")
        elif row.estimator == "bound":
            pt.bound = _num(met.get("bound"))
        else:  # several attacks: the smallest margin is the tightest upper estimate
            margin = _num(met.get("margin"))
            if margin is not None and (pt.margin is None or margin < pt.margin):
                pt.margin, pt.margin_lo, pt.margin_hi = margin, _num(met.get("margin_lo")), _num(met.get("margin_hi"))
    out: dict[str, list[SandwichPoint]] = defaultdict(list)
    for pt in points.values():
        if pt.r_cert is not None or pt.margin is not None:
            out[pt.model].append(pt)
    for pts in out.values():
        pts.sort(key=lambda p: (p.margin is None, p.margin or 0.0, p.seed, p.point))
    return dict(out)


@dataclass
class SandwichSummary:
    """Per configuration: means over points having both R_cert and R; ``ratio``: mean of R_cert / R;
    ``violations``: points with R_cert > R (must be 0); ``methods``: how often each bound was the tightest."""

    points: int
    mean_r_cert: float
    mean_margin: float
    ratio: float
    min_ratio: float
    max_ratio: float
    violations: int
    vacuous: int
    mean_bound: float | None
    methods: dict[str, int]


def summarise(points: list[SandwichPoint]) -> SandwichSummary | None:
    """Summary over the points with both sides (None when there are none)."""
    both = [p for p in points if p.r_cert is not None and p.margin is not None and p.margin > 0]
    if not both:
        return None
    ratios = [p.r_cert / p.margin for p in both]
    bounds = [p.bound for p in both if p.bound is not None]
    return SandwichSummary(
        points=len(both), mean_r_cert=sum(p.r_cert for p in both) / len(both),
        mean_margin=sum(p.margin for p in both) / len(both), ratio=sum(ratios) / len(ratios),
        min_ratio=min(ratios), max_ratio=max(ratios), violations=sum(p.r_cert > p.margin for p in both),
        vacuous=sum(p.status == "vacuous" for p in both), mean_bound=sum(bounds) / len(bounds) if bounds else None,
        methods=dict(Counter(p.method for p in both if p.method)))


def draw_sandwich(groups: dict[str, list[SandwichPoint]], path: Path) -> Path:
    """One panel per configuration; points on the x axis sorted by R. Black: attack margin R with its
    interval; green triangle: R_cert; orange cross: Theorem 1 bound; grey line: the gap R_cert..R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    cols = min(n, 3) or 1
    rows = math.ceil(n / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax, (model, pts) in zip(flat, groups.items()):
        xs = list(range(len(pts)))
        for x, p in zip(xs, pts):
            if p.r_cert is not None and p.margin is not None:
                ax.plot([x, x], [p.r_cert, p.margin], color="0.75", linewidth=1, zorder=1)
        with_margin = [(x, p) for x, p in zip(xs, pts) if p.margin is not None]
        if with_margin:
            lo = [p.margin - (p.margin_lo if p.margin_lo is not None else p.margin) for _, p in with_margin]
            hi = [(p.margin_hi if p.margin_hi is not None else p.margin) - p.margin for _, p in with_margin]
            ax.errorbar([x for x, _ in with_margin], [p.margin for _, p in with_margin], yerr=[lo, hi], fmt="o",
                        color="black", markersize=3, elinewidth=0.8, label="R (attack)", zorder=3)
        cert = [(x, p.r_cert) for x, p in zip(xs, pts) if p.r_cert is not None]
        if cert:
            ax.scatter(*zip(*cert), marker="^", color="tab:green", s=18, label="R_cert", zorder=4)
        thm = [(x, p.bound) for x, p in zip(xs, pts) if p.bound is not None]
        if thm:
            ax.scatter(*zip(*thm), marker="x", color="tab:orange", s=18, label="Theorem 1", zorder=4)
        summary = summarise(pts)
        title = model if summary is None else f"{model}\nR_cert/R = {summary.ratio:.2f} (n={summary.points})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("points, sorted by R")
        ax.set_ylabel("radius (input L2)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle("R_cert ≤ R_true ≤ R: certified radius, attack margin and Theorem 1 bound per point")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
