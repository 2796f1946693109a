"""Certified robustness margins: R_cert <= R_true, for every point, from bounds that hold over the whole ball.

The certificate (sigma taken at the clean input, as in the paper's Eq. 3). With sigma = sigma(x) fixed,
z = mu(x + delta) + eta * sigma is N(mu(x + delta), diag sigma^2); in the coordinates u = z / sigma it is a
unit Gaussian shifted by Delta = (mu(x + delta) - mu(x)) / sigma from the unperturbed one. For any set A
(here: the z whose decoding lies within r of g(mu(x))), the Neyman-Pearson lemma (Cohen et al. 2019,
Lemma 4 / Theorem 1 of randomized smoothing) gives

    p_r(x, delta) = P(A | shifted) >= Phi(Phi^-1(p_r(x, 0)) - ||Delta||_2),

equality for a half-space. So x + delta is r-robust (p_r > m) whenever ||Delta|| < Phi^-1(p_r(x, 0)) - Phi^-1(m).
With p_lo a one-sided Clopper-Pearson lower bound of p_r(x, 0) (confidence 1 - alpha) and any certified
B(rho) >= sup_{||delta|| <= rho} ||Delta||, every rho with B(rho) < gap = Phi^-1(p_lo) - Phi^-1(m) is a
certified radius: with probability >= 1 - alpha (over the Monte Carlo draws only), p_r > m on the whole
closed ball, so R_true >= rho. Pixel-box constraints only shrink the set of perturbations, so the
certificate also bounds the box-constrained margin the attacks estimate.

Relation to the paper's Theorem 1, R >= min_i sigma_i Phi^-1(p_r(x, 0)) / ||J_mu(x)||_F (m = 0.5): linearise
Delta ~ diag(1/sigma) J_mu delta, bound ||diag(1/sigma) J delta|| <= ||J||_2 ||delta|| / min sigma
<= ||J||_F ||delta|| / min sigma, and solve ||Delta|| < gap. Theorem 1 is that same argument at first
order (J at x only, so not a guarantee for a nonlinear encoder). Replacing the linearisation by a global
Lipschitz constant L_mu gives the rigorous analogue  rho >= min sigma * gap / L_mu  (method
``lipschitz_min_sigma``); folding 1/sigma into the last layer (``lipschitz``) and bounding the Jacobian over
the ball only (``local``) are tighter. For a linear encoder mu = A x + c with constant sigma = s every
method gives exactly s * gap / sigma_max(A) >= s * gap / ||A||_F = Theorem 1.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from robbench import stats
from robbench.bounds import ball
from robbench.bounds.network import Step, encoder_steps

METHODS = ("lipschitz_min_sigma", "lipschitz", "local")


def probit_gap(p_lo: float, m: float) -> float:
    """Phi^-1(p_lo) - Phi^-1(m): the largest ||Delta|| the certificate tolerates (<= 0: vacuous)."""
    return float(stats.probit(p_lo)) - float(stats.probit(m))


def largest_certified(bound: Callable[[float], float], gap: float, *, start: float, rho_max: float,
                      rel_tol: float = 1e-3, max_evals: int = 60) -> tuple[float, int]:
    """The largest rho found in [0, rho_max] with bound(rho) < gap, by doubling from ``start`` and then
    bisection to relative width ``rel_tol``. Only a rho whose bound was evaluated and cleared is returned,
    so the result is certified whether or not ``bound`` is monotone. Returns (rho, evaluations)."""
    lo, evals = 0.0, 0
    hi = min(max(start, 1e-6 * rho_max), rho_max)
    while True:  # find a failing hi (or reach the cap)
        evals += 1
        if bound(hi) < gap:
            lo = hi
            if hi >= rho_max:
                return rho_max, evals
            hi = min(2.0 * hi, rho_max)
        else:
            break
        if evals >= max_evals:
            return lo, evals
    while hi - lo > rel_tol * hi and evals < max_evals:
        mid = 0.5 * (lo + hi)
        evals += 1
        if bound(mid) < gap:
            lo = mid
        else:
            hi = mid
    return lo, evals


@dataclass
class Certificate:
    """One point's certificate. ``radius``: R_cert in input L2 units (0 when vacuous), the largest of
    ``radii`` (one per method that ran), ``method`` the one that gave it; ``status``: "ok", "at_cap"
    (certified up to ``rho_max``), "vacuous" (p_lo <= m), "vacuous_sigma" (some sigma_i = 0: no smoothing);
    ``lipschitz``: global Lipschitz constant of x -> mu(x) / sigma(x_clean); ``lipschitz_mu``: of mu."""

    radius: float
    status: str
    method: str | None
    radii: dict[str, float] = field(default_factory=dict)
    gap: float = float("nan")
    lipschitz: float = float("nan")
    lipschitz_mu: float = float("nan")
    local_unstable: int | None = None
    seconds: float = 0.0


class EncoderCertifier:
    """Certified radii for one model's encoder mean. Built once per model (spectral norms are cached);
    :meth:`certify` then runs per point. ``methods``: a subset of :data:`METHODS`."""

    def __init__(self, model: nn.Module, *, methods: tuple[str, ...] = METHODS, max_elements: int = 1 << 25):
        unknown = [mth for mth in methods if mth not in METHODS]
        if unknown or not methods:
            raise ValueError(f"methods={list(methods)!r}: each must be one of {list(METHODS)}")
        self.methods = tuple(methods)
        self.steps: list[Step] = encoder_steps(model, max_elements=max_elements)
        self.norms = ball.layer_norms(self.steps)

    def certify(self, x: Tensor, sigma: Tensor, gap: float, *, rho_max: float = 10.0,
                rel_tol: float = 1e-3) -> Certificate:
        """x: (*input_shape) one clean input; sigma: (k,) its encoder sigma; gap = probit_gap(p_lo, m)."""
        t0 = time.perf_counter()
        sigma = sigma.detach().double().cpu().flatten()
        lip_mu = self.norms.lipschitz
        if not gap > 0:
            return Certificate(0.0, "vacuous", None, gap=gap, lipschitz_mu=lip_mu,
                               seconds=time.perf_counter() - t0)
        if not bool((sigma > 0).all()):
            return Certificate(0.0, "vacuous_sigma", None, gap=gap, lipschitz_mu=lip_mu,
                               seconds=time.perf_counter() - t0)
        scale = 1.0 / sigma
        lip = ball.global_lipschitz(self.norms, scale)
        radii: dict[str, float] = {}
        if "lipschitz_min_sigma" in self.methods:
            radii["lipschitz_min_sigma"] = min(rho_max, float(sigma.min()) * gap / lip_mu)
        if "lipschitz" in self.methods:
            radii["lipschitz"] = min(rho_max, gap / lip)
        unstable = None
        if "local" in self.methods:
            xf = x.detach().double().cpu().flatten()
            last: dict[str, int] = {}

            def bound(rho: float) -> float:
                out = ball.local_bound(self.steps, xf, scale, rho)
                last["unstable"] = out.unstable
                return out.value

            radii["local"], _ = largest_certified(bound, gap, start=gap / lip, rho_max=rho_max, rel_tol=rel_tol)
            unstable = last.get("unstable")
        method = max(radii, key=lambda k: radii[k])
        radius = radii[method]
        return Certificate(radius, "at_cap" if radius >= rho_max else "ok", method, radii, gap, lip, lip_mu,
                           unstable, time.perf_counter() - t0)
