"""Matplotlib figures, one function per paper figure (Agg backend, no display needed).

Every function is pure: plain records in (lists, dicts, numpy arrays — see each docstring), one PNG
written to ``path``, ``path`` returned. They know nothing about the results database; the report
(:mod:`robbench.paper.report`) extracts the records. Model labels such as ``beta_vae(beta=1.0)`` are shown as
given; dictionaries are drawn in their iteration order (callers sort them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
ROUTE_COLORS = {"mu": "tab:red", "sigma": "tab:blue", "both": "tab:purple"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _grid(n: int, max_cols: int = 3, size: tuple[float, float] = (4.0, 3.2)) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def as_image(array: np.ndarray) -> np.ndarray:
    """A stored input/reconstruction as an image for imshow: (C, H, W) -> (H, W) or (H, W, 3);
    a flat (D,) with D a square -> (sqrt D, sqrt D). Values clipped to [0, 1]."""
    a = np.asarray(array, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim == 1:
        side = int(round(math.sqrt(a.size)))
        if side * side == a.size:
            a = a.reshape(side, side)
        elif a.size % 3 == 0 and round(math.sqrt(a.size // 3)) ** 2 == a.size // 3:
            side = int(round(math.sqrt(a.size // 3)))
            a = a.reshape(3, side, side)
        else:
            a = a.reshape(1, -1)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    return np.clip(a, 0.0, 1.0)


# --- Fig. 1 / 8: originals, attacked inputs, reconstructions -----------------------------------
@dataclass
class ReconExample:
    """One attacked point: the clean input x, the attacked input x + delta, its reconstruction and (when
    stored) the clean reconstruction g(mu(x)) (any shape :func:`as_image` accepts); ``note`` is printed
    under the attacked input (e.g. ||delta|| and R)."""

    x: np.ndarray
    x_adv: np.ndarray
    recon_adv: np.ndarray
    note: str = ""
    recon: np.ndarray | None = None


def reconstructions(examples: dict[str, list[ReconExample]], path: Path) -> Path:
    """Paper Fig. 1/8. One row per model; per point (original, its clean reconstruction when stored,
    attacked input, reconstruction of the attacked input) left to right, so the attack's effect is seen
    against what the model does without it; the note goes under the attacked input."""
    models = list(examples)
    points = max(len(v) for v in examples.values())
    clean = all(ex.recon is not None for v in examples.values() for ex in v)
    panels = 4 if clean else 3
    fig = plt.figure(figsize=((1.1 * panels) * points + 1.2, 1.45 * len(models) + 0.6))
    outer = fig.add_gridspec(len(models), points, wspace=0.12, hspace=0.45)
    titles = ("original", "recon.", "attacked", "recon. att.") if clean else ("original", "attacked", "recon.")
    for i, model in enumerate(models):
        for j in range(points):
            if j >= len(examples[model]):
                continue
            ex = examples[model][j]
            inner = outer[i, j].subgridspec(1, panels, wspace=0.04)
            arrays = (ex.x, ex.recon, ex.x_adv, ex.recon_adv) if clean else (ex.x, ex.x_adv, ex.recon_adv)
            for k, array in enumerate(arrays):
                ax = fig.add_subplot(inner[0, k])
                img = as_image(array)
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(titles[k], fontsize=7)
                if k == 0 and j == 0:
                    ax.set_ylabel(_short(model), fontsize=8)
                if k == panels - 2 and ex.note:
                    ax.set_xlabel(ex.note.replace("\n", "  "), fontsize=7)
    fig.suptitle("Originals, " + ("their reconstructions, " if clean else "") + "attacked inputs "
                 "and the reconstructions of the attacked inputs", y=0.95)
    return _save(fig, path)


# --- Fig. 4: damage by attack route --------------------------------------------------------------
def damage_by_route(damage: dict[str, dict[str, Sequence[float]]], path: Path) -> Path:
    """Paper Fig. 4. ``damage``: model -> route ("mu", "sigma", "both") -> per-point damage
    ||reconstruction(attacked) - g(mu(x))||_2. One violin per route, one panel per model."""
    fig, axes = _grid(len(damage))
    for ax, (model, routes) in zip(axes, damage.items()):
        names = [r for r in ("mu", "sigma", "both") if routes.get(r)] + \
                [r for r in routes if r not in ("mu", "sigma", "both") and routes[r]]
        data = [np.asarray(routes[r], dtype=float) for r in names]
        parts = ax.violinplot(data, showmedians=True)
        for body, name in zip(parts["bodies"], names):
            body.set_facecolor(ROUTE_COLORS.get(name, "tab:gray"))
            body.set_alpha(0.5)
        for k, values in enumerate(data, start=1):
            ax.scatter(np.full(len(values), k) + np.linspace(-0.08, 0.08, len(values)), values, s=6,
                       color=ROUTE_COLORS.get(names[k - 1], "k"), zorder=3)
        ax.set_xticks(range(1, len(names) + 1), [{"mu": "μ(x)", "sigma": "σ(x)", "both": "μ(x), σ(x)"}.get(n, n)
                                                 for n in names])
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("adversarial damage (L2)")
    fig.suptitle("Maximum-damage attacks routed through μ, σ or both (attack norm capped)")
    fig.tight_layout()
    return _save(fig, path)


# --- Fig. 5 / 7-left: p_r versus ||delta|| along a fixed direction ---------------------------------
@dataclass
class SweepCurve:
    """p_r(x, t * direction) over norms t for one point; lo/hi its interval; crossing: where p_r drops
    to m (None if it never does); margin: the bisection estimate of R at that point, if known."""

    norms: Sequence[float]
    p: Sequence[float]
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None
    crossing: float | None = None
    margin: float | None = None


def first_crossing(norms: Sequence[float], p: Sequence[float], m: float) -> float | None:
    """The first norm where the curve p falls to m or below, linearly interpolated; None if it never does."""
    for j, value in enumerate(p):
        if value <= m:
            if j == 0:
                return float(norms[0])
            t = (p[j - 1] - m) / (p[j - 1] - value)
            return float(norms[j - 1] + t * (norms[j] - norms[j - 1]))
    return None


def sweeps(groups: dict[str, dict[str, list[SweepCurve]]], m: float, path: Path) -> Path:
    """Paper Fig. 5 and 7-left. ``groups``: panel title (a model family) -> model label -> one
    SweepCurve per point (same norm grid). Per group two panels: left, one point (the first) per
    model with its interval band and the bisection margin R (triangle); right, the mean p_r over points
    with a +-1 sd band. The m line is dashed; dotted verticals mark where a curve falls to m (left: R
    along that point's direction; right: where the mean curve does)."""
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for (title, models), (ax_one, ax_mean) in zip(groups.items(), axes):
        colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(models), 1)))
        for color, (model, curves) in zip(colors, models.items()):
            first = curves[0]
            ax_one.plot(first.norms, first.p, color=color, label=model)
            if first.lo is not None and first.hi is not None:
                ax_one.fill_between(first.norms, first.lo, first.hi, color=color, alpha=0.2)
            if first.crossing is not None:
                ax_one.axvline(first.crossing, color=color, linestyle=":")
            if first.margin is not None:
                ax_one.plot([first.margin], [m], marker="v", color=color, markersize=8, linestyle="none")
            length = min(len(c.p) for c in curves)
            stack = np.array([np.asarray(c.p[:length], dtype=float) for c in curves])
            mean, sd = stack.mean(0), stack.std(0)
            norms = np.asarray(first.norms[:length], dtype=float)
            ax_mean.plot(norms, mean, color=color, label=f"{model} (n={len(curves)})")
            ax_mean.fill_between(norms, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=color, alpha=0.15)
            crossing = first_crossing(norms, mean, m)
            if crossing is not None:
                ax_mean.axvline(crossing, color=color, linestyle=":")
        for ax, sub in ((ax_one, "one input x, fixed direction"), (ax_mean, "mean ± sd over inputs")):
            ax.axhline(m, color="red", linestyle="--", linewidth=1, label=f"m = {m:g}")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("‖δ‖₂")
            ax.set_ylabel("p(‖Δ(x, δ)‖₂ ≤ r)")
            ax.set_title(f"{title}: {sub}", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("p_r versus perturbation size along a fixed attack direction "
                 "(dotted: where the curve falls to m; ▼: the bisection margin R of that input)")
    fig.tight_layout()
    return _save(fig, path)


# --- Fig. 6 (a-c): bound versus empirical margin -------------------------------------------------
def bound_vs_margin(pairs: dict[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Paper Fig. 6a-c. ``pairs``: model -> [(Theorem 1 bound, empirical margin R)], one per
    (seed, point). Scatter, least-squares line (orange), y = x (red), Pearson rho in the title."""
    fig, axes = _grid(len(pairs))
    for ax, (model, pts) in zip(axes, pairs.items()):
        b = np.array([p[0] for p in pts], dtype=float)
        r = np.array([p[1] for p in pts], dtype=float)
        ax.scatter(b, r, s=12, alpha=0.7)
        # axes follow the data (the bound is often far below R); y = x is drawn across the bound's range
        right = float(b.max(initial=0.0)) * 1.1 or 1.0
        ax.plot([0, right], [0, right], color="red", linewidth=1, label="y = x")
        ax.set_xlim(0, right)
        ax.set_ylim(0, max(float(r.max(initial=0.0)), right) * 1.05)
        rho = math.nan
        if len(b) >= 2 and np.ptp(b) > 0:
            slope, intercept = np.polyfit(b, r, 1)
            xs = np.array([b.min(), b.max()])
            ax.plot(xs, slope * xs + intercept, color="orange", label="best fit")
            if np.ptp(r) > 0:
                rho = float(np.corrcoef(b, r)[0, 1])
        ax.set_xlabel("Theorem 1 bound")
        ax.set_ylabel("empirical R")
        ax.set_title(f"{model}  ρ = {rho:.2f}  (n={len(b)})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Empirical margin R against the Theorem 1 bound (each dot a network–input pair)")
    fig.tight_layout()
    return _save(fig, path)


# --- Fig. 6 (d-f): likelihood degradation versus margin ------------------------------------------
def degradation_vs_margin(pairs: dict[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Paper Fig. 6d-f. ``pairs``: model -> [(empirical R, relative log-likelihood degradation under a
    maximum-damage attack)], one per (seed, point)."""
    fig, axes = _grid(len(pairs))
    for ax, (model, pts) in zip(axes, pairs.items()):
        r = np.array([p[0] for p in pts], dtype=float)
        d = np.array([p[1] for p in pts], dtype=float)
        ax.scatter(r, d, s=12, alpha=0.7, color="tab:green")
        rho = float(np.corrcoef(r, d)[0, 1]) if len(r) >= 2 and np.ptp(r) > 0 and np.ptp(d) > 0 else math.nan
        ax.set_xlabel("empirical R")
        ax.set_ylabel("relative log-likelihood degradation")
        ax.set_title(f"{model}  ρ = {rho:.2f}  (n={len(r)})", fontsize=9)
    fig.suptitle("Likelihood degradation under a maximum-damage attack against the margin R")
    fig.tight_layout()
    return _save(fig, path)


# --- Fig. 7 centre/right, 9b: likelihood under noise and under attack ----------------------------
@dataclass
class LevelValues:
    """Per-point values of log p(x | z*) at one perturbation level (noise sd or attack norm L)."""

    level: float
    values: Sequence[float] = field(default_factory=list)


def likelihood_curves(noise: dict[str, dict[str, list[LevelValues]]],
                      attack: dict[str, dict[str, list[LevelValues]]], path: Path) -> Path:
    """Paper Fig. 7 centre/right and 9b. ``noise`` / ``attack``: panel title (family) -> model ->
    levels; drawn as mean +- sd of log p(x | z*) against the noise sd sigma_eps (left column) and the
    attack norm cap L (right column). Either mapping may be empty (its column says so)."""
    titles = list(dict.fromkeys(list(noise) + list(attack)))
    fig, axes = plt.subplots(len(titles), 2, figsize=(10, 3.4 * len(titles)), squeeze=False)
    for title, (ax_n, ax_a) in zip(titles, axes):
        for ax, source, xlabel in ((ax_n, noise, "noise sd σ_ε"), (ax_a, attack, "attack norm L")):
            models = source.get(title, {})
            colors = plt.cm.viridis(np.linspace(0.0, 0.9, max(len(models), 1)))
            for color, (model, levels) in zip(colors, models.items()):
                levels = sorted(levels, key=lambda lv: lv.level)
                xs = np.array([lv.level for lv in levels])
                means = np.array([np.mean(lv.values) for lv in levels])
                sds = np.array([np.std(lv.values) for lv in levels])
                ax.errorbar(xs, means, yerr=sds, color=color, marker="o", capsize=3, label=model)
            if not models:
                ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("log p(x | z*)")
            kind = "noise" if ax is ax_n else "maximum-damage attack"
            ax.set_title(f"{title}: under {kind}", fontsize=9)
            if models:
                ax.legend(fontsize=7)
    fig.suptitle("Likelihood of the original x given the embedding of a perturbed x* (mean ± sd over points)")
    fig.tight_layout()
    return _save(fig, path)


# --- Fig. 9 a/c/d: distributions of R, sigma, ||J_mu||_F -----------------------------------------
def distributions(groups: dict[str, dict[str, dict[str, Sequence[float]]]], path: Path) -> Path:
    """Paper Fig. 9a/c/d. ``groups``: row title (family) -> quantity name (e.g. "R", "mean σ(x)",
    "‖J_μ‖_F") -> model -> per-point values. One row per family, one violin panel per quantity."""
    quantities = list(dict.fromkeys(q for g in groups.values() for q in g))
    fig, axes = plt.subplots(len(groups), len(quantities), figsize=(4.2 * len(quantities), 3.4 * len(groups)),
                             squeeze=False)
    for (title, per_q), row in zip(groups.items(), axes):
        for ax, quantity in zip(row, quantities):
            models = {k: v for k, v in per_q.get(quantity, {}).items() if len(v)}
            if not models:
                ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{title}: {quantity}", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            data = [np.asarray(v, dtype=float) for v in models.values()]
            parts = ax.violinplot(data, showmeans=True)
            for body in parts["bodies"]:
                body.set_alpha(0.4)
            for k, values in enumerate(data, start=1):
                ax.scatter(np.full(len(values), k) + np.linspace(-0.1, 0.1, len(values)), values, s=5, color="k",
                           alpha=0.5, zorder=3)
            ax.set_xticks(range(1, len(models) + 1), [_short(m) for m in models], fontsize=8)
            ax.set_title(f"{title}: {quantity}", fontsize=9)
            ax.set_ylabel(quantity)
    fig.suptitle("Distributions over points (and seeds) by model configuration")
    fig.tight_layout()
    return _save(fig, path)


def _short(label: str) -> str:
    """``beta_vae(beta=10.0)`` -> ``beta=10``: the varying part is what a tick needs."""
    if "(" in label and label.endswith(")"):
        inner = label[label.index("(") + 1:-1]
        parts = []
        for part in inner.split(","):
            key, _, value = part.partition("=")
            try:
                value = f"{float(value):g}"
            except ValueError:
                pass
            parts.append(f"{key.strip()}={value.strip()}" if _ else part.strip())
        return ", ".join(parts)
    return label
