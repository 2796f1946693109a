"""Run configuration: a validated dataclass built from defaults, a YAML file and command-line flags.

Every bad value is reported as ``ConfigError`` naming the key, the value and what is allowed, before
any work starts. Plugin parameters are checked against the plugin's ``defaults`` (the documented set
of parameters); list values expand into several configurations where the plugin allows a sweep.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from robbench.execute import EXECUTORS, ExecutorUnavailable, configured_executor
from robbench.inputrange import UNITS
from robbench import paramspec
from robbench.plugins import Registries
from robbench.registry import UnknownNameError
from robbench.settings import RUN_WIDE_KEYS, SEED_RANGE, RunSettings, is_seed
from robbench.training import TrainConfig

_RUN = RunSettings()  # the run-wide defaults, defined once in robbench.settings


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message says which key, which value, what is allowed."""


_TRAIN = TrainConfig()  # training defaults, defined once in robbench.training


class RepeatedValueWarning(UserWarning):
    """A name, training seed or sweep value given more than once (``--models a,a``, ``beta: [1, 1.0]``):
    it runs once, at its first place. The command line prints it as a note."""


def unique(values: list[Any], what: str) -> list[Any]:
    """``values`` without repeats (first occurrences kept, in order); a :class:`RepeatedValueWarning`
    names the repeated ones. ``what`` names the list in the message, e.g. ``'models'``."""
    kept: list[Any] = []
    repeated: list[Any] = []
    for value in values:
        if value not in kept:
            kept.append(value)
        elif value not in repeated:
            repeated.append(value)
    if repeated:
        warnings.warn(RepeatedValueWarning(f"{what} lists {', '.join(map(repr, repeated))} more than once; "
                                           + ("it runs once" if len(repeated) == 1 else "each runs once")),
                      stacklevel=3)
    return kept


@dataclass
class TrainSettings:
    """The ``train:`` section of a config: the :class:`~robbench.training.TrainConfig` fields a user sets
    (same defaults); each model's training seed is added by :meth:`for_seed`."""

    epochs: int = _TRAIN.epochs
    batch_size: int = _TRAIN.batch_size
    lr: float = _TRAIN.lr
    patience: int | None = _TRAIN.patience

    def for_seed(self, seed: int) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                           patience=self.patience)


@dataclass
class RunConfig:
    """Everything that defines a run. Field names are the YAML keys."""

    # Empty here: build_config fills what the user leaves out from the plugins' ``default_run`` hook.
    models: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    estimators: list[str] = field(default_factory=list)
    dataset: str = ""
    data_dir: str | None = None
    points: int = 25
    # Points per estimator call. Not in the job key: it changes results only through float rounding
    # (README, "Same seed, same numbers"), and a point's batch changes anyway when a run resumes or grows.
    point_batch: int = 25
    keep_arrays: int = 8  # points per job whose tensors (adversarial inputs, ...) are kept for reports
    seed: int = _RUN.seed
    # Seed of the point selection alone; None: ``seed``. A second run with another ``seed`` and the same
    # ``point_seed`` re-measures the same points with independent attack and Monte Carlo streams (test-retest).
    point_seed: int | None = None
    model_seeds: list[int] = field(default_factory=lambda: [0])
    r: float = _RUN.r  # output-space radius of r-robustness
    m: float = _RUN.m
    confidence: float = _RUN.confidence
    backend: str = _RUN.backend
    device: str = _RUN.device
    units: str = _RUN.units  # "rms": r and estimators' input sizes per pixel RMS of the range width (robbench.units)
    executor: str = "local"  # where models train and batches run: local (this process) or ray
    ray_address: str | None = None  # executor ray: None starts a local Ray, "auto" / "ray://host:port" joins one
    # torch CPU threads while this process estimates (local executor); None: torch's default. Changes no
    # result (not part of any job or model key); recorded in the run's provenance.
    threads: int | None = None
    train: TrainSettings = field(default_factory=TrainSettings)
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    estimator_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def points_seed(self) -> int:
        """The seed that selects the evaluation points: ``point_seed``, else ``seed``."""
        return self.seed if self.point_seed is None else self.point_seed

    def run_settings(self) -> RunSettings:
        """The run-wide settings every estimator sees as ``ctx.run``."""
        # Values as given (not cast): job keys hash them, and stored results must keep their keys.
        return RunSettings(r=self.r, m=self.m, confidence=self.confidence, backend=self.backend,
                           seed=self.seed, device=self.device, units=self.units)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def make_executor(self, registries: Registries | None = None) -> Any:
        """The executor the ``executor`` / ``ray_address`` keys name, built with ``registries``; an optional
        dependency that is not installed is a ConfigError naming the install command."""
        try:
            return configured_executor(self.executor, registries=registries, ray_address=self.ray_address)
        except ExecutorUnavailable as err:
            raise ConfigError(f"bad value for 'executor': {self.executor!r}; {err}") from None


@dataclass(frozen=True)
class ModelConfig:
    """One trained model: a family, scalar parameters and a training seed."""

    family: str
    params: dict[str, Any]
    seed: int
    swept: tuple[str, ...]

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={self.params[k]}" for k in self.swept)
        return f"{self.family}({shown})" if shown else self.family


@dataclass(frozen=True)
class AttackConfig:
    name: str
    params: dict[str, Any]
    swept: tuple[str, ...]

    @property
    def label(self) -> str:
        shown = ", ".join(f"{k}={self.params[k]}" for k in self.swept)
        return f"{self.name}({shown})" if shown else self.name


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-serialisable object, independent of dict order."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- loading -----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but numbers in scientific notation are numbers (YAML 1.2, JSON): under YAML
    1.1 ``1e-3`` (no dot, no exponent sign) is text, so ``--param margin.tolerance=1e-3`` was refused."""


def _check_unique_keys(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """A ConstructorError naming the first key given twice in any mapping of the composed tree ``root``:
    PyYAML keeps the last of two equal keys, silently (YAML forbids them), so `points: 3 ... points: 4`
    ran 4 points. Checked before construction: PyYAML's merge (`<<: *anchor`, whose keys may be
    overridden) rewrites a merged node's key list in place, which would then look like repeats."""
    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in visited:  # an alias is the same node object
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                stack += [key_node, value_node]
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = loader.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key].line + 1})",
                        key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = key_node.start_mark
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                    |[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_value(text: str, name: str | None = None) -> Any:
    """``text`` parsed as YAML by the loader of config files (safe; scientific notation is a number;
    a key given twice is an error). ``name``: the file, as error messages name it."""
    loader = _Loader(text)
    if name is not None:
        loader.name = name  # messages say: in "FILE", line N (not "<unicode string>")
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_unique_keys(loader, root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; give a YAML file")
    try:
        data = yaml_value(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (UTF-8) file; give a YAML file") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def default_selection() -> dict[str, Any]:
    """What the plugins' ``default_run`` hook answers for models / attacks / estimators / dataset ({} if none)."""
    from robbench.plugins import get_plugin_manager

    answer = get_plugin_manager().hook.default_run()
    return {k: v for k, v in (answer or {}).items() if k in SELECTION_KEYS}


SELECTION_KEYS = ("models", "attacks", "estimators", "dataset")


def build_config(values: dict[str, Any]) -> RunConfig:
    """Turn a plain mapping (YAML + flags merged) into a RunConfig, checking keys and value types.
    Models, attacks, estimators and the data set the mapping leaves out come from :func:`default_selection`."""
    known = {f.name: f for f in fields(RunConfig)}
    unknown = sorted((k for k in values if k not in known), key=repr)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {', '.join(sorted(known))}")
    values = {**default_selection(), **values}
    if "train" in values:
        values["train"] = _build_train(values["train"])
    for key in ("models", "attacks", "estimators", "model_seeds"):
        if key in values and isinstance(values[key], (str, int)):
            values[key] = _split_list(values[key]) if isinstance(values[key], str) else [values[key]]
    if isinstance(values.get("model_seeds"), list):  # `model_seeds: 0,1` is text in YAML, as on the command line
        values["model_seeds"] = [int(s) if isinstance(s, str) and re.fullmatch(r"[-+]?\d+", s) else s
                                 for s in values["model_seeds"]]
    cfg = RunConfig(**values)
    _check_types(cfg)
    for key in ("models", "attacks", "estimators", "model_seeds"):
        setattr(cfg, key, unique(getattr(cfg, key), repr(key)))
    return cfg


def _split_list(text: str) -> list[Any]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _build_train(value: Any) -> TrainSettings:
    if isinstance(value, TrainSettings):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key 'train' must be a mapping, got {value!r}")
    allowed = {f.name for f in fields(TrainSettings)}
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise ConfigError(f"unknown key 'train.{key}'; allowed: {', '.join(sorted(allowed))}")
    return TrainSettings(**value)


def _check_types(cfg: RunConfig) -> None:
    def need(cond: bool, key: str, value: Any, allowed: str) -> None:
        if not cond:
            raise ConfigError(f"bad value for {key!r}: {value!r}; allowed: {allowed}")

    for key in ("models", "attacks", "estimators"):
        value = getattr(cfg, key)
        need(isinstance(value, list) and all(isinstance(v, str) for v in value), key, value,
             "a list of plugin names")
    for key in ("models", "estimators"):
        need(bool(getattr(cfg, key)), key, getattr(cfg, key),
             "at least one plugin name (no plugin's default_run hook supplies a default)")
    need(isinstance(cfg.dataset, str) and cfg.dataset != "", "dataset", cfg.dataset,
         "a data set name (no plugin's default_run hook supplies a default)")
    need(cfg.data_dir is None or isinstance(cfg.data_dir, str), "data_dir", cfg.data_dir, "null or a directory path")
    need(_is_int(cfg.points) and cfg.points > 0, "points", cfg.points, "a positive integer")
    need(_is_int(cfg.point_batch) and cfg.point_batch > 0, "point_batch", cfg.point_batch,
         "a positive integer")
    need(_is_int(cfg.keep_arrays) and cfg.keep_arrays >= 0, "keep_arrays", cfg.keep_arrays,
         "a non-negative integer")
    need(is_seed(cfg.seed), "seed", cfg.seed, SEED_RANGE)
    need(cfg.point_seed is None or is_seed(cfg.point_seed), "point_seed", cfg.point_seed, f"null or {SEED_RANGE}")
    need(isinstance(cfg.model_seeds, list) and cfg.model_seeds and all(is_seed(s) for s in cfg.model_seeds),
         "model_seeds", cfg.model_seeds, f"a non-empty list, each {SEED_RANGE}")
    need(_is_number(cfg.r) and math.isfinite(cfg.r) and cfg.r > 0, "r", cfg.r, "a finite positive number")
    need(_is_number(cfg.m) and 0 < cfg.m < 1, "m", cfg.m, "a number in (0, 1)")
    need(_is_number(cfg.confidence) and 0 < cfg.confidence < 1, "confidence", cfg.confidence,
         "a number in (0, 1)")
    need(isinstance(cfg.backend, str) and cfg.backend != "", "backend", cfg.backend,
         "auto or the name of a registered backend")
    need(isinstance(cfg.units, str) and cfg.units in UNITS, "units", cfg.units, ", ".join(UNITS))
    need(isinstance(cfg.device, str) and (cfg.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cfg.device) is not None),
         "device", cfg.device, "cpu, cuda or cuda:N")
    need(isinstance(cfg.executor, str) and cfg.executor in EXECUTORS, "executor", cfg.executor,
         ", ".join(sorted(EXECUTORS)))
    need(cfg.ray_address is None or (isinstance(cfg.ray_address, str) and cfg.ray_address.strip() != ""),
         "ray_address", cfg.ray_address, "null, auto, host:port or ray://host:port")
    need(cfg.threads is None or (_is_int(cfg.threads) and 0 < cfg.threads <= MAX_THREADS), "threads", cfg.threads,
         f"null or an integer from 1 to {MAX_THREADS}")
    if cfg.ray_address is not None and cfg.executor != "ray":
        raise ConfigError(f"'ray_address' is set ({cfg.ray_address!r}) but 'executor' is {cfg.executor!r}; "
                          "allowed: ray_address only with executor: ray")
    t = cfg.train
    need(_is_int(t.epochs) and t.epochs > 0, "train.epochs", t.epochs, "a positive integer")
    need(_is_int(t.batch_size) and t.batch_size > 0, "train.batch_size", t.batch_size,
         "a positive integer")
    need(_is_number(t.lr) and math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a finite positive number")
    need(t.patience is None or (_is_int(t.patience) and t.patience > 0), "train.patience",
         t.patience, "null or a positive integer")
    for key in ("model_params", "attack_params", "estimator_params"):
        value = getattr(cfg, key)
        need(isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items()),
             key, value, "a mapping from plugin name to a mapping of parameters")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# More threads than this only oversubscribe the cores; 100000 made the OpenMP runtime fail to map memory.
MAX_THREADS = max(64, 8 * (os.cpu_count() or 1))


def _is_int(value: Any) -> bool:
    """An int that is not a bool (YAML ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


# --- checking names and plugin parameters against the registries ------------------------------------
def validate_against_plugins(cfg: RunConfig, regs: Registries) -> None:
    """Check every plugin name and parameter; raises UnknownNameError or ConfigError."""
    if cfg.backend != "auto" and cfg.backend not in regs.backends:
        raise ConfigError(f"bad value for 'backend': {cfg.backend!r}; allowed: "
                          + ", ".join(["auto"] + regs.backends.names()))
    regs.datasets.get(cfg.dataset)
    for name in cfg.models:
        regs.models.get(name)
    for name in cfg.attacks:
        regs.attacks.get(name)
    for name in cfg.estimators:
        if regs.estimators.get(name).needs_attack and not cfg.attacks:
            raise ConfigError(f"estimator {name!r} needs an attack and 'attacks' is empty; allowed: one or more "
                              f"of {', '.join(regs.attacks.names())}, or only estimators that need none")
    for section, registry, used in (("model_params", regs.models, cfg.models),
                                    ("attack_params", regs.attacks, cfg.attacks),
                                    ("estimator_params", regs.estimators, cfg.estimators)):
        for name, params in getattr(cfg, section).items():
            if name not in registry:
                raise UnknownNameError(registry.kind, name, registry.names())
            if name not in used:
                raise ConfigError(f"{section} sets parameters of {name!r}, which this run does not use "
                                  f"(it uses: {', '.join(used)})")
    _drop_repeated_sweep_values(cfg, regs)
    model_configs(cfg, regs)
    attack_configs(cfg, regs)
    for name in cfg.estimators:
        merge_params(regs.estimators.get(name), cfg.estimator_params.get(name, {}), sweep=(),
                      reserved=RUN_WIDE_KEYS)


def _drop_repeated_sweep_values(cfg: RunConfig, regs: Registries) -> None:
    """A value given twice in a sweep (``beta: [1, 1.0, 2]``, ``route: [mu, mu]``) runs once: repeats are
    dropped from ``cfg``'s parameters here, once, with a note (1 == 1.0, as merge_params casts them)."""
    for section, registry in (("model_params", regs.models), ("attack_params", regs.attacks)):
        for name, params in getattr(cfg, section).items():
            plugin = registry.get(name)
            defaults = getattr(plugin, "defaults", {})
            for key, value in params.items():
                swept = (key in plugin.sweep if section == "model_params"  # a ModelFamily
                         else isinstance(defaults.get(key), (str, int, float, bool)))  # as attack_configs sweeps
                if swept and isinstance(value, list):
                    params[key] = unique(value, f"{name}.{key}")


def merge_params(plugin: Any, given: dict[str, Any], sweep: tuple[str, ...] = (),
                 reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """The plugin's defaults updated with ``given``; checks names and (loosely) types."""
    defaults = dict(getattr(plugin, "defaults", {}))
    constraints = dict(getattr(plugin, "constraints", None) or {})
    given = dict(given)
    for key, value in given.items():
        if key in reserved:
            raise ConfigError(f"{plugin.name}.{key} is a run-wide setting; set it with the top-level key {key!r}")
        if not isinstance(key, str) or key not in defaults:
            raise ConfigError(f"unknown parameter {key!r} for {plugin.name}; allowed: "
                              f"{', '.join(sorted(defaults)) or '(none)'}")
        if key in sweep and isinstance(defaults[key], list) and not isinstance(value, list):
            value = given[key] = [value]  # one value of a swept parameter: a sweep over one value
        if key not in constraints:  # only the default's type to go by
            _check_param_type(plugin.name, key, value, defaults[key], key in sweep)
            continue
        if key in sweep and isinstance(value, list) and not value:
            raise ConfigError(f"{plugin.name}.{key}: an empty list sweeps over nothing; give at least one value")
        for v in (value if key in sweep and isinstance(value, list) else [value]):
            problem = paramspec.check(plugin.name, key, v, constraints[key])
            if problem:
                raise ConfigError(problem)
    # 1 and 1.0 must name the same model (labels, job keys and checkpoints are hashed from these values).
    merged = {**defaults, **{key: _as_default_type(value, defaults[key]) for key, value in given.items()}}
    validate = getattr(plugin, "validate", None)
    if validate is not None:
        for combo in _expand(merged, sweep):
            try:
                validate(combo)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{plugin.name}: {err}") from None
    return merged


def _check_param_type(owner: str, key: str, value: Any, default: Any, sweepable: bool) -> None:
    if sweepable and isinstance(value, list):
        if not value:
            raise ConfigError(f"{owner}.{key}: an empty list sweeps over nothing; give at least one value")
        example = default[0] if isinstance(default, list) and default else default
        values = value
    else:
        example, values = default, [value]
    for v in values:
        if not _compatible(v, example):
            kind = "a number" if _is_number(example) else type(example).__name__
            raise ConfigError(f"bad value for {owner}.{key}: {v!r}; allowed: {kind} like {example!r}"
                              + (" or a list of them" if sweepable else ""))


def _as_default_type(value: Any, default: Any) -> Any:
    """Whole numbers given for a float parameter (or a list of floats) become floats, and whole floats
    (4096.0, 2.5e+4) given for an integer parameter become integers: either way one setting, one key."""
    example = default[0] if isinstance(default, list) and default else default
    if _is_int(example):
        cast = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v  # noqa: E731
    elif isinstance(example, float):
        cast = lambda v: float(v) if _is_number(v) else v  # noqa: E731
    else:
        return value
    return [cast(v) for v in value] if isinstance(value, list) else cast(value)


def _compatible(value: Any, default: Any) -> bool:
    """Loose type check against the default: numbers mix, but bools, strings and lists must match."""
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if _is_number(default):
        whole = not isinstance(default, float)
        return _is_number(value) and not (whole and isinstance(value, float) and not value.is_integer())
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _expand(params: dict[str, Any], sweep: tuple[str, ...]) -> list[dict[str, Any]]:
    """Cartesian product over the swept keys that hold lists."""
    keys = [k for k in sweep if isinstance(params.get(k), list)]
    if not keys:
        return [dict(params)]
    combos = []
    for values in itertools.product(*(params[k] for k in keys)):
        combo = dict(params)
        combo.update(zip(keys, values))
        combos.append(combo)
    return combos


def model_configs(cfg: RunConfig, regs: Registries) -> list[ModelConfig]:
    """Expand every model family into its configurations x training seeds."""
    out: list[ModelConfig] = []
    for name in cfg.models:
        family = regs.models.get(name)
        merged = merge_params(family, cfg.model_params.get(name, {}), sweep=tuple(family.sweep))
        swept = tuple(k for k in family.sweep if isinstance(merged.get(k), list))
        for combo in _expand(merged, tuple(family.sweep)):
            for seed in cfg.model_seeds if family.trainable else [cfg.model_seeds[0]]:
                out.append(ModelConfig(name, combo, seed, swept))
    return out


def attack_configs(cfg: RunConfig, regs: Registries) -> list[AttackConfig]:
    """Expand each attack: a list given for a scalar parameter sweeps it (e.g. route: [mu, sigma, both])."""
    out: list[AttackConfig] = []
    for name in cfg.attacks:
        attack = regs.attacks.get(name)
        given = cfg.attack_params.get(name, {})
        sweep = tuple(k for k, v in given.items()  # a list for a scalar parameter; not for list/None ones
                      if isinstance(v, list) and isinstance(attack.defaults.get(k), (str, int, float, bool)))
        merged = merge_params(attack, given, sweep=sweep)
        for combo in _expand(merged, sweep):
            out.append(AttackConfig(name, combo, sweep))
    return out


def estimator_params(cfg: RunConfig, regs: Registries, name: str) -> dict[str, Any]:
    """The estimator's own parameters (its defaults with the config's values); run-wide settings are
    separate (:meth:`RunConfig.run_settings`)."""
    est = regs.estimators.get(name)
    return merge_params(est, cfg.estimator_params.get(name, {}), sweep=(), reserved=RUN_WIDE_KEYS)


def parse_param_flag(flag: str, regs: Registries) -> tuple[str, str, str, Any]:
    """``NAME.KEY=VALUE`` (VALUE parsed as YAML) -> (section, plugin name, key, value)."""
    if "=" not in flag or "." not in flag.split("=", 1)[0]:
        raise ConfigError(f"--param {flag!r}: expected NAME.KEY=VALUE, e.g. beta_vae.beta=[0.1,1,10]")
    target, raw = flag.split("=", 1)
    name, key = target.split(".", 1)
    try:
        value = yaml_value(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--param {flag!r}: the value {raw!r} is not valid YAML") from None
    sections = [(section, reg) for section, reg in (("model_params", regs.models), ("attack_params", regs.attacks),
                                                     ("estimator_params", regs.estimators)) if name in reg]
    if not sections and name == "train":
        keys = ", ".join(f.name for f in fields(TrainSettings))
        raise ConfigError(f"--param {flag!r}: training settings are not plugin parameters; give them in the config "
                          f"file's train: section ({keys}), or the number of epochs with --epochs")
    if not sections:
        available = regs.models.names() + regs.attacks.names() + regs.estimators.names()
        raise ConfigError(f"--param {flag!r}: no model, attack or estimator is called {name!r}; "
                          f"available: {', '.join(available)}")
    return sections[0][0], name, key, value


def validate_runtime(cfg: RunConfig, regs: Registries) -> None:
    """The device and Monte Carlo backend are usable on this machine; ConfigError before any work otherwise.
    ``cpp`` is checked for a compiler only (building it is the run's first work, with its own fallback)."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device.startswith("cuda"):
        if not cuda:
            raise ConfigError(f"bad value for 'device': {cfg.device!r}; CUDA is not available here (allowed: cpu)")
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"bad value for 'device': {cfg.device!r}; this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) (allowed: cpu, cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1})")
    if cfg.backend == "auto":
        return
    allowed = ", ".join(["auto"] + [n for n in regs.backends.names() if n != cfg.backend])
    if cfg.backend == "cuda" and not cuda:
        raise ConfigError(f"bad value for 'backend': 'cuda'; CUDA is not available here (allowed: {allowed})")
    if cfg.backend == "cpp":
        from robbench import kernels

        if cfg.device != "cpu":
            raise ConfigError(f"bad value for 'backend': 'cpp' with device {cfg.device!r}; it runs on the CPU "
                              f"only (allowed: {allowed})")
        if not kernels.compiler_available():
            raise ConfigError("bad value for 'backend': 'cpp'; no C++ compiler and ninja were found to build "
                              f"the compiled kernels here (allowed: {allowed})")
        return
    why = regs.backends.get(cfg.backend).unavailable(torch.device(cfg.device))
    if why:
        raise ConfigError(f"bad value for 'backend': {cfg.backend!r} with device {cfg.device!r}: {why} "
                          f"(allowed: {allowed})")
