"""The linear-Gaussian VAE: a model whose robustness quantities have closed forms (DESIGN.md §1).

mu(x) = A x + c, sigma(x) = s (constant), g(z) = W z + b with W = w Q, Q with orthonormal columns.
Then ||Delta(x, delta)||^2 / (w s)^2 ~ noncentral chi-square(k, lambda = ||A delta||^2 / s^2); the
worst delta of norm rho has ||A delta|| = sigma_max(A) rho (its direction: A's top right singular
vector), so the exact margin solves P(ncx2_k(lambda(rho)) <= r^2 / (w s)^2) = m.

Anisotropic sigma (``s`` a list of k values, session 10): sigma(x) = s (per latent), and the decoder's columns
are scaled by s_min / s_i (W = w Q diag(s_min / s)), so w_i s_i = w s_min for every latent. Then
||Delta||^2 / (w s_min)^2 ~ ncx2(k, ||diag(1 / s) A delta||^2) and every closed form above holds with s -> s_min
and A -> A_eff = diag(s_min / s) A (``sigma_max``, ``top_direction`` and ``exact_probability`` refer to A_eff;
``frobenius`` stays ||A||_F, the Jacobian of mu, and Theorem 1 uses min sigma = s_min).
Used by known-answer tests and available as the ready-built model family ``linear_gaussian``.
"""
from __future__ import annotations

import math

import torch
from scipy import optimize, special, stats
from torch import Tensor, nn


class LinearGaussianVAE(nn.Module):
    """input_shape: image shape (C, H, W) or (D,); latent_dim k <= D. Gaussian decoder with unit variance.
    Defined on all of R^D (``input_bounds = None``): its closed forms assume no pixel box."""

    input_bounds = None

    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), latent_dim: int = 4, *,
                 s: float | list[float] = 0.5, w: float = 2.0, singular_values: list[float] | None = None,
                 seed: int = 0):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        dim = math.prod(self.input_shape)
        if latent_dim > dim:  # A = U diag(sv) V^T needs k orthonormal directions in R^D
            raise ValueError(f"latent_dim={latent_dim} exceeds the input dimension {dim} (input shape "
                             f"{self.input_shape}); the linear-Gaussian VAE needs 1 <= latent_dim <= {dim}")
        gen = torch.Generator().manual_seed(seed)
        left, _ = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=gen, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(dim, latent_dim, generator=gen, dtype=torch.float64))
        sv = torch.tensor(singular_values or [3.0 - 2.0 * i / max(latent_dim - 1, 1) for i in range(latent_dim)],
                          dtype=torch.float64)
        A = left @ torch.diag(sv) @ right.T  # (k, D)
        Q, _ = torch.linalg.qr(torch.randn(dim, latent_dim, generator=gen, dtype=torch.float64))
        s_vec = torch.as_tensor(s, dtype=torch.float64).flatten()
        if s_vec.numel() not in (1, latent_dim) or not bool(((s_vec > 0) & torch.isfinite(s_vec)).all()):
            raise ValueError(f"s must be a finite positive number or a list of latent_dim={latent_dim} such numbers, "
                             f"got {s!r}")
        s_vec = s_vec.expand(latent_dim)
        self.s, self.w = float(s_vec.min()), float(w)  # s: min sigma (the closed forms' scale)
        scale = self.s / s_vec  # 1 for a scalar s: the model of before, bit for bit
        self.register_buffer("A", A.float())
        self.register_buffer("c", torch.zeros(latent_dim))
        # sigma kept as Python floats, made in mu's dtype by encode: a float64 copy of the model (model.double())
        # gets s itself, as before per-latent sigma, not s rounded to float32 as a float32 buffer would give
        self.sigma_values = tuple(float(v) for v in s_vec)
        self.register_buffer("W", (w * Q * scale).float())
        self.register_buffer("b", torch.full((dim,), 0.5))
        a_eff = scale[:, None] * A
        self.register_buffer("A_eff", a_eff.float())  # diag(s_min / s) A: the closed forms' matrix (A for a scalar s)
        top = torch.linalg.svd(a_eff)[2][0] if s_vec.numel() > 1 and not bool((scale == 1).all()) else right[:, 0]
        self.register_buffer("top_direction", top.float())  # A_eff's top right singular vector: the worst direction

    # --- VAEModel protocol ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = x.flatten(1) @ self.A.T + self.c
        return mu, torch.tensor(self.sigma_values, dtype=mu.dtype, device=mu.device).expand_as(mu).clone()

    @property
    def sigma(self) -> Tensor:
        """The per-latent sigma (k,) as float32 (the model's dtype as built)."""
        return torch.tensor(self.sigma_values, dtype=torch.float32, device=self.A.device)

    def decode(self, z: Tensor) -> Tensor:
        return (z @ self.W.T + self.b).view(-1, *self.input_shape)

    def encoder_mean_layers(self) -> list[nn.Module]:
        """mu(x) as plain modules (Flatten, Linear(A, c)), for the certified bounds (robbench.bounds)."""
        lin = nn.Linear(self.A.shape[1], self.A.shape[0])
        with torch.no_grad():
            lin.weight.copy_(self.A)
            lin.bias.copy_(self.c)
        return [nn.Flatten(), lin]

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        sq = (x - recon).flatten(1).pow(2).sum(1)
        return -0.5 * sq - 0.5 * x[0].numel() * math.log(2 * math.pi)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        mu, sigma = self.encode(x)
        recon = self.decode(mu + sigma * torch.randn_like(mu))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1 - 2 * sigma.log()).sum(1)
        elbo = self.log_likelihood(x, recon) - kl
        return -elbo.mean(), {"elbo": float(elbo.mean())}

    # --- closed forms --------------------------------------------------------------------------
    @property
    def sigma_max(self) -> float:
        """sigma_max(A_eff) (= sigma_max(A) for a scalar s)."""
        return float(torch.linalg.matrix_norm(self.A_eff.double(), ord=2))

    @property
    def frobenius(self) -> float:
        return float(torch.linalg.matrix_norm(self.A.double()))

    def exact_probability(self, delta_norm_in_latent: float, r: float) -> float:
        """p_r for a perturbation with ||A_eff delta|| = ``delta_norm_in_latent`` (||A delta|| for a scalar s)."""
        threshold = (r / (self.w * self.s)) ** 2
        lam = (delta_norm_in_latent / self.s) ** 2
        if lam == 0.0:
            return float(stats.chi2.cdf(threshold, self.latent_dim))
        return float(stats.ncx2.cdf(threshold, self.latent_dim, lam))

    def exact_worst_probability(self, rho: float, r: float) -> float:
        """p_r under the worst perturbation of norm rho."""
        return self.exact_probability(self.sigma_max * rho, r)

    def exact_margin(self, r: float, m: float = 0.5) -> float:
        """R_X^r(x): the rho where the worst-case p_r crosses m (0 if p_r(x, 0) <= m)."""
        if self.exact_worst_probability(0.0, r) <= m:
            return 0.0
        hi = 1.0
        while self.exact_worst_probability(hi, r) > m:
            hi *= 2
        return float(optimize.brentq(lambda rho: self.exact_worst_probability(rho, r) - m, 0.0, hi,
                                     xtol=1e-12))

    def exact_bound(self, r: float) -> float:
        """Theorem 1: s * probit(p_r(x, 0)) / ||A||_F (may be <= 0: vacuous)."""
        return self.s * float(special.ndtri(self.exact_worst_probability(0.0, r))) / self.frobenius

    def exact_min_r(self, m: float = 0.5) -> float:
        """Smallest r with p_r(x, 0) >= m: w s sqrt(chi2_k quantile m)."""
        return self.w * self.s * math.sqrt(float(stats.chi2.ppf(m, self.latent_dim)))
