"""Counter-based standard-normal RNG: eta = N(seed, stream, sample j, latent i), computed, not drawn.

Every normal is a pure function of (seed, stream_id, j, i), so Monte Carlo results do not depend on
chunking, batching or backend, and a later draw with a larger ``sample_offset`` continues the stream.

Construction (bit-exact in torch and in ``csrc/common/philox_normal.h``):
- ``hash32`` is Wellons' "lowbias32" integer finaliser (a bijection on 32-bit words).
- Per stream two independent 32-bit keys kA, kB; per sample two lanes A = h(kA ^ j), B = h(kB ^ j)
  (two lanes, so streams cannot be shifted copies of each other: a collision needs both to agree).
- Latent pair p (latents 2p, 2p+1) gets 24-bit uniforms u1 = h(A ^ h(B ^ 2p)), u2 = h(A ^ h(B ^ 2p+1)).
- Box-Muller in float64 using only +, -, *, /, sqrt, frexp (each exactly rounded by IEEE 754), with
  our own log and sin/cos polynomials: libm/Sleef transcendental functions differ by an ulp between
  implementations (and between ATen's vectorised and scalar tails), these do not. The result is
  rounded once to float32.

The integer arithmetic runs on int64 tensors holding 32-bit words; products are masked to 32 bits,
relying on the two's-complement wrap-around of torch's int64 multiply (CPU and CUDA).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B
_LN2 = 0.6931471805599453
_PI_4 = 0.7853981633974483
# ln f = 2 s (1 + s^2/3 + s^4/5 + ...), |s| <= 0.1716: 7 terms give < 1e-11 relative error,
# far below the float32 rounding of the result.
_LOG_COEFFS = [1.0 / (2 * n + 1) for n in range(7)]
# Taylor coefficients of sin(x)/x and cos(x) in x^2 on [0, pi/4]: truncation error < 1e-10.
_SIN_COEFFS = [(-1) ** n / math.factorial(2 * n + 1) for n in range(6)]
_COS_COEFFS = [(-1) ** n / math.factorial(2 * n) for n in range(7)]
_SQRT_HALF = 0.7071067811865476


def hash32_int(x: int) -> int:
    """lowbias32 on a Python int (reference for tests and for scalar keys)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def hash32(x: Tensor) -> Tensor:
    """lowbias32 on an int64 tensor of 32-bit words; returns int64 in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """Fold a 64-bit seed into one 32-bit key."""
    seed &= (1 << 64) - 1
    return hash32_int((seed & MASK32) ^ hash32_int((seed >> 32) ^ 0x85EBCA6B))


def _hash32_np(x: np.ndarray) -> np.ndarray:
    """lowbias32 on a uint64 array of 32-bit words (products < 2^64: exact, no wrap-around needed)."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(_M1)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(_M2)) & np.uint64(MASK32)
    return x ^ (x >> np.uint64(16))


def stream_keys(seed: int, stream_ids: Tensor) -> tuple[Tensor, Tensor]:
    """stream_ids: (B,) int64 (any value; 64 bits used); returns keys kA, kB: (B,) int64 32-bit words.
    CPU ids go through numpy (the same integer operations: 22 us of CPU per call for 25 ids against 51 us for
    the torch ops, 1 thread, idle; they run on every Monte Carlo call; tests/test_montecarlo.py compares both
    paths)."""
    if stream_ids.device.type == "cpu":
        return _stream_keys_np(seed, stream_ids)
    return _stream_keys_torch(seed, stream_ids)


def _stream_keys_np(seed: int, stream_ids: Tensor) -> tuple[Tensor, Tensor]:
    c = np.uint64(seed_key(seed))
    s = stream_ids.to(torch.int64).numpy().view(np.uint64)  # two's complement: the same 64 bits
    lo, hi = s & np.uint64(MASK32), s >> np.uint64(32)
    ka = _hash32_np(_hash32_np(lo ^ c) ^ hi)
    kb = _hash32_np(ka ^ np.uint64(0x68E31DA4))
    return torch.from_numpy(ka.view(np.int64)), torch.from_numpy(kb.view(np.int64))


def _stream_keys_torch(seed: int, stream_ids: Tensor) -> tuple[Tensor, Tensor]:
    c = seed_key(seed)
    s = stream_ids.to(torch.int64)
    lo, hi = s & MASK32, (s >> 32) & MASK32
    ka = hash32(hash32(lo ^ c) ^ hi)
    kb = hash32(ka ^ 0x68E31DA4)
    return ka, kb


def _log_uniform(bits: Tensor) -> Tensor:
    """ln(u) for u = ((bits >> 8) + 1) / 2^24 in (0, 1]; float64."""
    v = ((bits >> 8) + 1).to(torch.float64)
    m, e = torch.frexp(v)  # v = m 2^e, m in [0.5, 1)
    low = m < _SQRT_HALF
    f = torch.where(low, m * 2.0, m)
    e = torch.where(low, e - 1, e).to(torch.float64)
    s = (f - 1.0) / (f + 1.0)
    s2 = s * s
    p = torch.full_like(s, _LOG_COEFFS[-1])
    for c in reversed(_LOG_COEFFS[:-1]):
        p = p * s2 + c
    return (e - 24.0) * _LN2 + (s * 2.0) * p


def _sincos_turn(bits: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi u for the 24-bit u = (bits >> 8) / 2^24; float64."""
    octant = bits >> 29
    t = ((bits >> 8) & 0x1FFFFF).to(torch.float64) * (1.0 / 2097152.0)
    odd = (octant & 1) == 1
    phi = torch.where(odd, 1.0 - t, t) * _PI_4
    x2 = phi * phi
    ps = torch.full_like(x2, _SIN_COEFFS[-1])
    for c in reversed(_SIN_COEFFS[:-1]):
        ps = ps * x2 + c
    sin_phi = ps * phi
    pc = torch.full_like(x2, _COS_COEFFS[-1])
    for c in reversed(_COS_COEFFS[:-1]):
        pc = pc * x2 + c
    cos_phi = pc
    sa = torch.where(odd, cos_phi, sin_phi)  # angle within the quadrant
    ca = torch.where(odd, sin_phi, cos_phi)
    q = octant >> 1
    cos_t = torch.where(q == 0, ca, torch.where(q == 1, -sa, torch.where(q == 2, -ca, sa)))
    sin_t = torch.where(q == 0, sa, torch.where(q == 1, ca, torch.where(q == 2, -sa, -ca)))
    return cos_t, sin_t


def normals(ka: Tensor, kb: Tensor, j: Tensor, k: int) -> Tensor:
    """Standard normals for rows (stream keys ka, kb: (N,), sample indices j: (N,) int64 < 2^32) and
    latents 0..k-1; returns (N, k) float32."""
    a = hash32(ka ^ j).unsqueeze(1)
    b = hash32(kb ^ j).unsqueeze(1)
    pairs = (k + 1) // 2
    idx = torch.arange(pairs, device=j.device, dtype=torch.int64) * 2
    u1 = hash32(a ^ hash32(b ^ idx))
    u2 = hash32(a ^ hash32(b ^ (idx + 1)))
    radius = torch.sqrt(_log_uniform(u1) * -2.0)
    cos_t, sin_t = _sincos_turn(u2)
    out = torch.stack(((radius * cos_t).float(), (radius * sin_t).float()), dim=2).flatten(1)
    return out[:, :k].contiguous()


def sample_normals(seed: int, stream_ids: Tensor, n_samples: int, k: int, *, sample_offset: int = 0) -> Tensor:
    """eta for streams (B,) and samples sample_offset .. + n_samples - 1: (B, n_samples, k) float32."""
    if sample_offset < 0 or sample_offset + n_samples > 2 ** 32:
        raise ValueError(f"sample indices must lie in [0, 2^32): offset={sample_offset}, n={n_samples}")
    ka, kb = stream_keys(seed, stream_ids)
    B = ka.shape[0]
    j = torch.arange(sample_offset, sample_offset + n_samples, device=ka.device, dtype=torch.int64)
    rows_a = ka.repeat_interleave(n_samples)
    rows_b = kb.repeat_interleave(n_samples)
    return normals(rows_a, rows_b, j.repeat(B), k).view(B, n_samples, k)
