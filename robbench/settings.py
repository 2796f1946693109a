"""Run-wide settings: the one typed object every estimator reads as ``ctx.run``.

Two radii appear in robbench and are kept apart by name:
- ``r`` is the **output-space** radius of r-robustness: p_r = P(||g(z) - g(mu(x))||_2 <= r), in the
  units of the decoder output (flattened image, L2);
- ``rho`` is an **input-space** radius: the L2 norm of a perturbation delta of x, what attacks are
  given and what the robustness margin R measures.

The defaults live here and only here; ``RunConfig`` (YAML keys / flags) and ``robbench.evaluate``
take theirs from :class:`RunSettings`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from robbench.inputrange import UNITS


# Seeds are stored as SQLite INTEGERs and seed torch generators: both take 64-bit signed values.
SEED_RANGE = "an integer in [-2^63, 2^63 - 1]"


def is_seed(value: Any) -> bool:
    """An int (not a bool) that fits a 64-bit signed integer: what SEED_RANGE allows."""
    return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63


@dataclass(frozen=True)
class RunSettings:
    """Settings shared by every estimator of a run (plugin parameters are separate).

    r: output-space radius of r-robustness (L2, decoder-output units), > 0;
    m: probability threshold, in (0, 1): x is r-robust when p_r > m;
    confidence: level of every reported interval, in (0, 1);
    backend: Monte Carlo backend name ("auto" or a registered backend, see :mod:`robbench.backends`);
    seed: root of every random stream (points, attacks, Monte Carlo);
    device: torch device name the estimators run on ("cpu", "cuda", "cuda:N");
    units: "l2" (r and every size as given) or "rms": r and the input-space sizes an estimator declares
    are per-pixel RMS values in units of the model's input-range width, turned into L2 sizes just
    before the estimator runs (:mod:`robbench.units`).
    """

    r: float = 4.0
    m: float = 0.5
    confidence: float = 0.95
    backend: str = "auto"
    seed: int = 0
    device: str = "cpu"
    units: str = "l2"

    # Keys that define results (job keys hash them); the device does not change a number.
    HASHED = ("r", "m", "confidence", "backend", "seed", "units")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return asdict(cls())

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (device included), as stored with each job in the run's results database."""
        return asdict(self)

    def hashed(self) -> dict[str, Any]:
        """The result-defining settings as a plain dict (what job keys are computed from). ``units`` is left
        out at its default, so results stored before it existed keep their keys."""
        return {k: getattr(self, k) for k in self.HASHED if not (k == "units" and self.units == "l2")}

    def with_overrides(self, overrides: dict[str, Any]) -> "RunSettings":
        """A copy with some settings replaced (e.g. one estimator's own ``r``); unknown keys raise TypeError."""
        unknown = sorted(set(overrides) - set(self.keys()))
        if unknown:
            raise TypeError(f"unknown run-wide setting(s) {', '.join(map(repr, unknown))}; "
                            f"allowed: {', '.join(self.keys())}")
        settings = replace(self, **overrides)
        settings.check()
        return settings

    def check(self) -> None:
        """ValueError naming the first setting outside its documented domain (the checks a config file's
        values get, for settings given from Python)."""
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for key, ok, allowed in (
                ("r", number(self.r) and self.r > 0, "a finite positive number"),
                ("m", number(self.m) and 0 < self.m < 1, "a number in (0, 1)"),
                ("confidence", number(self.confidence) and 0 < self.confidence < 1, "a number in (0, 1)"),
                ("seed", is_seed(self.seed), SEED_RANGE),
                ("backend", isinstance(self.backend, str) and self.backend != "",
                 "auto or the name of a registered backend"),
                ("device", isinstance(self.device, str), "a torch device name such as cpu or cuda:0"),
                ("units", self.units in UNITS, ", ".join(UNITS))):
            if not ok:
                raise ValueError(f"bad value for {key!r}: {getattr(self, key)!r}; allowed: {allowed}")


RUN_WIDE_KEYS: tuple[str, ...] = RunSettings.keys()
