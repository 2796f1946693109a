"""The Monte Carlo engine: how many reparameterised samples decode to within r of g(mu(x)).

Every estimator decodes samples only through :func:`count_within` / :func:`sample_distances`.
Samples z_bj = mu_b + eta_bj * sigma_b use the counter-based RNG of :mod:`robbench.rng`, so results do
not depend on chunking, batching or backend, and ``sample_offset`` continues a stream.

Backends: ``torch`` (pure PyTorch, fp32, the reference), ``cpp`` (compiled CPU op, see
:mod:`robbench.kernels`: same hidden layers, then a Lipschitz screen and a bf16 last layer whose
rigorous error band decides most samples, fp32 recheck of the rest: identical decisions), ``cuda``;
``auto`` picks the fastest available for the tensors' device.

Why the torch path is shaped the way it is (it defines "the fp32 computation" the other backends must
reproduce decision for decision):
- work proceeds in blocks of at most ``chunk_size`` decoded rows (default 2048), never B x S x D;
- every GEMM sees at least 64 rows (short blocks are padded): MKL switches to differently-ordered
  kernels for very small M, which would make a sample's fp32 value depend on its block;
- MLP layer widths are padded to multiples of 32 with zero weights, and transcendental activations
  run on pieces whose sizes and thread splits are multiples of 32 elements, so every element goes
  through ATen's vectorised (Sleef) path rather than the scalar tail (the two differ by an ulp);
- the epilogue (subtract centre, square, row sum) runs in place on the block.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from robbench import rng

DEFAULT_CHUNK_ROWS = 2048
MIN_GEMM_ROWS = 64
PAD = 32
_PIECE = 32768  # ATen's elementwise grain size: pieces this small run on one thread

ACT_NONE, ACT_RELU, ACT_SIGMOID = 0, 1, 2
_ACT_CODES = {nn.ReLU: ACT_RELU, nn.Sigmoid: ACT_SIGMOID, nn.Identity: ACT_NONE}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Decoder plans
# ---------------------------------------------------------------------------------------------
@dataclass
class MLPPlan:
    """An MLP decoder in kernel form. weights[l]: (out_pad, in_pad) fp32 contiguous, zero-padded to
    multiples of 32; weights_t[l] its transpose (in_pad, out_pad); biases[l]: (out_pad,);
    acts[l]: ACT_* code applied after layer l. out_dim: D (unpadded)."""

    weights: list[Tensor]
    weights_t: list[Tensor]
    biases: list[Tensor]
    acts: list[int]
    in_dim: int
    out_dim: int
    _extra: dict = field(default_factory=dict)  # per-backend caches (bf16 weights, norms)

    @property
    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of the unpadded network."""
        return sum(2 * w.shape[0] * w.shape[1] for w in self.weights)  # padded: an upper estimate


@dataclass
class GenericPlan:
    """Any other decoder: fn(z (N, k)) -> (N, D) float32."""

    fn: Callable[[Tensor], Tensor]
    out_dim: int


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, MLPPlan | GenericPlan]]" = weakref.WeakKeyDictionary()


def _mlp_layers(decoder: nn.Module) -> list[tuple[nn.Linear, int]] | None:
    """[(linear, act_code)] when ``decoder`` is Linear/activation only, else None."""
    if not isinstance(decoder, nn.Sequential):
        return None
    layers: list[tuple[nn.Linear, int]] = []
    for mod in decoder:
        if isinstance(mod, nn.Linear):
            layers.append((mod, ACT_NONE))
        elif type(mod) in _ACT_CODES and layers and layers[-1][1] == ACT_NONE:
            layers[-1] = (layers[-1][0], _ACT_CODES[type(mod)])
        elif isinstance(mod, (nn.Identity, nn.Flatten)):
            continue  # no-ops on (N, features)
        else:
            return None
    return layers or None


@torch.no_grad()
def _decoder_is_decode(model: nn.Module, decoder: nn.Module) -> bool:
    """Whether ``model.decoder`` computes what ``model.decode`` returns (flattened), checked on a probe batch:
    a model whose ``decoder`` gives logits while ``decode`` applies a sigmoid must not be decoded through it."""
    first = next((m for m in decoder.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        return False
    probe = torch.randn(4, first.in_features, generator=torch.Generator().manual_seed(0)).to(first.weight)
    try:
        return torch.allclose(decoder(probe).flatten(1), model.decode(probe).flatten(1), rtol=1e-5, atol=1e-6)
    except Exception:  # shapes or types that do not line up: decode() is the only safe path
        return False


def decoder_plan(model: nn.Module, out_dim: int) -> MLPPlan | GenericPlan:
    """The decoder of ``model`` as an :class:`MLPPlan` (``model.decoder`` made of Linear/ReLU/Sigmoid and
    computing exactly what ``model.decode`` returns) or else a :class:`GenericPlan` over
    ``model.decode(z).flatten(1)``. Cached per model and invalidated when any parameter changes."""
    decoder = getattr(model, "decoder", None)
    params = list(decoder.parameters()) if isinstance(decoder, nn.Module) else []
    key = tuple((p.data_ptr(), p._version) for p in params)
    try:
        cached = _PLANS.get(model)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = _mlp_layers(decoder) if isinstance(decoder, nn.Module) and _decoder_is_decode(model, decoder) else None
    plan: MLPPlan | GenericPlan
    if layers is not None:
        ws, wts, bs, acts = [], [], [], []
        for lin, act in layers:
            w = lin.weight.detach().float()
            out_f, in_f = w.shape
            in_pad = in_f if not ws else _round_up(in_f, PAD)  # the latent input is not padded
            wp = torch.zeros(_round_up(out_f, PAD), in_pad, dtype=torch.float32, device=w.device)
            wp[:out_f, :in_f] = w
            bp = torch.zeros(wp.shape[0], dtype=torch.float32, device=w.device)
            if lin.bias is not None:
                bp[:out_f] = lin.bias.detach().float()
            ws.append(wp.contiguous())
            wts.append(wp.t().contiguous())
            bs.append(bp)
            acts.append(act)
        plan = MLPPlan(ws, wts, bs, acts, in_dim=layers[0][0].in_features, out_dim=layers[-1][0].out_features)
        if plan.out_dim != out_dim:
            raise ValueError(f"model.decoder maps to {plan.out_dim} features but the centre has {out_dim}")
    else:
        # The protocol's decode() is the reference; a weak reference keeps the plan cache from holding the model.
        ref = weakref.ref(model)
        plan = GenericPlan(lambda z: ref().decode(z).flatten(1).float(), out_dim)
    try:
        _PLANS[model] = (key, plan)
    except TypeError:
        pass
    return plan


# ---------------------------------------------------------------------------------------------
# The torch reference
# ---------------------------------------------------------------------------------------------
def _pieces(n: int) -> Iterator[tuple[int, int]]:
    """Split [0, n) (n a multiple of 32) into pieces whose ATen thread splits start at multiples of 32."""
    threads = max(1, torch.get_num_threads())
    big = _PIECE * (1 << (threads.bit_length() - 1))  # a power of two of grain-size pieces
    start = 0
    while n - start >= big:
        yield start, start + big
        start += big
    while start < n:
        yield start, min(n, start + _PIECE)
        start += _PIECE


def activate_(x: Tensor, act: int) -> Tensor:
    """Apply ACT_* in place on a contiguous (M, P) block with P % 32 == 0 (see module docstring)."""
    if act == ACT_RELU:
        x.relu_()
    elif act == ACT_SIGMOID:
        flat = x.view(-1)
        for a, b in _pieces(flat.numel()):
            flat[a:b].sigmoid_()
    return x


def mlp_forward(plan: MLPPlan, z: Tensor) -> Tensor:
    """z: (M, k) float32 with M >= 64; returns the padded decoder output (M, P) float32."""
    h = z
    for wt, b, act in zip(plan.weights_t, plan.biases, plan.acts):
        h = activate_(torch.addmm(b, h, wt), act)
    return h


@dataclass
class _Block:
    p0: int  # first point
    p1: int  # one past the last point
    s0: int  # first sample (relative to sample_offset)
    s1: int


def _blocks(B: int, n: int, rows: int) -> Iterator[_Block]:
    """Tiles of (points x samples) with at most ``rows`` rows each."""
    c = max(1, min(n, rows // max(1, B) if B * n > rows else n))
    nb = max(1, min(B, rows // c))
    for p0 in range(0, B, nb):
        for s0 in range(0, n, c):
            yield _Block(p0, min(B, p0 + nb), s0, min(n, s0 + c))


def _latents(mu: Tensor, sigma: Tensor, ka: Tensor, kb: Tensor, blk: _Block, offset: int, pad_to: int) -> Tensor:
    """z for the block's rows (point-major), padded with zero rows to ``pad_to``: (max(M, pad_to), k)."""
    npts, ns = blk.p1 - blk.p0, blk.s1 - blk.s0
    j = torch.arange(offset + blk.s0, offset + blk.s1, device=mu.device, dtype=torch.int64).repeat(npts)
    ka_r = ka[blk.p0:blk.p1].repeat_interleave(ns)
    kb_r = kb[blk.p0:blk.p1].repeat_interleave(ns)
    eta = rng.normals(ka_r, kb_r, j, mu.shape[1]).view(npts, ns, -1)
    z = eta.mul_(sigma[blk.p0:blk.p1, None, :]).add_(mu[blk.p0:blk.p1, None, :]).view(npts * ns, -1)
    if z.shape[0] < pad_to:
        z = torch.cat([z, z.new_zeros(pad_to - z.shape[0], z.shape[1])])
    return z


def _torch_sq_distances(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n: int, seed: int,
                        stream_ids: Tensor, offset: int, rows: int) -> Iterator[tuple[_Block, Tensor]]:
    """Yields (block, squared distances (points, samples) float32) for all blocks."""
    plan = decoder_plan(model, center.shape[1])
    ka, kb = rng.stream_keys(seed, stream_ids)
    D = center.shape[1]
    for blk in _blocks(mu.shape[0], n, max(rows, MIN_GEMM_ROWS)):
        npts, ns = blk.p1 - blk.p0, blk.s1 - blk.s0
        m = npts * ns
        if isinstance(plan, MLPPlan):
            out = mlp_forward(plan, _latents(mu, sigma, ka, kb, blk, offset, MIN_GEMM_ROWS))
        else:  # padded too (MKL small-M paths); exact invariance is only promised for MLP plans
            out = plan.fn(_latents(mu, sigma, ka, kb, blk, offset, MIN_GEMM_ROWS))
        y = out[:m, :D].view(npts, ns, D)
        y.sub_(center[blk.p0:blk.p1, None, :])
        yield blk, y.mul_(y).sum(2)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def available_backends() -> list[str]:
    """Backends usable here, fastest last excluded: e.g. ["torch", "cpp"] (+ "cuda" with a GPU)."""
    from robbench import kernels

    out = ["torch"]
    if kernels.cpp_available():
        out.append("cpp")
    if kernels.cuda_available():
        out.append("cuda")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to the fastest available backend for ``device``; validate explicit names."""
    from robbench import kernels

    if backend == "auto":
        # "cuda" is only used when asked for by name until its kernels have been validated on a GPU.
        if device.type == "cpu" and kernels.cpp_available(warn=True):
            return "cpp"
        return "torch"
    if backend not in ("torch", "cpp", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; known: torch, cpp, cuda, auto")
    if backend == "cpp" and not kernels.cpp_available(warn=True):
        raise RuntimeError("backend 'cpp' requested but the compiled extension is unavailable "
                           f"({kernels.build_error()})")
    if backend == "cuda" and not kernels.cuda_available():
        raise RuntimeError("backend 'cuda' requested but no CUDA device/extension is available")
    return backend


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


def _radius_sq(radius: float | Tensor, B: int, device: torch.device) -> Tensor:
    """r^2 per point, computed in float32 (r * r) as every backend does: (B,)."""
    r = torch.as_tensor(radius, dtype=torch.float32, device=device).reshape(-1)
    r = r.expand(B) if r.numel() == 1 else r
    if r.shape != (B,):
        raise ValueError(f"radius must be a scalar or (B,) = ({B},); got {tuple(r.shape)}")
    return (r * r).contiguous()


@torch.no_grad()
def count_within(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, radius: float | Tensor,
                 n_samples: int, *, seed: int, stream_ids: Tensor | None = None, sample_offset: int = 0,
                 backend: str = "auto", chunk_size: int | None = None) -> Tensor:
    """mu, sigma: (B, k) (mu may be mu(x + delta)); center: (B, D) flattened g(mu(x)); radius: scalar or
    (B,) in output L2 units. Draws z_bj = mu_b + eta_bj sigma_b for j = sample_offset ..
    sample_offset + n_samples - 1 (see module docstring). ``chunk_size``: decoded rows held at once.
    Returns (B,) int64: how many samples have ||g(z_bj) - center_b||_2 <= radius_b (compared as
    squared distance <= r * r in float32)."""
    mu, sigma, center, stream_ids = _prepare(mu, sigma, center, stream_ids, n_samples, sample_offset)
    B = mu.shape[0]
    r2 = _radius_sq(radius, B, mu.device)
    name = resolve_backend(backend, mu.device)
    if name != "torch":
        from robbench import kernels

        return kernels.count_within(model, mu, sigma, center, r2, n_samples, seed=seed, stream_ids=stream_ids,
                                    sample_offset=sample_offset, backend=name, chunk_size=chunk_size).counts
    counts = torch.zeros(B, dtype=torch.int64, device=mu.device)
    for blk, d2 in _torch_sq_distances(model, mu, sigma, center, n_samples, seed, stream_ids, sample_offset,
                                       chunk_size or DEFAULT_CHUNK_ROWS):
        counts[blk.p0:blk.p1] += (d2 <= r2[blk.p0:blk.p1, None]).sum(1)
    return counts


@torch.no_grad()
def sample_distances(model: nn.Module, mu: Tensor, sigma: Tensor, center: Tensor, n_samples: int, *, seed: int,
                     stream_ids: Tensor | None = None, sample_offset: int = 0, backend: str = "torch",
                     chunk_size: int | None = None) -> Tensor:
    """(B, n_samples) float32 distances ||g(z_bj) - center_b||_2, the same samples as :func:`count_within`
    (sqrt of the float32 squared distance). Always computed in fp32 (backend "cpp" uses its fp32 path)."""
    mu, sigma, center, stream_ids = _prepare(mu, sigma, center, stream_ids, n_samples, sample_offset)
    B = mu.shape[0]
    name = resolve_backend(backend, mu.device)
    if name != "torch":
        from robbench import kernels

        return kernels.sample_sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                                           sample_offset=sample_offset, backend=name,
                                           chunk_size=chunk_size).sqrt_()
    out = torch.empty(B, n_samples, dtype=torch.float32, device=mu.device)
    for blk, d2 in _torch_sq_distances(model, mu, sigma, center, n_samples, seed, stream_ids, sample_offset,
                                       chunk_size or DEFAULT_CHUNK_ROWS):
        out[blk.p0:blk.p1, blk.s0:blk.s1] = d2.sqrt_()
    return out
