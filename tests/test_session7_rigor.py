"""Adversarial checks of session 7's changes to the cpp backend's exact decisions (review RA):

- The tile pass's band E (``LastLayerBound::decide_tiles``, csrc/common/bounds.h part 7: the lean terms) is
  compared with the part-3 bound it must not undercut, evaluated here in float64 from the exact inputs of
  each term (the exact norms of h, ĥ, δh, W_j, Ŵ_j, δW_j, ||δW||_2, ||Ŵ δh||, the logits a_j and the outputs
  ŷ_j the pass itself forms). The last layers are built so that single terms dominate E: bf16-exact W and h
  (δW = 0, δh = 0: E is ||t∘ρ + 2 ev|| alone), rows of very different norms with the largest one in the
  scalar tail, logits cancelled to moderate values under huge ||W_j|| ||h|| (Δ_j ~ 0.5: the slope factor
  1 + Δ + Δ^2 matters), all-saturated outputs (the 32 v term of the slope bound), P = 1, 15, 17, 63, 65.
  Weakening one lean term (the slope factor, rWf_j in ρ_j, 32 v, the tail) makes these fail.
- The counts of mlp_count through those layers (D < P: the plan pads P to 32) equal the torch reference's
  sample by sample at radii equal to each sample's fp32 squared distance and one ulp either side, with the
  tiles, without them, with part 5's terms in the tiles and with ŷ stored; the refinement's recomputed ŷ
  gives the same band statistics as the stored one.
- The per-thread workspaces survive a call under torch.inference_mode() followed by a normal call (and the
  reverse), and a direct op call with weights that require grad.
- rng.stream_keys' numpy path equals the torch ops for int64 extremes, other integer dtypes and 2-d
  strided ids.
Correctness only: nothing here is timed."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench import kernels, rng
from robbench.backends import TorchBackend, sq_distance_blocks
from conftest import band_stats

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")

V = 2.0 ** -24


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"


def _brgemm_or_skip():
    usable = torch.ops.robbench.bf16_product_self_check(16, 16) <= 1.0
    if not usable and not kernels.bf16_supported():
        pytest.skip("no brgemm on this CPU")
    assert usable


def _bf16_flushed(x: torch.Tensor) -> torch.Tensor:
    """bf16(x) (round to nearest even) with subnormal values set to +0, as the band's Ŵ and ĥ (bounds.h part 2)."""
    b = x.bfloat16()
    return torch.where((b.view(torch.int16) & 0x7F80) == 0, torch.zeros_like(b), b)


def _part3_bound(h, wt, b, act, fast=False):
    """The part-3 band E (bounds.h parts 2, 3, 6: brgemm's fp32 product, u |s_j| = 0) in float64 from the exact
    inputs, per row: max_j t_j (||δW||_2 ||h|| + ||Ŵ δh||) + ||t∘ρ + 2 ev||, with Δ_j and ρ_j of part 2 (exact
    norms, v |a_j| with the pass's own a_j) and t_j = min(1/4, (ŷ_j (1 - ŷ_j) + 32 v)(1 + Δ_j + Δ_j^2)) from the
    pass's own ŷ_j (1 without a sigmoid). Every inflation the code adds makes its E larger than this.
    fast (part 9): ŷ from the fast sigmoid on the whole 16-lane vectors (the scalar tail keeps the exact one),
    there ev + ε for 2 ev and ε (1 + ε) for 32 v (ε = kSigFastErr)."""
    n, K = h.shape
    P = wt.shape[1]
    wb, hb = _bf16_flushed(wt), _bf16_flushed(h)
    s = torch.ops.robbench.bf16_product(hb.contiguous(), wb.contiguous())  # brgemm, as the tile pass
    a = s + b
    if act == 2:  # the own sigmoid, split as the pass splits a row (whole 16-lane vectors, then scalar units)
        y = torch.stack([torch.ops.robbench.sigmoid_fp32(a[i].contiguous()) for i in range(n)])
        jv = P // 16 * 16
        if fast and jv:
            y[:, :jv] = torch.ops.robbench.sigmoid_fp32(a[:, :jv].contiguous(), False, True)
    else:
        y = a if act == 0 else torch.relu(a)
    W, Wb, hd, hbd = wt.double().t(), wb.double().t(), h.double(), hb.double()
    dW, dh = W - Wb, hd - hbd
    gK, gK1 = K * V / (1 - K * V), (K + 1) * V / (1 - (K + 1) * V)
    nh, nhb, ndh = hd.norm(dim=1, keepdim=True), hbd.norm(dim=1, keepdim=True), dh.norm(dim=1, keepdim=True)
    rW, rdW, rWf = Wb.norm(dim=1), dW.norm(dim=1), W.norm(dim=1)
    common = V * a.double().abs() + gK1 * (rWf * nh + b.double().abs()) + 2.0 ** -100
    delta = rdW * nh + rW * (ndh + gK * nhb) + common
    rho = rW * gK * nhb + common
    if act == 2:
        yd = y.double()
        sl, ev2 = torch.full_like(yd, 32 * V), torch.full_like(yd, 32 * V)
        if fast:
            eps = torch.ops.robbench.sigmoid_fast_constants()[0]
            jv = P // 16 * 16
            sl[:, :jv], ev2[:, :jv] = eps * (1 + eps), 16 * V + eps
        t = ((yd * (1 - yd) + sl) * (1 + delta + delta ** 2)).clamp(max=0.25)
        t = torch.where(delta > 1, torch.full_like(t, 0.25), t)
    else:
        t, ev2 = torch.ones_like(delta), 0.0
    spec_dW = torch.linalg.matrix_norm(dW, 2)
    n_wdh = (dh @ Wb.t()).norm(dim=1)
    return t.max(1).values * (spec_dW * nh[:, 0] + n_wdh) + (t * rho + ev2).norm(dim=1), y


def _cancelled_layer(K, P, seed, *, saturated=False, noisy=False):
    """h (3, K) and W^T (K, P), b (P,): h_k = c (k < K - 1), h_{K-1} = 1; row j of W is +-A_j alternating over the
    first K - 1 inputs (K - 1 even: they cancel exactly in any order) and L_j last, so a_j = L_j + b_j while
    ||W_j|| ||h|| ~ A_j c (K - 1): Δ_j ~ 2 (K + 1) v A_j c (K - 1), ~0.55 for the largest row, which sits in
    the last unit (the scalar tail when P % 16 != 0) and at unit 1. A_j spans 2^-20 .. 2^0 of the largest.
    L_j: +-3 (unsaturated, below the 1/4 cap even with the slope factor), or +-20 / +-30 (saturated).
    noisy: W and h moved off the bf16 grid by < 1/2 ulp (δW, δh != 0: both parts of E)."""
    assert K % 2 == 1
    g = torch.Generator().manual_seed(seed)
    c = 2.0 ** 6
    a_max = 2.0 ** round(math.log2(0.55 / (2 * (K + 1) * V * c * (K - 1))))
    expo = torch.randint(-20, 1, (P,), generator=g).float()
    expo[-1] = 0.0
    if P > 1:
        expo[1] = 0.0
    A = a_max * 2.0 ** expo
    sign = torch.tensor([(-1.0) ** k for k in range(K - 1)])
    wt = torch.empty(K, P)
    wt[:K - 1] = sign[:, None] * A[None, :]
    levels = torch.tensor([20.0, -20.0, 30.0, -30.0]) if saturated else torch.tensor([3.0, -3.0])
    wt[K - 1] = levels[torch.randint(0, len(levels), (P,), generator=g)]
    b = torch.zeros(P)
    h = torch.full((3, K), c)
    h[:, K - 1] = 1.0
    h[1, : K - 1] *= 0.5  # rows of different ||h||
    h[2, : K - 1] *= 0.75
    if noisy:
        wt = wt * (1 + (torch.rand(K, P, generator=g) - 0.5) * 2.0 ** -9)
        h = h * (1 + (torch.rand(3, K, generator=g) - 0.5) * 2.0 ** -9)
    return h.contiguous(), wt.contiguous(), b


def _band(h, wt, b, act, tiles, lean, monkeypatch, fast="1"):
    monkeypatch.setenv("ROBBENCH_LEAN_TERMS", lean)
    monkeypatch.setenv("ROBBENCH_FAST_SIGMOID", fast)
    y = torch.sigmoid(torch.addmm(b, h, wt)) if act == 2 else torch.addmm(b, h, wt)
    cen = (y + 0.01).contiguous()
    d2 = ((y - cen) ** 2).sum(1)
    return torch.ops.robbench.band_tiles_check(h, wt, b, cen, d2[:, None].contiguous(), act, tiles)


@pytest.mark.parametrize("P", [1, 15, 17, 63, 65])
@pytest.mark.parametrize("K", [3, 33])
@pytest.mark.parametrize("kind", ["unsaturated", "saturated", "noisy"])
def test_tile_band_never_undercuts_the_part3_bound_on_adversarial_layers(P, K, kind, monkeypatch):
    """E of the tile pass (lean terms with the fast sigmoid of part 9 and with the exact one, part 5's terms),
    and of the row path, >= the part-3 bound in float64, on layers where the slope factor, ρ_j's terms, the
    32 v term (with the fast sigmoid: its ε terms) or the scalar tail carry E."""
    _brgemm_or_skip()
    h, wt, b = _cancelled_layer(K, P, seed=P * 7 + K, saturated=kind == "saturated", noisy=kind == "noisy")
    need, y = _part3_bound(h, wt, b, 2)
    need_fast, _ = _part3_bound(h, wt, b, 2, fast=True)
    # the layer does what it is built for: the largest Δ_j near 0.5 (slope factor ~1.8) and the outputs
    yd = y.double()
    if kind == "saturated":
        assert bool(((yd * (1 - yd)) < 1e-8).all())
    elif kind == "unsaturated":
        assert bool(((yd * (1 - yd) - 0.0452).abs() < 1e-3).all())
    for tiles, lean, fast in ((True, "1", "1"), (True, "1", "0"), (True, "0", "1"), (False, "1", "1")):
        _, _, E = _band(h, wt, b, 2, tiles, lean, monkeypatch, fast)
        ref = need_fast if tiles and lean == "1" and fast == "1" else need
        assert bool((E >= ref).all()), (tiles, lean, fast, (E / ref).tolist())
        if kind != "noisy":  # δW = δh = 0: E is ||f||; the lean ρ_j ((rW_j + rWf_j) times the larger
            # coefficient) exceeds part 2's by up to (2K + 2) / (2K + 1), Δ* each Δ_j: the check is not vacuous
            assert bool((E <= ref * 1.3).all()), (tiles, lean, fast, (E / ref).tolist())


@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("P", [1, 17, 65])
def test_tile_band_without_sigmoid_never_undercuts_the_part3_bound(act, P, monkeypatch):
    """ReLU / identity (part 5's terms inside the tiles): E >= ||δW||_2 ||h|| + ||Ŵ δh|| + ||ρ||."""
    _brgemm_or_skip()
    h, wt, b = _cancelled_layer(33, P, seed=P, noisy=True)
    need, _ = _part3_bound(h, wt, b, act)
    for tiles in (True, False):
        _, _, E = _band(h, wt, b, act, tiles, "1", monkeypatch)
        assert bool((E >= need).all()), (tiles, (E / need).tolist())


class _Stress(nn.Module):
    """k -> K (ReLU) -> D (sigmoid): the hidden layer gives h ~ c (bias c, small weights) and the last layer
    is _cancelled_layer's (+-A_j alternating, L_j on a hidden unit held near 1), so the samples' logits stay
    moderate (or saturated) under huge ||W_j|| ||h||; D = 1, 15, 17, 63, 65 (the plan pads P to 32, 32, 32,
    64, 96: D < P)."""

    def __init__(self, D, K=33, saturated=False, seed=0):
        super().__init__()
        self.latent_dim, self.input_shape = 4, (D,)
        _, wt, b = _cancelled_layer(K, D, seed=seed, saturated=saturated)
        g = torch.Generator().manual_seed(seed + 1)
        first = nn.Linear(4, K)
        last = nn.Linear(K, D)
        with torch.no_grad():
            first.weight.copy_(torch.randn(K, 4, generator=g) * 2.0 ** -14)
            first.bias.fill_(2.0 ** 6)
            first.bias[K - 1] = 1.0
            last.weight.copy_(wt.t())
            last.bias.copy_(b)
            if saturated:  # two unsaturated units, so that the samples' distances differ
                last.weight[0, K - 1] = 2.0
                last.weight[2 % D, K - 1] = -2.0
        self.decoder = nn.Sequential(first, nn.ReLU(), last, nn.Sigmoid())

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


@pytest.mark.parametrize("D", [1, 15, 17, 63, 65])
@pytest.mark.parametrize("saturated", [False, True])
def test_counts_on_stress_layers_equal_the_reference_one_ulp_either_side(D, saturated, monkeypatch, capfd):
    """One sample per point, r2 = that sample's fp32 squared distance x (1 + eps) for eps in +-(0, 1e-6 .. 0.3)
    and one ulp either side: every count equals the reference's, under each switch of part 7; ŷ recomputed for
    the refinement (epilogue_row) and ŷ stored give the same band statistics (the same numbers)."""
    _brgemm_or_skip()
    model = _Stress(D, saturated=saturated, seed=D)
    B = 80
    g = torch.Generator().manual_seed(D)
    mu = torch.randn(1, 4, generator=g).expand(B, -1).contiguous()
    sigma = torch.full((B, 4), 0.7)
    center = (model.decode(mu[:1]).detach() + 0.02 * torch.randn(1, D, generator=g)).expand(B, -1).contiguous()
    d2 = torch.empty(B)
    for blk, part in sq_distance_blocks(model, mu, sigma, center, 1, 5, torch.arange(B), 0, 2048):
        d2[blk.p0:blk.p1] = part[:, 0]
    assert d2.unique().numel() > B // 2  # the samples differ
    radii = [d2, torch.nextafter(d2, torch.zeros(())), torch.nextafter(d2, torch.full((), 1e30))]
    radii += [d2 * (1 + s * e) for e in (1e-6, 1e-4, 1e-2, 0.3) for s in (1, -1)]
    variants = {"tiles": {}, "store_y": {"ROBBENCH_TILE_STORE_Y": "1"}, "part5": {"ROBBENCH_LEAN_TERMS": "0"},
                "rows": {"ROBBENCH_BAND_TILES": "0"}, "exact_sigmoid": {"ROBBENCH_FAST_SIGMOID": "0"}}
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    stats = {}
    for name, env in variants.items():
        for key in ("ROBBENCH_TILE_STORE_Y", "ROBBENCH_LEAN_TERMS", "ROBBENCH_BAND_TILES", "ROBBENCH_FAST_SIGMOID"):
            monkeypatch.delenv(key, raising=False)
        for key, val in env.items():
            monkeypatch.setenv(key, val)
        capfd.readouterr()
        for r2 in radii:
            r2 = r2.contiguous()
            res = kernels.count_within(model, mu, sigma, center, r2, 1, seed=5, stream_ids=torch.arange(B),
                                       precision="bf16", screen=False)
            assert torch.equal(res.counts, (d2 <= r2).long()), name
        stats[name] = band_stats(capfd.readouterr().err)
    assert stats["exact_sigmoid"] == stats["store_y"]  # store_y keeps the exact sigmoid (part 9)
    assert stats["tiles"][0] == B * len(radii) and stats["tiles"][2] >= 2 * B  # the tie and one ulp below


def _stress_call(D=17):
    model = _Stress(D, seed=3)
    B = 8
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(B, 4, generator=g)
    sigma = torch.full((B, 4), 0.7)
    center = model.decode(mu).detach()
    r2 = torch.full((B,), 1e-3)
    ref = TorchBackend().count_within(model, mu, sigma, center, r2, 300, seed=1,
                                              stream_ids=torch.arange(B)).counts
    return model, mu, sigma, center, r2, ref


@pytest.mark.parametrize("order", ["inference_first", "normal_first"])
def test_workspaces_survive_inference_mode_and_normal_calls(order):
    """A thread's workspaces are made by whichever call comes first: a call under torch.inference_mode() then a
    normal one (inference tensors updated in place outside inference mode), and the reverse."""
    model, mu, sigma, center, r2, ref = _stress_call()
    modes = [True, False] if order == "inference_first" else [False, True]
    for inference in modes + modes:
        for precision, screen in (("bf16", True), ("fp32", False), ("bf16", False)):
            with torch.inference_mode(inference):
                got = kernels.count_within(model, mu, sigma, center, r2, 300, seed=1, stream_ids=torch.arange(8),
                                           precision=precision, screen=screen, chunk_size=512)
            assert torch.equal(got.counts, ref), (inference, precision, screen)


def test_mlp_count_op_with_weights_that_require_grad():
    """The op called directly with leaf weights that require grad (the plan detaches them; a direct caller may
    not): the hidden layers' at::addmm_out into workspaces must not trip autograd's out= check."""
    from robbench import decoding

    model, mu, sigma, center, r2, ref = _stress_call()
    plan = decoding.decoder_plan(model, center.shape[1])
    wts = [w.clone().requires_grad_(True) for w in plan.weights_t]
    bs = [x.clone().requires_grad_(True) for x in plan.biases]
    ka, kb = rng.stream_keys(1, torch.arange(8))
    for precision, screen in ((1, True), (0, False)):
        counts, _ = torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, 300, 0, wts, bs, plan.acts,
                                                 precision, screen, 512)
        assert torch.equal(counts, ref)


def test_stream_keys_numpy_path_for_other_dtypes_and_layouts():
    """The numpy path (CPU ids) against the torch ops: int64 extremes, int32 / int16 / uint8 ids (sign
    extension), a transposed 2-d view, an empty tensor, negative and 2^64 - 1 seeds. (A 0-d id tensor, which
    no caller may pass, raises TypeError on the numpy path; the torch path returned 0-d keys.)"""
    g = torch.Generator().manual_seed(4)
    big = torch.tensor([-2 ** 63, 2 ** 63 - 1, -1, 0, 2 ** 32, -2 ** 32, 2 ** 31, -2 ** 31 - 1])
    cases = [big, big.int(), torch.randint(-2 ** 31, 2 ** 31 - 1, (50,), dtype=torch.int32, generator=g),
             torch.tensor([-5, 7], dtype=torch.int16), torch.tensor([0, 255, 128], dtype=torch.uint8),
             torch.randint(-2 ** 62, 2 ** 62, (4, 6), generator=g).t(), torch.empty(0, dtype=torch.long)]
    for seed in (0, -1, -2 ** 63, 2 ** 64 - 1, 12345):
        for ids in cases:
            fast, slow = rng.stream_keys(seed, ids), rng._stream_keys_torch(seed, ids)
            for x, y in zip(fast, slow):
                assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
                assert torch.equal(x, y), (seed, ids)
