"""The decoder in kernel form, and the tiling of (points x samples) work that every backend shares.

Imported by the torch reference (:mod:`robbench.backends`) and by the compiled ops' wrappers
(:mod:`robbench.kernels`); it imports neither, so the engine has no import cycle.

Why the reference computation is shaped the way it is (it defines "the fp32 computation" the other
backends must reproduce decision for decision):
- work proceeds in blocks of at most ``chunk_rows`` decoded rows (default 2048), never B x S x D;
- every GEMM sees at least ``MIN_GEMM_ROWS`` = 64 rows (short blocks are padded): MKL switches to
  differently-ordered kernels for very small M, which would make a sample's fp32 value depend on its block;
- MLP layer widths are padded to multiples of ``PAD`` = 32 with zero weights, and transcendental
  activations run on pieces whose sizes and thread splits are multiples of 32 elements, so every element
  goes through ATen's vectorised (Sleef) path rather than the scalar tail (the two differ by an ulp).

The activation codes and ``MIN_GEMM_ROWS`` are mirrored in ``csrc/common/decoder.h`` (a test checks
that both sides agree).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from robbench import rng
from robbench.checks import CheckedModel

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
    # the compiled backend's adaptive screen (kernels.count_within, screen="auto"): calls in a row whose
    # screen decided < 1/8 of the samples, and calls since then that skipped it; reset with the plan
    screen_misses: int = field(default=0, compare=False, repr=False)
    screen_skips: int = field(default=0, compare=False, repr=False)

    @property
    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of the padded network (an upper estimate of the unpadded one)."""
        return sum(2 * w.shape[0] * w.shape[1] for w in self.weights)


@dataclass
class GenericPlan:
    """Any other decoder: fn(z (N, k)) -> (N, D) float32."""

    fn: Callable[[Tensor], Tensor]
    out_dim: int


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[Callable[[nn.Module], bool], MLPPlan | GenericPlan]]" = \
    weakref.WeakKeyDictionary()


def _has_hooks(mod: nn.Module) -> bool:
    """Whether a forward (pre-)hook may change what ``mod`` computes: its own or a global one."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def _mlp_layers(decoder: nn.Module) -> list[tuple[nn.Linear, int]] | None:
    """[(linear, act_code)] when ``decoder`` is a plain ``nn.Sequential`` of plain ``nn.Linear`` (weight and
    bias registered parameters) and activations, none with forward hooks, else None. Exact types: a subclass
    with its own forward, a parametrized Linear (``torch.nn.utils.parametrize``: its weight is computed from
    ``parametrizations.weight.original``), the old ``weight_norm`` / ``spectral_norm`` (weight recomputed by a
    pre-hook from other parameters) and hooks compute something the plan would not; the probe in
    :func:`_decoder_is_decode` cannot tell, since it runs them on both sides."""
    if type(decoder) is not nn.Sequential or _has_hooks(decoder):
        return None
    layers: list[tuple[nn.Linear, int]] = []
    for mod in decoder:
        if _has_hooks(mod):
            return None
        if type(mod) is nn.Linear:
            if not isinstance(mod._parameters.get("weight"), nn.Parameter) or "bias" not in mod._parameters:
                return None
            layers.append((mod, ACT_NONE))
        elif type(mod) in _ACT_CODES and layers and layers[-1][1] == ACT_NONE:
            layers[-1] = (layers[-1][0], _ACT_CODES[type(mod)])
        elif type(mod) in (nn.Identity, nn.Flatten):
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


def _mlp_plan(layers: list[tuple[nn.Linear, int]]) -> MLPPlan:
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
    return MLPPlan(ws, wts, bs, acts, in_dim=layers[0][0].in_features, out_dim=layers[-1][0].out_features)


def _params_key(decoder: object) -> tuple:
    """(data_ptr, version) of every parameter of ``decoder`` (any structure) and which of its modules have
    forward hooks: a generic plan's key (a hook removed again lets an MLP decoder have its MLP plan back)."""
    if not isinstance(decoder, nn.Module):
        return ()
    return (tuple((p.data_ptr(), p._version) for p in decoder.parameters()),
            tuple(_has_hooks(m) for m in decoder.modules()))


def _mlp_guard(decoder: nn.Module, layers: list[tuple[nn.Linear, int]]) -> Callable[[nn.Module], bool]:
    """A check that an MLP plan made from ``decoder`` (a flat Sequential, see :func:`_mlp_layers`) still holds
    for ``model``, in a few attribute reads per layer instead of a walk over the modules (it runs on every
    Monte Carlo call: benchmarks/README.md, session 10). It fails when ``model.decoder`` is another module,
    when any child of the Sequential was replaced, added or removed, when a Linear's weight or bias is
    another tensor (assigned, registered, removed, or converted by ``.to()`` / ``.double()``, which assign
    ``param.data``: a new data pointer; the storages the plan was made from are kept alive, so no new one
    can take their address), when a forward hook was registered on the Sequential, a child or globally,
    or when a weight or bias was changed in place through itself or a view (its
    version counter: ``copy_`` / ``add_`` under ``torch.no_grad()``, ``load_state_dict``, optimizer steps).
    Like torch autograd's own checks it cannot see writes that bypass the version counter (``p.data.add_()``,
    writes through ``p.numpy()``); the tests in tests/test_decoding.py show each case it catches."""
    children = tuple(decoder._modules.values())
    watched = []
    for lin, _ in layers:
        for name in ("weight", "bias"):
            t = lin._parameters.get(name)
            watched.append((lin, name, t, t.data_ptr() if t is not None else 0, t._version if t is not None else 0))
    # The storages the plan was made from, kept alive while it is cached: `p.data = x` keeps p's version
    # counter, so only the data pointer tells a new storage, and a freed one's address could be reused by it.
    pinned = tuple(t.untyped_storage() for lin, _ in layers for t in (lin.weight, lin.bias) if t is not None)
    watched_t = tuple(watched)

    def valid(model: nn.Module, _pinned: tuple = pinned) -> bool:
        d = getattr(model, "decoder", None)
        if d is not decoder or tuple(d._modules.values()) != children:
            return False
        if _has_hooks(d) or any(_has_hooks(c) for c in children):  # registered since the plan was made
            return False
        for lin, name, t, ptr, version in watched_t:
            if lin._parameters.get(name) is not t:
                return False
            if t is not None and (t._version != version or t.data_ptr() != ptr):
                return False
        return True

    return valid


def decoder_plan(model: nn.Module, out_dim: int) -> MLPPlan | GenericPlan:
    """The decoder of ``model`` as an :class:`MLPPlan` (``model.decoder`` made of Linear/ReLU/Sigmoid and
    computing exactly what ``model.decode`` returns) or else a :class:`GenericPlan` over
    ``model.decode(z).flatten(1)``. Cached per model and invalidated when the decoder changes (an MLP plan:
    :func:`_mlp_guard`; any other: when a parameter's data pointer or version changes). A model
    wrapped in :class:`robbench.checks.CheckedModel` (every run wraps it anew) shares the wrapped model's
    MLP plan, which never calls ``decode``: the same weight tensors in every run, so the compiled backends'
    per-weight caches keep hitting."""
    if isinstance(model, CheckedModel):
        inner = decoder_plan(model.unwrapped, out_dim)
        if isinstance(inner, MLPPlan):
            return inner
    try:
        cached = _PLANS.get(model)
    except TypeError:
        cached = None
    if cached is not None and cached[0](model):
        plan = cached[1]
        if isinstance(plan, MLPPlan) and plan.out_dim != out_dim:
            raise ValueError(f"model.decoder maps to {plan.out_dim} features but the centre has {out_dim}")
        return plan
    decoder = getattr(model, "decoder", None)
    layers = _mlp_layers(decoder) if isinstance(decoder, nn.Module) and _decoder_is_decode(model, decoder) else None
    plan: MLPPlan | GenericPlan
    valid: Callable[[nn.Module], bool]
    if layers is not None:
        plan = _mlp_plan(layers)
        if plan.out_dim != out_dim:
            raise ValueError(f"model.decoder maps to {plan.out_dim} features but the centre has {out_dim}")
        valid = _mlp_guard(decoder, layers)
    else:
        # The protocol's decode() is the reference; a weak reference keeps the plan cache from holding the model.
        ref = weakref.ref(model)
        plan = GenericPlan(lambda z: ref().decode(z).flatten(1).float(), out_dim)
        key = _params_key(decoder)
        valid = lambda m: _params_key(getattr(m, "decoder", None)) == key  # noqa: E731
    try:
        _PLANS[model] = (valid, plan)
    except TypeError:
        pass
    return plan


# ---------------------------------------------------------------------------------------------
# The reference forward pass
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


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------
@dataclass
class Block:
    """A tile of the (points x samples) work: points [p0, p1), samples [s0, s1) (relative to the offset)."""

    p0: int
    p1: int
    s0: int
    s1: int


def blocks(B: int, n: int, rows: int) -> Iterator[Block]:
    """Tiles of (B points x n samples) with at most ``rows`` decoded rows each, point-major."""
    c = max(1, min(n, rows // max(1, B) if B * n > rows else n))
    nb = max(1, min(B, rows // c))
    for p0 in range(0, B, nb):
        for s0 in range(0, n, c):
            yield Block(p0, min(B, p0 + nb), s0, min(n, s0 + c))


def latents(mu: Tensor, sigma: Tensor, ka: Tensor, kb: Tensor, blk: Block, offset: int, pad_to: int) -> Tensor:
    """z = mu + eta * sigma for the block's rows (point-major), padded with zero rows to ``pad_to``:
    (max(M, pad_to), k) float32, M = points x samples of the block. ka, kb: (B,) stream keys."""
    npts, ns = blk.p1 - blk.p0, blk.s1 - blk.s0
    j = torch.arange(offset + blk.s0, offset + blk.s1, device=mu.device, dtype=torch.int64).repeat(npts)
    ka_r = ka[blk.p0:blk.p1].repeat_interleave(ns)
    kb_r = kb[blk.p0:blk.p1].repeat_interleave(ns)
    eta = rng.normals(ka_r, kb_r, j, mu.shape[1]).view(npts, ns, -1)
    z = eta.mul_(sigma[blk.p0:blk.p1, None, :]).add_(mu[blk.p0:blk.p1, None, :]).view(npts * ns, -1)
    if z.shape[0] < pad_to:
        z = torch.cat([z, z.new_zeros(pad_to - z.shape[0], z.shape[1])])
    return z


def decoded_blocks(plan: MLPPlan | GenericPlan, mu: Tensor, sigma: Tensor, n: int, seed: int, stream_ids: Tensor,
                   offset: int, rows: int) -> Iterator[tuple[Block, Tensor]]:
    """The one block loop: yields (block, g(z) of its rows as (points, samples, D) float32), decoded by
    the reference forward pass (MLP plans) or the plan's function (generic decoders). The view may
    be modified in place; it is only valid until the next block."""
    ka, kb = rng.stream_keys(seed, stream_ids)
    D = plan.out_dim
    for blk in blocks(mu.shape[0], n, max(rows, MIN_GEMM_ROWS)):
        npts, ns = blk.p1 - blk.p0, blk.s1 - blk.s0
        z = latents(mu, sigma, ka, kb, blk, offset, MIN_GEMM_ROWS)
        # Generic decoders are padded too (MKL small-M paths); exact invariance is only promised for MLP plans.
        out = mlp_forward(plan, z) if isinstance(plan, MLPPlan) else plan.fn(z)
        yield blk, out[:npts * ns, :D].view(npts, ns, D)
