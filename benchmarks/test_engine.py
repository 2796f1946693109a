"""Monte Carlo engine per backend/precision on the standard workload (see robbench.bench)."""
from __future__ import annotations

import pytest
import torch

from robbench import bench, kernels, montecarlo

from conftest import QUICK

B = 8 if QUICK else 64
SAMPLES = [256] if QUICK else [256, 1024, 10_000]
CONFIGS = [("torch", "fp32")]
if kernels.cpp_available():
    CONFIGS += [("cpp", "fp32")] + ([("cpp", "bf16")] if kernels.bf16_supported() else [])


@pytest.fixture(scope="module")
def workload():
    model = bench.StandardDecoderVAE()
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(B, 10, generator=gen)
    sigma = 0.3 + 0.5 * torch.rand(B, 10, generator=gen)
    with torch.no_grad():
        center = model.decode(mu).flatten(1)
    return model, mu, sigma, center


@pytest.mark.parametrize("S", SAMPLES)
@pytest.mark.parametrize("backend,precision", CONFIGS)
def test_count_within(benchmark, workload, backend, precision, S):
    model, mu, sigma, center = workload
    r2 = torch.full((B,), 16.0)  # r = 4

    def once():
        if backend == "torch":
            return montecarlo.count_within(model, mu, sigma, center, 4.0, S, seed=0, backend="torch")
        return kernels.count_within(model, mu, sigma, center, r2, S, seed=0, stream_ids=torch.arange(B),
                                    precision=precision).counts

    counts = benchmark.pedantic(once, rounds=1 if S > 1024 else 3, iterations=1)
    ref = montecarlo.count_within(model, mu, sigma, center, 4.0, min(S, 256), seed=0, backend="torch")
    assert counts.shape == ref.shape
    benchmark.extra_info.update(gflop=bench.decoder_flops(model, 784) * B * S / 1e9)
