"""robbench: a benchmark harness for the adversarial robustness of variational autoencoders."""
from robbench.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
