"""Spectral norms ||W||_2 with a certified upper bound.

- small matrices (min side <= ``exact_max_side``): the largest singular value from LAPACK in float64
  (backward stable: error ~ 1e-16 ||W||, far inside :data:`robbench.bounds.ROUNDING_SLACK`);
- larger ones: Gram iteration (Delattre et al., ICML 2023): G_0 = W, G_{t+1} = G_t^T G_t gives
  ||W||_2 <= ||G_t||_F^(1 / 2^t) for every t, an upper bound that converges to ||W||_2 from above.

A power-iteration estimate (a lower bound: ||W v|| / ||v|| never exceeds ||W||_2) is reported next to
the certified value, so the gap between the two is visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from robbench.bounds import ROUNDING_SLACK


@dataclass
class SpectralNorm:
    """``upper``: certified ||W||_2 upper bound (slack included); ``estimate``: power-iteration lower
    estimate; ``method``: "svd" or "gram"."""

    upper: float
    estimate: float
    method: str


def power_iteration(w: Tensor, iters: int = 50, seed: int = 0) -> float:
    """Lower estimate of ||W||_2 by power iteration on W^T W. w: (m, n)."""
    w = w.double()
    v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    est = 0.0
    for _ in range(iters):
        v = v / v.norm().clamp(min=1e-300)
        u = w @ v
        est = float(u.norm())
        v = w.T @ u
    return est


def gram_upper(w: Tensor, steps: int = 8) -> float:
    """||W||_2 <= ||G_t||_F^(1/2^t) with G_{t+1} = G_t^T G_t; rescaled each step to avoid overflow."""
    g = w.double()
    if g.shape[0] < g.shape[1]:
        g = g.T  # same norm; the Gram matrix is then the smaller side
    log_scale = 0.0  # log ||W||-scale carried out of g: true G_t = g * exp(log_scale)
    bound = float(torch.linalg.matrix_norm(g))
    for t in range(1, steps + 1):
        norm = float(torch.linalg.matrix_norm(g))
        if norm == 0.0:
            return 0.0
        g = g / norm
        log_scale = 2.0 * (log_scale + math.log(norm))
        g = g.T @ g
        log_f = (math.log(float(torch.linalg.matrix_norm(g))) + log_scale) / 2.0 ** t
        bound = min(bound, math.exp(log_f))
    return bound


def spectral_norm(w: Tensor, *, exact_max_side: int = 4096, gram_steps: int = 8) -> SpectralNorm:
    """Certified upper bound of ||W||_2 for w: (m, n), plus a power-iteration estimate."""
    w = w.detach().double()
    if w.numel() == 0:
        return SpectralNorm(0.0, 0.0, "svd")
    if min(w.shape) <= exact_max_side:
        value = float(torch.linalg.matrix_norm(w, ord=2))
        return SpectralNorm(value * (1 + ROUNDING_SLACK), value, "svd")
    return SpectralNorm(gram_upper(w, gram_steps) * (1 + ROUNDING_SLACK), power_iteration(w), "gram")


def small_side_norm(w: Tensor) -> float:
    """Certified ||W||_2 (slack included) for a matrix with one small side, e.g. the (k, n) Jacobian
    bounds of the local bound: the top eigenvalue of the (k, k) Gram matrix, exact and cheap."""
    w = w.double()
    if w.shape[0] > w.shape[1]:
        w = w.T
    gram = w @ w.T
    value = float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())
    return value * (1 + ROUNDING_SLACK)
