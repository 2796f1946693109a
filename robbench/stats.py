"""Statistics for Monte Carlo estimates: Clopper-Pearson bounds, error budgets, sequential decisions.

Everything here is pure arithmetic on counts (no model, no sampling), so it is cheap to test exactly.
Conventions: ``alpha`` is an error probability (``1 - confidence``); counts ``k`` successes out of
``n`` trials are int tensors or arrays; bounds are float64 tensors in [0, 1].
"""
from __future__ import annotations

import hashlib
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor

ROBUST, NOT_ROBUST, UNDECIDED = 1, -1, 0


# --- Clopper-Pearson ---------------------------------------------------------------------------
def _as_np(a: Tensor | np.ndarray | float | int) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def cp_lower(k: Tensor, n: Tensor | int, alpha: float) -> Tensor:
    """One-sided lower Clopper-Pearson bound: P(p >= lower) >= 1 - alpha. Shapes broadcast; (B,) float64."""
    k_, n_ = np.broadcast_arrays(_as_np(k), _as_np(n))
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(alpha, k_, n_ - k_ + 1)
    lo = np.where(k_ <= 0, 0.0, lo)
    return torch.from_numpy(np.asarray(lo, dtype=np.float64))


def cp_upper(k: Tensor, n: Tensor | int, alpha: float) -> Tensor:
    """One-sided upper Clopper-Pearson bound: P(p <= upper) >= 1 - alpha. Shapes broadcast; (B,) float64."""
    k_, n_ = np.broadcast_arrays(_as_np(k), _as_np(n))
    with np.errstate(invalid="ignore"):
        hi = stats.beta.ppf(1.0 - alpha, k_ + 1, n_ - k_)
    hi = np.where(k_ >= n_, 1.0, hi)
    return torch.from_numpy(np.asarray(hi, dtype=np.float64))


def clopper_pearson(k: Tensor, n: Tensor | int, confidence: float = 0.95) -> tuple[Tensor, Tensor]:
    """Two-sided exact binomial interval (lo, hi) holding with probability >= ``confidence``
    (alpha / 2 in each tail). k: successes, n: trials; returns two float64 tensors."""
    alpha = 1.0 - confidence
    return cp_lower(k, n, alpha / 2), cp_upper(k, n, alpha / 2)


# --- error budget ------------------------------------------------------------------------------
def split_alpha(alpha: float, n_tests: int) -> float:
    """Bonferroni split: each of ``n_tests`` tests gets ``alpha / n_tests`` so that all of them hold
    together with probability >= 1 - alpha (union bound; valid for dependent tests)."""
    if n_tests < 1:
        raise ValueError(f"n_tests must be >= 1, got {n_tests}")
    return alpha / n_tests


def sample_schedule(n_initial: int, n_max: int, growth: int = 4) -> list[int]:
    """Cumulative sample sizes at which a sequential test looks: n_initial, n_initial*growth, ...,
    ending exactly at n_max. Its length is the number of looks the error budget must cover."""
    if n_initial < 1 or n_max < n_initial:
        raise ValueError(f"need 1 <= samples_initial <= samples_max, got {n_initial}, {n_max}")
    if growth < 2:
        raise ValueError(f"growth must be >= 2, got {growth}")
    sizes = [n_initial]
    while sizes[-1] < n_max:
        sizes.append(min(sizes[-1] * growth, n_max))
    return sizes


def decide(k: Tensor, n: Tensor | int, m: float, alpha: float) -> Tensor:
    """Sequential decision at one look: ROBUST (+1) when the lower bound of p exceeds m, NOT_ROBUST (-1)
    when the upper bound is <= m, else UNDECIDED (0). Whatever the true p, the wrong decision has
    probability <= alpha (only one of the two one-sided bounds can mislead). Returns (B,) int64."""
    lo = cp_lower(k, n, alpha)
    hi = cp_upper(k, n, alpha)
    out = torch.zeros(lo.shape, dtype=torch.int64)
    out[lo > m] = ROBUST
    out[hi <= m] = NOT_ROBUST
    return out


# --- order statistics --------------------------------------------------------------------------
def quantile_ci_indices(n: int, q: float, confidence: float) -> tuple[int, int]:
    """1-based order-statistic indices (l, u) with P(X_(l) <= xi_q <= X_(u)) >= confidence for the
    q-quantile xi_q of a continuous distribution from n i.i.d. samples. l may be 0 (meaning -inf, or 0
    for nonnegative data) and u may be n + 1 (meaning +inf) when n is too small."""
    alpha = 1.0 - confidence
    # K = #{X_i <= xi_q} ~ Binomial(n, q); coverage = P(l <= K <= u - 1).
    l = int(stats.binom.ppf(alpha / 2, n, q))
    u = int(stats.binom.ppf(1 - alpha / 2, n, q)) + 1
    return l, u


# --- correlation -------------------------------------------------------------------------------
class Fit(NamedTuple):
    """Pearson correlation and least-squares line margin = slope * bound + intercept over n pairs."""

    pearson: float
    slope: float
    intercept: float
    n: int


def pearson_and_slope(bound: Sequence[float | None], margin: Sequence[float | None]) -> Fit:
    """Pearson rho between the Theorem 1 bound (x) and the empirical margin (y), and the fitted line
    (paper Fig. 6). Pairs where either value is None or not finite are dropped (vacuous bounds).
    Fewer than 2 usable pairs, or a constant x or y, give NaN for what cannot be computed."""
    pairs = [(float(b), float(r)) for b, r in zip(bound, margin, strict=True)
             if b is not None and r is not None and math.isfinite(float(b)) and math.isfinite(float(r))]
    n = len(pairs)
    nan = float("nan")
    if n < 2:
        return Fit(nan, nan, nan, n)
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx == 0.0:
        return Fit(nan, nan, nan, n)
    slope = sxy / sxx
    rho = sxy / math.sqrt(sxx * syy) if syy > 0 else nan
    return Fit(rho, slope, float(y.mean() - slope * x.mean()), n)


# --- misc --------------------------------------------------------------------------------------
def probit(p: Tensor | float) -> Tensor:
    """Phi^{-1}(p), float64 tensor (-inf at 0, +inf at 1)."""
    return torch.from_numpy(np.asarray(special.ndtri(_as_np(p)), dtype=np.float64))


def derive_seed(base: int, *tags: object) -> int:
    """A 31-bit seed determined by ``base`` and the tags (e.g. estimator name, step index), so that
    different uses of one run seed draw independent random streams."""
    text = repr((int(base),) + tuple(tags)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & 0x7FFFFFFF
