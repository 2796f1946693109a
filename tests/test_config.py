"""Configuration: defaults, YAML, flags, sweeps, and errors that name the key and value."""
from __future__ import annotations

import pytest

from robbench.config import (ConfigError, attack_configs, build_config, model_configs, parse_param_flag,
                             validate_against_plugins)
from robbench.plugins import get_registries
from robbench.registry import UnknownNameError


@pytest.fixture(scope="module")
def regs():
    return get_registries()


def test_defaults_are_the_papers(regs):
    cfg = build_config({})
    assert (cfg.r, cfg.m, cfg.points) == (4.0, 0.5, 25)
    labels = [m.label for m in model_configs(cfg, regs)]
    assert labels == ["beta_vae(beta=0.1)", "beta_vae(beta=1.0)", "beta_vae(beta=10.0)"]


def test_beta_list_and_seeds_expand(regs):
    cfg = build_config({"model_params": {"beta_vae": {"beta": [0.5, 2]}}, "model_seeds": [0, 1]})
    validate_against_plugins(cfg, regs)
    configs = model_configs(cfg, regs)
    assert [(m.params["beta"], m.seed) for m in configs] == [(0.5, 0), (0.5, 1), (2, 0), (2, 1)]


def test_attack_parameter_list_sweeps(regs):
    cfg = build_config({"attack_params": {"max_damage": {"route": ["mu", "sigma"]}}})
    validate_against_plugins(cfg, regs)
    assert [a.label for a in attack_configs(cfg, regs)] == ["max_damage(route=mu)", "max_damage(route=sigma)"]


@pytest.mark.parametrize("values, message", [
    ({"points": 0}, "'points': 0"),
    ({"m": 1.5}, "'m': 1.5"),
    ({"pointz": 3}, "unknown config key 'pointz'"),
    ({"point_seed": "a"}, "'point_seed': 'a'"),
    ({"train": {"epochs": -1}}, "'train.epochs': -1"),
    ({"train": {"epoch": 1}}, "unknown key 'train.epoch'"),
])
def test_bad_values_name_key_and_value(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_config(values)


def test_unknown_backend_lists_the_registered_ones(regs):
    with pytest.raises(ConfigError, match="'backend': 'gpu'; allowed: auto, cpp, cuda, torch"):
        validate_against_plugins(build_config({"backend": "gpu"}), regs)


def test_unknown_names_list_available(regs):
    with pytest.raises(UnknownNameError) as info:
        validate_against_plugins(build_config({"models": ["nosuch"]}), regs)
    assert "beta_vae" in str(info.value) and "nosuch" in str(info.value)


def test_plugin_parameter_errors(regs):
    with pytest.raises(ConfigError, match="unknown parameter 'gamma' for beta_vae; allowed:.*beta"):
        validate_against_plugins(build_config({"model_params": {"beta_vae": {"gamma": 1}}}), regs)
    with pytest.raises(ConfigError, match="bad value for beta_vae.beta: 'big'"):
        validate_against_plugins(build_config({"model_params": {"beta_vae": {"beta": ["big"]}}}), regs)
    with pytest.raises(ConfigError, match="run-wide setting"):
        validate_against_plugins(build_config({"estimator_params": {"margin": {"r": 2}}}), regs)


def test_param_flag_parses_yaml_values(regs):
    assert parse_param_flag("beta_vae.beta=[0.1, 1]", regs) == ("model_params", "beta_vae", "beta", [0.1, 1])
    assert parse_param_flag("max_damage.route=mu", regs) == ("attack_params", "max_damage", "route", "mu")
    with pytest.raises(ConfigError, match="no model, attack or estimator is called 'nope'"):
        parse_param_flag("nope.x=1", regs)
    with pytest.raises(ConfigError, match="expected NAME.KEY=VALUE"):
        parse_param_flag("beta=1", regs)


def test_whole_numbers_name_the_same_model_as_floats(regs):
    from robbench.runner import model_key

    given = build_config({"model_params": {"beta_vae": {"beta": [0.1, 1, 10]}}})
    default = build_config({})
    assert [m.label for m in model_configs(given, regs)] == [m.label for m in model_configs(default, regs)]
    assert [model_key(given, m) for m in model_configs(given, regs)] == \
        [model_key(default, m) for m in model_configs(default, regs)]


def test_train_section_shares_the_training_defaults():
    from robbench.config import TrainSettings
    from robbench.training import TrainConfig

    assert TrainSettings().for_seed(3) == TrainConfig(seed=3)
    assert build_config({"train": {"epochs": 2}}).train.for_seed(1) == TrainConfig(epochs=2, seed=1)


@pytest.mark.parametrize("text", [
    "d: &d {points: 3}\na:\n  <<: *d\n  points: 4\n",
    "b: &B {x: 0}\nc: &C {x: 1}\nr:\n  <<: [*B, *C]\n  x: 2\n",
    # an anchor defined inside a merge and aliased again: PyYAML flattens its node (B's x added) before
    # the alias builds it; the key check said "key 'x' is given twice" (review rc, session 9)
    "b: &B {x: 0}\nr:\n  <<: &A {<<: *B, x: 1}\n  y: 2\ns: *A\n",
])
def test_merge_keys_override_without_being_called_repeats(text):
    """Merge keys read as PyYAML's safe loader reads them (overrides are no repeats)."""
    import yaml

    from robbench.config import yaml_value

    assert yaml_value(text) == yaml.safe_load(text)


def test_a_repeated_key_inside_an_aliased_mapping_is_still_found():
    from robbench.config import yaml_value

    with pytest.raises(Exception, match="key 'x' is given twice"):
        yaml_value("b: &B {x: 0, x: 1}\nr: *B\n")
    with pytest.raises(Exception, match="key 'a' is given twice"):
        yaml_value("m: [{a: 1, a: 2}]\n")
