"""The plugin manager: loads the ``robbench`` entry-point group and builds the registries.

Built-in plugins (package ``robbench_plugins``) are declared as entry points in robbench's own
metadata, so they load through exactly the same path as a third party's. Set
``ROBBENCH_PLUGINS=name1,name2`` to load only the entry points with those names (plus any plugin a
caller registers by hand, as tests do).
"""
from __future__ import annotations

import numbers
import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from robbench import hookspecs
from robbench.registry import Registry

ENTRY_POINT_GROUP = "robbench"


@dataclass
class Registries:
    """Everything the loaded plugins registered."""

    models: Registry = field(default_factory=lambda: Registry("model"))
    datasets: Registry = field(default_factory=lambda: Registry("dataset"))
    attacks: Registry = field(default_factory=lambda: Registry("attack"))
    estimators: Registry = field(default_factory=lambda: Registry("estimator"))
    backends: Registry = field(default_factory=lambda: Registry("backend"))

    def by_kind(self) -> dict[str, Registry]:
        return {"model": self.models, "dataset": self.datasets, "attack": self.attacks,
                "estimator": self.estimators, "backend": self.backends}


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that could not be loaded (or whose registration hook raised): it is skipped."""

    name: str          # entry-point name
    target: str        # what it points at, e.g. "my_package.robbench_plugin"
    source: str        # "distribution version"
    error: str         # "ExceptionType: message"


_manager: pluggy.PluginManager | None = None
_registries: Registries | None = None
_sources: dict[str, str] = {}          # plugin name in the manager -> "distribution version"
_failures: list[PluginFailure] = []


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with the entry-point group loaded once. An entry point that
    fails to import is recorded (:func:`plugin_failures`) and skipped, so one broken plugin does not
    stop every command."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("robbench")
        pm.add_hookspecs(hookspecs)
        from robbench import engine_backends  # the engine's own backends: always registered

        pm.register(engine_backends, name="robbench.engine_backends")
        only = os.environ.get("ROBBENCH_PLUGINS")
        _failures.clear()
        _load_entry_points(pm, {n.strip() for n in only.split(",") if n.strip()} if only else None)
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager, names: set[str] | None) -> None:
    seen: set[str] = set()
    installed: set[str] = set()
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                installed.add(ep.name)
            if ep.group != ENTRY_POINT_GROUP or (names is not None and ep.name not in names):
                continue
            if ep.name in seen or pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue  # a distribution found twice on sys.path loads once, like pluggy's own loader
            seen.add(ep.name)
            source = f"{dist.metadata['name']} {dist.version}"
            try:
                plugin = ep.load()
            except Exception as err:  # an ImportError, or anything the module raises on import
                _failures.append(PluginFailure(ep.name, ep.value, source, f"{type(err).__name__}: {err}{_where(err)}"))
                continue
            try:  # pluggy checks each hook's arguments against its spec here
                pm.register(plugin, name=ep.name)
            except pluggy.PluginValidationError as err:
                _failures.append(PluginFailure(ep.name, ep.value, source, _signature_error(err, plugin)))
                continue
            unknown = _unknown_hooks(plugin)
            if unknown:  # a misspelt hook would register nothing, without a word
                pm.unregister(plugin)
                _failures.append(PluginFailure(ep.name, ep.value, source, unknown))
                continue
            _sources[ep.name] = source
    for name in sorted((names or set()) - installed):  # a typo would otherwise just load nothing
        _failures.append(PluginFailure(name, "no entry point", "ROBBENCH_PLUGINS", "ROBBENCH_PLUGINS names no installed entry point "
                                       f"{name!r}; installed: {', '.join(sorted(installed)) or 'none'}"))


def _hook_names() -> list[str]:
    return sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "robbench_spec"))


def _unknown_hooks(plugin: Any) -> str:
    """What is wrong with ``plugin``'s ``@hookimpl`` functions that match no robbench hook ("" if none)."""
    import difflib

    known = _hook_names()
    problems = []
    for attr in sorted(dir(plugin)):
        hook = _implements(plugin, attr)  # pluggy's @hookimpl(specname=...) implements that hook under any name
        if hook is not None and hook not in known:
            close = difflib.get_close_matches(hook, known, n=1)
            shown = attr if hook == attr else f"{attr} (specname {hook!r})"
            problems.append(f"{shown}{f' (did you mean {close[0]}?)' if close else ''}")
    if not problems:
        return ""
    return (f"HookError: @hookimpl function(s) {', '.join(problems)} match no robbench hook; "
            f"the hooks are {', '.join(known)} (robbench/hookspecs.py)")


def _signature_error(err: pluggy.PluginValidationError, plugin: Any) -> str:
    """A hook whose arguments are not the spec's, said with the signature to write."""
    import inspect

    text = str(err).replace("\n", " ")
    for name in _hook_names():
        impls = sorted((attr for attr in dir(plugin) if _implements(plugin, attr) == name),
                       key=lambda attr: f"definition: {attr}(" not in text)  # the one pluggy names first
        if f"hook '{name}'" in text and impls:
            def call(label: str, function: Any) -> str:
                return f"{label}({', '.join(inspect.signature(function).parameters)})"

            return (f"HookError: {call(impls[0], getattr(plugin, impls[0]))} does not match the hook "
                    f"{call(name, getattr(hookspecs, name))}: argument names must be the spec's (robbench/hookspecs.py)")
    return f"{type(err).__name__}: {text}"


def _implements(plugin: Any, attr: str) -> str | None:
    """The hook ``plugin.attr`` implements (its ``@hookimpl(specname=...)`` or its own name), None if none."""
    opts = getattr(getattr(plugin, attr, None), "robbench_impl", None)
    return (opts.get("specname") or attr) if isinstance(opts, dict) else None


def plugin_distributions() -> list[str]:
    """Names of the distributions the loaded entry-point plugins came from."""
    get_plugin_manager()
    return sorted({source.rsplit(" ", 1)[0] for source in _sources.values()})


def plugin_failures() -> list[PluginFailure]:
    """The entry points that failed to load or to register, with their errors (after loading)."""
    get_registries()
    return list(_failures)


def failure_text(failure: PluginFailure) -> str:
    """One line naming a skipped plugin, where it came from and its error, for warnings."""
    return (f"plugin {failure.name} ({failure.target}, from {failure.source}) failed to load and was skipped: "
            f"{failure.error}")


_warned: set[PluginFailure] = set()


def warn_failures() -> None:
    """Issue a ``RuntimeWarning`` for each plugin that failed to load or register (once per process), so a
    caller of the Python API learns why a plugin's names are missing instead of meeting silence."""
    import warnings

    for failure in plugin_failures():
        if failure not in _warned:
            _warned.add(failure)
            warnings.warn(f"robbench: {failure_text(failure)}", RuntimeWarning, stacklevel=3)


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object by hand (tests, notebooks); registries are rebuilt on next use."""
    global _registries
    get_plugin_manager().register(plugin, name=name)
    _registries = None


def unregister_plugin(plugin: Any) -> None:
    global _registries
    get_plugin_manager().unregister(plugin)
    _registries = None


def _plugin_source(pm: pluggy.PluginManager, plugin: Any) -> str:
    name = pm.get_name(plugin)
    if name in _sources:
        return _sources[name]
    if getattr(plugin, "__name__", "") == "robbench.engine_backends":
        from robbench import __version__

        return f"robbench {__version__} (engine)"
    return f"(registered by hand: {name})"


def _where(err: BaseException) -> str:
    """`` (file.py:line)`` of the innermost frame that raised ``err``, for the plugin's author."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen ")]
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


def _is_builtin(source: str) -> bool:
    return source.split(" ", 1)[0] == "robbench"


# What the harness reads from a registered attack or estimator besides its name (robbench/protocols.py):
# a missing one would surface later as an AttributeError traceback from inside a command.
# defaults: any Mapping (config.merge_params copies it with dict()), as before this check existed.
# needs_attack: the harness only asks `if est.needs_attack`, so what is unambiguously a boolean passes: bool,
# a numpy bool scalar, the integers 0 and 1 (numpy's too); text ("no" is truthy), other numbers and None do not.
def _is_boolean(value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return True
    dtype = getattr(value, "dtype", None)  # numpy.bool_ (not an Integral); robbench's core needs no numpy import
    return (type(value).__module__ == "numpy" and getattr(dtype, "kind", None) == "b"
            and getattr(value, "ndim", None) == 0)


_REQUIRED = {"attack": (("defaults", lambda v: isinstance(v, Mapping),
                         "a dict of every parameter with its default, {} for none"),),
             "estimator": (("defaults", lambda v: isinstance(v, Mapping),
                            "a dict of every parameter with its default, {} for none"),
                           ("needs_attack", _is_boolean, "True when the estimator runs an attack, else False"))}


def _check_contract(kind: str, name: str, obj: Any) -> None:
    """TypeError naming the attribute a registered attack or estimator lacks, or ``__call__``."""
    for attr, accepts, what in _REQUIRED.get(kind, ()):
        value = getattr(obj, attr, None)
        if not hasattr(obj, attr) or not accepts(value):
            got = "it has none" if not hasattr(obj, attr) else f"got {type(value).__name__} {value!r}"
            raise TypeError(f"{kind} {name!r} ({type(obj).__name__}) needs the attribute {attr}: {what}; {got}")
    if kind in _REQUIRED and not callable(obj):
        raise TypeError(f"{kind} {name!r} ({type(obj).__name__}) is not callable: define __call__ "
                        f"({'model, x, radius, *, params, generator, init=None' if kind == 'attack' else 'ctx, x'})")


def get_registries() -> Registries:
    """Call every registration hook once and return the filled registries (cached).

    An installed (entry-point) plugin whose hook raises, that registers an object without a string
    ``name``, or a name robbench's own plugins or an earlier plugin registered, is skipped whole (what its
    other hooks registered too) and listed in :func:`plugin_failures`: one broken plugin must not stop
    every command. Built-ins are placed first, so a clash is always the third party's. A plugin
    registered by hand (tests, notebooks) raises instead, as the caller's own code."""
    global _registries
    if _registries is not None:
        return _registries
    pm = get_plugin_manager()
    hooks = {"model": pm.hook.register_models, "dataset": pm.hook.register_datasets,
             "attack": pm.hook.register_attacks, "estimator": pm.hook.register_estimators,
             "backend": pm.hook.register_backends}
    _failures[:] = [f for f in _failures if not f.target.startswith("register_")]  # found again below
    staged: dict[str, list[tuple[str, str, Any, str]]] = {}  # plugin name -> (kind, name, object, source)
    broken: set[str] = set()

    def fail(plugin_name: str, target: str, source: str, error: str) -> None:
        broken.add(plugin_name)
        _failures.append(PluginFailure(plugin_name, target, source, error))

    for kind, hook in hooks.items():
        for impl in hook.get_hookimpls():
            source = _plugin_source(pm, impl.plugin)
            if impl.plugin_name in broken:
                continue
            items = staged.setdefault(impl.plugin_name, [])

            def register(obj: Any, _kind: str = kind, _items: list = items, _source: str = source) -> None:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise TypeError(f"register() was given a {type(obj).__name__} without a string 'name'")
                _check_contract(_kind, name, obj)
                _items.append((_kind, name, obj, _source))

            try:
                impl.function(register=register)
            except Exception as err:
                # ImportError (a hook importing the plugin's own model code lazily) from any plugin;
                # anything else from an installed one; a plugin registered by hand raises
                if not isinstance(err, ImportError) and impl.plugin_name not in _sources:
                    raise
                fail(impl.plugin_name, f"register_{kind}s", source, f"{type(err).__name__}: {err}{_where(err)}")
    regs = Registries()
    order = sorted(staged, key=lambda name: not any(_is_builtin(item[3]) for item in staged[name]))
    taken: dict[tuple[str, str], str] = {}  # (kind, name) -> the source that registered it
    for plugin_name in order:
        if plugin_name in broken:
            continue
        clash = None
        mine: set[tuple[str, str]] = set()
        for kind, name, _obj, source in staged[plugin_name]:
            if (kind, name) in mine:
                clash = f"{kind} {name!r} registered twice by this plugin"
            elif (kind, name) in taken:
                clash = f"{kind} {name!r} is registered already by {taken[kind, name]}; names must be unique"
            if clash:
                if plugin_name not in _sources:  # registered by hand: the caller's error
                    raise ValueError(f"{kind} {name!r} registered twice: by {taken.get((kind, name), source)} "
                                     f"and by {source}")
                fail(plugin_name, f"register_{kind}s", source, f"ValueError: {clash}")
                break
            mine.add((kind, name))
        if clash:
            continue
        for kind, name, obj, source in staged[plugin_name]:
            regs.by_kind()[kind].add(name, obj, source)
            taken[kind, name] = source
    _registries = regs
    return regs
