"""The robbench plugin contract: every hook a plugin may implement.

A plugin is a module (or object) with ``@robbench.hookimpl`` functions, exposed to robbench through
an entry point in the ``robbench`` group of its own package's metadata::

    [project.entry-points.robbench]
    my_models = "my_package.robbench_plugin"

Each hook receives a ``register`` callback and calls it once per object it contributes. The objects
meet the protocols in :mod:`robbench.protocols`. Built-in plugins load through the same group.
"""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("robbench")
hookimpl = pluggy.HookimplMarker("robbench")


# --- models -----------------------------------------------------------------------------------
@hookspec
def register_models(register: Callable) -> None:
    """Register model families: call ``register(ModelFamily(...))`` once per family.

    The family's name is what users type after ``--models``; it must be unique across plugins.
    """


# --- data sets --------------------------------------------------------------------------------
@hookspec
def register_datasets(register: Callable) -> None:
    """Register data sets: call ``register(DatasetSpec(...))`` once per data set (``--dataset``)."""


# --- attacks ----------------------------------------------------------------------------------
@hookspec
def register_attacks(register: Callable) -> None:
    """Register attacks: call ``register(attack)`` with an object meeting
    :class:`robbench.protocols.Attack` (``--attacks``)."""


# --- estimators -------------------------------------------------------------------------------
@hookspec
def register_estimators(register: Callable) -> None:
    """Register estimators: call ``register(estimator)`` with an object meeting
    :class:`robbench.protocols.Estimator` (``--estimators``)."""


# --- Monte Carlo backends ---------------------------------------------------------------------
@hookspec
def register_backends(register: Callable) -> None:
    """Register Monte Carlo backends: call ``register(backend)`` with an object meeting
    :class:`robbench.backends.Backend` (``--backend``, ``robbench bench --backend``). ``--backend auto``
    picks the available backend with the highest ``auto_priority``."""


# --- defaults ---------------------------------------------------------------------------------
@hookspec(firstresult=True)
def default_run() -> dict | None:
    """The selection used for what a user leaves out: a mapping with any of ``models``, ``attacks``,
    ``estimators`` (lists of registered names) and ``dataset`` (a name). Single answer
    (``firstresult=True``): the first plugin returning a mapping decides. robbench's built-in plugins
    answer with the paper's main experiment; the harness itself names no plugin."""
