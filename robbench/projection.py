"""Feasible sets of input perturbations and the optimisers attacks share.

The feasible set of an attack on a point x with budget L is
    C(x, L) = {delta : ||delta||_2 <= L} ∩ {delta : lo <= x + delta <= hi},
the intersection of an L2 ball with the pixel box shifted by -x; the box is the model's declared input
range (``robbench.inputrange``; [0, 1] by default, every function takes it as ``box=(lo, hi)``). Both contain 0, which the code relies
on: scaling a feasible delta towards 0 keeps it feasible.

- :func:`project_ball_box` is the exact Euclidean projection onto C (sorting the clip breakpoints), not
  clip-then-scale (which lands in C but at the wrong point).
- :func:`finalize` is the last step of every attack: it absorbs float round-off so that the returned
  delta satisfies ``||delta|| <= L`` (in float64 arithmetic) and ``0 <= x + delta <= 1`` exactly.
- :func:`projected_gradient_ascent` (batched, normalised L2 steps, cosine step schedule, restarts,
  best iterate per point) and :func:`lbfgs_ascent` (scipy L-BFGS-B per point) maximise any per-row
  objective over C.

Shapes: x, delta, v are (B, *input_shape); radius is (B,) in input-space L2 units.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from robbench import rng
from robbench.few_rows import one_thread_if_few_rows

# finalize() aims slightly inside the ball so that round-off can never push ||delta|| past L.
_RADIUS_SLACK = 1e-6

Objective = Callable[[Tensor, Tensor], Tensor]
"""objective(rows, delta) -> (N,) values to maximise; ``rows`` (N,) int64 indexes the original points
(row n of delta perturbs point rows[n]), delta (N, *input_shape). Must be differentiable in delta."""


def flat_norm(t: Tensor) -> Tensor:
    """(B, ...) -> (B,) L2 norms of the flattened rows."""
    return t.flatten(1).norm(dim=1)


def as_radius(radius: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) budget to a (B,) float tensor on x's device; rejects negatives."""
    r = torch.as_tensor(radius, dtype=x.dtype, device=x.device).flatten()
    if r.numel() == 1:
        r = r.expand(x.shape[0])
    if r.shape != (x.shape[0],):
        raise ValueError(f"radius must be a scalar or shaped ({x.shape[0]},), got {tuple(r.shape)}")
    if bool((r < 0).any()) or not bool(torch.isfinite(r).all()):
        raise ValueError("radius must be finite and >= 0")
    return r.contiguous()


def project_ball_box(v: Tensor, x: Tensor, radius: Tensor, *, max_iter: int = 100,
                     box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Exact Euclidean projection of v onto C(x, radius) (see module docstring), batched.

    KKT: the projection is clip(t v, -x, 1 - x) for the t* in [0, 1] where its norm reaches the radius
    (t* = 1 when clip(v) is already inside the ball). With K(t) the pixels clipped at t,
    f(t)^2 = t^2 * sum_{not K(t)} v_i^2 + sum_{K(t)} b_i^2 (b_i the distance to the face v_i points at).
    Freezing K at the current t and solving the quadratic for the radius gives the next t; the
    sequence rises monotonically to t* and stops when K stops changing (exact; ~3-5 rounds in
    practice, at most one per pixel). Computed in float64.
    v, x: (B, *shape); radius: (B,). Returns (B, *shape) in v's dtype.
    """
    shape, dtype = v.shape, v.dtype
    vf, xf = v.flatten(1).double(), x.flatten(1).double()
    lo, hi = box[0] - xf, box[1] - xf
    r2 = radius.double().pow(2)[:, None]
    full = torch.maximum(torch.minimum(vf, hi), lo)  # t = 1
    need = full.pow(2).sum(1, keepdim=True) > r2
    if not bool(need.any()):
        return full.to(dtype).view(shape)
    face2 = torch.where(vf > 0, hi, lo).pow(2)
    v2 = vf.pow(2)
    t = torch.ones_like(r2)
    for it in range(max_iter):
        tv = t * vf
        clipped = (tv > hi) | (tv < lo)
        c = torch.where(clipped, face2, torch.zeros_like(vf)).sum(1, keepdim=True)
        s = torch.where(clipped, torch.zeros_like(vf), v2).sum(1, keepdim=True)
        t_next = ((r2 - c).clamp_min(0) / s.clamp_min(1e-300)).sqrt().clamp(max=1.0)
        if it > 0:  # after the first solve t only rises (guards against round-off ping-pong)
            t_next = torch.maximum(t_next, t)
        t_next = torch.where(need, t_next, t)
        if torch.equal(t_next, t):
            break
        t = t_next
    return torch.maximum(torch.minimum(t * vf, hi), lo).to(dtype).view(shape)


def finalize(x: Tensor, delta: Tensor, radius: Tensor, *, box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Make delta strictly feasible despite round-off: ||delta_b|| <= radius_b (checked in float64)
    and lo <= x + delta <= hi elementwise (exactly, as computed by ``x + delta``). radius 0 gives 0."""
    lo, hi = float(box[0]), float(box[1])
    # Box first, touching only the offending pixels: a round trip (x + delta) - x would cost an ulp of
    # x in every pixel, which dwarfs tiny radii.
    delta = torch.where(x + delta < lo, lo - x, delta)
    delta = torch.where(x + delta > hi, hi - x, delta)
    for _ in range(8):  # fl(x + fl(hi - x)) can exceed hi by an ulp: step towards 0 until it does not
        bad = ((x + delta) > hi) | ((x + delta) < lo)
        if not bool(bad.any()):
            break
        delta = torch.where(bad, torch.nextafter(delta, torch.zeros_like(delta)), delta)
    # Then the ball: scaling towards 0 keeps x + delta between x and its old value, so in the box
    # (rounding is monotone), and aiming at radius * (1 - 1e-6) leaves room for round-off.
    target = radius.double() * (1.0 - _RADIUS_SLACK)
    norm = flat_norm(delta.double())
    scale = torch.where(norm > target, target / norm.clamp_min(1e-300), torch.ones_like(norm))
    scale = torch.where(radius > 0, scale, torch.zeros_like(scale))
    return delta * scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))


def point_normals(generator: torch.Generator, point_ids: Tensor, n: int, dim: int, like: Tensor) -> Tensor:
    """(n, B, dim) standard normals drawn per point from a counter-based stream (robbench.rng) whose seed
    is one draw of ``generator``: a point gets the same numbers whatever batch it is in."""
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))
    eta = rng.sample_normals(seed, point_ids.cpu().long(), n, dim)  # (B, n, dim)
    return eta.transpose(0, 1).to(device=like.device, dtype=like.dtype)


def random_start(x: Tensor, radius: Tensor, generator: torch.Generator, point_ids: Tensor, *,
                 box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """A Gaussian direction scaled to norm radius, then clipped into the box (norm can only shrink)."""
    v = point_normals(generator, point_ids, 1, x[0].numel(), x)[0].view_as(x)
    v = v * (radius / flat_norm(v).clamp_min(1e-12)).view(-1, *([1] * (x.dim() - 1)))
    return torch.maximum(torch.minimum(v, box[1] - x), box[0] - x)


def _grad(value: Tensor, wrt: Tensor) -> Tensor:
    """d value / d wrt, zeros where value does not depend on wrt (e.g. a constant encoder sigma)."""
    if not value.requires_grad:
        return torch.zeros_like(wrt)
    # the backward's products have wrt's rows: on few rows MKL's last bits follow the thread count
    # (robbench.few_rows), so they run on one thread, as the model's forward calls do
    with one_thread_if_few_rows(wrt):
        (g,) = torch.autograd.grad(value, wrt, allow_unused=True)
    return torch.zeros_like(wrt) if g is None else g


def cosine_step(step: int, n_steps: int, base: float, floor: float = 0.05) -> float:
    """Step size (fraction of the radius) at ``step`` of ``n_steps``: cosine decay from base to
    base * floor, so early steps explore the ball and late ones refine."""
    frac = 0.5 * (1.0 + math.cos(math.pi * step / max(n_steps - 1, 1)))
    return base * (floor + (1.0 - floor) * frac)


def projected_gradient_ascent(objective: Objective, x: Tensor, radius: Tensor, starts: list[Tensor], *,
                              steps: int, step_size: float,
                              box: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Maximise ``objective`` over C(x, radius) for every point, from every start, all batched.

    Each step moves delta by step_t * radius along the L2-normalised gradient and projects exactly
    onto C; step_t follows :func:`cosine_step` from ``step_size``. The best iterate (including each
    start) of any start is kept per point. starts: list of R tensors (B, *shape), projected first.
    Returns (delta (B, *shape), value (B,)), delta feasible up to float round-off (use finalize).
    """
    B = x.shape[0]
    R = len(starts)
    xr = x.repeat(R, *([1] * (x.dim() - 1)))
    rr = radius.repeat(R)
    rows = torch.arange(B, device=x.device).repeat(R)
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = project_ball_box(torch.cat(starts, 0), xr, rr, box=box)
    best = delta.detach().clone()
    best_val = torch.full((B * R,), -math.inf, device=x.device, dtype=x.dtype)
    for step in range(steps + 1):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            val = objective(rows, d)
            grad = _grad(val.sum(), d) if step < steps else None
        val = val.detach()
        better = val > best_val
        best_val = torch.where(better, val, best_val)
        best[better] = d.detach()[better]
        if grad is None:
            break
        g = torch.nan_to_num(grad)
        g = g / flat_norm(g).clamp_min(1e-20).view(view)
        alpha = cosine_step(step, steps, step_size)
        delta = project_ball_box(d.detach() + alpha * rr.view(view) * g, xr, rr, box=box)
    # pick the best start per point
    vals = best_val.view(R, B)
    pick = vals.argmax(0)
    idx = pick * B + torch.arange(B, device=x.device)
    return best[idx], vals.max(0).values


def lbfgs_ascent(objective: Objective, x: Tensor, radius: Tensor, starts: list[Tensor], *,
                 max_iter: int, box: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """Maximise ``objective`` over C(x, radius) with scipy's L-BFGS-B, one problem per point and start.

    L-BFGS-B enforces the pixel box as simple bounds on u (= the delta it proposes); the L2 ball is
    handled by evaluating the objective at the radial retraction delta = u * min(1, L / ||u||), which
    stays in the box because the box contains 0. So every point the objective ever sees is feasible
    and the returned delta is the retraction of the best u. A tiny penalty on the excess norm
    (1e-3 * (||u|| - L)_+^2) removes the flat directions outside the ball. Runs in float64 on CPU
    (the model stays where it is). Returns (delta (B, *shape), value (B,)).
    """
    B = x.shape[0]
    shape = x.shape[1:]
    best = torch.zeros_like(x)
    best_val = torch.full((B,), -math.inf, dtype=x.dtype, device=x.device)
    for b in range(B):
        L = float(radius[b])
        if L == 0.0:
            best_val[b] = float(objective(torch.tensor([b], device=x.device), best[b:b + 1]).detach())
            continue
        lo = (box[0] - x[b]).flatten().double().cpu().numpy()
        hi = (box[1] - x[b]).flatten().double().cpu().numpy()
        bounds = list(zip(lo, hi))
        row = torch.tensor([b], device=x.device)

        def retract(u: Tensor) -> Tensor:
            n = u.norm()
            return u * torch.clamp(L / n.clamp_min(1e-30), max=1.0)

        def fun(u_np: np.ndarray) -> tuple[float, np.ndarray]:
            u = torch.from_numpy(u_np).to(device=x.device, dtype=x.dtype).requires_grad_(True)
            with torch.enable_grad():
                val = objective(row, retract(u).view(1, *shape))[0]
                excess = (u.norm() - L).clamp_min(0)
                loss = -val + 1e-3 * excess.pow(2)
                g = _grad(loss, u)
            return float(loss.detach()), torch.nan_to_num(g).double().cpu().numpy()

        from scipy.optimize import minimize  # local: scipy is only needed for this optimiser

        for start in starts:
            u0 = project_ball_box(start[b:b + 1], x[b:b + 1], radius[b:b + 1], box=box).flatten()
            res = minimize(fun, u0.double().cpu().numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": max_iter})
            u = torch.from_numpy(res.x).to(device=x.device, dtype=x.dtype)
            cand = retract(u).view(1, *shape)
            val = float(objective(row, cand).detach()[0])
            if val > float(best_val[b]):
                best_val[b] = val
                best[b] = cand[0]
    return best, best_val


StochasticObjective = Callable[[Tensor, Tensor, int], Tensor]
"""objective(rows, delta, step) -> (N,): a fresh Monte Carlo estimate of the value to maximise at each
optimisation step (e.g. new eta draws), differentiable in delta; ``rows`` as for :data:`Objective`."""


Stepper = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""stepper(rows, delta, step_len, step) -> the next iterate (N, *shape): delta moved by step_len (N,) input
units along the L2-normalised gradient of the step's objective and projected exactly onto C (what
:func:`stall_ascent` does with autograd and :func:`project_ball_box`, done by the caller, e.g. a compiled op)."""


def stall_ascent(objective: StochasticObjective | None, evaluate: Objective, x: Tensor, radius: Tensor,
                 starts: list[Tensor], *, steps: int, step_size: float | Tensor, check_every: int = 4,
                 stall_tol: float = 1e-3, min_step: float = 0.02, per_start: bool = False,
                 box: tuple[float, float] = (0.0, 1.0), stepper: Stepper | None = None) -> tuple[Tensor, Tensor]:
    """Projected (stochastic) gradient ascent over C(x, radius) with per-row step halving and stall stop.

    Steps follow ``objective`` (which may redraw its randomness at every step: the iterates then follow
    the expected objective, not one fixed sample of it), normalised L2 steps of ``alpha * radius`` and the
    exact projection; alpha starts at ``step_size`` (a float, or (B,) per point). Every ``check_every`` steps each active row is scored
    with ``evaluate`` (a fixed function, e.g. common random numbers, so scores of iterates compare
    fairly). A row whose score did not beat its best by more than ``stall_tol`` (relative) goes back to
    its best iterate and halves alpha (as APGD does); it stops once alpha < ``min_step``. So a row gets
    the steps it needs, at most ``steps``, and stopped rows cost no decoder passes. Every iterate
    satisfies x + delta in ``box`` (the model's declared input range).
    ``stepper`` (optional) replaces the autograd step (``objective`` is then unused and may be None).
    starts: list of R tensors (B, *shape). Returns the best scored iterate per point over all starts
    and its score: (delta (B, *shape), (B,)); with ``per_start`` every start's own best and score,
    (delta (R * B, *shape), (R * B,)) in the order of ``starts``.
    """
    B, R = x.shape[0], len(starts)
    xr = x.repeat(R, *([1] * (x.dim() - 1)))
    rr = radius.repeat(R)
    rows = torch.arange(B, device=x.device).repeat(R)
    view = (-1,) + (1,) * (x.dim() - 1)
    delta = project_ball_box(torch.cat(starts, 0), xr, rr, box=box)
    with torch.no_grad():
        best_val = evaluate(rows, delta).detach()
    best = delta.detach().clone()
    alpha = torch.as_tensor(step_size, dtype=x.dtype, device=x.device).expand(B).repeat(R)  # (B * R,)
    active = alpha >= min_step

    def gather() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The active rows and their state; it changes only at checks, so it is gathered only then."""
        i = active.nonzero().squeeze(1)
        return i, rows[i], xr[i], rr[i], alpha[i] * rr[i], delta[i]

    idx, rows_a, x_a, r_a, step_len, cur = gather()  # cur: the active rows' iterates (delta[idx])
    for step in range(steps):
        if idx.numel() == 0:
            break
        if stepper is not None:
            cur = stepper(rows_a, cur, step_len, step)
        else:
            d = cur.detach().requires_grad_(True)
            with torch.enable_grad():
                grad = _grad(objective(rows_a, d, step).sum(), d)
            g = torch.nan_to_num(grad)
            g = g / flat_norm(g).clamp_min(1e-20).view(view)
            cur = project_ball_box(d.detach() + step_len.view(view) * g, x_a, r_a, box=box)
        if (step + 1) % check_every == 0 or step == steps - 1:
            with torch.no_grad():
                val = evaluate(rows_a, cur).detach()
            delta[idx] = cur
            gain = val - best_val[idx] > stall_tol * best_val[idx].abs()
            better = val > best_val[idx]
            best_val[idx[better]] = val[better]
            best[idx[better]] = cur[better]
            stalled = idx[~gain]
            delta[stalled] = best[stalled]
            alpha[stalled] *= 0.5
            active &= alpha >= min_step
            idx, rows_a, x_a, r_a, step_len, cur = gather()
    if per_start:
        return best, best_val
    vals = best_val.view(R, B)
    pick = vals.argmax(0)
    return best[pick * B + torch.arange(B, device=x.device)], vals.max(0).values
