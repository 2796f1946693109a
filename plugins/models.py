"""Built-in models (filled in progressively)."""
from robbench.hookspecs import hookimpl  # noqa: F401
