"""robbench.decoding: the constants the C++/CUDA ops share with Python, and the one block loop."""
from __future__ import annotations

import re

import pytest

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


def _fresh_plan_matches(model, old):
    """decoder_plan(model) is a new plan holding the decoder's current weights."""
    plan = decoding.decoder_plan(model, 5)
    assert plan is not old
    lins = [m for m in model.decoder if isinstance(m, nn.Linear)]
    for lin, w, b in zip(lins, plan.weights, plan.biases):
        o, i = lin.weight.shape
        assert torch.equal(w[:o, :i], lin.weight.float())
        assert torch.equal(b[:o], lin.bias.float() if lin.bias is not None else torch.zeros(o))
    return plan


def test_plan_cache_hits_until_the_decoder_changes_in_any_way():
    """decoder_plan's cached MLP plan (checked by _mlp_guard in a few attribute reads per layer) is served only
    while the decoder is the one it was made from: every way of changing its weights or structure gives a
    fresh plan with the current weights, and an unchanged decoder gets the same plan object."""
    model = TinyVAE()
    plan = decoding.decoder_plan(model, 5)
    assert decoding.decoder_plan(model, 5) is plan
    with torch.no_grad():
        model.decoder[2].bias.add_(0.5)  # in place (version counter)
    plan = _fresh_plan_matches(model, plan)
    with torch.no_grad():
        model.decoder[0].weight[1, 2] = 7.0  # through a view
    plan = _fresh_plan_matches(model, plan)
    state = {k: v + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    plan = _fresh_plan_matches(model, plan)
    model.decoder[0].weight = nn.Parameter(model.decoder[0].weight.detach().clone() * 2)  # another tensor
    plan = _fresh_plan_matches(model, plan)
    model.decoder[2].bias = None  # removed
    plan = _fresh_plan_matches(model, plan)
    model.decoder[2].bias = nn.Parameter(torch.ones(5))  # added back
    plan = _fresh_plan_matches(model, plan)
    model.decoder[1] = nn.Sigmoid()  # a child replaced
    plan = _fresh_plan_matches(model, plan)
    assert plan.acts == [decoding.ACT_SIGMOID, decoding.ACT_SIGMOID]
    model.decoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5))  # the decoder replaced
    plan = _fresh_plan_matches(model, plan)
    assert plan.weights[0].shape[0] == 32 and plan.acts == [decoding.ACT_RELU, decoding.ACT_NONE]
    model.decoder.append(nn.Sigmoid())  # a child added
    plan = _fresh_plan_matches(model, plan)
    assert plan.acts[-1] == decoding.ACT_SIGMOID
    model.double()  # converted: param.data assigned (new data pointers)
    plan = _fresh_plan_matches(model, plan)
    assert decoding.decoder_plan(model, 5) is plan


def test_compiled_counts_follow_a_changed_decoder():
    """End to end through the cpp backend: after the decoder's weights change in place, the counts are the
    torch reference's for the new weights (never the cached plan's old ones)."""
    import pytest

    from robbench import montecarlo

    if not kernels.load():
        pytest.skip(f"no compiled extension: {kernels.build_error()}")
    model = TinyVAE()
    mu, sigma = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.full((4, 3), 0.5)
    center = model.decode(mu).detach()
    kw = dict(seed=3, stream_ids=torch.arange(4))
    r = montecarlo.sample_distances(model, mu, sigma, center, 200, **kw).median(1).values  # the first weights'
    seen = []
    for step in range(3):
        ref = montecarlo.count_within(model, mu, sigma, center, r, 200, backend="torch", **kw)
        seen.append(tuple(ref.tolist()))
        got = montecarlo.count_within(model, mu, sigma, center, r, 200, backend="cpp", **kw)
        assert torch.equal(got, ref), step
        with torch.no_grad():
            model.decoder[2].weight.mul_(1.05)
            model.decoder[2].bias.sub_(0.02)
    assert len(set(seen)) == 3, seen  # each change of the weights changes the counts


def _decode_matches_plan(model: nn.Module) -> bool:
    """Whether the plan decoder_plan serves computes what model.decode does (a generic plan always does)."""
    plan = decoding.decoder_plan(model, 5)
    if isinstance(plan, decoding.GenericPlan):
        return True
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    h = z
    for w, b, a in zip(plan.weights, plan.biases, plan.acts):
        h = h @ w[:, :h.shape[1]].t() + b
        h = torch.relu(h) if a == decoding.ACT_RELU else torch.sigmoid(h) if a == decoding.ACT_SIGMOID else h
    return torch.allclose(h[:, :plan.out_dim], model.decode(z).detach(), atol=1e-5)


class _Twice(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_decoders_the_plan_cannot_follow_get_a_generic_plan_or_a_fresh_one():
    """Review s10-ra: the MLP plan reads each Linear's registered weight and bias only. A parametrized weight
    (torch.nn.utils.parametrize) or the old weight_norm compute the weight from other parameters: with
    _mlp_guard watching only the Linear's own `weight`, an in-place step of those served the stale plan (main's
    key over all parameters did not). Forward hooks and a Linear subclass with its own forward were ignored by
    the plan while the probe in _decoder_is_decode ran them on both sides (on main too). All must decode like
    model.decode, before and after the change."""
    from torch.nn.utils import parametrize

    model = TinyVAE()
    parametrize.register_parametrization(model.decoder[2], "weight", _Double())
    assert _decode_matches_plan(model)
    with torch.no_grad():
        model.decoder[2].parametrizations.weight.original.add_(1.0)  # an optimizer step on the original
    assert _decode_matches_plan(model)

    model = TinyVAE()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model.decoder[2])
    assert _decode_matches_plan(model)
    with torch.no_grad():
        model.decoder[2].weight_g.mul_(3.0)
    assert _decode_matches_plan(model)

    model = TinyVAE()
    model.decoder[2] = _Twice(7, 5)
    assert _decode_matches_plan(model)

    for target in ("linear", "sequential"):
        model = TinyVAE()
        assert isinstance(decoding.decoder_plan(model, 5), decoding.MLPPlan)
        if target == "linear":  # registered after the plan was cached
            handle = model.decoder[2].register_forward_hook(lambda mod, inp, out: out * 2)
        else:
            handle = model.decoder.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
        assert _decode_matches_plan(model), target
        handle.remove()
        assert isinstance(decoding.decoder_plan(model, 5), decoding.MLPPlan) and _decode_matches_plan(model)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out + 1)
    try:
        assert _decode_matches_plan(TinyVAE())  # a global hook
    finally:
        handle.remove()


def test_cached_mlp_plan_keeps_the_storages_it_was_made_from():
    """Review s10-ra: ``p.data = x`` keeps p's version counter (seen: the version does not move), so _mlp_guard
    tells the new storage only by its data pointer; were the old storage freed, a new one of the same size
    could take its address and the stale plan would be served. The guard holds the plan's storages, so no
    live storage can share their address while the plan is cached."""
    import gc
    import weakref

    model = TinyVAE()
    p = model.decoder[2].weight
    storage = weakref.ref(p.untyped_storage())
    plan = decoding.decoder_plan(model, 5)
    version = p._version
    with torch.no_grad():
        p.data = torch.zeros(5, 7)
    gc.collect()
    assert p._version == version  # the case the data pointer has to catch on its own
    assert storage() is not None  # the original storage is still alive (held by the cached plan's guard)
    assert decoding.decoder_plan(model, 5) is not plan
