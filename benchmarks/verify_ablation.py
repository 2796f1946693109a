"""One change at a time: benchmarks/verify_coverage.py (verify on) with robbench.margin's verification constants
set to a variant (session 8; README, margin section, "Verification", "Why this design").

    python benchmarks/verify_ablation.py VARIANT tilted|trapped|exact [STREAMS]

Variants: s7 (session 7's re-bisection: first test at 0.98 R, capped at samples_locate = 2048 like the others,
an even alpha split over the 15 tests, flag level m - 0.03); top / max / split / share10 (one of session 8's
changes, or a larger VERIFY_SHARE, on top of s7); top+max, top+split, all (session 8's three changes at
s7's flag level); first25 / first75 (VERIFY_FIRST_SHARE); gap025 / gap02 / gap015 (flag levels; gap02 is the
default). 1 thread; about 5 CPU s per 1000 streams.
"""
from __future__ import annotations

import os
import runpy
import sys

import robbench.margin as M
from robbench import stats

EVEN = 1 / 15  # n_verify_tests(10, 0.001) = 15 at the defaults: session 7's even split, as a first-test share
BASE = {"top": 0.999, "first": 0.5, "capped": False, "share": 0.05, "gap": 0.03}  # session 8's tests, s7's flag
VARIANTS = {
    "s7": dict(top=0.98, first=EVEN, capped=True), "top": dict(first=EVEN, capped=True),
    "max": dict(top=0.98, first=EVEN), "split": dict(top=0.98, capped=True),
    "share10": dict(top=0.98, first=EVEN, capped=True, share=0.1), "top+max": dict(first=EVEN),
    "top+split": dict(capped=True), "all": {}, "first25": dict(first=0.25), "first75": dict(first=0.75),
    "gap025": dict(gap=0.025), "gap02": dict(gap=0.02), "gap015": dict(gap=0.015)}


def main() -> None:
    variant, kind = sys.argv[1], sys.argv[2]
    streams = sys.argv[3] if len(sys.argv) > 3 else "1000"
    cfg = {**BASE, **VARIANTS[variant]}
    M.VERIFY_TOP, M.VERIFY_FIRST_SHARE = cfg["top"], cfg["first"]
    M.VERIFY_SHARE, M.VERIFY_GAP = cfg["share"], cfg["gap"]
    if cfg["capped"]:  # the first test capped at samples_locate (2048) like the later ones (session 7)
        schedule = stats.sample_schedule

        def capped(n_initial: int, n_max: int, growth: int = 4) -> list[int]:
            return schedule(n_initial, min(n_max, 2048), growth)
        stats.sample_schedule = capped
    print(f"### variant {variant} {cfg}")
    sys.argv = ["verify_coverage.py", streams, "0.95", kind, "1"]
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "verify_coverage.py"), run_name="__main__")


if __name__ == "__main__":
    main()
