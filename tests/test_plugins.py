"""Plugin loading: built-ins and a third party's plugin come through the same entry-point group."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import install_plugin
from robbench import hookimpl
from robbench.protocols import ModelFamily
from robbench.registry import Registry, UnknownNameError

BUILTIN_DIST = "robbench 0.1.0"


def test_builtins_load_through_entry_points(fresh_plugins):
    regs = fresh_plugins.get_registries()
    for kind, name in [("model", "beta_vae"), ("model", "vae"), ("dataset", "mnist"),
                       ("attack", "max_damage"), ("estimator", "margin"), ("estimator", "bound"),
                       ("estimator", "encoder_stats")]:
        registry = regs.by_kind()[kind]
        assert name in registry, f"{kind} {name} missing; have {registry.names()}"
        assert registry.source(name) == BUILTIN_DIST


def test_thirdparty_plugin_is_discovered_with_its_distribution(fresh_plugins):
    regs = fresh_plugins.get_registries()
    assert regs.models.source("tp_linear") == "robbench-tp-demo 0.1"
    assert regs.attacks.source("tp_constant") == "robbench-tp-demo 0.1"
    assert regs.estimators.source("tp_damage") == "robbench-tp-demo 0.1"
    assert regs.datasets.source("tp_blobs") == "robbench-tp-demo 0.1"


def test_plugin_filter_env_var(fresh_plugins, monkeypatch):
    monkeypatch.setenv("ROBBENCH_PLUGINS", "tp_demo")
    regs = fresh_plugins.get_registries()
    assert regs.models.names() == ["tp_linear"]


def test_registry_rejects_duplicates_and_lists_known_names():
    reg: Registry[int] = Registry("model")
    reg.add("a", 1, "x")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", 2, "y")
    with pytest.raises(UnknownNameError, match="available: a"):
        reg.get("b")


def test_plugin_registered_by_hand_and_removed(fresh_plugins):
    class Extra:
        @hookimpl
        def register_models(self, register):
            register(ModelFamily(name="by_hand", description="test", build=lambda p, s: None))

    plugin = Extra()
    fresh_plugins.register_plugin(plugin, name="by-hand")
    try:
        regs = fresh_plugins.get_registries()
        assert "by_hand" in regs.models
        assert regs.models.source("by_hand").startswith("(registered by hand")
    finally:
        fresh_plugins.unregister_plugin(plugin)
    assert "by_hand" not in fresh_plugins.get_registries().models


def test_cli_lists_plugins_with_kind_and_distribution(subprocess_env):
    out = subprocess.run([sys.executable, "-m", "robbench.cli", "plugins"], env=subprocess_env,
                         capture_output=True, text=True, check=True).stdout
    assert "tp_constant" in out and "robbench-tp-demo 0.1" in out
    assert "beta_vae" in out and "robbench 0.1.0" in out


def test_thirdparty_plugin_runs_through_robbench_run(subprocess_env, tmp_path):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "robbench.cli", "run", "--dataset", "tp_blobs", "--models", "tp_linear",
           "--attacks", "tp_constant", "--estimators", "tp_damage,encoder_stats,bound", "--points", "6",
           "--backend", "tp_naive", "--param", "bound.p0_samples=256", "--out", str(out_dir), "--no-progress"]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    # The third-party estimator's own column is in the printed table and the files, next to built-in ones.
    assert "mean tp damage" in done.stdout and "mean bound" in done.stdout
    assert "| mean tp damage |" in (out_dir / "leaderboard.md").read_text()
    records = json.loads((out_dir / "leaderboard.json").read_text())["rows"]
    assert len(records) == 1
    rec = records[0]
    assert rec["model"] == "tp_linear" and rec["attack"] == "tp_constant" and rec["points"] == 6
    # The linear model's damage for a uniform shift of norm L is ||W A u|| L, the same for every point.
    from robbench_plugins.analytic import LinearGaussianVAE
    import torch
    model = LinearGaussianVAE((1, 8, 8), 4)
    u = torch.full((64,), 1 / 8.0)
    expected = float((model.W @ (model.A @ u)).norm()) * 0.1
    assert rec["tp_damage_mean"] == pytest.approx(expected, rel=1e-4) and "damage_mean" not in rec
    assert rec["bound_mean"] > 0  # p_r(x, 0) decoded by the third-party backend tp_naive
    assert rec["min_sigma_mean"] == pytest.approx(0.5, rel=1e-6)


def test_thirdparty_backend_shows_up_in_robbench_bench(subprocess_env, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "robbench.cli", "bench", "--backend", "torch,tp_naive", "--samples", "64",
           "--points", "2", "--json", str(out)]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "tp_naive" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows] == ["torch", "tp_naive"] and rows[1]["speedup_vs_torch"] > 0


def test_bench_rejects_an_unknown_backend(subprocess_env):
    done = subprocess.run([sys.executable, "-m", "robbench.cli", "bench", "--backend", "nope", "--samples", "8"],
                          env=subprocess_env, capture_output=True, text=True)
    assert done.returncode == 2 and "'nope'; allowed:" in done.stderr and "tp_naive" in done.stderr


def test_a_plugin_filter_naming_no_entry_point_is_reported(fresh_plugins, monkeypatch, capsys):
    """ROBBENCH_PLUGINS=typo loaded nothing and said only "bad value for 'estimators': []"."""
    monkeypatch.setenv("ROBBENCH_PLUGINS", "tp_demo,robbench_typo")
    failures = fresh_plugins.plugin_failures()
    assert [f.name for f in failures] == ["robbench_typo"]
    assert "ROBBENCH_PLUGINS names no installed entry point" in failures[0].error
    assert "tp_demo" in failures[0].error  # the installed names are listed


_BROKEN_PLUGIN = '''
from robbench import hookimpl
from robbench.protocols import ModelFamily


class Attack:
    description, defaults = "test", {{}}

    def __init__(self, name):
        if name is not None:
            self.name = name

    def __call__(self, model, x, radius, *, params, generator, init=None):
        raise AssertionError("never called")


@hookimpl
def register_models(register):
    register(ModelFamily(name="broken_pkg_model", description="test", build=lambda p, s: None))


@hookimpl
def register_attacks(register):
    {body}
'''


@pytest.mark.parametrize("body, error", [
    ('raise RuntimeError("my plugin is broken")', "RuntimeError: my plugin is broken"),
    ('register(Attack("noise"))', "attack 'noise' is registered already by robbench 0.1.0"),
    ('register(Attack("mine")); register(Attack("mine"))', "attack 'mine' registered twice by this plugin"),
    ("register(Attack(None))", "register() was given a Attack without a string 'name'"),
])
def test_a_plugin_that_fails_to_register_is_skipped_and_reported(fresh_plugins, thirdparty_path, capsys,
                                                                    body, error):
    """A user's plugin whose registration hook raised, that registered a name robbench (or itself) had
    registered, or an object without a name, stopped every command with a traceback (robbench plugins
    too). Like a plugin that fails to import, it is now skipped whole (its model too) and reported."""
    from robbench import cli

    install_plugin(thirdparty_path, "robbench_broken_pkg", _BROKEN_PLUGIN.format(body=body), "robbench-broken-pkg", "0.2")
    try:
        regs = fresh_plugins.get_registries()
        assert "broken_pkg_model" not in regs.models and "mine" not in regs.attacks
        assert regs.attacks.source("noise") == BUILTIN_DIST and "tp_linear" in regs.models
        (failure,) = fresh_plugins.plugin_failures()
        assert (failure.name, failure.source) == ("broken_pkg", "robbench-broken-pkg 0.2")
        assert error in failure.error, failure.error
        assert cli.main(["plugins"]) == 1  # listed, and a failing status for scripts (test_plugin_author.py)
        out = " ".join(capsys.readouterr().out.split())
        assert "plugin broken_pkg" in out and "skipped" in out
    finally:
        sys.modules.pop("robbench_broken_pkg", None)
