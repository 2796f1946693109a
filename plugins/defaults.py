"""The default selection of a run: what ``robbench run`` and ``robbench.evaluate`` use for the models,
attacks, estimators and data set the user does not name (the paper's main experiment: beta-VAEs under
the maximum-damage attack, margins, Theorem 1 bounds and encoder statistics on MNIST)."""
from __future__ import annotations

from typing import Any

from robbench.hookspecs import hookimpl

DEFAULT_RUN: dict[str, Any] = {"models": ["beta_vae"], "attacks": ["max_damage"],
                               "estimators": ["margin", "bound", "encoder_stats"], "dataset": "mnist"}


@hookimpl
def default_run() -> dict[str, Any]:
    return {key: list(value) if isinstance(value, list) else value for key, value in DEFAULT_RUN.items()}
