"""robbench: a benchmark harness for the adversarial robustness of variational autoencoders.

Public API: ``robbench.evaluate`` (run attacks and estimators on a model from Python),
``robbench.hookimpl`` (the marker for plugin hooks), and the protocols in ``robbench.protocols``.
"""
from typing import Any

from robbench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["evaluate", "hookimpl", "__version__"]


def __getattr__(name: str) -> Any:
    # evaluate pulls in the plugin registries; load it only when asked for, so that plugins can
    # import robbench.hookimpl cheaply.
    if name == "evaluate":
        from robbench.api import evaluate
        return evaluate
    raise AttributeError(f"module 'robbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily loaded evaluate too, so that help(), dir() and tab completion show it
    return sorted({*globals(), *__all__})
