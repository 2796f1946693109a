"""Margin estimation per point: robbench (batched bisection + sequential Clopper-Pearson test + the
compiled engine) against the older published procedure: a downward linear scan over radii in fixed
steps, rerunning the attack at every radius, single-sample decoding in a Python loop and a raw
frequency threshold. Equal accuracy: the scan step equals the bisection's final interval width."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from robbench import margin as margin_mod

from conftest import QUICK

attacks = pytest.importorskip("robbench_plugins.attacks")

M, MAX_RADIUS = 0.5, 10.0
TOL = 0.5 if QUICK else 0.05
N_POINTS = 2 if QUICK else 25      # robbench estimates a batch of points at once, as a run does
N_BASELINE = 1 if QUICK else 2     # the scan handles one point at a time: its per-point cost is flat
BASELINE_SAMPLES = 64 if QUICK else 256


class SmallVAE(nn.Module):
    """MLP VAE on 28x28 inputs (random weights; the comparison is about cost, not quality)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.input_shape, self.latent_dim = (1, 28, 28), 10
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 20))
        self.decoder = nn.Sequential(nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 784), nn.Sigmoid())
        with torch.no_grad():  # a sensitive encoder, so margins fall well inside (0, MAX_RADIUS)
            self.encoder[3].weight.mul_(8.0)
            self.decoder[2].weight.mul_(4.0)

    def encode(self, x):
        h = self.encoder(x)
        return h[:, :10], nn.functional.softplus(h[:, 10:]) + 0.05

    def decode(self, z):
        return self.decoder(z).view(-1, *self.input_shape)


def calibrated_radius(model, x) -> float:
    """r with p_r(x, 0) ~ 0.9 for the first point, so the margin lies strictly inside (0, MAX_RADIUS)."""
    from robbench import montecarlo

    with torch.no_grad():
        mu, sigma = model.encode(x[:1])
        center = model.decode(mu).flatten(1)
    d = montecarlo.sample_distances(model, mu, sigma, center, 1000, seed=0)
    return float(d.quantile(0.9))


def linear_scan_margin(model, x, attack, params, R: float) -> float:
    """The older procedure for one point x (1, ...): scan rho = MAX_RADIUS, MAX_RADIUS - TOL, ... down;
    the margin is the first rho at which the attacked p_r (raw frequency) exceeds m."""
    with torch.no_grad():
        mu0, sigma0 = model.encode(x)
        center = model.decode(mu0).flatten(1)
    rho = MAX_RADIUS
    gen = torch.Generator().manual_seed(0)
    while rho > 0:
        delta = attack(model, x, torch.tensor([rho]), params=params, generator=gen).delta
        with torch.no_grad():
            mu, _ = model.encode(x + delta)
            inside = 0
            for _ in range(BASELINE_SAMPLES):  # single-sample decoding in a Python loop
                z = mu + torch.randn(mu.shape, generator=gen) * sigma0
                inside += int((model.decode(z).flatten(1) - center).norm() <= R)
        if inside / BASELINE_SAMPLES > M:
            return rho
        rho -= TOL
    return 0.0


@pytest.mark.benchmark(group="end-to-end")
def test_margin_vs_linear_scan(benchmark):
    model = SmallVAE().eval()
    x = torch.rand(N_POINTS, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    attack = attacks.MaxDamageAttack()
    params = dict(attack.defaults)
    R = calibrated_radius(model, x)

    from robbench_plugins.estimators import MARGIN_DEFAULTS

    # The margin estimator's own defaults for warm-started radii (warm_steps None: the attack's own steps).
    warm = {"restarts": MARGIN_DEFAULTS["warm_restarts"]}
    if MARGIN_DEFAULTS["warm_steps"] is not None:
        warm["steps"] = MARGIN_DEFAULTS["warm_steps"]

    def ours():
        return margin_mod.estimate_margin(model, x, attack, params, r=R, m=M, max_radius=MAX_RADIUS,
                                          tolerance=TOL, seed=0, backend="auto", warm_attack_params=warm,
                                          samples_max=MARGIN_DEFAULTS["samples_max"],
                                          samples_locate=MARGIN_DEFAULTS["samples_locate"],
                                          refine=MARGIN_DEFAULTS["refine"],
                                          stop_when_undecided=MARGIN_DEFAULTS["stop_when_undecided"])

    from robbench import montecarlo
    montecarlo.resolve_backend("auto", torch.device("cpu"))  # build/load the extension outside the timing
    res = benchmark.pedantic(ours, rounds=1, iterations=1)
    t_ours = benchmark.stats.stats.mean / N_POINTS
    print(f"\nrobbench: {float(res.samples.double().mean()):.0f} samples and {float(res.tests.double().mean()):.1f} "
          f"attacked radii per point")
    t0 = time.perf_counter()
    base = [linear_scan_margin(model, x[i:i + 1], attack, params, R) for i in range(N_BASELINE)]
    t_base = (time.perf_counter() - t0) / N_BASELINE
    benchmark.extra_info.update(seconds_per_point_ours=t_ours, seconds_per_point_linear_scan=t_base,
                                speedup=t_base / t_ours, margins_ours=[float(v) for v in res.margin],
                                margins_linear_scan=base)
    print(f"\nper point: robbench {t_ours:.2f} s, linear scan {t_base:.2f} s, speed-up {t_base / t_ours:.1f}x; "
          f"margins of the first points {[round(float(v), 3) for v in res.margin[:N_BASELINE]]} vs {base}")
    assert len(base) == N_BASELINE
