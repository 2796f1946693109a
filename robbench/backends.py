"""Backends of the Monte Carlo engine: the protocol every backend meets, and the pure-PyTorch reference.

A backend is registered like any other plugin object, through the ``register_backends`` hook
(:mod:`robbench.hookspecs`); the engine (:mod:`robbench.montecarlo`) looks it up by name in the one
registry and dispatches to it. robbench's own backends (``torch`` here, the compiled ``cpp`` and
``cuda`` ops in :mod:`robbench.kernels`) are registered by :mod:`robbench.engine_backends` through the
same hook, so a third party's backend (a Triton kernel, say) is a peer of them, and ``auto`` chooses
among all of them by their declared ``auto_priority``, never by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from robbench.decoding import DEFAULT_CHUNK_ROWS, decoded_blocks, decoder_plan


@dataclass
class CountResult:
    """counts: (B,) int64; screened: samples decided "inside" by a screen with no last-layer work;
    bf16_samples: samples whose last layer went through a bf16 pass (a backend may return to fp32 for
    the rest of a call when its band leaves most samples undecided); rechecked: bf16-pass samples
    recomputed in fp32; total: all samples; precision: of the last layer; last_layer_saved: last layers
    not computed by an early exit, in samples (columns skipped / D, less the samples it recomputed)."""

    counts: Tensor
    rechecked: int
    bf16_samples: int
    total: int
    precision: str
    screened: int = 0
    last_layer_saved: float = 0.0

    @property
    def recheck_fraction(self) -> float:
        """Fraction of the bf16-pass samples that had to be recomputed in fp32 (0 without a bf16 pass)."""
        return self.rechecked / self.bf16_samples if self.bf16_samples else 0.0

    @property
    def last_layer_fraction(self) -> float:
        """Fraction of all samples whose last layer was computed at all (bf16 or fp32)."""
        return 1.0 - self.screened / self.total if self.total else 0.0


@runtime_checkable
class Backend(Protocol):
    """A Monte Carlo backend.

    Attributes: ``name`` (what users pass as ``--backend``), ``description``, ``precisions`` (last-layer
    precisions it offers, first the default, e.g. ``("fp32",)``) and ``auto_priority``: an int, the
    higher the more ``--backend auto`` prefers it where it is available, or None when it must be asked
    for by name.

    Both methods take mu, sigma: (B, k) float32 contiguous (mu may be mu(x + delta)); center: (B, D)
    float32, the flattened g(mu(x)); stream_ids: (B,) int64; samples j = sample_offset ..
    sample_offset + n_samples - 1 of the counter-based stream (seed, stream_id, j) of
    :mod:`robbench.rng`, so every backend decodes the same z. ``chunk_rows``: decoded rows held at once.
    """

    name: str
    description: str
    precisions: tuple[str, ...]
    auto_priority: int | None

    def unavailable(self, device: torch.device, *, warn: bool = False) -> str | None:
        """None when the backend can run on ``device``, else why not (``warn``: say so once on stderr)."""

    def count_within(self, model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, r2: Tensor,
                     n_samples: int, *, seed: int, stream_ids: Tensor, sample_offset: int, chunk_rows: int,
                     precision: str | None = None, screen: bool = True) -> CountResult:
        """How many samples have squared distance <= r2 (r2: (B,) float32, r * r of the output-space
        radius). Decisions must equal the fp32 torch reference's on the same samples."""

    def sq_distances(self, model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n_samples: int, *,
                     seed: int, stream_ids: Tensor, sample_offset: int, chunk_rows: int) -> Tensor:
        """(B, n_samples) float32 squared distances ||g(z_bj) - center_b||^2."""


class TorchBackend:
    """The pure-PyTorch reference: fp32, chunked, in-place epilogue (see :mod:`robbench.decoding`)."""

    name = "torch"
    description = "pure-PyTorch reference (fp32, chunked); defines the decisions every backend reproduces"
    precisions = ("fp32",)
    auto_priority = 0

    def unavailable(self, device: torch.device, *, warn: bool = False) -> str | None:
        return None

    def count_within(self, model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, r2: Tensor,
                     n_samples: int, *, seed: int, stream_ids: Tensor, sample_offset: int = 0,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS, precision: str | None = None,
                     screen: bool = True) -> CountResult:
        B = mu.shape[0]
        counts = torch.zeros(B, dtype=torch.int64, device=mu.device)
        for blk, d2 in sq_distance_blocks(model, mu, sigma, center, n_samples, seed, stream_ids, sample_offset,
                                          chunk_rows):
            counts[blk.p0:blk.p1] += (d2 <= r2[blk.p0:blk.p1, None]).sum(1)
        return CountResult(counts, 0, 0, B * n_samples, "fp32")

    def sq_distances(self, model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n_samples: int, *,
                     seed: int, stream_ids: Tensor, sample_offset: int = 0,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
        out = torch.empty(mu.shape[0], n_samples, dtype=torch.float32, device=mu.device)
        for blk, d2 in sq_distance_blocks(model, mu, sigma, center, n_samples, seed, stream_ids, sample_offset,
                                          chunk_rows):
            out[blk.p0:blk.p1, blk.s0:blk.s1] = d2
        return out


def sq_distance_blocks(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n: int, seed: int,
                       stream_ids: Tensor, offset: int, rows: int):
    """The reference's blocks: yields (block, squared distances (points, samples) float32)."""
    plan = decoder_plan(model, center.shape[1])
    for blk, y in decoded_blocks(plan, mu, sigma, n, seed, stream_ids, offset, rows):
        y.sub_(center[blk.p0:blk.p1, None, :])  # in place on the block: no second (points, samples, D) tensor
        yield blk, y.mul_(y).sum(2)
