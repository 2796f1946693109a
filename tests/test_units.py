"""units: rms (sizes relative to the data) and the warning when margins hit the attack cap."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import robbench
from robbench_plugins.analytic import LinearGaussianVAE
from robbench.inputrange import rms_scale
from robbench.settings import RunSettings
from robbench.units import absolute_settings, cap_warning


def test_rms_sizes_become_l2_sizes_of_the_models_shape_and_range():
    class Est:
        input_sizes = ("max_radius", "tolerance")

    class Model:
        input_shape = (3, 8, 8)
        input_range = (-1.0, 1.0)

    scale = math.sqrt(192) * 2
    assert rms_scale((3, 8, 8), (-1.0, 1.0)) == pytest.approx(scale)
    out, run = absolute_settings(Est(), {"max_radius": 0.5, "tolerance": 0.01, "samples": 7},
                                 RunSettings(r=0.1, units="rms"), Model())
    assert run.r == pytest.approx(0.1 * scale) and run.units == "l2" and out["max_radius"] == pytest.approx(0.5 * scale)
    assert out["tolerance"] == pytest.approx(0.01 * scale) and out["samples"] == 7
    same, run = absolute_settings(Est(), {"max_radius": 0.5}, RunSettings(r=0.1), Model())
    assert run.r == 0.1 and same["max_radius"] == 0.5
    class Noisy:
        input_sizes = ("radius",)
        pixel_sizes = ("noise_sigma",)

    noisy, _ = absolute_settings(Noisy(), {"radius": 0.2, "noise_sigma": 0.3}, RunSettings(units="rms"), Model())
    assert noisy["radius"] == pytest.approx(0.2 * scale) and noisy["noise_sigma"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="'units'"):
        absolute_settings(Est(), {}, RunSettings(units="pixels"), Model())


def test_margins_at_the_cap_warn_and_rms_units_match_l2():
    model = LinearGaussianVAE((1, 8, 8), 4)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    common = dict(attacks=["max_damage"], estimators=["margin"], backend="torch",
                  attack_params={"max_damage": {"steps": 5}})
    with pytest.warns(RuntimeWarning, match=r"4 of 4 margins hit the attack cap max_radius=0.5"):
        robbench.evaluate(model, x, r=4.0, estimator_params={"margin": {"max_radius": 0.5}}, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l2 = robbench.evaluate(model, x, r=4.0, estimator_params={"margin": {"max_radius": 8.0, "tolerance": 0.1}},
                               **common)
        rms = robbench.evaluate(model, x, r=0.5, units="rms",
                                estimator_params={"margin": {"max_radius": 1.0, "tolerance": 0.0125}}, **common)
    assert l2.column("margin") == pytest.approx(rms.column("margin"))  # 8x8 [0, 1] images: scale 8
    assert not any(l2.column("at_cap"))


def test_cap_warning_share():
    rows = [{"at_cap": True}, {"at_cap": False}, {"at_cap": False}, {"at_cap": False}, {"at_cap": False}]
    assert cap_warning("m", rows, 10.0) is not None  # 1 of 5 = 20%
    assert cap_warning("m", rows + [{"at_cap": False}], 10.0) is None
    assert cap_warning("m", [{"margin": 1.0}], 10.0) is None


def test_robbench_run_warns_when_margins_hit_the_cap(tmp_path, monkeypatch, capsys):
    from robbench import cli

    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    code = cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators", "margin",
                     "--param", "margin.max_radius=0.5", "--param", "max_damage.steps=5", "--points", "3",
                     "--backend", "torch", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: linear_gaussian seed 0 / max_damage / margin: 3 of 3 margins hit the attack cap" in out


def test_a_data_set_outside_its_declared_range_is_refused_and_a_declared_one_is_mapped(tmp_path, monkeypatch):
    from robbench import cli
    from robbench.hookspecs import hookimpl
    from robbench.plugins import register_plugin, unregister_plugin
    from robbench.protocols import DatasetSpec, SplitData

    def make(declared):
        def load(options):
            x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1  # values in [-1, 1]
            y = torch.zeros(30, dtype=torch.int64)
            return SplitData(x[:20], y[:20], x[20:], y[20:], **({"input_range": (-1.0, 1.0)} if declared else {}))
        return load

    class Plugin:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec("signed_undeclared", "values in [-1, 1], undeclared", make(False)))
            register(DatasetSpec("signed_declared", "values in [-1, 1], declared", make(True)))

    plugin = Plugin()
    monkeypatch.setenv("ROBBENCH_CACHE", str(tmp_path / "cache"))
    register_plugin(plugin, name="signed")
    try:
        args = ["run", "--models", "linear_gaussian", "--estimators", "encoder_stats", "--points", "2",
                "--backend", "torch", "--no-progress"]
        assert cli.main(args + ["--dataset", "signed_undeclared", "--out", str(tmp_path / "a")]) == 2
        assert not (tmp_path / "a").exists()
        assert cli.main(args + ["--dataset", "signed_declared", "--out", str(tmp_path / "b")]) == 0
    finally:
        unregister_plugin(plugin)


def test_margin_tolerances_under_rms_units_absolute_floor_scales_relative_one_does_not():
    """issue 13's margin has an absolute floor ``tolerance`` (an input-space L2 size: scaled by rms) and a
    unitless ``rel_tolerance`` (a fraction of R: left as given)."""
    from robbench.plugins import get_registries

    margin = get_registries().estimators.get("margin")
    assert "tolerance" in margin.input_sizes and "max_radius" in margin.input_sizes
    assert "rel_tolerance" not in margin.input_sizes and "rel_tolerance" not in margin.pixel_sizes

    class Model:
        input_shape = (3, 8, 8)
        input_range = (-1.0, 1.0)

    scale = math.sqrt(192) * 2
    out, _ = absolute_settings(margin, {"max_radius": 0.5, "tolerance": 0.001, "rel_tolerance": 0.01},
                               RunSettings(r=0.1, units="rms"), Model())
    assert out["tolerance"] == pytest.approx(0.001 * scale) and out["max_radius"] == pytest.approx(0.5 * scale)
    assert out["rel_tolerance"] == 0.01
