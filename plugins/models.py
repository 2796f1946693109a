"""Built-in model families: VAE, beta-VAE, sigma-offset VAE, beta-TCVAE, autoencoder, fixed-sigma VAE,
and the ready-built ``linear_gaussian`` and ``from_file`` families.

Every trainable model is a :class:`VAE` (or subclass) meeting :class:`robbench.protocols.VAEModel`, with
a ``decoder`` attribute: an ``nn.Sequential`` mapping latents (N, k) to the flattened decoder mean (N, D)
in [0, 1], so ``decode(z) == decoder(z).view(-1, *input_shape)``.

Parameters shared by the trainable families (``ModelFamily.defaults``):

- ``latent_dim`` (int, 10): latent size k.
- ``hidden`` (int, 256): width of the MLP hidden layers (for ``conv``: of the fully connected layer).
- ``layers`` (int, 1): number of MLP hidden layers in the encoder (the decoder mirrors it).
- ``activation`` ("relu"): one of relu, elu, leaky_relu, tanh, softplus, gelu.
- ``architecture`` ("auto"): "mlp", "conv", or "auto" (conv for 3-channel images, else MLP).
- ``conv_channels`` (list, [32, 64]): channels of the stride-2 conv layers (each halves H and W).
- ``likelihood`` ("auto"): "bernoulli", "gaussian", or "auto" (Gaussian for 3-channel images).
- ``obs_sigma`` (null): the Gaussian likelihood's shared scale: null = learned, or a fixed number > 0.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robbench.hookspecs import hookimpl
from robbench.protocols import ModelFamily
from robbench_plugins import networks

SIGMA_EPS = 1e-4  # keeps the softplus sigma strictly positive


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class VAE(nn.Module):
    """Gaussian-encoder VAE: sigma(x) = softplus(.) + eps + tau; objective -(E log p(x|z) - beta KL).

    encoder: (B, *input_shape) -> (B, 2k) [mu | pre-sigma]; decoder: (N, k) -> (N, D) ending in Sigmoid.
    ``beta`` weights the KL in the training objective only; the logged ``elbo`` always uses beta = 1.
    ``tau`` (>= 0) is added to sigma (the paper's Fig. 7 offset), also inside the KL.
    """

    encoder_outputs_per_latent = 2

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, encoder: nn.Module,
                 decoder: nn.Sequential, likelihood: nn.Module, *, beta: float = 1.0, tau: float = 0.0):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = int(latent_dim)
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.beta = float(beta)
        self.tau = float(tau)

    # --- VAEModel protocol ---------------------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, *input_shape); returns mu, sigma: (B, k), sigma >= tau + eps > 0."""
        mu, pre = self.encoder(x).chunk(2, dim=1)
        return mu, F.softplus(pre) + SIGMA_EPS + self.tau

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, k); returns the decoder mean (N, *input_shape) in [0, 1]."""
        return self.decoder(z).view(-1, *self.input_shape)

    def log_likelihood(self, x: Tensor, recon: Tensor) -> Tensor:
        """log p(x | z) with decoder mean ``recon``; x, recon: (B, *input_shape); returns (B,) nats."""
        return self.likelihood.log_prob(x.flatten(1), recon.flatten(1))

    def encoder_mean_layers(self) -> list[nn.Module]:
        """mu(x) as a plain module list (the encoder with its last layer cut to the k mean outputs), for
        the certified bounds of :mod:`robbench.bounds`. Raises ValueError for an encoder that is not an
        ``nn.Sequential`` ending in ``nn.Linear``."""
        layers = list(self.encoder.children()) if isinstance(self.encoder, nn.Sequential) else []
        if not layers or not isinstance(layers[-1], nn.Linear):
            raise ValueError(f"{type(self).__name__}: encoder is not an nn.Sequential ending in nn.Linear")
        last, k = layers[-1], self.latent_dim
        head = nn.Linear(last.in_features, k, bias=last.bias is not None)
        with torch.no_grad():
            head.weight.copy_(last.weight[:k])
            if last.bias is not None:
                head.bias.copy_(last.bias[:k])
        return [*layers[:-1], head]

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        """One-sample reparameterised objective on a batch; returns (scalar, logs incl. ``elbo``)."""
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(mu)
        rec = self._recon_log_prob(x, z)
        kl = gaussian_kl(mu, sigma)
        objective = -(rec - self.beta * kl).mean()
        return objective, _logs(elbo=rec - kl, recon=rec, kl=kl)

    # --- helpers -------------------------------------------------------------------------------
    def _recon_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) from the decoder's logits (the Sigmoid is dropped for numerical stability)."""
        logits = self.decoder[:-1](z)
        return self.likelihood.log_prob_logits(x.flatten(1), logits)


def _logs(**per_example: Tensor) -> dict[str, float]:
    """Batch means of per-example (B,) quantities as plain floats, for logging."""
    return {k: float(v.detach().mean()) for k, v in per_example.items()}


def gaussian_kl(mu: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(mu, diag sigma^2) || N(0, I)) per row: (B, k) -> (B,)."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1 - 2 * sigma.log()).sum(1)


class BetaTCVAE(VAE):
    """beta-TCVAE (Chen et al. 2018): objective -(E log p(x|z) - KL - (beta - 1) TC), i.e. the KL's
    mutual-information and dimension-wise parts keep weight 1 and the total correlation gets beta.
    TC is estimated on the minibatch by minibatch-weighted sampling; ``dataset_size`` (N, set by the
    trainer) only shifts the logged TC by a constant, not the gradient."""

    dataset_size: int | None = None

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        mu, sigma = self.encode(x)
        z = mu + sigma * torch.randn_like(mu)
        rec = self._recon_log_prob(x, z)
        kl = gaussian_kl(mu, sigma)
        tc = total_correlation_mws(z, mu, sigma, self.dataset_size or x.shape[0])
        objective = -(rec - kl - (self.beta - 1.0) * tc).mean()
        return objective, _logs(elbo=rec - kl, recon=rec, kl=kl, tc=tc)


def total_correlation_mws(z: Tensor, mu: Tensor, sigma: Tensor, dataset_size: int) -> Tensor:
    """Minibatch-weighted-sampling estimate of log q(z_i) - sum_d log q(z_id) for each row i: (B,).

    z, mu, sigma: (B, k); q(z) ~ (1 / (N M)) sum_j q(z | x_j) over the M rows of the batch.
    """
    m = z.shape[0]
    log_n = math.log(dataset_size * m)
    # log N(z_i,d | mu_j,d, sigma_j,d): (M, M, k)
    diff = (z.unsqueeze(1) - mu.unsqueeze(0)) / sigma.unsqueeze(0)
    log_q = -0.5 * diff.pow(2) - sigma.log().unsqueeze(0) - 0.5 * math.log(2 * math.pi)
    log_qz = torch.logsumexp(log_q.sum(2), dim=1) - log_n
    log_prod_marginals = (torch.logsumexp(log_q, dim=1) - log_n).sum(1)
    return log_qz - log_prod_marginals


class FixedSigmaVAE(VAE):
    """VAE whose encoder sigma does not depend on x (Ghosh et al. 2020): a learned per-dimension
    constant (``sigma=None``, starting at 1) or a set number. The encoder outputs mu only."""

    encoder_outputs_per_latent = 1

    def __init__(self, *args: Any, sigma: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        k = self.latent_dim
        if sigma is None:
            self.log_sigma = nn.Parameter(torch.zeros(k))
        else:
            self.register_buffer("log_sigma", torch.full((k,), math.log(float(sigma))))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.encoder(x)
        return mu, (self.log_sigma.exp() + self.tau).expand_as(mu)


class Autoencoder(VAE):
    """Deterministic autoencoder: sigma(x) == 0 exactly, objective -log p(x | g(mu(x))).

    Its KL to the prior is infinite, so the logged ``elbo`` is the reconstruction log-likelihood
    log p(x | g(mu(x))) alone. With sigma == 0 the robustness margin collapses (Theorem 1's bound is 0).
    """

    encoder_outputs_per_latent = 1

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.encoder(x)
        return mu, torch.zeros_like(mu)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, float]]:
        rec = self._recon_log_prob(x, self.encoder(x))
        return -rec.mean(), _logs(elbo=rec, recon=rec)


# ---------------------------------------------------------------------------------------------
# Building from parameters
# ---------------------------------------------------------------------------------------------
COMMON_DEFAULTS: dict[str, Any] = {
    "latent_dim": 10,
    "hidden": 256,
    "layers": 1,
    "activation": "relu",
    "architecture": "auto",
    "conv_channels": [32, 64],
    "likelihood": "auto",
    "obs_sigma": None,
}


def build_model(cls: type[VAE], params: dict[str, Any], input_shape: tuple[int, ...],
                **extra: Any) -> VAE:
    """Build an untrained ``cls`` for ``input_shape`` from the shared parameters (see module doc)."""
    p = {**COMMON_DEFAULTS, **params}
    input_shape = tuple(input_shape)
    k = int(p["latent_dim"])
    n_out = k * cls.encoder_outputs_per_latent
    arch = networks.resolve_architecture(p["architecture"], input_shape)
    if arch == "mlp":
        hidden = networks.widths(p["hidden"], p["layers"])
        enc = networks.mlp_encoder(input_shape, hidden, n_out, p["activation"])
        dec = networks.mlp_decoder(input_shape, hidden, k, p["activation"])
    else:
        fc = networks.widths(p["hidden"])[0]
        enc = networks.conv_encoder(input_shape, p["conv_channels"], fc, n_out, p["activation"])
        dec = networks.conv_decoder(input_shape, p["conv_channels"], fc, k, p["activation"])
    lik = networks.make_likelihood(networks.resolve_likelihood(p["likelihood"], input_shape),
                                   p["obs_sigma"])
    return cls(input_shape, k, enc, dec, lik, **extra)


# ---------------------------------------------------------------------------------------------
# Validation: each check raises ValueError naming the key and the value
# ---------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "latent_dim": (_positive_int, "a positive integer"),
    "hidden": (lambda v: _positive_int(v) or (isinstance(v, (list, tuple)) and len(v) > 0
                                              and all(_positive_int(h) for h in v)),
               "a positive integer or a non-empty list of them"),
    "activation": (lambda v: v in networks.ACTIVATIONS, f"one of {sorted(networks.ACTIVATIONS)}"),
    "architecture": (lambda v: v in networks.ARCHITECTURES, f"one of {list(networks.ARCHITECTURES)}"),
    "conv_channels": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                      and all(_positive_int(c) for c in v), "a non-empty list of positive integers"),
    "likelihood": (lambda v: v in networks.LIKELIHOODS, f"one of {list(networks.LIKELIHOODS)}"),
    "layers": (_positive_int, "a positive integer"),
    "obs_sigma": (lambda v: v is None or (_is_number(v) and v > 0), "null (learned) or a number > 0"),
    "beta": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "tau": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "sigma": (lambda v: v is None or (_is_number(v) and v > 0), "null (learned) or a number > 0"),
    "s": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "w": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "singular_values": (lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                                and all(_is_number(s) and s > 0 for s in v)),
                        "null or a list of numbers > 0"),
    "path": (lambda v: isinstance(v, str) and v != "", "a non-empty path string"),
}


def make_validator(family: str, defaults: dict[str, Any], sweep: tuple[str, ...],
                   extra: Callable[[dict[str, Any]], None] | None = None) -> Callable[[dict[str, Any]], None]:
    """A ``validate(params)`` for a family: unknown keys and bad values raise ValueError naming them;
    keys in ``sweep`` may hold a list of values, each checked. ``extra(merged_params)`` adds the family's
    own cross-parameter checks (it raises ValueError with a message the family's name is put before)."""

    def validate(params: dict[str, Any]) -> None:
        for key, value in params.items():
            if key not in defaults:
                raise ValueError(f"model {family!r}: unknown parameter {key!r} (={value!r}); "
                                 f"known: {', '.join(sorted(defaults))}")
            check, expected = CHECKS[key]
            values = value if key in sweep and isinstance(value, (list, tuple)) else [value]
            if key in sweep and isinstance(value, (list, tuple)) and not value:
                raise ValueError(f"model {family!r}: parameter {key!r} is an empty list")
            for v in values:
                if not check(v):
                    raise ValueError(f"model {family!r}: parameter {key}={v!r} must be {expected}")
        if extra is not None:
            try:
                extra({**defaults, **params})
            except ValueError as err:
                raise ValueError(f"model {family!r}: {err}") from None

    return validate


def _family(name: str, description: str, build: Callable[[dict[str, Any], tuple[int, ...]], nn.Module],
            defaults: dict[str, Any], sweep: tuple[str, ...] = (), trainable: bool = True,
            extra: Callable[[dict[str, Any]], None] | None = None) -> ModelFamily:
    return ModelFamily(name=name, description=description, build=build, defaults=defaults, sweep=sweep,
                       trainable=trainable, validate=make_validator(name, defaults, sweep, extra))


def _check_singular_values(p: dict[str, Any]) -> None:
    if p.get("singular_values") is not None and len(p["singular_values"]) != p["latent_dim"]:
        raise ValueError(f"singular_values={p['singular_values']!r} must have latent_dim={p['latent_dim']} entries")


def _check_path(p: dict[str, Any]) -> None:
    if not p.get("path"):
        raise ValueError("parameter 'path' is required (a checkpoint saved by robbench)")
    path = Path(p["path"]).expanduser()
    if not path.is_file():  # found before any work, not when the model is built (every row failed)
        raise ValueError(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}")


# ---------------------------------------------------------------------------------------------
# Ready-built families
# ---------------------------------------------------------------------------------------------
def build_linear_gaussian(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """The analytic :class:`robbench_plugins.analytic.LinearGaussianVAE` for ``input_shape`` (no training)."""
    from robbench_plugins.analytic import LinearGaussianVAE

    p = {**LINEAR_GAUSSIAN_DEFAULTS, **params}
    return LinearGaussianVAE(tuple(input_shape), int(p["latent_dim"]), s=float(p["s"]), w=float(p["w"]),
                             singular_values=p["singular_values"], seed=int(p["seed"]))


def build_from_file(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Load a checkpoint written by :mod:`robbench.training` (``weights_only=True``) from ``path``."""
    from robbench.plugins import get_registries
    from robbench.training import load_checkpoint_file

    model, _meta = load_checkpoint_file(Path(params["path"]).expanduser(), get_registries().models.get,
                                        expected_input_shape=tuple(input_shape))
    return model


LINEAR_GAUSSIAN_DEFAULTS: dict[str, Any] = {"latent_dim": 4, "s": 0.5, "w": 2.0, "singular_values": None,
                                            "seed": 0}


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def families() -> list[ModelFamily]:
    """Every built-in family (what :func:`register_models` registers)."""

    def vae_build(cls: type[VAE], *extra_keys: str, **fixed: Any):
        def build(params: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
            extra = {k: params[k] for k in extra_keys if k in params}
            return build_model(cls, params, input_shape, **{**fixed, **extra})
        return build

    c = COMMON_DEFAULTS
    return [
        _family("vae", "Gaussian-encoder VAE (beta = 1).", vae_build(VAE), dict(c)),
        _family("beta_vae", "beta-VAE: KL weighted by beta (sweep; default 0.1, 1, 10).",
                vae_build(VAE, "beta"), {**c, "beta": [0.1, 1.0, 10.0]}, sweep=("beta",)),
        _family("sigma_offset_vae", "VAE with encoder sigma(x) + tau (sweep; default 0, 0.1, 0.5, 1).",
                vae_build(VAE, "tau"), {**c, "tau": [0.0, 0.1, 0.5, 1.0]}, sweep=("tau",)),
        _family("beta_tcvae", "beta-TCVAE: total correlation weighted by beta (minibatch-weighted sampling).",
                vae_build(BetaTCVAE, "beta"), {**c, "beta": 6.0}, sweep=("beta",)),
        _family("ae", "Deterministic autoencoder (sigma == 0: the margin collapses).",
                vae_build(Autoencoder), dict(c)),
        _family("fixed_sigma_vae", "VAE with input-independent encoder sigma, learned or set.",
                vae_build(FixedSigmaVAE, "sigma"), {**c, "sigma": None}, sweep=("sigma",)),
        _family("linear_gaussian", "Analytic linear-Gaussian VAE with closed-form margins (no training).",
                build_linear_gaussian, dict(LINEAR_GAUSSIAN_DEFAULTS), trainable=False, extra=_check_singular_values),
        _family("from_file", "A model loaded from a robbench checkpoint file (parameter 'path').",
                build_from_file, {"path": ""}, trainable=False, extra=_check_path),
    ]


@hookimpl
def register_models(register: Callable) -> None:
    for family in families():
        register(family)
