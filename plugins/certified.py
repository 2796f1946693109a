"""The ``certified`` estimator: a certified lower bound R_cert <= R_true of every point's margin.

Per point: p_lo, a one-sided Clopper-Pearson lower bound of p_r(x, 0) at the run confidence from
``samples`` fresh decoder samples (the Monte Carlo engine), then the largest radius whose certified bound
of ||(mu(x + delta) - mu(x)) / sigma(x)||_2 over the ball stays below Phi^-1(p_lo) - Phi^-1(m)
(see :mod:`robbench.certify` for the derivation and how it relates to the paper's Theorem 1).
Every method in ``methods`` runs and is recorded; R_cert is the largest of their radii.

Row keys: ``r_cert`` (input L2 units), ``r_cert_status`` (ok / at_cap / vacuous / vacuous_sigma),
``r_cert_method``, ``r_cert_confidence`` (the probability with which it holds: only the Monte Carlo
bound of p_r(x, 0) is random), ``r_cert_<method>`` per method, ``cert_p0``, ``cert_p0_lo``, ``cert_gap``,
``cert_samples``, ``lipschitz`` (global Lipschitz constant of mu / sigma(x)), ``lipschitz_mu`` (of mu),
``local_unstable`` (activations whose derivative is not fixed over the certified ball),
``cert_seconds`` (the bounds' time plus this point's share of the sampling).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from torch import Tensor

from robbench import stats
from robbench.certify import METHODS, EncoderCertifier, probit_gap
from robbench.hookspecs import hookimpl
from robbench.margin import estimate_probability
from robbench.protocols import EstimationContext, MetricColumn

DEFAULTS: dict[str, Any] = {"samples": 8192, "methods": list(METHODS), "max_radius": 10.0, "rel_tol": 1e-3,
                            "max_elements": 1 << 25}


def _f(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def _validate(params: dict[str, Any]) -> None:
    methods = params["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, (list, tuple)) or not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"certified.methods={params['methods']!r} must be a non-empty list of {list(METHODS)}")
    if not (isinstance(params["samples"], int) and params["samples"] >= 1):
        raise ValueError(f"certified.samples={params['samples']!r} must be an integer >= 1")
    if not float(params["max_radius"]) > 0:
        raise ValueError(f"certified.max_radius={params['max_radius']!r} must be > 0")
    if not 0 < float(params["rel_tol"]) < 1:
        raise ValueError(f"certified.rel_tol={params['rel_tol']!r} must be in (0, 1)")


class CertifiedEstimator:
    """R_cert per point; see the module docstring for the row keys."""

    name = "certified"
    description = ("certified lower bound R_cert <= R of the margin (Neyman-Pearson certificate with a "
                   "Clopper-Pearson p_r(x,0) and certified encoder bounds over the L2 ball: global "
                   "Lipschitz, sigma-folded Lipschitz, local interval Jacobian); status vacuous when p_lo <= m")
    defaults = DEFAULTS
    needs_attack = False
    # beside the attack margin (order 10-12): both sides of every point's margin, and whether they cross
    columns = (
        MetricColumn("r_cert_mean", "mean R_cert", "r_cert", "mean", "higher", ".3f", order=13),
        MetricColumn("r_cert_ratio", "R_cert/R", "r_cert", "ratio", "higher", ".2f", paired=("margin", "margin"),
                     order=14),
        MetricColumn("r_cert_above_r", "R_cert>R", "r_cert", "count_above", "lower", "d",
                     paired=("margin", "margin"), order=15),
    )

    def validate(self, params: dict[str, Any]) -> None:
        _validate(params)

    def __call__(self, ctx: EstimationContext, x: Tensor) -> list[dict[str, Any]]:
        p = ctx.params
        run = ctx.run
        r, m, confidence, backend, seed = run.r, run.m, run.confidence, run.backend, run.seed
        methods = (p["methods"],) if isinstance(p["methods"], str) else tuple(p["methods"])
        ids = torch.arange(x.shape[0]) if ctx.point_ids is None else ctx.point_ids.cpu().long()
        t0 = time.perf_counter()
        n = int(p["samples"])
        est = estimate_probability(ctx.model, x, None, r=r, n_samples=n, confidence=confidence,
                                   seed=stats.derive_seed(seed, "certified-p0"), stream_ids=ids,
                                   backend=backend)
        # one-sided: the certificate needs only p_r(x, 0) >= p_lo, with probability >= confidence
        p_lo = stats.cp_lower(est.k, est.n, 1.0 - confidence)
        with torch.no_grad():
            _, sigma = ctx.model.encode(x)
        certifier = EncoderCertifier(ctx.model, methods=methods, max_elements=int(p["max_elements"]))
        shared = (time.perf_counter() - t0) / x.shape[0]
        rows = []
        for i in range(x.shape[0]):
            cert = certifier.certify(x[i], sigma[i], probit_gap(float(p_lo[i]), m),
                                     rho_max=float(p["max_radius"]), rel_tol=float(p["rel_tol"]))
            row: dict[str, Any] = {
                "r_cert": _f(cert.radius), "r_cert_status": cert.status, "r_cert_method": cert.method,
                "r_cert_confidence": confidence, "cert_p0": _f(est.p[i]), "cert_p0_lo": _f(p_lo[i]),
                "cert_gap": _f(cert.gap), "cert_samples": n, "lipschitz": _f(cert.lipschitz),
                "lipschitz_mu": _f(cert.lipschitz_mu), "local_unstable": cert.local_unstable,
                "cert_seconds": shared + cert.seconds}
            for method in methods:
                row[f"r_cert_{method}"] = _f(cert.radii[method]) if method in cert.radii else None
            rows.append(row)
        return rows


@hookimpl
def register_estimators(register: Callable) -> None:
    register(CertifiedEstimator())
