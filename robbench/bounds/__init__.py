"""Certified bounds on an encoder-mean network over an L2 ball of inputs.

- :mod:`robbench.bounds.network`: a network given as torch modules -> a list of dense steps
  (affine maps, elementwise activations, MaxMin/GroupSort), the form every bound works on.
- :mod:`robbench.bounds.spectral`: certified upper bounds of spectral norms (exact SVD or Gram iteration)
  next to a power-iteration estimate.
- :mod:`robbench.bounds.activations`: value and derivative ranges of activations over intervals.
- :mod:`robbench.bounds.ball`: the global Lipschitz bound and the local interval-Jacobian bound of
  sup_{||delta|| <= rho} ||(mu(x + delta) - mu(x)) / sigma||_2.

All arithmetic is float64; every certified quantity is inflated by :data:`ROUNDING_SLACK` (relative) to
cover floating-point rounding, which is many orders of magnitude smaller.
"""
from __future__ import annotations

ROUNDING_SLACK = 1e-6
