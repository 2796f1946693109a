"""The bf16 last layer's product with fp32 output (``csrc/common/bf16_product.h``: oneDNN's brgemm ukernel on a
hand-packed VNNI B) against float64 of the same bf16 values, within what ``csrc/common/bounds.h`` assumes of
that product: |s_j - Σ_k Ŵ_jk ĥ_k| <= g_K Σ_k |Ŵ_jk ĥ_k| + 2^-100. Random and adversarial inputs, row counts
that are not multiples of the row tile, odd K, P not a multiple of the column block; the comparison and the
op's own self-check must catch a wrong layout; the ROBBENCH_BRGEMM=0 switch."""
from __future__ import annotations

import pytest
import torch

from robbench import kernels

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"


def product(hb: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The op; skipped only on a CPU without native bf16, where oneDNN's brgemm may be unavailable. Where the
    CPU has it, any refusal (the self-check failing included) fails the test."""
    try:
        return torch.ops.robbench.bf16_product(hb, wt)
    except RuntimeError as e:
        if "unusable here" in str(e) and not kernels.bf16_supported():
            pytest.skip(f"no brgemm on this CPU: {e}")
        raise


def excess(s: torch.Tensor, hb: torch.Tensor, wt: torch.Tensor) -> float:
    """max |s - ĥŴ^T| / (g_K Σ|Ŵ_jk ĥ_k| + 2^-100) with the exact product from float64 (its own error, at most
    K 2^-53 Σ|.|, added to the tolerance); <= 1 is within the bound."""
    K = hb.shape[1]
    v = 2.0 ** -24
    hd, wd = hb.double(), wt.double()
    ref, mag = hd @ wd, hd.abs() @ wd.abs()
    tol = (K * v / (1 - K * v) + 2 * K * 2.0 ** -53) * mag + 2.0 ** -100
    return ((s.double() - ref).abs() / tol).max().item()


def adversarial(rows: int, cols: int, seed: int, *, k_dim: int) -> torch.Tensor:
    """bf16 (rows, cols): mixed signs, magnitudes 2^-20..2^21, 1/17 zeros, and along the K dimension
    (``k_dim``) subnormal bf16 values at k % 29 == 3 for k < 256 (at most 9 in each factor of a dot product,
    each product below 2^-126 2^21 = 2^-105: flushing all 18 stays below 2^-100)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, cols), generator=g) * 2.0 - 1.0
    mant = 1 + torch.randint(0, 128, (rows, cols), generator=g) / 128.0
    x = sign * mant * torch.pow(2.0, torch.randint(-20, 21, (rows, cols), generator=g).double())
    x[torch.rand(rows, cols, generator=g) < 1 / 17] = 0.0
    k = torch.arange(x.shape[k_dim])
    sub = (k % 29 == 3) & (k < 256)
    tiny = sign * torch.randint(1, 128, (rows, cols), generator=g) * 2.0 ** -133  # below 2^-126: subnormal
    x = torch.where(sub[None, :] if k_dim == 1 else sub[:, None], tiny, x)
    out = x.float().bfloat16()
    assert torch.equal(out.double(), x), "values must be exact in bf16"
    return out


SHAPES = [(1, 256, 784), (15, 256, 784), (33, 256, 784), (257, 256, 784), (64, 10, 17), (33, 11, 17),
          (5, 1, 1), (70, 255, 100), (3, 700, 65)]


@pytest.mark.parametrize("n,K,P", SHAPES)
def test_random_product_within_the_bound_and_not_rounded_to_bf16(n, K, P):
    g = torch.Generator().manual_seed(n * 1000 + K)
    hb = torch.randn(n, K, generator=g).relu().bfloat16()
    wt = (torch.randn(K, P, generator=g) * 0.05).bfloat16()
    s = product(hb, wt)
    assert s.dtype == torch.float32 and s.shape == (n, P)
    assert excess(s, hb, wt) <= 1.0
    if K >= 10:  # really fp32: most outputs carry more than bf16's 8 significant bits
        assert (s != s.bfloat16().float()).float().mean().item() > 0.5


@pytest.mark.parametrize("n,K,P", SHAPES)
def test_adversarial_product_within_the_bound(n, K, P):
    hb = adversarial(n, K, 1, k_dim=1)
    wt = adversarial(K, P, 2, k_dim=0)
    s = product(hb, wt)
    assert torch.isfinite(s).all()
    assert excess(s, hb, wt) <= 1.0


def test_rows_do_not_depend_on_the_other_rows_or_the_strides():
    """The product of a row is the same alone, in a tile with others, and from a non-contiguous view."""
    g = torch.Generator().manual_seed(3)
    hb = torch.randn(130, 256, generator=g).bfloat16()
    wt = (torch.randn(256, 784, generator=g) * 0.05).bfloat16()
    s = product(hb, wt)
    for i in (0, 63, 64, 129):
        assert torch.equal(product(hb[i:i + 1], wt), s[i:i + 1])
    wide = torch.zeros(130, 300, dtype=torch.bfloat16)
    wide[:, 7:263] = hb
    assert torch.equal(product(wide[:, 7:263], wt), s)
    assert torch.equal(product(hb, wt.t().contiguous().t()), s)


def test_comparison_catches_a_transposed_or_shifted_weight():
    """The bound is tight enough to reject the product of a wrongly laid out Ŵ^T: transposed (square, so the
    shapes still fit) or shifted by one along K."""
    g = torch.Generator().manual_seed(4)
    hb = torch.randn(33, 64, generator=g).relu().bfloat16()
    wt = torch.randn(64, 64, generator=g).bfloat16()
    assert excess(product(hb, wt), hb, wt) <= 1.0
    assert excess(product(hb, wt.t().contiguous()), hb, wt) > 1e3
    assert excess(product(hb, wt.roll(1, 0)), hb, wt) > 1e3


@pytest.mark.parametrize("K,P", [(256, 784), (10, 17), (11, 17), (1, 1), (1000, 33)])
def test_self_check_passes_and_fails_on_a_wrong_layout_or_bf16_output(K, P):
    """The self-check make() runs (worst error / bound on an adversarial product) passes here, and fails when
    the packing swaps the k pairs or when s is rounded to bf16 (what at::mm with bf16 output returns)."""
    check = torch.ops.robbench.bf16_product_self_check
    product(torch.zeros(1, K, dtype=torch.bfloat16), torch.zeros(K, P, dtype=torch.bfloat16))  # usable here?
    assert check(K, P) <= 1.0
    assert check(K, P, 1) > 1.0
    assert check(K, P, 2) > 1.0


def test_switched_off_by_environment(monkeypatch):
    hb, wt = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16)
    monkeypatch.setenv("ROBBENCH_BRGEMM", "0")
    with pytest.raises(RuntimeError, match="ROBBENCH_BRGEMM=0"):
        torch.ops.robbench.bf16_product(hb, wt)
    monkeypatch.setenv("ROBBENCH_BRGEMM", "1")
    assert torch.equal(product(hb, wt), torch.full((2, 4), 3.0))


@pytest.mark.parametrize("hb,wt,message", [
    (torch.ones(2, 3), torch.ones(3, 4, dtype=torch.bfloat16), "hb must be"),
    (torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16), "wt_bf16 must be"),
    (torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 4), "wt_bf16 must be"),
])
def test_bad_arguments_are_named(hb, wt, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.robbench.bf16_product(hb, wt)


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    hb, wt = torch.randn(9, 20, generator=g).bfloat16(), torch.randn(20, 7, generator=g).bfloat16()
    product(hb, wt)
    torch.library.opcheck(torch.ops.robbench.bf16_product.default, (hb, wt),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_unusable_when_onednn_is_disabled():
    """brgemm refuses to run with torch.backends.mkldnn disabled (ATen checks it on every call): make() hands
    out no product then, and the op says why."""
    hb, wt = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        with pytest.raises(RuntimeError, match="unusable here: torch.backends.mkldnn is disabled"):
            torch.ops.robbench.bf16_product(hb, wt)


@pytest.mark.parametrize("K", [1, 11, 255])
def test_odd_k_reads_nothing_beyond_the_row(K):
    """brgemm gets K itself (not K rounded up to the VNNI pair): it must read no element past column K - 1,
    which is the next row's first element (here +inf: inf times the zero pad would give NaN) or beyond the
    last row (here NaN)."""
    g = torch.Generator().manual_seed(K)
    wt = torch.randn(K, 40, generator=g).bfloat16()
    wt[wt == 0] = 1.0
    buf = torch.full((70, K), float("nan")).bfloat16()
    buf[:69] = torch.randn(69, K, generator=g).bfloat16()
    buf[:69, 0] = float("inf")
    s = product(buf[:69], wt)  # a contiguous view: row 68 is followed by buf's NaN row
    assert not s.isnan().any() and s.isinf().all()


@pytest.mark.parametrize("K,P", [(256, 784), (37, 100)])
def test_every_row_count_of_a_tile_within_the_bound(K, P):
    """run() calls brgemm with m = n mod 64 rows for the last tile (a kernel of its own per m), while make()'s
    self-check runs only m = 64 and 5: every n = 1..65 here, the trained decoders' shape (P = 784: twelve
    64-column blocks and a 16-wide one) and an odd K with a 36-wide last block, adversarial inputs."""
    hb = adversarial(65, K, 7, k_dim=1)
    wt = adversarial(K, P, 8, k_dim=0)
    full = product(hb, wt)
    assert excess(full, hb, wt) <= 1.0
    for n in range(1, 66):
        s = product(hb[:n], wt)
        assert excess(s, hb[:n], wt) <= 1.0, n
        assert torch.equal(s, full[:n]), n  # a row's product does not depend on the tile it is computed in
