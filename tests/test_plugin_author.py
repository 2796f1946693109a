"""What a plugin author meets when a plugin is wrong: each case a clear message naming the plugin and what
is wrong, found by writing a third-party package from the README only (session 10)."""
from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
from conftest import install_plugin

from robbench import hookimpl

_IMPORT_FAILS = "import robbench_missing_dependency_xyz  # the plugin's own import fails\n"


@pytest.fixture
def broken_plugin(fresh_plugins, thirdparty_path, monkeypatch):
    """An 'installed' plugin (dist-info with an entry point) whose module fails to import."""
    install_plugin(thirdparty_path, "robbench_imp_broken", _IMPORT_FAILS, "robbench-imp-broken", "0.3")
    yield fresh_plugins
    sys.modules.pop("robbench_imp_broken", None)


def test_plugins_exits_nonzero_when_a_plugin_failed_to_load(broken_plugin, capsys):
    """`robbench plugins` listed the failure in red but exited 0: a CI step checking that a plugin
    installs could not see it. It now exits 1 (the listing is still printed)."""
    from robbench import cli

    assert cli.main(["plugins"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "plugin imp_broken (robbench_imp_broken, from robbench-imp-broken 0.3) failed to load" in out
    assert "No module named 'robbench_missing_dependency_xyz' (robbench_imp_broken.py:1)" in out
    assert "beta_vae" in out  # everything else is listed


def test_evaluate_warns_about_a_plugin_that_failed_to_load(broken_plugin, one_thread):
    """The Python API skipped a broken plugin silently: a user then met only "unknown attack" for its
    names. evaluate() now issues a RuntimeWarning naming the plugin and its error, once per process."""
    import warnings

    import robbench
    from robbench_plugins.analytic import LinearGaussianVAE

    model, x = LinearGaussianVAE(), torch.full((1, 1, 8, 8), 0.5)
    with pytest.warns(RuntimeWarning, match=r"plugin imp_broken .* No module named 'robbench_missing_dependency_xyz'"):
        table = robbench.evaluate(model, x, estimators=["encoder_stats"], attacks=[])
    assert table.select(estimator="encoder_stats").column("min_sigma") == [pytest.approx(0.5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        robbench.evaluate(model, x, estimators=["encoder_stats"], attacks=[])


@pytest.mark.parametrize("command", ["bench", "reproduce"])
def test_bench_and_reproduce_warn_about_a_plugin_that_failed_to_load(broken_plugin, monkeypatch, capsys, command):
    """`robbench bench` and `robbench reproduce` skipped a broken plugin without a word (run warned)."""
    from robbench import bench, cli
    from robbench.paper import reproduce

    monkeypatch.setattr(bench, "run", lambda args: 0)  # the warning comes before the command's own work
    monkeypatch.setattr(reproduce, "run", lambda args: 0)
    assert cli.main([command]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: plugin imp_broken failed to load and was skipped" in out and "robbench_missing_dependency_xyz" in out


_HOOK_MISTAKES = {
    "renamed_argument": ("@hookimpl\ndef register_attacks(reg):\n    pass\n",
                         "HookError: register_attacks(reg) does not match the hook register_attacks(register): "
                         "argument names must be the spec's"),
    "specname_renamed_argument": ("@hookimpl(specname='register_attacks')\ndef my_attacks(reg):\n    pass\n",
                                  "HookError: my_attacks(reg) does not match the hook register_attacks(register): "
                                  "argument names must be the spec's"),
    "misspelt_hook": ("@hookimpl\ndef register_attack(register):\n    pass\n",
                      "HookError: @hookimpl function(s) register_attack (did you mean register_attacks?) match no "
                      "robbench hook; the hooks are default_run, register_attacks,"),
}


@pytest.mark.parametrize("case", sorted(_HOOK_MISTAKES))
def test_a_hook_with_the_wrong_name_or_arguments_is_reported_not_a_traceback(fresh_plugins, thirdparty_path,
                                                                              capsys, case):
    """A hook whose argument is not called `register` made every command, `robbench plugins` included, die
    with pluggy's PluginValidationError traceback; a misspelt hook name registered nothing without a word
    (the user then met "unknown attack"). Both now skip the plugin and say what to write."""
    from robbench import cli

    text, message = _HOOK_MISTAKES[case]
    install_plugin(thirdparty_path, "robbench_hook_mistake", "from robbench import hookimpl\n\n\n" + text,
                   "robbench-hook-mistake")
    try:
        (failure,) = fresh_plugins.plugin_failures()
        assert failure.name == "hook_mistake" and message in failure.error, failure.error
        assert "tp_constant" in fresh_plugins.get_registries().attacks  # the other plugin still loads
        assert cli.main(["plugins"]) == 1
        assert "plugin hook_mistake" in " ".join(capsys.readouterr().out.split())
    finally:
        sys.modules.pop("robbench_hook_mistake", None)


class _Estimator:
    """An estimator returning ``make(sigma)`` instead of one dict per point."""

    description, defaults, needs_attack = "test", {}, False

    def __init__(self, name, make):
        self.name, self.make = name, make

    def __call__(self, ctx, x):
        sigma = ctx.model.encode(x)[1].mean(dim=1)
        return self.make(sigma)


_BAD_ROWS = {
    "tensor": (lambda s: s, "returned a Tensor; expected a list of 2 dicts of metrics, one per point"),
    "one_dict": (lambda s: {"sig": s}, "returned a dict (one dict, not a list with one dict per point)"),
    "none": (lambda s: None, "returned None; expected a list of 2 dicts"),
    "floats": (lambda s: s.tolist(), "returned a float as row 0; expected a dict of metrics"),
    "short": (lambda s: [{"sig": float(s[0])}], "returned 1 rows for 2 points"),
}


@pytest.mark.parametrize("case", sorted(_BAD_ROWS))
def test_an_estimator_returning_the_wrong_type_fails_its_rows_with_what_it_must_return(
        fresh_plugins, tmp_path, capsys, one_thread, case):
    """An estimator returning a tensor (or a list of floats) crashed the whole `robbench run` with a
    traceback ("iteration over a 0-d tensor", exit 1); returning None gave "object of type 'NoneType' has
    no len()". Now its rows fail with what an estimator must return, and the run completes."""
    from robbench import cli

    make, message = _BAD_ROWS[case]

    class Plugin:
        @hookimpl
        def register_estimators(self, register):
            register(_Estimator("bad_rows", make))

    plugin = Plugin()
    fresh_plugins.register_plugin(plugin, name="bad-rows")
    try:
        status = cli.main(["run", "--models", "linear_gaussian", "--dataset", "digits", "--estimators",
                           "bad_rows,encoder_stats", "--attacks", "noise", "--points", "2", "--threads", "1",
                           "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        fresh_plugins.unregister_plugin(plugin)
    out = " ".join(capsys.readouterr().out.split())
    assert status == 0
    assert f"EstimatorOutputError: estimator 'bad_rows' {message}" in out, out
    assert "mean min σ" in out  # the other estimator's rows are there
    # the location is the plugin's estimator, not robbench's check (it said "(checks.py:99)")
    line = _Estimator.__call__.__code__.co_firstlineno
    assert f"(estimator _Estimator.__call__ in {__name__}, test_plugin_author.py:{line})" in out, out
    assert "checks.py" not in out


def test_a_malformed_rows_error_names_the_function_a_builtin_style_estimator_wraps():
    """An estimator built as robbench_plugins' BuiltinEstimator(fn=...) is located at its fn, the plugin's
    own code, not at the wrapper's __call__ nor at robbench's check."""
    from robbench.checks import EstimatorOutputError, check_estimator_rows
    from robbench.execute import describe_error
    from robbench_plugins.estimators import BuiltinEstimator

    def my_rows(ctx, x):
        return None

    est = BuiltinEstimator("mine", "test", my_rows)
    with pytest.raises(EstimatorOutputError) as err:
        check_estimator_rows("mine", est(None, None), 2, est)
    line = my_rows.__code__.co_firstlineno
    text = describe_error(err.value)
    assert text.endswith(f"(estimator {my_rows.__qualname__} in {__name__}, test_plugin_author.py:{line})"), text


def test_a_models_test_elbo_given_as_a_tensor_is_stored_as_a_number():
    """A plugin model whose loss() logs {"elbo": tensor} (natural; README says `{"elbo": ...}`) had its test
    ELBO stored as the text "tensor(-40.6357)": the leaderboard showed "—" for it. A per-example (B,)
    ELBO broke the batch weighting. Both are now turned into the batch mean; another shape is refused."""
    from robbench.training import evaluate_elbo

    class Model(torch.nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def loss(self, x):
            per_example = -x.flatten(1).sum(1)
            logs = {"scalar": per_example.mean(), "vector": per_example, "matrix": per_example[:, None] * 1,
                    "float": float(per_example.mean())}
            return per_example.mean(), {"elbo": logs[self.kind]}

    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    for kind in ("scalar", "vector", "float"):
        value = evaluate_elbo(Model(kind), x, 4, torch.device("cpu"))  # batches of 4, 4, 2
        assert type(value) is float and math.isclose(value, -4.5, rel_tol=1e-6), (kind, value)
    with pytest.raises(ValueError, match=r"logs\['elbo'\] has shape \(4, 1\) for 4 examples"):
        evaluate_elbo(Model("matrix"), x, 4, torch.device("cpu"))


def test_a_relative_path_that_is_missing_says_it_was_read_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """A config file's relative paths (factory, weights, data_dir) are read from the current directory,
    not the config file's folder: run from elsewhere, the error said only "does not exist"."""
    from robbench import cli

    project = tmp_path / "project"
    project.mkdir()
    (project / "c.yaml").write_text("models: [torch_module]\nmodel_params:\n  torch_module:\n"
                                    "    factory: my_vae.py:make\nestimators: [encoder_stats]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["run", "--config", str(project / "c.yaml"), "--dry-run"]) == 2
    assert f"factory file my_vae.py does not exist (relative paths are read from the current directory, {elsewhere})" \
        in capsys.readouterr().err
    assert cli.main(["run", "--dataset", "mnist_full", "--data-dir", "data", "--dry-run"]) == 2
    assert f"data directory data does not exist (relative paths are read from the current directory, {elsewhere})" \
        in capsys.readouterr().err


@pytest.mark.parametrize("attrs, message", [
    ({"input_shape": (1, 8, 8)}, "lacks latent_dim;"),
    ({"latent_dim": 4}, "lacks input_shape (e.g. (1, 28, 28));"),
    ({"latent_dim": "4", "input_shape": (1, 8, 8)}, "lacks latent_dim (a positive int; got '4');"),
    ({"latent_dim": 4, "input_shape": 64}, "lacks input_shape (a tuple of positive ints, e.g. (1, 28, 28); got 64)"),
])
def test_evaluate_names_a_missing_latent_dim_or_input_shape_before_any_work(attrs, message):
    """A user's own module without latent_dim gave AttributeError from inside an estimator; without
    input_shape, encoder_stats ran and margin failed midway with AttributeError; a text latent_dim gave
    "'<=' not supported between instances of 'str' and 'int'"."""
    import robbench

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 8)
            for key, value in attrs.items():
                setattr(self, key, value)

        def encode(self, x):
            mu, s = self.lin(x.flatten(1)).chunk(2, dim=1)
            return mu, torch.nn.functional.softplus(s) + 1e-3

        def decode(self, z):
            return torch.sigmoid(z.sum(1, keepdim=True)).expand(-1, 64).reshape(-1, 1, 8, 8)

    with pytest.raises(TypeError, match=re.escape(f"model Model {message}")):
        robbench.evaluate(Model(), torch.full((1, 1, 8, 8), 0.5), attacks=["max_damage"], estimators=["margin"])



@pytest.mark.parametrize("attrs", [
    {"latent_dim": np.int64(4)},                      # from a config read with numpy
    {"input_shape": tuple(np.array([1, 8, 8]))},       # numpy ints, from an array's shape
    {"input_shape": torch.Size([1, 8, 8])},
    {"input_shape": [1, 8, 8]},
], ids=["np_int64_latent_dim", "np_int_input_shape", "torch_size", "list"])
def test_evaluate_accepts_the_integer_kinds_a_model_may_hold(attrs, one_thread):
    """The session-10 latent_dim/input_shape check refused numpy integers (np.int64 latent_dim, an
    input_shape of numpy ints), with which evaluate() ran before; they are integers and are accepted."""
    import robbench
    from robbench_plugins.analytic import LinearGaussianVAE

    model = LinearGaussianVAE()
    for key, value in attrs.items():
        setattr(model, key, value)
    table = robbench.evaluate(model, torch.full((1, 1, 8, 8), 0.5), estimators=["encoder_stats"], attacks=[])
    assert table.select(estimator="encoder_stats").column("min_sigma") == [pytest.approx(0.5)]


_CONTRACT_PLUGIN = '''
from robbench import hookimpl


class Estimator:
    name, description = "bare_est", "test"
{attrs}
    def __call__(self, ctx, x):
        return [{{"v": 1.0}} for _ in range(x.shape[0])]


@hookimpl
def register_estimators(register):
    register(Estimator())
'''


@pytest.mark.parametrize("attrs, message", [
    ("    defaults = {}\n", "estimator 'bare_est' (Estimator) needs the attribute needs_attack: True when the "
                          "estimator runs an attack, else False; it has none"),
    ("    needs_attack = False\n", "needs the attribute defaults: a dict of every parameter with its default"),
    ("    defaults, needs_attack = {}, 'no'\n", "needs the attribute needs_attack: True when the estimator runs an "
                                              "attack, else False; got str 'no'"),
])
def test_an_estimator_without_the_attributes_the_harness_reads_is_reported_at_registration(
        fresh_plugins, thirdparty_path, capsys, attrs, message):
    """An estimator written without `needs_attack` (or `defaults`) registered fine, then `robbench run`
    died with "AttributeError: 'Estimator' object has no attribute 'needs_attack'" (a traceback). It is now
    skipped at registration with the attribute it needs, like any plugin that fails to register."""
    from robbench import cli

    install_plugin(thirdparty_path, "robbench_contract", _CONTRACT_PLUGIN.format(attrs=attrs), "robbench-contract")
    try:
        status = cli.main(["run", "--dataset", "digits", "--models", "linear_gaussian", "--estimators",
                           "bare_est", "--points", "2", "--dry-run"])
        text = " ".join(capsys.readouterr().out.split())
        assert status == 2 and "warning: plugin contract failed to load and was skipped" in text
        (failure,) = fresh_plugins.plugin_failures()
        assert message in failure.error, failure.error
    finally:
        sys.modules.pop("robbench_contract", None)


@pytest.mark.parametrize("value, refused", [
    ("numpy.bool_(True)", False), ("numpy.bool_(False)", False), ("1", False), ("0", False),
    ("numpy.int64(1)", False), ("True", False),
    ("'yes'", True), ("2", True), ("1.0", True), ("None", True),
])
def test_needs_attack_accepts_what_is_unambiguously_a_boolean(fresh_plugins, thirdparty_path, value, refused):
    """Session 10's registration check asked for exactly a Python bool, so `needs_attack = np.bool_(True)`
    or `= 1` (which worked before: the harness only asks `if est.needs_attack`) skipped the plugin. bool,
    numpy bool and the ints 0 / 1 are accepted; text, other numbers and None keep the clear refusal."""
    attrs = f"    defaults, needs_attack = {{}}, {value}\n"
    source = "import numpy\n" + _CONTRACT_PLUGIN.format(attrs=attrs)
    install_plugin(thirdparty_path, "robbench_contract", source, "robbench-contract")
    try:
        regs = fresh_plugins.get_registries()
        failures = fresh_plugins.plugin_failures()
        if refused:
            (failure,) = failures
            assert "needs the attribute needs_attack: True when the estimator runs an attack, else False; got" \
                in failure.error, failure.error
        else:
            assert not failures, failures
            assert bool(regs.estimators.get("bare_est").needs_attack) is (value in ("numpy.bool_(True)", "1",
                                                                                     "numpy.int64(1)", "True"))
    finally:
        sys.modules.pop("robbench_contract", None)


def test_a_trainable_family_whose_model_has_no_loss_says_to_add_one_or_mark_it_ready_built(fresh_plugins, tmp_path,
                                                                                           capsys, one_thread):
    """A user registering their pretrained module as a ModelFamily (trainable defaults to True) saw every
    row fail with "AttributeError: 'Model' object has no attribute 'loss' (module.py:1967)"."""
    from robbench import cli
    from robbench.protocols import ModelFamily
    from robbench_plugins.analytic import LinearGaussianVAE

    class NoLoss(LinearGaussianVAE):
        loss = None

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(ModelFamily(name="no_loss", description="test", build=lambda params, shape: NoLoss()))

    plugin = Plugin()
    fresh_plugins.register_plugin(plugin, name="no-loss")
    try:
        status = cli.main(["run", "--models", "no_loss", "--dataset", "digits", "--estimators", "encoder_stats",
                           "--points", "2", "--threads", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        fresh_plugins.unregister_plugin(plugin)
    out = " ".join(capsys.readouterr().out.split())
    assert status == 0
    assert ("model family 'no_loss' is trainable (ModelFamily's trainable defaults to True) but its NoLoss has no "
            "loss(x) -> (objective, {'elbo': ...}); add one, or register a ready-built model with "
            "ModelFamily(..., trainable=False)") in out, out


_READY_LOSSES = {  # a ready-built model's own loss(), not the protocol's: its rows need no ELBO
    "other_signature": (lambda self, x, recon, mu, logvar: 0.0, "TypeError: "),
    "logs_without_elbo": (lambda self, x: (torch.zeros(()), {"recon": -1.0}), "holding 'elbo'"),
    "elbo_shaped_b_by_1": (lambda self, x: (torch.zeros(()), {"elbo": torch.zeros(len(x), 1)}), "has shape"),
}


@pytest.mark.parametrize("case", sorted(_READY_LOSSES))
def test_a_ready_built_model_whose_own_loss_is_not_the_protocols_is_evaluated_without_an_elbo(
        fresh_plugins, tmp_path, capsys, one_thread, case):
    """A ready-built model (a user's module) with a ``loss`` of its own (``loss(x, recon, mu, logvar)``, logs
    without 'elbo', a (B, 1) 'elbo') failed every row ("could not be trained or loaded"), though only the
    optional test ELBO needs loss(). It is now evaluated, with a warning and no test ELBO."""
    from robbench import cli
    from robbench.protocols import ModelFamily
    from robbench_plugins.analytic import LinearGaussianVAE

    loss, why = _READY_LOSSES[case]
    model_class = type("OwnLoss", (LinearGaussianVAE,), {"loss": loss})

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(ModelFamily(name="own_loss", description="test", trainable=False,
                                 build=lambda params, shape: model_class()))

    plugin = Plugin()
    fresh_plugins.register_plugin(plugin, name="own-loss")
    try:
        with pytest.warns(UserWarning, match=r"model 'own_loss': no test ELBO reported: its loss\(\) is not") as caught:
            status = cli.main(["run", "--models", "own_loss", "--dataset", "digits", "--estimators", "encoder_stats",
                               "--points", "2", "--threads", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    finally:
        fresh_plugins.unregister_plugin(plugin)
    out = " ".join(capsys.readouterr().out.split())
    assert status == 0 and "could not be trained" not in out and "failed rows" not in out, out
    assert any(why in str(w.message) for w in caught)
    assert "own_loss │ — │ 0.5000" in out  # encoder_stats' mean min σ: the rows were computed

_VALID_STYLES = '''
import math
import types

import torch

from robbench import hookimpl
from robbench.protocols import AttackResult


class Shift:
    """An attack whose ``defaults`` is a read-only Mapping, not a dict."""

    description = "uniform shift"

    def __init__(self, name):
        self.name, self.defaults = name, types.MappingProxyType({"scale": 0.5})

    def __call__(self, model, x, radius, *, params, generator, init=None):
        step = params["scale"] * radius.view(-1, *[1] * (x.dim() - 1)) / math.sqrt(x[0].numel())
        delta = step * torch.ones_like(x)
        with torch.no_grad():
            damage = (model.decode(model.encode(x + delta)[0]) - model.decode(model.encode(x)[0])).flatten(1).norm(dim=1)
        return AttackResult(delta=delta, damage=damage)


class MuNorm:
    description, defaults = "norm of mu", types.MappingProxyType({})

    def __init__(self, name):
        self.name = name

    @property
    def needs_attack(self):  # a property is an attribute too
        return False

    def __call__(self, ctx, x):
        return tuple({"mu_norm": float(m.norm())} for m in ctx.model.encode(x)[0])  # a tuple of dicts


@hookimpl(specname="register_attacks")  # pluggy: implements register_attacks under another name
def my_attacks(register):
    register(Shift("vs_spec_shift"))


class Plugin:
    @hookimpl(tryfirst=True)
    def register_attacks(self, register, verbose=False):  # a defaulted extra argument: pluggy ignores it
        register(Shift("vs_class_shift"))

    @hookimpl
    def register_estimators(self, register):
        register(MuNorm("vs_mu_norm"))


plugin = Plugin()
'''


def test_plugins_in_other_valid_styles_load_and_run(fresh_plugins, thirdparty_path, tmp_path, capsys, one_thread):
    """The session-10 registration checks refused valid plugins: a pluggy ``@hookimpl(specname=...)``
    function was reported as "match no robbench hook", and an attack or estimator whose ``defaults`` is a
    Mapping (not a dict) as lacking ``defaults``; both loaded and ran before. They load and run again
    (a class-based plugin object, a property ``needs_attack``, a tuple of rows too)."""
    from robbench import cli

    install_plugin(thirdparty_path, "robbench_valid_styles", _VALID_STYLES, "robbench-valid-styles")
    entry = next(thirdparty_path.glob("robbench_valid_styles-*.dist-info")) / "entry_points.txt"
    entry.write_text("[robbench]\nvalid_styles = robbench_valid_styles\nvalid_class = robbench_valid_styles:plugin\n")
    try:
        assert fresh_plugins.plugin_failures() == []
        regs = fresh_plugins.get_registries()
        assert {"vs_spec_shift", "vs_class_shift"} <= set(regs.attacks) and "vs_mu_norm" in regs.estimators
        assert cli.main(["plugins"]) == 0
        status = cli.main(["run", "--models", "linear_gaussian", "--dataset", "digits", "--attacks",
                           "vs_spec_shift,vs_class_shift", "--estimators", "damage,vs_mu_norm", "--points", "1",
                           "--threads", "1", "--out", str(tmp_path / "run"), "--no-progress"])
        text = " ".join(capsys.readouterr().out.split())
        assert status == 0 and "failed on" not in text and "failed rows" not in text and "warning" not in text, text
        assert "vs_spec_shift" in text and "vs_class_shift" in text  # both on the leaderboard
    finally:
        sys.modules.pop("robbench_valid_styles", None)


def test_a_specname_naming_no_hook_is_still_reported(fresh_plugins, thirdparty_path):
    """``@hookimpl(specname=...)`` is honoured, but a misspelt specname registers nothing: reported."""
    install_plugin(thirdparty_path, "robbench_bad_specname", "from robbench import hookimpl\n\n\n"
                   "@hookimpl(specname='register_attack')\ndef mine(register):\n    pass\n", "robbench-bad-specname")
    try:
        (failure,) = fresh_plugins.plugin_failures()
        assert "mine (specname 'register_attack') (did you mean register_attacks?) match no robbench hook" \
            in failure.error, failure.error
    finally:
        sys.modules.pop("robbench_bad_specname", None)
