"""robbench's own Monte Carlo backends, registered through the ``register_backends`` hook exactly as a
third party's would be (the plugin manager always registers this module, whatever ``ROBBENCH_PLUGINS``
selects, because the engine cannot run without its reference backend)."""
from __future__ import annotations

from typing import Callable

from robbench.backends import TorchBackend
from robbench.hookspecs import hookimpl
from robbench.kernels import CppBackend, CudaBackend


@hookimpl
def register_backends(register: Callable) -> None:
    register(TorchBackend())
    register(CppBackend())
    register(CudaBackend())
