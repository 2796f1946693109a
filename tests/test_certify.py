"""Certified margins: closed forms on the linear-Gaussian VAE, soundness of every bound against brute force,
and R_cert <= R (attack margin) on trained MLP VAEs, including the Lipschitz-constrained family."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import special
from torch import nn

from robbench import api
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.bounds import activations, ball, network, spectral
from robbench.certify import METHODS, EncoderCertifier, largest_certified, probit_gap
from robbench.protocols import DataOptions, SplitData
from robbench.training import TrainConfig, train_or_load
from robbench_plugins import datasets, lipschitz_models, models

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# --- linear-Gaussian VAE: closed form -----------------------------------------------------------
@pytest.mark.parametrize("k, s, sv", [(4, 0.5, None), (3, 0.2, [5.0, 1.0, 0.1]), (6, 1.5, [1.0] * 6)])
def test_linear_gaussian_certificate_is_the_closed_form(k, s, sv):
    model = LinearGaussianVAE(latent_dim=k, s=s, singular_values=sv)
    cert = EncoderCertifier(model)
    x = torch.rand(1, 8, 8)
    gap = probit_gap(0.99, 0.5)
    out = cert.certify(x, torch.full((k,), s), gap)
    exact = s * gap / model.sigma_max  # R_cert = s (probit(p_lo) - probit(m)) / sigma_max(A)
    assert cert.norms.lipschitz == pytest.approx(model.sigma_max, rel=1e-5)
    assert out.lipschitz == pytest.approx(model.sigma_max / s, rel=1e-5)
    for method in METHODS:
        assert out.radii[method] <= exact  # the rounding slack only ever shrinks it
        assert out.radii[method] == pytest.approx(exact, rel=2e-3)  # local: bisection to rel_tol 1e-3
    assert out.radii["lipschitz"] == pytest.approx(exact, rel=1e-5)
    assert out.radius == pytest.approx(exact, rel=1e-5) and out.status == "ok"
    # Theorem 1 (Frobenius) is below it: sigma_max <= ||A||_F
    assert s * gap / model.frobenius <= out.radius


REGIMES = {  # (latent_dim, s, w, r): p_r(x, 0) high, noise-dominated (many dims, large s), small margin
    "standard": (4, 0.5, 2.0, 4.0),
    "noise_dominated": (8, 1.5, 1.0, 5.5),
    "small_margin": (4, 0.5, 2.0, None),  # r just above the minimum r: p_r(x, 0) barely above m
    "one_dim": (1, 0.3, 3.0, 1.5),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("m", [0.5, 0.8])
def test_certified_radius_never_exceeds_the_exact_margin(regime, m):
    k, s, w, r = REGIMES[regime]
    model = LinearGaussianVAE(latent_dim=k, s=s, w=w)
    if r is None:
        r = model.exact_min_r(m) * 1.02
    p0 = model.exact_worst_probability(0.0, r)
    exact = model.exact_margin(r, m)
    out = EncoderCertifier(model).certify(torch.rand(1, 8, 8), torch.full((k,), s), probit_gap(p0, m))
    # with the exact p_r(x, 0) (the largest p_lo any sample could give) the certificate is still below
    assert p0 > m and out.status == "ok"
    assert 0.0 < out.radius <= exact
    assert out.radius > 0.1 * exact  # and not uselessly small on a linear encoder (ratios: README)


def test_certified_estimator_on_linear_gaussian_matches_closed_form_and_is_below_margin():
    model = LinearGaussianVAE()
    rows = api.evaluate(model, torch.full((3, 1, 8, 8), 0.5), estimators=["certified"],
                        estimator_params={"certified": {"samples": 20000}}).rows
    exact = model.exact_margin(4.0)
    for row in rows:
        closed = model.s * probit_gap(row["cert_p0_lo"], 0.5) / model.sigma_max
        assert row["r_cert"] == pytest.approx(closed, rel=1e-5)
        assert row["r_cert"] <= exact
        assert row["r_cert_status"] == "ok" and row["r_cert_method"] in METHODS
        assert row["cert_p0_lo"] <= row["cert_p0"] and row["r_cert_confidence"] == 0.95
        assert row["cert_seconds"] > 0


def test_vacuous_when_p_lo_is_not_above_m():
    model = LinearGaussianVAE()
    rows = api.evaluate(model, torch.full((2, 1, 8, 8), 0.5), estimators=["certified"],
                        r=0.9 * model.exact_min_r(0.5)).rows
    assert all(row["r_cert"] == 0.0 and row["r_cert_status"] == "vacuous" for row in rows)


def test_anisotropic_sigma_certificate_is_the_closed_form():
    """sigma differs per latent (analytic model with s a list; its decoder makes the margin a closed form with
    A_eff = diag(s_min / s) A): the sigma-folded bounds certify exactly the Neyman-Pearson radius
    gap / ||diag(1/s) A||_2 = s_min gap / sigma_max(A_eff), the min-sigma Lipschitz bound s_min gap / ||A||_2 is
    smaller (it ignores which latents are noisy), and all lie below the exact margin, Theorem 1 below them all."""
    model = LinearGaussianVAE(s=[0.3, 0.5, 1.0, 2.0])
    r, m = 1.02 * model.exact_min_r(0.5) * 2.0, 0.5
    p0 = model.exact_worst_probability(0.0, r)
    gap = probit_gap(p0, m)
    out = EncoderCertifier(model).certify(torch.rand(1, 8, 8), model.sigma.clone(), gap)
    folded = model.s * gap / model.sigma_max
    plain = model.s * gap / float(torch.linalg.matrix_norm(model.A.double(), ord=2))
    assert out.radii["lipschitz"] == pytest.approx(folded, rel=1e-5)
    assert out.radii["local"] == pytest.approx(folded, rel=2e-3) and out.radii["local"] <= folded
    assert out.radii["lipschitz_min_sigma"] == pytest.approx(plain, rel=1e-5) and plain < folded
    exact = model.exact_margin(r, m)
    assert out.radius <= exact and out.radius > 0.3 * exact
    assert model.exact_bound(r) <= plain  # Theorem 1: s_min probit(p0) / ||A||_F


class HalfSpaceVAE(nn.Module):
    """A VAE whose "within r" set is a half-space, so the Neyman-Pearson certificate and Theorem 1 are EXACT:
    latent 1-D, mu = a.x, sigma = s, decoder g(z) = relu(z) e_1, clean point x = 0 (mu = 0): ||g(z) - g(0)|| <= r
    iff z <= r. p_r(0, delta) = Phi((r - a.delta) / s), p_r(0, 0) = Phi(r / s), and the margin is
    s (probit(p0) - probit(m)) / ||a||, which the certificate with the exact p0 gives too; so R_cert > R exactly
    when the Clopper-Pearson lower bound p_lo exceeds p0: the certificate's stated confidence can be measured."""

    input_bounds = None

    def __init__(self, dim: int = 8, s: float = 0.5, norm_a: float = 2.0):
        super().__init__()
        self.input_shape, self.latent_dim, self.s, self.norm_a = (dim,), 1, s, norm_a
        a = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.register_buffer("a", (a / a.norm() * norm_a).float().view(1, dim))

    def encode(self, x):
        mu = x.flatten(1) @ self.a.T
        return mu, torch.full_like(mu, self.s)

    def decode(self, z):
        return torch.cat([torch.relu(z[:, :1]), torch.zeros(z.shape[0], self.input_shape[0] - 1, dtype=z.dtype)], 1)

    def log_likelihood(self, x, recon):
        return -0.5 * (x - recon).flatten(1).pow(2).sum(1)

    def encoder_mean_layers(self):
        lin = nn.Linear(self.input_shape[0], 1)
        with torch.no_grad():
            lin.weight.copy_(self.a)
            lin.bias.zero_()
        return [nn.Flatten(), lin]

    def exact_margin(self, r: float, m: float) -> float:
        return self.s * (float(special.ndtri(special.ndtr(r / self.s))) - float(special.ndtri(m))) / self.norm_a


@pytest.mark.parametrize("m, r, samples", [(0.5, 1.0, 256), (0.5, 0.05, 4096), (0.1, 0.2, 32)])
def test_certificate_and_theorem1_hold_at_their_stated_confidence_where_they_are_exact(m, r, samples):
    """On the half-space decoder (HalfSpaceVAE) the certificate is exact up to the Monte Carlo bound of p0, so
    over 400 independent streams at confidence 0.9 the count of R_cert > R is Binomial(400, q) with q <= 0.1
    (the one-sided Clopper-Pearson level): it must stay below that binomial's 99.9 % quantile (59). Reading the
    point estimate p_hat0 instead of p_lo would exceed R in about half the streams. The Theorem 1 bound (exact
    here too: J = a, min sigma = s) is held to the same. And the certificate is tight: mean R_cert / R >= 0.5."""
    from scipy import stats as sps

    model, streams, conf = HalfSpaceVAE(), 400, 0.9
    exact = model.exact_margin(r, m)
    table = api.evaluate(model, torch.zeros(streams, 8), estimators=["certified", "bound"], r=r, m=m,
                         confidence=conf, seed=1, backend="torch",
                         estimator_params={"certified": {"samples": samples},
                                           "bound": {"p0_samples": samples, "jacobian_method": "exact"}})
    r_cert = [v or 0.0 for v in table.select(estimator="certified").column("r_cert")]
    bound = [v or 0.0 for v in table.select(estimator="bound").column("bound")]
    cap = sps.binom.ppf(0.999, streams, 1 - conf)
    assert sum(v > exact * (1 + 1e-6) for v in r_cert) <= cap
    assert sum(v > exact * (1 + 1e-6) for v in bound) <= cap
    assert sum(r_cert) / streams >= 0.5 * exact


# --- building blocks ----------------------------------------------------------------------------
def test_largest_certified_returns_only_verified_radii():
    calls = []

    def bound(rho):  # not monotone: a dip at 2.5 must not be reported unless it was checked
        calls.append(rho)
        return 1.0 if 2.4 < rho < 2.6 else 2.0 * rho

    rho, _ = largest_certified(bound, 3.0, start=0.1, rho_max=10.0, rel_tol=1e-4)
    assert bound(rho) < 3.0 and rho == pytest.approx(1.5, rel=1e-3)
    assert largest_certified(lambda r: 0.0, 1.0, start=1.0, rho_max=7.0)[0] == 7.0


@pytest.mark.parametrize("shape", [(20, 7), (7, 300), (64, 64)])
def test_spectral_norm_upper_bounds(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(w, ord=2))
    svd = spectral.spectral_norm(w)
    gram = spectral.spectral_norm(w, exact_max_side=1)
    assert svd.method == "svd" and gram.method == "gram"
    assert svd.upper >= true and gram.upper >= true and gram.upper <= 1.01 * true
    assert spectral.power_iteration(w) <= true * (1 + 1e-12)
    assert spectral.small_side_norm(w) >= true


@pytest.mark.parametrize("module", [nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(), nn.ELU(2.0), nn.Softplus(),
                                    nn.Softplus(beta=3.0), nn.Sigmoid(), nn.Tanh(), nn.GELU()])
def test_activation_ranges_contain_sampled_values_and_derivatives(module):
    kind, params = activations.describe(module)
    gen = torch.Generator().manual_seed(0)
    lo = torch.randn(200, generator=gen, dtype=torch.float64) * 3
    hi = lo + torch.rand(200, generator=gen, dtype=torch.float64) * 4
    v_lo, v_hi = activations.value_range(kind, params, lo, hi)
    d_lo, d_hi = activations.derivative_range(kind, params, lo, hi)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    z = (lo[:, None] + t * (hi - lo)[:, None]).requires_grad_(True)
    y = module.double()(z)
    (dy,) = torch.autograd.grad(y.sum(), z)
    tol = 1e-9
    assert bool((y >= v_lo[:, None] - tol).all() and (y <= v_hi[:, None] + tol).all())
    assert bool((dy >= d_lo[:, None] - tol).all() and (dy <= d_hi[:, None] + tol).all())
    assert bool((y.detach() == activations.value(kind, params, z.detach())).all()) or \
        torch.allclose(y.detach(), activations.value(kind, params, z.detach()))
    assert dy.abs().max() <= activations.lipschitz(kind, params) + tol


def test_unsupported_module_is_named():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(network.UnsupportedNetwork, match="Odd"):
        network.dense_steps([nn.Flatten(), nn.Linear(4, 3), Odd()], (4,))
    with pytest.raises(network.UnsupportedNetwork, match="encoder_mean_layers"):
        network.encoder_steps(nn.Linear(2, 2))


# --- soundness: local and global bounds are never below brute force ------------------------------
def brute_force(f, x: torch.Tensor, scale: torch.Tensor, rho: float, *, directions: int = 2000,
                restarts: int = 16, steps: int = 60, seed: int = 0) -> float:
    """max ||scale * (f(x + delta) - f(x))|| over random directions on the sphere and a PGD maximiser."""
    gen = torch.Generator().manual_seed(seed)
    n = x.numel()
    f0 = f(x[None])
    d = torch.randn(directions, n, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        best = float(((f(x[None] + rho * d / d.norm(dim=1, keepdim=True)) - f0) * scale).norm(dim=1).max())
    delta = (torch.randn(restarts, n, generator=gen, dtype=torch.float64) * rho / math.sqrt(n)).requires_grad_(True)
    for _ in range(steps):
        val = ((f(x[None] + delta) - f0) * scale).norm(dim=1)
        (g,) = torch.autograd.grad(val.sum(), delta)
        with torch.no_grad():
            delta += 0.2 * rho * g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
            delta *= (rho / delta.norm(dim=1, keepdim=True)).clamp(max=1.0)
    with torch.no_grad():
        best = max(best, float(((f(x[None] + delta) - f0) * scale).norm(dim=1).max()))
    return best


def check_sound(layers, input_shape, x, scale, radii):
    steps = network.dense_steps(layers, input_shape)
    f_mod = nn.Sequential(*layers).double()

    def f(v):
        return f_mod(v.view(-1, *input_shape))

    norms = ball.layer_norms(steps)
    assert torch.allclose(network.forward(steps, x[None]), f(x[None]), atol=1e-10)
    for rho in radii:
        local = ball.local_bound(steps, x, scale, rho)
        brute = brute_force(f, x, scale, rho)
        assert local.value >= brute, (rho, local, brute)
        assert local.jacobian >= brute and local.interval >= brute
        assert ball.global_lipschitz(norms, scale) * rho >= brute


@pytest.mark.parametrize("act", [nn.ReLU, nn.ELU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.GELU, network.MaxMin])
def test_local_bound_is_never_below_brute_force_on_random_mlps(act):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(16, 12), act(), nn.Linear(12, 8), act(), nn.Linear(8, 3)]
    x = torch.rand(16, dtype=torch.float64)
    check_sound(layers, (1, 4, 4), x, torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64), [0.01, 0.1, 0.5, 2.0])


def test_local_bound_is_sound_on_a_conv_encoder():
    torch.manual_seed(1)
    layers = [nn.Conv2d(1, 3, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)]
    x = torch.rand(64, dtype=torch.float64)
    check_sound(layers, (1, 8, 8), x, torch.ones(4, dtype=torch.float64), [0.05, 0.3])


# --- trained MLP VAEs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> SplitData:
    d = datasets.load_digits(DataOptions(seed=0))
    return SplitData(d.train_x[:512], d.train_y[:512], d.test_x[:64], d.test_y[:64])


def trained(digits, tmp_path_factory, family, **params):
    fam = {f.name: f for f in [*models.families(), lipschitz_models.family()]}[family]
    p = {**{k: (v[-1] if k in fam.sweep and isinstance(v, list) else v) for k, v in fam.defaults.items()},
         "latent_dim": 3, "hidden": 32, **params}
    cache = tmp_path_factory.mktemp("cache")
    return train_or_load(fam, p, digits, TrainConfig(epochs=4, batch_size=64, seed=0), cache_dir=cache,
                         device=CPU, progress=False).model


TRAINED = [("beta_vae", {"beta": 1.0}), ("beta_vae", {"beta": 4.0, "activation": "elu"}),
           ("beta_vae", {"beta": 1.0, "activation": "tanh", "layers": 2}),
           ("lipschitz_vae", {"lipschitz": 2.0, "sigma_floor": 0.3}),
           ("lipschitz_vae", {"constraint": "spectral", "activation": "softplus"})]


@pytest.mark.parametrize("family, params", TRAINED, ids=[f"{f}-{'-'.join(map(str, p.values()))}" for f, p in TRAINED])
def test_trained_encoders_local_bound_above_brute_force(digits, tmp_path_factory, family, params):
    model = trained(digits, tmp_path_factory, family, **params)
    steps = network.encoder_steps(model)
    x = digits.test_x[:2]
    mu, sigma = model.encode(x)
    assert torch.allclose(network.forward(steps, x.flatten(1).double()), mu.double(), atol=1e-4)
    norms = ball.layer_norms(steps)
    for i in range(2):
        xi, scale = x[i].flatten().double(), 1.0 / sigma[i].double()
        for rho in (0.05, 0.3, 1.0):
            local = ball.local_bound(steps, xi, scale, rho)
            brute = brute_force(lambda v: model.encode(v.float().view(-1, *model.input_shape))[0].double(),
                                xi, scale, rho)
            # float32 model vs float64 bounds: allow float32 rounding on top of the certified value
            assert local.value * (1 + 1e-4) >= brute
            assert ball.global_lipschitz(norms, scale) * rho * (1 + 1e-4) >= brute


@pytest.mark.parametrize("family, params, r", [(*TRAINED[0], 0.42), (*TRAINED[3], 0.6)],
                         ids=["beta_vae", "lipschitz_vae"])
def test_certified_radius_below_attack_margin_for_every_point(digits, tmp_path_factory, family, params, r):
    # r a little above these small models' minimum r (~0.35-0.43), so margins sit well below the cap
    model = trained(digits, tmp_path_factory, family, **params)
    x = digits.test_x[:6]
    table = api.evaluate(model, x, attacks=["max_damage"], estimators=["margin", "certified"], r=r,
                         estimator_params={"margin": {"samples_max": 4096, "keep_adversarial": False},
                                           "certified": {"samples": 4096}})
    margin = {row["point"]: row for row in table.rows if row["estimator"] == "margin"}
    cert = {row["point"]: row for row in table.rows if row["estimator"] == "certified"}
    assert len(cert) == 6
    for point, row in cert.items():
        assert row["r_cert_status"] in ("ok", "vacuous")
        assert row["r_cert"] <= margin[point]["margin"]
        assert row["r_cert"] <= margin[point]["margin_hi"]
    assert all(margin[p]["margin"] < 9.0 for p in cert)  # not at the cap: the comparison means something
    assert sum(row["r_cert"] > 0 for row in cert.values()) >= 4


def test_lipschitz_vae_lipschitz_constant_is_what_was_asked(digits, tmp_path_factory):
    model = trained(digits, tmp_path_factory, "lipschitz_vae", lipschitz=2.5, sigma_floor=0.2)
    lip = EncoderCertifier(model).norms.lipschitz
    assert lip <= 2.5 * 1.01 and lip >= 2.5 * 0.9  # Björck: singular values ~1, the constant is used
    assert float(model.encode(digits.test_x[:8])[1].min()) >= 0.2


def test_lipschitz_vae_parameters_are_validated():
    fam = lipschitz_models.family()
    for bad, match in [({"lipschitz": 0}, "lipschitz=0"), ({"sigma_floor": -1.0}, "sigma_floor"),
                       ({"constraint": "qr"}, "constraint"), ({"hidden": 33}, "even hidden"),
                       ({"widht": 3}, "unknown parameter 'widht'")]:
        with pytest.raises(ValueError, match=match):
            fam.validate(bad)
    fam.validate({"lipschitz": [1.0, 2.0], "sigma_floor": [0.1, 0.5], "activation": "relu", "hidden": 33})


# --- leaderboard and sandwich -------------------------------------------------------------------
def _rows_with_certificates():
    from robbench.store import ResultRow

    rows = []
    for p, (margin, cert, bound) in enumerate([(2.0, 1.0, 0.5), (4.0, 1.0, None), (1.0, 0.0, 0.2)]):
        rows.append(ResultRow("m", p, "lip", 0, "max_damage", "margin", "ok",
                              {"margin": margin, "margin_lo": margin - 0.1, "margin_hi": margin + 0.1}, None, 0.1))
        rows.append(ResultRow("c", p, "lip", 0, "", "certified", "ok",
                              {"r_cert": cert, "r_cert_status": "ok" if cert else "vacuous",
                               "r_cert_method": "lipschitz" if cert else None}, None, 0.1))
        rows.append(ResultRow("b", p, "lip", 0, "", "bound", "ok", {"bound": bound}, None, 0.1))
    return rows


def test_leaderboard_shows_r_cert_beside_r_with_ratio():
    from robbench.leaderboard import leaderboard_rows, render_markdown

    (rec,) = leaderboard_rows(_rows_with_certificates())
    assert rec["r_cert_mean"] == pytest.approx(2.0 / 3)
    assert rec["r_cert_ratio"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)
    assert rec["r_cert_above_r"] == 0
    assert "mean R_cert" in render_markdown([rec]) and "R_cert/R" in render_markdown([rec])


def test_sandwich_points_summary_and_figure(tmp_path):
    from robbench.paper.sandwich import draw_sandwich, sandwich_points, summarise

    groups = sandwich_points(_rows_with_certificates())
    pts = groups["lip"]
    assert [p.margin for p in pts] == [1.0, 2.0, 4.0]  # sorted by R
    assert pts[1].r_cert == 1.0 and pts[1].bound == 0.5 and pts[2].bound is None
    s = summarise(pts)
    assert s.points == 3 and s.violations == 0 and s.vacuous == 1 and s.methods == {"lipschitz": 2}
    assert s.max_ratio == 0.5 and s.ratio == pytest.approx(0.25)
    assert draw_sandwich(groups, tmp_path / "s.png").stat().st_size > 1000


def test_lipschitz_vae_constrained_decoder_trains_samples_and_reloads(digits, tmp_path_factory):
    from robbench import montecarlo
    from robbench.plugins import get_registries
    from robbench.training import load_checkpoint_file

    fam = lipschitz_models.family()
    params = {**fam.defaults, "latent_dim": 3, "hidden": 16, "constrain_decoder": True, "constraint": "spectral"}
    cache = tmp_path_factory.mktemp("cache")
    result = train_or_load(fam, params, digits, TrainConfig(epochs=1, batch_size=64, seed=0), cache_dir=cache,
                           device=CPU, progress=False)
    model = result.model
    x = digits.test_x[:3]
    mu, sigma = model.encode(x)
    k = montecarlo.count_within(model, mu, sigma, model.decode(mu).flatten(1), 1.0, 64, seed=0, backend="torch")
    assert k.shape == (3,) and bool((k >= 0).all() and (k <= 64).all())
    again, _ = load_checkpoint_file(result.path, get_registries().models.get)
    assert torch.allclose(again.encode(x)[0], mu) and torch.allclose(again.decode(mu), model.decode(mu))


def test_censored_margins_are_left_out_of_r_cert_over_r_and_the_sandwich(tmp_path):
    """issue 13: a point still robust at the cap is stored with margin None, censored, margin_lo = cap and
    margin_hi None. R_cert/R, R_cert > R and the sandwich must neither crash on it nor count it at the cap."""
    from robbench.leaderboard import leaderboard_rows, render_markdown
    from robbench.paper.sandwich import draw_sandwich, sandwich_points, summarise
    from robbench.store import ResultRow

    rows = _rows_with_certificates()
    cap = 10.0  # point 3: certified 9.0, censored at the cap (R >= 10); at R = cap it would add 0.9 to the ratio
    rows.append(ResultRow("m", 3, "lip", 0, "max_damage", "margin", "ok",
                          {"margin": None, "margin_lo": cap, "margin_hi": None, "censored": True, "at_cap": True},
                          None, 0.1))
    rows.append(ResultRow("c", 3, "lip", 0, "", "certified", "ok",
                          {"r_cert": 9.0, "r_cert_status": "ok", "r_cert_method": "lipschitz"}, None, 0.1))
    rows.append(ResultRow("b", 3, "lip", 0, "", "bound", "ok", {"bound": 0.3}, None, 0.1))
    (rec,) = leaderboard_rows(rows)
    assert rec["r_cert_ratio"] == pytest.approx((0.5 + 0.25 + 0.0) / 3)  # the censored point is not in the ratio
    assert rec["r_cert_above_r"] == 0 and rec["censored"] == 1
    assert rec["r_cert_mean"] == pytest.approx((2.0 + 9.0) / 4)  # the certificate itself still counts
    render_markdown([rec])
    groups = sandwich_points(rows)
    pts = groups["lip"]
    assert [p.margin for p in pts] == [1.0, 2.0, 4.0, None] and pts[3].r_cert == 9.0  # censored: no R, sorted last
    s = summarise(pts)
    assert s.points == 3 and s.violations == 0 and s.ratio == pytest.approx(0.25)
    assert draw_sandwich(groups, tmp_path / "s.png").stat().st_size > 1000
