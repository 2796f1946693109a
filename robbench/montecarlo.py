"""The Monte Carlo engine: how many reparameterised samples decode to within r of g(mu(x)).

Every estimator decodes samples only through :func:`count_within` / :func:`sample_distances`.
Samples z_bj = mu_b + eta_bj * sigma_b use the counter-based RNG of :mod:`robbench.rng`, so results do
not depend on chunking, batching or backend, and ``sample_offset`` continues a stream. ``r`` is always
the output-space radius (decoder-output L2 units).

Backends come from one registry (the ``register_backends`` hook, :mod:`robbench.backends`): ``torch``
(pure PyTorch, fp32, the reference), ``cpp`` (compiled CPU op: same hidden layers, then a Lipschitz
screen and a bf16 last layer whose rigorous error band decides most samples, fp32 recheck of the
rest: identical decisions), ``cuda``, and any a plugin adds. ``auto`` picks the available backend
with the highest ``auto_priority`` for the tensors' device. The decoder plan and the block tiling
that every backend shares are in :mod:`robbench.decoding`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from robbench.backends import Backend
from robbench.decoding import DEFAULT_CHUNK_ROWS
from robbench.plugins import get_registries
from robbench.ran_with import MC_BACKEND, note

AUTO = "auto"


@dataclass
class CallRecord:
    """One :func:`count_within` call as seen by an :func:`observe` block: the backend that ran it, B points,
    samples = B * n_samples decoded (or screened), wall seconds, screened samples, the last-layer
    precision the backend reported, the last layers an early exit did not compute (in samples), the
    samples whose last layer ran in bf16 and, of those, the ones recomputed in fp32."""

    backend: str
    points: int
    samples: int
    seconds: float
    screened: int
    precision: str
    last_layer_saved: float = 0.0
    bf16_samples: int = 0
    rechecked: int = 0


_observers: list[list[CallRecord]] = []


@contextmanager
def observe() -> Iterator[list[CallRecord]]:
    """Record every :func:`count_within` call made inside the block (for benchmarks: where a run's Monte
    Carlo time goes). Costs one clock read per call (on CUDA also a device synchronisation before and after
    it, so the call's own kernels are what is timed); nothing is recorded outside such a block."""
    records: list[CallRecord] = []
    _observers.append(records)
    try:
        yield records
    finally:
        _observers.remove(records)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the registered backends usable on ``device``, e.g. ["cpp", "torch"]."""
    dev = torch.device(device)
    backends = get_registries().backends
    return [name for name in backends.names() if backends.get(name).unavailable(dev) is None]


def backend_names() -> list[str]:
    """Every value ``--backend`` accepts: "auto" and the registered names."""
    return [AUTO] + get_registries().backends.names()


def get_backend(backend: str, device: torch.device) -> Backend:
    """The backend object for ``backend`` on ``device``: "auto" is the available backend with the highest
    ``auto_priority``; an explicit name must be registered (ValueError) and usable here (RuntimeError)."""
    registry = get_registries().backends
    if backend == AUTO:
        candidates = [registry.get(n) for n in registry.names() if registry.get(n).auto_priority is not None]
        for cand in sorted(candidates, key=lambda b: -b.auto_priority):
            if cand.unavailable(device, warn=True) is None:
                return cand
        raise RuntimeError(f"no registered backend can run on {device}")
    if backend not in registry:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(backend_names())}")
    chosen = registry.get(backend)
    reason = chosen.unavailable(device, warn=True)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} requested but it cannot run here: {reason}")
    return chosen


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to the fastest available backend for ``device``; validate explicit names."""
    return get_backend(backend, device).name


def _prepare(mu: Tensor, sigma: Tensor, center: Tensor, stream_ids: Tensor | None, n: int, offset: int):
    if mu.dim() != 2 or sigma.shape != mu.shape:
        raise ValueError(f"mu and sigma must both be (B, k); got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    B = mu.shape[0]
    center = center.reshape(B, -1)
    if stream_ids is None:
        stream_ids = torch.arange(B, device=mu.device)
    if stream_ids.shape != (B,):
        raise ValueError(f"stream_ids must be (B,) = ({B},); got {tuple(stream_ids.shape)}")
    if n < 0 or offset < 0 or offset + n > 2 ** 32:
        raise ValueError(f"need 0 <= sample_offset and sample_offset + n_samples <= 2^32; got {offset}, {n}")
    return (mu.detach().float().contiguous(), sigma.detach().float().contiguous(),
            center.detach().float().contiguous(), stream_ids.to(device=mu.device, dtype=torch.int64))


def radius_sq(r: float | Tensor, B: int, device: torch.device) -> Tensor:
    """r^2 per point, computed in float32 (r * r) as every backend does: (B,). r: scalar or (B,)."""
    r = torch.as_tensor(r, dtype=torch.float32, device=device).reshape(-1)
    r = r.expand(B) if r.numel() == 1 else r
    if r.shape != (B,):
        raise ValueError(f"radius must be a scalar or (B,) = ({B},); got {tuple(r.shape)}")
    if not bool((r >= 0).all()):  # r * r would count ||Delta|| <= |r| for a negative r, in silence
        raise ValueError(f"the output-space radius r must be >= 0 (a distance), got {float(r.min()):g}"
                         + (" (NaN)" if bool(r.isnan().any()) else ""))
    return (r * r).contiguous()


_radius_sq = radius_sq  # the name older callers used


@torch.no_grad()
def count_within(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, r: float | Tensor,
                 n_samples: int, *, seed: int, stream_ids: Tensor | None = None, sample_offset: int = 0,
                 backend: str = AUTO, chunk_size: int | None = None) -> Tensor:
    """mu, sigma: (B, k) (mu may be mu(x + delta)); center: (B, D) flattened g(mu(x)); r: scalar or
    (B,), the output-space radius. Draws z_bj = mu_b + eta_bj sigma_b for j = sample_offset ..
    sample_offset + n_samples - 1 (see module docstring). ``chunk_size``: decoded rows held at once.
    Returns (B,) int64: how many samples have ||g(z_bj) - center_b||_2 <= r_b (compared as
    squared distance <= r * r in float32)."""
    mu, sigma, center, stream_ids = _prepare(mu, sigma, center, stream_ids, n_samples, sample_offset)
    r2 = radius_sq(r, mu.shape[0], mu.device)
    chosen = get_backend(backend, mu.device)
    note(MC_BACKEND, chosen.name)  # "auto" resolves per machine: each result row records what ran
    timing_cuda = bool(_observers) and mu.is_cuda  # CUDA runs asynchronously: time the work, not the launch
    if timing_cuda:
        torch.cuda.synchronize(mu.device)
    start = time.perf_counter()
    result = chosen.count_within(model, mu, sigma, center, r2, n_samples, seed=seed, stream_ids=stream_ids,
                                 sample_offset=sample_offset, chunk_rows=chunk_size or DEFAULT_CHUNK_ROWS)
    if timing_cuda:
        torch.cuda.synchronize(mu.device)
    if _observers:
        record = CallRecord(chosen.name, mu.shape[0], mu.shape[0] * n_samples, time.perf_counter() - start,
                            int(result.screened), str(result.precision),
                            float(getattr(result, "last_layer_saved", 0.0)), int(result.bf16_samples),
                            int(result.rechecked))
        for records in _observers:
            records.append(record)
    return result.counts


@torch.no_grad()
def sample_distances(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n_samples: int, *, seed: int,
                     stream_ids: Tensor | None = None, sample_offset: int = 0, backend: str = "torch",
                     chunk_size: int | None = None) -> Tensor:
    """(B, n_samples) float32 distances ||g(z_bj) - center_b||_2, the same samples as :func:`count_within`
    (sqrt of the float32 squared distance). Always computed in fp32 (backend "cpp" uses its fp32 path)."""
    mu, sigma, center, stream_ids = _prepare(mu, sigma, center, stream_ids, n_samples, sample_offset)
    chosen = get_backend(backend, mu.device)
    note(MC_BACKEND, chosen.name)
    return chosen.sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                               sample_offset=sample_offset, chunk_rows=chunk_size or DEFAULT_CHUNK_ROWS).sqrt_()
