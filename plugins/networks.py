"""Encoder/decoder builders (MLP and convolutional) and observation likelihoods for the built-in VAEs.

Shapes: images (B, *input_shape) in [0, 1]; encoders return (B, n_out) features; decoders are
``nn.Sequential`` modules mapping latents (N, k) to the flattened decoder mean (N, D), always ending in
``nn.Sigmoid`` so the mean lies in [0, 1] and ``decoder[:-1]`` gives the logits (numerically stable
training). MLP decoders are exactly ``Linear, act, ..., Linear, Sigmoid`` (the Monte Carlo kernels
rely on that layout).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
}
ARCHITECTURES = ("auto", "mlp", "conv")
LIKELIHOODS = ("auto", "bernoulli", "gaussian")


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation={name!r} is not one of {sorted(ACTIVATIONS)}") from None


def widths(hidden: int | Sequence[int], layers: int = 1) -> list[int]:
    """Hidden layer widths: ``layers`` layers of width ``hidden``, or an explicit list of widths."""
    return [int(hidden)] * int(layers) if isinstance(hidden, int) else [int(h) for h in hidden]


def resolve_architecture(architecture: str, input_shape: tuple[int, ...]) -> str:
    """"auto" -> "conv" for 3-channel images (C, H, W) with C == 3, else "mlp"."""
    if architecture != "auto":
        return architecture
    return "conv" if len(input_shape) == 3 and input_shape[0] == 3 else "mlp"


def resolve_likelihood(likelihood: str, input_shape: tuple[int, ...]) -> str:
    """"auto" -> "gaussian" for 3-channel (colour) images, "bernoulli" for grey/binary ones."""
    if likelihood != "auto":
        return likelihood
    return "gaussian" if len(input_shape) == 3 and input_shape[0] == 3 else "bernoulli"


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------
def mlp_encoder(input_shape: tuple[int, ...], hidden: int | Sequence[int], n_out: int,
                act: str = "relu") -> nn.Sequential:
    """Flatten -> [Linear, act]* -> Linear(n_out): (B, *input_shape) -> (B, n_out)."""
    sizes = [math.prod(input_shape), *widths(hidden)]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation(act)]
    layers.append(nn.Linear(sizes[-1], n_out))
    return nn.Sequential(*layers)


def mlp_decoder(input_shape: tuple[int, ...], hidden: int | Sequence[int], latent_dim: int,
                act: str = "relu") -> nn.Sequential:
    """Linear, act, ..., Linear(D), Sigmoid: (N, k) -> (N, D); widths mirror the encoder's."""
    sizes = [latent_dim, *reversed(widths(hidden))]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation(act)]
    layers += [nn.Linear(sizes[-1], math.prod(input_shape)), nn.Sigmoid()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# Convolutional (stride-2, kernel-4 layers that halve / double the spatial size)
# ---------------------------------------------------------------------------------------------
def _conv_geometry(input_shape: tuple[int, ...], channels: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"architecture='conv' needs (C, H, W) inputs, got input_shape={input_shape}")
    c, h, w = input_shape
    scale = 2 ** len(channels)
    if h % scale or w % scale:
        raise ValueError(f"conv_channels={list(channels)} halves the image {len(channels)} times, "
                         f"but input_shape={input_shape} is not divisible by {scale}")
    return c, h // scale, w // scale


def conv_encoder(input_shape: tuple[int, ...], channels: Sequence[int], hidden: int, n_out: int,
                 act: str = "relu") -> nn.Sequential:
    """[Conv(4, stride 2), act]* -> Flatten -> Linear(hidden), act -> Linear(n_out)."""
    c, h, w = _conv_geometry(input_shape, channels)
    layers: list[nn.Module] = []
    for a, b in zip([c, *channels[:-1]], channels):
        layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), activation(act)]
    layers += [nn.Flatten(), nn.Linear(channels[-1] * h * w, hidden), activation(act),
               nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers)


def conv_decoder(input_shape: tuple[int, ...], channels: Sequence[int], hidden: int, latent_dim: int,
                 act: str = "relu") -> nn.Sequential:
    """Linear(hidden), act, Linear, act, Unflatten, [ConvT(4, stride 2), act]*, ConvT, Flatten, Sigmoid:
    (N, k) -> (N, D), mirroring :func:`conv_encoder`."""
    c, h, w = _conv_geometry(input_shape, channels)
    rev = list(reversed(channels))
    layers: list[nn.Module] = [nn.Linear(latent_dim, hidden), activation(act),
                               nn.Linear(hidden, rev[0] * h * w), activation(act),
                               nn.Unflatten(1, (rev[0], h, w))]
    for a, b in zip(rev[:-1], rev[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1), activation(act)]
    layers += [nn.ConvTranspose2d(rev[-1], c, 4, stride=2, padding=1), nn.Flatten(), nn.Sigmoid()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# Likelihoods p(x | z), summed over pixels
# ---------------------------------------------------------------------------------------------
class BernoulliLikelihood(nn.Module):
    """Bernoulli (continuous-target cross-entropy) likelihood for grey or binary images."""

    name = "bernoulli"
    _eps = 1e-6

    def log_prob(self, x: Tensor, mean: Tensor) -> Tensor:
        """x, mean: (B, D) with mean in (0, 1); returns (B,) nats."""
        p = mean.clamp(self._eps, 1 - self._eps)
        return (x * p.log() + (1 - x) * (1 - p).log()).sum(1)

    def log_prob_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        """Same, from pre-sigmoid logits (stable for training); returns (B,)."""
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


class GaussianLikelihood(nn.Module):
    """Gaussian likelihood N(x; mean, s^2 I) with one shared scale s, learned (``obs_sigma=None``,
    starts at 0.1) or fixed to a number."""

    name = "gaussian"

    def __init__(self, obs_sigma: float | None = None):
        super().__init__()
        init = math.log(0.1 if obs_sigma is None else float(obs_sigma))
        if obs_sigma is None:
            self.log_scale = nn.Parameter(torch.tensor(init))
        else:
            self.register_buffer("log_scale", torch.tensor(init))

    @property
    def scale(self) -> Tensor:
        # a floor keeps a learned scale from collapsing to a degenerate likelihood
        return self.log_scale.clamp(min=math.log(1e-3)).exp()

    def log_prob(self, x: Tensor, mean: Tensor) -> Tensor:
        """x, mean: (B, D); returns (B,) nats."""
        s = self.scale
        z = (x - mean) / s
        return (-0.5 * z.pow(2) - s.log() - 0.5 * math.log(2 * math.pi)).sum(1)

    def log_prob_logits(self, x: Tensor, logits: Tensor) -> Tensor:
        return self.log_prob(x, torch.sigmoid(logits))


def make_likelihood(name: str, obs_sigma: float | None = None) -> nn.Module:
    """"bernoulli" or "gaussian" (with ``obs_sigma``)."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(obs_sigma)
    raise ValueError(f"likelihood={name!r} is not one of {LIKELIHOODS[1:]}")
