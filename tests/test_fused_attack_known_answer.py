"""Known answers through the compiled attack engine (``max_damage`` ``engine: compiled``).

tests/test_margin_known_answer.py runs the linear-Gaussian VAE, which the compiled op does not support
(it is not an ``nn.Sequential`` MLP VAE), so those runs take the torch engine. Here the same two
noise-dominated configurations are rebuilt as a built-in :class:`FixedSigmaVAE` whose encoder is
Flatten + Linear(A, c) and whose decoder is Linear(W, b), with sigma = s: the very same model in the op's
supported form, so the margin's closed form applies while every attack step runs in
``robbench::mlp_stall_ascent``. Fewer streams than the torch-engine test (the op is what is checked
here, the estimator's coverage is checked there), same tolerances.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robbench.protocols import EstimationContext
from robbench.settings import RunSettings
from robbench_plugins import fused_attack
from robbench_plugins.analytic import LinearGaussianVAE
from robbench_plugins.attacks import MaxDamageAttack
from robbench_plugins.estimators import ESTIMATORS
from robbench_plugins.models import FixedSigmaVAE
from robbench_plugins.networks import GaussianLikelihood

from test_margin_known_answer import CONFIGS

MARGIN = next(e for e in ESTIMATORS if e.name == "margin")
STREAMS = 64

pytestmark = pytest.mark.skipif(not fused_attack.available(), reason="compiled extension unavailable")


def as_mlp_vae(lg: LinearGaussianVAE) -> FixedSigmaVAE:
    """The linear-Gaussian VAE ``lg`` as a built-in MLP VAE (identical encode / decode)."""
    k, dim = lg.A.shape
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(dim, k))
    decoder = nn.Sequential(nn.Linear(k, dim))
    with torch.no_grad():
        encoder[1].weight.copy_(lg.A)
        encoder[1].bias.copy_(lg.c)
        decoder[0].weight.copy_(lg.W)
        decoder[0].bias.copy_(lg.b)
    return FixedSigmaVAE(lg.input_shape, k, encoder, decoder, GaussianLikelihood(1.0), sigma=lg.s).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def outcome(request):
    kwargs, r = CONFIGS[request.param]
    exact_model = LinearGaussianVAE(**kwargs)
    model = as_mlp_vae(exact_model)
    x = torch.full((STREAMS, *model.input_shape), 0.5)
    torch.set_num_threads(1)
    attack = MaxDamageAttack()
    ctx = EstimationContext(model=model, attack=attack, attack_params={**attack.defaults, "engine": "compiled"},
                            params={**MARGIN.defaults, "keep_adversarial": False},
                            point_ids=torch.arange(STREAMS),
                            run=RunSettings(r=r, m=0.5, confidence=0.95, backend="auto", seed=0))
    rows_before = fused_attack.ROWS["decode"]
    rows = MARGIN(ctx, x)
    return exact_model, model, x, r, rows, fused_attack.ROWS["decode"] - rows_before


def test_same_model_in_the_ops_form(outcome):
    exact_model, model, x, _, _, decoded_by_op = outcome
    assert fused_attack.fused_spec(model) is not None
    assert decoded_by_op > 0  # the attack's steps ran in the op, not through autograd
    z = torch.randn(16, model.latent_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.decode(z), exact_model.decode(z))
    for got, want in zip(model.encode(x[:4]), exact_model.encode(x[:4])):
        torch.testing.assert_close(got, want)


def test_pixel_box_does_not_bind_at_the_margin(outcome):
    # the closed form has no box; the built-in model has the pixel box (0, 1): the worst delta of norm R
    # (A's top right singular vector scaled by R) stays inside it around x = 0.5
    exact_model, _, _, r, _, _ = outcome
    reach = exact_model.exact_margin(r) * float(exact_model.top_direction.abs().max())
    assert reach < 0.5


def test_every_point_within_two_percent_through_the_op(outcome):
    exact_model, _, _, r, rows, _ = outcome
    exact = exact_model.exact_margin(r)
    errors = torch.tensor([row["margin"] / exact - 1.0 for row in rows])
    assert float(errors.abs().max()) <= 0.02, (float(errors.mean()), float(errors.abs().max()))
    assert abs(float(errors.mean())) <= 0.005
    covered = sum(row["margin_lo"] <= exact <= row["margin_hi"] for row in rows)
    assert covered >= 0.95 * len(rows) - 1
