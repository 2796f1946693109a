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
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Iterator

import torch
from torch import Tensor

from robbench.atomic import replace_text
from robbench.checks import checked
from robbench.config import default_selection, merge_params, unique
from robbench.execute import Batch, Executor, JobSpec, LocalExecutor
from robbench.inputrange import check_in_range, input_range
from robbench.plugins import get_registries, warn_failures
from robbench.protocols import VAEModel
from robbench.settings import RunSettings
from robbench.units import absolute_settings, cap_warning
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
        """One value per row, in row order (None where a row lacks ``name``)."""
        return [r.get(name) for r in self.rows]

    def to_csv(self, path: str | Path | None = None) -> str:
        """CSV text (lists JSON-encoded, None as empty); also written to ``path`` when given (replaced whole:
        a failed write leaves the previous file)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else v)
                             for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            replace_text(Path(path), text)
        return text

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` with one row per result and :attr:`columns` as columns (pandas is an
        optional dependency: ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("ResultTable.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame([{c: row.get(c) for c in self.columns} for row in self.rows], columns=self.columns)


def _merge(plugin: Any, given: dict[str, Any], *, run_wide_allowed: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plugin's defaults with ``given``, checked like a config file's (names, types, ``validate``),
    run-wide overrides). Estimators may override run-wide settings (r, m, ...) for themselves; attacks
    have no such keys."""
    own = {k: v for k, v in given.items() if not (run_wide_allowed and k in RunSettings.HASHED)}
    overrides = {k: v for k, v in given.items() if k not in own}
    return merge_params(plugin, own), overrides


def _names(names: str | Iterable[str], what: str) -> list[str]:
    """A list of plugin names; one name may be given as a plain string. A repeated name runs once
    (a RepeatedValueWarning says so). Any ordered iterable of names is taken (a list, a tuple, dict keys, a
    numpy array); a set (whose order would make the row order vary with the hash seed) or a non-iterable (a
    number) is a TypeError naming ``what``."""
    if isinstance(names, str):
        return [names]
    if isinstance(names, (set, frozenset)) or not isinstance(names, Iterable):
        raise TypeError(f"{what} must be a name or a list of names, got {type(names).__name__} {names!r}")
    # str(): a numpy array's names are numpy.str_, shown as np.str_('x') in messages and keys
    return unique([str(name) if isinstance(name, str) else name for name in names], f"{what!r}")


def _plugin_params(given: Any, what: str) -> dict[str, dict[str, Any]]:
    """``given`` ({name: {key: value}} or None) as a dict, a TypeError naming ``what`` when it or one of its
    values is not a dict."""
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise TypeError(f"{what} must be a dict {{name: {{key: value}}}}, got {type(given).__name__} {given!r}")
    for name, params in given.items():
        if not isinstance(params, dict):
            raise TypeError(f"{what}[{name!r}] must be a dict {{key: value}}, got {type(params).__name__} {params!r}")
    return dict(given)


def _point_ids(point_ids: Any, count: int) -> Tensor:
    """(count,) int64 ids of the points: ``torch.arange(count)`` when None. Ids must be distinct non-negative
    integers (each point's random streams and its row are keyed by its id): otherwise a TypeError or
    ValueError names what is wrong."""
    if point_ids is None:
        return torch.arange(count)
    try:
        ids = torch.as_tensor(point_ids)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"point_ids must be a sequence or tensor of integers: {err}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"point_ids must hold integers, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != count:
        raise ValueError(f"point_ids must be one id per point, shape ({count},); got shape {tuple(ids.shape)}")
    ids = ids.long().cpu()
    if count and int(ids.min()) < 0:
        raise ValueError(f"point_ids must be >= 0; got {int(ids.min())}")
    values, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        raise ValueError(f"point_ids repeats {', '.join(str(int(v)) for v in values[counts > 1][:5])}; "
                         "each point needs its own id")
    return ids


def _is_count(n: Any) -> bool:
    """An integer that is not a bool: Python's int or numpy's (np.int64 from a config or an array's shape
    worked before these checks existed)."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def _check_model(model: Any) -> None:
    """TypeError naming the methods of the VAE protocol that ``model`` lacks (before any work; an estimator
    would fail later with a bare AttributeError)."""
    missing = [sig for name, sig in (("encode", "encode(x) -> (mu, sigma)"), ("decode", "decode(z)"))
               if not callable(getattr(model, name, None))]
    latent, shape = getattr(model, "latent_dim", None), getattr(model, "input_shape", None)
    if not (_is_count(latent) and latent > 0):
        missing.append(f"latent_dim (a positive int; got {latent!r})" if hasattr(model, "latent_dim") else "latent_dim")
    if not (isinstance(shape, (tuple, list, torch.Size)) and shape
            and all(_is_count(n) and n > 0 for n in shape)):
        missing.append(f"input_shape (a tuple of positive ints, e.g. (1, 28, 28); got {shape!r})"
                       if hasattr(model, "input_shape") else "input_shape (e.g. (1, 28, 28))")
    if missing:
        raise TypeError(f"model {type(model).__name__} lacks {', '.join(missing)}; see robbench.protocols.VAEModel")


def _check_data(model: VAEModel, data: Any) -> None:
    """TypeError / ValueError naming what is wrong with ``data`` for ``model``, before any work: it must be
    a non-empty (B, *model.input_shape) tensor of the model's floating dtype."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor of shape (B, *input_shape), got {type(data).__name__}")
    shape = tuple(getattr(model, "input_shape", ()) or ())
    if shape and tuple(data.shape[1:]) != shape:
        raise ValueError(f"data has shape {tuple(data.shape)}; the model takes (B, {', '.join(map(str, shape))})")
    if data.shape[0] == 0:
        raise ValueError("data holds no points (its first dimension is 0)")
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if data.dtype != dtype:
        raise TypeError(f"data has dtype {data.dtype}; the model computes in {dtype}: pass data.to({dtype})")


def _device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device, refused with a ValueError naming it before any work when it is not a
    device name or names CUDA on a machine without it (torch's own errors come later and say less)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device name (e.g. cpu, cuda, cuda:0): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here (allowed: cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: robbench runs on cpu or cuda devices")
    return dev


def evaluate(model: VAEModel, data: Tensor, attacks: str | Iterable[str] | None = None,
             estimators: str | Iterable[str] | None = None, *, attack_params: dict[str, dict[str, Any]] | None = None,
             estimator_params: dict[str, dict[str, Any]] | None = None, point_ids: Tensor | None = None,
             batch_size: int | None = None, device: torch.device | str | None = None,
             executor: Executor | None = None, **run_params: Any) -> ResultTable:
    """Run each estimator on ``data`` (B, *input_shape), a float tensor of the model's dtype with finite
    values in the model's declared input range ([0, 1] unless ``model.input_range`` says otherwise; a
    TypeError or ValueError names what is wrong otherwise), once per attack for estimators that need one
    and once otherwise. The model is put in eval mode. Names are looked up in the plugin registries and
    validated, with the parameters and the run-wide settings, before any work starts.
    ``attacks`` / ``estimators``: lists (any ordered iterable, not a set) of names, or one name; left as None they take the run defaults (the plugins' ``default_run`` hook;
    with robbench's built-in plugins: the maximum-damage attack and the margin, bound and
    encoder-statistics estimators). A ``RuntimeWarning`` says when a share of margins hit the attack cap.

    run_params: run-wide settings ``r`` (output-space radius), ``m``, ``confidence``, ``backend``,
    ``seed``, ``units`` ("l2", or "rms": r and the estimators' input sizes per pixel RMS of the range
    width, see :mod:`robbench.units`) (defaults: :class:`robbench.settings.RunSettings`); they reach
    every estimator as ``ctx.run`` and may be overridden per estimator in ``estimator_params``.
    ``attack_params`` / ``estimator_params``: {name: {key: value}} over the plugin's defaults.
    ``point_ids``: (B,) distinct non-negative integer ids of the points (default 0..B-1): each point's
    random streams and its rows are keyed by its id, so the same id gives the same draws in any batch.
    ``batch_size``: points per estimator call (default all at once). ``executor``: where batches run
    (default :class:`robbench.execute.LocalExecutor`); estimator errors are raised, not recorded.
    """
    unknown = sorted(set(run_params) - set(RunSettings.HASHED))
    if unknown:
        raise TypeError(f"evaluate() got unknown run-wide parameter(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(RunSettings.HASHED)}; use attack_params= / estimator_params= "
                        "for plugin parameters")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"bad value for batch_size: {batch_size!r}; allowed: a positive integer or None (all at once)")
    regs = get_registries()
    warn_failures()  # a broken installed plugin is skipped: say so before its names are found missing
    defaults = default_selection()
    attacks = _names(defaults.get("attacks", []) if attacks is None else attacks, "attacks")
    estimators = _names(defaults.get("estimators", []) if estimators is None else estimators, "estimators")
    if not estimators:
        raise ValueError("estimators is empty: nothing to evaluate; available: "
                         + ", ".join(sorted(regs.estimators.names())))
    attack_params = _plugin_params(attack_params, "attack_params")
    estimator_params = _plugin_params(estimator_params, "estimator_params")
    if executor is not None and not callable(getattr(executor, "map", None)):
        raise TypeError(f"executor must have a map(model, batches) method (see robbench.execute.Executor), "
                        f"got {type(executor).__name__} {executor!r}")
    for name in attack_params:
        if name not in attacks:
            raise ValueError(f"attack_params given for {name!r}, which is not among attacks={list(attacks)}")
    for name in estimator_params:
        if name not in estimators:
            raise ValueError(f"estimator_params given for {name!r}, which is not among estimators={list(estimators)}")
    atk = {name: regs.attacks.get(name) for name in attacks}
    est = {name: regs.estimators.get(name) for name in estimators}
    for name, estimator in est.items():
        if estimator.needs_attack and not attacks:
            raise ValueError(f"estimator {name!r} needs an attack and attacks is empty; give attacks=[...]")
    a_params = {name: _merge(a, attack_params.get(name, {}), run_wide_allowed=False)[0] for name, a in atk.items()}

    _check_model(model)
    _check_data(model, data)
    if isinstance(model, torch.nn.Module):
        model.eval()  # dropout / batch-norm in inference mode, as the runner does
    check_in_range(data, input_range(model))
    model = checked(model)  # NaN/inf from encode or decode raises PluginOutputError where it appears
    dev = _device(device) if device is not None else data.device
    run = RunSettings(device=str(dev)).with_overrides(run_params)
    data = data.to(dev)
    ids = _point_ids(point_ids, data.shape[0])
    jobs = []
    for e_name, estimator in est.items():
        params, overrides = _merge(estimator, estimator_params.get(e_name, {}), run_wide_allowed=True)
        e_run = run.with_overrides(overrides)
        for a_name in (attacks if estimator.needs_attack else [None]):
            jobs.append(JobSpec(e_name, a_name, a_params[a_name] if a_name else {}, params, e_run))
    step = batch_size or data.shape[0]
    batches = [Batch(job, ids[start:start + step].tolist(), data[start:start + step])
               for job in jobs for start in range(0, data.shape[0], step)]
    table = ResultTable()
    for batch, results in (executor or LocalExecutor(registries=regs, raise_errors=True)).map(model, batches):
        for res in results:
            if res.arrays:
                table.arrays[(batch.job.attack, batch.job.estimator, res.point)] = res.arrays
            table.rows.append({"attack": batch.job.attack, "estimator": batch.job.estimator, "point": res.point,
                               **res.metrics})
    for job in jobs:
        cap = absolute_settings(est[job.estimator], job.params, job.run, model)[0].get("max_radius")
        warning = cap_warning(f"{job.estimator} / {job.attack}",
                              table.select(attack=job.attack, estimator=job.estimator).rows, cap)
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return table
