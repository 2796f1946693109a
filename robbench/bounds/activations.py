"""Elementwise activations: values, Lipschitz constants, and value / derivative ranges over intervals.

Ranges are for the mathematical functions (torch's Softplus switches to the identity above its
threshold, a jump of log(1 + e^-threshold) / beta ~ 2e-9, which we ignore). Inputs lo, hi: (n,) float64
with lo <= hi; each range function returns (low, high) tensors of the same shape that contain every
value (or derivative) the function takes on [lo, hi]. ReLU-type kinks get the whole subgradient hull.
"""
from __future__ import annotations

import math

import torch
from scipy import optimize
from torch import Tensor, nn

KINDS = ("relu", "leaky_relu", "elu", "softplus", "sigmoid", "tanh", "gelu")

_SQRT2 = math.sqrt(2.0)


def _gelu(x: float) -> float:
    return x * 0.5 * (1.0 + math.erf(x / _SQRT2))


def _gelu_prime(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / _SQRT2)) + x * math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


# GELU has one minimum (where its derivative vanishes) and derivative extrema at -sqrt 2 and +sqrt 2.
_GELU_ARGMIN = float(optimize.brentq(_gelu_prime, -2.0, -0.1, xtol=1e-15))
_GELU_MIN = _gelu(_GELU_ARGMIN) - 1e-12
_GELU_DMIN = _gelu_prime(-_SQRT2) - 1e-12
_GELU_DMAX = _gelu_prime(_SQRT2) + 1e-12


def describe(module: nn.Module) -> tuple[str, dict]:
    """(kind, params) of a torch activation module; ValueError for anything else."""
    if isinstance(module, nn.ReLU):
        return "relu", {}
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", {"slope": float(module.negative_slope)}
    if isinstance(module, nn.ELU):
        if module.alpha < 0:
            raise ValueError(f"ELU with alpha={module.alpha} < 0 is not supported")
        return "elu", {"alpha": float(module.alpha)}
    if isinstance(module, nn.Softplus):
        return "softplus", {"beta": float(module.beta), "threshold": float(module.threshold)}
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(module, nn.Tanh):
        return "tanh", {}
    if isinstance(module, nn.GELU):
        if module.approximate != "none":
            raise ValueError("GELU(approximate='tanh') is not supported; use the exact GELU")
        return "gelu", {}
    raise ValueError(f"module {type(module).__name__} is not supported by the certified bounds "
                     f"(supported: Linear, Conv2d, Flatten, Unflatten, MaxMin, and activations {', '.join(KINDS)})")


def value(kind: str, p: dict, v: Tensor) -> Tensor:
    """The activation applied to v (any shape)."""
    if kind == "relu":
        return v.clamp(min=0)
    if kind == "leaky_relu":
        return torch.where(v >= 0, v, p["slope"] * v)
    if kind == "elu":
        return torch.where(v > 0, v, p["alpha"] * torch.expm1(v.clamp(max=0)))
    if kind == "softplus":
        return torch.nn.functional.softplus(v * p["beta"]) / p["beta"]
    if kind == "sigmoid":
        return torch.sigmoid(v)
    if kind == "tanh":
        return torch.tanh(v)
    if kind == "gelu":
        return torch.nn.functional.gelu(v)
    raise ValueError(f"unknown activation kind {kind!r}")


def lipschitz(kind: str, p: dict) -> float:
    """Global Lipschitz constant (sup |f'|)."""
    return {"relu": 1.0, "leaky_relu": max(1.0, abs(p.get("slope", 0.0))), "elu": max(1.0, p.get("alpha", 1.0)),
            "softplus": 1.0, "sigmoid": 0.25, "tanh": 1.0, "gelu": max(abs(_GELU_DMIN), _GELU_DMAX)}[kind]


def value_range(kind: str, p: dict, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """[min f, max f] over [lo, hi]. Every kind is monotone nondecreasing except GELU."""
    if kind == "gelu":
        f_lo, f_hi = value(kind, p, lo), value(kind, p, hi)
        inside = (lo <= _GELU_ARGMIN) & (hi >= _GELU_ARGMIN)
        low = torch.where(inside, torch.full_like(lo, _GELU_MIN), torch.minimum(f_lo, f_hi))
        return low, torch.maximum(f_lo, f_hi)
    if kind == "leaky_relu" and p["slope"] < 0:
        raise ValueError("LeakyReLU with a negative slope is not supported")
    return value(kind, p, lo), value(kind, p, hi)


def _unimodal(fprime, lo: Tensor, hi: Tensor, peak_at: float, peak: float) -> tuple[Tensor, Tensor]:
    """Range of a derivative that increases up to ``peak_at`` and decreases after it."""
    d_lo, d_hi = fprime(lo), fprime(hi)
    inside = (lo <= peak_at) & (hi >= peak_at)
    high = torch.where(inside, torch.full_like(lo, peak), torch.maximum(d_lo, d_hi))
    return torch.minimum(d_lo, d_hi), high


def derivative_range(kind: str, p: dict, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """[min f', max f'] over [lo, hi] (the Clarke hull at kinks)."""
    one = torch.ones_like(lo)
    if kind in ("relu", "leaky_relu"):
        s = torch.full_like(lo, 0.0 if kind == "relu" else p["slope"])
        low = torch.where(hi < 0, s, torch.where(lo > 0, one, torch.minimum(s, one)))
        high = torch.where(hi < 0, s, torch.where(lo > 0, one, torch.maximum(s, one)))
        return low, high
    if kind == "elu":
        a = p["alpha"]
        neg_lo = a * torch.exp(lo.clamp(max=0))          # derivative on the negative part at its left end
        neg_hi = a * torch.exp(hi.clamp(max=0))          # ... and at its right end (or at 0)
        has_neg, has_pos = lo <= 0, hi > 0
        cands_low = torch.where(has_neg, neg_lo, one)
        cands_high = torch.where(has_neg, neg_hi, one)
        low = torch.where(has_pos, torch.minimum(cands_low, one), cands_low)
        high = torch.where(has_pos, torch.maximum(cands_high, one), cands_high)
        return low, high
    if kind == "softplus":
        b, t = p["beta"], p.get("threshold", 20.0)
        # torch's Softplus is the identity (slope 1) where beta * x > threshold
        return torch.sigmoid(b * lo), torch.where(b * hi > t, torch.ones_like(hi), torch.sigmoid(b * hi))
    if kind == "sigmoid":
        def sp(v: Tensor) -> Tensor:
            s = torch.sigmoid(v)
            return s * (1 - s)
        return _unimodal(sp, lo, hi, 0.0, 0.25)
    if kind == "tanh":
        return _unimodal(lambda v: 1 - torch.tanh(v) ** 2, lo, hi, 0.0, 1.0)
    if kind == "gelu":
        def gp(v: Tensor) -> Tensor:
            return torch.special.ndtr(v) + v * torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
        d_lo, d_hi = gp(lo), gp(hi)
        low, high = torch.minimum(d_lo, d_hi), torch.maximum(d_lo, d_hi)
        # f' decreases on (-inf, -sqrt 2], increases on [-sqrt 2, sqrt 2], decreases after sqrt 2
        low = torch.where((lo <= -_SQRT2) & (hi >= -_SQRT2), torch.full_like(lo, _GELU_DMIN), low)
        high = torch.where((lo <= _SQRT2) & (hi >= _SQRT2), torch.full_like(lo, _GELU_DMAX), high)
        return low, high
    raise ValueError(f"unknown activation kind {kind!r}")


