"""``robbench.evaluate``: run registered attacks and estimators on a model from Python (no CLI, no store).

    table = robbench.evaluate(model, x, attacks=["max_damage"], estimators=["margin", "bound"],
                              r=4.0, estimator_params={"margin": {"tolerance": 0.1}})
    table.rows[0]        # {"attack": "max_damage", "estimator": "margin", "point": 0, "margin": ..., ...}
    table.to_csv("out.csv")
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from robbench.config import merge_params
from robbench.plugins import get_registries
from robbench.protocols import ARRAYS_KEY, EstimationContext, VAEModel

RUN_WIDE_DEFAULTS: dict[str, Any] = {"r": 4.0, "m": 0.5, "confidence": 0.95, "backend": "auto", "seed": 0}
ID_COLUMNS = ("attack", "estimator", "point")


@dataclass
class ResultTable:
    """Tidy results: one row (dict) per (attack, estimator, point). ``attack`` is None for estimators
    that need no attack; ``point`` is the point's id (its index in ``data`` unless ``point_ids`` given)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    # Tensors some estimators return for figures (e.g. margin: x, x_adv, recon, recon_adv), keyed by
    # (attack, estimator, point).
    arrays: dict[tuple[str | None, str, int], dict[str, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    @property
    def columns(self) -> list[str]:
        """The id columns, then every metric key in order of first appearance."""
        cols = list(ID_COLUMNS)
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def select(self, **where: Any) -> "ResultTable":
        """Rows whose columns equal the given values, e.g. ``table.select(estimator="margin")``."""
        return ResultTable([r for r in self.rows if all(r.get(k) == v for k, v in where.items())])

    def column(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (lists JSON-encoded, None as empty); also written to ``path`` when given."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                             for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text


def _merge(plugin: Any, given: dict[str, Any], *, run_wide_allowed: bool) -> dict[str, Any]:
    """The plugin's defaults with ``given``, checked like a config file's (names, types, ``validate``).
    Estimators may also override run-wide keys (r, m, ...) for themselves; attacks have no such keys."""
    own = {k: v for k, v in given.items() if not (run_wide_allowed and k in RUN_WIDE_DEFAULTS)}
    overrides = {k: v for k, v in given.items() if k not in own}
    return {**merge_params(plugin, own), **overrides}


def evaluate(model: VAEModel, data: Tensor, attacks: Sequence[str] = ("max_damage",),
             estimators: Sequence[str] = ("margin",), *, attack_params: dict[str, dict[str, Any]] | None = None,
             estimator_params: dict[str, dict[str, Any]] | None = None, point_ids: Tensor | None = None,
             batch_size: int | None = None, device: torch.device | str | None = None,
             **run_params: Any) -> ResultTable:
    """Run each estimator on ``data`` (B, *input_shape) in [0, 1], once per attack for estimators that
    need one and once otherwise. Names are looked up in the plugin registries and validated, with the
    parameters, before any work starts.

    run_params: run-wide keys ``r`` (4.0), ``m`` (0.5), ``confidence`` (0.95), ``backend`` ("auto"),
    ``seed`` (0); they reach every estimator and may be overridden per estimator in ``estimator_params``.
    ``attack_params`` / ``estimator_params``: {name: {key: value}} over the plugin's defaults.
    ``batch_size``: points per estimator call (default all at once).
    """
    unknown = sorted(set(run_params) - set(RUN_WIDE_DEFAULTS))
    if unknown:
        raise TypeError(f"evaluate() got unknown run-wide parameter(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(RUN_WIDE_DEFAULTS)}; use attack_params= / estimator_params= "
                        "for plugin parameters")
    run = {**RUN_WIDE_DEFAULTS, **run_params}
    regs = get_registries()
    attack_params, estimator_params = dict(attack_params or {}), dict(estimator_params or {})
    for name in attack_params:
        if name not in attacks:
            raise ValueError(f"attack_params given for {name!r}, which is not among attacks={list(attacks)}")
    for name in estimator_params:
        if name not in estimators:
            raise ValueError(f"estimator_params given for {name!r}, which is not among estimators={list(estimators)}")
    atk = {name: regs.attacks.get(name) for name in attacks}
    est = {name: regs.estimators.get(name) for name in estimators}
    a_params = {name: _merge(a, attack_params.get(name, {}), run_wide_allowed=False) for name, a in atk.items()}
    e_params = {name: {**run, **_merge(e, estimator_params.get(name, {}), run_wide_allowed=True)}
                for name, e in est.items()}

    dev = torch.device(device) if device is not None else data.device
    data = data.to(dev)
    ids = torch.arange(data.shape[0]) if point_ids is None else torch.as_tensor(point_ids).long()
    if ids.shape[0] != data.shape[0]:
        raise ValueError(f"point_ids has {ids.shape[0]} entries for {data.shape[0]} points")
    step = batch_size or data.shape[0]
    table = ResultTable()
    for e_name, estimator in est.items():
        pairs = [(a_name, atk[a_name]) for a_name in attacks] if estimator.needs_attack else [(None, None)]
        for a_name, attack in pairs:
            for start in range(0, data.shape[0], step):
                x, bid = data[start:start + step], ids[start:start + step]
                params = dict(e_params[e_name])
                ctx = EstimationContext(model=model, attack=attack,
                                        attack_params=a_params[a_name] if a_name else {}, params=params,
                                        point_ids=bid, seed=int(params["seed"]), device=dev)
                results = estimator(ctx, x)
                if len(results) != x.shape[0]:
                    raise RuntimeError(f"estimator {e_name!r} returned {len(results)} rows for {x.shape[0]} points")
                for pid, metrics in zip(bid.tolist(), results):
                    arrays = metrics.pop(ARRAYS_KEY, None)
                    if arrays:
                        table.arrays[(a_name, e_name, pid)] = arrays
                    table.rows.append({"attack": a_name, "estimator": e_name, "point": pid, **metrics})
    return table
