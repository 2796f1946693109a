"""The last hidden layer computed by own loops for the bf16 pass (``hidden_rows``, csrc/common/bounds.h part 8):
its bound eps >= ||h - h'|| against ATen's layer (including a layer built so that the two summation orders
differ by ~100x the bf16 rounding of h), the row invariance of ATen's hidden GEMM that the fp32 recheck relies
on, and mlp_count's decisions sample by sample against the fp32 reference at radii on and one ulp either side
of each sample's fp32 squared distance: tails of 1..130 rows, k = 1..40, hidden widths that are not multiples
of 16, one and two hidden layers, screen on and off, NaN / inf / huge latents, a layer whose sums overflow in ATen's
order only, a screen case that the eps term decides, ROBBENCH_FUSED_HIDDEN=0 and the portable
ROBBENCH_NO_AVX512=1 loop. Correctness only: no timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robbench import kernels
from robbench.backends import TorchBackend
from conftest import band_stats

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")

RELU, NONE, SIGMOID = 1, 0, 2
PORTABLE = os.environ.get("ROBBENCH_NO_AVX512") is not None


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"


def _bf16_or_skip():
    if not kernels.bf16_supported():
        pytest.skip("no native bf16 on this CPU: the bf16 pass does not run")


def _cancelling_layer(k: int, K: int, seed: int, big: float = 2.0 ** 20) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 (K, k), b1 (K,): input 0 (held at 1 by the callers) times -big cancels the bias big + c_j, so the
    unit's value c_j + small terms depends on where in the sum the two big terms meet: for big = 2^20 ATen's
    and our order differ by ~0.3 (||h|| ~ 8) where bf16(h) is within ~0.01; for 2^12 by ~1e-3, below the
    bf16 rounding but far above the refinement's own fp32 term (bounds.h part 4)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(K, k, generator=g)
    w1[:, 0] = -big
    b1 = big + torch.randn(K, generator=g)
    return w1, b1


@pytest.mark.parametrize("k", [1, 3, 10, 17, 40])
@pytest.mark.parametrize("K", [1, 7, 37, 256])
@pytest.mark.parametrize("act", [RELU, NONE])
def test_hidden_rows_are_within_eps_of_atens_layer(k, K, act):
    """||h_aten - h'|| <= eps per row (1..130 rows: the two-row loop's odd tail), ||h'||^2 is the row's sum of
    squares, on random layers and (k >= 2) on the cancelling layer where the orders really differ."""
    g = torch.Generator().manual_seed(k * 100 + K)
    layers = [(torch.randn(K, k, generator=g) / k ** 0.5, torch.randn(K, generator=g))]
    if k >= 2:
        layers += [_cancelling_layer(k, K, seed=k + K), _cancelling_layer(k, K, seed=k + K, big=2.0 ** 12)]
    for n in (1, 2, 3, 17, 130):
        x = torch.randn(n, k, generator=g) * 3
        for w1, b1 in layers:
            if w1[0, 0] <= -2.0 ** 12:
                x[:, 0] = 1.0
            ref = torch.addmm(b1, x, w1.t())
            if act == RELU:
                ref = ref.relu()
            h, s2, eps = torch.ops.robbench.hidden_rows(x, w1.t().contiguous(), b1, act)
            err = (ref.double() - h.double()).norm(dim=1)
            assert bool((err <= eps).all()), (err / eps).max().item()
            assert torch.allclose(s2.double(), (h.double() ** 2).sum(1), rtol=1e-5, atol=1e-30)


def test_hidden_rows_eps_is_not_finite_for_non_finite_or_huge_inputs():
    """A NaN, an infinite or a huge input (||x||^2 overflows fp32) gives a NaN or infinite eps: no bound that
    adds it decides anything."""
    w1, b1 = torch.randn(37, 4), torch.randn(37)
    x = torch.tensor([[float("nan"), 0, 0, 0], [float("inf"), 0, 0, 0], [3e19, 1, 1, 1], [1, 1, 1, 1]])
    _, _, eps = torch.ops.robbench.hidden_rows(x, w1.t().contiguous(), b1, RELU)
    assert not bool(eps[:3].isfinite().any()) and bool(eps[3].isfinite())


def test_hidden_rows_opcheck():
    kernels.load()
    x, w1, b1 = torch.randn(5, 4), torch.randn(37, 4), torch.randn(37)
    torch.library.opcheck(torch.ops.robbench.hidden_rows.default, (x, w1.t().contiguous(), b1, RELU))


def test_hidden_rows_rejects_bad_input():
    w1, b1 = torch.randn(37, 4), torch.randn(37)
    with pytest.raises(RuntimeError, match="act must be ReLU"):
        torch.ops.robbench.hidden_rows(torch.randn(3, 4), w1.t().contiguous(), b1, SIGMOID)
    with pytest.raises(RuntimeError, match="wt must be"):
        torch.ops.robbench.hidden_rows(torch.randn(3, 5), w1.t().contiguous(), b1, RELU)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,K", [(1, 37), (10, 256), (40, 37), (10, 100)])
def test_atens_hidden_gemm_rows_do_not_depend_on_the_other_rows(k, K, threads):
    """The assumption of exact_hidden_rows (and of the fp32 recheck): ATen's addmm on >= 64 rows gives each row
    the bits it gets inside the reference's 2048-row block, for gathered subsets zero-padded to 64 rows."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(k * K)
        x = torch.randn(2048, k, generator=g)
        wt, b = torch.randn(k, K, generator=g), torch.randn(K, generator=g)
        full = torch.addmm(b, x, wt).relu_()
        for q in (1, 5, 64, 100, 130):
            idx = torch.randperm(2048, generator=g)[:q]
            xg = torch.zeros(max(q, 64), k)
            xg[:q] = x[idx]
            part = torch.addmm(b, xg, wt).relu_()[:q]
            assert torch.equal(part, full[idx]), (q, (part - full[idx]).abs().max().item())
    finally:
        torch.set_num_threads(old)


def _layers(k: int, widths: list[int], D: int, seed: int, cancel: float = 0.0):
    """weights_t, biases, acts of an MLP k -> widths (ReLU) -> D (sigmoid), unpadded; `cancel`: the last hidden
    layer is _cancelling_layer with big = cancel (its input 0 must be held at 1: mu_0 = 1, sigma_0 = 0)."""
    g = torch.Generator().manual_seed(seed)
    dims = [k] + widths + [D]
    wts, bs = [], []
    for i in range(len(dims) - 1):
        wts.append((torch.randn(dims[i + 1], dims[i], generator=g) * (1.5 / dims[i] ** 0.5)).t().contiguous())
        bs.append(torch.randn(dims[i + 1], generator=g) * 0.3)
    if cancel:
        w1, b1 = _cancelling_layer(dims[-3], dims[-2], seed, cancel)
        wts[-2], bs[-2] = w1.t().contiguous(), b1
        wts[-1] = wts[-1] * 0.3
    # the op takes widths padded to multiples of 32 as the decoder plan makes them (zero units)
    for i in range(len(wts)):
        n_out = wts[i].shape[1]
        pad = -n_out % 32
        wts[i] = torch.cat([wts[i], torch.zeros(wts[i].shape[0], pad)], 1)
        bs[i] = torch.cat([bs[i], torch.zeros(pad)])
        if i + 1 < len(wts):
            wts[i + 1] = torch.cat([wts[i + 1], torch.zeros(pad, wts[i + 1].shape[1])], 0)
    return [w.contiguous() for w in wts], bs, [RELU] * len(widths) + [SIGMOID]


def _one_sample_per_point(B: int, k: int, D: int, wts, bs, acts, seed: int, cancel: float = 0.0):
    """mu, sigma, center, ka, kb and each point's single sample's fp32 squared distance (the op's fp32 path:
    the reference's ATen calls and blocks)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, k, generator=g).expand(B, -1).contiguous()
    sigma = torch.full((B, k), 0.7)
    if cancel:  # the cancelling input: z_0 = 1 exactly
        mu[:, 0], sigma[:, 0] = 1.0, 0.0
    h = mu[:1]
    for wt, b, a in zip(wts, bs, acts):
        h = torch.addmm(b, h, wt)
        h = h.relu() if a == RELU else h.sigmoid()
    h = h[:, :D]
    center = (h + 0.05 * torch.randn(1, D, generator=g)).expand(B, -1).contiguous()
    ka, kb = torch.arange(B, dtype=torch.long) + 11, torch.full((B,), 5, dtype=torch.long)
    d2 = torch.ops.robbench.mlp_sq_distances(mu, sigma, center, ka, kb, 1, 0, wts, bs, acts, 2048)[:, 0]
    return mu, sigma, center, ka, kb, d2.contiguous()


def _radii(d2: torch.Tensor) -> list[torch.Tensor]:
    radii = [d2, torch.nextafter(d2, torch.zeros(())), torch.nextafter(d2, torch.full((), 1e30))]
    return radii + [d2 * (1 + s * e) for e in (1e-5, 1e-3, 3e-2) for s in (1, -1)]


def _recomputed(err: str) -> int:
    """The fused layer's recheck rows (ROBBENCH_BAND_STATS's hidden-recomputed field), summed."""
    return sum(int(line.split()[12]) for line in err.splitlines() if line.startswith("robbench bf16 band:"))


CASES = [  # (k, hidden widths, D, points, cancelling last hidden layer)
    (1, [37], 20, 1, 0.0), (4, [37], 33, 2, 0.0), (10, [256], 50, 130, 0.0), (40, [23], 17, 65, 0.0),
    (3, [16, 29], 20, 70, 0.0), (5, [37], 20, 130, 2.0 ** 20), (5, [12, 37], 20, 66, 2.0 ** 20),
    (5, [37], 20, 130, 2.0 ** 12), (5, [37], 60, 130, 2.0 ** 14)]


@pytest.mark.parametrize("k,widths,D,B,cancel", CASES)
@pytest.mark.parametrize("screen", [False, True])
def test_mlp_count_decides_like_the_reference_one_ulp_either_side(k, widths, D, B, cancel, screen, monkeypatch,
                                                                  capfd):
    """One sample per point and r2 = its fp32 squared distance, one ulp either side and a few relative offsets:
    every count equals the reference's (d2 <= r2) with the fused hidden layer on and off. The cancelling layers
    make ATen's h and h' differ by far more than the band's other terms: without eps in the band (part 8) the
    band decides wrongly there. With the layer on, the recheck's rows get the reference's h (recomputed)."""
    _bf16_or_skip()
    wts, bs, acts = _layers(k, widths, D, seed=k * 7 + B, cancel=cancel)
    mu, sigma, center, ka, kb, d2 = _one_sample_per_point(B, k, D, wts, bs, acts, seed=B, cancel=cancel)
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    recomputed = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("ROBBENCH_FUSED_HIDDEN", fused)
        capfd.readouterr()
        for r2 in _radii(d2):
            counts, _ = torch.ops.robbench.mlp_count(mu, sigma, center, r2.contiguous(), ka, kb, 1, 0, wts, bs, acts,
                                                     1, screen, 2048)
            assert torch.equal(counts, (d2 <= r2).long()), (fused, (counts != (d2 <= r2).long()).sum().item())
        recomputed[fused] = _recomputed(capfd.readouterr().err)
    assert recomputed["0"] == 0 and recomputed["1"] >= B  # the tie at r2 = d2 at least goes to the recheck


@pytest.mark.parametrize("big", [2.0 ** 20, 2.0 ** 14])
@pytest.mark.parametrize("free", [2, 6])
def test_refinement_with_saturated_outputs_decides_like_the_reference(big, free, monkeypatch, capfd):
    """A cancelling last hidden layer (h' off ATen's h by ~0.3) under a last layer whose outputs are saturated
    (tiny weights, bias +-40) except `free` of them: the band leaves the samples to the refinement, which
    recomputes the free units from h' (bounds.h parts 4 and 8). Counts equal the reference's at every radius;
    without eps in the refinement's Δ'_j (part 8) hundreds of them differ."""
    _bf16_or_skip()
    k, K, D, B = 5, 37, 20, 130
    wts, bs, acts = _layers(k, [K], D, seed=3, cancel=big)
    g = torch.Generator().manual_seed(4)
    wts[-1][:, free:D] *= 1e-3
    bs[-1][free:D] = 40.0 * torch.sign(torch.randn(D - free, generator=g))
    mu, sigma, center, ka, kb, d2 = _one_sample_per_point(B, k, D, wts, bs, acts, seed=B, cancel=big)
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    capfd.readouterr()
    for r2 in _radii(d2) + [d2 * (1 + s * e) for e in (0.1, 0.3) for s in (1, -1)]:
        counts, _ = torch.ops.robbench.mlp_count(mu, sigma, center, r2.contiguous(), ka, kb, 1, 0, wts, bs, acts, 1,
                                                 False, 2048)
        assert torch.equal(counts, (d2 <= r2).long()), (counts != (d2 <= r2).long()).sum().item()
    assert band_stats(capfd.readouterr().err)[1] >= B  # the refinement ran


class _Decoder(nn.Module):
    def __init__(self, k: int, K: int, D: int):
        super().__init__()
        self.latent_dim, self.input_shape = k, (D,)
        self.decoder = nn.Sequential(nn.Linear(k, K), nn.ReLU(), nn.Linear(K, D), nn.Sigmoid())

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_counts_with_non_finite_or_huge_latents_equal_the_torch_reference(bad, monkeypatch):
    """Points whose mu holds NaN, inf or 1e20 (samples with non-finite or overflowing hidden vectors) beside
    ordinary points: count_within's counts equal the torch reference's, fused hidden layer on and off."""
    _bf16_or_skip()
    torch.manual_seed(0)
    model = _Decoder(6, 40, 30)
    B = 6
    mu = torch.randn(B, 6)
    mu[1, 2] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e20}[bad]
    mu[4, 0] = {"nan": float("nan"), "inf": -float("inf"), "huge": -3e19}[bad]
    sigma = torch.full((B, 6), 0.5)
    with torch.no_grad():
        center = model.decode(torch.randn(B, 6))
    r2 = torch.full((B,), 2.0)
    ref = TorchBackend().count_within(model, mu, sigma, center, r2, 200, seed=3, stream_ids=torch.arange(B)).counts
    for fused in ("1", "0"):
        monkeypatch.setenv("ROBBENCH_FUSED_HIDDEN", fused)
        res = kernels.count_within(model, mu, sigma, center, r2, 200, seed=3, stream_ids=torch.arange(B),
                                   precision="bf16")
        assert torch.equal(res.counts, ref), fused


@pytest.mark.skipif(PORTABLE, reason="already the portable run")
def test_portable_loop_passes_the_same_tests():
    """The tests above in a child process with ROBBENCH_NO_AVX512=1 (read once per process): the portable
    hidden_rows loop (and the portable bf16 rows) under the same checks."""
    env = dict(os.environ, ROBBENCH_NO_AVX512="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "not portable and not gemm_rows"], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _overflowing_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (3, 3), W1 (32, 3), b1 (32,): unit 0 sums b = -2^127 and the products 2^127, 2^127, -2^127. Summed from
    the bias on (hidden_rows' order) every partial sum is finite and h'_0 = 0; summed products first (MKL's order
    here) 2^127 + 2^127 overflows and ATen's h_0 = inf. ||x|| ||W1||_F + ||b1|| ~ 2^129: Higham's bound holds only
    without overflow, so eps must be +inf there (bounds.h part 8)."""
    x = torch.full((3, 3), 2.0 ** 60)
    w1 = torch.zeros(32, 3)
    w1[0] = torch.tensor([2.0 ** 67, 2.0 ** 67, -2.0 ** 67])
    w1[1] = 1.0
    b1 = torch.zeros(32)
    b1[0] = -2.0 ** 127
    return x, w1, b1


def test_hidden_rows_eps_is_infinite_where_a_sum_can_overflow():
    """eps bounds ||h_aten - h'|| also where ATen's order overflows and ours does not (inf <= inf); a layer just
    below the overflow threshold keeps a finite eps."""
    x, w1, b1 = _overflowing_layer()
    ref = torch.addmm(b1, x, w1.t()).relu()
    h, _, eps = torch.ops.robbench.hidden_rows(x, w1.t().contiguous(), b1, RELU)
    err = (ref.double() - h.double()).norm(dim=1)
    assert bool((err <= eps).all()), (err, eps)
    small = torch.ops.robbench.hidden_rows(x / 2.0 ** 4, w1.t().contiguous(), b1 / 2.0 ** 4, RELU)[2]
    assert bool(small.isfinite().all())


def test_counts_where_atens_hidden_layer_overflows_equal_the_reference(monkeypatch):
    """ATen's h_0 = inf (the reference's outputs are sigmoid(+inf) = 1: d2 = 8 > r2) while h'_0 = 0 (outputs
    sigmoid(-30) ~ 1e-13, well inside r2 = 0.5, and tiny last-layer weights keep every other band term small): with
    a finite eps the band counted every sample inside. Fused hidden layer on and off, screen on and off."""
    _bf16_or_skip()
    mu, w1, b1 = _overflowing_layer()
    D = 8
    w2 = torch.zeros(32, 32)
    w2[:D, 0] = 1e-37
    b2 = torch.zeros(32)
    b2[:D] = -30.0
    wts, bs, acts = [w1.t().contiguous(), w2.t().contiguous()], [b1, b2], [RELU, SIGMOID]
    B = mu.shape[0]
    sigma, center = torch.zeros(B, 3), torch.zeros(B, D)
    ka, kb = torch.arange(B, dtype=torch.long) + 11, torch.full((B,), 5, dtype=torch.long)
    y = torch.addmm(b2, torch.addmm(b1, mu, w1.t()).relu(), w2.t()).sigmoid()[:, :D]
    d2 = ((y - center) ** 2).sum(1)
    if bool(torch.addmm(b1, mu, w1.t()).isfinite().all()):
        pytest.skip("ATen's summation order does not overflow on this layer here")
    r2 = torch.full((B,), 0.5)
    for fused in ("1", "0"):
        monkeypatch.setenv("ROBBENCH_FUSED_HIDDEN", fused)
        for screen in (False, True):
            counts, _ = torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, 4, 0, wts, bs, acts, 1, screen,
                                                     2048)
            assert torch.equal(counts, 4 * (d2 <= r2).long()), (fused, screen, counts.tolist(), d2.tolist())


def test_screen_with_h_prime_closer_to_h_c_than_atens_h_decides_like_the_reference(monkeypatch):
    """The screen's eps term (bounds.h part 8: ||h - h_c|| <= ||h' - h_c|| + eps). The last hidden layer cancels
    2^20 (input 0 held at 1) and adds s = z_1 to every unit: ATen's order rounds s to the 1/16 grid (-2^20 + s
    first), ours keeps it. mu_1 and z_1 lie 2^-12 either side of the rounding boundary 1/32, so ATen's h - h_c is
    1/16 per unit and h' - h_c only ~1/32: ||h - h_c|| ~ 0.35, ||h' - h_c|| ~ 0.18. An identity last layer (W = I)
    and c = y(h_c) - 0.5 u (u along h - h_c) make the reference's distance 0.5 + 0.35 exactly the Lipschitz bound
    with ATen's h; with r = 0.77 a screen fed ||h' - h_c|| without eps decided all 4 samples inside (checked by
    mutation), the reference says outside. Counts equal the reference's with the screen on and off."""
    _bf16_or_skip()
    from robbench import rng
    k, K, B, big = 2, 32, 4, 2.0 ** 20
    w1 = torch.zeros(K, k)
    w1[:, 0], w1[:, 1] = -big, 1.0
    b1 = big + 1.0 + torch.arange(K) / 32.0
    w2, b2 = torch.eye(K), torch.zeros(K)
    wts, bs, acts = [w1.t().contiguous(), w2.t().contiguous()], [b1, b2], [RELU, NONE]
    ka, kb = torch.arange(B, dtype=torch.long) + 11, torch.full((B,), 5, dtype=torch.long)
    eta = rng.normals(ka, kb, torch.zeros(B, dtype=torch.long), k)[:, 1]
    mu = torch.stack([torch.ones(B), 1 / 32 - torch.sign(eta) * 2.0 ** -12], 1)
    sigma = torch.stack([torch.zeros(B), 2.0 ** -11 / eta.abs()], 1)
    z = mu + sigma * torch.stack([torch.zeros(B), eta], 1)
    h = torch.addmm(b1, z, w1.t()).relu()
    hc = torch.addmm(b1, mu, w1.t()).relu()
    hp = torch.ops.robbench.hidden_rows(z, w1.t().contiguous(), b1, RELU)[0]
    assert bool(((h - hc).norm(dim=1) > 1.5 * (hp - hc).norm(dim=1)).all())  # the construction holds
    u = (h - hc) / (h - hc).norm(dim=1, keepdim=True)
    center = (torch.addmm(b2, hc, w2.t()) - 0.5 * u).contiguous()
    d2 = torch.ops.robbench.mlp_sq_distances(mu, sigma, center, ka, kb, 1, 0, wts, bs, acts, 2048)[:, 0]
    assert torch.allclose(d2, ((torch.addmm(b2, h, w2.t()) - center) ** 2).sum(1), rtol=1e-6)
    r2 = torch.full((B,), 0.77 ** 2)
    assert not bool((d2 <= r2).any())
    for fused in ("1", "0"):
        monkeypatch.setenv("ROBBENCH_FUSED_HIDDEN", fused)
        for screen in (False, True):
            counts, _ = torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, 1, 0, wts, bs, acts, 1, screen,
                                                     2048)
            assert torch.equal(counts, (d2 <= r2).long()), (fused, screen, counts.tolist())
