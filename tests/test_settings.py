"""RunSettings: the typed run-wide settings, with their defaults defined once."""
from __future__ import annotations

import dataclasses

import pytest

from robbench.config import RunConfig
from robbench.settings import RUN_WIDE_KEYS, RunSettings


def test_run_config_takes_its_defaults_from_run_settings():
    cfg, run = RunConfig(), RunSettings()
    assert cfg.run_settings() == run
    assert {k: getattr(cfg, k) for k in RUN_WIDE_KEYS} == run.to_dict()


def test_settings_are_frozen_and_overrides_are_checked():
    run = RunSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.r = 2.0  # type: ignore[misc]
    assert run.with_overrides({"r": 2.0}).r == 2.0 and run.r == 4.0
    with pytest.raises(TypeError, match="'radius'.*allowed: r, m"):
        run.with_overrides({"radius": 2.0})


def test_hashed_settings_leave_out_the_device():
    # units is hashed only when not the default, so results stored before it existed keep their keys
    assert set(RunSettings().hashed()) == set(RUN_WIDE_KEYS) - {"device", "units"}
    assert set(RunSettings(units="rms").hashed()) == set(RUN_WIDE_KEYS) - {"device"}
