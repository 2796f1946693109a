"""Test-retest reliability and the correction of correlations for measurement noise.

A per-point quantity estimated with random streams (the margin R: attack starts and Monte Carlo; the
Theorem 1 bound: the Monte Carlo p_r(x, 0)) is a true value plus estimation noise. Measured twice on the
same points and networks with independent streams, the Pearson correlation between the two measurements
is the quantity's *reliability* (the share of its variance that is not estimation noise). An observed
correlation between two noisy quantities is attenuated by their noise; Spearman's correction for
attenuation, rho / sqrt(rel_x * rel_y), estimates the correlation between their noise-free values.
"""
from __future__ import annotations

import math
from typing import Hashable

from scipy import stats as scipy_stats


def pearson_test(x: list[float], y: list[float]) -> tuple[float, float]:
    """Pearson correlation and its two-sided p value; (NaN, NaN) with fewer than 3 pairs or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, math.nan
    res = scipy_stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN with fewer than 3 pairs or a constant side."""
    return pearson_test(x, y)[0]


def retest_reliability(first: dict[Hashable, float], second: dict[Hashable, float]) -> tuple[float, int]:
    """Pearson correlation between two measurements of the same points (keys present in both) and the
    number of such points. NaN when fewer than 3 points are shared."""
    common = sorted(set(first) & set(second), key=repr)
    return pearson([first[k] for k in common], [second[k] for k in common]), len(common)


def disattenuate(rho: float, reliability_x: float, reliability_y: float) -> float:
    """Spearman's correction for attenuation: rho / sqrt(rel_x * rel_y). NaN when a reliability is not
    positive (or not finite): the correction is then undefined. Not clipped: a value above 1 says the
    reliabilities were underestimated (sampling error of small samples), which the report shows as is."""
    if not all(math.isfinite(v) for v in (rho, reliability_x, reliability_y)):
        return math.nan
    if reliability_x <= 0 or reliability_y <= 0:
        return math.nan
    return rho / math.sqrt(reliability_x * reliability_y)
