"""Property: whatever YAML document and --param values a user gives, `robbench run` either accepts a valid
configuration or exits with status 2 and a message. Never a traceback.

The CLI entry point is called in-process with --dry-run (validate, plan the jobs, do nothing else), so a
few hundred random configurations take seconds.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from robbench.cli import main  # noqa: E402
from robbench.config import RunConfig, TrainSettings  # noqa: E402
from robbench.plugins import get_registries  # noqa: E402

# CI runs a fixed, modest sample; ROBBENCH_PROPERTY_EXAMPLES=N runs N fresh random examples per property.
_EXTRA = int(os.environ.get("ROBBENCH_PROPERTY_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_EXTRA or 80, deadline=None, derandomize=not _EXTRA,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_regs = get_registries()
PLUGINS = {"model_params": _regs.models, "attack_params": _regs.attacks, "estimator_params": _regs.estimators}
NAMES = sorted({n for reg in PLUGINS.values() for n in reg.names()}) + ["nosuch"]
PARAM_KEYS = sorted({k for reg in PLUGINS.values() for n in reg.names() for k in reg.get(n).defaults}) + ["nosuch"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.floats(),
                    st.integers(-3, 70), st.floats(-2, 20), st.text(max_size=10),
                    st.sampled_from(["mu", "sigma", "both", "auto", "cpu", "cuda", "torch", "clean", "kl", "[]"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


def _plugin_params(section: str):
    reg = PLUGINS[section]
    return st.dictionaries(st.sampled_from(reg.names() + ["nosuch"]),
                           st.one_of(st.dictionaries(st.sampled_from(PARAM_KEYS), values, max_size=3), values),
                           max_size=2)


_FIELD_VALUES = {
    "models": st.one_of(st.lists(st.sampled_from(_regs.models.names() + ["nosuch"]), max_size=3), values),
    "attacks": st.one_of(st.lists(st.sampled_from(_regs.attacks.names()), max_size=2), values),
    "estimators": st.one_of(st.lists(st.sampled_from(_regs.estimators.names()), max_size=3), values),
    "dataset": st.one_of(st.sampled_from(_regs.datasets.names()), values),
    "train": st.one_of(st.dictionaries(st.sampled_from([f.name for f in fields(TrainSettings)] + ["x"]),
                                       values, max_size=3), values),
    "model_params": st.one_of(_plugin_params("model_params"), values),
    "attack_params": st.one_of(_plugin_params("attack_params"), values),
    "estimator_params": st.one_of(_plugin_params("estimator_params"), values),
}
documents = st.fixed_dictionaries({}, optional={f.name: _FIELD_VALUES.get(f.name, values) for f in fields(RunConfig)})
param_flags = st.lists(st.builds(lambda n, k, v: f"{n}.{k}={v}", st.sampled_from(NAMES), st.sampled_from(PARAM_KEYS),
                                 st.one_of(st.text(max_size=12), values.map(lambda v: yaml.safe_dump(
                                     v, default_flow_style=True).strip()))),
                       max_size=3)


def _check(capsys, argv: list[str]) -> int:
    code = main(argv)  # any exception here is the traceback a user would have seen
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("robbench: error: ") and len(err.strip()) > len("robbench: error:"), err
    else:
        assert "configuration valid" in out
    return code


@SETTINGS
@given(doc=documents, params=param_flags)
def test_random_yaml_documents_and_params_never_traceback(capsys, doc, params):
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.yaml"
        config.write_text(yaml.safe_dump(doc, allow_unicode=True))
        _check(capsys, ["run", "--config", str(config), "--dry-run", *(f"--param={p}" for p in params)])


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_text_never_tracebacks(capsys, text):
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.yaml"
        config.write_text(text, encoding="utf-8", errors="surrogateescape")
        _check(capsys, ["run", "--config", str(config), "--dry-run"])


def test_the_strategies_reach_both_outcomes(capsys):
    """The property is not vacuous: some documents are valid, some are rejected."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.yaml"
        config.write_text("models: [vae]\npoints: 3\nmodel_params: {vae: {latent_dim: 2}}\n")
        assert _check(capsys, ["run", "--config", str(config), "--dry-run"]) == 0
        config.write_text("models: [vae]\npoints: -3\n")
        assert _check(capsys, ["run", "--config", str(config), "--dry-run"]) == 2
