"""A feed-forward network as a list of dense steps on flat vectors, the form the bounds work on.

A model that wants its encoder mean certified exposes ``encoder_mean_layers()``: a sequence of torch
modules that, applied in order to x: (B, *input_shape), give mu(x): (B, k). Supported modules:
``nn.Linear``, ``nn.Conv2d`` (turned into a dense matrix, so only for small images), ``nn.Flatten``,
``nn.Unflatten``, ``nn.Identity``, the activations in :mod:`robbench.bounds.activations`
(ReLU, LeakyReLU, ELU, Softplus, Sigmoid, Tanh, GELU) and :class:`MaxMin` (GroupSort with groups of 2).
Anything else raises :class:`UnsupportedNetwork` naming the module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from robbench.bounds import activations


class UnsupportedNetwork(ValueError):
    """The encoder cannot be turned into dense steps (a module type the bounds do not know)."""


class MaxMin(nn.Module):
    """GroupSort with groups of two (Anil et al. 2019): each consecutive pair (a, b) of features becomes
    (max(a, b), min(a, b)). Gradient-norm preserving and 1-Lipschitz. x: (B, n) with n even -> (B, n)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"MaxMin needs an even number of features, got {x.shape[-1]}")
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((pairs.max(-1).values, pairs.min(-1).values), -1).flatten(-2)


@dataclass
class Affine:
    """y = weight @ v + bias; weight: (out, in) float64, bias: (out,) float64."""

    weight: Tensor
    bias: Tensor


@dataclass
class Elementwise:
    """An elementwise activation (see :mod:`robbench.bounds.activations` for ``kind`` and ``params``)."""

    kind: str
    params: dict


@dataclass
class PairSort:
    """MaxMin on consecutive pairs of a flat vector."""


Step = Union[Affine, Elementwise, PairSort]


def _conv_dense(conv: nn.Conv2d, shape: tuple[int, ...], max_elements: int) -> tuple[Affine, tuple[int, ...]]:
    n_in = math.prod(shape)
    with torch.no_grad():
        out_shape = tuple(conv(torch.zeros(1, *shape, dtype=conv.weight.dtype)).shape[1:])
    n_out = math.prod(out_shape)
    if n_in * n_out > max_elements:
        raise UnsupportedNetwork(f"Conv2d {tuple(shape)} -> {out_shape} as a dense matrix has {n_in * n_out} "
                                 f"entries, more than max_elements={max_elements}")
    w = conv.weight.detach().double()
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, *shape)
    cols = torch.nn.functional.conv2d(eye, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    bias = (conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64))
    bias_full = bias.view(-1, 1, 1).expand(out_shape).reshape(-1)
    return Affine(cols.reshape(n_in, n_out).T.contiguous(), bias_full.clone()), out_shape


def dense_steps(layers: Sequence[nn.Module], input_shape: tuple[int, ...], *,
                max_elements: int = 1 << 25) -> list[Step]:
    """The modules as dense steps on flat float64 vectors. ``input_shape`` excludes the batch; nested
    ``nn.Sequential`` modules are flattened. Raises :class:`UnsupportedNetwork` for unknown modules."""
    steps: list[Step] = []
    shape = tuple(input_shape)
    flat: list[nn.Module] = []
    for layer in layers:
        flat.extend(layer.children() if isinstance(layer, nn.Sequential) else [layer])
    for layer in flat:
        if isinstance(layer, (nn.Identity, nn.Dropout)):
            continue
        if isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, nn.Unflatten):
            shape = tuple(int(s) for s in layer.unflattened_size)
        elif isinstance(layer, nn.Linear):
            if math.prod(shape) != layer.in_features:
                raise UnsupportedNetwork(f"{layer} receives {math.prod(shape)} features")
            bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_features,
                                                                                          dtype=torch.float64)
            steps.append(Affine(layer.weight.detach().double().clone(), bias.clone()))
            shape = (layer.out_features,)
        elif isinstance(layer, nn.Conv2d):
            step, shape = _conv_dense(layer, shape, max_elements)
            steps.append(step)
        elif isinstance(layer, MaxMin):
            steps.append(PairSort())
        else:
            try:
                kind, params = activations.describe(layer)
            except ValueError as exc:
                raise UnsupportedNetwork(str(exc)) from None
            steps.append(Elementwise(kind, params))
    return steps


def encoder_steps(model: nn.Module, *, max_elements: int = 1 << 25) -> list[Step]:
    """Dense steps of ``model.encoder_mean_layers()`` for ``model.input_shape``.

    Raises :class:`UnsupportedNetwork` when the model does not expose its encoder mean or uses a module
    the bounds do not support."""
    getter = getattr(model, "encoder_mean_layers", None)
    if getter is None:
        raise UnsupportedNetwork(f"{type(model).__name__} does not expose encoder_mean_layers(), so its "
                                 "encoder cannot be certified")
    try:
        return dense_steps(getter(), tuple(model.input_shape), max_elements=max_elements)
    except UnsupportedNetwork:
        raise
    except ValueError as exc:
        raise UnsupportedNetwork(str(exc)) from None


def forward(steps: Sequence[Step], v: Tensor) -> Tensor:
    """Evaluate the steps on flat inputs v: (B, n) float64; returns (B, k). (Used to check the extraction.)"""
    for step in steps:
        if isinstance(step, Affine):
            v = v @ step.weight.T + step.bias
        elif isinstance(step, Elementwise):
            v = activations.value(step.kind, step.params, v)
        else:
            v = MaxMin()(v)
    return v
