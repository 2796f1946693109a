"""Compiled ops against the pure-PyTorch reference: opcheck, bit-exact RNG and fp32 path, identical
decisions of the bf16 path (many seeds/shapes, points placed so many samples sit on the boundary)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robbench import kernels, montecarlo, rng

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


def _mlp_args(model, mu, sigma, center, n, seed):
    plan = montecarlo.decoder_plan(model, center.shape[1])
    ka, kb = rng.stream_keys(seed, torch.arange(mu.shape[0]))
    return plan, ka, kb


def test_normals_bit_exact_with_python():
    g = torch.Generator().manual_seed(0)
    ka, kb, j = (torch.randint(0, 2 ** 32, (3000,), generator=g) for _ in range(3))
    for k in (1, 2, 5, 10):
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
         (mu, sigma, center, r2, ka, kb, 50, 7, plan.weights_t, plan.biases, plan.acts, 1, 64)),
        (torch.ops.robbench.count_le.default, (torch.rand(3, 20, 70, generator=g), center, r2)),
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


@pytest.mark.parametrize("seed,shape", CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_counts_equal_reference_with_boundary_radii(seed, shape, precision):
    """Radii are quantiles of the reference's own distances, so samples sit exactly on the boundary."""
    model = MLPVAE(seed=seed, **shape)
    B, n = 6, 240
    mu, sigma, center = _points(model, B, 100 + seed)
    ref_d = montecarlo.sample_distances(model, mu, sigma, center, n, seed=seed, backend="torch")
    q = torch.tensor([0.01, 0.3, 0.5, 0.5, 0.7, 0.99])
    r = ref_d.sort(1).values[torch.arange(B), (q * (n - 1)).long()]  # an actual sample distance per point
    ref = montecarlo.count_within(model, mu, sigma, center, r, n, seed=seed, backend="torch")
    res = kernels.count_within(model, mu, sigma, center, montecarlo._radius_sq(r, B, mu.device), n, seed=seed,
                               stream_ids=torch.arange(B), precision=precision, chunk_size=128)
    assert torch.equal(res.counts, ref)
    assert (ref_d == r[:, None]).any(1).all()  # each radius is some sample's distance: boundary stress
    assert 0.0 <= res.recheck_fraction <= 1.0


def test_bf16_pass_decides_far_samples_without_recheck():
    """A radius far outside every sample: the bound decides everything in bf16 (the worst-case bound is
    ~100x the observed bf16 error on this model, so only radii far from the samples are decided)."""
    model = MLPVAE(scale=3.0, bias=-2.0)
    mu, sigma, center = _points(model, 4, 0)
    d = montecarlo.sample_distances(model, mu, sigma, center, 200, seed=0, backend="torch")
    for r, expect in ((float(d.max()) * 10, 200),):
        res = kernels.count_within(model, mu, sigma, center, montecarlo._radius_sq(r, 4, mu.device), 200, seed=0,
                                   stream_ids=torch.arange(4), precision="bf16")
        assert res.counts.tolist() == [expect] * 4
        assert res.bf16_samples == 800 and res.recheck_fraction < 0.05


def test_generic_epilogue_counts():
    g = torch.Generator().manual_seed(0)
    y, center = torch.rand(3, 50, 30, generator=g), torch.rand(3, 30, generator=g)
    d2 = (y - center[:, None]).pow(2).sum(2)
    s = d2.sort(1).values
    r2 = (s[:, 20] + s[:, 21]) / 2  # between two samples: no rounding can flip a decision
    assert torch.ops.robbench.count_le(y, center, r2).tolist() == [21, 21, 21]


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
