"""The compiled attack's bf16 products (``ROBBENCH_ATTACK_BF16``, csrc/cpu/attack_cpu.cpp): the large
layers' products (>= 32768 weights) of the ascent steps in bf16 with fp32 accumulation and output
(Bf16Product), every objective value in fp32.

Checked: with ``all`` the op's value and gradient equal a float64 reference computed on the bf16-rounded
operands (inputs, weights and back-propagated gradients of the large layers rounded to bf16) to fp32
accumulation error, and differ from the fp32 engine by far more (so the products really are bf16 and
really are right); ``steps`` (the default) makes the steps from that gradient but returns fp32 values,
and the stall loop's best iterate is scored in fp32; ``off`` is the fp32 engine; the whole attack with
bf16 steps reaches the fp32 attack's damage.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robbench import rng
from robbench.projection import project_ball_box
from robbench_plugins import fused_attack as fa
from robbench_plugins.attacks import MaxDamageAttack

from test_fused_attack import SHAPE, _autograd, _inputs, _model

pytestmark = pytest.mark.skipif(not fa.available(), reason="compiled extension unavailable")

LARGE = 32768  # kDnnlMinWeights: layers with at least this many weights take the bf16 products


def _brgemm_usable() -> bool:
    """True where the bf16 product can run here (AVX512-BF16 and oneDNN's brgemm): else the op keeps fp32."""
    try:
        hb, wt = torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(32, 16, dtype=torch.bfloat16)
        torch.ops.robbench.bf16_product(hb, wt)
        return True
    except RuntimeError:
        return False


needs_brgemm = pytest.mark.skipif(not _brgemm_usable(), reason="brgemm bf16 product unusable on this CPU")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to fp32 (the op's values are fp32), then to bf16 (RNE), as float64."""
    return t.float().to(torch.bfloat16).double()


class _Bf16Linear(torch.autograd.Function):
    """x ŵ^T + b on bf16-rounded x and w, in float64; backward: bf16(g) ŵ (the op's backward product)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        return _bf16(x) @ _bf16(w).T + b

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return _bf16(g) @ _bf16(w), None, None


def _run(seq: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    for mod in seq:
        if isinstance(mod, nn.Linear) and mod.weight.numel() >= LARGE:
            h = _Bf16Linear.apply(h, mod.weight, mod.bias)
        else:
            h = mod(h)
    return h


def _bf16_reference(m, spec, x, center, rows, delta, eta):
    """The objective (route both, draws eta (S, B, k)) and its gradient in float64 with the large layers'
    products on bf16 operands: (N,), (N, *shape)."""
    md = copy.deepcopy(m).double()
    d = delta.double().clone().requires_grad_(True)
    out = _run(md.encoder, x[rows].double() + d)
    k = m.latent_dim
    mu, sig = out[:, :k], nn.functional.softplus(out[:, k:]) + spec.sigma_offset
    z = mu.unsqueeze(0) + eta[:, rows].double() * sig.unsqueeze(0)
    rec = _run(md.decoder, z.reshape(-1, k)).view(eta.shape[0], len(rows), -1)
    v = ((rec - center[rows].double()).pow(2).sum(2) + 1e-12).sqrt().mean(0)
    (g,) = torch.autograd.grad(v.sum(), d)
    return v.detach(), g


def _problem():
    m = _model()  # 784 -> 256 -> 20, 10 -> 256 -> 784: both 256 x 784 layers are large
    assert m.encoder[1].weight.numel() >= LARGE and m.decoder[-2].weight.numel() >= LARGE
    x, mu_c, sig_c, center, rows, delta = _inputs(m)
    eta = torch.randn(4, 4, m.latent_dim, generator=torch.Generator().manual_seed(2))
    return m, x, mu_c, sig_c, center, rows, delta, eta


def test_switch_values(monkeypatch):
    m, x, mu_c, sig_c, center, rows, delta, eta = _problem()
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "bogus")
    with pytest.raises(RuntimeError, match="ROBBENCH_ATTACK_BF16 must be steps, off or all"):
        op.value(rows, delta, eta)


@needs_brgemm
def test_bf16_products_equal_the_bf16_operand_reference(monkeypatch):
    """``all``: value and gradient equal the float64 reference on bf16 operands (the rest is fp32
    accumulation: <= 1e-5 here), and are 100x farther from the fp32 engine's; ``off`` and ``steps`` give the
    fp32 value and gradient (mode 1 stays fp32 in ``steps``)."""
    m, x, mu_c, sig_c, center, rows, delta, eta = _problem()
    spec = fa.fused_spec(m)
    op = fa.FusedObjective(spec, x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
    v_ref, g_ref = _bf16_reference(m, spec, x, center, rows, delta, eta)
    v32, g32 = _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, "both")
    out = {}
    for mode in ("off", "steps", "all"):
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", mode)
        out[mode] = op.value(rows, delta, eta), op.gradient(rows, delta, eta).view_as(delta)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    v, g = out["all"]
    assert float(((v.double() - v_ref) / v_ref).abs().max()) < 1e-5
    assert rel(g, g_ref) < 1e-5
    assert float(((v - v32) / v32).abs().max()) > 1e-4 and rel(g, g32) > 1e-3  # bf16 really ran
    for mode in ("off", "steps"):
        v, g = out[mode]
        torch.testing.assert_close(v, v32, rtol=1e-5, atol=1e-5)
        assert rel(g, g32) < 1e-4


@needs_brgemm
def test_steps_use_the_bf16_gradient_and_off_the_fp32_one(monkeypatch):
    """A stochastic step under ``steps`` is the normalised bf16 gradient step (``all``'s gradient), projected;
    under ``off`` the fp32 one; the two differ."""
    m, x, mu_c, sig_c, center, rows, delta, _ = _problem()
    radius = torch.tensor([0.5, 1.0, 3.0, 0.2])
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, radius, "both", (0.0, 1.0))
    ids = torch.tensor([7, 11, 13, 17])
    keys = rng.stream_keys(123, ids)
    e = rng.sample_normals(123, ids, 2, m.latent_dim, sample_offset=6).transpose(0, 1)
    eta = torch.cat([e, -e], 0)
    step_len = torch.tensor([0.1, 0.3, 1.0, 0.05, 0.2, 0.4])
    new = {}
    for mode, grad_mode in (("steps", "all"), ("off", "off")):
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", mode)
        new[mode] = op.step(rows, delta, step_len, keys=keys, j0=6, n_half=2)
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", grad_mode)
        g = op.gradient(rows, delta, eta).view_as(delta)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, 1, 1, 1)
        ref = project_ball_box(delta + step_len.view(-1, 1, 1, 1) * g, x[rows], radius[rows])
        torch.testing.assert_close(new[mode], ref, rtol=0, atol=2e-5)
    assert float((new["steps"] - new["off"]).abs().max()) > 1e-3


@needs_brgemm
def test_the_stall_loop_scores_its_best_iterate_in_fp32(monkeypatch):
    """Under ``steps`` the stall loop's returned scores are the fp32 objective of the returned iterates (the
    choice of the best iterate is made on fp32 values); under ``all`` they are the bf16 ones, which differ."""
    monkeypatch.setenv("ROBBENCH_ATTACK_SPLIT", "off")
    m, x, mu_c, sig_c, center, _, _, _ = _problem()
    B = 4
    radius = torch.tensor([0.5, 1.0, 2.0, 3.0])
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, radius, "both", (0.0, 1.0))
    gen = torch.Generator().manual_seed(8)
    starts = [0.3 * torch.randn((B, *SHAPE), generator=gen) for _ in range(2)]
    eval_eta = torch.randn(8, B, m.latent_dim, generator=gen)
    knobs = {"steps": 12, "step_size": 0.3, "check_every": 3, "stall_tol": 0.0, "min_step": 0.01}
    keys = rng.stream_keys(5, torch.arange(B))
    all_rows = torch.arange(B)
    for mode in ("steps", "all"):
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", mode)
        best, val = op.stall_ascent(starts, keys=keys, n_half=2, eval_eta=eval_eta, **knobs)
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "off")
        fp32 = op.value(all_rows, best, eval_eta)
        if mode == "steps":
            torch.testing.assert_close(val, fp32, rtol=1e-6, atol=0)
        else:
            assert float(((val - fp32) / fp32).abs().max()) > 1e-5


@needs_brgemm
def test_the_attack_with_bf16_steps_reaches_the_fp32_attacks_objective(monkeypatch):
    """The whole default max_damage attack (compiled engine, trained shape, weights scaled up so that the
    bf16 gradient is 6% off the fp32 one): the expected distance it maximises, on 512 common draws in fp32,
    is within 2% of the fp32 attack's on every point (another seed of the fp32 attack moves it 1.3%) and far
    above a random direction's."""
    m = _model()
    x = torch.rand((4, *SHAPE), generator=torch.Generator().manual_seed(4))
    radius = torch.tensor([0.5, 1.0, 2.0, 3.0])
    with torch.no_grad():
        mu_c, sig_c = m.encode(x)
        center = m.decode(mu_c).flatten(1)
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, radius, "both", (0.0, 1.0))
    eta = torch.randn(512, 4, m.latent_dim, generator=torch.Generator().manual_seed(9))
    rows = torch.arange(4)
    attack = MaxDamageAttack()
    objective = {}
    for mode in ("off", "steps"):
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", mode)
        delta = attack(m, x, radius, params={"engine": "compiled"}, generator=torch.Generator().manual_seed(5)).delta
        monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "off")
        objective[mode] = op.value(rows, delta.flatten(1), eta)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * radius.view(-1, 1, 1, 1)
    random = op.value(rows, ((x + noise).clamp(0, 1) - x).flatten(1), eta)
    assert bool((objective["steps"] >= 0.98 * objective["off"]).all()), (objective["steps"], objective["off"])
    assert float(objective["steps"].mean()) >= 0.995 * float(objective["off"].mean())
    assert bool((objective["steps"] - random > 0.5 * (objective["off"] - random)).all())


@needs_brgemm
@pytest.mark.parametrize("config", ["k24_close_top_singular_values", "k32_s1"])
def test_known_answer_through_the_bf16_steps(monkeypatch, config):
    """The two noise-dominated linear-Gaussian known answers (tests/test_fused_attack_known_answer.py) on
    1536-pixel inputs, so that both linear layers are large (36864 / 49152 weights) and every ascent step's
    products run in bf16: every point's margin within 2% of the closed form, the mean within 0.5%."""
    from robbench.protocols import EstimationContext
    from robbench.settings import RunSettings
    from robbench_plugins.analytic import LinearGaussianVAE
    from test_fused_attack_known_answer import MARGIN, as_mlp_vae
    from test_margin_known_answer import CONFIGS

    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "steps")
    kwargs, r = CONFIGS[config]
    exact_model = LinearGaussianVAE(**kwargs, input_shape=(1, 32, 48))
    model = as_mlp_vae(exact_model)
    assert model.encoder[1].weight.numel() >= LARGE and model.decoder[0].weight.numel() >= LARGE
    exact = exact_model.exact_margin(r)
    assert exact * float(exact_model.top_direction.abs().max()) < 0.5  # the pixel box does not bind
    streams = 32
    attack = MaxDamageAttack()
    ctx = EstimationContext(model=model, attack=attack, attack_params={**attack.defaults, "engine": "compiled"},
                            params={**MARGIN.defaults, "keep_adversarial": False}, point_ids=torch.arange(streams),
                            run=RunSettings(r=r, m=0.5, confidence=0.95, backend="auto", seed=0))
    before, threads = fa.ROWS["decode"], torch.get_num_threads()
    torch.set_num_threads(1)  # one row group: the same run on every machine
    try:
        rows = MARGIN(ctx, torch.full((streams, *model.input_shape), 0.5))
    finally:
        torch.set_num_threads(threads)
    assert fa.ROWS["decode"] > before  # the attack ran in the op
    errors = torch.tensor([row["margin"] / exact - 1.0 for row in rows])
    assert float(errors.abs().max()) <= 0.02, (float(errors.mean()), float(errors.abs().max()))
    assert abs(float(errors.mean())) <= 0.005
    covered = sum(row["margin_lo"] <= exact <= row["margin_hi"] for row in rows)
    assert covered >= 0.95 * len(rows) - 1


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_mkldnn_disabled_keeps_fp32(monkeypatch):
    """With torch.backends.mkldnn disabled brgemm is unusable: even ``all`` then runs every product in fp32
    (no error), and the bf16 products come back once it is enabled again. The large weights are new to the
    process (scaled by 1 + 2^-10), so the first lookup of their products happens while mkldnn is disabled:
    that refusal must not be cached."""
    m, x, mu_c, sig_c, center, rows, delta, eta = _problem()
    with torch.no_grad():
        for w in (m.encoder[1].weight, m.decoder[-2].weight):
            w.mul_(1.0 + 2.0 ** -10)
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
    v32, g32 = _autograd(m, x, mu_c, sig_c, center, rows, delta, eta, "both")
    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "all")
    with torch.backends.mkldnn.flags(enabled=False):
        v, g = op.value(rows, delta, eta), op.gradient(rows, delta, eta).view_as(delta)
    torch.testing.assert_close(v, v32, rtol=1e-5, atol=1e-5)
    assert float((g - g32).norm() / g32.norm()) < 1e-4
    if _brgemm_usable():
        assert float(((op.value(rows, delta, eta) - v32) / v32).abs().max()) > 1e-4


SHAPE_ODD = (1, 29, 31)  # 899 pixels: no product dimension a multiple of 16


def _odd_model(kind: str):
    """Small-width models whose large layers (>= LARGE weights) have odd K and P (899 / 37 / 181 / 200 / 40),
    the bf16 epilogue's activations fused (relu, sigmoid) or not (identity, tanh), both sigma routes:
    A: relu hidden (fused, 899 -> 37), identity last decoder layer (37 -> 899); B: a one-layer encoder whose
    bf16 output is [mu | softplus pre] (899 -> 40), sigmoid hidden (fused, 181 -> 200) and sigmoid last;
    C: FixedSigmaVAE (sigma_kind 1), tanh hidden (not fused, 899 -> 37), relu last (fused, 37 -> 899)."""
    from robbench_plugins import models

    torch.manual_seed(3)
    flat, D = nn.Flatten(), 899
    if kind == "A":
        m = models.VAE(SHAPE_ODD, 3, nn.Sequential(flat, nn.Linear(D, 37), nn.ReLU(), nn.Linear(37, 6)),
                       nn.Sequential(nn.Linear(3, 37), nn.ReLU(), nn.Linear(37, D)), nn.Identity())
    elif kind == "B":
        m = models.VAE(SHAPE_ODD, 20, nn.Sequential(flat, nn.Linear(D, 40)),
                       nn.Sequential(nn.Linear(20, 181), nn.Sigmoid(), nn.Linear(181, 200), nn.Sigmoid(),
                                     nn.Linear(200, D), nn.Sigmoid()), nn.Identity(), tau=0.2)
    else:
        m = models.FixedSigmaVAE(SHAPE_ODD, 3, nn.Sequential(flat, nn.Linear(D, 37), nn.Tanh(), nn.Linear(37, 3)),
                                 nn.Sequential(nn.Linear(3, 37), nn.ELU(), nn.Linear(37, D), nn.ReLU()),
                                 nn.Identity(), sigma=0.4)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m.eval()


def _odd_reference(m, x, center, rows, delta, eta):
    """As _bf16_reference for any of _odd_model's models, and eta None (the mean-decoder distance)."""
    from robbench_plugins import models

    md = copy.deepcopy(m).double()
    d = delta.double().clone().requires_grad_(True)
    out = _run(md.encoder, x[rows].double() + d)
    k = m.latent_dim
    if isinstance(m, models.FixedSigmaVAE):
        mu, sig = out, (md.log_sigma.exp() + md.tau).expand_as(out)
    else:
        mu, sig = out[:, :k], nn.functional.softplus(out[:, k:]) + models.SIGMA_EPS + md.tau
    if eta is None:
        v = (_run(md.decoder, mu) - center[rows].double()).norm(dim=1)
    else:
        z = mu.unsqueeze(0) + eta[:, rows].double() * sig.unsqueeze(0)
        rec = _run(md.decoder, z.reshape(-1, k)).view(eta.shape[0], len(rows), -1)
        v = ((rec - center[rows].double()).pow(2).sum(2) + 1e-12).sqrt().mean(0)
    (g,) = torch.autograd.grad(v.sum(), d)
    return v.detach(), g


@needs_brgemm
@pytest.mark.parametrize("kind", ["A", "B", "C"])
def test_bf16_products_on_odd_shapes_one_row_and_row_tails(monkeypatch, kind):
    """``all`` on layers whose K and P are no multiples of 16 / 64, on 1 row and on 70 encoder rows (70 and
    210 decoder rows: a 64-row tile plus a tail), with and without draws: value and gradient per row against
    the float64 reference on bf16 operands. An fp32 value that lies within an ulp or so of a bf16 rounding
    midpoint can round the other way in the op than in the reference (shown for one row at 1 % of a small
    distance, reproduced exactly by flipping that one operand); so every row is held to 1 % (value) / 5 %
    (gradient), the typical row (median) to 1e-5 / 1e-4, while the fp32 engine's typical row is farther."""
    m = _odd_model(kind)
    B = 5
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((B, *SHAPE_ODD), generator=gen)
    with torch.no_grad():
        mu_c, sig_c = m.encode(x)
        center = m.decode(mu_c).flatten(1)
    op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((B,), 2.0), "both", (0.0, 1.0))
    for rows in (torch.tensor([2]), torch.arange(70) % B):
        delta = 0.2 * torch.randn((len(rows), *SHAPE_ODD), generator=gen)
        for eta in (None, torch.randn(3, B, m.latent_dim, generator=gen)):
            v_ref, g_ref = _odd_reference(m, x, center, rows, delta, eta)
            err = {}
            for mode in ("all", "off"):
                monkeypatch.setenv("ROBBENCH_ATTACK_BF16", mode)
                v, g = op.value(rows, delta, eta), op.gradient(rows, delta, eta).view_as(delta)
                ev = ((v.double() - v_ref) / v_ref).abs()
                eg = (g.double() - g_ref).flatten(1).norm(dim=1) / g_ref.flatten(1).norm(dim=1)
                err[mode] = ev, eg
            ev, eg = err["all"]
            assert float(ev.max()) < 1e-2 and float(eg.max()) < 5e-2, (len(rows), eta is None, ev.max(), eg.max())
            assert float(ev.median()) < 1e-5 and float(eg.median()) < 1e-4, (ev.median(), eg.median())
            assert float(err["off"][1].median()) > 10 * float(eg.median())  # the bf16 products really ran


@needs_brgemm
def test_a_weight_changed_in_place_is_not_served_stale(monkeypatch):
    """The bf16 products are cached by the weight's contents: after an in-place change of both large weights
    (same tensors, same addresses, as an optimiser step does) the op's bf16 value and gradient are those of
    the new weights, not the old ones."""
    m, x, mu_c, sig_c, center, rows, delta, eta = _problem()
    spec = fa.fused_spec(m)  # holds the model's weight tensors themselves (no copies)
    op = fa.FusedObjective(spec, x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "all")
    before = op.value(rows, delta, eta)
    large = (m.encoder[1].weight, m.decoder[-2].weight)
    assert spec.enc[0][0].data_ptr() == large[0].data_ptr() and spec.dec[0][-1].data_ptr() == large[1].data_ptr()
    with torch.no_grad():
        for w in large:
            w.mul_(0.75)
    v_ref, g_ref = _bf16_reference(m, spec, x, center, rows, delta, eta)
    v, g = op.value(rows, delta, eta), op.gradient(rows, delta, eta).view_as(delta)
    assert float(((v.double() - v_ref) / v_ref).abs().max()) < 1e-5
    assert float((g.double() - g_ref).norm() / g_ref.norm()) < 1e-3  # (5e-5 here: bf16 rounding-tie flips)
    assert float(((v - before) / before).abs().max()) > 1e-2


@needs_brgemm
def test_concurrent_calls_share_the_product_cache(monkeypatch):
    """Op calls from 4 Python threads at once (the op releases the GIL) on 9 models, 18 large weights: more
    than the cache keeps (kKeep = 16), so products are made and evicted while other threads hold and run
    theirs. Every value and gradient equals the serial call's bit for bit (without the cache's lock this
    failed, with shape errors or heap corruption, in 6 of 6 runs)."""
    import threading

    monkeypatch.setenv("ROBBENCH_ATTACK_BF16", "all")
    probs = []
    for i in range(9):
        m = _model()
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.0 + 0.01 * i)
        x, mu_c, sig_c, center, rows, delta = _inputs(m)
        eta = torch.randn(4, 4, m.latent_dim, generator=torch.Generator().manual_seed(i))
        op = fa.FusedObjective(fa.fused_spec(m), x, center, mu_c, sig_c, torch.full((4,), 2.0), "both", (0.0, 1.0))
        probs.append((op, rows, delta, eta))

    def work(i):
        op, rows, delta, eta = probs[i]
        return op.value(rows, delta, eta), op.gradient(rows, delta, eta)

    serial = [work(i) for i in range(9)]
    failures: list[str] = []

    def runner(t: int) -> None:
        try:
            for it in range(12):
                for i in (range(t, 9, 4) if it % 2 == 0 else range(8 - t, -1, -4)):
                    if not all(torch.equal(a, b) for a, b in zip(work(i), serial[i])):
                        failures.append(f"thread {t} model {i}: differs")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=runner, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures
