"""Set-up shared by the attack_basins scripts: the command line's run arguments, one thread, and the main
command's data, margin points and run settings as benchmarks/margin_convergence.py makes them."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # margin_convergence
from margin_convergence import margin_inputs  # noqa: E402
from robbench.cli import _add_run_arguments, config_from_args  # noqa: E402
from robbench.plugins import get_registries  # noqa: E402


def run_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argument parser that takes robbench run's arguments (--models, --points, --seed, ...)."""
    ap = argparse.ArgumentParser(description=description)
    _add_run_arguments(ap)
    return ap


def load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(run config, registries, data, points x (B, ...), their ids (B,), margin run settings), at 1 thread:
    the scripts measure CPU seconds and compare searches, not thread scaling."""
    torch.set_num_threads(1)
    cfg = config_from_args(args)
    regs = get_registries()
    data, x, ids, run = margin_inputs(cfg, regs)
    return cfg, regs, data, x, ids, run


def pick_points(x: torch.Tensor, ids: torch.Tensor, spec: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The points at the comma-separated positions in spec (e.g. "9,20"); all points when spec is empty."""
    if not spec:
        return x, ids
    pick = torch.tensor([int(i) for i in spec.split(",")])
    return x[pick], ids[pick]
