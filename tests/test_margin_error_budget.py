"""The margin estimator's error budget, counted test by test (session 7 review of the verification).

The README and estimate_margin promise that all decisions of a point hold together with probability >=
confidence: a Bonferroni split of alpha = 1 - confidence over every test a point can see. These tests record
every sequential test (and refinement top-up) the estimator really runs, with the alpha it ran at, and check
that per point the alphas add up to no more than alpha, and to no more than each stage's stated share (the
verification's re-bisection VERIFY_SHARE, the screening screen_share of the rest). The configuration makes
the stated counts tight: the attack is trapped (so every point is flagged and re-bisected), tolerance is
tiny, rel_tolerance and stop_when_undecided are off (every search runs to its last step), and max_radius is
just above the trapped margin (so the re-bisection's bracket is nearly as wide as the budget assumes).

They also check that no decoder sample is used twice in one estimate: the verification picks a flagged
point's direction from its screen's samples, so a re-bisection test on those same samples would be biased
(it would test the direction on the noise that chose it).
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

import robbench.margin as margin
from robbench import montecarlo, stats
from robbench.margin import (VERIFY_FIRST_SHARE, VERIFY_SHARE, VERIFY_TOP, estimate_margin, n_margin_tests,
                             n_verify_tests)
from robbench.protocols import AttackResult
from robbench_plugins.analytic import LinearGaussianVAE

R, CONF, SEED, POINTS = 4.0, 0.9, 11, 3
PARAMS = {"presolve_steps": 60, "warm_presolve_steps": 60, "restarts": 1}
STAGES = ("margin-mc", "margin-screen", "margin-verify")


class TrappedAttack:
    """delta along the worst direction; 0.8 of the radius with the pre-solve on (every bisection call), the
    full radius without it (the verification's c1 / c2): R is overstated by 25 % until verification."""

    name, description, defaults = "trapped", "pre-solve trap stub", dict(PARAMS)

    def __call__(self, model, x, radius, *, params, generator, init=None):
        scale = 0.8 if params["presolve_steps"] > 0 else 1.0
        u = model.top_direction.view(1, *model.input_shape)
        return AttackResult(scale * radius.view(-1, *([1] * (x.dim() - 1))).to(x) * u, radius.clone())


def tight_settings(model: LinearGaussianVAE, **extra) -> dict:
    exact = model.exact_margin(R)
    max_radius = 1.3 * exact  # the trapped margin is ~1.25 exact: the cap binds nothing, but the budget is tight
    tolerance = exact / 1000
    return dict(r=R, confidence=CONF, max_radius=max_radius, tolerance=tolerance, rel_tolerance=None,
                samples_initial=64, samples_locate=256, samples_max=1024, refine=2, screen_samples=64,
                screen_share=0.1, stop_when_undecided=False, seed=SEED, point_ids=torch.arange(POINTS),
                backend="torch", verify=True, **extra)


def run_recorded(model, monkeypatch, **settings):
    """estimate_margin with every sequential test (stage, point ids, alpha, its largest sample size, seed)
    and every count_within call (seed, stream ids, sample offset, count) recorded."""
    tags = {stats.derive_seed(SEED, tag, step): tag for tag in STAGES for step in range(200)}
    tests, draws = [], []
    sequential, count = margin.sequential_test, montecarlo.count_within

    def recorded_test(*args, alpha, seed, stream_ids, schedule, **kw):
        tests.append((tags.get(seed, "?"), stream_ids.clone(), alpha, schedule[-1], seed))
        return sequential(*args, alpha=alpha, seed=seed, stream_ids=stream_ids, schedule=schedule, **kw)

    def recorded_count(model_, mu, sigma, center, r, n_samples, *, seed, stream_ids=None, sample_offset=0, **kw):
        draws.append((seed, stream_ids.clone(), sample_offset, n_samples))
        return count(model_, mu, sigma, center, r, n_samples, seed=seed, stream_ids=stream_ids,
                     sample_offset=sample_offset, **kw)

    monkeypatch.setattr(margin, "sequential_test", recorded_test)
    monkeypatch.setattr(montecarlo, "count_within", recorded_count)
    res = estimate_margin(model, torch.full((POINTS, *model.input_shape), 0.5), TrappedAttack(), dict(PARAMS),
                          **settings)
    return res, tests, draws


def test_every_point_spends_at_most_alpha_and_each_stage_at_most_its_share(model, monkeypatch):
    settings = tight_settings(model)
    res, tests, _ = run_recorded(model, monkeypatch, **settings)
    assert res.verified_lower.all()  # every point went through the whole verification
    alpha = 1.0 - CONF
    spent = defaultdict(float)  # (stage, point) -> sum of the alphas of its tests
    count = defaultdict(int)
    for stage, ids, a, _, _ in tests:
        assert stage != "?", "a test ran on a seed of no known stage"
        for pid in ids.tolist():
            spent[stage, pid] += a
            count[stage, pid] += 1
    n_v = n_verify_tests(settings["max_radius"], settings["tolerance"], settings["refine"])
    n_m = n_margin_tests(settings["max_radius"], settings["tolerance"], settings["refine"])
    # the configuration is tight: the re-bisection runs every test its budget allows, its `refine` top-ups included
    assert max(count["margin-verify", p] for p in range(POINTS)) == n_v
    margin_alpha = alpha * (1 - VERIFY_SHARE)
    # and each test runs at exactly the alpha the README states (a refinement top-up: one look of a test)
    looks = len(stats.sample_schedule(settings["samples_initial"], settings["samples_locate"]))
    per_test = {"margin-mc": margin_alpha * (1 - settings["screen_share"]) / n_m,
                "margin-screen": margin_alpha * settings["screen_share"] / n_m}
    # the re-bisection: its first test (step 0) VERIFY_FIRST_SHARE of the share with up to samples_max samples,
    # each later one an even part of the rest with up to samples_locate, like the bisection's tests; the top-ups
    # along the direction (steps from n_verify_tests without refine on) too, with at most samples_max samples
    first_seed = stats.derive_seed(SEED, "margin-verify", 0)
    base_v = n_verify_tests(settings["max_radius"], settings["tolerance"])
    top_up_seeds = {stats.derive_seed(SEED, "margin-verify", base_v + j) for j in range(settings["refine"])}
    verify_first = alpha * VERIFY_SHARE * VERIFY_FIRST_SHARE
    verify_later = alpha * VERIFY_SHARE * (1 - VERIFY_FIRST_SHARE) / (n_v - 1)
    firsts, top_ups = defaultdict(int), defaultdict(int)
    for stage, ids, a, largest, seed in tests:
        if stage == "margin-verify":
            first = seed == first_seed
            assert a == pytest.approx(verify_first if first else verify_later, rel=1e-12), (first, a)
            if seed in top_up_seeds:
                assert settings["samples_initial"] <= largest <= settings["samples_max"]
            else:
                assert largest == (settings["samples_max"] if first else settings["samples_locate"])
            for pid in ids.tolist():
                firsts[pid] += first
                top_ups[pid] += seed in top_up_seeds
            continue
        allowed = [per_test[stage]] + ([per_test[stage] / looks] if stage == "margin-mc" else [])
        assert any(a == pytest.approx(b, rel=1e-12) for b in allowed), (stage, a, allowed)
    assert all(firsts[p] == 1 for p in range(POINTS))  # one first test per point, the rest later ones
    assert all(top_ups[p] == settings["refine"] for p in range(POINTS))  # every lowered point was refined
    for p in range(POINTS):
        assert count["margin-verify", p] <= n_v and count["margin-mc", p] <= n_m
        assert count["margin-screen", p] <= n_m
        assert spent["margin-verify", p] <= alpha * VERIFY_SHARE * (1 + 1e-9)
        assert spent["margin-screen", p] <= margin_alpha * settings["screen_share"] * (1 + 1e-9)
        assert spent["margin-mc", p] <= margin_alpha * (1 - settings["screen_share"]) * (1 + 1e-9)
        assert sum(spent[s, p] for s in STAGES) <= alpha * (1 + 1e-9)


@pytest.mark.parametrize("max_radius, tolerance", [(10.0, 0.001), (1e6, 1e-9), (1.0, VERIFY_TOP / 1024),
                                                     (5.0, 4.9 / 2 ** 20), (3.0, 2.0)])
def test_the_verification_budget_covers_its_longest_re_bisection(max_radius, tolerance):
    """The re-bisection (bisect_direction) from its highest start, VERIFY_TOP max_radius, with any outcomes,
    never runs more than n_verify_tests tests, also where VERIFY_TOP max_radius / tolerance is a power of two (float
    rounding of the halved bracket could need one more halving there)."""
    gen = torch.Generator().manual_seed(0)
    batch = 64

    def outcomes(idx, radius, direction, step):
        n = torch.full((idx.numel(),), 100, dtype=torch.int64)
        k = torch.randint(0, 101, (idx.numel(),), generator=gen)
        decision = torch.randint(-1, 2, (idx.numel(),), generator=gen)
        if step == 0:  # not robust at the top: the whole bracket [0, top] is searched
            decision[:], k[:] = stats.NOT_ROBUST, 0
        return margin.SequentialOutcome(decision, k, n)

    top = torch.full((batch,), VERIFY_TOP * max_radius, dtype=torch.float64)
    *_, tests = margin.bisect_direction(outcomes, torch.arange(batch), torch.zeros(batch, 4), top, m=0.5,
                                        tolerance=tolerance, rel_tolerance=None, stop_when_undecided=False)
    assert int(tests.max()) <= n_verify_tests(max_radius, tolerance)
    assert int(tests.max()) >= n_verify_tests(max_radius, tolerance) - 1  # and the budget is not loose


def test_no_decoder_sample_is_used_twice(model, monkeypatch):
    """Every (seed, stream) pair's sample ranges are disjoint over the whole estimate: the re-bisection's tests
    never see the screen's samples (which chose the direction), nor the bisection's or one another's."""
    _, _, draws = run_recorded(model, monkeypatch, **tight_settings(model))
    seen = defaultdict(list)  # (seed, stream id) -> [(start, end)]
    for seed, ids, offset, n in draws:
        for sid in ids.tolist():
            seen[seed, sid].append((offset, offset + n))
    verify_screen = {stats.derive_seed(SEED, "margin-verify-screen", c) for c in range(3)}
    assert any(seed in verify_screen for seed, _ in seen)  # the screen ran
    for key, spans in seen.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end, f"samples of stream {key} used twice: {spans}"


def test_a_portfolio_point_spends_at_most_alpha_over_all_its_attacks(model, monkeypatch):
    """margin.portfolio runs the whole estimate once per attack and keeps each point's smallest margin with
    that attack's interval: the interval holds when every attack's decisions hold, so the attacks must share
    alpha (each ran at the full alpha: K attacks spent K alpha, the stated confidence did not hold)."""
    from robbench.protocols import EstimationContext
    from robbench.settings import RunSettings
    from robbench_plugins.estimators import ESTIMATORS

    est = next(e for e in ESTIMATORS if e.name == "margin")
    alphas = defaultdict(float)
    sequential = margin.sequential_test

    def recorded_test(*args, alpha, stream_ids, **kw):
        for pid in stream_ids.tolist():
            alphas[pid] += alpha
        return sequential(*args, alpha=alpha, stream_ids=stream_ids, **kw)

    monkeypatch.setattr(margin, "sequential_test", recorded_test)
    second = TrappedAttack()
    params = {**est.defaults, "tolerance": 0.01, "samples_max": 4096, "keep_adversarial": False, "portfolio": True,
              "portfolio_attacks": [("second", second, dict(PARAMS))]}
    ctx = EstimationContext(model=model, attack=TrappedAttack(), attack_params=dict(PARAMS), params=params,
                            point_ids=torch.arange(2), run=RunSettings(r=R, confidence=CONF, backend="torch"))
    rows = est(ctx, torch.full((2, *model.input_shape), 0.5))
    assert all(row["margin_lo"] <= model.exact_margin(R) <= row["margin_hi"] for row in rows)
    assert sorted(alphas) == [0, 1]
    # each attack ran the bisection (tests at radius 0, the bisection, the refinement) and the verification
    assert all(a <= (1.0 - CONF) * (1 + 1e-9) for a in alphas.values()), dict(alphas)


class ExactAttack(TrappedAttack):
    """The exact worst delta at every call (the bisection's R is right: nothing to flag)."""

    def __call__(self, model, x, radius, *, params, generator, init=None):
        return super().__call__(model, x, radius, params={**params, "presolve_steps": 0}, generator=generator)


def edge_settings(model: LinearGaussianVAE, case: str) -> tuple[dict, object]:
    """Settings of one edge case of the verification's budget (session 8 review) and the attack to use."""
    exact = model.exact_margin(R)
    base = {**tight_settings(model), "tolerance": exact / 50}
    cases = {
        "refine off": ({"refine": 0}, TrappedAttack()),
        "estimator defaults (stop_when_undecided, rel_tolerance)": (
            {"rel_tolerance": 0.01, "stop_when_undecided": True, "samples_locate": 2048, "samples_max": 32768,
             "samples_initial": 128, "screen_samples": 0}, TrappedAttack()),
        "samples_locate unset": ({"samples_locate": None}, TrappedAttack()),
        "tolerance above max_radius (no later tests)": ({"tolerance": 2.0 * base["max_radius"]}, TrappedAttack()),
        "cap below the trapped R (censored: never verified)": ({"max_radius": 1.1 * exact}, TrappedAttack()),
        "exact attack (never flagged)": ({}, ExactAttack()),
        # session 9 review of algorithm 3: the top-ups' count and alpha follow refine, confidence and m
        "refine 1": ({"refine": 1}, TrappedAttack()),
        "refine 5": ({"refine": 5}, TrappedAttack()),
        "confidence 0.99, m 0.7": ({"confidence": 0.99, "m": 0.7}, TrappedAttack()),
        "confidence 0.5, m 0.3": ({"confidence": 0.5, "m": 0.3, "max_radius": 1.3 * model.exact_margin(R, 0.3),
                                   "tolerance": model.exact_margin(R, 0.3) / 50}, TrappedAttack()),
    }
    extra, attack = cases[case]
    return {**base, **extra}, attack


@pytest.mark.parametrize("case", ["refine off", "estimator defaults (stop_when_undecided, rel_tolerance)",
                                  "samples_locate unset", "tolerance above max_radius (no later tests)",
                                  "cap below the trapped R (censored: never verified)", "exact attack (never flagged)",
                                  "refine 1", "refine 5", "confidence 0.99, m 0.7", "confidence 0.5, m 0.3"])
def test_the_verification_budget_holds_in_edge_configurations(model, monkeypatch, case):
    """Per point the verification's tests spend at most VERIFY_SHARE alpha (one first test at exactly the first
    share, with up to samples_max samples; the later ones at exactly the rest's even part, up to the locating
    cap) and all tests together at most alpha, in the configurations the tight test above does not cover."""
    settings, attack = edge_settings(model, case)
    tests: list = []
    sequential = margin.sequential_test
    tags = {stats.derive_seed(SEED, tag, step): (tag, step) for tag in STAGES for step in range(200)}

    def recorded_test(*args, alpha, seed, stream_ids, schedule, **kw):
        tests.append((*tags.get(seed, ("?", -1)), stream_ids.clone(), alpha, schedule[-1]))
        return sequential(*args, alpha=alpha, seed=seed, stream_ids=stream_ids, schedule=schedule, **kw)

    monkeypatch.setattr(margin, "sequential_test", recorded_test)
    res = estimate_margin(model, torch.full((POINTS, *model.input_shape), 0.5), attack, dict(PARAMS), **settings)
    alpha = 1.0 - settings["confidence"]
    budget = margin.split_verify_alpha(alpha, settings["max_radius"], settings["tolerance"], True, settings["refine"])
    n_v = n_verify_tests(settings["max_radius"], settings["tolerance"], settings["refine"])
    base_v = n_verify_tests(settings["max_radius"], settings["tolerance"])  # top-ups: steps from here on
    locate = settings["samples_max"] if settings["samples_locate"] is None else settings["samples_locate"]
    spent, verify_spent = defaultdict(float), defaultdict(float)
    firsts, verify_count, top_ups = defaultdict(int), defaultdict(int), defaultdict(int)
    for stage, step, ids, a, largest in tests:
        assert stage != "?"
        for pid in ids.tolist():
            spent[pid] += a
        if stage != "margin-verify":
            continue
        assert a == (budget.first if step == 0 else budget.rest), (step, a, budget)
        if step >= base_v:  # a refinement top-up along the direction: one look of n <= samples_max samples
            assert step < base_v + settings["refine"] and largest <= settings["samples_max"]
        else:
            assert largest == (settings["samples_max"] if step == 0 else min(locate, settings["samples_max"]))
        for pid in ids.tolist():
            verify_spent[pid] += a
            verify_count[pid] += 1
            firsts[pid] += step == 0
            top_ups[pid] += step >= base_v
    verified = (~res.at_cap & res.verify_flagged).nonzero().squeeze(1).tolist()
    assert sorted(verify_count) == sorted(verified)  # exactly the flagged points were re-bisected
    for p in range(POINTS):
        assert spent[p] <= alpha * (1 + 1e-9)
        assert verify_spent[p] <= alpha * VERIFY_SHARE * (1 + 1e-9)
        assert verify_count[p] <= n_v and firsts[p] == (p in verified)
        assert top_ups[p] <= settings["refine"]
    # the count the budget assumes, pinned apart from n_verify_tests: the first test, the locating steps and,
    # where there can be any, the `refine` top-ups (a change of the formula must show here)
    steps = max(0, math.ceil(math.log2(settings["max_radius"] / settings["tolerance"])))
    assert n_v == 1 + steps + (settings["refine"] if steps else 0)
    if settings["refine"] and case.startswith(("refine", "confidence 0.99")):
        assert max(top_ups.values()) >= 1  # the top-ups ran (the case exercises them)
    if case.startswith("tolerance above"):
        assert n_v == 1 and budget.first == pytest.approx(alpha * VERIFY_SHARE) and budget.rest == 0.0
    if case.startswith("cap below"):  # censored points are not verified (a screen may still lower some below the cap)
        assert res.at_cap.any() and not res.verify_flagged[res.at_cap].any()
        assert torch.isnan(res.verify_p[res.at_cap]).all()
    elif case.startswith("exact"):
        assert not verified and not res.verified_lower.any()
    else:
        assert res.verified_lower.all(), case  # the trapped points were all lowered
