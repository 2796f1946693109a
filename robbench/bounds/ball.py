"""Upper bounds of  B(rho) = sup_{||delta||_2 <= rho} ||scale * (f(x + delta) - f(x))||_2  for a network f
given as dense steps (:mod:`robbench.bounds.network`) and a fixed positive ``scale`` (1 / sigma(x)).

Global (:func:`global_lipschitz`): B(rho) <= rho * ||diag(scale) W_L||_2 * prod_l ||W_l||_2 * prod Lip(act):
the scale is folded into the last affine map, so a large sigma on an insensitive latent costs nothing.

Local (:func:`local_bound`), two bounds from one forward pass over the ball, the smaller one kept:
- interval pre-activations of every layer: interval arithmetic (IBP) intersected with the mean-value form
  z(x + delta) - z(x) = J_z(xi) delta, |row_i| <= rho (||C_i|| + ||R_i||);
- an interval Jacobian J(xi) in [C - R, C + R] (elementwise) for every xi in the ball: affine maps multiply
  exactly, activations contribute their derivative range over the pre-activation interval (unstable ReLUs
  [0, 1], saturated sigmoids small slopes, ...), MaxMin pairs the identity / swap or their hull.
  Then ||f(x + delta) - f(x)|| <= rho sup ||diag(scale) J|| <= rho (||diag(scale) C|| + ||diag(scale) R||)
  (|M| <= R elementwise implies ||M||_2 <= ||R||_2);
- the output intervals themselves: B(rho) <= || scale * max(|lo - f(x)|, |hi - f(x)|) ||_2.

Every step is inclusion-sound, so both are certified for the mathematical network (float64, inflated by
:data:`robbench.bounds.ROUNDING_SLACK`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from robbench.bounds import ROUNDING_SLACK, activations
from robbench.bounds.network import Affine, Elementwise, PairSort, Step
from robbench.bounds.spectral import SpectralNorm, small_side_norm, spectral_norm


# --- global ------------------------------------------------------------------------------------
@dataclass
class LayerNorms:
    """Per-model constants of the global bound: the spectral norms of every affine map except the last,
    and the activations' Lipschitz constants, multiplied (``body``); the last affine map's weight (or None
    when the network does not end in one) and its own norm."""

    body: float
    head: Tensor | None
    head_norm: SpectralNorm | None
    norms: list[SpectralNorm]

    @property
    def lipschitz(self) -> float:
        """Certified Lipschitz constant of f itself (no scale)."""
        return self.body * (self.head_norm.upper if self.head_norm is not None else 1.0)


def layer_norms(steps: Sequence[Step]) -> LayerNorms:
    """Spectral norms of the steps (certified; see :mod:`robbench.bounds.spectral`)."""
    body, norms = 1.0, []
    last = len(steps) - 1 if steps and isinstance(steps[-1], Affine) else None
    for i, step in enumerate(steps):
        if isinstance(step, Affine):
            sn = spectral_norm(step.weight)
            norms.append(sn)
            if i != last:
                body *= sn.upper
        elif isinstance(step, Elementwise):
            body *= activations.lipschitz(step.kind, step.params)
        # PairSort is a permutation of its input at every point: Lipschitz constant 1
    if last is None:
        return LayerNorms(body, None, None, norms)
    return LayerNorms(body, steps[last].weight, norms[-1], norms)


def global_lipschitz(norms: LayerNorms, scale: Tensor) -> float:
    """Certified Lipschitz constant of x -> scale * f(x) for one point's scale: (k,) positive."""
    scale = scale.double()
    if norms.head is None:
        return norms.body * float(scale.abs().max())
    return norms.body * spectral_norm(scale[:, None] * norms.head).upper


# --- local -------------------------------------------------------------------------------------
@dataclass
class LocalBound:
    """``value``: certified bound of B(rho); ``jacobian`` and ``interval``: the two bounds it is the
    smaller of; ``unstable``: activations (or MaxMin pairs) whose derivative is not fixed over the ball."""

    value: float
    jacobian: float
    interval: float
    unstable: int


def _rownorm(m: Tensor | None) -> Tensor | float:
    return 0.0 if m is None else m.norm(dim=1)


def local_bound(steps: Sequence[Step], x: Tensor, scale: Tensor, rho: float) -> LocalBound:
    """Certified upper bound of sup_{||delta|| <= rho} ||scale * (f(x + delta) - f(x))||_2.
    x: (n,) the flat input; scale: (k,) positive; rho >= 0 in input L2 units."""
    v = x.double().flatten()
    lo, hi = v - rho, v + rho
    C: Tensor | None = None  # None: identity (no map applied yet)
    R: Tensor | None = None  # None: exactly zero
    unstable = 0
    errors: dict[int, tuple[Tensor, str, object]] = {}  # step index -> (C before it, kind, error data)
    s_norm: dict[int, float] = {}  # step index -> sup ||S|| of its Jacobian over the ball

    def tighten(v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        mv = rho * (_rownorm(C) + _rownorm(R)) if C is not None else rho
        return torch.maximum(lo, v - mv), torch.minimum(hi, v + mv)

    for index, step in enumerate(steps):
        if isinstance(step, Affine):
            w, b = step.weight, step.bias
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            center = w @ mid + b
            spread = w.abs() @ rad
            lo, hi = center - spread, center + spread
            v = w @ v + b
            C = w.clone() if C is None else w @ C
            R = None if R is None else w.abs() @ R
            lo, hi = tighten(v, lo, hi)
        elif isinstance(step, Elementwise):
            if C is None:
                C = torch.eye(v.numel(), dtype=torch.float64)
            d_lo, d_hi = activations.derivative_range(step.kind, step.params, lo, hi)
            unstable += int((d_hi > d_lo).sum())
            s_norm[index] = float(torch.maximum(d_lo.abs(), d_hi.abs()).max())
            if bool((d_hi > d_lo).any()):
                errors[index] = (C, "diag", (d_hi - d_lo) / 2)
            dc, dr = (d_lo + d_hi) / 2, (d_hi - d_lo) / 2
            R_new = dr[:, None] * C.abs() if R is None else dc.abs()[:, None] * R + dr[:, None] * (C.abs() + R)
            C, R = dc[:, None] * C, R_new
            lo, hi = activations.value_range(step.kind, step.params, lo, hi)
            v = activations.value(step.kind, step.params, v)
            lo, hi = tighten(v, lo, hi)
        elif isinstance(step, PairSort):
            if C is None:
                C = torch.eye(v.numel(), dtype=torch.float64)
            Rz = torch.zeros_like(C) if R is None else R
            a, b_ = slice(0, None, 2), slice(1, None, 2)
            diff_mv = rho * ((C[a] - C[b_]).norm(dim=1) + (Rz[a] + Rz[b_]).norm(dim=1))
            d = v[a] - v[b_]
            d_lo = torch.maximum(lo[a] - hi[b_], d - diff_mv)
            d_hi = torch.minimum(hi[a] - lo[b_], d + diff_mv)
            first = (d_lo >= 0)[:, None]   # a >= b on the whole ball: identity
            second = (d_hi <= 0)[:, None]  # b >= a on the whole ball: swap
            mixed = ~(first | second)
            unstable += int(mixed.sum())
            s_norm[index] = 1.0
            if bool(mixed.any()):
                errors[index] = (C, "pairs", mixed.flatten().nonzero().flatten())
            hull_c = (C[a] + C[b_]) / 2
            hull_r = (Rz[a] + Rz[b_]) / 2 + (C[a].abs() + Rz[a] + C[b_].abs() + Rz[b_]) / 2
            C_new, R_new = torch.empty_like(C), torch.empty_like(C)
            C_new[a] = torch.where(first, C[a], torch.where(second, C[b_], hull_c))
            C_new[b_] = torch.where(first, C[b_], torch.where(second, C[a], hull_c))
            R_new[a] = torch.where(first, Rz[a], torch.where(second, Rz[b_], hull_r))
            R_new[b_] = torch.where(first, Rz[b_], torch.where(second, Rz[a], hull_r))
            C, R = C_new, R_new
            lo_new, hi_new = torch.empty_like(lo), torch.empty_like(hi)
            lo_new[a], hi_new[a] = torch.maximum(lo[a], lo[b_]), torch.maximum(hi[a], hi[b_])
            lo_new[b_], hi_new[b_] = torch.minimum(lo[a], lo[b_]), torch.minimum(hi[a], hi[b_])
            pairs = v.view(-1, 2)
            v = torch.stack((pairs.max(1).values, pairs.min(1).values), 1).flatten()
            lo, hi = tighten(v, lo_new, hi_new)
        else:  # pragma: no cover - network.dense_steps only produces the three kinds
            raise TypeError(f"unknown step {step!r}")
    s = scale.double().flatten()
    if C is None:
        C = torch.eye(v.numel(), dtype=torch.float64)
    elementwise = small_side_norm(s[:, None] * C) + (0.0 if R is None else small_side_norm(s[:, None] * R))
    telescoped = small_side_norm(s[:, None] * C) + _telescoped_error(steps, s, errors, s_norm)
    jac = rho * min(elementwise, telescoped)
    interval = float((s * torch.maximum(hi - v, v - lo).clamp(min=0)).norm()) * (1 + ROUNDING_SLACK)
    return LocalBound(min(jac, interval), jac, interval, unstable)


def _telescoped_error(steps: Sequence[Step], scale: Tensor, errors: dict[int, tuple[Tensor, str, object]],
                      s_norm: dict[int, float]) -> float:
    """Bound of ||diag(scale) (J - C)||_2 by the telescoping identity
    J - C = sum_j Post_j E_j C_j, with E_j = S_j - center(S_j) the derivative uncertainty at nonlinear step j,
    C_j the centre Jacobian before it and Post_j the (actual) Jacobian of everything after it. Walking back
    from the output, Post_j = (bound of what follows the next nonlinearity) * S * G with G the exact product
    of the affine maps in between, so each term costs ||G E_j C_j|| <= ||G diag(sqrt e)|| ||diag(sqrt e) C_j||
    (or, for MaxMin pairs, 0.5 ||G V|| ||V^T C_j|| with V the pair differences). No absolute values of
    weight matrices appear, which is what makes this tighter than the elementwise interval product."""
    G: Tensor | None = torch.diag(scale)  # exact product from the output back to the current step
    factor, total = 1.0, 0.0
    for index in range(len(steps) - 1, -1, -1):
        step = steps[index]
        if isinstance(step, Affine):
            G = step.weight if G is None else G @ step.weight
            continue
        if index in errors:
            c_pre, kind, data = errors[index]
            n = c_pre.shape[0] if c_pre is not None else (G.shape[1] if G is not None else 0)
            c = c_pre if c_pre is not None else torch.eye(n, dtype=torch.float64)
            g = G if G is not None else torch.eye(c.shape[0], dtype=torch.float64)
            if kind == "diag":
                e = data
                u = (e > 0).nonzero().flatten()
                root = e[u].sqrt()
                total += factor * small_side_norm(g[:, u] * root) * small_side_norm(root[:, None] * c[u])
            else:
                pairs = data
                a, b = 2 * pairs, 2 * pairs + 1
                total += factor * 0.5 * small_side_norm(g[:, a] - g[:, b]) * small_side_norm(c[a] - c[b])
        factor *= (small_side_norm(G) if G is not None else 1.0) * s_norm.get(index, 1.0)
        G = None
    return total * (1 + ROUNDING_SLACK)
