"""Built-in attacks: maximum damage (paper Eq. 5), latent- and output-space target attacks, noise.

Every attack returns an :class:`~robbench.protocols.AttackResult` whose delta obeys
||delta_b||_2 <= radius_b and 0 <= x + delta <= 1 (enforced at every optimisation step and once more
by :func:`robbench.projection.finalize`), and whose ``damage`` is, for every attack and route,

    damage_b = ||g(mu(x_b + delta_b)) - g(mu(x_b))||_2   (output units),

the distance between the mean reconstructions of the perturbed and the clean input, i.e. the Eq. 3/5
distance at eta = 0 with the real encoder mean of x + delta. (For ``route="sigma"`` the optimiser
never sees mu(x + delta), but the returned delta still moves it; the damage says by how much.)
:func:`expected_damage` gives the eta-averaged distance along a chosen route (paper Fig. 4).

All attacks are batched over points, run wherever x and the model live (CPU or CUDA), and are
deterministic given ``generator`` (a torch.Generator on x's device).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from robbench.hookspecs import hookimpl
from robbench.inputrange import input_range
from robbench.projection import (as_radius, finalize, flat_norm, lbfgs_ascent, projected_gradient_ascent,
                                 point_normals, random_start)
from robbench.paramspec import Param
from robbench.protocols import AttackResult

ROUTES = ("both", "mu", "sigma")
OBJECTIVES = ("expectation", "mean")
OPTIMIZERS = ("pgd", "lbfgs")


# ---------------------------------------------------------------------------------------------
# Measuring damage
# ---------------------------------------------------------------------------------------------
def _decode_flat(model: Any, z: Tensor) -> Tensor:
    return model.decode(z).flatten(1)


@torch.no_grad()
def mean_damage(model: Any, x: Tensor, delta: Tensor) -> Tensor:
    """||g(mu(x + delta)) - g(mu(x))||_2 per point: (B,) in output units (the ``damage`` of every attack)."""
    mu_clean, _ = model.encode(x)
    mu_adv, _ = model.encode(x + delta)
    return flat_norm(_decode_flat(model, mu_adv) - _decode_flat(model, mu_clean))


@torch.no_grad()
def expected_damage(model: Any, x: Tensor, delta: Tensor, *, route: str = "both", n_samples: int = 64,
                    generator: torch.Generator | None = None) -> Tensor:
    """E_eta ||g(mu_r + eta * sigma_r) - g(mu(x))||_2 per point, (B,), by Monte Carlo with n_samples.

    route "both": mu_r, sigma_r = mu(x+delta), sigma(x+delta); "mu": mu(x+delta), sigma(x);
    "sigma": mu(x), sigma(x+delta). With delta = 0 this is the damage encoder noise alone does.
    """
    _check_choice("route", route, ROUTES)
    eta = torch.randn((n_samples, x.shape[0], model.latent_dim), generator=generator, device=x.device,
                      dtype=x.dtype)
    mu_c, sig_c = model.encode(x)
    mu_a, sig_a = model.encode(x + delta)
    mu_r, sig_r = _route(route, mu_c, sig_c, mu_a, sig_a)
    center = _decode_flat(model, mu_c)
    recon = _decode_flat(model, (mu_r + eta * sig_r).reshape(-1, mu_r.shape[1]))
    return (recon.view(n_samples, x.shape[0], -1) - center).norm(dim=2).mean(0)


def _route(route: str, mu_c: Tensor, sig_c: Tensor, mu_a: Tensor, sig_a: Tensor) -> tuple[Tensor, Tensor]:
    if route == "both":
        return mu_a, sig_a
    if route == "mu":
        return mu_a, sig_c
    return mu_c, sig_a


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"attack parameter {key}={value!r}; expected one of {', '.join(allowed)}")


def _merged(defaults: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    p = dict(defaults)
    unknown = set(params or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown attack parameter(s) {sorted(unknown)}; known: {sorted(defaults)}")
    p.update(params or {})
    return p


# ---------------------------------------------------------------------------------------------
# Shared driver: starts, optimiser choice, final feasibility and damage
# ---------------------------------------------------------------------------------------------
def _starts(x: Tensor, radius: Tensor, init: Tensor | None, restarts: int,
            generator: torch.Generator, point_ids: Tensor, box: tuple[float, float]) -> list[Tensor]:
    """The warm start (if any) first, then ``restarts`` random starts; at least one start."""
    starts = [] if init is None else [init.to(device=x.device, dtype=x.dtype).view_as(x)]
    n_random = max(restarts, 0 if starts else 1)
    starts += [random_start(x, radius, generator, point_ids, box=box) for _ in range(n_random)]
    return starts


def _point_ids(point_ids: Tensor | None, x: Tensor) -> Tensor:
    return torch.arange(x.shape[0]) if point_ids is None else point_ids.cpu().long()


def _optimise(objective, x: Tensor, radius: Tensor, p: dict[str, Any], generator: torch.Generator,
              init: Tensor | None, point_ids: Tensor | None, box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Run the chosen optimiser on the points with radius > 0; returns a feasible delta (B, *shape)
    with x + delta in ``box`` (the model's declared input range).
    Random starts are drawn per point id (default: position in the batch)."""
    _check_choice("optimizer", p["optimizer"], OPTIMIZERS)
    point_ids = _point_ids(point_ids, x)
    delta = torch.zeros_like(x)
    active = radius > 0
    if bool(active.any()):
        idx = active.nonzero().squeeze(1)
        xa, ra = x[idx], radius[idx]
        ia = None if init is None else init.to(device=x.device, dtype=x.dtype).view_as(x)[idx]
        starts = _starts(xa, ra, ia, int(p["restarts"]), generator, point_ids[idx.cpu()], box)

        def obj(rows: Tensor, d: Tensor) -> Tensor:
            return objective(idx[rows], xa[rows], d)

        if p["optimizer"] == "pgd":
            best, _ = projected_gradient_ascent(obj, xa, ra, starts, steps=int(p["steps"]),
                                                step_size=float(p["step_size"]), box=box)
        else:
            best, _ = lbfgs_ascent(obj, xa, ra, starts, max_iter=int(p["steps"]), box=box)
        delta[idx] = best.detach()
    return finalize(x, delta, radius, box=box)


def _check_inputs(model: Any, x: Tensor, radius: Tensor | float) -> Tensor:
    if x.shape[1:] != tuple(model.input_shape):
        raise ValueError(f"x has shape {tuple(x.shape)}; model expects (B, *{tuple(model.input_shape)})")
    return as_radius(radius, x)


def _result(model: Any, x: Tensor, delta: Tensor) -> AttackResult:
    return AttackResult(delta=delta, damage=mean_damage(model, x, delta))


_OPT_DEFAULTS: dict[str, Any] = {
    "optimizer": "pgd",   # "pgd" (batched projected gradient ascent) | "lbfgs" (scipy L-BFGS-B per point)
    "steps": 40,          # pgd steps per start (lbfgs: max iterations per start)
    "restarts": 1,        # random starts, in addition to ``init`` when one is given
    "step_size": 0.5,     # first pgd step as a fraction of the radius (cosine-decayed to 5% of it)
}
_OPT_CONSTRAINTS: dict[str, Param] = {
    "optimizer": Param("str", choices=OPTIMIZERS),
    "steps": Param("int", lo=1),
    "restarts": Param("int", lo=0),
    "step_size": Param("float", lo=0, lo_open=True),
}


# ---------------------------------------------------------------------------------------------
# Maximum damage (Eq. 5)
# ---------------------------------------------------------------------------------------------
@dataclass
class MaxDamageAttack:
    """argmax_{||delta|| <= L, x+delta in [0,1]} ||g(mu_r + eta * sigma_r) - g(mu(x))||_2 (paper Eq. 5).

    Params: ``route`` which encoder outputs delta reaches ("both": mu(x+delta), sigma(x+delta);
    "mu": mu(x+delta), sigma(x); "sigma": mu(x), sigma(x+delta)); ``objective`` "expectation" (mean
    over ``eta_samples`` draws of eta, fixed for the whole call, so the objective is a deterministic
    function of delta) or "mean" (eta = 0: the distance between mean reconstructions; sigma plays no
    part, so route "sigma" requires "expectation"); plus the optimiser parameters of _OPT_DEFAULTS.
    """

    name: str = "max_damage"
    description: str = "maximum-damage attack (Eq. 5): push the reconstruction of x+delta away from g(mu(x))"
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "route": "both", "objective": "expectation", "eta_samples": 8, **_OPT_DEFAULTS})
    constraints: dict[str, Param] = field(default_factory=lambda: {
        "route": Param("str", choices=ROUTES), "objective": Param("str", choices=OBJECTIVES),
        "eta_samples": Param("int", lo=1), **_OPT_CONSTRAINTS})

    def __call__(self, model: Any, x: Tensor, radius: Tensor, *, params: dict[str, Any] | None = None,
                 generator: torch.Generator, init: Tensor | None = None,
                 point_ids: Tensor | None = None) -> AttackResult:
        p = _merged(self.defaults, params)
        _check_choice("route", p["route"], ROUTES)
        _check_choice("objective", p["objective"], OBJECTIVES)
        if p["route"] == "sigma" and p["objective"] == "mean":
            raise ValueError("route='sigma' needs objective='expectation': at eta = 0 sigma has no effect")
        radius = _check_inputs(model, x, radius)
        with torch.no_grad():
            mu_c, sig_c = model.encode(x)
            center = _decode_flat(model, mu_c)
        n_eta = int(p["eta_samples"]) if p["objective"] == "expectation" else 0
        ids = _point_ids(point_ids, x)
        eta = point_normals(generator, ids, max(n_eta, 1), model.latent_dim, x)  # (S, B, k), per point
        route = p["route"]

        def objective(rows: Tensor, xr: Tensor, d: Tensor) -> Tensor:
            need_mu = route in ("both", "mu")
            need_sig = route in ("both", "sigma") and n_eta > 0
            if need_mu or need_sig:
                mu_a, sig_a = model.encode(xr + d)
            mu = mu_a if need_mu else mu_c[rows]
            if n_eta == 0:
                return flat_norm(_decode_flat(model, mu) - center[rows])
            sig = sig_a if need_sig else sig_c[rows]
            z = mu.unsqueeze(0) + eta[:, rows] * sig.unsqueeze(0)  # (S, N, k)
            recon = _decode_flat(model, z.reshape(-1, z.shape[-1])).view(n_eta, rows.shape[0], -1)
            # sqrt with a floor: the norm is not differentiable where the distance is exactly 0
            dist = ((recon - center[rows]).pow(2).sum(2) + 1e-12).sqrt()
            return dist.mean(0)

        delta = _optimise(objective, x, radius, p, generator, init, ids, input_range(model))
        return _result(model, x, delta)


# ---------------------------------------------------------------------------------------------
# Target attacks (Tabacof et al. 2016; Gondim-Ribeiro et al. 2018)
# ---------------------------------------------------------------------------------------------
def _targets(x: Tensor, p: dict[str, Any], box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """The target image of each point: ``targets`` when given, else the batch rolled by one (point b
    gets point b-1's image, another digit class for almost every MNIST test batch); a batch of one
    point has no other image, so it gets its negative lo + hi - x (1 - x for [0, 1] images)."""
    t = p.get("targets")
    if t is not None:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.shape != x.shape:
            raise ValueError(f"targets must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        return t
    return x.roll(1, 0) if x.shape[0] > 1 else (box[0] + box[1]) - x


def _kl_diag(mu_q: Tensor, sig_q: Tensor, mu_p: Tensor, sig_p: Tensor) -> Tensor:
    """KL(N(mu_q, sig_q^2) || N(mu_p, sig_p^2)) summed over latents, (N,)."""
    sig_q, sig_p = sig_q.clamp_min(1e-8), sig_p.clamp_min(1e-8)
    return (torch.log(sig_p / sig_q) + (sig_q.pow(2) + (mu_q - mu_p).pow(2)) / (2 * sig_p.pow(2)) - 0.5).sum(1)


@dataclass
class LatentAttack:
    """Minimise the divergence between q(z|x+delta) and q(z|target) (a classic VAE attack).

    Params: ``distance`` "kl" (KL(q(z|x+delta) || q(z|target))) or "mean" (||mu(x+delta) - mu(target)||^2);
    ``targets`` an optional (B, *input_shape) tensor of target images (default: the rolled batch, see
    _targets); plus the optimiser parameters of _OPT_DEFAULTS.
    """

    name: str = "latent"
    description: str = "latent-space attack: match the posterior of x+delta to that of a target image"
    defaults: dict[str, Any] = field(default_factory=lambda: {"distance": "kl", "targets": None,
                                                              **_OPT_DEFAULTS})
    constraints: dict[str, Param] = field(default_factory=lambda: {
        "distance": Param("str", choices=("kl", "mean")), **_OPT_CONSTRAINTS})

    def __call__(self, model: Any, x: Tensor, radius: Tensor, *, params: dict[str, Any] | None = None,
                 generator: torch.Generator, init: Tensor | None = None,
                 point_ids: Tensor | None = None) -> AttackResult:
        p = _merged(self.defaults, params)
        _check_choice("distance", p["distance"], ("kl", "mean"))
        radius = _check_inputs(model, x, radius)
        with torch.no_grad():
            mu_t, sig_t = model.encode(_targets(x, p, input_range(model)))

        def objective(rows: Tensor, xr: Tensor, d: Tensor) -> Tensor:
            mu, sig = model.encode(xr + d)
            if p["distance"] == "kl":
                return -_kl_diag(mu, sig, mu_t[rows], sig_t[rows])
            return -(mu - mu_t[rows]).pow(2).sum(1)

        return _result(model, x, _optimise(objective, x, radius, p, generator, init, point_ids,
                                           input_range(model)))


@dataclass
class OutputAttack:
    """Minimise ||g(mu(x+delta)) - g(mu(target))||_2^2: pull the reconstruction towards the target's.

    Params: ``targets`` (as for ``latent``) and the optimiser parameters of _OPT_DEFAULTS.
    """

    name: str = "output"
    description: str = "output-space attack: pull the reconstruction of x+delta towards a target's"
    defaults: dict[str, Any] = field(default_factory=lambda: {"targets": None, **_OPT_DEFAULTS})
    constraints: dict[str, Param] = field(default_factory=lambda: dict(_OPT_CONSTRAINTS))

    def __call__(self, model: Any, x: Tensor, radius: Tensor, *, params: dict[str, Any] | None = None,
                 generator: torch.Generator, init: Tensor | None = None,
                 point_ids: Tensor | None = None) -> AttackResult:
        p = _merged(self.defaults, params)
        radius = _check_inputs(model, x, radius)
        with torch.no_grad():
            mu_t, _ = model.encode(_targets(x, p, input_range(model)))
            recon_t = _decode_flat(model, mu_t)

        def objective(rows: Tensor, xr: Tensor, d: Tensor) -> Tensor:
            mu, _ = model.encode(xr + d)
            return -(_decode_flat(model, mu) - recon_t[rows]).pow(2).sum(1)

        return _result(model, x, _optimise(objective, x, radius, p, generator, init, point_ids,
                                           input_range(model)))


# ---------------------------------------------------------------------------------------------
# Random noise (the baseline)
# ---------------------------------------------------------------------------------------------
@dataclass
class NoiseAttack:
    """A uniformly random direction (isotropic Gaussian) scaled to norm L, then clipped into the pixel
    box (clipping only shrinks it). No parameters; ``init`` is ignored."""

    name: str = "noise"
    description: str = "random Gaussian direction of norm L (clipped to the pixel box): the baseline"
    defaults: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: Any, x: Tensor, radius: Tensor, *, params: dict[str, Any] | None = None,
                 generator: torch.Generator, init: Tensor | None = None,
                 point_ids: Tensor | None = None) -> AttackResult:
        _merged(self.defaults, params)
        radius = _check_inputs(model, x, radius)
        box = input_range(model)
        delta = finalize(x, random_start(x, radius, generator, _point_ids(point_ids, x), box=box), radius, box=box)
        return _result(model, x, delta)


ATTACKS = (MaxDamageAttack, LatentAttack, OutputAttack, NoiseAttack)


@hookimpl
def register_attacks(register) -> None:
    for cls in ATTACKS:
        register(cls())
