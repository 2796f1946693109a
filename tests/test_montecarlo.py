"""The Monte Carlo engine's torch reference: RNG, chunk/batch invariance, known answers."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from robbench import decoding, montecarlo, rng
from robbench_plugins.analytic import LinearGaussianVAE


class TinyMLPVAE(nn.Module):
    """Only what the engine uses: latent_dim, input_shape, decoder, decode. Odd widths on purpose."""

    def __init__(self, k: int = 5, hidden: int = 37, d: int = 50, seed: int = 0, final=nn.Sigmoid):
        super().__init__()
        torch.manual_seed(seed)
        self.latent_dim, self.input_shape = k, (d,)
        self.decoder = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, d), final())

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


class GenericVAE(TinyMLPVAE):
    """Same maths without a ``decoder`` attribute: forces the generic path."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.net = self.decoder
        del self.decoder

    def decode(self, z):
        return self.net(z).view(-1, *self.input_shape)


def _inputs(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, model.latent_dim, generator=g)
    sigma = 0.3 + torch.rand(B, model.latent_dim, generator=g)
    center = model.decode(mu).flatten(1).detach()
    return mu, sigma, center


def test_hash_matches_integer_reference():
    x = torch.randint(0, 2 ** 32, (2000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    assert [rng.hash32_int(int(v)) for v in x] == rng.hash32(x).tolist()
    # values from an independent uint32_t C implementation of lowbias32
    assert rng.hash32_int(1) == 1753845952 and rng.hash32_int(0xDEADBEEF) == 3861431939


def test_stream_keys_numpy_path_matches_torch_ops():
    # CPU ids take the numpy path: the same 64 bits of every id (negatives, extremes, a strided view), any seed
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(-2 ** 63, 2 ** 63 - 1, (500,), dtype=torch.int64, generator=g),
                     torch.tensor([0, 1, -1, 2 ** 32, 2 ** 32 - 1, -2 ** 63, 2 ** 63 - 1])])
    for seed in (0, 1, 2 ** 40 + 17, 2 ** 64 - 1):
        for s in (ids, ids[::3]):
            fast, slow = rng.stream_keys(seed, s), rng._stream_keys_torch(seed, s)
            assert fast[0].dtype == torch.int64 and fast[0].device.type == "cpu"
            assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    lo, hi = 5 & rng.MASK32, 0
    assert int(rng.stream_keys(9, torch.tensor([5]))[0]) == rng.hash32_int(rng.hash32_int(lo ^ rng.seed_key(9)) ^ hi)


def test_normals_are_standard_normal_and_independent():
    eta = rng.sample_normals(7, torch.arange(8), 2000, 6).flatten(0, 1)  # 16000 x 6
    assert stats.kstest(eta.flatten().double().numpy(), "norm").pvalue > 1e-3
    assert abs(float(eta.mean())) < 4 / math.sqrt(eta.numel())
    assert abs(float(eta.var()) - 1) < 0.03
    corr = torch.corrcoef(eta.T) - torch.eye(6)
    assert float(corr.abs().max()) < 0.05
    other = rng.sample_normals(8, torch.arange(8), 2000, 6).flatten(0, 1)  # another seed differs
    assert not torch.equal(eta, other)


def test_normals_continue_with_offset_and_ignore_batching():
    full = rng.sample_normals(3, torch.tensor([5, 9, 2 ** 40 + 1]), 100, 4)
    tail = rng.sample_normals(3, torch.tensor([9]), 30, 4, sample_offset=70)
    assert torch.equal(tail[0], full[1, 70:])


@pytest.mark.parametrize("model_cls", [TinyMLPVAE, GenericVAE])
def test_chunk_size_and_batching_invariance(model_cls):
    model = model_cls()
    mu, sigma, center = _inputs(model, B=4)
    kw = dict(seed=11, backend="torch")
    ref = montecarlo.sample_distances(model, mu, sigma, center, 300, chunk_size=100000, **kw)
    for chunk in (1, 64, 200, 777):
        got = montecarlo.sample_distances(model, mu, sigma, center, 300, chunk_size=chunk, **kw)
        if model_cls is TinyMLPVAE:  # bit-exact by construction for MLP decoders
            assert torch.equal(got, ref)
        else:  # a user's decoder may round differently per block shape: equal to float32 precision
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    # a single point with its stream id reproduces its row
    one = montecarlo.sample_distances(model, mu[2:3], sigma[2:3], center[2:3], 300, stream_ids=torch.tensor([2]),
                                      **kw)
    if model_cls is not TinyMLPVAE:
        torch.testing.assert_close(one[0], ref[2], rtol=1e-6, atol=1e-7)
        return
    assert torch.equal(one[0], ref[2])
    r = float(ref.median())
    counts = montecarlo.count_within(model, mu, sigma, center, r, 300, chunk_size=64, **kw)
    assert torch.equal(counts, (ref <= r).sum(1))  # median => a sample exactly on the boundary counts as inside


def test_offset_continues_the_stream():
    model = TinyMLPVAE()
    mu, sigma, center = _inputs(model)
    kw = dict(seed=5, backend="torch")
    full = montecarlo.sample_distances(model, mu, sigma, center, 250, **kw)
    a = montecarlo.sample_distances(model, mu, sigma, center, 90, **kw)
    b = montecarlo.sample_distances(model, mu, sigma, center, 160, sample_offset=90, **kw)
    assert torch.equal(torch.cat([a, b], 1), full)
    r = torch.tensor([0.5, 0.7, 0.9])
    c_full = montecarlo.count_within(model, mu, sigma, center, r, 250, **kw)
    c_parts = (montecarlo.count_within(model, mu, sigma, center, r, 90, **kw)
               + montecarlo.count_within(model, mu, sigma, center, r, 160, sample_offset=90, **kw))
    assert torch.equal(c_full, c_parts)


def test_counts_equal_brute_force_distances():
    model = TinyMLPVAE(final=nn.ReLU)
    mu, sigma, center = _inputs(model, B=3)
    n = 400
    eta = rng.sample_normals(2, torch.arange(3), n, model.latent_dim)
    z = mu[:, None] + eta * sigma[:, None]
    brute = (model.decode(z.flatten(0, 1)).view(3, n, -1) - center[:, None]).norm(dim=2).detach()
    dist = montecarlo.sample_distances(model, mu, sigma, center, n, seed=2, backend="torch")
    torch.testing.assert_close(dist, brute, rtol=1e-5, atol=1e-6)
    # radii in the middle of a gap between sorted brute-force distances: rounding cannot flip a decision
    s = brute.sort(1).values
    gaps = s[:, 1:] - s[:, :-1]
    idx = gaps[:, n // 3: 2 * n // 3].argmax(1) + n // 3
    r = (s[torch.arange(3), idx] + s[torch.arange(3), idx + 1]) / 2
    counts = montecarlo.count_within(model, mu, sigma, center, r, n, seed=2, backend="torch")
    assert counts.tolist() == (idx + 1).tolist()


def test_linear_gaussian_probability_matches_noncentral_chi_square():
    model = LinearGaussianVAE(input_shape=(16,), latent_dim=4, s=0.5, w=2.0)
    x = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    mu, sigma = model.encode(x)
    center = model.decode(mu).flatten(1)
    shift = torch.tensor([[0.0, 0, 0, 0], [0.6, 0, 0, 0]])  # ||A delta|| = 0 and 0.6 in latent units
    r, n = 2.2, 20000
    counts = montecarlo.count_within(model, mu + shift, sigma, center, r, n, seed=123, backend="torch",
                                     stream_ids=torch.tensor([10, 11]))
    for b, lat in enumerate([0.0, 0.6]):
        p = model.exact_probability(lat, r)
        lo, hi = stats.binom.ppf([0.0005, 0.9995], n, p)  # 99.9% two-sided binomial interval
        assert lo <= int(counts[b]) <= hi, (b, p, int(counts[b]) / n)


def test_chunked_memory_is_flat_in_samples():
    """The engine never materialises (B, S, D): a block holds at most chunk_size rows."""
    blocks = list(decoding.blocks(64, 100_000, 2048))
    assert max((b.p1 - b.p0) * (b.s1 - b.s0) for b in blocks) <= 2048
    assert sum((b.p1 - b.p0) * (b.s1 - b.s0) for b in blocks) == 64 * 100_000


def test_validation_messages():
    model = TinyMLPVAE()
    mu, sigma, center = _inputs(model)
    with pytest.raises(ValueError, match="backend"):
        montecarlo.count_within(model, mu, sigma, center, 1.0, 10, seed=0, backend="nope")
    with pytest.raises(ValueError, match="radius"):
        montecarlo.count_within(model, mu, sigma, center, torch.ones(5), 10, seed=0, backend="torch")


class LogitsDecoderVAE(torch.nn.Module):
    """``decoder`` returns logits and ``decode`` applies the sigmoid: the engine must follow decode()."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input_shape, self.latent_dim = (1, 4, 4), 3
        self.decoder = torch.nn.Sequential(torch.nn.Linear(3, 16))

    def decode(self, z):
        return torch.sigmoid(self.decoder(z)).view(-1, *self.input_shape)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_engine_decodes_through_decode_not_a_mismatched_decoder(backend):
    model = LogitsDecoderVAE()
    mu, sigma = torch.zeros(2, 3), torch.ones(2, 3)
    center = model.decode(mu).flatten(1)
    d = montecarlo.sample_distances(model, mu, sigma, center, 64, seed=3, backend=backend)
    z = mu[:, None, :] + rng.sample_normals(3, torch.arange(2), 64, 3) * sigma[:, None, :]
    brute = (model.decode(z.reshape(-1, 3)).flatten(1).view(2, 64, -1) - center[:, None]).norm(dim=2)
    torch.testing.assert_close(d, brute, rtol=1e-5, atol=1e-6)


def test_plan_cache_does_not_keep_models_alive():
    import gc
    import weakref

    from robbench_plugins.analytic import LinearGaussianVAE

    model = LinearGaussianVAE()
    mu, sigma = model.encode(torch.full((1, 1, 8, 8), 0.5))
    montecarlo.count_within(model, mu, sigma, model.decode(mu).flatten(1), 1.0, 16, seed=0, backend="torch")
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("r", [-1.0, float("nan")])
def test_a_negative_or_nan_radius_is_refused(r):
    """Every backend compares squared distances with r * r, so a negative r counted ||Delta|| <= |r| in silence
    (session 10: estimate_margin / estimate_probability called from Python with r < 0 gave the margins of |r|;
    evaluate and the CLI already refused r <= 0)."""
    from robbench_plugins.analytic import LinearGaussianVAE
    from robbench.margin import estimate_probability

    model = LinearGaussianVAE()
    with pytest.raises(ValueError, match="radius r must be >= 0"):
        estimate_probability(model, torch.full((2, 1, 8, 8), 0.5), None, r=r, n_samples=16)
    with pytest.raises(ValueError, match="radius r must be >= 0"):
        montecarlo.radius_sq(torch.tensor([1.0, r]), 2, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_radius_zero_and_infinity_are_the_closed_ball(backend):
    """r = 0 counts only samples decoded onto the center (none here), r = inf every sample (README, Python API)."""
    from robbench_plugins.analytic import LinearGaussianVAE
    from robbench.margin import estimate_probability

    model = LinearGaussianVAE()
    x = torch.full((2, 1, 8, 8), 0.5)
    assert estimate_probability(model, x, None, r=0.0, n_samples=64, backend=backend).k.tolist() == [0, 0]
    assert estimate_probability(model, x, None, r=float("inf"), n_samples=64, backend=backend).k.tolist() == [64, 64]
