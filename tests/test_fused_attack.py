"""The compiled engine of max_damage (robbench::mlp_attack_step): gradient, draws, step and projection
against the torch engine's autograd path, and the engine choice."""
from __future__ import annotations

import pytest
import torch

from robbench import kernels, rng
from robbench.projection import project_ball_box
from robbench_plugins import fused_attack as fa
from robbench_plugins import models
from robbench_plugins.analytic import LinearGaussianVAE
from robbench_plugins.attacks import MaxDamageAttack, _decode_flat

pytestmark = pytest.mark.skipif(not kernels.cpp_available(), reason="compiled extension unavailable")

SHAPE = (1, 28, 28)


def _model(family=models.VAE, act="relu", layers=1, hidden=256, **extra):
    """A model of the built-ins' trained shape (784 -> hidden -> 2k, k -> hidden -> 784), random weights
    scaled up so that activations leave their linear range."""
    torch.manual_seed(0)
    m = models.build_model(family, {"activation": act, "layers": layers, "hidden": hidden}, SHAPE, **extra).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m


def _inputs(m, B=4, N=6):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((B, *SHAPE), generator=gen)
    with torch.no_grad():
        mu_c, sig_c = m.encode(x)
        center = _decode_flat(m, mu_c)
    rows = torch.tensor([0, 1, 2, 3, 1, 0][:N])
    delta = 0.05 * torch.randn((N, *SHAPE), generator=gen)
    return x, mu_c, sig_c, center, rows, delta


def _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, route):
    """The torch engine's objective (plugins/attacks.py damage) and its autograd gradient."""
    d = delta.clone().requires_grad_(True)
    mu_a, sig_a = m.encode(x[rows] + d)
    mu = mu_c[rows] if route == "sigma" else mu_a
    if eta is None:
        v = (_decode_flat(m, mu) - center[rows]).norm(dim=1)
    else:
        sig = sig_c[rows] if route == "mu" else sig_a
        z = mu.unsqueeze(0) + eta[:, rows] * sig.unsqueeze(0)
        rec = _decode_flat(m, z.reshape(-1, z.shape[-1])).view(eta.shape[0], len(rows), -1)
        v = ((rec - center[rows]).pow(2).sum(2) + 1e-12).sqrt().mean(0)
    (g,) = torch.autograd.grad(v.sum(), d, allow_unused=True)
    return v.detach(), torch.zeros_like(d) if g is None else g


CASES = [  # (family, activation, layers, route, extra)
    (models.VAE, "relu", 1, "both", {}),
    (models.VAE, "relu", 2, "mu", {"tau": 0.5}),
    (models.VAE, "elu", 1, "sigma", {}),
    (models.VAE, "gelu", 1, "both", {}),
    (models.VAE, "tanh", 2, "both", {}),
    (models.VAE, "softplus", 1, "sigma", {"tau": 0.1}),
    (models.VAE, "leaky_relu", 1, "mu", {}),
    (models.BetaTCVAE, "relu", 1, "both", {"beta": 6.0}),
    (models.FixedSigmaVAE, "relu", 1, "both", {"sigma": 0.3}),
    (models.Autoencoder, "elu", 1, "mu", {}),
]


@pytest.mark.parametrize("family,act,layers,route,extra", CASES)
def test_value_and_gradient_equal_autograd(family, act, layers, route, extra):
    m = _model(family, act, layers, **extra)
    spec = fa.fused_spec(m)
    assert spec is not None
    x, mu_c, sig_c, center, rows, delta = _inputs(m)
    op = fa.FusedObjective(spec, x, center, mu_c, sig_c, torch.full((4,), 2.0), route, (0.0, 1.0))
    eta = torch.randn(4, 4, m.latent_dim, generator=torch.Generator().manual_seed(2))
    for e in (eta, None):
        v_ref, g_ref = _autograd(m, x, mu_c, sig_c, center, rows, delta, e, route)
        v, g = op.value(rows, delta, e), op.gradient(rows, delta, e).view_as(delta)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)  # at distance 0 (sigma, eta = 0) the
        # two engines round g(mu(x)) differently
        if route == "sigma" and e is None:  # at eta = 0 sigma has no effect: no gradient on either engine
            assert float(g.abs().max()) == 0.0 and float(g_ref.abs().max()) == 0.0
            continue
        assert float(g_ref.norm()) > 0
        # fp32 rounding of differently ordered sums: relative to the gradient's norm
        assert float((g - g_ref).norm() / g_ref.norm().clamp_min(1e-30)) < 1e-4



# The op's product paths: AVX-512 small-row kernels (<= 64 rows, the default), oneDNN on packed weights,
# oneDNN on plain weights (ROBBENCH_ATTACK_SMALL / ROBBENCH_ATTACK_DNNL, read at each op call).
PRODUCT_PATHS = [{}, {"ROBBENCH_ATTACK_SMALL": "off"},
                 {"ROBBENCH_ATTACK_SMALL": "off", "ROBBENCH_ATTACK_DNNL": "plain"}]


def _set_env(monkeypatch, env):
    for name in ("ROBBENCH_ATTACK_SMALL", "ROBBENCH_ATTACK_DNNL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_packed_weights_follow_in_place_changes_and_every_row_count(monkeypatch):
    """Every product path equals autograd at 1-17 rows (4-68 decoder rows: small-row kernels, MKL at one or
    two rows, packed oneDNN above). The op packs the large weights for oneDNN once and caches the packed
    forms: a weight changed in place (even through .data, which leaves its version counter alone) must
    never be served stale, on any path."""
    m = _model()
    spec = fa.fused_spec(m)
    x, mu_c, sig_c, center, _, _ = _inputs(m)
    eta = torch.randn(4, 4, m.latent_dim, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 3, 6, 17):
        rows = torch.arange(n) % 4
        delta = 0.05 * torch.randn((n, *SHAPE), generator=gen)
        op = fa.FusedObjective(spec, x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
        v_ref, g_ref = _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, "both")
        for env in PRODUCT_PATHS:
            _set_env(monkeypatch, env)
            v, g = op.value(rows, delta, eta), op.gradient(rows, delta, eta).view_as(delta)
            torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5)
            assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4, (n, env)
    rows = torch.tensor([0, 1, 2, 3])
    delta = 0.05 * torch.randn((4, *SHAPE), generator=gen)
    enc_w, dec_w = m.encoder[1].weight, m.decoder[-2].weight  # the two packed (oneDNN) layers
    assert enc_w.numel() >= 32768 and dec_w.numel() >= 32768
    for change in (lambda w: w.data.mul_(0.5), lambda w: w.data.add_(0.01)):
        before = {}
        for i, env in enumerate(PRODUCT_PATHS):
            _set_env(monkeypatch, env)
            before[i] = fa.FusedObjective(spec, x, center, mu_c, sig_c, torch.full((4,), 2.0), "both",
                                          (0.0, 1.0)).gradient(rows, delta, eta)
        with torch.no_grad():
            change(enc_w)
            change(dec_w)
            mu_c, sig_c = m.encode(x)
            center = _decode_flat(m, mu_c)
        op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
        v_ref, g_ref = _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, "both")
        for i, env in enumerate(PRODUCT_PATHS):
            _set_env(monkeypatch, env)
            g = op.gradient(rows, delta, eta).view_as(delta)
            torch.testing.assert_close(op.value(rows, delta, eta), v_ref, rtol=1e-5, atol=1e-5)
            assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4
            assert float((g - before[i].view_as(delta)).norm() / g_ref.norm()) > 1e-3  # the change mattered


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_small_row_kernels_on_odd_shapes(monkeypatch, act):
    """The small-row kernels' edges: widths that are not multiples of their 16-float vectors or of their
    4- and 8-row / 4- and 8-output blocks (input 35, hidden 19, latent 3), from one row to past their
    64-row limit; value and gradient equal autograd, with the kernels on, off, and at a lower limit."""
    shape = (1, 5, 7)
    torch.manual_seed(0)
    m = models.build_model(models.VAE, {"activation": act, "layers": 2, "hidden": 19, "latent_dim": 3}, shape).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((5, *shape), generator=gen)
    with torch.no_grad():
        mu_c, sig_c = m.encode(x)
        center = _decode_flat(m, mu_c)
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((5,), 2.0), "both", (0.0, 1.0))
    eta = torch.randn(2, 5, 3, generator=gen)
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 33, 64, 65):
        rows = torch.arange(n) % 5
        delta = 0.1 * torch.randn((n, *shape), generator=gen)
        for e in (eta, None):
            v_ref, g_ref = _autograd(m, x, mu_c, sig_c, center, rows, delta, e, "both")
            for env in ({}, {"ROBBENCH_ATTACK_SMALL": "off"}, {"ROBBENCH_ATTACK_SMALL": "5"}):
                _set_env(monkeypatch, env)
                v, g = op.value(rows, delta, e), op.gradient(rows, delta, e).view_as(delta)
                torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)
                assert float((g - g_ref).norm() / g_ref.norm()) < 1e-4, (n, env, e is None)


def test_step_uses_the_rng_streams_and_the_exact_projection(monkeypatch):
    """A stochastic step: antithetic draws j0.. of robbench.rng (bit for bit), normalised gradient step,
    then robbench.projection.project_ball_box; the result equals the Python composition. On the fp32
    engine (ROBBENCH_ATTACK_BF16=off; the bf16 steps are checked in tests/test_attack_bf16.py)."""
    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "off")
    m = _model()
    x, mu_c, sig_c, center, rows, delta = _inputs(m)
    radius = torch.tensor([0.5, 1.0, 3.0, 0.2])
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, radius, "both", (0.0, 1.0))
    ids = torch.tensor([7, 11, 13, 17])
    keys = rng.stream_keys(123, ids)
    half, j0 = 2, 6
    e = rng.sample_normals(123, ids, half, m.latent_dim, sample_offset=j0).transpose(0, 1)
    eta = torch.cat([e, -e], 0)  # (4, B, k): what plugins/attacks.py's torch engine draws
    step_len = torch.tensor([0.1, 0.3, 1.0, 0.05, 0.2, 0.4])
    new = op.step(rows, delta, step_len, keys=keys, j0=j0, n_half=half)
    same_eta = op.step(rows, delta, step_len, eta=eta)
    assert torch.equal(new, same_eta)
    _, g = _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, "both")
    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, 1, 1, 1)
    ref = project_ball_box(delta + step_len.view(-1, 1, 1, 1) * g, x[rows], radius[rows])
    torch.testing.assert_close(new, ref, rtol=0, atol=2e-5)
    assert bool((new.flatten(1).norm(dim=1) <= radius[rows] * (1 + 1e-5)).all())
    assert bool(((x[rows] + new >= -1e-6) & (x[rows] + new <= 1 + 1e-6)).all())


@pytest.mark.parametrize("box", [(0.0, 1.0), (-1.0, 1.0)])
@pytest.mark.parametrize("d", [300, 7, 785])
def test_projection_op_equals_python(monkeypatch, box, d):
    """The op's projection (vectorised sums; ROBBENCH_ATTACK_PROJ=scalar: sequential) equals the Python
    reference, at widths with and without a partial vector at the end."""
    gen = torch.Generator().manual_seed(3)
    n = 40
    x = torch.rand(n, d, generator=gen) * (box[1] - box[0]) + box[0]
    v = torch.randn(n, d, generator=gen) * torch.logspace(-2, 1, n).view(-1, 1)
    radius = torch.rand(n, generator=gen) * 3
    radius[0] = 0.0
    ref = project_ball_box(v, x, radius, box=box)
    ours = torch.ops.robbench.project_ball_box(v, x, radius, *box)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert bool((ours.norm(dim=1) < radius * (1 + 1e-6) + 1e-7).all())
    monkeypatch.setenv("ROBBENCH_ATTACK_PROJ", "scalar")
    torch.testing.assert_close(torch.ops.robbench.project_ball_box(v, x, radius, *box), ours, rtol=0, atol=1e-6)


def test_the_compiled_attack_matches_the_torch_engine():
    """The whole converged attack on both engines: the same delta up to float rounding (a small MLP VAE,
    warm start and cold start)."""
    torch.manual_seed(0)
    m = models.build_model(models.VAE, {"hidden": 32, "latent_dim": 4}, (1, 8, 8)).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    radius = torch.tensor([0.5, 1.0, 1.5, 0.0, 2.0])
    attack = MaxDamageAttack()
    out = {}
    for engine in ("torch", "compiled"):
        cold = attack(m, x, radius, params={"engine": engine, "steps": 12, "presolve_steps": 12},
                      generator=torch.Generator().manual_seed(5))
        warm = attack(m, x, radius * 1.1, params={"engine": engine, "warm_presolve_steps": 8, "warm_refine_steps": 8},
                      generator=torch.Generator().manual_seed(6), init=cold.delta, init_radius=radius)
        out[engine] = (cold, warm)
    for a, b in zip(out["torch"], out["compiled"]):
        torch.testing.assert_close(a.damage, b.damage, rtol=2e-3, atol=1e-5)
        assert float((a.delta - b.delta).norm()) <= 0.02 * float(a.delta.norm())


def test_engine_choice():
    attack = MaxDamageAttack()
    lg = LinearGaussianVAE((1, 4, 4), 2)
    x = torch.rand(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    assert fa.fused_spec(lg) is None
    assert fa.resolve_engine("auto", lg, x) is None
    with pytest.raises(ValueError, match="not a supported MLP VAE"):
        attack(lg, x, torch.ones(2), params={"engine": "compiled"}, generator=gen)
    attack(lg, x, torch.ones(2), params={"engine": "auto", "steps": 2, "presolve_steps": 2}, generator=gen)
    mlp = models.build_model(models.VAE, {"hidden": 16, "latent_dim": 2}, (1, 4, 4))
    assert fa.resolve_engine("auto", mlp, x) is not None
    assert fa.resolve_engine("torch", mlp, x) is None
    assert fa.resolve_engine("auto", mlp, x.double()) is None
    with pytest.raises(ValueError, match="default optimiser only"):
        attack(mlp, x, torch.ones(2), params={"engine": "compiled", "eta_redraw": False}, generator=gen)
    with pytest.raises(ValueError, match="engine"):
        fa.resolve_engine("fast", mlp, x)


def test_unsupported_networks_fall_back():
    conv = models.build_model(models.VAE, {"architecture": "conv", "conv_channels": [4], "hidden": 8}, (3, 8, 8))
    assert fa.fused_spec(conv) is None
    odd = models.build_model(models.VAE, {"hidden": 8, "latent_dim": 2}, (1, 4, 4))
    odd.encoder[2] = torch.nn.LeakyReLU(0.2)  # not the default slope the op hard-codes
    assert fa.fused_spec(odd) is None

    class OwnEncode(models.VAE):  # a subclass with its own encode: the op cannot know what it does
        def encode(self, x):
            mu, sig = super().encode(x)
            return mu * 2, sig

    own = models.build_model(OwnEncode, {"hidden": 8, "latent_dim": 2}, (1, 4, 4))
    assert fa.fused_spec(own) is None


@pytest.mark.parametrize("stochastic,stall_tol", [(False, 0.0), (True, 0.0), (True, 1e-3)])
def test_the_op_loop_equals_stall_ascent_on_the_op_steps(monkeypatch, stochastic, stall_tol):
    """robbench::mlp_stall_ascent (the whole loop in C++) makes exactly the decisions of
    robbench.projection.stall_ascent driven by the same op's steps and scores. One row group (the split
    across threads is tested below): the Python loop calls the op on all active rows at once, and a row's
    last bits can depend on which rows share its call."""
    from robbench.projection import stall_ascent

    monkeypatch.setenv("ROBBENCH_ATTACK_SPLIT", "off")

    m = _model(hidden=64)
    B = 4
    x, mu_c, sig_c, center, _, _ = _inputs(m, B=B)
    radius = torch.tensor([0.5, 1.0, 2.0, 3.0])
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, radius, "both", (0.0, 1.0))
    gen = torch.Generator().manual_seed(8)
    starts = [0.3 * torch.randn((B, *SHAPE), generator=gen) for _ in range(2)]
    keys = rng.stream_keys(5, torch.arange(B)) if stochastic else None
    half = 2 if stochastic else 0
    eval_eta = torch.randn(8, B, m.latent_dim, generator=gen) if stochastic else None
    knobs = {"steps": 30, "step_size": torch.tensor([0.5, 0.25, 0.1, 0.05]), "check_every": 3,
             "stall_tol": stall_tol, "min_step": 0.01}

    def step(rows, d, step_len, i):
        return op.step(rows, d, step_len, keys=keys, j0=i * half, n_half=half)

    for per_start in (True, False):
        ref = stall_ascent(None, lambda rows, d: op.value(rows, d, eval_eta), x, radius, starts,
                           stepper=step, per_start=per_start, **knobs)
        ours = op.stall_ascent(starts, keys=keys, n_half=half, eval_eta=eval_eta, per_start=per_start, **knobs)
        assert torch.equal(ours[1], ref[1])
        assert torch.equal(ours[0], ref[0])


def test_models_in_the_harness_wrapper_run_on_the_compiled_engine():
    """Every run wraps its model in robbench.checks.CheckedModel; the compiled engine must still see the
    MLP VAE inside (it once did not, so runs silently took the torch engine)."""
    from robbench.api import evaluate
    from robbench.checks import checked

    torch.manual_seed(0)
    m = models.build_model(models.VAE, {"hidden": 32, "latent_dim": 4}, (1, 8, 8)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)  # sensitive, so the margins lie inside (0, max_radius)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert fa.resolve_engine("auto", checked(m), x) is not None
    before = fa.ROWS["decode"]
    out = evaluate(m, x, attacks=["max_damage"], estimators=["margin"], r=2.0,
                   estimator_params={"margin": {"samples_max": 1024}})
    assert fa.ROWS["decode"] > before
    assert all(0.0 < v < 10.0 for v in out.column("margin"))


def _stall_op_args(op, starts, keys, n_half, eval_eta, steps=24, step_size=0.3):
    """robbench::mlp_stall_ascent's arguments for these starts (as FusedObjective.stall_ascent builds them)."""
    B, R = op.x.shape[0], len(starts)
    delta = project_ball_box(torch.cat(starts, 0).flatten(1), op.x.repeat(R, 1), op.radius.repeat(R), box=op.box)
    s = op.spec
    return [op.x, delta, torch.arange(B).repeat(R), op.center, op.mu_c, op.sig_c, eval_eta, *keys, n_half, *s.enc,
            *s.dec, op.route, s.sigma_kind, s.sigma_offset, op.radius, torch.full((R * B,), step_size), steps, 3,
            1e-3, 0.02, *op.box]


def _split_problem(B=8, R=2):
    m = _model(hidden=64)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand((B, *SHAPE), generator=gen)
    with torch.no_grad():
        mu_c, sig_c = m.encode(x)
        center = _decode_flat(m, mu_c)
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.linspace(0.5, 3.0, B), "both", (0.0, 1.0))
    starts = [0.3 * torch.randn((B, *SHAPE), generator=gen) for _ in range(R)]
    # 2 antithetic draws per step and 4 scoring draws: decoder products on <= 64 rows (small-row kernels)
    return op, starts, rng.stream_keys(5, torch.arange(B)), 2, torch.randn(4, B, m.latent_dim, generator=gen)


def test_stall_loop_row_groups_run_the_whole_loop_independently(monkeypatch, two_threads):
    """At 2 threads mlp_stall_ascent splits its rows into 2 groups, each running the whole loop on its own
    thread: the result is exactly the two halves run as separate one-group calls, and the one-group run on
    all rows up to float rounding (a row's last bits can depend on the other rows of its call)."""
    op, starts, keys, half, eval_eta = _split_problem()
    args = _stall_op_args(op, starts, keys, half, eval_eta)
    M = args[1].shape[0]
    stall = torch.ops.robbench.mlp_stall_ascent
    best, val, counts = stall(*args)
    assert counts.tolist()[2] == 2
    monkeypatch.setenv("ROBBENCH_ATTACK_SPLIT", "off")
    halves = []
    for a, b in ((0, M // 2), (M // 2, M)):
        part = list(args)
        part[1], part[2], part[20] = args[1][a:b], args[2][a:b], args[20][a:b]
        halves.append(stall(*part))
    assert all(h[2].tolist()[2] == 1 for h in halves)
    assert torch.equal(best, torch.cat([h[0] for h in halves]))
    assert torch.equal(val, torch.cat([h[1] for h in halves]))
    assert counts[:2].tolist() == (halves[0][2] + halves[1][2])[:2].tolist()
    one = stall(*args)
    assert one[2].tolist()[2] == 1
    assert torch.allclose(val, one[1], rtol=1e-5, atol=0) and torch.allclose(best, one[0], rtol=0, atol=1e-5)
    assert torch.equal(counts[:2], one[2][:2])  # the same stall decisions


def test_the_split_switch_and_threshold(monkeypatch, two_threads):
    """ROBBENCH_ATTACK_SPLIT=off keeps one group; =<n> asks n rows per group; the default splits from 8 rows
    (4 per group), at every thread count (one intra-op thread runs the groups one after another). The
    groups in use are the op's third count."""
    op, starts, keys, half, eval_eta = _split_problem(B=3, R=2)  # 6 rows: below the default threshold
    small = _stall_op_args(op, starts, keys, half, eval_eta, steps=4)
    op, starts, keys, half, eval_eta = _split_problem(B=4, R=2)  # 8 rows
    args = _stall_op_args(op, starts, keys, half, eval_eta, steps=4)
    stall = torch.ops.robbench.mlp_stall_ascent
    assert stall(*small)[2].tolist()[2] == 1
    assert stall(*args)[2].tolist()[2] == 2
    for env, groups in (("off", 1), ("5", 1), ("2", 2), ("1", 2)):
        monkeypatch.setenv("ROBBENCH_ATTACK_SPLIT", env)
        assert stall(*args)[2].tolist()[2] == groups, env
    torch.set_num_threads(1)
    assert stall(*args)[2].tolist()[2] == 2
    monkeypatch.delenv("ROBBENCH_ATTACK_SPLIT")
    assert stall(*args)[2].tolist()[2] == 2
    assert stall(*small)[2].tolist()[2] == 1


def test_the_op_gives_the_same_bits_at_one_and_two_threads(monkeypatch, two_threads):
    """The row groups do not depend on the thread count, so mlp_stall_ascent's result is bit for bit the
    same at 1 and 2 intra-op threads (session 9: groups were one per thread, and a row's last bits depend on
    the other rows of its products, so --threads 1 and 2 gave different attacks and margins). The second
    half checks that this problem can tell: one group (the old one-thread partition) differs in its bits."""
    op, starts, keys, half, eval_eta = _split_problem(B=16, R=2)
    args = _stall_op_args(op, starts, keys, half, eval_eta)
    stall = torch.ops.robbench.mlp_stall_ascent
    best2, val2, counts2 = stall(*args)
    torch.set_num_threads(1)
    best1, val1, counts1 = stall(*args)
    assert torch.equal(best1, best2) and torch.equal(val1, val2) and torch.equal(counts1, counts2)
    monkeypatch.setenv("ROBBENCH_ATTACK_SPLIT", "off")
    one = stall(*args)
    assert not (torch.equal(one[0], best1) and torch.equal(one[1], val1))
