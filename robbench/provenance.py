"""What a result was computed with: settings that define comparability, and the environment.

Every ``robbench run`` records one provenance record in the run's database (table ``provenance``):

- ``settings``: the settings two leaderboards must share to be compared (data set, r, m, units,
  confidence, the attack portfolio with its parameters, the estimators with their parameters and the
  version of the distribution that provides each) — see :data:`COMPARABILITY_KEYS`;
- ``models``: each model configuration's family and parameters, by label;
- ``environment``: robbench's version, Python, platform, package versions, torch and its CUDA/cuDNN
  versions, the device, and the git commit of the robbench source (when it is a git checkout).

``leaderboard.json`` and ``robbench export`` carry the same record.
"""
from __future__ import annotations

import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import robbench

COMPARABILITY_KEYS = ("dataset", "r", "m", "units", "confidence", "attacks", "estimators")
def package_versions() -> dict[str, str]:
    """Installed versions of robbench's declared dependencies (optional extras included, read from its
    package metadata) and of the distributions that provide the loaded plugins; what is not installed
    is left out."""
    names: list[str] = []
    try:
        requires = metadata.requires("robbench") or []
    except metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        match = re.match(r"[A-Za-z0-9._-]+", req)
        if match and match.group(0) not in names:
            names.append(match.group(0))
    from robbench.plugins import plugin_distributions

    names += [n for n in plugin_distributions() if n not in names and n != "robbench"]
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """{"commit": sha, "dirty": bool} of the git checkout holding ``path`` (robbench's source), or None."""
    where = Path(path or Path(robbench.__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device and commit of this process (JSON-ready)."""
    dev = torch.device(device)
    cuda_name = None
    if dev.type == "cuda" and torch.cuda.is_available():
        cuda_name = torch.cuda.get_device_name(dev)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "robbench": robbench.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
                  "cuda_available": torch.cuda.is_available()},
        "device": {"name": str(dev), "cuda_device": cuda_name, "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads()},
        "git": git_commit(),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def algorithm_versions(plugin: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The plugin's ``key_versions`` entries ({parameter: (when, {key: version})}) that apply to ``params``:
    {key: version} (empty for most plugins). ``when`` is a value (the entry applies while the parameter
    holds it, same type) or a predicate on the parameter's value (e.g. the margin's ``refine`` > 0)."""
    out: dict[str, Any] = {}
    for name, (when, version) in (getattr(plugin, "key_versions", None) or {}).items():
        if name not in params:
            continue
        value = params[name]
        if callable(when):
            applies = bool(when(value))
        else:
            applies = type(value) is type(when) and value == when
        if applies:
            out.update(version)
    return out


def comparability_settings(cfg: Any, regs: Any) -> dict[str, Any]:
    """The settings of a RunConfig that decide whether two results can be compared (JSON-ready)."""
    from robbench.config import attack_configs, estimator_params

    attacks = sorted(([a.name, a.params] for a in attack_configs(cfg, regs)), key=lambda item: repr(item))
    estimators = {}
    for name in cfg.estimators:
        params = estimator_params(cfg, regs, name)
        estimators[name] = {"params": params, "from": regs.estimators.source(name)}
        # the algorithm versions the job keys hash (e.g. the margin's verify_algorithm): results of another
        # version under the same parameters are not comparable; absent where none applies, as before
        versions = algorithm_versions(regs.estimators.get(name), params)
        if versions:
            estimators[name]["versions"] = versions
    return {"dataset": cfg.dataset, "r": cfg.r, "m": cfg.m, "units": cfg.units, "confidence": cfg.confidence,
            "attacks": attacks, "estimators": estimators}


def run_provenance(cfg: Any, regs: Any, models: list[Any]) -> dict[str, Any]:
    """The record a run stores: settings, model configurations (label -> family, params) and environment."""
    return {"settings": comparability_settings(cfg, regs),
            # point_seed: the seed that picked the points (`seed` unless a retest run set it); point_batch
            # can change results in their last bits (float rounding), so a reader needs both to reproduce
            "run": {"points": cfg.points, "seed": cfg.seed, "point_seed": cfg.points_seed(),
                    "point_batch": cfg.point_batch, "model_seeds": cfg.model_seeds,
                    "backend": cfg.backend, "device": cfg.device, "threads": getattr(cfg, "threads", None),
                    "train": cfg.to_dict()["train"]},
            "models": {m.label: {"family": m.family, "params": m.params} for m in models},
            "environment": environment(cfg.device)}
