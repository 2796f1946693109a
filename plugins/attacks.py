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
from robbench import ran_with, rng, stats
from robbench.inputrange import input_range
from robbench.projection import (as_radius, finalize, flat_norm, lbfgs_ascent, projected_gradient_ascent,
                                 point_normals, random_start, stall_ascent)
from robbench.paramspec import Param
from robbench.protocols import AttackResult
from robbench_plugins import fused_attack

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
    "mu": mu(x+delta), sigma(x); "sigma": mu(x), sigma(x+delta)); ``objective`` "expectation" (the mean
    distance over eta) or "mean" (eta = 0: the distance between mean reconstructions; sigma plays no
    part, so route "sigma" requires "expectation"); plus the optimiser parameters of _OPT_DEFAULTS.

    The default optimiser (``optimizer="pgd"``, ``eta_redraw=True``) is built to converge at a small cost:
      1. random starts are first pre-solved on the deterministic mean-decoder objective
         (``presolve_steps``, one decoder pass per step, all starts in one batched pass, from steps of
         ``step_size`` times the radius), and a warm start ``init`` too (``warm_presolve_steps``, from
         ``warm_step_size``: large steps act like power iteration, which separates nearly equal top
         directions of a linear encoder); the candidates (the warm start itself too: it may have moved off
         the mean optimum towards the expectation's) are scored on common draws of eta and the best one
         per point is refined;
      2. a stochastic refinement then follows the expectation objective with ``eta_samples`` fresh draws
         of eta at every step (antithetic pairs eta, -eta: their noise largely cancels where sigma
         dominates), so the iterates follow E_eta, not one fixed sample of it, from steps of
         ``refine_step_size`` times the radius; a warm start (found at ``init_radius``, then rescaled) from
         ``warm_scale`` times the relative radius change |radius / init_radius - 1| (the optimum moves
         about as far as the radius; ``warm_refine_step_size`` when init_radius is not given), at most
         ``warm_refine_steps`` (and ``steps``) steps;
      3. every ``check_every`` steps each point is scored on ``eval_samples`` fixed (common) draws; a
         point whose score rose by less than ``stall_tol`` (relative) returns to its best iterate and
         halves its step, and stops once the step is below ``min_step`` (fraction of the radius): so
         warm-started radii take the steps they need, at most ``steps``; the best scored iterate is
         returned (:func:`robbench.projection.stall_ascent`).
    ``eta_redraw=False`` (or ``optimizer="lbfgs"``) is the earlier attack: ``eta_samples`` draws fixed for
    the whole call and a fixed number of steps, the best iterate on that one sample of eta.
    """

    name: str = "max_damage"
    description: str = "maximum-damage attack (Eq. 5): push the reconstruction of x+delta away from g(mu(x))"
    defaults: dict[str, Any] = field(default_factory=lambda: {
        "route": "both", "objective": "expectation", "eta_samples": 4, "eta_redraw": True,
        "eval_samples": 8, "presolve_steps": 60, "presolve_min_step": 0.05, "check_every": 4, "stall_tol": 0.0,
        "min_step": 0.01,
        **_OPT_DEFAULTS, "step_size": 2.0, "warm_step_size": 0.5, "refine_step_size": 0.25,
        "warm_presolve_steps": 60, "warm_refine_steps": 40, "warm_refine_step_size": 0.25,
        "warm_scale": 1.0, "engine": "auto"})
    constraints: dict[str, Param] = field(default_factory=lambda: {
        "route": Param("str", choices=ROUTES), "objective": Param("str", choices=OBJECTIVES),
        "eta_samples": Param("int", lo=1), "eta_redraw": Param("bool"), "eval_samples": Param("int", lo=1),
        "presolve_steps": Param("int", lo=0), "presolve_min_step": Param("float", lo=0, lo_open=True),
        "check_every": Param("int", lo=1), "stall_tol": Param("float", lo=0),
        "min_step": Param("float", lo=0, lo_open=True), **_OPT_CONSTRAINTS,
        "warm_step_size": Param("float", lo=0, lo_open=True),
        "refine_step_size": Param("float", lo=0, lo_open=True),
        "warm_presolve_steps": Param("int", lo=0), "warm_refine_steps": Param("int", lo=1),
        "warm_refine_step_size": Param("float", lo=0, lo_open=True), "warm_scale": Param("float", lo=0),
        "engine": Param("str", choices=fused_attack.ENGINES)})

    def __call__(self, model: Any, x: Tensor, radius: Tensor, *, params: dict[str, Any] | None = None,
                 generator: torch.Generator, init: Tensor | None = None,
                 point_ids: Tensor | None = None, init_radius: Tensor | None = None) -> AttackResult:
        p = _merged(self.defaults, params)
        _check_choice("route", p["route"], ROUTES)
        _check_choice("objective", p["objective"], OBJECTIVES)
        _check_choice("optimizer", p["optimizer"], OPTIMIZERS)
        if p["route"] == "sigma" and p["objective"] == "mean":
            raise ValueError("route='sigma' needs objective='expectation': at eta = 0 sigma has no effect")
        for key in ("eta_samples", "eval_samples", "check_every"):
            if int(p[key]) < 1:
                raise ValueError(f"attack parameter {key}={p[key]!r}; expected an integer >= 1")
        radius = _check_inputs(model, x, radius)
        with torch.no_grad():
            mu_c, sig_c = model.encode(x)
            center = _decode_flat(model, mu_c)
        ids = _point_ids(point_ids, x)
        route = p["route"]
        expectation = p["objective"] == "expectation"

        def damage(rows: Tensor, xr: Tensor, d: Tensor, eta: Tensor | None) -> Tensor:
            """Mean over eta (S, N, k) of the distance, or the eta = 0 distance when eta is None."""
            need_mu = route in ("both", "mu")
            need_sig = route in ("both", "sigma") and eta is not None
            if need_mu or need_sig:
                mu_a, sig_a = model.encode(xr + d)
            mu = mu_a if need_mu else mu_c[rows]
            if eta is None:
                return flat_norm(_decode_flat(model, mu) - center[rows])
            sig = sig_a if need_sig else sig_c[rows]
            z = mu.unsqueeze(0) + eta * sig.unsqueeze(0)  # (S, N, k)
            recon = _decode_flat(model, z.reshape(-1, z.shape[-1])).view(eta.shape[0], rows.shape[0], -1)
            # sqrt with a floor: the norm is not differentiable where the distance is exactly 0
            return ((recon - center[rows]).pow(2).sum(2) + 1e-12).sqrt().mean(0)

        if p["optimizer"] == "lbfgs" or not p["eta_redraw"]:
            if p["engine"] == "compiled":
                raise ValueError("attack parameter engine='compiled' runs the default optimiser only "
                                 "(optimizer='pgd', eta_redraw=True); use engine='auto' or 'torch'")
            ran_with.note(ran_with.ATTACK_ENGINE, "torch")
            n_eta = int(p["eta_samples"]) if expectation else 0
            eta = point_normals(generator, ids, max(n_eta, 1), model.latent_dim, x)  # fixed for the call

            def fixed(rows: Tensor, xr: Tensor, d: Tensor) -> Tensor:
                return damage(rows, xr, d, eta[:, rows] if n_eta else None)

            return _result(model, x, _optimise(fixed, x, radius, p, generator, init, ids, input_range(model)))
        spec = fused_attack.resolve_engine(p["engine"], model, x)
        # "auto" falls back to torch where the extension does not load: the row must say which ran
        ran_with.note(ran_with.ATTACK_ENGINE, "torch" if spec is None else "compiled")

        def fused(idx: Tensor, ra: Tensor) -> fused_attack.FusedObjective:  # the compiled engine on points idx
            return fused_attack.FusedObjective(spec, x[idx], center[idx], mu_c[idx], sig_c[idx], ra, route,
                                               input_range(model))

        return _result(model, x, self._converged(damage, model, x, radius, p, generator, init, ids, expectation,
                                                 init_radius, None if spec is None else fused))

    @staticmethod
    def _converged(damage, model: Any, x: Tensor, radius: Tensor, p: dict[str, Any], generator: torch.Generator,
                   init: Tensor | None, ids: Tensor, expectation: bool, init_radius: Tensor | None = None,
                   fused: Any = None) -> Tensor:
        """Pre-solve, stochastic refinement and stall stopping (see the class docstring). ``fused(idx, radius)``
        (the compiled engine) gives a :class:`fused_attack.FusedObjective` on the points idx: each ascent
        is then one call of its op."""
        box = input_range(model)  # every start, iterate and the result keep x + delta in the declared range
        delta = torch.zeros_like(x)
        active = radius > 0
        if not bool(active.any()):
            return finalize(x, delta, radius, box=box)
        idx = active.nonzero().squeeze(1)
        xa, ra, ia = x[idx], radius[idx], ids[idx.cpu()]
        k = model.latent_dim
        # Per-point counter-based streams (robbench.rng): a point's draws do not depend on its batch.
        base = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))
        half = (int(p["eta_samples"]) + 1) // 2

        def antithetic(seed: int, rows: Tensor, n_half: int, offset: int = 0) -> Tensor:
            e = rng.sample_normals(seed, ia[rows.cpu()], n_half, k, sample_offset=offset)  # (N, n, k)
            e = e.transpose(0, 1).to(device=x.device, dtype=x.dtype)
            return torch.cat([e, -e], 0)

        eval_eta = antithetic(stats.derive_seed(base, "eval"), torch.arange(len(idx)),
                              (int(p["eval_samples"]) + 1) // 2) if expectation else None

        def mean_obj(rows: Tensor, d: Tensor, step: int = 0) -> Tensor:
            return damage(idx[rows], xa[rows], d, None)

        def evaluate(rows: Tensor, d: Tensor) -> Tensor:
            return damage(idx[rows], xa[rows], d, None if eval_eta is None else eval_eta[:, rows])

        def stochastic(rows: Tensor, d: Tensor, step: int) -> Tensor:
            eta = antithetic(stats.derive_seed(base, "steps"), rows, half, offset=step * half)
            return damage(idx[rows], xa[rows], d, eta)

        op = None if fused is None else fused(idx, ra)  # the compiled engine; rows index xa as its points
        if op is not None:
            keys = rng.stream_keys(stats.derive_seed(base, "steps"), ia)

            def evaluate(rows: Tensor, d: Tensor) -> Tensor:
                return op.value(rows, d, eval_eta)

        def ascent(stochastic_steps: bool, starts: list[Tensor], **kw: Any) -> tuple[Tensor, Tensor]:
            """stall_ascent on the expectation with fresh draws per step (scored on the common draws), or
            on the mean-decoder objective; on the compiled engine the whole loop is one op call."""
            if op is not None:
                return op.stall_ascent(starts, keys=keys if stochastic_steps else None,
                                       n_half=half if stochastic_steps else 0,
                                       eval_eta=eval_eta if stochastic_steps else None, **kw)
            objective, score = (stochastic, evaluate) if stochastic_steps else (mean_obj, mean_obj)
            return stall_ascent(objective, score, xa, ra, starts, box=box, **kw)

        ia_init = None if init is None else init.to(device=x.device, dtype=x.dtype).view_as(x)[idx]
        warm = ia_init is not None
        n_random = max(int(p["restarts"]), 0 if warm else 1)
        gen_starts = torch.Generator(device=x.device).manual_seed(stats.derive_seed(base, "starts"))
        randoms = [random_start(xa, ra, gen_starts, ia, box=box) for _ in range(n_random)]
        knobs = {"check_every": int(p["check_every"]), "stall_tol": float(p["stall_tol"]),
                 "min_step": float(p["min_step"])}
        warm_step = warm_first_step(ra, None if init_radius is None else init_radius.to(ra)[idx], p)
        if not expectation:
            starts = ([ia_init] if warm else []) + randoms
            best, _ = ascent(False, starts, steps=int(p["presolve_steps"]) + int(p["steps"]),
                             step_size=float(p["step_size"]), **knobs)
        else:
            pre = {**knobs, "min_step": float(p["presolve_min_step"])}  # refinement polishes further
            # Random starts are pre-solved on the deterministic mean-decoder objective (cheap: no eta);
            # all of them in one batched pass, each start's own best kept (per_start).
            solved = (list(ascent(False, randoms, steps=int(p["presolve_steps"]), step_size=float(p["step_size"]),
                                  per_start=True, **pre)[0].split(len(idx)))
                      if randoms and int(p["presolve_steps"]) > 0 else randoms)
            candidates = ([ia_init] if warm else []) + solved
            if warm and int(p["warm_presolve_steps"]) > 0:
                # the warm start pre-solved from smaller steps stays beside the warm start itself: on a
                # non-linear decoder the mean-decoder optimum can be a worse delta for the expectation
                candidates.append(ascent(False, [ia_init], steps=int(p["warm_presolve_steps"]),
                                         step_size=float(p["warm_step_size"]), **pre)[0])
            if len(candidates) > 1:  # refine only the best candidate per point (scored on the common draws)
                scores = torch.stack([evaluate(torch.arange(len(idx), device=x.device), s) for s in candidates])
                pick = scores.argmax(0)
                candidates = [torch.stack(candidates)[pick, torch.arange(len(idx), device=x.device)]]
            best, _ = ascent(True, candidates,
                             steps=min(int(p["steps"]), int(p["warm_refine_steps"])) if warm else int(p["steps"]),
                             step_size=warm_step if warm else float(p["refine_step_size"]), **knobs)
        delta[idx] = best.detach()
        return finalize(x, delta, radius, box=box)


def warm_first_step(radius: Tensor, init_radius: Tensor | None, p: dict[str, Any]) -> Tensor | float:
    """First refinement step (fraction of the radius) of a warm-started point: the optimum moves about
    as far as the radius does, so ``warm_scale`` times the relative radius change
    |radius / init_radius - 1|, between ``min_step`` and ``refine_step_size``; ``warm_refine_step_size``
    itself when the previous radius is unknown. radius, init_radius: (B,)."""
    if init_radius is None or float(p["warm_scale"]) <= 0:
        return float(p["warm_refine_step_size"])
    change = (radius / init_radius.clamp_min(1e-30) - 1.0).abs()
    return (float(p["warm_scale"]) * change).clamp(min=float(p["min_step"]), max=float(p["refine_step_size"]))


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
