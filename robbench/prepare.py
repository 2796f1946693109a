"""Getting one (model configuration, seed) ready for estimation, wherever that happens.

- :class:`ModelSpec` describes the model in plain, picklable data (family *name*, parameters, training
  settings); a worker process rebuilds the family from its plugin registries.
- :func:`prepare_model` is what the local executor does: train or load through the checkpoint cache,
  then check the encoder on the points to evaluate.
- :func:`prepare_shipped` is what a remote worker does: build the model from a cached checkpoint the
  coordinator sent, or train it without touching any cache (the coordinator writes the checkpoint), then
  run the same check. Both return a :class:`Prepared` whose ``info`` goes to the ``models`` table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from robbench.datafiles import DataFileError
from robbench.execute import describe_error
from robbench.imagefit import fit_if_needed
from robbench.inputrange import input_range
from robbench.plugins import Registries
from robbench.protocols import ModelFamily, SplitData
from robbench.training import (TrainConfig, TrainedModel, build_or_train, train_or_load, trained_from_payload)

TRAINING_FAILED = "model could not be trained or loaded"
CONTRACT_ROWS = 8  # encoder means decoded (twice) by contract_problem, whatever the number of points
CHECK_BATCH = 25  # points per encode call of the check when the caller gives no batch size (point_batch's default)


def training_failed(error: str) -> str:
    """The error a failed model's result rows carry: shown under the leaderboard, so it says why."""
    return f"{TRAINING_FAILED}: {error}"


@dataclass(frozen=True)
class ModelSpec:
    """One model to get ready. key: the run's model key (see :func:`robbench.runner.model_key`);
    label / seed: as stored; family / params: registered name and one value per parameter; train: the
    training settings (its seed is the model seed); dataset: the data set's name (part of the cache key);
    device: torch device name; retrain: ignore cached checkpoints."""

    key: str
    label: str
    seed: int
    family: str
    params: dict[str, Any]
    train: TrainConfig
    dataset: str
    device: str = "cpu"
    retrain: bool = False


@dataclass
class Prepared:
    """A model made ready, or why not. model: frozen, on the spec's device (None when it failed);
    info: the ``models`` table entry (test ELBO, seconds, cache key, ... or ``error``); problem: the
    message its result rows fail with (None when estimation may proceed); payload: the checkpoint
    (:func:`robbench.training.checkpoint_payload`) when this call trained it, for the coordinator's cache."""

    model: nn.Module | None
    info: dict[str, Any]
    problem: str | None = None
    payload: dict[str, Any] | None = field(default=None, repr=False)


def prepare_model(spec: ModelSpec, data: SplitData, regs: Registries, *, cache_dir: Any, progress: bool,
                  check_ids: list[int], check_batch: int = CHECK_BATCH) -> Prepared:
    """Train or load ``spec`` through the checkpoint cache in ``cache_dir`` (in this process), then check
    that the encoder is finite on test points ``check_ids``, ``check_batch`` a call (the run's batch size).
    Failures are reported, never raised."""
    try:
        family = regs.models.get(spec.family)
        trained = train_or_load(family, spec.params, data, spec.train, cache_dir=cache_dir,
                                device=torch.device(spec.device), retrain=spec.retrain, progress=progress,
                                dataset_name=spec.dataset)
    except DataFileError:  # the data set's problem, not the model's: it stops the run (exit 2, file named)
        raise
    except Exception as err:  # a broken model fails its own rows only
        return Prepared(None, {"error": describe_error(err)}, training_failed(describe_error(err)))
    return _checked(trained, family, data, check_ids, spec.device, check_batch)


def prepare_shipped(spec: ModelSpec, data: SplitData, regs: Registries, cached: dict[str, Any] | None, *,
                    check_ids: list[int], check_batch: int = CHECK_BATCH) -> Prepared:
    """On a worker: rebuild ``spec`` from the ``cached`` checkpoint payload, or (None) train it without a
    cache; then the same check as :func:`prepare_model`. ``Prepared.payload`` carries the checkpoint."""
    device = torch.device(spec.device)
    try:
        family = regs.models.get(spec.family)
        if cached is not None:
            trained, payload = trained_from_payload(cached, family, data, device=device), cached
        else:
            trained, payload = build_or_train(family, spec.params, data, spec.train, device=device, progress=False,
                                              dataset_name=spec.dataset)
    except DataFileError:
        raise
    except Exception as err:
        return Prepared(None, {"error": describe_error(err)}, training_failed(describe_error(err)))
    prepared = _checked(trained, family, data, check_ids, spec.device, check_batch)
    prepared.payload = payload
    return prepared


def describe_prepared(info: dict[str, Any]) -> str:
    """One line for the console: how the model was obtained, and its test ELBO."""
    if "error" in info:
        return f"could not be trained or loaded: {info['error']}"
    if info.get("ready_built"):
        how = "ready-built (no training)"
    else:
        how = "loaded from cache" if info.get("from_cache") else f"trained in {info['train_seconds']:.1f}s"
        trained, best = info.get("epochs_trained"), info.get("best_epoch")
        if trained is not None and (trained < (info.get("epochs") or 0) or best != trained):
            how += f" ({trained} of {info['epochs']} epochs; early stopping kept the weights of epoch {best})"
    elbo = info.get("test_elbo")
    return how + (f", test ELBO {elbo:.1f} nats" if elbo is not None else "")


def _checked(trained: TrainedModel, family: ModelFamily, data: SplitData, check_ids: list[int],
             device: str, check_batch: int) -> Prepared:
    elbo = trained.test_elbo if math.isfinite(trained.test_elbo) else None
    info = {"test_elbo": elbo, "train_seconds": trained.train_seconds, "from_cache": trained.from_cache,
            "cache_key": trained.cache_key, "ready_built": not family.trainable}
    if trained.epochs_trained is not None:  # how long it trained (early stopping may stop before the budget)
        info.update(epochs=trained.epochs, epochs_trained=trained.epochs_trained, best_epoch=trained.best_epoch)
    model = trained.model.to(device).eval()
    return Prepared(model, info, encoder_problem(model, data, check_ids, device, check_batch))


def encoder_problem(model: nn.Module, data: SplitData, ids: list[int], device: str,
                    batch: int = CHECK_BATCH) -> str | None:
    """Why the model cannot be used on test points ``ids``, or None: encode raises, yields NaN/inf, or
    breaks the protocol (:func:`contract_problem`: shapes, dtype, a decoder that is not deterministic).
    The points are encoded ``batch`` at a time (the run's batch size: a big encoder that runs on the run's
    batches must not fail here for the memory of all points in one call); the contract on the first."""
    ids = sorted(set(ids))
    step = max(1, int(batch))
    for start in range(0, len(ids), step):
        # read outside the try: unreadable data is no encoder problem
        x = data.test_x[ids[start:start + step]].to(device)
        problem = _encoding_problem(model, data, x, contract=start == 0)
        if problem is not None:
            return problem
    return None


def _encoding_problem(model: nn.Module, data: SplitData, x: Tensor, *, contract: bool) -> str | None:
    try:
        with torch.no_grad():
            out = model.encode(fit_if_needed(x, input_range(data), model))  # to the model's shape/range
            problem = _pair_problem(out)
            if problem is not None:
                return problem
            mu, sigma = out
            if mu.device != x.device or sigma.device != x.device:
                return f"encode(x) returned mu on {mu.device} and sigma on {sigma.device}; x was on {x.device}"
            if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
                return "model produced NaN or infinity in encode(x)"
            return contract_problem(model, mu, sigma) if contract else None
    except Exception as err:
        return f"encode() raised {describe_error(err)}"


def _pair_problem(out: Any) -> str | None:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        what = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
        return f"encode(x) must return (mu, sigma); it returned {what}"
    if not all(isinstance(t, torch.Tensor) for t in out):
        return f"encode(x) must return two tensors (mu, sigma); it returned {', '.join(type(t).__name__ for t in out)}"
    return None


def contract_problem(model: nn.Module, mu: Tensor, sigma: Tensor) -> str | None:
    """What a model's outputs on a few points show to be against :class:`robbench.protocols.VAEModel`, or
    None. mu, sigma: encode's outputs (B, ...), finite, on the input's device. Checked: mu and sigma are
    (B, latent_dim) floating-point; decode(z) of the first b = min(B, CONTRACT_ROWS) means is a
    floating-point tensor of shape (b, *input_shape) (a flat (b, prod(input_shape)) is accepted: the engines
    flatten it) on z's device, and the same on a second call
    (the margin is defined for a deterministic decoder mean g(z); dropout left on or sampling inside decode
    would make every estimate noise)."""
    b, k = mu.shape[0], int(model.latent_dim)
    if tuple(mu.shape) != (b, k) or tuple(sigma.shape) != (b, k):
        return (f"encode(x) returned mu of shape {_shape(mu)} and sigma of shape {_shape(sigma)}; expected "
                f"{_shape((b, k))} each (latent_dim = {k})")
    if not (mu.is_floating_point() and sigma.is_floating_point()):
        return f"encode(x) returned dtypes {mu.dtype} and {sigma.dtype}; expected floating-point tensors"
    z = mu[:CONTRACT_ROWS]  # a few rows show it; all of the run's points, twice, cost a big decoder dearly
    b = z.shape[0]
    try:
        first, second = model.decode(z), model.decode(z)
    except Exception as err:
        return f"decode() raised {describe_error(err)}"
    shape = tuple(int(n) for n in model.input_shape)
    if not isinstance(first, torch.Tensor):
        return f"decode(z) must return a tensor; it returned a {type(first).__name__}"
    if first.device != mu.device:
        return f"decode(z) returned a tensor on {first.device}; z was on {mu.device}"
    if tuple(first.shape) not in ((b, *shape), (b, math.prod(shape))):
        return f"decode(z) returned shape {_shape(first)} for {b} latents; expected {_shape((b, *shape))} (input_shape)"
    if not first.is_floating_point():
        return f"decode(z) returned dtype {first.dtype}; expected a floating-point tensor"
    # NaN at some points fails those points later (CheckedModel), not the model. Noise from a
    # nondeterministic kernel (GPU atomics) is a last-bit rounding difference: far below 1e-4 in float32,
    # up to a few eps in bfloat16 / float16 (eps 2^-7 / 2^-10), hence the tolerance scaled by the dtype.
    tol = max(1e-4, 4 * torch.finfo(first.dtype).eps)
    if not torch.allclose(first, second, rtol=tol, atol=tol / 10, equal_nan=True):
        gap = float((first.double() - second.double()).abs().nan_to_num(0.0).max())
        return (f"decode(z) is not deterministic: two calls on the same z differ by up to {gap:.3g} (dropout "
                "or sampling inside decode? the margin needs the decoder mean g(z); call model.eval() or "
                "return the mean)")
    return None


def _shape(t: Any) -> str:
    dims = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return "(" + ", ".join(str(int(n)) for n in dims) + ("," if len(dims) == 1 else "") + ")"
