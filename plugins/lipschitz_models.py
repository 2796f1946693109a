"""The ``lipschitz_vae`` family: a VAE whose encoder mean has a chosen Lipschitz constant, so a robustness
level can be set up front and certified by the ``certified`` estimator (cf. Barrett et al., "Certifiably
Robust Variational Autoencoders", AISTATS 2022).

Encoder: Flatten -> [constrained Linear, activation] * layers -> two heads on the last hidden features:
mu = lipschitz * (constrained Linear) and sigma = sigma_floor + softplus(Linear) + 1e-4. Constrained
linear maps have spectral norm ~<= 1 by construction:

- ``constraint: bjorck`` (default): the weight, divided by a power-iteration estimate of its spectral
  norm, is orthonormalised by ``bjorck_iters`` first-order Björck iterations W <- 1.5 W - 0.5 W W^T W
  (Anil et al. 2019), so its singular values are ~1 (orthogonal initialisation keeps few iterations
  enough): with the gradient-norm-preserving MaxMin activation (``activation: groupsort``) the encoder
  uses its whole Lipschitz budget;
- ``constraint: spectral``: torch's spectral normalisation (one power-iteration step per training step).

So mu is at most ``lipschitz``-Lipschitz in input L2 units (the certificate does not trust this: it
recomputes every layer's spectral norm from the weights actually used). sigma does not need a constraint:
the certificate takes it at the clean input. ``constrain_decoder: true`` builds the decoder from the same
layers (1-Lipschitz up to the final Sigmoid); otherwise it is the plain MLP decoder of the other families.

Parameters (besides ``latent_dim``, ``hidden``, ``layers``, ``likelihood``, ``obs_sigma`` shared with the
other families): ``lipschitz`` (sweep, default 1.0), ``sigma_floor`` (sweep, default 1.0), ``constraint``,
``activation`` (``groupsort`` or any activation of the other families), ``bjorck_iters`` (default 4),
``beta`` (KL weight, default 1), ``constrain_decoder`` (default false).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robbench.bounds.network import MaxMin
from robbench.hookspecs import hookimpl
from robbench.protocols import ModelFamily
from robbench_plugins import networks
from robbench_plugins.models import SIGMA_EPS, VAE, make_validator

CONSTRAINTS = ("bjorck", "spectral")


class BjorckOrthonormal(nn.Module):
    """Parametrisation W -> nearly orthonormal W (rows if out <= in, else columns): divide by a power-
    iteration estimate of ||W||_2 (a persistent vector, one step per training forward, as torch's spectral
    normalisation does), then ``iters`` first-order Björck steps W <- 1.5 W - 0.5 W W^T W, which push every
    singular value in (0, sqrt 3) towards 1."""

    def __init__(self, n_in: int, iters: int = 15):
        super().__init__()
        self.iters = int(iters)
        self.register_buffer("v", F.normalize(torch.randn(n_in), dim=0))

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            v = self.v
            if self.training:
                v = F.normalize(w.T @ F.normalize(w @ v, dim=0), dim=0)
                self.v.copy_(v)
        scale = (w @ v).norm().clamp(min=1e-12)
        w = w / scale
        wide = w.shape[0] <= w.shape[1]
        for _ in range(self.iters):
            w = 1.5 * w - 0.5 * ((w @ w.T) @ w if wide else w @ (w.T @ w))
        return w


def constrained_linear(n_in: int, n_out: int, constraint: str, bjorck_iters: int) -> nn.Linear:
    """An ``nn.Linear`` whose weight has spectral norm <= 1 (approximately 1 with Björck)."""
    layer = nn.Linear(n_in, n_out)
    if constraint == "bjorck":
        nn.init.orthogonal_(layer.weight)
        parametrize.register_parametrization(layer, "weight", BjorckOrthonormal(n_in, bjorck_iters))
        return layer
    if constraint == "spectral":
        return torch.nn.utils.parametrizations.spectral_norm(layer)
    raise ValueError(f"constraint={constraint!r} is not one of {list(CONSTRAINTS)}")


def _activation(name: str) -> nn.Module:
    return MaxMin() if name == "groupsort" else networks.activation(name)


class LipschitzVAE(VAE):
    """VAE with a Lipschitz-constrained encoder mean (module docstring). ``encoder`` is the shared trunk
    (B, *input_shape) -> (B, h); ``mu_head`` and ``sigma_head`` map h to k."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, trunk: nn.Sequential, mu_head: nn.Linear,
                 sigma_head: nn.Linear, decoder: nn.Sequential, likelihood: nn.Module, *, lipschitz: float,
                 sigma_floor: float, beta: float = 1.0):
        super().__init__(input_shape, latent_dim, trunk, decoder, likelihood, beta=beta)
        self.mu_head = mu_head
        self.sigma_head = sigma_head
        self.lipschitz = float(lipschitz)
        self.sigma_floor = float(sigma_floor)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, *input_shape); returns mu (B, k) and sigma >= sigma_floor + 1e-4."""
        h = self.encoder(x)
        return self.lipschitz * self.mu_head(h), self.sigma_floor + SIGMA_EPS + F.softplus(self.sigma_head(h))

    def encoder_mean_layers(self) -> list[nn.Module]:
        """The trunk's modules and the mu head as a plain Linear with the Lipschitz factor folded in."""
        head = nn.Linear(self.mu_head.in_features, self.mu_head.out_features)
        with torch.no_grad():
            head.weight.copy_(self.lipschitz * self.mu_head.weight)
            head.bias.copy_(self.lipschitz * self.mu_head.bias)
        return [*self.encoder.children(), head]


DEFAULTS: dict[str, Any] = {"latent_dim": 10, "hidden": 256, "layers": 1, "likelihood": "auto", "obs_sigma": None,
                            "lipschitz": 1.0, "sigma_floor": 1.0, "constraint": "bjorck", "activation": "groupsort",
                            "bjorck_iters": 4, "beta": 1.0, "constrain_decoder": False}


def build(params: dict[str, Any], input_shape: tuple[int, ...]) -> LipschitzVAE:
    """An untrained :class:`LipschitzVAE` for ``input_shape`` from the family's parameters."""
    p = {**DEFAULTS, **params}
    input_shape = tuple(input_shape)
    k, hidden = int(p["latent_dim"]), networks.widths(p["hidden"], p["layers"])
    con, iters = str(p["constraint"]), int(p["bjorck_iters"])
    sizes = [math.prod(input_shape), *hidden]
    trunk: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        trunk += [constrained_linear(a, b, con, iters), _activation(p["activation"])]
    if p["constrain_decoder"]:
        dec_sizes = [k, *reversed(hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(dec_sizes[:-1], dec_sizes[1:]):
            layers += [constrained_linear(a, b, con, iters), _activation(p["activation"])]
        layers += [constrained_linear(dec_sizes[-1], math.prod(input_shape), con, iters), nn.Sigmoid()]
        decoder = nn.Sequential(*layers)
    else:
        act = "relu" if p["activation"] == "groupsort" else p["activation"]
        decoder = networks.mlp_decoder(input_shape, hidden, k, act)
    lik = networks.make_likelihood(networks.resolve_likelihood(p["likelihood"], input_shape), p["obs_sigma"])
    return LipschitzVAE(input_shape, k, nn.Sequential(*trunk), constrained_linear(sizes[-1], k, con, iters),
                        nn.Linear(sizes[-1], k), decoder, lik, lipschitz=float(p["lipschitz"]),
                        sigma_floor=float(p["sigma_floor"]), beta=float(p["beta"]))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lipschitz": (lambda v: _number(v) and v > 0, "a number > 0"),
    "sigma_floor": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "constraint": (lambda v: v in CONSTRAINTS, f"one of {list(CONSTRAINTS)}"),
    "activation": (lambda v: v == "groupsort" or v in networks.ACTIVATIONS,
                   f"'groupsort' or one of {sorted(networks.ACTIVATIONS)}"),
    "bjorck_iters": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "constrain_decoder": (lambda v: isinstance(v, bool), "true or false"),
}


def family() -> ModelFamily:
    sweep = ("lipschitz", "sigma_floor")
    base = make_validator("lipschitz_vae", DEFAULTS, sweep)

    def validate(params: dict[str, Any]) -> None:
        own = {k: v for k, v in params.items() if k in _CHECKS}
        shared = {k: v for k, v in params.items() if k not in _CHECKS}
        base(shared)  # unknown keys and the shared parameters' values
        for key, value in own.items():
            check, expected = _CHECKS[key]
            for v in (value if key in sweep and isinstance(value, (list, tuple)) else [value]):
                if not check(v):
                    raise ValueError(f"model 'lipschitz_vae': parameter {key}={v!r} must be {expected}")
        p = {**DEFAULTS, **params}
        if p["activation"] == "groupsort" and any(h % 2 for h in networks.widths(p["hidden"], p["layers"])):
            raise ValueError(f"model 'lipschitz_vae': activation 'groupsort' needs even hidden widths, got "
                             f"hidden={p['hidden']!r}")

    return ModelFamily(name="lipschitz_vae",
                       description="VAE with a Lipschitz-constrained encoder mean (Björck/GroupSort or spectral "
                                   "normalisation; sweeps 'lipschitz' and 'sigma_floor'), sigma >= sigma_floor",
                       build=build, defaults=dict(DEFAULTS), sweep=sweep, validate=validate)



@hookimpl
def register_models(register: Callable) -> None:
    register(family())
