"""The plugin manager: loads the ``robbench`` entry-point group and builds the registries.

Built-in plugins (package ``robbench_plugins``) are declared as entry points in robbench's own
metadata, so they load through exactly the same path as a third party's. Set
``ROBBENCH_PLUGINS=name1,name2`` to load only the entry points with those names (plus any plugin a
caller registers by hand, as tests do).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
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


_manager: pluggy.PluginManager | None = None
_registries: Registries | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with the entry-point group loaded once."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("robbench")
        pm.add_hookspecs(hookspecs)
        from robbench import engine_backends  # the engine's own backends: always registered

        pm.register(engine_backends, name="robbench.engine_backends")
        only = os.environ.get("ROBBENCH_PLUGINS")
        if only:
            _load_selected(pm, {n.strip() for n in only.split(",") if n.strip()})
        else:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _manager = pm
    return _manager


def _load_selected(pm: pluggy.PluginManager, names: set[str]) -> None:
    for name in sorted(names):
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)


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
    for loaded, dist in pm.list_plugin_distinfo():
        if loaded is plugin:
            return f"{dist.metadata['name']} {dist.version}"
    if getattr(plugin, "__name__", "") == "robbench.engine_backends":
        from robbench import __version__

        return f"robbench {__version__} (engine)"
    return f"(registered by hand: {pm.get_name(plugin)})"


def get_registries() -> Registries:
    """Call every registration hook once and return the filled registries (cached)."""
    global _registries
    if _registries is not None:
        return _registries
    pm = get_plugin_manager()
    regs = Registries()
    hooks = {"model": pm.hook.register_models, "dataset": pm.hook.register_datasets,
             "attack": pm.hook.register_attacks, "estimator": pm.hook.register_estimators,
             "backend": pm.hook.register_backends}
    for kind, hook in hooks.items():
        registry = regs.by_kind()[kind]
        for impl in hook.get_hookimpls():
            source = _plugin_source(pm, impl.plugin)

            def register(obj: Any, _registry: Registry = registry, _source: str = source) -> None:
                _registry.add(obj.name, obj, _source)

            impl.function(register=register)
    _registries = regs
    return regs
