"""The fast epilogue sigmoid of the bf16 band's tile pass (csrc/common/sigmoid.h, bounds.h part 9): a cubic per
segment of z = 1 + min(|x|, 14.5) looked up by vpermps. The band absorbs its error through the constant
kSigFastErr; these tests check that constant against float64 σ on 10^7 dense floats, every segment boundary and
the clamp +- 64 ulps, the range beyond the clamp and special values (the exhaustive check over all 2^32 floats
is benchmarks/sigmoid_fast_exhaustive.py: max 5.90e-6). The band's use of it is checked in
tests/test_session7_rigor.py (E >= the float64 part-3 bound with the fast ŷ, counts equal the reference)."""
from __future__ import annotations

import pytest
import torch

from robbench import kernels

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")

V = 2.0 ** -24


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"
    try:
        torch.ops.robbench.sigmoid_fp32(torch.zeros(1), False, True)
    except RuntimeError as e:  # the portable band keeps the exact sigmoid
        assert "needs AVX-512" in str(e)
        pytest.skip("the fast sigmoid is AVX-512 only")


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32).item())


def _bound() -> tuple[float, float]:
    err, clamp = torch.ops.robbench.sigmoid_fast_constants()
    return err, clamp


def test_fast_sigmoid_error_within_its_bound_on_dense_floats_boundaries_and_beyond_the_clamp():
    """max |σ^(x) - σ(x)| (both signs) <= kSigFastErr over: every 110th float of [0, 16] (10^7 of them), every float
    within 64 ulps of each segment boundary (z = 2^e (1 + q / 4), x = z - 1) and of the clamp, every 4099th
    float beyond (to +inf). The worst error is within 20 % of the bound: a bound set below the true error (a
    too-small ε in the band) fails here (mutation: kSigFastErr = 5.5e-6 fails this test)."""
    bound, clamp = _bound()
    scan = torch.ops.robbench.sigmoid_error_scan
    worst = 0.0
    checks = [scan(0, _bits(16.0), 110, False, True), scan(_bits(clamp), _bits(float("inf")), 4099, False, True)]
    edges = [2.0 ** e * (1 + q / 4) - 1 for e in range(4) for q in range(4)] + [15.5 - 1, 16.0 - 1, clamp]
    for x in edges:
        b = _bits(x)
        checks.append(scan(max(b - 64, 0), b + 64, 1, False, True))
    for err_v, x in checks:
        assert err_v * V <= bound, (err_v * V, x, bound)
        worst = max(worst, err_v * V)
    assert worst > 0.8 * bound, (worst, bound)  # the bound is tight: the check is not vacuous


def test_fast_sigmoid_special_values():
    """NaN stays NaN (the band then decides nothing); +-0 give ~1/2, +-inf and huge |x| 1 and ~0 within the
    bound; σ^(-x) = 1 - σ^(x) (the exact subtraction of the x < 0 branch); odd tensor sizes (masked tail)."""
    bound, _ = _bound()
    x = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"), 3e38,
                      -3e38, 14.5, -14.5, 15.0, -100.0, 1.0, -1.0, 3.0])
    y = torch.ops.robbench.sigmoid_fp32(x, False, True)
    assert torch.isnan(y[:2]).all()
    err = (y[2:].double() - torch.sigmoid(x[2:].double())).abs()
    assert bool((err <= bound).all()), err
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1001, generator=g) * 6
    yr, yn = torch.ops.robbench.sigmoid_fp32(r, False, True), torch.ops.robbench.sigmoid_fp32(-r, False, True)
    close = (yr.double() + yn.double() - 1).abs()
    assert close.max().item() <= 2.0 ** -24  # 1 - σ^(|x|): exact for σ^(|x|) >= 1/2, half an ulp near 1/2
    with pytest.raises(RuntimeError, match="no portable version"):
        torch.ops.robbench.sigmoid_fp32(r, True, True)
