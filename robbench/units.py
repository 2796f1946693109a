"""Sizes given relative to the data, and the warning for margins that hit the attack cap.

With the run-wide setting ``units: rms`` the output radius ``r`` and every input-space L2 size an
estimator declares in ``input_sizes`` (e.g. the margin's ``max_radius`` and ``tolerance``) are read as
per-pixel RMS values in units of the model's input-range width, and are turned into L2 sizes here,
just before the estimator runs: size_L2 = size * sqrt(D) * (hi - lo) (:func:`robbench.inputrange.rms_scale`);
per-pixel sizes an estimator declares in ``pixel_sizes`` (e.g. a noise standard deviation) scale by
(hi - lo) only.
Reconstructions live in the input space, so ``r`` uses the same scale. ``units: l2`` (default) leaves
every number as given. Results are always in L2 units.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

from robbench.inputrange import UNITS, input_range, rms_scale
from robbench.settings import RunSettings

CAP_WARNING_SHARE = 0.2  # warn when at least this share of a job's margins sit at the cap


def absolute_settings(estimator: Any, params: dict[str, Any], run: RunSettings,
                      model: Any) -> tuple[dict[str, Any], RunSettings]:
    """(estimator params, run settings) with ``run.units == "rms"`` sizes turned into L2 sizes for
    ``model``: ``run.r`` and the estimator's ``input_sizes`` times √D·(hi − lo), its ``pixel_sizes``
    times (hi − lo); the returned settings say ``units="l2"``. Unchanged for ``units="l2"``."""
    units = getattr(run, "units", "l2")
    if units not in UNITS:
        raise ValueError(f"bad value for 'units': {units!r}; allowed: {', '.join(UNITS)}")
    if units == "l2":
        return dict(params), run
    box = input_range(model)
    scale = rms_scale(tuple(model.input_shape), box)
    out = dict(params)
    for key in getattr(estimator, "input_sizes", ()):
        if out.get(key) is not None:
            out[key] = float(out[key]) * scale
    for key in getattr(estimator, "pixel_sizes", ()):  # per-pixel sizes (a noise sd): the range width only
        if out.get(key) is not None:
            out[key] = float(out[key]) * (box[1] - box[0])
    return out, replace(run, r=float(run.r) * scale, units="l2")


def cap_warning(label: str, rows: Iterable[dict[str, Any]], max_radius: Any,
                share: float = CAP_WARNING_SHARE) -> str | None:
    """A warning when at least ``share`` of the rows carrying ``at_cap`` have it set: those margins
    are censored (R >= cap), so the cap, not the model, decides the number."""
    flags = [bool(row["at_cap"]) for row in rows if "at_cap" in row]
    hit = sum(flags)
    if not flags or hit / len(flags) < share:
        return None
    return (f"{label}: {hit} of {len(flags)} margins hit the attack cap max_radius={max_radius} "
            f"(censored: R >= cap); raise margin.max_radius, or give sizes relative to the data with "
            f"units: rms")
