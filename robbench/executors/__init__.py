"""Executors with optional dependencies, one module each (``ray``: :class:`robbench.executors.ray.RayExecutor`).

The local executor lives in :mod:`robbench.execute`; :data:`robbench.execute.EXECUTORS` names them all
and imports one of these modules only when its executor is asked for, so the core never imports an
optional engine.
"""
