"""One-off exhaustive check of the fast epilogue sigmoid (csrc/common/sigmoid.h, bounds.h part 9): the largest
|σ^(x) - σ(x)| (σ in float64) over every float32 bit pattern x (both signs of every non-negative pattern up to
+inf; NaN inputs must give NaN), against the bound kSigFastErr the band uses. ~2 x 2^31 evaluations: a few
minutes at 1 thread. Usage: python benchmarks/sigmoid_fast_exhaustive.py [--threads N]"""
from __future__ import annotations

import argparse
import time

import torch

from robbench import kernels

V = 2.0 ** -24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert kernels.load(), kernels.build_error()
    bound, clamp = torch.ops.robbench.sigmoid_fast_constants()
    t0, worst, at = time.process_time(), 0.0, 0.0
    step = 1 << 26
    for first in range(0, 0x7F800001, step):  # every pattern from +0 to +inf, each with its negative
        e, x = torch.ops.robbench.sigmoid_error_scan(first, min(first + step - 1, 0x7F800000), 1, False, True)
        if e > worst:
            worst, at = e, x
    nan = torch.ops.robbench.sigmoid_fp32(torch.tensor([float("nan"), -float("nan")]), False, True)
    print(f"fast sigmoid: max |error| {worst:.3f} v = {worst * V:.4e} at x = {at!r} over every float "
          f"(bound kSigFastErr = {bound:.4e}, clamp {clamp}); NaN -> {nan.tolist()}; "
          f"CPU {time.process_time() - t0:.0f} s")
    assert worst * V <= bound and bool(nan.isnan().all())


if __name__ == "__main__":
    main()
