"""The registered estimators against closed forms of the linear-Gaussian VAE, plus the Hutchinson
estimator against exact Jacobians of a small nonlinear encoder."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench_plugins.analytic import LinearGaussianVAE
from robbench.jacobian import jacobian_frobenius, jacobian_frobenius_exact, jacobian_frobenius_hutchinson
from robbench.protocols import AttackResult, EstimationContext
from robbench.settings import RunSettings
from robbench_plugins import estimators as builtin

EST = {e.name: e for e in builtin.ESTIMATORS}
RUN = RunSettings()


class OracleAttack:
    name, description, defaults = "oracle", "exact worst direction", {}

    def __call__(self, model, x, radius, *, params, generator, init=None):
        delta = radius.view(-1, 1, 1, 1).to(x) * model.top_direction.view(1, *model.input_shape)
        return AttackResult(delta, radius.clone())


def ctx_for(model, name, attack=None, ids=(0, 1), **params) -> EstimationContext:
    """A context for estimator ``name``; run-wide keys among ``params`` (r, m, ...) go to ``ctx.run``."""
    est = EST[name]
    run = {k: params.pop(k) for k in list(params) if k in RunSettings.keys()}
    return EstimationContext(model=model, attack=attack, attack_params={}, params={**est.defaults, **params},
                             point_ids=torch.tensor(list(ids)), run=RUN.with_overrides(run))


def x2() -> torch.Tensor:
    return torch.full((2, 1, 8, 8), 0.5)


def test_margin_censored_at_the_cap_and_witness_retests(model):
    """max_radius below the margin: censored (no value, open interval); above it: the stored witness
    delta, tested again with fresh samples, is not r-robust."""
    from robbench.margin import estimate_probability

    exact = model.exact_margin(4.0)
    capped = EST["margin"](ctx_for(model, "margin", OracleAttack(), max_radius=0.5 * exact, tolerance=0.01), x2())
    for row in capped:
        assert row["censored"] and row["margin"] is None and row["margin_hi"] is None
        assert row["margin_lo"] == 0.5 * exact and row["witness_radius"] is None and "witness_delta" not in row
    rows = EST["margin"](ctx_for(model, "margin", OracleAttack(), samples_max=2 ** 14), x2())
    for i, row in enumerate(rows):
        delta = torch.tensor(row["witness_delta"]).view(1, *model.input_shape)
        assert row["witness_radius"] == row["margin_hi"] and row["witness_p_hi"] <= 0.5
        est = estimate_probability(model, x2()[i:i + 1], delta, r=4.0, n_samples=20000, seed=99)
        assert float(est.hi) <= 0.5 + 0.02  # near the margin p_r is close to m, and not above it


def test_registered_names_and_flags():
    from robbench.plugins import get_registries
    regs = get_registries()
    expected = {"margin": True, "bound": False, "encoder_stats": False, "min_r": False, "likelihood": True,
                "sweep": True, "probability": True, "damage": True}
    for name, needs in expected.items():
        assert regs.estimators.get(name).needs_attack is needs
    with pytest.raises(ValueError, match="tolerance"):
        EST["margin"].validate({**EST["margin"].defaults, "tolerance": 20.0})


def test_margin_estimator_rows(model):
    rows = EST["margin"](ctx_for(model, "margin", OracleAttack(), tolerance=0.02, samples_max=2 ** 14), x2())
    exact = model.exact_margin(4.0)
    assert len(rows) == 2
    for row in rows:
        assert row["margin_lo"] <= exact <= row["margin_hi"]
        assert abs(row["margin"] - exact) < 0.03
        assert isinstance(row["undecided"], bool) and row["at_cap"] is False and row["samples"] > 0
        assert row["p0"] > 0.99


def test_bound_estimator_known_answer(model):
    r = 2.5
    rows = EST["bound"](ctx_for(model, "bound", r=r, p0_samples=2 ** 14), x2())
    exact_p0 = model.exact_worst_probability(0.0, r)
    for row in rows:
        assert row["bound_status"] == "ok"
        assert row["min_sigma"] == pytest.approx(model.s)
        assert row["jacobian_frobenius"] == pytest.approx(model.frobenius, rel=1e-5)
        assert row["jacobian_method"] == "exact"
        assert row["p0_lo"] <= exact_p0  # one-sided lower confidence bound
        assert row["bound"] <= model.exact_bound(r) + 1e-9  # so the reported bound is conservative
        assert row["bound"] == pytest.approx(model.exact_bound(r), abs=0.01)
        assert row["bound_point"] == pytest.approx(model.exact_bound(r), abs=0.01)


def test_bound_vacuous_reported_as_none(model):
    rows = EST["bound"](ctx_for(model, "bound", r=0.5, p0_samples=512), x2())
    assert all(r["bound"] is None and r["bound_status"] == "vacuous_p0" for r in rows)


def test_encoder_stats(model):
    rows = EST["encoder_stats"](ctx_for(model, "encoder_stats"), x2())
    assert rows[0]["mean_sigma"] == pytest.approx(model.s) and rows[0]["min_sigma"] == pytest.approx(model.s)
    assert rows[0]["jacobian_frobenius"] == pytest.approx(model.frobenius, rel=1e-5)
    rows = EST["encoder_stats"](ctx_for(model, "encoder_stats", jacobian_method="hutchinson", jacobian_probes=256), x2())
    assert rows[0]["jacobian_method"] == "hutchinson"
    assert abs(rows[0]["jacobian_frobenius"] - model.frobenius) <= 4 * rows[0]["jacobian_stderr"]


def test_min_r_interval_contains_exact(model):
    rows = EST["min_r"](ctx_for(model, "min_r", samples=4096), x2())
    exact = model.exact_min_r(0.5)
    for row in rows:
        assert row["min_r_lo"] <= exact <= row["min_r_hi"]
        assert row["min_r_hi"] - row["min_r_lo"] < 0.1 * exact
        assert row["min_r"] == pytest.approx(exact, rel=0.05)


def test_likelihood_known_values(model):
    x = x2()
    rows = EST["likelihood"](ctx_for(model, "likelihood", OracleAttack(), radius=0.5, noise_sigma=0.0), x)
    mu, _ = model.encode(x)
    clean = model.log_likelihood(x, model.decode(mu))
    shift = model.W @ (model.A @ model.top_direction) * 0.5  # g(mu(x + delta)) - g(mu(x)) in closed form
    attacked = clean - 0.5 * shift.pow(2).sum() - (shift * (model.decode(mu).flatten(1) - x.flatten(1))).sum(1)
    for i, row in enumerate(rows):
        assert row["loglik_clean"] == pytest.approx(float(clean[i]), rel=1e-5)
        assert row["loglik_attack"] == pytest.approx(float(attacked[i]), rel=1e-4)
        assert row["degradation_attack"] == pytest.approx(abs(float(attacked[i] - clean[i])) / abs(float(clean[i])),
                                                          rel=1e-3)
        assert row["loglik_noise"] == pytest.approx(row["loglik_clean"]) and row["degradation_noise"] == 0.0
    noisy = EST["likelihood"](ctx_for(model, "likelihood", OracleAttack(), noise_sigma=0.2), x)
    assert all(r["degradation_noise"] > 0 for r in noisy)


def test_sweep_crossing_is_exact_margin_along_worst_direction(model):
    rows = EST["sweep"](ctx_for(model, "sweep", OracleAttack(), grid_max=1.2, grid_points=25, samples=4096), x2())
    exact = model.exact_margin(4.0)
    row = rows[0]
    assert len(row["sweep_norms"]) == len(row["sweep_p"]) == 25
    for t, p, lo, hi in zip(row["sweep_norms"], row["sweep_p"], row["sweep_p_lo"], row["sweep_p_hi"]):
        assert lo - 0.01 <= model.exact_worst_probability(t, 4.0) <= hi + 0.01
    assert row["sweep_crossing"] == pytest.approx(exact, abs=0.03)


def test_probability_estimator(model):
    rows = EST["probability"](ctx_for(model, "probability", OracleAttack(), radius=0.6, samples=8192), x2())
    exact = model.exact_worst_probability(0.6, 4.0)
    for row in rows:
        assert row["p_lo"] <= exact <= row["p_hi"]
        assert row["delta_norm"] == pytest.approx(0.6, rel=1e-5)


# --- Jacobian ----------------------------------------------------------------------------------
class TinyEncoder(nn.Module):
    """A nonlinear encoder (the Jacobian varies with x) meeting the encode() part of VAEModel."""

    def __init__(self, dim=30, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.input_shape, self.latent_dim = (dim,), k
        self.net = nn.Sequential(nn.Linear(dim, 40), nn.Tanh(), nn.Linear(40, 2 * k))

    def encode(self, x):
        h = self.net(x.flatten(1))
        return h[:, : self.latent_dim], nn.functional.softplus(h[:, self.latent_dim:])


def test_exact_jacobian_matches_autograd_functional():
    enc = TinyEncoder()
    x = torch.rand(6, 30, generator=torch.Generator().manual_seed(1))
    got = jacobian_frobenius_exact(enc, x)
    for b in range(6):
        jac = torch.autograd.functional.jacobian(lambda v: enc.encode(v[None])[0][0], x[b])
        assert float(got[b]) == pytest.approx(float(jac.detach().norm()), rel=1e-5)
    # chunking does not change the result
    assert torch.allclose(jacobian_frobenius_exact(enc, x, max_elements=150), got)


def test_hutchinson_within_stated_error():
    enc = TinyEncoder()
    x = torch.rand(40, 30, generator=torch.Generator().manual_seed(2))
    exact = jacobian_frobenius_exact(enc, x)
    value, stderr = jacobian_frobenius_hutchinson(enc, x, n_probes=128, generator=torch.Generator().manual_seed(3))
    z = (value - exact) / stderr
    assert (z.abs() < 4).all()  # every point within 4 standard errors
    assert float((z.abs() < 2).float().mean()) >= 0.85  # and ~95% within 2 (fixed seed)
    assert (stderr < 0.1 * exact).all()


def test_auto_choice_by_size():
    enc = TinyEncoder()
    x = torch.rand(2, 30)
    assert jacobian_frobenius(enc, x).method == "exact"
    assert jacobian_frobenius(enc, x, exact_max_elements=100).method == "hutchinson"
    assert jacobian_frobenius(enc, x, method="exact", exact_max_elements=1).method == "exact"
    with pytest.raises(ValueError):
        jacobian_frobenius(enc, x, method="bogus")
    assert math.isfinite(float(jacobian_frobenius(enc, x, method="hutchinson").stderr[0]))


def test_margin_with_real_max_damage_attack(model):
    """The built-in maximum-damage attack finds (nearly) the worst direction of the linear model: the
    upper end is a genuine witness (>= exact margin) and the estimate is within a few percent."""
    from robbench.plugins import get_registries
    attack = get_registries().attacks.get("max_damage")
    ctx = ctx_for(model, "margin", attack, tolerance=0.02, samples_max=2 ** 13)
    ctx.attack_params = dict(attack.defaults)
    rows = EST["margin"](ctx, x2())
    exact = model.exact_margin(4.0)
    for row in rows:
        assert row["margin_hi"] >= exact
        assert row["margin"] == pytest.approx(exact, rel=0.05)


@pytest.mark.slow
def test_bound_below_empirical_margin_on_trained_mnist_beta_vae(tmp_path):
    """Theorem 1 on a trained MNIST beta-VAE (beta = 1): the bound lies below the empirical margin
    (max_damage attack) for most points, and the Fig. 6 fit statistics are finite."""
    from robbench.api import evaluate
    from robbench.plugins import get_registries
    from robbench.protocols import DataOptions
    from robbench.stats import pearson_and_slope
    from robbench.training import TrainConfig, train_or_load

    regs = get_registries()
    data = regs.datasets.get("mnist").load(DataOptions(seed=0))
    family = regs.models.get("beta_vae")
    trained = train_or_load(family, {**family.defaults, "beta": 1.0}, data, TrainConfig(epochs=5),
                            cache_dir=tmp_path, device=torch.device("cpu"), progress=False)
    table = evaluate(trained.model, data.test_x[:25], attacks=["max_damage"], estimators=["margin", "bound"])
    margins = table.select(estimator="margin").column("margin")
    bounds = table.select(estimator="bound").column("bound")
    below = sum(b is not None and b <= r for b, r in zip(bounds, margins))
    assert below >= 0.8 * len(margins)
    fit = pearson_and_slope(bounds, margins)
    assert fit.n >= 20 and math.isfinite(fit.slope)


def test_damage_estimator_matches_noncentral_chi(model):
    """Route mu: ||Delta|| / (w s) is a non-central chi with k dof and non-centrality ||A delta|| / s."""
    from scipy import stats as sps

    rho = 0.3
    rows = EST["damage"](ctx_for(model, "damage", OracleAttack(), radius=rho, samples=20000), x2())
    k, s, w = model.latent_dim, model.s, model.w
    lam = (model.sigma_max * rho / s) ** 2
    expected = w * s * sps.ncx2.expect(math.sqrt, args=(k, lam))
    clean = w * s * sps.chi.mean(k)
    for row in rows:
        assert row["damage"] == pytest.approx(expected, rel=0.01)
        assert row["damage_clean"] == pytest.approx(clean, rel=0.01)
        assert row["delta_norm"] == pytest.approx(rho, rel=1e-5)
        arrays = row["_arrays"]
        assert torch.allclose(arrays["x_adv"] - arrays["x"], rho * model.top_direction.view(1, 8, 8), atol=1e-6)


def test_a_point_bound_made_infinite_by_p0_one_makes_the_mean_infinite_not_a_mean_of_the_others(model):
    """p̂0 = 1 (every sample within r) makes the point-estimate bound +inf (probit(1) = inf). Before, it was
    stored as None and the leaderboard's "mean bound (p0 point)" silently averaged the other points only: the
    main command's beta = 1 row showed 0.235, the bound of the one point out of 25 with p̂0 < 1."""
    from robbench.leaderboard import leaderboard_rows
    from robbench.store import ResultRow

    far = EST["bound"](ctx_for(model, "bound", r=50.0, p0_samples=512), x2())  # p̂0 = 1
    near = EST["bound"](ctx_for(model, "bound", r=2.5, p0_samples=2 ** 14), x2())  # p̂0 < 1: finite
    assert all(r["p0"] == 1.0 and r["bound_point"] is None for r in far)
    assert all(r["bound_point_status"] == "unbounded" for r in far)
    assert all(r["bound_point_status"] == "ok" and r["bound_point"] is not None for r in near)
    rows = [ResultRow("k", i, "m", 0, "", "bound", "ok", metrics, None, 0.1)
            for i, metrics in enumerate(far[:1] + near)]
    (rec,) = leaderboard_rows(rows)
    assert math.isinf(rec["bound_point_mean"]) and rec["bound_point_mean"] > 0
    assert math.isfinite(rec["bound_mean"]) and rec["vacuous"] == 0  # the LCB bound stays finite
    # rows stored before (no bound_point_status) must not be resumed or merged with these: the key says so
    from robbench.runner import keyed_params
    assert keyed_params(EST["bound"], dict(EST["bound"].defaults))["bound_algorithm"] == builtin.BOUND_ALGORITHM
