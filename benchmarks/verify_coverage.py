"""Known-answer coverage of the margin estimator WITH verification, under stub attacks that underperform
(session 7 review; README, margin section, "Verification").

Linear-Gaussian VAE (exact margins; p_r of any delta in closed form from ||A delta||). Every sequential test the
estimator runs is recorded (robbench.margin.sequential_test wrapped): its stage (from the seed tag), the exact p_r of
the delta it tested, its decision. A decision is WRONG when ROBUST with p_r <= m or NOT_ROBUST with p_r > m.
Per point we report: any wrong decision (the event the Bonferroni budget bounds by alpha), coverage of the exact
margin by [lo, hi], hi >= exact (the unconditional end), every stored witness's exact p_r <= m.
Usage: python benchmarks/verify_coverage.py STREAMS CONFIDENCE trapped|tilted|exact [VERIFY 0/1] [SEED]
(1 thread; about 5 CPU s for 1000 streams at r = 4, 25-55 s in the flat regime r = 2)
Environment overrides (session 8 review's regimes): COV_R (r, default 4), COV_M (m, 0.5), COV_CAP (max_radius,
default the estimator's), COV_COSLO (the tilted stub's smallest cos(t), 0.9).
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter

import torch

import robbench.margin as M
from robbench import stats
from robbench.protocols import AttackResult
from robbench_plugins.analytic import LinearGaussianVAE
from robbench_plugins.estimators import ESTIMATORS, MARGIN_DEFAULTS

torch.set_num_threads(1)
STREAMS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
CONF = float(sys.argv[2]) if len(sys.argv) > 2 else 0.95
KIND = sys.argv[3] if len(sys.argv) > 3 else "trapped"
VERIFY = bool(int(sys.argv[4])) if len(sys.argv) > 4 else True
SEED = int(sys.argv[5]) if len(sys.argv) > 5 else 0
R, MM = float(os.environ.get("COV_R", 4.0)), float(os.environ.get("COV_M", 0.5))
CAP = float(os.environ.get("COV_CAP", 0)) or None
PARAMS = {"presolve_steps": 60, "warm_presolve_steps": 60, "restarts": 1}


class Stub:
    """trapped: pre-solve on -> 0.8 of the radius along the worst direction u, off -> exact.
    tilted: pre-solve on -> the radius along cos(t) u + sin(t) v (v a fixed unit vector orthogonal to u, per point),
    cos(t) in [COV_COSLO, 1] (R overstated by 0-~11 % at 0.9); off -> exact. Deterministic per point id.
    exact: always the worst delta (nothing to lower: every flag is a false flag, the verification's pure cost)."""

    name, description, defaults = "stub", "stub", dict(PARAMS)

    def __init__(self, model, kind):
        self.model, self.kind = model, kind
        u = model.top_direction.double()
        g = torch.Generator().manual_seed(123)
        v = torch.randn(STREAMS, u.numel(), generator=g, dtype=torch.float64)
        v = v - (v @ u)[:, None] * u[None]
        self.v = (v / v.norm(dim=1, keepdim=True)).float()
        lo_c = float(os.environ.get("COV_COSLO", 0.9))
        self.cos = (lo_c + (1 - lo_c) * torch.rand(STREAMS, generator=g, dtype=torch.float64)).float()

    def __call__(self, model, x, radius, *, params, generator, init=None, point_ids=None, init_radius=None):
        u = model.top_direction.view(1, -1).expand(x.shape[0], -1)
        rad = radius.view(-1, 1).to(x)
        ids = torch.arange(x.shape[0]) if point_ids is None else point_ids
        trap = params["presolve_steps"] > 0
        if self.kind == "exact":
            d = rad * u
        elif self.kind == "trapped":
            d = (0.8 if trap else 1.0) * rad * u
        else:
            c = self.cos[ids].view(-1, 1) if trap else torch.ones(x.shape[0], 1)
            d = 0.999999 * rad * (c * u + (1 - c * c).clamp_min(0).sqrt() * self.v[ids])
        return AttackResult(d.view_as(x), radius.clone())


model = LinearGaussianVAE()
exact = model.exact_margin(R, MM)
mu0 = model.encode(torch.full((1, *model.input_shape), 0.5))[0]
base = stats.derive_seed(SEED, "margin")
TAGS = {stats.derive_seed(base, t, s): t for t in ("margin-mc", "margin-screen", "margin-verify") for s in range(80)}
log = []
orig = M.sequential_test


def wrapped(model_, mu, sigma, center, *, r, m, alpha, schedule, seed, stream_ids, backend="auto"):
    out = orig(model_, mu, sigma, center, r=r, m=m, alpha=alpha, schedule=schedule, seed=seed,
               stream_ids=stream_ids, backend=backend)
    shift = (mu.double() - mu0.double()).norm(dim=1)
    p = torch.tensor([model.exact_probability(float(s), R) for s in shift])
    wrong = ((out.decision == stats.ROBUST) & (p <= m)) | ((out.decision == stats.NOT_ROBUST) & (p > m))
    log.append((TAGS.get(seed, "?"), stream_ids.clone(), wrong, alpha, len(schedule), out.n.clone()))
    return out


M.sequential_test = wrapped
p = {**MARGIN_DEFAULTS, "verify": VERIFY}
t0 = time.process_time()
res = M.estimate_margin(model, torch.full((STREAMS, *model.input_shape), 0.5), Stub(model, KIND), dict(PARAMS),
                        r=R, m=MM, confidence=CONF, max_radius=CAP or p["max_radius"], tolerance=p["tolerance"],
                        rel_tolerance=p["rel_tolerance"], samples_initial=p["samples_initial"],
                        samples_max=p["samples_max"], samples_growth=p["samples_growth"],
                        samples_locate=p["samples_locate"], refine=p["refine"], seed=base,
                        point_ids=torch.arange(STREAMS), backend="torch", stop_when_undecided=p["stop_when_undecided"],
                        verify=VERIFY)
cpu = time.process_time() - t0
any_wrong = torch.zeros(STREAMS, dtype=torch.bool)
by_stage, tests_by_stage, max_tests = Counter(), Counter(), Counter()
per_point_stage = {}
for tag, ids, wrong, alpha, looks, n in log:
    any_wrong[ids[wrong]] = True
    by_stage[tag] += int(wrong.sum())
    tests_by_stage[tag] += ids.numel()
    for i in ids.tolist():
        per_point_stage[(tag, i)] = per_point_stage.get((tag, i), 0) + 1
for (tag, i), c in per_point_stage.items():
    max_tests[tag] = max(max_tests[tag], c)
cover = (res.lo <= exact) & (exact <= res.hi)
hi_ok = exact <= res.hi
wit = res.witness_delta.flatten(1).double() @ model.A.double().T
wp = torch.tensor([model.exact_probability(float(s), R) for s in wit.norm(dim=1)])
has = torch.isfinite(res.witness_radius)
err = (res.margin / exact - 1).abs()
print(f"kind={KIND} verify={VERIFY} conf={CONF} streams={STREAMS} seed={SEED} exact={exact:.4f} cpu={cpu:.1f}s "
      f"n_tests={res.n_tests}")
print(f"  cover [lo,hi]: {int(cover.sum())}/{STREAMS}  hi>=exact: {int(hi_ok.sum())}/{STREAMS}  "
      f"witness exact p<=m: {int((wp[has] <= MM).sum())}/{int(has.sum())}  any wrong decision: {int(any_wrong.sum())} "
      f"(budget alpha*N = {(1 - CONF) * STREAMS:.1f})")
print(f"  wrong decisions by stage: {dict(by_stage)}  tests by stage: {dict(tests_by_stage)}  "
      f"max tests/point by stage: {dict(max_tests)}")
if VERIFY:
    fl, lw = res.verify_flagged, res.verified_lower
    bad = res.lo > exact
    def rel(sel):
        return res.margin[sel] / exact - 1

    print(f"  flagged {int(fl.sum())} lowered {int(lw.sum())}; lo>exact among: not flagged {int((bad & ~fl).sum())}/"
          f"{int((~fl).sum())}, flagged not lowered {int((bad & fl & ~lw).sum())}/{int((fl & ~lw).sum())}, "
          f"lowered {int((bad & lw).sum())}/{int(lw.sum())}")
    print(f"  R/exact-1: flagged-not-lowered mean {float(rel(fl & ~lw).mean()):+.4f}; lowered mean "
          f"{float(rel(lw).mean()):+.4f}, max abs {float(rel(lw).abs().max()) if bool(lw.any()) else math.nan:.4f}; "
          f"not flagged mean "
          f"{float(rel(~fl).mean()):+.4f}")
print(f"  |R/exact-1| mean {float(err.mean()):.4f} max {float(err.max()):.4f}; mean R/exact-1 "
      f"{float((res.margin / exact - 1).mean()):+.4f}; lo>exact: {int((res.lo > exact).sum())}; "
      f"samples/point {float(res.samples.double().mean()):.0f}")
inside = (res.lo <= res.margin + 1e-12) & (res.margin <= res.hi + 1e-12)
print(f"  margin inside [lo, hi]: {int(inside.sum())}/{STREAMS}; censored {int(res.at_cap.sum())}; R={R} m={MM} cap={CAP}")
