"""Compiled ops against the pure-PyTorch reference: opcheck, bit-exact RNG and fp32 path, identical
decisions of the bf16 path (many seeds/shapes, points placed so many samples sit on the boundary)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench import decoding, kernels, montecarlo, rng
from robbench.backends import TorchBackend, sq_distance_blocks
from conftest import band_stats

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"


class MLPVAE(nn.Module):
    def __init__(self, k=6, hidden=(40, 48), d=70, final=nn.Sigmoid, seed=0, scale=1.0, bias=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.latent_dim, self.input_shape = k, (d,)
        sizes = [k, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(sizes[-1], d), final()]
        self.decoder = nn.Sequential(*layers)
        with torch.no_grad():  # sharper, partly saturated outputs (like a trained MNIST decoder)
            self.decoder[-2].weight.mul_(scale)
            self.decoder[-2].bias.add_(bias)

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


def _points(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, model.latent_dim, generator=g)
    sigma = 0.2 + 0.8 * torch.rand(B, model.latent_dim, generator=g)
    return mu, sigma, model.decode(mu).flatten(1).detach()


def _median_radius_case(model, B, n, *, points_seed, radius_seed, sample_seed):
    """B points (:func:`_points`), each one's median sample distance over 100 draws as r (p ~ 0.5, where
    the margin's tests spend their samples), and the torch reference's counts of n samples within r."""
    mu, sigma, center = _points(model, B, points_seed)
    r = montecarlo.sample_distances(model, mu, sigma, center, 100, seed=radius_seed).median(1).values
    ref = montecarlo.count_within(model, mu, sigma, center, r, n, seed=sample_seed, backend="torch")
    return mu, sigma, center, r, ref


def _mlp_args(model, mu, sigma, center, n, seed):
    plan = decoding.decoder_plan(model, center.shape[1])
    ka, kb = rng.stream_keys(seed, torch.arange(mu.shape[0]))
    return plan, ka, kb


@pytest.mark.parametrize("bad, message", [
    ({"mu": lambda t: t.double()}, "mu must be Float"),
    ({"sigma": lambda t: t[:, :2]}, "sigma must have mu's shape"),
    ({"center": lambda t: t.double()}, "center must be Float"),
    ({"ka": lambda t: t.int()}, "ka must be Long"),
    ({"r2": lambda t: t[:2]}, "r2 must be \\(B,\\)"),
    ({"w0": lambda t: t.double()}, "weights_t\\[0\\] must be Float"),
    ({"precision": lambda p: 3}, "precision must be 0 \\(fp32\\) or 1 \\(bf16\\)"),
    ({"chunk_rows": lambda c: 0}, "chunk_rows must be positive"),
])
def test_ops_name_the_bad_argument(bad, message):
    """csrc/common/checks.h: every tensor argument's dtype/shape is checked, and the error names it."""
    model = MLPVAE()
    mu, sigma, center = _points(model, 3, 0)
    plan, ka, kb = _mlp_args(model, mu, sigma, center, 10, 1)
    args = {"mu": mu, "sigma": sigma, "center": center, "r2": torch.full((3,), 0.3), "ka": ka, "kb": kb,
            "w0": plan.weights_t[0], "precision": 0, "chunk_rows": 64}
    (key, change), = bad.items()
    args[key] = change(args[key])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.robbench.mlp_count(args["mu"], args["sigma"], args["center"], args["r2"], args["ka"], args["kb"],
                                     10, 0, [args["w0"], *plan.weights_t[1:]], plan.biases, plan.acts,
                                     args["precision"], True, args["chunk_rows"])


def test_mlp_count_ids_makes_the_stream_keys_of_rng():
    """mlp_count_ids builds the keys from the ids itself (C++): the same counts and stats as mlp_count with
    rng.stream_keys' keys, for ids with any 64 bits (negative, beyond 2^32, extremes) and any seed; a key and
    ids of the wrong kind are refused by name."""
    model = MLPVAE()
    B, n = 7, 90
    mu, sigma, center = _points(model, B, 4)
    plan = decoding.decoder_plan(model, center.shape[1])
    r2 = torch.linspace(0.05, 2.0, B)
    ids = torch.tensor([0, 1, -1, 2 ** 32, 2 ** 32 - 1, -2 ** 63, 2 ** 63 - 1])
    for seed in (0, 5, 2 ** 40 + 17, 2 ** 64 - 1):
        for screen, precision in ((True, 1), (False, 0)):
            ka, kb = rng.stream_keys(seed, ids)
            want = torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, n, 3, plan.weights_t, plan.biases,
                                                plan.acts, precision, screen, 64)
            got = torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, ids, rng.seed_key(seed), n, 3,
                                                   plan.weights_t, plan.biases, plan.acts, precision, screen, 64)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, screen)
    args = (plan.weights_t, plan.biases, plan.acts, 1, True, 64)
    with pytest.raises(RuntimeError, match="stream_ids must be Long"):
        torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, ids.int(), 0, n, 0, *args)
    with pytest.raises(RuntimeError, match="stream_ids must be \\(B,\\)"):
        torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, ids[:3], 0, n, 0, *args)
    with pytest.raises(RuntimeError, match="32-bit key"):
        torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, ids, 2 ** 32, n, 0, *args)


def test_adaptive_screen_skips_a_screen_that_decides_nothing_and_probes_again():
    """screen="auto" (CppBackend's default): after kernels.SCREEN_MISSES calls whose screen decided < 1/8 of
    the samples, only every SCREEN_PROBE-th call runs it; a call whose screen decides enough switches it back
    on. The counts equal the reference's on every call, screened or not."""
    model = MLPVAE(scale=0.3)
    B, n = 3, 150
    mu, sigma, center = _points(model, B, 0)
    plan = decoding.decoder_plan(model, center.shape[1])
    d = montecarlo.sample_distances(model, mu, sigma, center, n, seed=2, backend="torch")
    lip = 0.25 * float(torch.linalg.matrix_norm(plan.weights[-1].double(), 2))
    far, near = 4.0 * float(d.max()) + lip * 100.0, float(d.min()) / 2

    def call(r):
        res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=2,
                                   stream_ids=torch.arange(B), precision="bf16", screen="auto")
        assert torch.equal(res.counts, (d <= r).sum(1))
        return res.screened

    assert [call(near) for _ in range(kernels.SCREEN_MISSES)] == [0] * kernels.SCREEN_MISSES
    # skipped: even a radius it would decide entirely gets no screen, until the probe
    assert [call(far) for _ in range(kernels.SCREEN_PROBE)] == [0] * (kernels.SCREEN_PROBE - 1) + [B * n]
    assert [call(far) for _ in range(3)] == [B * n] * 3  # the probe decided everything: on for every call
    assert plan.screen_misses == 0
    # screen=True still screens on every call
    res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(near, B, mu.device), n, seed=2,
                               stream_ids=torch.arange(B), precision="bf16", screen=True)
    assert res.screened == 0 and plan.screen_misses == 0


def test_normals_bit_exact_with_python():
    """3003 rows: the op's eight-row AVX-512 loop and its scalar tail (3003 = 8 * 375 + 3; the op splits
    rows into chunks of 256), odd and even k."""
    g = torch.Generator().manual_seed(0)
    ka, kb, j = (torch.randint(0, 2 ** 32, (3003,), generator=g) for _ in range(3))
    for k in (1, 2, 5, 10, 11):
        assert torch.equal(kernels.normals(ka, kb, j, k), rng.normals(ka, kb, j, k))


def test_opcheck_all_ops():
    model = MLPVAE()
    mu, sigma, center = _points(model, 3, 0)
    plan, ka, kb = _mlp_args(model, mu, sigma, center, 50, 1)
    r2 = torch.full((3,), 0.3)
    g = torch.Generator().manual_seed(1)
    cases = [
        (torch.ops.robbench.normals.default, (ka, kb, torch.arange(3), 5)),
        (torch.ops.robbench.mlp_sq_distances.default,
         (mu, sigma, center, ka, kb, 50, 7, plan.weights_t, plan.biases, plan.acts, 64)),
        (torch.ops.robbench.mlp_count.default,
         (mu, sigma, center, r2, ka, kb, 50, 7, plan.weights_t, plan.biases, plan.acts, 1, True, 64)),
        (torch.ops.robbench.mlp_count.default,
         (mu, sigma, center, r2, ka, kb, 50, 7, plan.weights_t, plan.biases, plan.acts, 0, False, 64)),
        (torch.ops.robbench.mlp_count_ids.default,
         (mu, sigma, center, r2, torch.arange(3), rng.seed_key(1), 50, 7, plan.weights_t, plan.biases, plan.acts, 1,
          True, 64)),
        (torch.ops.robbench.count_le.default, (torch.rand(3, 20, 70, generator=g), center, r2)),
        (torch.ops.robbench.sigmoid_fp32.default, (torch.randn(37, generator=g) * 20,)),
        (torch.ops.robbench.sigmoid_fp32.default, (torch.randn(5, 3, generator=g), True)),
        (torch.ops.robbench.bf16_rows.default,
         (torch.rand(9, 40, generator=g), torch.tensor([3, 0, 8, 3]), torch.randn(5, 40, generator=g))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("shape", [dict(k=6, hidden=(40, 48), d=70), dict(k=3, hidden=(33,), d=17),
                                   dict(k=10, hidden=(64, 64), d=100, final=nn.ReLU)])
def test_fp32_distances_bit_identical_to_torch(shape):
    model = MLPVAE(**shape)
    mu, sigma, center = _points(model, 5, 3)
    kw = dict(seed=9, sample_offset=13)
    ref = montecarlo.sample_distances(model, mu, sigma, center, 333, backend="torch", **kw)
    for chunk in (64, 500, None):
        got = montecarlo.sample_distances(model, mu, sigma, center, 333, backend="cpp", chunk_size=chunk, **kw)
        assert torch.equal(got, ref)


CASES = [(seed, shape) for seed in range(4) for shape in (
    dict(k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0),
    dict(k=4, hidden=(32,), d=64, scale=6.0, bias=-3.0),
    dict(k=8, hidden=(96, 64), d=50, final=nn.ReLU),
)]
MODES = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


@pytest.mark.parametrize("seed,shape", CASES)
@pytest.mark.parametrize("precision,screen", MODES)
def test_counts_equal_reference_with_boundary_radii(seed, shape, precision, screen):
    """Radii are quantiles of the reference's own distances, so samples sit exactly on the boundary."""
    model = MLPVAE(seed=seed, **shape)
    B, n = 6, 240
    mu, sigma, center = _points(model, B, 100 + seed)
    ref_d = montecarlo.sample_distances(model, mu, sigma, center, n, seed=seed, backend="torch")
    q = torch.tensor([0.01, 0.3, 0.5, 0.5, 0.7, 0.99])
    r = ref_d.sort(1).values[torch.arange(B), (q * (n - 1)).long()]  # an actual sample distance per point
    ref = montecarlo.count_within(model, mu, sigma, center, r, n, seed=seed, backend="torch")
    res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=seed,
                               stream_ids=torch.arange(B), precision=precision, screen=screen, chunk_size=128)
    assert torch.equal(res.counts, ref)
    assert (ref_d == r[:, None]).any(1).all()  # each radius is some sample's distance: boundary stress
    assert 0.0 <= res.recheck_fraction <= 1.0
    assert res.screened + res.bf16_samples <= res.total
    assert (res.screened == 0) or screen


def _sq_dists(model, mu, sigma, center, n, seed):
    """The torch reference's fp32 squared distances (B, n), and the compiled op's (must be identical)."""
    B = mu.shape[0]
    ref = torch.empty(B, n)
    for blk, d2 in sq_distance_blocks(model, mu, sigma, center, n, seed, torch.arange(B), 0, 2048):
        ref[blk.p0:blk.p1, blk.s0:blk.s1] = d2
    return ref, kernels.sample_sq_distances(model, mu, sigma, center, n, seed=seed, stream_ids=torch.arange(B))


@pytest.mark.parametrize("precision,screen", MODES)
@pytest.mark.parametrize("shape", [dict(k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0),
                                   dict(k=8, hidden=(96, 64), d=50, final=nn.ReLU)])
def test_squared_radius_one_ulp_either_side_of_a_sample(precision, screen, shape):
    """The most adversarial radii: r2 equal to a sample's fp32 squared distance (inside) and the next float
    below it (outside), for many samples at once; chunk sizes exercise row compaction below 64 rows."""
    model = MLPVAE(seed=3, **shape)
    B, n = 8, 300
    mu, sigma, center = _points(model, B, 7)
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 5)
    assert torch.equal(d2, d2_cpp)
    for rank in (1, n // 2, n - 2):
        exact = d2.sort(1).values[:, rank]
        for r2 in (exact, torch.nextafter(exact, torch.zeros(())), torch.nextafter(exact, torch.full((), 1e30))):
            want = (d2 <= r2[:, None]).sum(1)
            for chunk in (64, 1000):
                res = kernels.count_within(model, mu, sigma, center, r2.contiguous(), n, seed=5,
                                           stream_ids=torch.arange(B), precision=precision, screen=screen,
                                           chunk_size=chunk)
                assert torch.equal(res.counts, want), (rank, chunk)


@pytest.mark.parametrize("precision,screen", MODES)
def test_squares_that_underflow_do_not_fool_the_bounds(precision, screen):
    """Outputs y_d = b with b^2 just above half of the smallest subnormal: the reference's squares round up
    to 2^-149, so its fp32 sum is twice the exact ||y - c||^2. At r2 = 1.5 x the exact sum every sample is
    outside for the reference; a bound with only relative slack (bounds.h: the absolute term A) called the
    screen's samples inside."""
    model = MLPVAE(k=4, hidden=(32,), d=64, final=nn.Identity, seed=1)
    b = 2.0 ** -75 * (1 + 2.0 ** -22)
    with torch.no_grad():
        model.decoder[-2].weight.zero_()
        model.decoder[-2].bias.fill_(b)
    B, n = 2, 256
    mu, sigma, _ = _points(model, B, 3)
    center = torch.zeros(B, 64)
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 1)
    assert torch.equal(d2, d2_cpp)
    exact = 64 * b * b
    assert torch.all(d2 > 1.9 * exact)  # the reference's sum, rounded up
    r2 = torch.full((B,), 1.5 * exact, dtype=torch.float32)
    res = kernels.count_within(model, mu, sigma, center, r2, n, seed=1, stream_ids=torch.arange(B),
                               precision=precision, screen=screen)
    assert res.counts.tolist() == [0, 0]


@pytest.mark.parametrize("final", [nn.Identity, nn.ReLU])
def test_band_terms_whose_squares_underflow_still_count(final):
    """ReLU / identity (ev = 0): the bf16 band's per-unit term f_j = ρ_j (part 3) is ~u |s_j|; with outputs
    |s_j| ~ 2^-68 it is ~2^-76 and f_j^2 underflows to 0, so the fp32 sum Σ f_j^2 is 0 while ||f|| is
    sqrt(D) 2^-76. Here every output's bf16 rounding error is ~u |s_j| (x_j = 2^-68 (1 + 2^-8 - 2^-15) rounds
    down to 2^-68), all in the direction away from c = 0: the reference's distance is ~0.4 % above the
    band's ŷ's. A band sum without the absolute underflow term (bounds.h: A) called every sample inside."""
    model = MLPVAE(k=4, hidden=(32,), d=64, final=final, seed=1)
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.zero_()
        model.decoder[0].bias[:2] = 2.0 ** -58  # h = (2^-58, 2^-58, 0, ...) for every sample, bf16-exact
        model.decoder[-2].weight.zero_()
        model.decoder[-2].weight[:, 0] = 2.0 ** -10
        model.decoder[-2].weight[:, 1] = 2.0 ** -10 * (2.0 ** -8 - 2.0 ** -15)  # bf16-exact
        model.decoder[-2].bias.zero_()
    B, n = 2, 256
    mu, sigma, _ = _points(model, B, 3)
    center = torch.zeros(B, 64)
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 1)
    assert torch.equal(d2, d2_cpp)
    yhat2 = 64 * 2.0 ** -136  # ||ŷ - c||^2 of the bf16 outputs
    assert torch.all(d2 > 1.007 * yhat2)
    r2 = torch.full((B,), 1.004 * yhat2, dtype=torch.float32)
    for precision, screen in MODES:
        res = kernels.count_within(model, mu, sigma, center, r2, n, seed=1, stream_ids=torch.arange(B),
                                   precision=precision, screen=screen)
        assert res.counts.tolist() == [0, 0], (precision, screen)


@pytest.mark.parametrize("final", [nn.Identity, nn.ReLU])
@pytest.mark.parametrize("brgemm", ["1", "0"])
@pytest.mark.parametrize("band_fused", ["1", "0"])
def test_bf16_output_rounding_stays_in_the_band(final, brgemm, band_fused, monkeypatch):
    """bounds.h part 6: the band's coefficient of |s_j| carries the product's output rounding (s_round: u for
    at::mm's bf16 output, ROBBENCH_BRGEMM=0; 0 for brgemm's fp32 output). Here h = (1, 1, 0, ...), W_j =
    (1, 2^-8 - 2^-15, 0, ...) (bf16-exact): s_j = 1 + 2^-8 - 2^-15 exactly, which at::mm's bf16 output rounds
    down to 1 (-0.39 %) for every one of the D = 70 units (four 16-lane blocks and a scalar tail of 6). At
    r2 = D (1 + 1.95 2^-8) the reference (||y||^2 = D (1 + 1.988 2^-8)) is outside; a band without the u |s_j|
    term on bf16 output says inside (without it on the 6 tail units alone: U^2 ~ D (1 + 1.91 2^-8), inside
    too). brgemm's fp32 output is exact here, and the band decides it. Both epilogues (ROBBENCH_BAND_FUSED)."""
    monkeypatch.setenv("ROBBENCH_BRGEMM", brgemm)
    monkeypatch.setenv("ROBBENCH_BAND_FUSED", band_fused)
    D = 70
    model = MLPVAE(k=4, hidden=(32,), d=D, final=final, seed=1)
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.zero_()
        model.decoder[0].bias[:2] = 1.0
        model.decoder[-2].weight.zero_()
        model.decoder[-2].weight[:, 0] = 1.0
        model.decoder[-2].weight[:, 1] = 2.0 ** -8 - 2.0 ** -15
        model.decoder[-2].bias.zero_()
    B, n = 2, 128
    mu, sigma, _ = _points(model, B, 3)
    center = torch.zeros(B, D)
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 1)
    assert torch.equal(d2, d2_cpp) and torch.all(d2 > D * (1 + 1.98 * 2.0 ** -8))
    r2 = torch.full((B,), D * (1 + 1.95 * 2.0 ** -8), dtype=torch.float32)
    for precision, screen in MODES:
        res = kernels.count_within(model, mu, sigma, center, r2, n, seed=1, stream_ids=torch.arange(B),
                                   precision=precision, screen=screen)
        assert res.counts.tolist() == [0, 0], (precision, screen)
        if precision == "bf16":
            assert res.bf16_samples == B * n  # the band saw every sample (the screen decides none here)
            assert res.rechecked == (B * n if brgemm == "0" else 0)  # bf16 output: within u of r, undecided


def test_bf16_output_rounding_stays_in_the_portable_band():
    """The test above with the portable loops (ROBBENCH_NO_AVX512=1, read once per process: a subprocess)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ROBBENCH_NO_AVX512="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                           "test_bf16_output_rounding_stays_in_the_band"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "8 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_reduced_precision_fp32_matmul_decodes_with_the_reference_calls():
    """With torch's fp32 products allowed in bf16 (set_float32_matmul_precision("medium")), the fused op's
    bounds (an fp32 GEMM model of the reference) do not hold: the compiled count decodes with the reference's
    own calls (no screen, no bf16 pass) and still matches it at radii one ulp around sample distances."""
    model = MLPVAE(seed=3, k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0)
    B, n = 4, 200
    mu, sigma, center = _points(model, B, 7)
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert not kernels.fp32_matmul_is_ieee()
        d2, _ = _sq_dists(model, mu, sigma, center, n, 5)
        for r2 in (d2.sort(1).values[:, n // 2], torch.nextafter(d2.sort(1).values[:, n // 2], torch.zeros(()))):
            res = kernels.count_within(model, mu, sigma, center, r2.contiguous(), n, seed=5,
                                       stream_ids=torch.arange(B), precision="bf16", screen=True)
            assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1))
            assert (res.screened, res.bf16_samples, res.precision) == (0, 0, "fp32")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert kernels.fp32_matmul_is_ieee()


def test_flushed_subnormals_run_the_reference_itself():
    """After torch.set_flush_denormal(True) the calling thread flushes subnormals (the bounds' underflow terms
    no longer hold, and the reference's results depend on the thread): the compiled count and distances are
    the torch reference's own (no screen, no bf16 pass, identical numbers); IEEE again once it is reset."""
    model = MLPVAE(seed=3, k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0)
    B, n = 4, 200
    mu, sigma, center = _points(model, B, 7)
    assert kernels.denormals_are_ieee()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert not kernels.denormals_are_ieee()
        ref = TorchBackend()
        d2 = ref.sq_distances(model, mu, sigma, center, n, seed=5, stream_ids=torch.arange(B))
        assert torch.equal(kernels.sample_sq_distances(model, mu, sigma, center, n, seed=5,
                                                       stream_ids=torch.arange(B)), d2)
        r2 = d2.sort(1).values[:, n // 2].contiguous()
        res = kernels.count_within(model, mu, sigma, center, r2, n, seed=5, stream_ids=torch.arange(B),
                                   precision="bf16", screen=True)
        assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1))
        assert (res.screened, res.bf16_samples, res.precision) == (0, 0, "fp32")
    finally:
        torch.set_flush_denormal(False)
    assert kernels.denormals_are_ieee()


def _f32_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


# bounds.h, part 5: the own sigmoid of the bf16 band's fused pass is within 6 v = 6 * 2^-24 of sigma.
SIGMOID_BOUND_V = 6.0


def test_own_sigmoid_error_is_within_its_proven_bound_for_every_float_that_matters():
    """Every fp32 x with 2^-26 <= |x| <= 64 (5.4e8 floats: the whole unclamped range and beyond the clamp at
    32) and every 61st float of the rest (tiny, huge, infinite), both signs, against float64 sigma: the
    error stays within the bound derived in bounds.h (part 5), which is inside the band's ev = 16 v. The
    code the band runs here (AVX-512 where the CPU has it) and the portable code (strided) are checked."""
    scan = torch.ops.robbench.sigmoid_error_scan
    inf = _f32_bits(float("inf"))
    dense = scan(_f32_bits(2.0 ** -26), _f32_bits(64.0), 1)
    rest = scan(0, inf, 61)
    portable = scan(_f32_bits(2.0 ** -26), _f32_bits(64.0), 13, True)
    for err, x in (dense, rest, portable):
        assert err <= SIGMOID_BOUND_V, (err, x)
    assert dense[0] > 0.5  # it compares real values: the fp32 result's own rounding is up to 0.5 v


def test_own_sigmoid_special_values_and_portable_code_agree():
    """NaN stays NaN, +-inf and huge |x| give 1 / 0 within the bound, +-0 give 1/2; the portable code (what a
    CPU without AVX-512 runs; a true divide where the vectorised code has rcp14 and a Newton step) agrees
    with the vectorised code within an ulp of 1 on random and special floats, both within the bound."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4099, generator=g) * torch.logspace(-30, 2, 4099),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 32.0, -32.0, 88.8, -88.8, 3e38, -3e38,
                                 float("inf"), float("-inf"), float("nan")])])
    y, yp = torch.ops.robbench.sigmoid_fp32(x), torch.ops.robbench.sigmoid_fp32(x, True)
    assert (y[:-1] - yp[:-1]).abs().max().item() <= 2.0 ** -23
    for out in (y, yp):
        assert torch.isnan(out[-1]) and out[-3] == 1 and out[-2] == 0 and out[-13] == out[-12] == 0.5
        err = (out[:-1].double() - torch.sigmoid(x[:-1].double())).abs().max().item()
        assert err <= SIGMOID_BOUND_V * 2.0 ** -24


@pytest.mark.parametrize("fused", ["0", "1"])
def test_fused_epilogue_and_the_reference_epilogue_decide_alike_at_one_ulp(fused, monkeypatch):
    """The fp32 last layer's fused distance pass (double sum, rigorous band, reference epilogue for the
    rows inside it) and the unfused reference epilogue (ROBBENCH_FUSED_EPILOGUE=0) at radii where every
    decision is a tie or one ulp from it: both must give the reference's counts."""
    monkeypatch.setenv("ROBBENCH_FUSED_EPILOGUE", fused)
    model = MLPVAE(seed=4, k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0)
    B, n = 6, 200
    mu, sigma, center = _points(model, B, 11)
    d2, _ = _sq_dists(model, mu, sigma, center, n, 2)
    for rank in (0, n // 2, n - 1):
        exact = d2.sort(1).values[:, rank]
        for r2 in (exact, torch.nextafter(exact, torch.zeros(())), torch.nextafter(exact, torch.full((), 1e30))):
            res = kernels.count_within(model, mu, sigma, center, r2.contiguous(), n, seed=2,
                                       stream_ids=torch.arange(B), precision="fp32", screen=False)
            assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1)), rank


def test_bf16_band_decides_far_samples_without_recheck():
    """Radii far outside / inside every sample: the element-wise band decides everything in bf16."""
    model = MLPVAE(scale=3.0, bias=-2.0)
    mu, sigma, center = _points(model, 4, 0)
    d = montecarlo.sample_distances(model, mu, sigma, center, 200, seed=0, backend="torch")
    for r, expect in ((float(d.max()) * 1.5, 200), (float(d.min()) * 0.5, 0)):
        res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, 4, mu.device), 200, seed=0,
                                   stream_ids=torch.arange(4), precision="bf16", screen=False)
        assert res.counts.tolist() == [expect] * 4
        assert res.bf16_samples == 800 and res.rechecked == 0 and res.screened == 0


def test_bf16_band_width_is_within_a_small_factor_of_the_observed_error():
    """The band is rigorous but must be useful: on a 3-layer decoder with D = 200, a radius 30% below
    every sample's distance is decided for every sample without a recheck."""
    model = MLPVAE(k=10, hidden=(128, 128), d=200, scale=2.0, bias=-1.0, seed=1)
    mu, sigma, center = _points(model, 4, 2)
    d = montecarlo.sample_distances(model, mu, sigma, center, 256, seed=1, backend="torch")
    r = d.min(1).values * 0.7
    res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, 4, mu.device), 256, seed=1,
                               stream_ids=torch.arange(4), precision="bf16", screen=False)
    assert res.counts.tolist() == [0] * 4 and res.rechecked == 0


def test_screen_decides_radii_beyond_the_lipschitz_bound():
    """A radius far beyond every sample: all samples are screened (no last-layer work), counts are all n."""
    model = MLPVAE(scale=0.3)
    mu, sigma, center = _points(model, 3, 0)
    plan = decoding.decoder_plan(model, center.shape[1])
    lip = 0.25 * float(torch.linalg.matrix_norm(plan.weights[-1].double(), 2))
    d = montecarlo.sample_distances(model, mu, sigma, center, 150, seed=2, backend="torch")
    r = 4.0 * float(d.max()) + lip * 100.0
    res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, 3, mu.device), 150, seed=2,
                               stream_ids=torch.arange(3), precision="fp32", screen=True)
    assert res.counts.tolist() == [150] * 3 and res.screened == 450 and res.bf16_samples == 0
    # a radius inside every sample: the screen (an upper bound) decides nothing, the last layer runs
    res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(float(d.min()) / 2, 3, mu.device),
                               150, seed=2, stream_ids=torch.arange(3), precision="fp32", screen=True)
    assert res.counts.tolist() == [0] * 3 and res.screened == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_screen_at_its_edge_decides_like_the_reference(precision):
    """Centers 0.1 away from the decoded means (so that off_b = ||g(mu_b) - c_b|| dominates the screen's bound)
    and radii at quantiles of each point's sample distances: the screen decides samples inside while others
    lie just outside r; every count equals the torch reference's (with off_b halved, the counts at the 0.5
    and 0.9 quantiles come out too large)."""
    model = MLPVAE(scale=0.3)
    B, n = 4, 300
    mu, sigma, center = _points(model, B, 5)
    shift = torch.randn(center.shape, generator=torch.Generator().manual_seed(6))
    center = (center + 0.1 * shift / shift.norm(dim=1, keepdim=True)).contiguous()
    d2 = _sq_dists(model, mu, sigma, center, n, 3)[0]
    screened = 0
    for q in (0.5, 0.9, 0.99, 1.0):
        r2 = torch.quantile(d2.double(), q, dim=1).float().contiguous()
        res = kernels.count_within(model, mu, sigma, center, r2, n, seed=3, stream_ids=torch.arange(B),
                                   precision=precision, screen=True)
        assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1)), q
        screened += res.screened
    assert screened > 0


def test_gemm_rows_do_not_depend_on_the_other_rows():
    """The recheck and the compacted fp32 last layer rely on MKL giving a row the same fp32 values whatever
    the other rows of a GEMM with >= 64 rows are (checked against the full-block product)."""
    g = torch.Generator().manual_seed(0)
    for K, N in ((512, 800), (48, 96), (33, 32)):
        w, b, h = torch.randn(K, N, generator=g), torch.randn(N, generator=g), torch.rand(2048, K, generator=g)
        full = torch.addmm(b, h, w)
        for q in (1, 5, 63, 64, 100, 1000, 2047):
            idx = torch.randperm(2048, generator=g)[:q]
            hq = torch.cat([h[idx], h.new_zeros(max(0, 64 - q), K)])
            assert torch.equal(torch.addmm(b, hq, w)[:q], full[idx]), (K, N, q)


def test_generic_epilogue_counts():
    g = torch.Generator().manual_seed(0)
    y, center = torch.rand(3, 50, 30, generator=g), torch.rand(3, 30, generator=g)
    d2 = (y - center[:, None]).pow(2).sum(2)
    s = d2.sort(1).values
    r2 = (s[:, 20] + s[:, 21]) / 2  # between two samples: no rounding can flip a decision
    assert torch.ops.robbench.count_le(y, center, r2).tolist() == [21, 21, 21]


@pytest.mark.parametrize("D", [30, 784])
def test_generic_epilogue_matches_reference_at_ties(D):
    """count_le decides each sample as the reference's fp32 sub/mul/sum does, also at r^2 equal to the
    sample's own squared distance, one ulp either side and 1e-6 away (where summation order matters)."""
    g = torch.Generator().manual_seed(D)
    y, center = torch.rand(4, 64, D, generator=g), torch.rand(4, D, generator=g)
    d2 = (y - center[:, None]).mul_(y - center[:, None]).sum(2)  # the reference's expression
    for k in range(0, 64, 7):
        own = d2[:, k].clone()
        for r2 in (own, torch.nextafter(own, torch.zeros_like(own)), torch.nextafter(own, own + 1),
                   own * (1 - 1e-6), own * (1 + 1e-6)):
            want = (d2 <= r2[:, None]).sum(1)
            assert torch.equal(torch.ops.robbench.count_le(y, center, r2), want), (D, k)


def test_generic_decoder_through_cpp_backend():
    class Generic(MLPVAE):
        def __init__(self):
            super().__init__()
            self.net = self.decoder
            del self.decoder

        def decode(self, z):
            return self.net(z).view(-1, *self.input_shape)

    model = Generic()
    mu, sigma, center = _points(model, 3, 1)
    d = montecarlo.sample_distances(model, mu, sigma, center, 100, seed=4, backend="torch")
    s = d.sort(1).values
    r = (s[:, 49] + s[:, 50]) / 2
    assert montecarlo.count_within(model, mu, sigma, center, r, 100, seed=4, backend="cpp").tolist() == [50] * 3


def test_auto_backend_and_fallback(monkeypatch):
    assert "cpp" in montecarlo.available_backends()
    assert montecarlo.resolve_backend("auto", torch.device("cpu")) == "cpp"
    monkeypatch.setitem(kernels._STATE, "loaded", False)
    monkeypatch.setitem(kernels._STATE, "error", "RuntimeError: no C++ compiler/ninja found")
    monkeypatch.setitem(kernels._STATE, "warned", False)
    assert montecarlo.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="unavailable"):
        montecarlo.resolve_backend("cpp", torch.device("cpu"))


def test_bench_rows_report_screen_and_executed_work():
    """robbench bench's row for a radius beyond every sample: all screened, executed < effective FLOPs."""
    from robbench import bench

    model = MLPVAE()
    row = bench.run_case(model, "tiny", "cpp", "fp32", 4, 64, 100.0, screen=True)
    assert row.screen and row.screened_fraction == 1.0 and row.recheck_fraction is None
    flops = bench.decoder_flops(model, 70)
    assert row.gflop == pytest.approx(flops * 4 * 64 / 1e9)
    assert row.executed_gflops == pytest.approx((flops - bench.last_layer_flops(model)) * 4 * 64 / 1e9 / row.seconds)
    off = bench.run_case(model, "tiny", "cpp", "bf16", 4, 64, 100.0, screen=False)
    assert not off.screen and off.screened_fraction == 0.0 and off.recheck_fraction == 0.0


class _SeqVAE(nn.Module):
    def __init__(self, decoder: nn.Sequential, k: int, d: int):
        super().__init__()
        self.decoder, self.latent_dim, self.input_shape = decoder, k, (d,)

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


@pytest.mark.parametrize("layers", ["linear-sigmoid", "identity-out", "relu-out"])
def test_counts_equal_reference_for_other_mlp_shapes(layers):
    """No hidden layer (the last layer's input is z itself), an identity output, a ReLU output."""
    torch.manual_seed(0)
    k, d = {"linear-sigmoid": (5, 40), "identity-out": (4, 20), "relu-out": (3, 30)}[layers]
    dec = {"linear-sigmoid": lambda: nn.Sequential(nn.Linear(k, d), nn.Sigmoid()),
           "identity-out": lambda: nn.Sequential(nn.Linear(k, 33), nn.ReLU(), nn.Linear(33, d)),
           "relu-out": lambda: nn.Sequential(nn.Linear(k, 64), nn.ReLU(), nn.Linear(64, d), nn.ReLU())}[layers]()
    model = _SeqVAE(dec, k, d)
    B, n = 5, 300
    mu, sigma, center = _points(model, B, 11)
    dist = montecarlo.sample_distances(model, mu, sigma, center, n, seed=3)
    for q in (0.0, 0.5, 1.0):
        r = dist.quantile(q, dim=1)
        ref = montecarlo.count_within(model, mu, sigma, center, r, n, seed=3, backend="torch")
        for precision, screen in MODES:
            res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=3,
                                       stream_ids=torch.arange(B), precision=precision, screen=screen, chunk_size=100)
            assert torch.equal(res.counts, ref), (q, precision, screen)


# ---------------------------------------------------------------------------------------------
# Early exit of the fp32 last layer (csrc/common/early_exit.h)
# ---------------------------------------------------------------------------------------------
def _exit_stats(text: str) -> tuple[int, int, int, int]:
    """(rows, columns computed, columns of a full last layer, rechecked) summed over the op's stats lines."""
    tot = [0, 0, 0, 0]
    for line in text.splitlines():
        if line.startswith("robbench early exit:"):
            f = line.split()
            for i, v in enumerate((f[4], f[6], f[8], f[10])):
                tot[i] += int(v)
    return tuple(tot)


def _mnist_like(seed=0):
    """The trained decoders' shape (k = 10, one hidden layer of 256, D = 784) with sharp, partly saturated
    outputs, as a trained MNIST decoder has."""
    return MLPVAE(seed=seed, k=10, hidden=(256,), d=784, scale=4.0, bias=-3.0)


@pytest.mark.parametrize("mode", ["force", "1"])
def test_early_exit_decides_each_sample_like_the_reference_near_the_median(mode, monkeypatch, capfd):
    """Sample by sample: every point is one sample (B copies of one latent with distinct streams), with r2
    at that sample's own fp32 squared distance scaled by 1 +- eps, eps from 0 (every decision a tie: all
    must reach the reference) through the width of the early exit's band (~1e-3 relative here) to far
    outside it; and a common radius at the median distance (p ~ 0.5, where margin tests spend samples)."""
    monkeypatch.setenv("ROBBENCH_EARLY_EXIT", mode)
    monkeypatch.setenv("ROBBENCH_EXIT_STATS", "1")
    model = _mnist_like()
    B = 128
    mu0, sigma0, center0 = _points(model, 1, 5)
    mu, sigma, center = mu0.expand(B, -1).contiguous(), sigma0.expand(B, -1).contiguous(), \
        center0.expand(B, -1).contiguous()
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, 1, 4)  # (B, 1): one sample per point
    assert torch.equal(d2, d2_cpp)
    d2 = d2[:, 0]
    radii = [d2.median().expand(B).contiguous()]
    for eps in (0.0, 1e-6, 1e-4, 1e-3, 3e-3, 1e-2, 0.1, 0.6):
        for sign in (1, -1):
            radii.append((d2 * (1 + sign * eps)).contiguous())
    radii.append(torch.nextafter(d2, torch.zeros(())).contiguous())
    capfd.readouterr()
    for r2 in radii:
        res = kernels.count_within(model, mu, sigma, center, r2, 1, seed=4, stream_ids=torch.arange(B),
                                   precision="fp32", screen=False)
        assert torch.equal(res.counts, (d2 <= r2).long())  # each point's count is one sample's decision
    rows, cols, full, rechecked = _exit_stats(capfd.readouterr().err)
    if mode == "force":
        assert rows == B * len(radii) and full == rows * 784
        assert cols < 0.95 * full  # the exit decided samples before their last column
        assert B <= rechecked < rows  # the ties all went to the reference; far radii did not


def test_early_exit_counts_equal_reference_at_the_median_radius_with_screen_and_blocks(monkeypatch, capfd):
    """Many samples per point at the median radius, with and without the Lipschitz screen, block sizes that
    put one or several points in a block: counts equal the torch reference's; the exit did decide."""
    monkeypatch.setenv("ROBBENCH_EARLY_EXIT", "force")
    monkeypatch.setenv("ROBBENCH_EXIT_STATS", "1")
    model = _mnist_like(seed=1)
    B, n = 5, 400
    mu, sigma, center, r, ref = _median_radius_case(model, B, n, points_seed=2, radius_seed=9, sample_seed=3)
    capfd.readouterr()
    for screen in (False, True):
        for chunk in (128, 2048):
            res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=3,
                                       stream_ids=torch.arange(B), precision="fp32", screen=screen,
                                       chunk_size=chunk)
            assert torch.equal(res.counts, ref), (screen, chunk)
    rows, cols, full, _ = _exit_stats(capfd.readouterr().err)
    assert rows > 0 and cols < 0.9 * full


def test_early_exit_column_widths_and_off_switch_agree(monkeypatch):
    """Other column-block schedules (ROBBENCH_EXIT_COLUMNS) and the exit switched off give the same counts."""
    model = _mnist_like(seed=2)
    B, n = 4, 300
    mu, sigma, center, r, ref = _median_radius_case(model, B, n, points_seed=3, radius_seed=1, sample_seed=6)
    for mode, widths in (("0", "64"), ("force", "8"), ("force", "100,300"), ("force", "784"), ("1", "junk")):
        monkeypatch.setenv("ROBBENCH_EARLY_EXIT", mode)
        monkeypatch.setenv("ROBBENCH_EXIT_COLUMNS", widths)
        res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=6,
                                   stream_ids=torch.arange(B), precision="fp32", screen=False)
        assert torch.equal(res.counts, ref), (mode, widths)


# ---------------------------------------------------------------------------------------------
# bf16 last layer with the spectral / projected band (csrc/common/bounds.h, part 3)
# ---------------------------------------------------------------------------------------------
def _trained_like(seed=0):
    """The trained decoders' shape (k = 10, 256 hidden, D = 784) with what makes their bf16 band tight or
    loose: a last layer with decaying singular values (12 .. 0.6, Frobenius norm ~26, as measured on the
    trained beta-VAEs) and ~80 % saturated output units."""
    m = MLPVAE(seed=seed, k=10, hidden=(256,), d=784)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q1, _ = torch.linalg.qr(torch.randn(784, 256, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
        m.decoder[-2].weight.copy_(q1 @ torch.diag(12.0 * (torch.arange(256) + 1.0) ** -0.55) @ q2.T)
        bias = torch.full((784,), -6.0)
        bias[torch.randperm(784, generator=g)[:160]] = 0.5
        m.decoder[-2].bias.copy_(bias)
        m.decoder[0].weight.mul_(2.0)
    return m


def _adversarial_rounding(seed=0):
    """_trained_like with its last layer moved to the worst bf16 rounding: every nonzero weight 0.49 of the
    gap toward zero above its bf16 value, so δW = W - bf16(W) > 0 everywhere and, with h >= 0 (ReLU), the
    bf16 product's error δW h adds up (near the Cauchy-Schwarz bound that the band assumes)."""
    m = _trained_like(seed)
    with torch.no_grad():
        w = m.decoder[-2].weight
        wb = w.bfloat16()
        a = wb.abs()
        gap = a.float() - torch.nextafter(a, torch.zeros((), dtype=torch.bfloat16)).float()
        w.copy_(wb.float() + 0.49 * gap)
        assert torch.equal(w.bfloat16(), wb)
    return m


def _audit(err):
    """(rows, violations, max ||y_ref - y|| / E) of the ROBBENCH_REFINE_AUDIT lines."""
    rows = bad = 0
    worst = 0.0
    for line in err.splitlines():
        if line.startswith("robbench refine audit:"):
            f = line.split()
            rows, bad, worst = rows + int(f[4]), bad + int(f[6]), max(worst, float(f[8]))
    return rows, bad, worst


@pytest.mark.parametrize("band_fused,brgemm,tiles", [("1", "1", "1"), ("1", "1", "store_y"), ("1", "1", "0"),
                                                     ("0", "1", "1"), ("1", "0", "1")])
def test_bf16_band_decides_each_sample_like_the_reference_across_its_edges(band_fused, brgemm, tiles, monkeypatch,
                                                                           capfd):
    """Sample by sample on the trained decoders' shape: one sample per point, r2 at that sample's own fp32
    squared distance x (1 +- eps) for a dense geometric sweep of eps (1e-7 .. 0.56, 4 per decade), so that
    samples fall just inside and just outside the edges of the band and of its refinement (bounds.h
    part 4; each radius runs with the refinement off and on), exact ties and one ulp either side. Every
    decision equals the reference's; the sweep crosses both edges (some radius leaves part of the band's
    samples undecided; some radius has the refinement decide part of those and leave part); ties and one
    ulp either side all went to the fp32 recheck; far radii none. Both epilogues: the fused pass with the own
    sigmoid (bounds.h part 5, the default) and the separate ATen passes (ROBBENCH_BAND_FUSED=0); both
    products: brgemm's fp32 output (bounds.h part 6, the default) and at::mm's bf16 output
    (ROBBENCH_BRGEMM=0). With brgemm and the fused epilogue, the band inside the product's tiles (bounds.h
    part 7, the default; the refinement's rows get ŷ recomputed, or stored with ROBBENCH_TILE_STORE_Y=1) and
    the whole product first (ROBBENCH_BAND_TILES=0)."""
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    monkeypatch.setenv("ROBBENCH_BAND_FUSED", band_fused)
    monkeypatch.setenv("ROBBENCH_BAND_TILES", "0" if tiles == "0" else "1")
    monkeypatch.setenv("ROBBENCH_TILE_STORE_Y", "1" if tiles == "store_y" else "0")
    monkeypatch.setenv("ROBBENCH_BRGEMM", brgemm)
    model = _trained_like(seed=3)
    B = 96
    mu0, sigma0, center0 = _points(model, 1, 7)
    mu, sigma, center = mu0.expand(B, -1).contiguous(), sigma0.expand(B, -1).contiguous(), \
        center0.expand(B, -1).contiguous()
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, 1, 11)
    assert torch.equal(d2, d2_cpp)
    d2 = d2[:, 0]

    def run(r2, refine):
        monkeypatch.setenv("ROBBENCH_BAND_REFINE", "1" if refine else "0")
        capfd.readouterr()
        res = kernels.count_within(model, mu, sigma, center, r2, 1, seed=11, stream_ids=torch.arange(B),
                                   precision="bf16", screen=False)
        rows, refined, rechecked, _ = band_stats(capfd.readouterr().err)
        assert torch.equal(res.counts, (d2 <= r2).long())
        assert res.bf16_samples == B == rows and res.rechecked == rechecked
        return refined, rechecked

    partial_band = partial_refine = 0
    total_off = total_on = 0
    for eps in [0.0] + [10 ** (e / 4) for e in range(-28, 0)]:
        for sign in ((1,) if eps == 0 else (1, -1)):
            r2 = (d2 * (1 + sign * eps)).contiguous()
            _, off = run(r2, False)
            refined, on = run(r2, True)
            assert on <= off and refined <= off
            if eps == 0:
                assert off == on == B  # a tie is never decided by a band of positive width
            if eps >= 0.5:
                assert off == 0
            partial_band += 0 < off < B
            partial_refine += 0 < on < off
            total_off += off
            total_on += on
    assert partial_band >= 2 and partial_refine >= 2  # the sweep crossed both edges
    assert total_on < total_off
    for toward in (0.0, float("inf")):  # one ulp below and above each sample's d2: the fp32 recheck decides
        r2 = torch.nextafter(d2, torch.full((), toward)).contiguous()
        for refine in (False, True):
            assert run(r2, refine)[1] == B


_PORTABLE_SCRIPT = """
import sys, torch
from torch import nn
from robbench import kernels
case = torch.load(sys.argv[1], weights_only=False)
class M(nn.Module):
    def __init__(self, decoder, k, d):
        super().__init__()
        self.decoder, self.latent_dim, self.input_shape = decoder, k, (d,)
    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)
mu, sigma, center = case["mu"], case["sigma"], case["center"]
model = M(case["decoder"], mu.shape[1], center.shape[1])
B = mu.shape[0]
counts = [kernels.count_within(model, mu, sigma, center, r2, 1, seed=11, stream_ids=torch.arange(B),
                               precision="bf16", screen=False).counts for r2 in case["radii"]]
torch.save(counts, sys.argv[2])
"""


def test_portable_band_and_refinement_loops_decide_like_the_reference(tmp_path):
    """The band's and the refinement's portable loops (what a CPU without AVX-512 runs; ROBBENCH_NO_AVX512=1
    in a subprocess) give the reference's decision for every sample at radii across the band's and the
    refinement's edges, at exact ties and one ulp either side; the refinement did decide samples there."""
    import os
    import subprocess
    import sys

    model = _trained_like(seed=3)
    B = 64
    mu0, sigma0, center0 = _points(model, 1, 7)
    mu, sigma, center = mu0.expand(B, -1).contiguous(), sigma0.expand(B, -1).contiguous(), \
        center0.expand(B, -1).contiguous()
    d2 = _sq_dists(model, mu, sigma, center, 1, 11)[0][:, 0]
    radii = [torch.nextafter(d2, torch.zeros(())).contiguous(), torch.nextafter(d2, torch.full((), float("inf")))]
    for eps in (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1):
        radii += [(d2 * (1 + eps)).contiguous(), (d2 * (1 - eps)).contiguous()]
    torch.save({"decoder": model.decoder, "mu": mu, "sigma": sigma, "center": center, "radii": radii},
               tmp_path / "case.pt")
    env = dict(os.environ, ROBBENCH_NO_AVX512="1", ROBBENCH_BAND_STATS="1", ROBBENCH_REFINE_AUDIT="1")
    done = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(tmp_path / "case.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = torch.load(tmp_path / "out.pt")
    for r2, c in zip(radii, counts):
        assert torch.equal(c, (d2 <= r2).long())
    rows, refined, rechecked, _ = band_stats(done.stderr)
    assert rows == B * len(radii) and refined > 0 and 3 * B <= rechecked < rows  # ties, one ulp: reference
    audited, bad, _ = _audit(done.stderr)
    assert audited == refined and bad == 0  # each refined sample within its bound of an fp32 last layer


@pytest.mark.parametrize("chunk", [128, 2048])
def test_bf16_counts_equal_reference_at_the_median_radius(chunk, monkeypatch, capfd):
    """Many samples per point at the median radius (p ~ 0.5, where the margin's tests spend samples), trained
    decoder shape, with and without the screen, with and without the refinement (which merges the units of
    up to four samples of a point); blocks below and above the band's 128-row chunks."""
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    model = _trained_like(seed=4)
    B, n = 5, 400
    mu, sigma, center, r, ref = _median_radius_case(model, B, n, points_seed=8, radius_seed=2, sample_seed=5)
    for screen in (False, True):
        rechecked = {}
        for refine in ("0", "1"):
            monkeypatch.setenv("ROBBENCH_BAND_REFINE", refine)
            capfd.readouterr()
            res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n,
                                       seed=5, stream_ids=torch.arange(B), precision="bf16", screen=screen,
                                       chunk_size=chunk)
            _, refined, rechecked[refine], _ = band_stats(capfd.readouterr().err)
            assert torch.equal(res.counts, ref), (screen, refine)
            assert res.bf16_samples > 0 and res.rechecked < res.bf16_samples
            assert (refined > 0) == (refine == "1")
        assert rechecked["1"] < rechecked["0"]


def test_fp32_product_output_leaves_fewer_samples_undecided(monkeypatch, capfd):
    """bounds.h part 6: with brgemm's fp32 output the band has no bf16 output rounding term, so at the median
    radius it leaves clearly fewer samples to the refinement (and no more to the fp32 recheck) than at::mm's
    bf16 output (ROBBENCH_BRGEMM=0), with the same counts as the reference (the switch is read per call)."""
    try:
        usable = torch.ops.robbench.bf16_product_self_check(256, 784) <= 1.0
    except RuntimeError as e:  # no brgemm ukernel for this CPU
        pytest.skip(f"oneDNN's brgemm is unusable on this CPU: {e}")
    if not usable:
        pytest.skip("oneDNN's brgemm failed its self-check on this CPU")
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    model = _trained_like(seed=4)
    B, n = 5, 400
    mu, sigma, center, r, ref = _median_radius_case(model, B, n, points_seed=8, radius_seed=2, sample_seed=5)
    undecided = {}
    for brgemm in ("1", "0", "1"):
        monkeypatch.setenv("ROBBENCH_BRGEMM", brgemm)
        capfd.readouterr()
        res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r, B, mu.device), n, seed=5,
                                   stream_ids=torch.arange(B), precision="bf16", screen=False)
        rows, refined, rechecked, _ = band_stats(capfd.readouterr().err)
        assert torch.equal(res.counts, ref), brgemm
        assert rows == B * n and undecided.setdefault(brgemm, (refined, rechecked)) == (refined, rechecked)
    # measured: 218 vs 247 refined (0.88); keeping the u |s_j| term with brgemm's output gives 244 (0.99)
    assert undecided["1"][0] <= 0.95 * undecided["0"][0] and undecided["1"][1] <= undecided["0"][1], undecided


def test_refinement_bound_holds_on_adversarially_rounded_weights(monkeypatch, capfd):
    """bounds.h part 4 with and without the points' reference hidden vectors (ROBBENCH_REFINE_CENTER) and
    both groupings (ROBBENCH_REFINE_BY_LEVEL), on a last layer whose bf16 rounding errors all add up: every
    refined sample's mixed output is within its bound E of an fp32 last layer (ROBBENCH_REFINE_AUDIT), the
    bound is not vacuous there (worst ratio above 0.2), counts equal the reference's at radii around the
    median, and the reference hidden vectors leave fewer units to recompute."""
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    monkeypatch.setenv("ROBBENCH_REFINE_AUDIT", "1")
    model = _adversarial_rounding(seed=3)
    B, n = 6, 400
    mu, sigma, center = _points(model, B, 8)
    r = montecarlo.sample_distances(model, mu, sigma, center, 100, seed=2).median(1).values
    units = {}
    worst = 0.0
    for scale in (0.995, 1.0, 1.005):
        ref = montecarlo.count_within(model, mu, sigma, center, r * scale, n, seed=5, backend="torch")
        for center_on, by_level in (("1", "1"), ("0", "1"), ("1", "0")):
            monkeypatch.setenv("ROBBENCH_REFINE_CENTER", center_on)
            monkeypatch.setenv("ROBBENCH_REFINE_BY_LEVEL", by_level)
            capfd.readouterr()
            res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r * scale, B, mu.device), n,
                                       seed=5, stream_ids=torch.arange(B), precision="bf16", screen=False)
            err = capfd.readouterr().err
            assert torch.equal(res.counts, ref), (scale, center_on, by_level)
            _, refined, _, u = band_stats(err)
            rows, bad, ratio = _audit(err)
            assert rows == refined > 0 and bad == 0, (rows, refined, bad, ratio)
            worst = max(worst, ratio)
            units[center_on, by_level] = units.get((center_on, by_level), 0) + u
    assert 0.2 < worst <= 1.0
    assert units["1", "1"] < units["0", "1"]


@pytest.mark.parametrize("shape", [dict(k=3, hidden=(2,), d=13, scale=5.0, bias=-1.0),
                                   dict(k=4, hidden=(9,), d=65, scale=5.0, bias=-1.0),
                                   dict(k=6, hidden=(37,), d=130, scale=4.0, bias=-2.0)])
def test_refinement_tails_decide_like_the_reference(shape, monkeypatch, capfd):
    """The refinement's vector loops past their full blocks (review, session 5): D below 16, D % 16 != 0
    and D % 64 != 0 (refine_buckets_avx512's and select_above_avx512's scalar tails, the last bitset word)
    and K % 16 != 0 (dots_avx512's masked tail), on adversarially rounded last layers, small chunks (many
    groups): every count equals the reference's at radii around samples' own distances, and every refined
    sample's mixed output is within its bound E of an fp32 last layer (ROBBENCH_REFINE_AUDIT)."""
    monkeypatch.setenv("ROBBENCH_BAND_STATS", "1")
    monkeypatch.setenv("ROBBENCH_REFINE_AUDIT", "1")
    model = MLPVAE(seed=1, **shape)
    with torch.no_grad():  # _adversarial_rounding's last layer: δW = W - bf16(W) > 0 everywhere
        w = model.decoder[-2].weight
        wb = w.bfloat16()
        a = wb.abs()
        w.copy_(wb.float() + 0.49 * (a.float() - torch.nextafter(a, torch.zeros((), dtype=torch.bfloat16)).float()))
    B, n = 12, 12
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(B, model.latent_dim, generator=g)
    sigma = 0.02 + 0.3 * torch.rand(B, model.latent_dim, generator=g)
    center = model.decode(mu).flatten(1).detach()
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 5)
    assert torch.equal(d2, d2_cpp)
    capfd.readouterr()
    for col in (0, 5):
        for eps in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2):
            for sign in (1, -1):
                r2 = (d2[:, col] * (1 + sign * eps)).contiguous()
                for screen in (False, True):
                    res = kernels.count_within(model, mu, sigma, center, r2, n, seed=5, stream_ids=torch.arange(B),
                                               precision="bf16", screen=screen, chunk_size=7)
                    assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1)), (col, eps, sign, screen)
    err = capfd.readouterr().err
    _, refined, _, _ = band_stats(err)
    rows, bad, _ = _audit(err)
    assert rows == refined > 0 and bad == 0, (rows, refined, bad)


@pytest.mark.parametrize("K,nk", [(256, 16), (37, 5), (8, 1)])
def test_bf16_rows_round_like_torch_and_bound_their_sums(K, nk):
    """The bf16 pass's row preparation (gather, rounding, norms, δh V in one AVX-512 pass): the rows and ĥ
    equal torch's gather and bf16 rounding bit for bit (halfway cases and NaN included), except that
    subnormal bf16 values become +0 (the product reads them as 0; δh = h there); the
    fp32 sums are within the any-order bound bounds.h uses, g_n times the float64 sum of |terms| (plus
    2^-149 per term for the subnormal row's underflow)."""
    g = torch.Generator().manual_seed(K)
    h = torch.rand(50, K, generator=g) * torch.logspace(-3, 1, K)
    h[3, : K // 2] = torch.tensor(1.0 + 2.0 ** -8).expand(K // 2)      # halfway: ties to even
    h[4, :] = torch.finfo(torch.float32).tiny * torch.rand(K, generator=g)  # subnormal
    h[5, 0] = float("nan")
    rows = torch.randint(0, 50, (70,), generator=g)
    rows[:3] = torch.tensor([3, 4, 5])
    vt = torch.randn(nk, K, generator=g)
    hq, hb, sb, sd, pv = torch.ops.robbench.bf16_rows(h, rows, vt)
    assert torch.equal(hq.view(torch.int32), h[rows].view(torch.int32))
    ref = h[rows].to(torch.bfloat16).view(torch.int16)
    ref = torch.where(ref & 0x7F80 == 0, torch.zeros_like(ref), ref)  # subnormal ĥ -> +0 (bounds.h part 2)
    ok = ~torch.isnan(h[rows]).any(1)  # NaN rows: a NaN where h has one (its bits are c10's choice)
    assert torch.equal(hb.view(torch.int16)[ok], ref[ok]) and (hb[:2].float() != h[rows[:2]]).any()
    assert torch.isnan(hb[2, 0].float()) and torch.equal(hb.view(torch.int16)[2, 1:], ref[2, 1:])
    x = hb.double()
    d = h[rows].double() - x
    gam = lambda n: n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    for got, terms, n in ((sb, x * x, K), (sd, d * d, K)):
        exact = terms.sum(1)
        assert ((got.double() - exact).abs() <= gam(n) * exact + n * 2.0 ** -149)[ok].all()  # + underflow
    prods = d[:, :, None] * vt.double().t()[None]                      # (m, K, nk)
    exact = prods.sum(1)
    assert ((pv.double() - exact).abs() <= gam(K) * prods.abs().sum(1) + K * 2.0 ** -149)[ok].all()
    assert (pv[ok] != 0).any() and (sd > 0).sum() > len(rows) // 2  # the checks above are not vacuous
    flushed = hb[1].view(torch.int16) == 0  # the subnormal row: ĥ = +0 (all but values that round up to 2^-126)
    assert flushed.sum() >= K - 2 and torch.equal(d[1][flushed], h[rows[1]].double()[flushed])  # δh = h there


@pytest.mark.parametrize("final", [nn.Identity, nn.ReLU])
@pytest.mark.parametrize("brgemm", ["1", "0"])
def test_subnormal_bf16_weights_are_not_dropped_by_the_band(final, brgemm, monkeypatch):
    """VDPBF16PS (the bf16 product's instruction: brgemm and at::mm alike) reads subnormal bf16 inputs as 0.
    Here W[:, 0] = 2^-127 (subnormal, bf16-exact) and h = (2^63, 0, ...): the reference's outputs are
    y_j = 2^-64, the product's s_j = 0, and the band's terms (g_K ||Ŵ_j|| ||ĥ|| ~ 2^-83, 2^-100) are far
    below the dropped 2^-64: with r2 half the reference's distance every sample was called inside (256 of
    256, reference 0). Ŵ's subnormal values are now set to 0 so that δW = W - Ŵ carries them (bounds.h
    part 2)."""
    monkeypatch.setenv("ROBBENCH_BRGEMM", brgemm)
    model = MLPVAE(k=4, hidden=(32,), d=64, final=final, seed=1)
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        model.decoder[0].bias.zero_()
        model.decoder[0].bias[0] = 2.0 ** 63  # ||h||^2 = 2^126: finite in fp32
        model.decoder[-2].weight.zero_()
        model.decoder[-2].weight[:, 0] = 2.0 ** -127
        model.decoder[-2].bias.zero_()
    B, n = 2, 256
    mu, sigma, _ = _points(model, B, 3)
    center = torch.zeros(B, 64)
    d2, d2_cpp = _sq_dists(model, mu, sigma, center, n, 1)
    assert torch.equal(d2, d2_cpp) and torch.all(d2 == 64 * 2.0 ** -128)
    r2 = torch.full((B,), 64 * 2.0 ** -129, dtype=torch.float32)
    for precision, screen in MODES:
        res = kernels.count_within(model, mu, sigma, center, r2, n, seed=1, stream_ids=torch.arange(B),
                                   precision=precision, screen=screen)
        assert res.counts.tolist() == [0, 0], (precision, screen)
        assert precision == "fp32" or res.bf16_samples == B * n  # the band saw them (not the screen)


def test_last_layer_cache_is_keyed_by_contents():
    """The bf16 band's constants (an SVD) are cached per last layer by its contents: a plan rebuilt with new
    tensors holding the same weights hits; the same tensor changed in place (two output units swapped:
    every sum over its values unchanged) misses, and its counts are the reference's for the new weights."""
    model = MLPVAE(k=5, hidden=(40,), d=60, scale=3.0, bias=-1.0, seed=11)
    mu, sigma, center = _points(model, 3, 4)
    r2 = torch.full((3,), 0.8)
    plan, ka, kb = _mlp_args(model, mu, sigma, center, 200, 2)

    def count(weights_t, biases):
        return torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, 200, 0, weights_t, biases, plan.acts,
                                            1, True, 2048)[0]

    stats = torch.ops.robbench.last_layer_cache_stats
    count(plan.weights_t, plan.biases)
    _, hits, misses = stats()
    count([w.clone() for w in plan.weights_t], [b.clone() for b in plan.biases])  # new tensors, same values
    assert stats()[1:] == [hits + 1, misses]
    last = plan.weights_t[-1]
    with torch.no_grad():
        last[:, [0, 1]] = last[:, [1, 0]].clone()  # in place: same address, same sum and sum of |w|
        model.decoder[-2].weight[[0, 1]] = model.decoder[-2].weight[[1, 0]].clone()
        model.decoder[-2].bias[[0, 1]] = model.decoder[-2].bias[[1, 0]].clone()
    plan.biases[-1][[0, 1]] = plan.biases[-1][[1, 0]].clone()
    got = count(plan.weights_t, plan.biases)
    assert stats()[2] == misses + 1
    ref = TorchBackend().count_within(model, mu, sigma, center, r2, 200, seed=2, stream_ids=torch.arange(3))
    assert torch.equal(got, ref.counts)


@pytest.mark.parametrize("workspaces", ["1", "0"])
def test_workspaces_across_shapes_calls_and_threads(workspaces, monkeypatch):
    """mlp_count keeps z, every hidden layer's output and the fp32 recheck's buffers in per-thread workspaces
    across blocks and calls (montecarlo_cpu.cpp, workspace_rows; ROBBENCH_WORKSPACES=0: fresh tensors, the A/B
    switch). Calls of different decoders (other hidden widths, one or two hidden layers), block sizes,
    precisions and screens, run in turn and from several threads at once, must each give the torch
    reference's counts: a buffer of the wrong width, a hidden vector of the points (h_c) aliased with a
    block's or a stale row would change them."""
    import threading

    monkeypatch.setenv("ROBBENCH_WORKSPACES", workspaces)

    models = [MLPVAE(k=6, hidden=(40, 48), d=70, scale=3.0, seed=1), MLPVAE(k=3, hidden=(33,), d=17, seed=2),
              MLPVAE(k=6, hidden=(96, 40), d=70, scale=3.0, seed=3)]
    cases = []
    for i, (model, B, n, rows) in enumerate([(models[0], 5, 300, 256), (models[1], 3, 900, 2048),
                                             (models[2], 7, 200, 64), (models[0], 2, 3000, 2048),
                                             (models[1], 9, 40, 128), (models[2], 1, 700, 512)]):
        mu, sigma, center, r, ref = _median_radius_case(model, B, n, points_seed=10 + i, radius_seed=20 + i,
                                                        sample_seed=30 + i)
        cases.append((model, mu, sigma, center, r, n, 30 + i, rows, ref))
    modes = [("bf16", True), ("bf16", False), ("fp32", True), ("fp32", False)]

    def run(order, out):
        for c in order:
            model, mu, sigma, center, r, n, seed, rows, _ = cases[c]
            for precision, screen in modes:
                got = kernels.count_within(model, mu, sigma, center, (r * r).float(), n, seed=seed,
                                           stream_ids=torch.arange(mu.shape[0]), chunk_size=rows,
                                           precision=precision, screen=screen)
                out.append((c, precision, screen, got.counts))

    serial: list = []
    run(list(range(len(cases))) + [3, 0, 5], serial)
    results: list[list] = [[] for _ in range(3)]
    threads = [threading.Thread(target=run, args=(list(range(len(cases)))[t::-1] + [t], results[t]))
               for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c, precision, screen, counts in serial + [x for res in results for x in res]:
        assert torch.equal(counts, cases[c][-1]), (c, precision, screen)
    assert len(serial) == 9 * len(modes) and all(len(res) > 0 for res in results)


def test_mlp_count_ids_keys_for_negative_and_huge_seeds_and_random_ids():
    """Review s10-ra: mlp_count_ids' keys (C++) against rng.stream_keys for seeds Python folds to 64 bits
    (negative, >= 2^64) and 64 random 64-bit ids (both words random, ids near +-2^63): the same samples, so
    the same counts at radii placed exactly at the samples' own distances, and the same stats; end to end
    (kernels.count_within: the cached seed key) the torch reference's counts."""
    model = MLPVAE()
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(-2 ** 63, 2 ** 63 - 1, (61,), generator=g, dtype=torch.int64)
    ids = torch.cat([ids, torch.tensor([2 ** 63 - 1, 2 ** 63 - 2, -2 ** 63])])
    B, n = ids.shape[0], 24
    mu, sigma, center = _points(model, B, 5)
    plan = decoding.decoder_plan(model, center.shape[1])
    for seed in (-1, -2 ** 63, 2 ** 64 + 5, -(2 ** 70) - 3):
        ka, kb = rng.stream_keys(seed, ids)
        d2 = torch.ops.robbench.mlp_sq_distances(mu, sigma, center, ka, kb, n, 0, plan.weights_t, plan.biases,
                                                 plan.acts, 64)
        r2 = d2[:, n // 3].contiguous()  # a tie with one of each point's own samples
        for screen, precision in ((True, 1), (False, 0)):
            want = torch.ops.robbench.mlp_count(mu, sigma, center, r2, ka, kb, n, 0, plan.weights_t, plan.biases,
                                                plan.acts, precision, screen, 64)
            got = torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, ids, rng.seed_key(seed), n, 0,
                                                   plan.weights_t, plan.biases, plan.acts, precision, screen, 64)
            assert torch.equal(got[0], (d2 <= r2[:, None]).sum(1)), (seed, screen)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, screen)
        ref = montecarlo.count_within(model, mu, sigma, center, r2.sqrt(), n, seed=seed, stream_ids=ids,
                                      backend="torch")
        res = kernels.count_within(model, mu, sigma, center, montecarlo.radius_sq(r2.sqrt(), B, mu.device), n,
                                   seed=seed, stream_ids=ids, screen="auto")
        assert torch.equal(res.counts, ref), seed


def test_mlp_count_ids_keys_on_the_portable_build():
    """The test above with ROBBENCH_NO_AVX512=1 (read once per process: a subprocess)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ROBBENCH_NO_AVX512="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                           "keys_for_negative_and_huge_seeds or makes_the_stream_keys_of_rng or flushed_subnormals"
                           " or screen_state"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "5 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_flushed_subnormals_op_computes_nothing_and_the_backend_runs_the_reference():
    """Review s10-ra: under torch.set_flush_denormal(True) mlp_count_ids itself reports stats [-1] (nothing
    computed), and CppBackend's default (screen="auto") returns the reference's counts with nothing screened."""
    model = MLPVAE(seed=3, k=6, hidden=(40, 48), d=70, scale=3.0, bias=-2.0)
    B, n = 4, 200
    mu, sigma, center = _points(model, B, 7)
    plan = decoding.decoder_plan(model, center.shape[1])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        d2 = TorchBackend().sq_distances(model, mu, sigma, center, n, seed=5, stream_ids=torch.arange(B))
        r2 = d2.sort(1).values[:, n // 2].contiguous()
        counts, stats = torch.ops.robbench.mlp_count_ids(mu, sigma, center, r2, torch.arange(B), rng.seed_key(5), n,
                                                         0, plan.weights_t, plan.biases, plan.acts, 1, True, 64)
        assert stats.tolist() == [-1] and counts.numel() == 0
        res = kernels.CppBackend().count_within(model, mu, sigma, center, r2, n, seed=5, stream_ids=torch.arange(B))
        assert torch.equal(res.counts, (d2 <= r2[:, None]).sum(1))
        assert (res.screened, res.bf16_samples, res.precision) == (0, 0, "fp32")
    finally:
        torch.set_flush_denormal(False)


def test_screen_state_never_changes_decisions_at_tied_radii():
    """Review s10-ra: screen="auto" only chooses whether the Lipschitz screen runs; the counts at radii placed
    exactly at sample distances and one fp32 ulp either side are the reference's in every screen state (on,
    skipping, probing), in both precisions, while the screen does decide samples on the calls it runs."""
    model = MLPVAE(scale=0.3)
    B, n = 3, 150
    mu, sigma, center = _points(model, B, 0)
    plan = decoding.decoder_plan(model, center.shape[1])
    d2 = TorchBackend().sq_distances(model, mu, sigma, center, n, seed=2, stream_ids=torch.arange(B))
    srt = d2.sort(1).values
    screened = 0
    for q in (n // 2, (9 * n) // 10, n - 1):
        tie = srt[:, q].contiguous()
        for r2 in (tie, torch.nextafter(tie, torch.full_like(tie, math.inf)),
                   torch.nextafter(tie, torch.zeros_like(tie))):
            want = (d2 <= r2[:, None]).sum(1)
            states = ((0, 0), (kernels.SCREEN_MISSES, 0), (kernels.SCREEN_MISSES, kernels.SCREEN_PROBE - 1))
            for misses, skips in states:  # screen on, skipped, probing
                for precision in ("bf16", "fp32"):
                    plan.screen_misses, plan.screen_skips = misses, skips
                    res = kernels.count_within(model, mu, sigma, center, r2, n, seed=2, stream_ids=torch.arange(B),
                                               precision=precision, screen="auto")
                    assert torch.equal(res.counts, want), (q, misses, skips, precision)
                    screened += res.screened
    assert screened > 0  # the screen ran and decided samples at these radii


def test_screen_argument_is_checked():
    """Review s10-ra: screen is True, False or "auto"; a string such as "off" (truthy) used to run the screen."""
    model = MLPVAE()
    mu, sigma, center = _points(model, 2, 0)
    with pytest.raises(ValueError, match="screen must be True, False or 'auto', got 'off'"):
        kernels.count_within(model, mu, sigma, center, torch.ones(2), 10, seed=0, stream_ids=torch.arange(2),
                             screen="off")
