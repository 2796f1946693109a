"""A third-party model (``torch_module``) that breaks the VAEModel protocol: every row of the run fails
before any estimator runs, with a message that names what is wrong (before: a matmul error deep inside an
attack, or numbers computed from the wrong decoder output without a word)."""
from __future__ import annotations

import json

import pytest

from robbench import cli
from tiny_vae_source import MODULE_SOURCE

DECODE = "return self.dec(z).view(-1, *self.input_shape)"
ENCODE = "return mu, nn.functional.softplus(pre) + 1e-3"

BROKEN = {  # variant -> ((old, new) in MODULE_SOURCE, text the failed rows must carry)
    "decode_too_small": ((DECODE, "return self.dec(z)[:, :60]"),
                         "decode(z) returned shape (2, 60) for 2 latents; expected (2, 1, 8, 8)"),
    "mu_too_wide": ((ENCODE, "return torch.cat([mu, mu], 1), torch.cat([nn.functional.softplus(pre) + 1e-3] * 2, 1)"),
                    "encode(x) returned mu of shape (2, 4) and sigma of shape (2, 4); expected (2, 2) each "
                    "(latent_dim = 2)"),
    "latent_dim_lie": (("self.latent_dim = latent_dim", "self.latent_dim = latent_dim + 1"),
                       "encode(x) returned mu of shape (2, 2) and sigma of shape (2, 2); expected (2, 3) each"),
    "decode_random": ((DECODE, "out = self.dec(z)\n        "
                               "return (out + 0.05 * torch.rand_like(out)).view(-1, *self.input_shape)"),
                      "decode(z) is not deterministic"),
    "decode_integer": ((DECODE, "return (self.dec(z) > 0.5).view(-1, *self.input_shape)"),
                       "decode(z) returned dtype torch.bool; expected a floating-point tensor"),
    "decode_elsewhere": ((DECODE, "return self.dec(z).view(-1, *self.input_shape).to('meta')"),
                         "decode(z) returned a tensor on meta; z was on cpu"),
    "encode_elsewhere": ((ENCODE, "return mu.to('meta'), (nn.functional.softplus(pre) + 1e-3).to('meta')"),
                         "encode(x) returned mu on meta and sigma on meta; x was on cpu"),
    "encode_tuple_of_three": ((ENCODE, "return mu, mu, pre"),
                              "encode(x) must return (mu, sigma); it returned a tuple of 3"),
}


def _run(tmp_path, monkeypatch, source: str) -> dict:
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "user_vae.py"
    src.write_text(source)
    out = tmp_path / "run"
    code = cli.main(["run", "--dataset", "digits", "--models", "torch_module", "--param",
                     f"torch_module.factory={src}:make", "--estimators", "encoder_stats", "--points", "2",
                     "--backend", "torch", "--out", str(out), "--no-progress"])
    assert code == 0
    (rec,) = json.loads((out / "leaderboard.json").read_text())["rows"]
    return rec


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_model_breaking_the_protocol_fails_with_a_named_problem(tmp_path, monkeypatch, variant):
    (old, new), expected = BROKEN[variant]
    assert old in MODULE_SOURCE
    rec = _run(tmp_path, monkeypatch, MODULE_SOURCE.replace(old, new))
    assert rec["failed"] == 2 and rec["points"] == 0
    assert any(expected in err for err in rec["errors"]), rec["errors"]


def test_the_same_model_keeping_the_protocol_runs(tmp_path, monkeypatch):
    """The control: the unbroken module (decoding in float32, deterministically) passes the checks."""
    rec = _run(tmp_path, monkeypatch, MODULE_SOURCE)
    assert rec["failed"] == 0 and rec["points"] == 2


def test_the_contract_decodes_a_few_rows_whatever_the_number_of_points():
    """The check runs on every point of the run (often hundreds); decoding them all, twice, before any
    estimate cost a large decoder (an image VAE on a CPU) two full passes and their memory at once. A few
    rows show the shape, dtype, device and determinism as well."""
    import torch
    from torch import nn

    from robbench.prepare import contract_problem

    class Counting(nn.Module):
        input_shape, latent_dim = (1, 4, 4), 2

        def __init__(self):
            super().__init__()
            self.lin, self.rows = nn.Linear(2, 16), []

        def decode(self, z):
            self.rows.append(z.shape[0])
            return torch.sigmoid(self.lin(z)).view(-1, *self.input_shape)

    model = Counting()
    mu, sigma = torch.randn(300, 2), torch.ones(300, 2)
    with torch.no_grad():
        assert contract_problem(model, mu, sigma) is None
    assert len(model.rows) == 2 and max(model.rows) <= 8, model.rows
    assert "expected (300, 2) each" in contract_problem(model, mu[:, :1], sigma[:, :1])  # encode still all rows


def test_a_half_precision_decoder_with_last_bit_noise_passes_and_dropout_does_not():
    """A bfloat16 / float16 decoder on a GPU may round differently from call to call (atomics in a
    nondeterministic kernel): one unit in the last place is 0.4 % near 1 in bfloat16, far above the float32
    tolerance, and such a model was refused as 'not deterministic'. Dropout left on is still refused."""
    import torch
    from torch import nn

    from robbench.prepare import contract_problem

    class Half(nn.Module):
        input_shape, latent_dim = (16,), 2

        def __init__(self, dtype, dropout=0.0):
            super().__init__()
            self.lin, self.drop, self.calls = nn.Linear(2, 16).to(dtype), nn.Dropout(dropout), 0

        def decode(self, z):
            self.calls += 1
            out = torch.sigmoid(self.drop(self.lin(z)).float())
            bump = 1 + (self.calls % 2) * torch.finfo(self.lin.weight.dtype).eps  # the last bit, on odd calls
            return (out * bump).to(self.lin.weight.dtype)

    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        mu, sigma = torch.randn(8, 2, dtype=dtype), torch.ones(8, 2, dtype=dtype)
        with torch.no_grad():
            assert contract_problem(Half(dtype), mu, sigma) is None, dtype
            assert "not deterministic" in contract_problem(Half(dtype, 0.5).train(), mu, sigma), dtype
