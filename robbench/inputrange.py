"""Declared input ranges: the box [lo, hi] every pixel of a model's input lives in.

A model (or a data set) may declare ``input_range = (lo, hi)``; without one the range is [0, 1], the
convention of the built-in models. Attacks keep x + delta inside the declared box, noise is clamped to
it, and run-wide sizes given in ``units: rms`` scale with its width (see :func:`rms_scale`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DEFAULT_RANGE: tuple[float, float] = (0.0, 1.0)
UNITS = ("l2", "rms")


def input_range(obj: Any) -> tuple[float, float]:
    """``obj.input_range`` as floats (lo < hi), or [0, 1] when ``obj`` declares none."""
    declared = getattr(obj, "input_range", None)
    if declared is None:
        return DEFAULT_RANGE
    try:
        lo, hi = (float(v) for v in declared)
    except (TypeError, ValueError):
        raise ValueError(f"input_range must be a pair (lo, hi) of numbers, got {declared!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"input_range must satisfy lo < hi (finite), got {declared!r}")
    return lo, hi


def check_in_range(x: Tensor, box: tuple[float, float], what: str = "data", tol: float = 1e-5) -> None:
    """Raise ValueError when x holds NaN or infinity or leaves the declared box (a [0, 1] batch given
    to a [-1, 1] model is fine; a [0, 255] batch is not)."""
    lo, hi = box
    bad = int((~torch.isfinite(x)).sum()) if x.numel() else 0
    if bad:  # NaN compares false with both ends, so the box test alone would let it through
        first = [int(i) for i in torch.nonzero(~torch.isfinite(x.reshape(x.shape[0], -1)).any(1))[:5].flatten()]
        raise ValueError(f"{what} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} "
                         f"(first examples at index {', '.join(map(str, first))})")
    if x.numel() and (float(x.min()) < lo - tol or float(x.max()) > hi + tol):
        raise ValueError(f"{what} lies in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the "
                         f"declared input range [{lo:g}, {hi:g}]; rescale it (see robbench.inputrange.to_range)")


def to_range(x: Tensor, src: tuple[float, float], dst: tuple[float, float]) -> Tensor:
    """Map x affinely from the box ``src`` onto ``dst`` (e.g. [0, 1] images for a [-1, 1] model)."""
    if tuple(src) == tuple(dst):
        return x
    (a, b), (c, d) = src, dst
    return (x - a) * ((d - c) / (b - a)) + c


def rms_scale(shape: tuple[int, ...], box: tuple[float, float]) -> float:
    """The L2 norm of a perturbation whose per-pixel RMS is the whole range width: sqrt(D) * (hi - lo).

    With ``units: rms`` a size s means s * rms_scale in L2 units, e.g. r = 0.1 on 28x28 [0, 1] images is
    an L2 radius of 2.8, and on 3x64x64 [-1, 1] images one of 22.2.
    """
    return math.sqrt(math.prod(shape)) * (box[1] - box[0])


def clamp_box(x: Tensor, box: tuple[float, float]) -> Tensor:
    return x.clamp(box[0], box[1])
