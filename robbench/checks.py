"""Checks of what plugins hand back to the harness: attack results and model outputs.

A plugin that breaks its contract must fail its own rows with a clear error, never produce numbers.

- :func:`check_attack_result` (called by :func:`robbench.protocols.call_attack`, the one place attacks
  are called): delta has x's shape and is finite, ||delta_b||_2 <= radius_b * (1 + NORM_RTOL) + NORM_ATOL,
  x + delta lies in the model's input box (``model.input_bounds``, default the pixel box (0, 1); a model
  defined on all of R^D, like the analytic linear-Gaussian VAE, sets it to None) within BOX_ATOL, and
  damage is (B,) and finite. The tolerances only absorb float32 rounding of a projection onto the ball
  and the box.
- :class:`CheckedModel` (wrapped around the model by the runner and ``robbench.evaluate``): every
  ``encode`` returns finite mu and finite sigma >= 0, every ``decode`` finite outputs. NaN that appears
  only on perturbed inputs or on latent samples is caught where it is produced. Calls on few rows run on
  one torch thread (:mod:`robbench.few_rows`: results independent of the thread count).
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robbench.few_rows import one_thread_if_few_rows

NORM_RTOL = 1e-4
NORM_ATOL = 1e-6
BOX_ATOL = 1e-6


class PluginOutputError(RuntimeError):
    """A plugin returned something outside its contract; the message says what and where."""


def _positions(bad: Tensor, point_ids: Tensor | None) -> str:
    idx = bad.nonzero().flatten().cpu()
    shown = (point_ids.cpu()[idx] if point_ids is not None else idx)[:5].tolist()
    what = "points" if point_ids is not None else "batch positions"
    return f"{idx.numel()} of {bad.numel()} ({what} {', '.join(map(str, shown))}{', ...' if idx.numel() > 5 else ''})"


def check_attack_result(name: str, result: Any, x: Tensor, radius: Tensor,
                        point_ids: Tensor | None = None, bounds: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """Raise :class:`PluginOutputError` unless ``result`` is a valid attack result for x (B, *shape) and
    radius (B,): see the module docstring for the tolerances. ``bounds``: the input box, None for none."""
    where = f"attack {name!r} returned an invalid result"
    try:
        delta, damage = result.delta, result.damage
    except AttributeError:
        delta = damage = None
    if not isinstance(delta, Tensor) or not isinstance(damage, Tensor):
        raise PluginOutputError(f"{where}: expected an AttackResult with tensors delta and damage, "
                                f"got {type(result).__name__}")
    if tuple(delta.shape) != tuple(x.shape):
        raise PluginOutputError(f"{where}: delta has shape {tuple(delta.shape)}, x has {tuple(x.shape)}")
    if tuple(damage.shape) != (x.shape[0],):
        raise PluginOutputError(f"{where}: damage has shape {tuple(damage.shape)}, expected ({x.shape[0]},)")
    with torch.no_grad():
        d = delta.detach().to(x.device, torch.float64).flatten(1)
        bad = ~torch.isfinite(d).all(1)
        if bool(bad.any()):
            raise PluginOutputError(f"{where}: delta is NaN or infinite for {_positions(bad, point_ids)}")
        bad = ~torch.isfinite(damage.detach())
        if bool(bad.any()):
            raise PluginOutputError(f"{where}: damage is NaN or infinite for {_positions(bad, point_ids)}")
        norms = d.norm(dim=1)
        r = torch.as_tensor(radius, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        bad = norms > r * (1 + NORM_RTOL) + NORM_ATOL
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PluginOutputError(
                f"{where}: ||delta|| = {float(norms[i]):.6g} exceeds the radius {float(r[i]):.6g} for "
                f"{_positions(bad, point_ids)}; allowed: ||delta|| <= radius * (1 + {NORM_RTOL:g}) + {NORM_ATOL:g}")
        if bounds is None:
            return
        low, high = float(bounds[0]), float(bounds[1])
        adv = x.detach().to(torch.float64).flatten(1) + d
        bad = ((adv < low - BOX_ATOL) | (adv > high + BOX_ATOL)).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            lo, hi = float(adv[i].min()), float(adv[i].max())
            raise PluginOutputError(
                f"{where}: x + delta leaves the input box [{low:g}, {high:g}] (range [{lo:.4g}, {hi:.4g}]) "
                f"for {_positions(bad, point_ids)}; allowed: within {BOX_ATOL:g} of [{low:g}, {high:g}]")


class EstimatorOutputError(RuntimeError):
    """An estimator returned something other than one dict of metrics per point (all its rows fail).
    ``origin``: where the estimator is defined (``estimator Cls.__call__ in module, file.py:line``), which
    :func:`robbench.execute.describe_error` shows instead of the innermost frame (this module's check)."""

    origin: str | None = None


def estimator_origin(estimator: Any) -> str | None:
    """``estimator <qualname> in <module>, <file>:<line>`` of the code an estimator runs: a function
    itself, the function a wrapper holds as ``fn`` (robbench_plugins' BuiltinEstimator), else its class's
    ``__call__``; None where that cannot be found (a builtin, a C extension)."""
    target = estimator if inspect.isfunction(estimator) or inspect.ismethod(estimator) else None
    if target is None and callable(getattr(estimator, "fn", None)):
        target = estimator.fn
    if target is None:
        target = getattr(type(estimator), "__call__", None)
    target = inspect.unwrap(getattr(target, "__func__", target))
    code = getattr(target, "__code__", None)
    if code is None:
        return None
    return (f"estimator {getattr(target, '__qualname__', target)} in {getattr(target, '__module__', '?')}, "
            f"{Path(code.co_filename).name}:{code.co_firstlineno}")


def check_estimator_rows(name: str, rows: Any, n: int, estimator: Any = None) -> list:
    """``rows`` as a list if it is what an estimator must return for ``n`` points: a list (or tuple) of
    ``n`` dicts, one per point; else raise :class:`EstimatorOutputError` saying what came back, located
    at ``estimator``'s code (see :func:`estimator_origin`) when given. Its values (numbers, 0-d tensors,
    numpy scalars, text) are the store's to convert."""
    try:
        return _check_estimator_rows(name, rows, n)
    except EstimatorOutputError as err:
        err.origin = estimator_origin(estimator) if estimator is not None else None
        raise


def _check_estimator_rows(name: str, rows: Any, n: int) -> list:
    where = f"estimator {name!r} returned"
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, (list, tuple)):
        hint = " (one dict, not a list with one dict per point)" if isinstance(rows, dict) else ""
        what = "None" if rows is None else f"a {type(rows).__name__}"
        raise EstimatorOutputError(f"{where} {what}{hint}; expected a list of {n} dicts of "
                                   "metrics, one per point, e.g. [{'my_metric': 0.5}, ...]")
    if len(rows) != n:
        raise EstimatorOutputError(f"{where} {len(rows)} rows for {n} points; expected one dict per point")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(key, str) for key in row):
            raise EstimatorOutputError(f"{where} a {type(row).__name__} as row {i}; expected a dict of "
                                       "metrics with text keys, e.g. {'my_metric': 0.5}")
    return list(rows)


def _checkable(t: Tensor) -> bool:
    # Inside torch.func transforms (the exact Jacobian) a value check would be data-dependent control flow.
    return isinstance(t, Tensor) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def require_finite(what: str, t: Tensor) -> None:
    """Raise :class:`PluginOutputError` if ``t`` (N, ...) has NaN or infinite entries, naming the rows."""
    if not _checkable(t) or t.numel() == 0:
        return
    with torch.no_grad():
        flat = t.detach().reshape(t.shape[0], -1) if t.dim() else t.detach().reshape(1, 1)
        if math.isfinite(float(flat.sum(dtype=torch.float64))):  # NaN and inf reach the sum: one cheap reduction
            return
        bad = ~torch.isfinite(flat).all(1)
        if bool(bad.any()):
            raise PluginOutputError(f"the model produced NaN or infinity in {what} for {_positions(bad, None)}")


class CheckedModel:
    """The model with every ``encode``/``decode`` output checked (see module docstring); every other
    attribute is the wrapped model's. ``unwrapped`` is the model itself."""

    def __init__(self, model: Any):
        object.__setattr__(self, "unwrapped", model)

    def __getattr__(self, name: str) -> Any:
        if name == "unwrapped":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.unwrapped, name)

    def __reduce__(self) -> tuple:  # ships to executor workers as the wrapped model, wrapped again there
        return (CheckedModel, (self.unwrapped,))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.unwrapped, name, value)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with one_thread_if_few_rows(x):  # thread-count-independent results on few rows (robbench.few_rows)
            mu, sigma = self.unwrapped.encode(x)
        require_finite("encode(x) mu", mu)
        require_finite("encode(x) sigma", sigma)
        if _checkable(sigma) and bool((sigma.detach() < 0).any()):
            raise PluginOutputError("the model produced a negative sigma in encode(x)")
        return mu, sigma

    def decode(self, z: Tensor) -> Tensor:
        with one_thread_if_few_rows(z):
            out = self.unwrapped.decode(z)
        require_finite("decode(z)", out)
        return out


def checked(model: Any) -> Any:
    """``model`` wrapped in :class:`CheckedModel` (once)."""
    return model if isinstance(model, CheckedModel) else CheckedModel(model)
