"""MyVAE: a small MLP VAE meeting robbench's model protocol (robbench.protocols.VAEModel).

What a trainable model must provide:
- attributes ``input_shape`` (tuple, e.g. (1, 28, 28)) and ``latent_dim`` (int);
- ``encode(x) -> (mu, sigma)``: x (B, *input_shape) in [0, 1]; mu, sigma (B, latent_dim), sigma >= 0;
- ``decode(z) -> recon``: z (N, latent_dim); the decoder mean (N, *input_shape);
- ``log_likelihood(x, recon) -> (B,)``: log p(x | z) for the decoder mean recon = g(z), in nats;
- ``loss(x) -> (scalar, logs)``: the training objective to minimise, and floats to log including
  ``elbo`` (the per-example ELBO, beta = 1).
Optionally ``input_range = (lo, hi)`` when inputs are not in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MyVAE(nn.Module):
    """Bernoulli-decoder VAE whose KL term is weighted by ``gamma``."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int = 16, gamma: float = 1.0, hidden: int = 128):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        self.gamma = float(gamma)
        d = math.prod(self.input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        # A Linear/ReLU/Sigmoid stack: robbench's compiled Monte Carlo kernel decodes it directly.
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Sigmoid())

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, pre = self.encoder(x).chunk(2, dim=1)
        return mu, F.softplus(pre) + 1e-4

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z).view(-1, *self.input_shape)

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        p = recon.flatten(1).clamp(1e-6, 1 - 1e-6)
        t = x.flatten(1)
        return (t * p.log() + (1 - t) * (1 - p).log()).sum(1)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(mu)
        rec = self.log_likelihood(x, self.decode(z))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1 - 2 * sigma.log()).sum(1)
        return -(rec - self.gamma * kl).mean(), {"elbo": float((rec - kl).mean())}
