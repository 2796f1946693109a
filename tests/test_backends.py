"""The backend table: robbench's own backends and a third party's come from one registry, and `auto`
chooses by declared priority and availability, never by name."""
from __future__ import annotations

import pytest
import torch

from robbench import hookimpl, montecarlo
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.backends import Backend, CountResult, TorchBackend


class DoubleBackend(TorchBackend):
    """A throwaway third-party backend: the reference's samples, distances in float64."""

    name = "test_double"
    description = "test: float64 distances"
    auto_priority = 1000

    def __init__(self):
        self.calls = 0

    def count_within(self, model, mu, sigma, center, r2, n_samples, *, seed, stream_ids, sample_offset=0,
                     chunk_rows=2048, precision=None, screen=True):
        self.calls += 1
        d2 = self.sq_distances(model, mu, sigma, center, n_samples, seed=seed, stream_ids=stream_ids,
                               sample_offset=sample_offset, chunk_rows=chunk_rows).double()
        return CountResult((d2 <= r2.double()[:, None]).sum(1), 0, 0, d2.numel(), "fp64")


class BackendPlugin:
    def __init__(self):
        self.backend = DoubleBackend()

    @hookimpl
    def register_backends(self, register):
        register(self.backend)


@pytest.fixture
def plugin(fresh_plugins):
    plugin = BackendPlugin()
    fresh_plugins.register_plugin(plugin, name="backend-test")
    yield plugin
    fresh_plugins.unregister_plugin(plugin)


def test_engine_backends_are_registered_through_the_hook(fresh_plugins):
    regs = fresh_plugins.get_registries()
    assert {"torch", "cpp", "cuda"} <= set(regs.backends.names())
    assert all(isinstance(regs.backends.get(n), Backend) for n in regs.backends.names())
    assert "engine" in regs.backends.source("torch")
    assert regs.backends.get("cuda").auto_priority is None  # not validated on a GPU: never chosen by auto


def test_cpp_lists_its_default_precision_first(fresh_plugins, monkeypatch):
    """Backend.precisions is "first the default": for cpp that depends on the CPU and ROBBENCH_PRECISION."""
    from robbench import kernels

    cpp = fresh_plugins.get_registries().backends.get("cpp")
    for env in ("fp32", "bf16"):
        monkeypatch.setenv("ROBBENCH_PRECISION", env)
        assert cpp.precisions[0] == kernels.default_precision() and sorted(cpp.precisions) == ["bf16", "fp32"]
    monkeypatch.setenv("ROBBENCH_PRECISION", "fp32")
    assert cpp.precisions[0] == "fp32"


def test_auto_prefers_the_highest_priority_and_explicit_names_are_checked(plugin):
    assert montecarlo.resolve_backend("auto", torch.device("cpu")) == "test_double"
    assert "test_double" in montecarlo.available_backends("cpu")
    with pytest.raises(ValueError, match="unknown backend 'nope'; known: auto, .*test_double"):
        montecarlo.resolve_backend("nope", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cuda.*cannot run here"):
        montecarlo.resolve_backend("cuda", torch.device("cpu"))


def test_a_third_party_backend_is_dispatched_to_and_agrees_with_the_reference(plugin):
    model = LinearGaussianVAE()
    x = torch.rand(3, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, sigma = model.encode(x)
        center = model.decode(mu).flatten(1)
    ref = montecarlo.count_within(model, mu, sigma, center, 2.0, 500, seed=3, backend="torch")
    got = montecarlo.count_within(model, mu, sigma, center, 2.0, 500, seed=3, backend="test_double")
    assert plugin.backend.calls == 1
    assert (got - ref).abs().max() <= 1  # same samples; only a distance within rounding of r may differ
