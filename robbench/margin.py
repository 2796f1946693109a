"""The r-robustness probability with confidence, and the robustness margin by batched bisection.

p_r(x, delta) = P(||g(mu(x + delta) + eta * sigma) - g(mu(x))||_2 <= r), eta ~ N(0, I), with sigma = sigma(x)
(``sigma_at="clean"``, DESIGN.md section 1) or sigma(x + delta) (``"perturbed"``). All decoding goes
through :func:`robbench.montecarlo.count_within`.

Margin: R(x) = the largest rho such that the attack finds no delta with ||delta|| <= rho and p_r <= m.
Bisection over rho for all points at once; at each radius a sequential test draws samples until a
Clopper-Pearson bound clears m (or a cap is hit: "undecided"). The error budget alpha = 1 - confidence
is split (Bonferroni) over every test a point can see (radius 0, the cap, each bisection step, each
refinement top-up) and over the looks of each sequential test, so all decisions of a point hold together
with probability >= 1 - alpha; with ``verify`` (:func:`verify_margin`), a fixed share VERIFY_SHARE of alpha
goes to the verification's re-bisection tests (VERIFY_FIRST_SHARE of it to their first test,
:func:`split_verify_alpha`) and the rest is split as before. With ``refine`` the bisection only locates the
crossing (cheap capped tests); fixed-count top-ups at the fitted crossing, sized from the fitted slope,
then buy the accuracy of the point estimate (a probit-linear fit of the tests near the crossing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from robbench import montecarlo, stats
from robbench.inputrange import input_range
from robbench.projection import finalize
from robbench.protocols import Attack, VAEModel, call_attack


# --- p_r at a fixed perturbation ---------------------------------------------------------------
@dataclass
class ProbabilityEstimate:
    """Per point (B,): successes k, trials n, point estimate p = k / n, two-sided CP interval [lo, hi]."""

    k: Tensor
    n: Tensor
    p: Tensor
    lo: Tensor
    hi: Tensor


@torch.no_grad()
def latent_params(model: VAEModel, x: Tensor, delta: Tensor | None, sigma_at: str = "clean"
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(mu(x + delta), sigma, center = g(mu(x)) flattened) for the Monte Carlo engine.
    x, delta: (B, *input_shape); returns (B, k), (B, k), (B, D)."""
    if sigma_at not in ("clean", "perturbed"):
        raise ValueError(f"sigma_at must be 'clean' or 'perturbed', got {sigma_at!r}")
    mu0, sigma0 = model.encode(x)
    center = model.decode(mu0).flatten(1)
    if delta is None:
        return mu0, sigma0, center
    mu1, sigma1 = model.encode(x + delta)
    return mu1, (sigma0 if sigma_at == "clean" else sigma1), center


@torch.no_grad()
def estimate_probability(model: VAEModel, x: Tensor, delta: Tensor | None, *, r: float, n_samples: int,
                         confidence: float = 0.95, seed: int = 0, stream_ids: Tensor | None = None,
                         backend: str = "auto", sigma_at: str = "clean") -> ProbabilityEstimate:
    """p_r(x, delta) from ``n_samples`` fresh decoder samples per point with a two-sided Clopper-Pearson
    interval at ``confidence``. delta None means delta = 0. Use a ``seed`` not used by the attack."""
    mu, sigma, center = latent_params(model, x, delta, sigma_at)
    k = montecarlo.count_within(model, mu, sigma, center, r, n_samples, seed=seed, stream_ids=stream_ids,
                               backend=backend).cpu()
    n = torch.full_like(k, n_samples)
    lo, hi = stats.clopper_pearson(k, n, confidence)
    return ProbabilityEstimate(k, n, k.double() / n_samples, lo, hi)


@dataclass
class SequentialOutcome:
    """Per point (B,): decision (stats.ROBUST / NOT_ROBUST / UNDECIDED), k, n used, p = k / n."""

    decision: Tensor
    k: Tensor
    n: Tensor

    @property
    def p(self) -> Tensor:
        return self.k.double() / self.n.clamp(min=1)


@torch.no_grad()
def sequential_test(model: VAEModel, mu: Tensor, sigma: Tensor, center: Tensor, *, r: float, m: float,
                    alpha: float, schedule: list[int], seed: int, stream_ids: Tensor,
                    backend: str = "auto") -> SequentialOutcome:
    """Decide p_r > m (ROBUST) or p_r <= m (NOT_ROBUST) for each point, drawing more samples only for
    undecided points, at the cumulative sizes in ``schedule``. ``alpha`` is this test's error budget,
    split over the looks. Samples continue one counter-based stream (sample_offset), so a look reuses
    the earlier samples. mu, sigma: (B, k); center: (B, D); stream_ids: (B,)."""
    batch = mu.shape[0]
    alpha_look = stats.split_alpha(alpha, len(schedule))
    k = torch.zeros(batch, dtype=torch.int64)
    n = torch.zeros(batch, dtype=torch.int64)
    decision = torch.zeros(batch, dtype=torch.int64)
    todo = torch.arange(batch)
    for size in schedule:
        if todo.numel() == 0:
            break
        done_so_far = int(n[todo[0]])  # every undecided point has seen the same number of samples
        k[todo] += montecarlo.count_within(model, mu[todo], sigma[todo], center[todo], r, size - done_so_far,
                                   seed=seed, stream_ids=stream_ids[todo], sample_offset=done_so_far,
                                   backend=backend).cpu()
        n[todo] = size
        decision[todo] = stats.decide(k[todo], n[todo], m, alpha_look)
        todo = todo[decision[todo] == stats.UNDECIDED]
    return SequentialOutcome(decision, k, n)


# --- batched bisection -------------------------------------------------------------------------
@dataclass
class MarginResult:
    """Per point (B,) tensors, radii in input-space L2 units.

    margin: point estimate: where the straight line through (lo, p_hat(lo)) and (hi, p_hat(hi)) of the
    final bracket crosses m (the midpoint when an end has no estimate), so it lies on no dyadic grid;
    with ``stop_when_undecided`` the bracket ends at the radius whose test hit the sample cap, on the
    side its p_hat points to; with ``refine``, where the probit-linear fit of the tests near the
    crossing crosses m (:func:`probit_crossing`), clamped into [lo, hi]. lo, hi: the interval that
    holds with the stated confidence *for this attack* (lo moves only on a confident ROBUST decision at
    the attack's delta, so it is conditional on the attack: a stronger attack can only lower R; hi only
    on a confident NOT_ROBUST one, backed by the witness delta of that test: +inf where no test decided
    so, e.g. an uncensored point whose test at the cap was undecided); samples: decoder samples
    used; undecided: some test hit the sample cap (with ``refine``: a test of ``samples_max`` samples,
    i.e. a top-up at its largest size) with m inside its interval (its side was then guessed from the
    point estimate, but not used for lo/hi); at_cap: still robust at ``max_radius``: censored,
    R >= max_radius (margin = lo = cap, hi = inf); p0: the
    estimate of p_r(x, 0). witness_*: filled by :func:`estimate_margin` (see there).
    """

    margin: Tensor
    lo: Tensor
    hi: Tensor
    samples: Tensor
    undecided: Tensor
    at_cap: Tensor
    p0: Tensor
    n_tests: int
    witness_delta: Tensor | None = None
    witness_radius: Tensor | None = None
    witness_k: Tensor | None = None
    witness_n: Tensor | None = None
    witness_p_hi: Tensor | None = None
    tests: Tensor | None = None  # (B,) int64: tests (so attack calls, less radius 0) each point saw
    # with ``verify`` (see :func:`verify_margin`), else None: (B,) bool / float64
    verify_flagged: Tensor | None = None  # a verification candidate at 0.98 R had p_hat <= m - VERIFY_GAP
    verified_lower: Tensor | None = None  # the re-bisection along it lowered margin and hi (new witness < R)
    verify_p: Tensor | None = None  # smallest p_hat of the candidates at 0.98 R (NaN: not verified)


# test(radius (b,), idx (b,), step[, n]): n None runs the sequential schedule; an int n draws exactly n
# samples for every point and decides once, at the error budget of one look (a refinement top-up).
TestFn = Callable[..., SequentialOutcome]


def n_margin_tests(max_radius: float, tolerance: float, refine: int = 0) -> int:
    """Tests a point can see: radius 0, the cap, ceil(log2(max_radius / tolerance)) bisections and
    ``refine`` refinement top-ups."""
    if tolerance <= 0 or max_radius <= 0:
        raise ValueError(f"max_radius and tolerance must be > 0, got {max_radius}, {tolerance}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    return 2 + max(0, math.ceil(math.log2(max_radius / tolerance))) + refine


# Version of the refinement rounds (:func:`_refine`, in bisect_margin and verify_margin), hashed into the job keys
# of margins with refine > 0 (plugins/estimators.py), so a run folder refined by an earlier version is not resumed
# as this one's; refine 0 runs none and keeps its keys. 1 (not hashed): sessions 5-9. 2: session 9 review (a fit
# crossing m at or below radius 0, clamped, gave R = 0 for a point judged robust at 0; now the straight line
# across the bracket stands there, and no round places a top-up at radius 0). 3: session 10 (with refine the
# radius-0 test draws up to samples_max, not samples_locate: R = 0 rests on a decided test or an undecided one
# of samples_max, which flags the point; before, p_r(x, 0) within ~0.03 of m gave R = 0 from 2048 samples'
# p_hat, not flagged: 4 % of points at p_r(x, 0) = 0.521).
REFINE_ALGORITHM = 3


def bisect_margin(test: TestFn, batch: int, *, m: float, max_radius: float, tolerance: float,
                  rel_tolerance: float | None = None, stop_when_undecided: bool = False, refine: int = 0,
                  samples_min: int = 128, samples_max: int = 32768) -> MarginResult:
    """Batched bisection driver. ``test(radius (b,), idx (b,), step)`` decides, for points ``idx``,
    whether p_r at the worst perturbation of norm <= radius exceeds m. A point stops when its bracket
    is narrower than ``tolerance`` (or ``rel_tolerance`` times its upper end), or, with
    ``stop_when_undecided``, at the first radius > 0 whose test hits the sample cap: p_r is then within
    sampling error of m there, so that radius is the point estimate, and radii closer to the margin
    would mostly be undecided too (saving their attacks and samples).

    ``refine`` > 0 (the bisection then only has to *locate* the crossing): for every point with a
    crossing inside (0, cap) whose confident interval is still wider than the target width (the larger
    of ``tolerance`` and ``rel_tolerance`` times R), ``refine`` rounds each test one radius, the current
    estimate, with a fixed count ``test(radius, idx, step, n)``, n chosen from the fitted slope so that
    all rounds together give the estimate a standard error of about half the target width
    (:func:`refine_samples`, within [samples_min, samples_max]). The estimate is then the crossing of a
    weighted probit-linear fit of all of the point's tests near it (:func:`probit_crossing`); where that
    fit crosses m at or below radius 0 (every refined point was judged robust at 0, so R > 0) the
    bisection's straight-line estimate stands instead, in the rounds too (REFINE_ALGORITHM). Each
    top-up is one more test of the error budget (``n_margin_tests(..., refine)``); a confident decision
    there moves lo / hi like any other."""
    base_tests = n_margin_tests(max_radius, tolerance)
    n_tests = base_tests + refine
    lo = torch.zeros(batch, dtype=torch.float64)
    hi = torch.full((batch,), float(max_radius), dtype=torch.float64)
    # the confident interval: hi_c starts open (+inf), not at the cap: only a confident NOT_ROBUST test (a
    # witness) shows R <= some radius; an undecided test at the cap leaves a point uncensored without one
    lo_c, hi_c = lo.clone(), torch.full_like(hi, float("inf"))
    nan = torch.full((batch,), float("nan"), dtype=torch.float64)
    p_lo, p_hi = nan.clone(), nan.clone()  # p_hat at the ends of the bisection bracket (NaN: not tested)
    samples = torch.zeros(batch, dtype=torch.int64)
    tests = torch.zeros(batch, dtype=torch.int64)
    undecided = torch.zeros(batch, dtype=torch.bool)
    at_cap = torch.zeros(batch, dtype=torch.bool)
    p0 = torch.zeros(batch, dtype=torch.float64)
    active = torch.ones(batch, dtype=torch.bool)
    history: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # (idx, radius, k, n) of every test

    def run(step: int, idx: Tensor, radius: Tensor, n: int | None = None) -> tuple[Tensor, Tensor]:
        out = test(radius, idx, step) if n is None else test(radius, idx, step, n)
        samples[idx] += out.n
        tests[idx] += 1
        # with refine, the capped locating tests end undecided near R by design: only a test that used
        # samples_max and still straddles m flags the point
        undecided[idx] |= (out.decision == stats.UNDECIDED) & ((out.n >= samples_max) if refine else True)
        history.append((idx, radius.double(), out.k, out.n))
        sure_up = out.decision == stats.ROBUST
        sure_down = out.decision == stats.NOT_ROBUST
        lo_c[idx[sure_up]] = torch.maximum(lo_c[idx[sure_up]], radius[sure_up].double())
        hi_c[idx[sure_down]] = torch.minimum(hi_c[idx[sure_down]], radius[sure_down].double())
        robust = sure_up | ((out.decision == stats.UNDECIDED) & (out.p > m))
        return robust, out

    all_idx = torch.arange(batch)
    # Step 0: unperturbed. Not r-robust at x itself means margin 0.
    robust, out = run(0, all_idx, torch.zeros(batch, dtype=torch.float64))
    p0[:] = out.p
    p_lo[:] = out.p
    fail = ~robust
    hi[fail] = 0.0
    active &= robust
    # Bisection over [0, cap]; the cap itself is tested last, only for points robust at every radius so
    # far (margins are usually far below the cap, so this saves an attack at the largest radius).
    for step in range(1, base_tests - 1):
        width = hi - lo
        need = width > tolerance
        if rel_tolerance is not None:
            need &= width > rel_tolerance * hi
        idx = all_idx[active & need]
        if idx.numel() == 0:
            break
        mid = 0.5 * (lo[idx] + hi[idx])
        robust, out = run(step, idx, mid)
        lo[idx[robust]] = mid[robust]
        hi[idx[~robust]] = mid[~robust]
        p_lo[idx[robust]] = out.p[robust]
        p_hi[idx[~robust]] = out.p[~robust]
        if stop_when_undecided:
            active[idx[out.decision == stats.UNDECIDED]] = False
    idx = all_idx[active & (hi >= max_radius)]
    if idx.numel():
        robust, out = run(base_tests - 1, idx, hi[idx].clone())
        ok = idx[robust]
        p_hi[idx[~robust]] = out.p[~robust]
        lo[ok] = hi[ok]
        at_cap[ok] = True
    hi_c[at_cap] = float("inf")  # censored: R >= cap
    margin = crossing(lo, hi, p_lo, p_hi, m, at_cap)
    if refine > 0:
        margin = _refine(run, history, margin, lo_c, hi_c, (hi > 0) & ~at_cap, m=m, max_radius=max_radius,
                         tolerance=tolerance, rel_tolerance=rel_tolerance, rounds=refine, first_step=base_tests,
                         samples_min=samples_min, samples_max=samples_max)
    return MarginResult(margin, lo_c, hi_c, samples, undecided, at_cap, p0, n_tests, tests=tests)


def _target_width(estimate: Tensor, tolerance: float, rel_tolerance: float | None) -> Tensor:
    """The bracket width the bisection aims at: max(tolerance, rel_tolerance * R) per point (B,)."""
    width = torch.full_like(estimate, float(tolerance))
    if rel_tolerance is not None:
        width = torch.maximum(width, rel_tolerance * estimate.abs())
    return width


def _refine(run: Callable[..., tuple[Tensor, SequentialOutcome]], history: list, margin: Tensor, lo_c: Tensor,
            hi_c: Tensor, has_crossing: Tensor, *, m: float, max_radius: float, tolerance: float,
            rel_tolerance: float | None, rounds: int, first_step: int, samples_min: int, samples_max: int,
            fallback: Callable[[], Tensor] | None = None) -> Tensor:
    """The refinement rounds of :func:`bisect_margin` (see there); returns the new estimates (B,).
    ``has_crossing`` points were all judged robust at radius 0 (p_hat > m there), so R > 0: where a fit,
    clamped into [lo_c, hi_c], crosses m at or below 0 (p a step just around m: the line through the
    radius-0 test and a heavy top-up just beyond can cross at a negative radius) it is unusable, and the
    estimate is ``fallback()`` (B,), the straight line across the current bracket (default: ``margin``,
    the bisection's), clamped the same way; this holds for the rounds' estimates too (a top-up at radius
    0 would be wasted) and for the final one (R = 0 would claim p_r(x, 0) <= m)."""
    batch = margin.shape[0]
    all_idx = torch.arange(batch)
    todo = has_crossing & ((hi_c - lo_c) > _target_width(margin, tolerance, rel_tolerance))
    line = fallback if fallback is not None else (lambda: margin)

    def usable(candidate: Tensor) -> Tensor:
        clamp = lambda t: torch.minimum(torch.maximum(t, lo_c), hi_c.clamp(max=max_radius))  # noqa: E731
        est = clamp(candidate)
        return torch.where(todo & (est <= 0), clamp(line()), est)

    estimate = margin.clone()
    for j in range(rounds):
        fit = probit_crossing(*_stack(history, batch), m, estimate)
        estimate = usable(torch.where(torch.isfinite(fit.crossing) & todo, fit.crossing, estimate))
        sd = 0.5 * _target_width(estimate, tolerance, rel_tolerance)
        n_all = refine_samples(fit, sd, m, rounds - j, samples_min, samples_max)
        for n in n_all[todo & (n_all > 0)].unique().tolist():
            idx = all_idx[todo & (n_all == n)]
            run(first_step + j, idx, estimate[idx].clone(), int(n))
    fit = probit_crossing(*_stack(history, batch), m, estimate)
    final = torch.where(torch.isfinite(fit.crossing) & todo, fit.crossing, margin)
    return torch.where(todo, usable(final), margin)


def _stack(history: list, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dense (T, B) radius / k / n of the tests in ``history`` (NaN radius, n = 0 where a point had none)."""
    radius = torch.full((len(history), batch), float("nan"), dtype=torch.float64)
    k = torch.zeros((len(history), batch), dtype=torch.int64)
    n = torch.zeros((len(history), batch), dtype=torch.int64)
    for t, (idx, rad, kk, nn) in enumerate(history):
        radius[t, idx], k[t, idx], n[t, idx] = rad, kk, nn
    return radius, k, n


class ProbitFit(NamedTuple):
    """Per point (B,) float64: the fitted crossing of m, dp/drho there, and the standard error of the
    fitted probit at the crossing (NaN where the fit is not usable)."""

    crossing: Tensor
    slope: Tensor
    z_se: Tensor


def refine_samples(fit: ProbitFit, sd: Tensor, m: float, rounds_left: int, samples_min: int, samples_max: int
                   ) -> Tensor:
    """Samples for one refinement round at the fitted crossing, per point (B,) int64: what is still
    missing for a standard error ``sd`` (radius units) of the crossing, m (1 - m) / (sd * slope)^2 minus
    the effective count the fit already holds there, shared over the rounds left; rounded up to a
    half-octave grid of multiples of 64 (points with the same n share one test call) within
    [samples_min, samples_max]; samples_max where the fit is unusable, 0 where nothing is missing."""
    zc = float(stats.probit(m))
    phi2 = math.exp(-zc * zc) / (2.0 * math.pi)
    have = m * (1.0 - m) / (phi2 * fit.z_se.clamp_min(1e-300) ** 2)
    need = (m * (1.0 - m) / (sd * fit.slope.abs()).clamp_min(1e-300) ** 2 - have) / rounds_left
    need = torch.where(torch.isfinite(need), need, torch.full_like(need, float(samples_max)))
    n = 64.0 * torch.ceil(torch.pow(2.0, torch.ceil(2.0 * torch.log2(need.clamp_min(64.0) / 64.0)) / 2.0))
    n = n.clamp(float(samples_min), float(samples_max)).long()
    return torch.where(need > 0, n, torch.zeros_like(n))


def probit_crossing(radius: Tensor, k: Tensor, n: Tensor, m: float, center: Tensor, window: float = 0.25
                    ) -> ProbitFit:
    """Local fit of p_r(rho) near each point's crossing: weighted least squares of probit(p~) on rho,
    p~ = (k + 1/2) / (n + 1), weights n phi(z)^2 / (p~ (1 - p~)) (the inverse delta-method variance of
    probit(p_hat)), over the tests with |rho - center| <= window * center, widened to the nearest test
    above center with p_hat <= m and the nearest below with p_hat > m. radius, k, n: (T, B) with NaN
    radius / n = 0 for no test; center: (B,). The crossing is clamped into the range of the radii used;
    NaN where fewer than two distinct radii are usable or the fitted slope is not negative."""
    tested = torch.isfinite(radius) & (n > 0)
    nf = n.double().clamp_min(1.0)
    pt = (k.double() + 0.5) / (nf + 1.0)
    # the window reaches at least to the nearest radius on each side whose p_hat is on the far side of m,
    # so a fit misled by one noisy test still sees a sign change
    inf = torch.full_like(radius, float("inf"))
    above = torch.where(tested & (radius > center) & (pt <= m), radius, inf).amin(0)
    below = torch.where(tested & (radius < center) & (pt > m), radius, -inf).amax(0)
    lo_w = torch.minimum(center - window * center.abs(), below)
    hi_w = torch.maximum(center + window * center.abs(), above.nan_to_num(posinf=-1.0))
    used = tested & (radius >= lo_w) & (radius <= hi_w)
    z = stats.probit(pt)
    phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    w = torch.where(used, nf * phi * phi / (pt * (1.0 - pt)), torch.zeros_like(pt))
    x = torch.where(used, radius, torch.zeros_like(radius))
    sw = w.sum(0).clamp_min(1e-300)
    xm = (w * x).sum(0) / sw
    zm = (w * z).sum(0) / sw
    sxx = (w * (x - xm) ** 2).sum(0)
    sxz = (w * (x - xm) * (z - zm)).sum(0)
    zc = float(stats.probit(m))
    nan = torch.full_like(sw, float("nan"))
    b = torch.where(sxx > 1e-12 * sw * (xm * xm).clamp_min(1e-300), sxz / sxx.clamp_min(1e-300), nan)
    ok = b < 0
    # interpolation only: a shallow or noisy fit may not extrapolate beyond the radii it saw
    lo_r, hi_r = torch.where(used, radius, inf).amin(0), torch.where(used, radius, -inf).amax(0)
    cross = torch.where(ok, torch.minimum(torch.maximum(xm + (zc - zm) / b, lo_r), hi_r), nan)
    slope = torch.where(ok, b * math.exp(-0.5 * zc * zc) / math.sqrt(2.0 * math.pi), nan)
    z_se = torch.where(ok, torch.sqrt(1.0 / sw + (cross - xm) ** 2 / sxx.clamp_min(1e-300)), nan)
    return ProbitFit(cross, slope, z_se)


def crossing(lo: Tensor, hi: Tensor, p_lo: Tensor, p_hi: Tensor, m: float, at_cap: Tensor) -> Tensor:
    """Point estimate of R in each bracket [lo, hi]: where the line through (lo, p_lo) and (hi, p_hi)
    crosses m, clamped into the bracket; the midpoint where an end has no estimate (NaN) or the
    estimates do not straddle m; lo (= the cap) for censored points. All (B,) float64."""
    straddle = (p_lo > m) & (p_hi <= m)
    t = ((p_lo - m) / (p_lo - p_hi).clamp_min(1e-12)).clamp(0.0, 1.0)
    est = torch.where(straddle, lo + t * (hi - lo), 0.5 * (lo + hi))
    return torch.where(at_cap, lo, est)


def fit_warm_start(x: Tensor, delta: Tensor, radius: Tensor, box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Rescale each delta_b along its direction to norm radius_b, or less where the box [lo, hi] (the
    model's declared input range) stops it first (scaling down always stays in the box, since x and
    x + delta are in it)."""
    flat_d, flat_x = delta.flatten(1), x.flatten(1)
    norms = flat_d.norm(dim=1).clamp(min=1e-12)
    pos = torch.where(flat_d > 0, (box[1] - flat_x) / flat_d.clamp(min=1e-30), torch.full_like(flat_d, float("inf")))
    neg = torch.where(flat_d < 0, (box[0] - flat_x) / flat_d.clamp(max=-1e-30), torch.full_like(flat_d, float("inf")))
    box = torch.minimum(pos, neg).min(dim=1).values  # largest t with x + t delta in the box
    scale = torch.minimum(radius.to(delta.dtype) / norms, box.clamp(min=1.0))
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def check_resolvable(m: float, n: int, alpha: float, confidence: float, cap: str = "samples_max") -> None:
    """Raise ``ValueError`` when no test of ``n`` samples at error budget ``alpha`` could decide p_r against
    ``m``: even 0 (or all) of n samples within r would leave the one-sided Clopper-Pearson bound on m's
    side, so every test would end undecided and R would be the midpoint of a search that never moved.
    ``cap`` names the margin setting that caps the tests at n (the one the message says to raise)."""
    hi = float(stats.cp_upper(torch.tensor([0]), n, alpha)[0])  # 0 of n inside: p_r < m needs hi < m
    lo = float(stats.cp_lower(torch.tensor([n]), n, alpha)[0])  # n of n inside: p_r > m needs lo > m
    if hi >= m:
        raise ValueError(f"m = {m:g} is too small to test with at most {n} samples at confidence {confidence:g}: "
                         f"even 0 of {n} samples within r leave p_r's upper bound at {hi:.3g} >= m, so no radius "
                         f"could be shown not robust; use m > {hi:.3g} or raise margin.{cap}")
    if lo <= m:
        raise ValueError(f"m = {m:g} is too close to 1 to test with at most {n} samples at confidence "
                         f"{confidence:g}: even {n} of {n} samples within r leave p_r's lower bound at {lo:.6g} "
                         f"<= m, so no radius could be shown robust; use m < {lo:.6g} or raise margin.{cap}")


def estimate_margin(model: VAEModel, x: Tensor, attack: Attack, attack_params: dict[str, Any], *,
                    r: float, m: float = 0.5, confidence: float = 0.95, max_radius: float = 10.0,
                    tolerance: float = 0.05, rel_tolerance: float | None = None,
                    samples_initial: int = 128, samples_max: int = 32768, samples_growth: int = 4,
                    samples_locate: int | None = None, refine: int = 0, seed: int = 0,
                    point_ids: Tensor | None = None, backend: str = "auto",
                    sigma_at: str = "clean", warm_start: bool = True,
                    warm_attack_params: dict[str, Any] | None = None,
                    stop_when_undecided: bool = False, screen_samples: int = 0,
                    screen_share: float = 0.1, verify: bool = False) -> MarginResult:
    """Margins of all points of x (B, *input_shape) at once, each with its own confidence interval.

    At each radius the attack (its own torch generator, independent of the estimation samples) looks
    for the worst delta, warm-started from the point's previous worst delta shrunk into the new ball;
    a sequential test then decides p_r(x, delta) > m with fresh samples (seed derived from ``seed``
    and the step). ``warm_attack_params`` override ``attack_params`` for warm-started calls.
    A point stops when its bracket is narrower than ``tolerance`` or than ``rel_tolerance`` times its
    upper end. Radii in input-space L2 units. ``samples_locate`` caps the sequential tests of the
    bisection (default ``samples_max``); ``refine`` > 0 adds that many fixed-count top-ups at the fitted
    crossing (see :func:`bisect_margin`), each at most ``samples_max`` samples.

    The upper end ``hi`` of each point's interval is backed by a witness: the delta (norm <= hi) whose
    test decided NOT_ROBUST at the smallest such radius, returned as ``witness_delta`` with that test's
    counts (``witness_k`` of ``witness_n`` samples within r) and its one-sided upper Clopper-Pearson
    bound ``witness_p_hi`` <= m at the test's error budget (NaN / zeros where no test decided so).

    ``verify``: after the bisection, a second look at every uncensored point with other searches, and a
    re-bisection below R where they find a clearly stronger delta (:func:`verify_margin`; its first test, at
    VERIFY_TOP R, draws up to ``samples_max`` samples, the later ones up to ``samples_locate``; where it lowers R,
    ``refine`` top-ups along its direction refine the new R). Its tests draw
    on a fixed share VERIFY_SHARE of alpha = 1 - confidence (:func:`split_verify_alpha`); the bisection's own
    tests (and screening, refinement) share the rest, so all decisions of a point still hold together with
    probability >= confidence. ``verify`` False is the estimator of before: the same budget, the same draws.
    """
    batch = x.shape[0]
    point_ids = torch.arange(batch) if point_ids is None else point_ids.cpu().long()
    locate = samples_max if samples_locate is None else min(int(samples_locate), samples_max)
    schedule = stats.sample_schedule(samples_initial, locate, samples_growth)
    # radius 0 decides whether the point is r-robust at x at all (R = 0 or not), and nothing refines it later:
    # with refine (whose top-ups reach samples_max near the crossing) it may draw up to samples_max as well
    # (REFINE_ALGORITHM 3; capped at samples_locate, a point with p_r(x, 0) within a few hundredths of m got R = 0
    # from an undecided test's p_hat <= m, and was not flagged undecided)
    zero_schedule = stats.sample_schedule(samples_initial, samples_max, samples_growth) if refine else schedule
    screen_schedule = [n for n in schedule if n <= screen_samples]
    base_tests = n_margin_tests(max_radius, tolerance, refine)
    n_tests = base_tests + (n_verify_tests(max_radius, tolerance, refine) if verify else 0)
    budget = split_verify_alpha(1.0 - confidence, max_radius, tolerance, verify, refine)
    alpha_test, alpha_screen = split_screen_alpha(budget.margin, base_tests, screen_share if screen_schedule else 0.0)
    alpha_look = stats.split_alpha(alpha_test, len(schedule))
    # the largest test: a refinement top-up (samples_max), else the sequential tests' last look (samples_locate);
    # with refine the radius-0 test reaches samples_max too, over more looks, so its last look has the smallest
    # alpha there: checked at that one (at a top-up's alpha, an m between the two bounds passed, and then the
    # radius-0 test could decide nothing even at p_r(x, 0) = 1 or 0: every point undecided)
    check_resolvable(m, samples_max if refine else locate,
                     min(alpha_look, stats.split_alpha(alpha_test, len(zero_schedule))), confidence,
                     "samples_max" if refine or locate == samples_max else "samples_locate")
    with torch.no_grad():
        mu0, sigma0, center = latent_params(model, x, None)
    last_delta = torch.zeros_like(x)
    last_radius = torch.zeros(batch, dtype=torch.float64)
    witness = torch.zeros_like(x)
    w_radius = torch.full((batch,), float("nan"), dtype=torch.float64)
    w_k = torch.zeros(batch, dtype=torch.int64)
    w_n = torch.zeros(batch, dtype=torch.int64)
    w_p_hi = torch.full((batch,), float("nan"), dtype=torch.float64)
    screen_n = torch.zeros(batch, dtype=torch.int64)  # samples of screening tests that did not decide
    zero_k = torch.zeros(batch, dtype=torch.int64)  # counts of the radius-0 test (the verification's fits)
    zero_n = torch.zeros(batch, dtype=torch.int64)

    def record_witness(idx: Tensor, radius: Tensor, delta: Tensor, out: SequentialOutcome, a_look: float) -> None:
        # hi only ever moves down, on a NOT_ROBUST decision: keep the delta of the smallest such radius
        new = (out.decision == stats.NOT_ROBUST) & ~(w_radius[idx] <= radius)
        sel = idx[new]
        witness[sel.to(x.device)] = delta[new.to(x.device)]
        w_radius[sel], w_k[sel], w_n[sel] = radius[new].double(), out.k[new], out.n[new]
        w_p_hi[sel] = stats.cp_upper(out.k[new], out.n[new].clamp(min=1), a_look)

    def mc_test(idx: Tensor, delta: Tensor, alpha: float, sizes: list[int], tag: str, step: int) -> SequentialOutcome:
        dev_idx = idx.to(x.device)
        with torch.no_grad():
            mu, sig_pert = model.encode(x[dev_idx] + delta)
        sigma = sigma0[dev_idx] if sigma_at == "clean" else sig_pert
        return sequential_test(model, mu, sigma, center[dev_idx], r=r, m=m, alpha=alpha, schedule=sizes,
                               seed=stats.derive_seed(seed, tag, step), stream_ids=point_ids[idx], backend=backend)

    def test(radius: Tensor, idx: Tensor, step: int, n: int | None = None) -> SequentialOutcome:
        dev_idx = idx.to(x.device)
        # a top-up (n given) draws n samples and decides once, at the budget of one look
        alpha, sizes = (alpha_test, zero_schedule if step == 0 else schedule) if n is None else (alpha_look, [n])
        if step == 0:  # radius 0: no attack
            out = sequential_test(model, mu0[dev_idx], sigma0[dev_idx], center[dev_idx], r=r, m=m,
                                  alpha=alpha, schedule=sizes, seed=stats.derive_seed(seed, "margin-mc", step),
                                  stream_ids=point_ids[idx], backend=backend)
            record_witness(idx, radius, torch.zeros_like(x[dev_idx]), out, stats.split_alpha(alpha, len(sizes)))
            zero_k[idx], zero_n[idx] = out.k, out.n
            return out
        xs = x[dev_idx]
        rad = radius.to(device=x.device, dtype=x.dtype)
        warm = warm_start and step > 1
        box = input_range(model)
        init = fit_warm_start(xs, last_delta[dev_idx], rad, box) if warm else None
        attack_rows = torch.ones(len(idx), dtype=torch.bool)
        screened = None
        if warm and screen_schedule and n is None:
            # Screen: the previous radius's delta rescaled costs no attack, and any delta with a confident
            # NOT_ROBUST decision is a valid witness (hi may move down); only the rest are attacked.
            cand = finalize(xs, init, rad, box=box)
            screened = mc_test(idx, cand, alpha_screen, screen_schedule, "margin-screen", step)
            attack_rows = screened.decision != stats.NOT_ROBUST
            screen_n[idx[attack_rows]] += screened.n[attack_rows]
            record_witness(idx[~attack_rows], radius[~attack_rows], cand[~attack_rows.to(x.device)],
                           SequentialOutcome(screened.decision[~attack_rows], screened.k[~attack_rows],
                                             screened.n[~attack_rows]), stats.split_alpha(alpha_screen, len(screen_schedule)))
            # last_delta / last_radius stay those of the last attacked radius: the next warm start is an
            # optimised delta, and its radius change is measured from where it was optimised
        if screened is not None and not bool(attack_rows.any()):
            return screened
        sub = attack_rows.nonzero().squeeze(1)
        a_idx, a_dev = idx[sub], sub.to(x.device)
        params = {**attack_params, **(warm_attack_params or {})} if warm else attack_params
        gen = torch.Generator(device=x.device).manual_seed(stats.derive_seed(seed, "margin-attack", step))
        result = call_attack(attack, model, xs[a_dev], rad[a_dev], params=params, generator=gen,
                             init=None if init is None else init[a_dev], point_ids=point_ids[a_idx],
                             init_radius=last_radius[a_idx].to(rad) if warm else None)
        delta = result.delta.detach()
        last_delta[a_idx.to(x.device)] = delta
        last_radius[a_idx] = radius[sub].double()
        out = mc_test(a_idx, delta, alpha, sizes, "margin-mc", step)
        record_witness(a_idx, radius[sub], delta, out, alpha_look)
        if screened is None:
            return out
        merged = SequentialOutcome(screened.decision.clone(), screened.k.clone(), screened.n.clone())
        merged.decision[sub], merged.k[sub], merged.n[sub] = out.decision, out.k, out.n
        return merged

    if sigma_at not in ("clean", "perturbed"):
        raise ValueError(f"sigma_at must be 'clean' or 'perturbed', got {sigma_at!r}")
    res = bisect_margin(test, batch, m=m, max_radius=max_radius, tolerance=tolerance,
                        rel_tolerance=rel_tolerance, stop_when_undecided=stop_when_undecided, refine=refine,
                        samples_min=samples_initial, samples_max=samples_max)
    res.witness_delta, res.witness_radius, res.witness_k, res.witness_n = witness, w_radius, w_k, w_n
    res.witness_p_hi = w_p_hi
    res.samples = res.samples + screen_n  # screening samples of tests that went on to the attack
    if verify:
        def direction_test(idx: Tensor, radius: Tensor, direction: Tensor, step: int, n: int | None = None
                           ) -> SequentialOutcome:
            # the fixed direction scaled to the radius (box-limited), tested like a bisection radius; a
            # confident NOT_ROBUST is a witness like any other (hi and witness move down)
            delta = fit_warm_start(x[idx.to(x.device)], direction, radius.to(device=x.device, dtype=x.dtype),
                                   input_range(model))
            # the first test (just below R) alone can back a witness where p is lowest: it gets its own share
            # and up to samples_max samples; the later ones locate the crossing like the bisection's tests; a
            # refinement top-up (n given) draws n samples and decides once, at a later test's budget
            if n is not None:
                alpha, sizes = budget.rest, [n]
            else:
                alpha, sizes = (budget.first, first_schedule) if step == 0 else (budget.rest, schedule)
            out = mc_test(idx, delta, alpha, sizes, "margin-verify", step)
            record_witness(idx, radius, delta, out, stats.split_alpha(alpha, len(sizes)))
            return out

        first_schedule = stats.sample_schedule(samples_initial, samples_max, samples_growth)

        # the bisection's delta behind hi (its last attacked delta where no test decided NOT_ROBUST)
        has = torch.isfinite(w_radius)
        chain = torch.where(has.to(x.device).view(-1, *([1] * (x.dim() - 1))), witness, last_delta)
        verify_margin(res, model, x, attack, attack_params, direction_test, chain,
                      torch.where(has, w_radius, last_radius), r=r, m=m, center=center,
                      sigma0=sigma0, sigma_at=sigma_at, tolerance=tolerance, rel_tolerance=rel_tolerance,
                      stop_when_undecided=stop_when_undecided, seed=seed, point_ids=point_ids, backend=backend,
                      max_radius=max_radius, refine=refine, samples_min=samples_initial, samples_max=samples_max,
                      zero_counts=(zero_k, zero_n))
        res.n_tests = n_tests
    return res


# --- verification of the attack's margins -------------------------------------------------------
VERIFY_SHRINK = 0.98  # verify at 0.98 R: a flag means R is overstated by at least 2 %
VERIFY_SCREEN = (256, 1024)  # the screen: 256 samples per candidate, 1024 for the best one where it is close
VERIFY_STOP_Z = 2.5  # ... to the flag level: p_hat(256) <= m - VERIFY_GAP + 2.5 standard errors
# flag when the smallest p_hat <= m - VERIFY_GAP. 0.02 since session 8 (was 0.03): the re-bisection's first test
# at VERIFY_TOP R now lowers nearly every flagged point, so points just below 0.03 were worth flagging
# (benchmarks/verify_coverage.py and the trained beta-VAEs; README, margin, "Verification")
VERIFY_GAP = 0.02
VERIFY_SHARE = 0.05  # share of alpha = 1 - confidence reserved for the re-bisection's tests
VERIFY_TOP = 0.999  # the re-bisection's first test at 0.999 R: p along the direction is lowest just below R
VERIFY_FIRST_SHARE = 0.5  # share of the re-bisection's alpha for that first test (it alone can lower R)
# Version of the verification algorithm, hashed into verify=true job keys (plugins/estimators.py), so a run
# folder holding an earlier verification's rows is not resumed as this one's. 2: session 8 (first test at
# VERIFY_TOP R with up to samples_max samples at VERIFY_FIRST_SHARE of the budget; p0 at lo = 0; VERIFY_GAP 0.02).
# 3: session 9 (a lowered point's R from ``refine`` top-ups along the direction and its probit fit, not the
# straight line across the re-bisection's last bracket; the top-ups are counted in n_verify_tests). 4: session 9
# review (where that fit crosses m at or below radius 0, the straight line across the narrowed bracket, not R = 0).
VERIFY_ALGORITHM = 4
NO_PRESOLVE = ("presolve_steps", "warm_presolve_steps")  # max_damage's mean-decoder pre-solve, set to 0


def n_verify_tests(max_radius: float, tolerance: float, refine: int = 0) -> int:
    """Tests the verification can add to a point: the first one at VERIFY_TOP R, at most
    ceil(log2(max_radius / tolerance)) bisection steps in [0, VERIFY_TOP R] (a bracket <= max_radius wide,
    halved down to tolerance) and, where it lowers R, ``refine`` top-ups at the fitted crossing along the
    direction (none can run where max_radius <= tolerance: no bracket is then wider than the tolerance)."""
    steps = max(0, math.ceil(math.log2(max_radius / tolerance)))
    return 1 + steps + (refine if steps else 0)


class VerifyBudget(NamedTuple):
    """Error budgets (each that of one sequential test, split over its looks by the test): ``margin`` for the
    bisection, its screening and refinement together (split further by :func:`estimate_margin`); ``first``
    for the re-bisection's first test; ``rest`` for each of its later tests."""

    margin: float
    first: float
    rest: float


def split_verify_alpha(alpha: float, max_radius: float, tolerance: float, verify: bool, refine: int = 0
                       ) -> VerifyBudget:
    """Split of alpha = 1 - confidence with ``verify``: VERIFY_SHARE of it goes to the re-bisection, of which
    VERIFY_FIRST_SHARE to its first test (at VERIFY_TOP R, the only test that can back a witness where p is
    lowest, hence the one that needs the power) and the rest evenly (Bonferroni) over the at most
    n_verify_tests - 1 later tests (locating tests and ``refine`` top-ups); the bisection, its screening and refinement share the other 1 -
    VERIFY_SHARE as before. So all of a point's decisions still hold together with probability >= 1 - alpha.
    Without verify: (alpha, 0, 0)."""
    if not verify:
        return VerifyBudget(alpha, 0.0, 0.0)
    share = alpha * VERIFY_SHARE
    later = n_verify_tests(max_radius, tolerance, refine) - 1
    if later == 0:  # max_radius <= tolerance: the re-bisection never tests below its first radius
        return VerifyBudget(alpha - share, share, 0.0)
    return VerifyBudget(alpha - share, share * VERIFY_FIRST_SHARE,
                        stats.split_alpha(share * (1.0 - VERIFY_FIRST_SHARE), later))


def verification_candidates(model: VAEModel, x: Tensor, attack: Attack, attack_params: dict[str, Any],
                            radius: Tensor, chain_delta: Tensor, chain_radius: Tensor, *, seed: int,
                            point_ids: Tensor) -> list[Tensor]:
    """Three deltas (B, *input_shape) of norm <= radius (B,), each from a different search (x: (B, ...)):
    (c0) the attack, cold, with two random starts (``restarts`` 2: the better one on the attack's own
    score is refined); (c1) the same without the mean-decoder pre-solve
    (``presolve_steps`` = ``warm_presolve_steps`` = 0, where the attack has them: a random start refined on
    the expectation itself); (c2) the bisection's own delta reflected, -chain_delta (found at
    chain_radius (B,)), rescaled to the radius and refined without the pre-solve, beside the attack's random
    start(s): the warm chain keeps the optimum it found first, and on these decoders the opposite side is
    often the stronger one. Which search finds the stronger optimum differs from point to point
    (benchmarks/attack_basins/README.md)."""
    one = {"restarts": 1} if "restarts" in attack_params else {}
    two = {"restarts": 2} if "restarts" in attack_params else {}
    alt = {**attack_params, **{key: 0 for key in NO_PRESOLVE if key in attack_params}}
    gen = torch.Generator(device=x.device).manual_seed(stats.derive_seed(seed, "margin-verify-attack"))
    box = input_range(model)

    def attack_at(params: dict[str, Any], init: Tensor | None = None, init_radius: Tensor | None = None) -> Tensor:
        return call_attack(attack, model, x, radius, params=params, generator=gen, init=init, point_ids=point_ids,
                           init_radius=init_radius).delta.detach()

    c0 = attack_at({**attack_params, **two})
    c1 = attack_at({**alt, **one})
    c2 = attack_at(alt, fit_warm_start(x, -chain_delta, radius, box), chain_radius.to(radius))
    return [c0, c1, c2]


def screen_candidates(model: VAEModel, x: Tensor, cands: list[Tensor], *, r: float, m: float, center: Tensor,
                      sigma0: Tensor, sigma_at: str, seed: int, point_ids: Tensor, backend: str
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """p_hat of the candidate deltas (C tensors (B, *input_shape)) from fresh samples, in two stages: every
    candidate VERIFY_SCREEN[0] (256) samples; then only each point's best candidate (smallest p_hat), and
    only where that p_hat is not clearly above the flag level (<= m - VERIFY_GAP + VERIFY_STOP_Z standard
    errors), up to VERIFY_SCREEN[1] (1024). A screen (it picks points and a direction; it decides nothing),
    so it takes no share of the error budget. Returns per point the best candidate's p_hat (B,) float64
    (from 1024 samples where it went on), which candidate (B,) int64, and the samples drawn (B,) int64."""
    batch, n_c = x.shape[0], len(cands)
    first, full = VERIFY_SCREEN
    with torch.no_grad():
        enc = [model.encode(x + d) for d in cands]

    def count(c: int, rows: Tensor, n: int, offset: int) -> Tensor:
        dev = rows.to(x.device)
        mu, sig_pert = enc[c][0][dev], enc[c][1][dev]
        sigma = sigma0[dev] if sigma_at == "clean" else sig_pert
        return montecarlo.count_within(model, mu, sigma, center[dev], r, n,
                                       seed=stats.derive_seed(seed, "margin-verify-screen", c),
                                       stream_ids=point_ids[rows], sample_offset=offset, backend=backend).cpu()

    all_rows = torch.arange(batch)
    k = torch.stack([count(c, all_rows, first, 0) for c in range(n_c)])  # (C, B)
    k_best, which = k.min(0)
    n = torch.full((batch,), first, dtype=torch.int64)
    go_on = k_best.double() / first <= m - VERIFY_GAP + VERIFY_STOP_Z * math.sqrt(m * (1.0 - m) / first)
    for c in range(n_c):
        rows = all_rows[go_on & (which == c)]
        if rows.numel():
            k_best[rows] += count(c, rows, full - first, first)
            n[rows] = full
    return k_best.double() / n, which, n_c * first + (n - first)


def bisect_direction(direction_test: Callable[[Tensor, Tensor, Tensor, int], SequentialOutcome], idx: Tensor,
                     direction: Tensor, top: Tensor, *, m: float, tolerance: float, rel_tolerance: float | None,
                     stop_when_undecided: bool, p_zero: Tensor | None = None, history: list | None = None
                     ) -> tuple[Tensor, ...]:
    """Bisection of points idx (F,) along a fixed direction (F, *input_shape): the first test (step 0) at
    ``top`` (F,), then in [0, top] down to tolerance / rel_tolerance. ``p_zero`` (F,): p_hat at radius 0 (the
    bisection's p0; the bracket's lower end starts there, so a search that never leaves lo = 0 interpolates
    from it as the bisection does), NaN / None: unknown. Returns (lo, hi, p_lo, p_hi, lo_c, crossed, samples,
    tests), all (F,): the final bracket with the p_hat at its ends (NaN: not tested), the largest radius
    decided ROBUST with confidence, whether some test was not robust, samples and tests used. ``history``: a
    list to which each test's (positions in idx, radius, k, n) is appended (the input of :func:`_refine`)."""
    f = idx.numel()
    lo, hi = torch.zeros(f, dtype=torch.float64), top.clone()
    lo_c = lo.clone()
    nan = torch.full_like(lo, float("nan"))
    p_lo, p_hi = (nan.clone() if p_zero is None else p_zero.double().clone()), nan.clone()
    crossed = torch.zeros(f, dtype=torch.bool)
    active = torch.ones(f, dtype=torch.bool)
    samples, tests = torch.zeros(f, dtype=torch.int64), torch.zeros(f, dtype=torch.int64)
    radius, step = hi.clone(), 0
    while bool(active.any()):
        a = active.nonzero().squeeze(1)
        out = direction_test(idx[a], radius[a], direction[a.to(direction.device)], step)
        samples[a] += out.n
        tests[a] += 1
        if history is not None:
            history.append((a, radius[a].clone(), out.k, out.n))
        robust = (out.decision == stats.ROBUST) | ((out.decision == stats.UNDECIDED) & (out.p > m))
        lo[a[robust]], p_lo[a[robust]] = radius[a[robust]], out.p[robust]
        sure = a[out.decision == stats.ROBUST]
        lo_c[sure] = torch.maximum(lo_c[sure], radius[sure])
        hi[a[~robust]], p_hi[a[~robust]] = radius[a[~robust]], out.p[~robust]
        crossed[a[~robust]] = True
        if step == 0:
            active[a[robust]] = False  # robust at the top along it: nothing to lower
        if stop_when_undecided:
            active[a[out.decision == stats.UNDECIDED]] = False
        width = hi - lo
        done = width <= tolerance
        if rel_tolerance is not None:
            done |= width <= rel_tolerance * hi
        active &= ~done
        radius = 0.5 * (lo + hi)
        step += 1
    return lo, hi, p_lo, p_hi, lo_c, crossed, samples, tests


def verify_margin(res: MarginResult, model: VAEModel, x: Tensor, attack: Attack, attack_params: dict[str, Any],
                  direction_test: Callable[..., SequentialOutcome], chain_delta: Tensor,
                  chain_radius: Tensor, *, r: float, m: float, center: Tensor, sigma0: Tensor, sigma_at: str,
                  tolerance: float, rel_tolerance: float | None, stop_when_undecided: bool, seed: int,
                  point_ids: Tensor, backend: str, max_radius: float = float("inf"), refine: int = 0,
                  samples_min: int = 128, samples_max: int = 32768,
                  zero_counts: tuple[Tensor, Tensor] | None = None) -> None:
    """Second look at the attack's margins, in place (helper F's remedy for attacks that settle in a
    poorer optimum; benchmarks/attack_basins/README.md). For every point with 0 < R < cap: the three
    :func:`verification_candidates` at rho_v = 0.98 R (chain_delta (B, ...): the bisection's delta behind
    hi, found at chain_radius (B,)), screened by :func:`screen_candidates`; a point is flagged when the
    smallest p_hat <= m - VERIFY_GAP. A flagged point then bisects again along that candidate's direction
    (:func:`bisect_direction`): its first test at VERIFY_TOP R (just below R, where p along the direction
    is lowest while a witness there still lowers R), then in [0, VERIFY_TOP R] from p0 at 0.
    ``direction_test(idx, radius, direction, step)`` runs the estimator's sequential test at the
    verification's own error budget (:func:`split_verify_alpha`; step 0, the first test, with its larger
    share and up to samples_max samples) and records witnesses. R is lowered only where one of these tests
    decided NOT_ROBUST with confidence below the old R: the new hi is that witness's radius, the new R the
    crossing of p along the direction, and the new lo the smaller of the attack's lo and the largest radius
    confidently ROBUST along the direction (lo is conditional on the deltas tried, now both searches);
    ``undecided`` is not changed by these tests. The new R: with ``refine`` > 0, ``refine`` fixed-count top-ups
    at the fitted crossing along the direction (``direction_test(idx, radius, direction, step, n)``, steps from
    n_verify_tests(max_radius, tolerance) on, n in [samples_min, samples_max] from the fitted slope) and then
    the probit-linear fit of all the direction's tests near the crossing, the radius-0 test included
    (``zero_counts`` (k, n) (B,): p along every direction starts at p0), as :func:`bisect_margin` refines
    (algorithm 3: where p is flat near m the re-bisection stops undecided on a bracket up to 2x wide, whose
    straight-line crossing fell up to 27 % below the exact margin); where that fit crosses m at or below
    radius 0 (algorithm 4: R = 0 would claim p_r(x, 0) <= m), and with ``refine`` 0, the straight-line
    crossing of the final bracket (narrowed by the top-ups). Fills res.verify_flagged, res.verified_lower,
    res.verify_p; adds the screen's and the tests' samples to res.samples and the tests to res.tests."""
    batch = x.shape[0]
    res.verify_flagged = torch.zeros(batch, dtype=torch.bool)
    res.verified_lower = torch.zeros(batch, dtype=torch.bool)
    res.verify_p = torch.full((batch,), float("nan"), dtype=torch.float64)
    old = res.margin.clone()
    sel = ((~res.at_cap) & torch.isfinite(old) & (old > 0)).nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    dev = sel.to(x.device)
    rho_v = VERIFY_SHRINK * old[sel]
    cands = verification_candidates(model, x[dev], attack, attack_params, rho_v.to(x.dtype).to(x.device),
                                    chain_delta[dev], chain_radius[sel], seed=seed, point_ids=point_ids[sel])
    p_min, which, screen_n = screen_candidates(model, x[dev], cands, r=r, m=m, center=center[dev],
                                               sigma0=sigma0[dev], sigma_at=sigma_at, seed=seed,
                                               point_ids=point_ids[sel], backend=backend)
    res.samples[sel] += screen_n
    res.verify_p[sel] = p_min
    flag = p_min <= m - VERIFY_GAP
    res.verify_flagged[sel[flag]] = True
    if not bool(flag.any()):
        return
    idx = sel[flag]
    rows = flag.nonzero().squeeze(1)
    direction = torch.stack(cands)[which[rows].to(x.device), rows.to(x.device)]
    history: list = []  # the direction's tests, (positions in idx, radius, k, n), for the refinement's fit
    if zero_counts is not None:
        history.append((torch.arange(idx.numel()), torch.zeros(idx.numel(), dtype=torch.float64),
                        zero_counts[0][idx], zero_counts[1][idx]))
    # from 0: the attack's lo holds for its own deltas only, and sits within rel_tolerance of R
    lo, hi, p_lo, p_hi, lo_c, crossed, n_used, n_tests = bisect_direction(
        direction_test, idx, direction, VERIFY_TOP * old[idx], m=m, tolerance=tolerance,
        rel_tolerance=rel_tolerance, stop_when_undecided=stop_when_undecided, p_zero=res.p0[idx], history=history)
    res.samples[idx] += n_used
    if res.tests is not None:
        res.tests[idx] += n_tests

    def witness_hi() -> Tensor:
        return torch.minimum(res.hi[idx], res.witness_radius[idx].nan_to_num(nan=float("inf")))

    lower = crossed & (witness_hi() < old[idx])  # a confident NOT_ROBUST below the old R backs the new one
    est = crossing(lo, hi, p_lo, p_hi, m, torch.zeros_like(lower))
    if refine > 0 and bool(lower.any()):
        hi_c = witness_hi()

        def run(step: int, pos: Tensor, radius: Tensor, n: int) -> tuple[None, SequentialOutcome]:
            # a top-up along the direction (direction_test records a NOT_ROBUST one as a witness)
            out = direction_test(idx[pos], radius, direction[pos.to(direction.device)], step, n)
            res.samples[idx[pos]] += out.n
            if res.tests is not None:
                res.tests[idx[pos]] += 1
            history.append((pos, radius.double(), out.k, out.n))
            up, down = out.decision == stats.ROBUST, out.decision == stats.NOT_ROBUST
            lo_c[pos[up]] = torch.maximum(lo_c[pos[up]], radius[up].double())
            hi_c[pos[down]] = torch.minimum(hi_c[pos[down]], radius[down].double())
            # the bracket of p_hat along the direction narrows as bisect_direction's does (the fallback below)
            rad, inside = radius.double(), (radius.double() > lo[pos]) & (radius.double() < hi[pos])
            above = (up | ((out.decision == stats.UNDECIDED) & (out.p > m))) & inside
            below = ~above & inside
            lo[pos[above]], p_lo[pos[above]] = rad[above], out.p[above]
            hi[pos[below]], p_hi[pos[below]] = rad[below], out.p[below]
            return None, out

        # a fit that crosses m at or below radius 0 (clamped to its smallest radius, 0) would report R = 0, the
        # margin of a point not robust at x itself, for a point whose p_hat at 0 is above m (a lowered point's
        # p0 > m, else its old R would be 0): there _refine takes the straight line across the bracket the
        # top-ups narrowed, which starts at (0, p0) and so stays above 0 (session 9 review: p a step just
        # around m along the direction); in the rounds too, so no top-up is placed at radius 0
        est = _refine(run, history, est, lo_c, hi_c, lower, m=m, max_radius=max_radius, tolerance=tolerance,
                      rel_tolerance=rel_tolerance, rounds=refine, first_step=n_verify_tests(max_radius, tolerance),
                      samples_min=samples_min, samples_max=samples_max,
                      fallback=lambda: crossing(lo, hi, p_lo, p_hi, m, torch.zeros_like(lower)))
    new_hi = witness_hi()
    new_lo = torch.minimum(res.lo[idx], lo_c)
    est = torch.minimum(torch.maximum(est, new_lo), new_hi)
    li = idx[lower]
    res.lo[li], res.hi[li] = new_lo[lower], new_hi[lower]
    res.margin[li] = torch.minimum(old[li], est[lower])
    res.verified_lower[li] = True


def split_screen_alpha(alpha: float, n_tests: int, screen_share: float) -> tuple[float, float]:
    """(error budget per margin test, per screening test): each of the ``n_tests`` radii a point can see may
    also get one screening test (the previous radius's delta, before any attack), so ``screen_share`` of
    ``alpha`` is split over ``n_tests`` screening tests and the rest over the margin tests (Bonferroni;
    screening decisions are few and easy, so a small share costs the margin tests almost nothing)."""
    if not 0.0 <= screen_share < 1.0:
        raise ValueError(f"screen_share must be in [0, 1), got {screen_share}")
    per_test = stats.split_alpha(alpha * (1.0 - screen_share), n_tests)
    return per_test, (stats.split_alpha(alpha * screen_share, n_tests) if screen_share > 0 else 0.0)


# --- Theorem 1 ---------------------------------------------------------------------------------
def theorem1_bound(min_sigma: Tensor, p0: Tensor, jacobian_frobenius: Tensor, m: float = 0.5
                   ) -> tuple[Tensor, list[str]]:
    """R(x) >= min_i sigma_i(x) * (probit(p0) - probit(m)) / ||J_mu(x)||_F (first order; with m = 0.5 this is
    the paper's Theorem 1, and the general m follows from the same Neyman-Pearson half-space argument).

    p0 should be a lower confidence bound of p_r(x, 0) so the bound holds with that confidence.
    Returns (B,) float64 bounds (NaN where vacuous, +inf where unbounded) and a status per point: "ok",
    "vacuous_p0" (p0 <= m: not r-robust even unperturbed), "vacuous_sigma" (min sigma = 0: deterministic
    encoder), "unbounded" (zero Jacobian: no first-order change of mu, the bound is +inf)."""
    min_sigma = min_sigma.detach().cpu().double()
    jac = jacobian_frobenius.detach().cpu().double()
    p0 = p0.detach().cpu().double()
    gap = stats.probit(p0) - float(stats.probit(m))
    bound = min_sigma * gap / jac
    status = []
    for i in range(bound.numel()):
        if not p0[i] > m:
            status.append("vacuous_p0")
        elif not min_sigma[i] > 0:
            status.append("vacuous_sigma")
        elif not jac[i] > 0:
            status.append("unbounded")
        else:
            status.append("ok")
    bound = torch.where(torch.tensor([s == "ok" for s in status], dtype=torch.bool), bound,
                        torch.full_like(bound, float("nan")))
    bound[torch.tensor([s == "unbounded" for s in status], dtype=torch.bool)] = float("inf")
    return bound, status
