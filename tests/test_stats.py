"""Clopper-Pearson bounds, error budgets, sequential decisions, order-statistic CIs, Pearson fit.

Coverage claims are checked exactly (summing binomial probabilities), not by simulation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from robbench import stats


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1000)]:
        lo, hi = stats.clopper_pearson(torch.tensor([k]), torch.tensor([n]), 0.95)
        ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert float(lo) == pytest.approx(ref.low, abs=1e-12)
        assert float(hi) == pytest.approx(ref.high, abs=1e-12)


def test_clopper_pearson_edge_cases_closed_form():
    # k = 0: upper = 1 - (alpha/2)^(1/n); k = n: lower = (alpha/2)^(1/n).
    lo, hi = stats.clopper_pearson(torch.tensor([0, 20]), torch.tensor([20, 20]), 0.9)
    assert float(lo[0]) == 0.0 and float(hi[1]) == 1.0
    assert float(hi[0]) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-10)
    assert float(lo[1]) == pytest.approx(0.05 ** (1 / 20), rel=1e-10)


@pytest.mark.parametrize("n", [15, 100])
def test_one_sided_bounds_have_exact_coverage(n):
    """For every p on a grid, P(lower(K) <= p) >= 1 - alpha exactly (K ~ Binomial(n, p))."""
    alpha = 0.1
    ks = torch.arange(n + 1)
    lower = stats.cp_lower(ks, n, alpha).numpy()
    upper = stats.cp_upper(ks, n, alpha).numpy()
    for p in np.linspace(0.001, 0.999, 97):
        pmf = sps.binom.pmf(np.arange(n + 1), n, p)
        assert pmf[lower <= p].sum() >= 1 - alpha - 1e-12
        assert pmf[upper >= p].sum() >= 1 - alpha - 1e-12


def test_decide_error_probability_below_alpha_exactly():
    n, m, alpha = 400, 0.5, 0.05
    ks = torch.arange(n + 1)
    d = stats.decide(ks, n, m, alpha).numpy()
    for p in [0.3, 0.45, 0.49, 0.5]:  # p <= m: wrong decision is ROBUST
        assert sps.binom.pmf(np.arange(n + 1), n, p)[d == stats.ROBUST].sum() <= alpha
    for p in [0.501, 0.55, 0.7]:  # p > m: wrong decision is NOT_ROBUST
        assert sps.binom.pmf(np.arange(n + 1), n, p)[d == stats.NOT_ROBUST].sum() <= alpha
    # Clear cases are decided, close ones are not.
    assert d[n] == stats.ROBUST and d[0] == stats.NOT_ROBUST and d[n // 2] == stats.UNDECIDED


def test_split_alpha_and_schedule():
    assert stats.split_alpha(0.05, 10) == pytest.approx(0.005)
    with pytest.raises(ValueError):
        stats.split_alpha(0.05, 0)
    assert stats.sample_schedule(128, 8192, 4) == [128, 512, 2048, 8192]
    assert stats.sample_schedule(100, 1000, 2) == [100, 200, 400, 800, 1000]
    assert stats.sample_schedule(64, 64) == [64]
    with pytest.raises(ValueError):
        stats.sample_schedule(100, 10)


@pytest.mark.parametrize("n,q", [(50, 0.5), (1000, 0.5), (400, 0.1)])
def test_quantile_ci_indices_exact_coverage(n, q):
    conf = 0.95
    l, u = stats.quantile_ci_indices(n, q, conf)
    # coverage = P(l <= K <= u - 1), K ~ Binomial(n, q)
    cover = sps.binom.cdf(u - 1, n, q) - (sps.binom.cdf(l - 1, n, q) if l >= 1 else 0.0)
    assert cover >= conf
    assert 1 <= l < u <= n
    assert l <= math.ceil(q * n) <= u


def test_quantile_ci_covers_known_quantile_fixed_seed():
    """The order-statistic interval of the median of Exp(1) (= ln 2) covers it in >= 95% of 400 trials
    (binomial test: at most the 0.999 quantile of Binomial(400, 0.05) misses)."""
    gen = torch.Generator().manual_seed(0)
    n, trials = 101, 400
    l, u = stats.quantile_ci_indices(n, 0.5, 0.95)
    samples = torch.empty(trials, n).exponential_(generator=gen).sort(1).values
    covered = (samples[:, l - 1] <= math.log(2)) & (samples[:, u - 1] >= math.log(2))
    misses = int((~covered).sum())
    assert misses <= sps.binom.ppf(0.999, trials, 0.05)


def test_pearson_and_slope_known_line_and_none_dropped():
    fit = stats.pearson_and_slope([0.0, 1.0, 2.0, None, 3.0], [1.0, 3.0, 5.0, 100.0, 7.0])
    assert fit.n == 4
    assert fit.pearson == pytest.approx(1.0)
    assert fit.slope == pytest.approx(2.0)
    assert fit.intercept == pytest.approx(1.0)


def test_pearson_and_slope_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.7 * x + rng.normal(scale=0.5, size=30)
    fit = stats.pearson_and_slope(x.tolist(), y.tolist())
    assert fit.pearson == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.slope == pytest.approx(slope, abs=1e-12)
    assert fit.intercept == pytest.approx(intercept, abs=1e-12)
    rho, _, _, _ = fit  # tuple unpacking works too
    assert rho == fit.pearson


def test_pearson_and_slope_degenerate():
    assert math.isnan(stats.pearson_and_slope([1.0], [2.0]).pearson)
    assert math.isnan(stats.pearson_and_slope([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).slope)
    assert math.isnan(stats.pearson_and_slope([float("nan"), 1.0], [1.0, 2.0]).pearson)


def test_probit_and_derive_seed():
    assert float(stats.probit(0.5)) == 0.0
    assert float(stats.probit(0.975)) == pytest.approx(1.959963984540054)
    a, b = stats.derive_seed(0, "margin", 1), stats.derive_seed(0, "margin", 2)
    assert a != b and a == stats.derive_seed(0, "margin", 1)
    assert 0 <= a < 2 ** 31
