"""robbench.decoding: the constants the C++/CUDA ops share with Python, and the one block loop."""
from __future__ import annotations

import re

import torch
from torch import nn

from robbench import decoding, kernels


def _header_constants() -> dict[str, int]:
    text = (kernels.CSRC / "common" / "decoder.h").read_text()
    found = {name: int(value) for name, value in re.findall(r"\b(k\w+) = (\d+)", text)}
    return found


def test_header_and_python_agree_on_activation_codes_and_gemm_rows():
    c = _header_constants()
    assert (c["kActNone"], c["kActRelu"], c["kActSigmoid"]) == (decoding.ACT_NONE, decoding.ACT_RELU,
                                                               decoding.ACT_SIGMOID)
    assert c["kMinGemmRows"] == decoding.MIN_GEMM_ROWS and c["kPad"] == decoding.PAD
    assert (c["kFp32"], c["kBf16"]) == (kernels.PRECISIONS["fp32"], kernels.PRECISIONS["bf16"])


class TinyVAE(nn.Module):
    latent_dim, input_shape = 3, (5,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.decoder = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 5), nn.Sigmoid())

    def decode(self, z):
        return self.decoder(z)


def test_decoded_blocks_cover_every_sample_once_and_match_decode():
    model = TinyVAE()
    plan = decoding.decoder_plan(model, 5)
    assert isinstance(plan, decoding.MLPPlan) and plan.acts == [decoding.ACT_RELU, decoding.ACT_SIGMOID]
    mu, sigma = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    seen = torch.zeros(4, 30, dtype=torch.int64)
    for blk, y in decoding.decoded_blocks(plan, mu, sigma, 30, 1, torch.arange(4), 0, 16):
        seen[blk.p0:blk.p1, blk.s0:blk.s1] += 1
        assert y.shape == (blk.p1 - blk.p0, blk.s1 - blk.s0, 5)
        ka, kb = decoding.rng.stream_keys(1, torch.arange(4))
        z = decoding.latents(mu, sigma, ka, kb, blk, 0, 0)
        assert torch.allclose(y.reshape(-1, 5), model.decode(z), atol=1e-6)
    assert torch.equal(seen, torch.ones_like(seen))


def test_a_decoder_that_is_not_decode_gets_a_generic_plan():
    class Logits(TinyVAE):
        def decode(self, z):
            return torch.sigmoid(self.decoder(z))  # decode applies one more sigmoid than the decoder

    assert isinstance(decoding.decoder_plan(Logits(), 5), decoding.GenericPlan)


def test_checked_wrappers_share_the_wrapped_models_mlp_plan():
    """Every run wraps the model in a new CheckedModel: its MLP plan (the weight tensors the compiled
    backends cache per-weight work for) is the wrapped model's own, not rebuilt per wrapper."""
    from robbench.checks import checked

    model = TinyVAE()
    first, second = checked(model), checked(model)
    plan = decoding.decoder_plan(first, 5)
    assert plan is decoding.decoder_plan(second, 5) is decoding.decoder_plan(model, 5)
    with torch.no_grad():
        model.decoder[0].weight.add_(1.0)  # a changed parameter still invalidates the shared plan
    fresh = decoding.decoder_plan(checked(model), 5)
    assert fresh is not plan and torch.equal(fresh.weights[0][:7, :3], model.decoder[0].weight)


def test_checked_wrapper_of_a_non_mlp_decoder_keeps_its_checked_decode():
    """A generic plan calls decode: through the wrapper, so a NaN still fails the point."""
    import pytest

    from robbench.checks import PluginOutputError, checked

    class NaNDecode(TinyVAE):
        def decode(self, z):
            return torch.full((z.shape[0], 5), float("nan"))

    wrapped = checked(NaNDecode())  # the plan holds it weakly
    plan = decoding.decoder_plan(wrapped, 5)
    assert isinstance(plan, decoding.GenericPlan)
    with pytest.raises(PluginOutputError):
        plan.fn(torch.zeros(2, 3))
