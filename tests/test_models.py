"""Built-in model families: protocol, parameters actually used, likelihoods, validation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robbench_plugins.analytic import LinearGaussianVAE
from robbench.protocols import ModelFamily
from robbench_plugins import models, networks

pytestmark = pytest.mark.usefixtures("one_thread")


FAMILIES = {f.name: f for f in models.families()}
TRAINABLE = [n for n, f in FAMILIES.items() if f.trainable]


def scalar_params(family: ModelFamily, **overrides) -> dict:
    """The family's defaults with each swept list replaced by its last value."""
    p = {k: (v[-1] if k in family.sweep and isinstance(v, list) else v) for k, v in family.defaults.items()}
    return {**p, **overrides}


def build(name: str, shape=(1, 8, 8), seed: int = 0, **overrides):
    torch.manual_seed(seed)
    family = FAMILIES[name]
    return family.build(scalar_params(family, latent_dim=3, hidden=32, **overrides), shape)


def test_registers_every_family_through_the_hook():
    seen = []
    models.register_models(register=seen.append)
    assert [f.name for f in seen] == ["vae", "beta_vae", "sigma_offset_vae", "beta_tcvae", "ae",
                                      "fixed_sigma_vae", "linear_gaussian", "from_file"]
    assert FAMILIES["beta_vae"].defaults["beta"] == [0.1, 1.0, 10.0]
    assert FAMILIES["sigma_offset_vae"].defaults["tau"] == [0.0, 0.1, 0.5, 1.0]
    assert not FAMILIES["linear_gaussian"].trainable and not FAMILIES["from_file"].trainable


@pytest.mark.parametrize("name", TRAINABLE)
@pytest.mark.parametrize("shape,arch", [((1, 8, 8), "mlp"), ((3, 8, 8), "conv")])
def test_family_trains_a_few_steps_and_meets_the_protocol(name, shape, arch):
    model = build(name, shape, architecture=arch)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, *shape, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, logs = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert math.isfinite(logs["elbo"])
    assert losses[-1] < losses[0]  # the objective is actually optimised

    mu, sigma = model.encode(x)
    assert mu.shape == sigma.shape == (16, 3)
    if name == "ae":
        assert torch.all(sigma == 0)
    else:
        assert torch.all(sigma > 0)
    z = torch.randn(5, 3, generator=gen)
    recon = model.decode(z)
    assert recon.shape == (5, *shape) and recon.min() >= 0 and recon.max() <= 1
    # the `decoder` attribute contract: (N, k) -> (N, D) flattened mean
    assert isinstance(model.decoder, nn.Sequential)
    assert torch.equal(model.decoder(z).view(-1, *shape), recon)
    assert model.log_likelihood(x, model.decode(mu)).shape == (16,)
    assert model.input_shape == shape and model.latent_dim == 3


def test_mlp_decoder_is_linear_activation_layers_ending_in_sigmoid():
    model = build("vae", (1, 28, 28), layers=2)
    kinds = [type(m) for m in model.decoder]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert model.decoder[0].in_features == 3 and model.decoder[-2].out_features == 784


def test_architecture_auto_picks_conv_for_colour_and_mlp_for_grey():
    colour = build("vae", (3, 32, 32))
    grey = build("vae", (1, 28, 28))
    assert any(isinstance(m, nn.Conv2d) for m in colour.encoder.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in grey.encoder.modules())
    assert isinstance(colour.likelihood, networks.GaussianLikelihood)
    assert isinstance(grey.likelihood, networks.BernoulliLikelihood)
    forced = build("vae", (1, 28, 28), architecture="conv", likelihood="gaussian")
    assert any(isinstance(m, nn.ConvTranspose2d) for m in forced.decoder.modules())
    assert forced.decode(torch.zeros(2, 3)).shape == (2, 1, 28, 28)


def test_tau_offset_is_added_to_sigma():
    base = build("sigma_offset_vae", tau=0.0, seed=3)
    offset = build("sigma_offset_vae", tau=0.5, seed=3)  # same seed: identical weights
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    _, s0 = base.encode(x)
    _, s5 = offset.encode(x)
    torch.testing.assert_close(s5 - s0, torch.full_like(s0, 0.5))
    assert s5.min() >= 0.5


def test_beta_weights_the_kl_in_the_objective():
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for beta in (1.0, 10.0):
        model = build("beta_vae", beta=beta, seed=4)
        torch.manual_seed(9)  # the same reparameterisation noise
        out[beta] = model.loss(x)
    (l1, logs1), (l10, logs10) = out[1.0], out[10.0]
    assert logs1["elbo"] == pytest.approx(logs10["elbo"])  # the reported ELBO is beta-free
    assert (l10 - l1).item() == pytest.approx(9.0 * logs1["kl"], rel=1e-5)
    assert l1.item() == pytest.approx(-logs1["elbo"], rel=1e-5)


def test_gaussian_kl_known_answer():
    mu = torch.tensor([[0.0, 1.0]])
    sigma = torch.tensor([[1.0, 0.5]])
    # 0.5 * (mu^2 + s^2 - 1 - log s^2) summed: 0 + 0.5 * (1 + 0.25 - 1 - log 0.25)
    assert float(models.gaussian_kl(mu, sigma)) == pytest.approx(0.5 * (0.25 + math.log(4)))


def test_total_correlation_mws_known_answer_for_identical_posteriors():
    # All posteriors equal the prior, so q(z) factorises and the only term left is the estimator's
    # (k - 1) log N offset from the 1 / (N M) weights.
    k, m, n = 4, 6, 100
    mu, sigma = torch.zeros(m, k), torch.ones(m, k)
    z = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
    tc = models.total_correlation_mws(z, mu, sigma, n)
    torch.testing.assert_close(tc, torch.full((m,), (k - 1) * math.log(n)))


def test_beta_tcvae_weights_the_total_correlation():
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for beta in (1.0, 6.0):
        model = build("beta_tcvae", beta=beta, seed=4)
        torch.manual_seed(9)
        out[beta] = model.loss(x)
    (l1, logs1), (l6, _) = out[1.0], out[6.0]
    assert (l6 - l1).item() == pytest.approx(5.0 * logs1["tc"], rel=1e-4)
    assert l1.item() == pytest.approx(-logs1["elbo"], rel=1e-5)  # beta = 1 is the plain VAE


def test_autoencoder_has_zero_sigma_and_reconstruction_loss():
    model = build("ae")
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mu, sigma = model.encode(x)
    assert torch.equal(sigma, torch.zeros_like(mu))
    loss, logs = model.loss(x)
    expected = model.log_likelihood(x, model.decode(mu)).mean()
    assert loss.item() == pytest.approx(-expected.item(), rel=1e-4)


def test_fixed_sigma_vae_set_and_learned():
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed = build("fixed_sigma_vae", sigma=0.3)
    _, s = fixed.encode(x)
    torch.testing.assert_close(s, torch.full((4, 3), 0.3))
    assert "log_sigma" not in dict(fixed.named_parameters())
    learned = build("fixed_sigma_vae", sigma=None)
    _, s = learned.encode(x)
    torch.testing.assert_close(s, torch.ones(4, 3))  # starts at 1, same for every input
    loss, _ = learned.loss(x)
    loss.backward()
    assert learned.log_sigma.grad is not None and learned.log_sigma.grad.abs().sum() > 0


def test_bernoulli_likelihood_known_answer_and_logits_agree():
    lik = networks.BernoulliLikelihood()
    x = torch.tensor([[1.0, 0.0, 0.5]])
    mean = torch.tensor([[0.8, 0.3, 0.5]])
    expected = math.log(0.8) + math.log(0.7) + math.log(0.5)
    assert float(lik.log_prob(x, mean)) == pytest.approx(expected, rel=1e-6)
    assert float(lik.log_prob_logits(x, torch.logit(mean))) == pytest.approx(expected, rel=1e-6)


def test_gaussian_likelihood_known_answer_fixed_and_learned():
    x = torch.tensor([[0.2, 0.9]])
    mean = torch.tensor([[0.5, 0.5]])
    fixed = networks.GaussianLikelihood(obs_sigma=0.5)
    expected = torch.distributions.Normal(mean, 0.5).log_prob(x).sum()
    assert float(fixed.log_prob(x, mean)) == pytest.approx(float(expected), rel=1e-6)
    assert not list(fixed.parameters())
    learned = networks.GaussianLikelihood()
    assert learned.scale.item() == pytest.approx(0.1) and len(list(learned.parameters())) == 1


def test_model_log_likelihood_uses_the_bernoulli_formula():
    model = build("vae")
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    recon = torch.full_like(x, 0.25)
    expected = (x * math.log(0.25) + (1 - x) * math.log(0.75)).flatten(1).sum(1)
    torch.testing.assert_close(model.log_likelihood(x, recon), expected)


@pytest.mark.parametrize("name,key,value", [
    ("vae", "latent_dim", 0), ("vae", "latent_dim", 2.5), ("vae", "activation", "swish"),
    ("vae", "architecture", "transformer"), ("vae", "likelihood", "poisson"), ("vae", "hidden", -3),
    ("vae", "obs_sigma", 0.0), ("beta_vae", "beta", -1.0), ("beta_vae", "beta", [1.0, "x"]),
    ("sigma_offset_vae", "tau", -0.1), ("fixed_sigma_vae", "sigma", 0), ("vae", "conv_channels", []),
    ("linear_gaussian", "s", 0.0), ("from_file", "path", ""),
])
def test_validate_rejects_bad_values_naming_key_and_value(name, key, value):
    family = FAMILIES[name]
    with pytest.raises(ValueError) as err:
        family.validate({key: value})
    assert key in str(err.value)
    bad = value[-1] if key in family.sweep and isinstance(value, list) else value
    assert repr(bad) in str(err.value)


def test_validate_rejects_unknown_keys_and_accepts_defaults_and_sweeps():
    with pytest.raises(ValueError, match="unknown parameter 'betta'"):
        FAMILIES["beta_vae"].validate({"betta": 1.0})
    with pytest.raises(ValueError, match="empty list"):
        FAMILIES["beta_vae"].validate({"beta": []})
    for family in FAMILIES.values():
        if family.name != "from_file":
            family.validate(dict(family.defaults))
    FAMILIES["beta_vae"].validate({"beta": [0.5, 2, 4.0]})
    FAMILIES["sigma_offset_vae"].validate({"tau": 0.25})


def test_linear_gaussian_family_builds_the_analytic_model():
    family = FAMILIES["linear_gaussian"]
    model = family.build({**family.defaults, "latent_dim": 2, "s": 0.7}, (1, 8, 8))
    assert isinstance(model, LinearGaussianVAE)
    assert model.input_shape == (1, 8, 8) and model.latent_dim == 2 and model.s == 0.7
    with pytest.raises(ValueError, match="singular_values"):
        family.validate({"latent_dim": 2, "singular_values": [1.0, 2.0, 3.0]})
