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
