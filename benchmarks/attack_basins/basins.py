"""Set-up shared by the attack_basins scripts: the command line's run arguments, one thread, and the main
command's data, margin points and run settings as benchmarks/margin_convergence.py makes them; for the
scripts that study chosen points of one model (--pick, --beta), those points, the models and the default
attack's recorded bisection chain."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # margin_convergence
from margin_convergence import FP32, environment, margin_inputs, measure, trained_models  # noqa: E402
from robbench.cli import _add_run_arguments, config_from_args  # noqa: E402
from robbench.plugins import get_registries  # noqa: E402


def run_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argument parser that takes robbench run's arguments (--models, --points, --seed, ...)."""
    ap = argparse.ArgumentParser(description=description)
    _add_run_arguments(ap)
    return ap


def point_parser(description: str | None = None) -> argparse.ArgumentParser:
    """:func:`run_parser` with --pick (positions in the margin point set) and --beta (the model: a substring
    of its label, e.g. 10.0)."""
    ap = run_parser(description)
    ap.add_argument("--pick", default="9,20", help="comma-separated positions in the margin point set")
    ap.add_argument("--beta", default="10.0", help="the model whose label contains this (all: every model)")
    return ap


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(run config, registries, data, points x (B, ...), their ids (B,), margin run settings), at 1 thread:
    the scripts measure CPU seconds and compare searches, not thread scaling."""
    torch.set_num_threads(1)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = margin_inputs(cfg, regs)
    return cfg, regs, data, x, ids, run


def positions(spec: str | None, count: int) -> torch.Tensor:
    """The positions named by spec (e.g. "9,20"); all ``count`` positions when spec is empty."""
    return torch.tensor([int(i) for i in spec.split(",")]) if spec else torch.arange(count)


def pick_points(x: torch.Tensor, ids: torch.Tensor, spec: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The points at the comma-separated positions in spec (e.g. "9,20"); all points when spec is empty."""
    if not spec:
        return x, ids
    pick = positions(spec, len(ids))
    return x[pick], ids[pick]


@dataclass
class Picked:
    """The --pick points of the margin point set and what the scripts run on them."""

    cfg: Any
    regs: Any
    data: Any
    x: torch.Tensor          # (B, *input_shape) the picked points
    ids: torch.Tensor        # (B,) their test-set ids
    positions: torch.Tensor  # (B,) their positions in the margin point set (what --pick named)
    run: dict[str, Any]      # margin run settings (r, m, ...)
    margin_params: dict[str, Any]  # the margin estimator's defaults
    attack: Any              # max_damage

    def models(self, beta: str) -> Iterator[tuple[Any, torch.nn.Module]]:
        """(model config, trained model) of each model whose label contains ``beta`` ("all": every model)."""
        for mc, model in trained_models(self.cfg, self.regs, self.data):
            if beta == "all" or beta in mc.label:
                yield mc, model

    def default_chain(self, model: torch.nn.Module, overrides: dict[str, Any] | None = None,
                      env: Any = FP32) -> tuple[dict[str, Any], list[tuple]]:
        """The margin measurement of the picked points with the default attack (``overrides`` on its
        defaults), under ``env`` (fp32 engine by default), and its recorded attack calls (:class:`Rec`)."""
        rec = Rec(self.attack)
        with environment(env):
            res = measure(model, self.x, self.ids, rec, {**self.attack.defaults, **(overrides or {})},
                          self.margin_params, self.run)
        return res, rec.calls


def picked_inputs(args: argparse.Namespace) -> Picked:
    """:func:`load_inputs`, then the --pick points, the margin defaults and the max_damage attack."""
    cfg, regs, data, x, ids, run = load_inputs(args)
    pick = positions(args.pick, len(ids))
    return Picked(cfg, regs, data, x[pick], ids[pick], pick, run, dict(regs.estimators.get("margin").defaults),
                  regs.attacks.get("max_damage"))


class Rec:
    """An attack that records each call: (point ids, radii, returned δ, warm-started?)."""

    def __init__(self, attack: Any):
        self.attack, self.calls = attack, []
        self.name, self.description, self.defaults = attack.name, attack.description, attack.defaults

    def __call__(self, model, x, radius, **kw):
        from robbench.protocols import call_attack
        res = call_attack(self.attack, model, x, radius, **kw)
        self.calls.append((kw.get("point_ids").clone(), radius.clone(), res.delta.clone(), kw.get("init") is not None))
        return res
