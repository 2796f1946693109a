"""||J_mu(x)||_F, the Frobenius norm of the encoder-mean Jacobian (Theorem 1, paper Fig. 9d).

Exact: the full (k, D) Jacobian per point with ``torch.func.vmap(torch.func.jacrev(...))``, chunked over
the batch so memory stays ~``max_elements`` floats. Hutchinson: ||J||_F^2 = E_u ||J^T u||^2 for Rademacher
u in latent space, one forward and ``n_probes`` backward passes for the whole batch; unbiased for the
squared norm, with a standard error from the spread of the probes. ``method="auto"`` picks exact when
k * D is at most ``exact_max_elements``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from robbench.protocols import VAEModel


@dataclass
class FrobeniusEstimate:
    """Per point (B,): ``value`` = ||J_mu(x)||_F, ``stderr`` its standard error (0 for exact), and the
    ``method`` used ("exact" or "hutchinson")."""

    value: Tensor
    stderr: Tensor
    method: str


def _mu_single(model: VAEModel):
    def f(xi: Tensor) -> Tensor:
        return model.encode(xi.unsqueeze(0))[0].squeeze(0)
    return f


def jacobian_frobenius_exact(model: VAEModel, x: Tensor, *, max_elements: int = 1 << 24) -> Tensor:
    """Exact ||J_mu(x_b)||_F for x: (B, *input_shape); returns (B,) float64.
    Falls back to k backward passes if the encoder does not support torch.func transforms."""
    k = model.latent_dim
    dim = x[0].numel()
    chunk = max(1, max_elements // max(1, k * dim))
    out = []
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].detach()
        try:
            jac = torch.func.vmap(torch.func.jacrev(_mu_single(model)))(xs)  # (b, k, *input_shape)
            out.append(jac.detach().flatten(1).double().pow(2).sum(1).sqrt())
        except (RuntimeError, NotImplementedError):
            out.append(_exact_by_rows(model, xs))
    return torch.cat(out).cpu()


def _exact_by_rows(model: VAEModel, x: Tensor) -> Tensor:
    """||J||_F^2 = sum_i ||grad mu_i||^2, one backward pass per latent coordinate (whole batch at once;
    points do not interact in an encoder in eval mode)."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        mu = model.encode(xg)[0]
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i in range(mu.shape[1]):
            (g,) = torch.autograd.grad(mu[:, i].sum(), xg, retain_graph=True)
            total += g.flatten(1).double().pow(2).sum(1)
    return total.detach().sqrt().cpu()


def jacobian_frobenius_hutchinson(model: VAEModel, x: Tensor, *, n_probes: int = 64,
                                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of ||J_mu(x_b)||_F for x: (B, *input_shape).

    Each probe u ~ Rademacher(k) gives ||J^T u||^2, an unbiased estimate of ||J||_F^2. Returns
    (value, stderr), each (B,) float64: value = sqrt(mean), stderr by the delta method
    (sd / sqrt(n_probes)) / (2 value)."""
    if n_probes < 2:
        raise ValueError(f"n_probes must be >= 2 to state an error, got {n_probes}")
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        mu = model.encode(xg)[0]
        vals = []
        for _ in range(n_probes):
            u = torch.randint(0, 2, mu.shape, generator=generator, device="cpu").to(mu) * 2 - 1
            (g,) = torch.autograd.grad(mu, xg, grad_outputs=u, retain_graph=True)
            vals.append(g.flatten(1).double().pow(2).sum(1).cpu())
    sq = torch.stack(vals, 1)  # (B, n_probes)
    mean = sq.mean(1)
    value = mean.clamp(min=0).sqrt()
    se_sq = sq.std(1) / math.sqrt(n_probes)
    stderr = torch.where(value > 0, se_sq / (2 * value.clamp(min=1e-300)), torch.zeros_like(value))
    return value, stderr


def jacobian_frobenius(model: VAEModel, x: Tensor, *, method: str = "auto", n_probes: int = 64,
                       exact_max_elements: int = 1 << 20, seed: int = 0) -> FrobeniusEstimate:
    """||J_mu(x)||_F per point, exact or by Hutchinson. ``auto``: exact when latent_dim * D <=
    ``exact_max_elements`` (the per-point Jacobian size), else Hutchinson with ``n_probes``."""
    if method not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"method must be 'auto', 'exact' or 'hutchinson', got {method!r}")
    if method == "auto":
        method = "exact" if model.latent_dim * x[0].numel() <= exact_max_elements else "hutchinson"
    if method == "exact":
        value = jacobian_frobenius_exact(model, x)
        return FrobeniusEstimate(value, torch.zeros_like(value), "exact")
    gen = torch.Generator().manual_seed(seed)
    value, stderr = jacobian_frobenius_hutchinson(model, x, n_probes=n_probes, generator=gen)
    return FrobeniusEstimate(value, stderr, "hutchinson")
