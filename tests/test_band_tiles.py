"""The bf16 band inside the product's tiles (``LastLayerBound::decide_tiles``, csrc/common/bounds.h part 7)
against the row path (the whole product, then ``decide_epilogue`` per row) and against torch's fp32 last
layer, through ``robbench::band_tiles_check``: column-block and row-block tails, the scalar units past the
last whole vector, one row, every activation; radii one ulp either side of each sample's fp32 squared
distance and at the band's edges. Correctness only: no timing is asserted."""
import pytest
import torch

from robbench import kernels

pytestmark = pytest.mark.skipif(not kernels.compiler_available(), reason="no C++ compiler/ninja: cpp backend skipped")

ACTS = {0: lambda a: a, 1: torch.relu, 2: torch.sigmoid}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.load(), f"extension failed to build: {kernels.build_error()}"


@pytest.fixture(autouse=True)
def brgemm():
    """The tile pass runs brgemm's tiles: skipped only on a CPU without native bf16; where the CPU has it, a
    refusal fails the test."""
    usable = torch.ops.robbench.bf16_product_self_check(16, 16) <= 1.0
    if not usable and not kernels.bf16_supported():
        pytest.skip("no brgemm on this CPU")
    assert usable


def _case(n, K, P, act, seed):
    """Hidden rows h (n, K) >= 0, W^T (K, P), b (P,), per-row centers near the outputs, and the reference's
    fp32 squared distances: torch's own last layer (addmm, activation, sum of squares)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, K, generator=g) * 0.5)
    wt = torch.randn(K, P, generator=g) * (3 / K ** 0.5)
    b = torch.randn(P, generator=g)
    y = ACTS[act](torch.addmm(b, h, wt))
    noise = 0.01 * 20 ** torch.rand(n, 1, generator=g)  # rows at different distances: the band's edge spreads
    cen = (y + torch.randn(n, P, generator=g) * noise).contiguous()
    d2 = ((y - cen) ** 2).sum(1)
    return h, wt, b, cen, d2


def _check(h, wt, b, cen, r2, act, tiles, monkeypatch, lean="1", fast="1"):
    monkeypatch.setenv("ROBBENCH_LEAN_TERMS", lean)
    monkeypatch.setenv("ROBBENCH_FAST_SIGMOID", fast)
    return torch.ops.robbench.band_tiles_check(h, wt, b, cen, r2.contiguous(), act, tiles)


def _assert_sound(dec, d2, r2):
    """A decided row agrees with the reference's fl(d^2) <= r2."""
    inside = d2 <= r2
    assert bool(inside[dec == 1].all()), "the band said inside where the reference is outside"
    assert not bool(inside[dec == 0].any()), "the band said outside where the reference is inside"


@pytest.mark.parametrize("n,K,P,act", [(1, 256, 784, 2), (65, 256, 784, 2), (130, 40, 70, 2), (64, 33, 100, 2),
                                       (63, 17, 16, 2), (5, 24, 129, 2), (66, 10, 7, 2), (130, 40, 70, 1),
                                       (5, 24, 129, 1), (64, 33, 100, 0), (66, 10, 7, 0)])
def test_tiles_give_the_row_paths_distances_and_bounds_and_decide_soundly(n, K, P, act, monkeypatch):
    """Row-block tails (1, 5, 63, 65, 66, 130 rows), column-block tails (P = 7, 16, 70, 100, 129, 784: a
    partial last block, units past the last whole 16-lane vector) and every activation (the lean terms:
    sigmoid; part 5's terms: ReLU, identity). The row path's ||ŷ - c|| is within its E of the reference's
    distance. With part 5's terms (ROBBENCH_LEAN_TERMS=0) the tile pass sums the same per-unit terms as the
    row path in another order: ||ŷ - c|| and E agree to fp32 summation noise, so a skipped or doubled unit,
    block or tail fails. The lean terms (part 7) only widen E, by < 5 %. The fast sigmoid (part 9, lean rows)
    moves ||ŷ - c|| by <= sqrt(P) (ε + 6 v) and only widens E (by < 5 % + 2 sqrt(P) ε). Radii at the reference's fp32 d^2
    itself, one ulp either side, 4x in and out, and at dist +- 1.5 E: every decision agrees with the
    reference; ties and one ulp either side stay undecided; radii >= 1.45 E away from ||ŷ - c|| are decided."""
    h, wt, b, cen, d2 = _case(n, K, P, act, seed=n * 1000 + P)
    dref = d2.double().sqrt()
    _, dist_r, E_r = _check(h, wt, b, cen, d2[:, None], act, False, monkeypatch)
    assert bool(((dist_r - dref).abs() <= E_r * 1.001 + 1e-6 * dref).all())
    _, dist_t, E_t = _check(h, wt, b, cen, d2[:, None], act, True, monkeypatch, lean="0")
    assert torch.allclose(dist_t, dist_r, rtol=1e-5, atol=1e-12)
    assert torch.allclose(E_t, E_r, rtol=1e-5, atol=0)
    _, dist_l, E_l = _check(h, wt, b, cen, d2[:, None], act, True, monkeypatch, lean="1", fast="0")
    assert torch.allclose(dist_l, dist_r, rtol=1e-5, atol=1e-12)
    assert bool((E_l >= E_r * (1 - 1e-5)).all()) and bool((E_l <= E_r * 1.05).all())
    _, dist_f, E_f = _check(h, wt, b, cen, d2[:, None], act, True, monkeypatch, lean="1")
    eps = torch.ops.robbench.sigmoid_fast_constants()[0] if act == 2 else 0.0
    assert bool(((dist_f - dist_l).abs() <= P ** 0.5 * (eps + 6 * 2.0 ** -24) + 1e-5 * dist_l).all())
    assert bool((E_f >= E_l * (1 - 1e-5)).all()) and bool((E_f <= (E_l + 2 * P ** 0.5 * eps) * 1.05).all())
    up, down = torch.full_like(d2, float("inf")), torch.zeros_like(d2)
    radii = [d2, torch.nextafter(d2, up), torch.nextafter(d2, down), d2 * 4, d2 / 4]
    radii += [((dist_r + s * 1.5 * E_r).clamp(min=0) ** 2).float() for s in (1, -1)]
    r2 = torch.stack(radii, 1)
    for lean in ("0", "1"):
        for tiles in (True, False):
            dec, _, _ = _check(h, wt, b, cen, r2, act, tiles, monkeypatch, lean=lean)
            _assert_sound(dec, d2[:, None], r2)
            assert bool((dec[:, :3] == -1).all())  # a tie and one ulp either side: only the fp32 recheck
            far = (r2.double().sqrt() - dist_r[:, None]).abs() >= 1.45 * E_f[:, None]
            far[:, :3] = False
            assert bool((dec[far & (r2 > 0)] >= 0).all())  # 1.45 E (and more) from ||ŷ - c||: decided
            assert int(far[:, 5:].sum()) >= n  # dist +- 1.5 E (unless r2 would be < 0)


@pytest.mark.parametrize("n,K,P,act", [(130, 256, 784, 2), (63, 17, 16, 2), (5, 24, 129, 1), (66, 10, 7, 0)])
def test_row_vec_decides_like_the_scalar_row_decisions(n, K, P, act, monkeypatch):
    """ROBBENCH_ROW_VEC (session 9): band_decision's float64 arithmetic 8 rows at a time and norm_w_dh's sum with
    AVX-512 give the row-by-row path's decisions and distances bit for bit, and its E to float64 summation noise
    (norm_w_dh sums its 16 terms in another order), with every row-block tail (8-lane tails of 1..7 rows),
    lean and part-5 terms, on radii swept through the band's edge and radii at ± E exactly."""
    h, wt, b, cen, d2 = _case(n, K, P, act, seed=n * 7 + P)
    _, dist_r, E_r = _check(h, wt, b, cen, d2[:, None], act, False, monkeypatch)
    eps = torch.tensor([s * 10 ** (e / 4) for e in range(-28, 0) for s in (1, -1)])
    r2 = torch.cat([(d2[:, None] * (1 + eps[None, :])).float(),
                    torch.stack([((dist_r + s * f * E_r).clamp(min=0) ** 2).float()
                                 for s in (1, -1) for f in (0.9, 1.0, 1.1)], 1)], 1)
    for lean in ("0", "1"):
        out = {}
        for vec in ("1", "0"):
            monkeypatch.setenv("ROBBENCH_ROW_VEC", vec)
            out[vec] = _check(h, wt, b, cen, r2, act, True, monkeypatch, lean=lean)
        (dv, distv, Ev), (ds, dists, Es) = out["1"], out["0"]
        assert torch.equal(dv, ds) and torch.equal(distv, dists)
        assert torch.allclose(Ev, Es, rtol=1e-13, atol=0)
        _assert_sound(dv, d2[:, None], r2)
        assert bool((dv == -1).any()) and bool((dv == 1).any()) and bool((dv == 0).any())


def test_tiles_decide_like_the_reference_across_a_dense_sweep_of_radii(monkeypatch):
    """The trained decoders' shape (K = 256, P = 784), 130 rows: r2 = d^2 (1 +- eps) for eps from 1e-7 to
    0.56; every decision of the tile pass (lean terms) agrees with the reference, and the sweep crosses the
    band's edge (some radius leaves part of the rows undecided)."""
    h, wt, b, cen, d2 = _case(130, 256, 784, 2, seed=5)
    eps = torch.tensor([s * 10 ** (e / 4) for e in range(-28, 0) for s in (1, -1)])
    r2 = (d2[:, None] * (1 + eps[None, :])).float()
    dec, _, _ = _check(h, wt, b, cen, r2, 2, True, monkeypatch)
    _assert_sound(dec, d2[:, None], r2)
    partial = ((dec == -1).any(0) & (dec >= 0).any(0)).sum()
    assert partial >= 2 and bool((dec[:, eps.abs() > 0.5] >= 0).all())


def test_band_tiles_check_opcheck():
    h, wt, b, cen, d2 = _case(3, 20, 37, 2, seed=1)
    torch.library.opcheck(torch.ops.robbench.band_tiles_check.default, (h, wt, b, cen, d2[:, None], 2, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_band_tiles_check_rejects_bad_input():
    h, wt, b, cen, d2 = _case(3, 20, 37, 2, seed=1)
    with pytest.raises(RuntimeError, match="act must be"):
        torch.ops.robbench.band_tiles_check(h, wt, b, cen, d2[:, None], 3, True)
    with pytest.raises(RuntimeError, match="cen must be"):
        torch.ops.robbench.band_tiles_check(h, wt, b, cen[:, :5].contiguous(), d2[:, None], 2, True)
    with pytest.raises(RuntimeError, match="r2 must be"):
        torch.ops.robbench.band_tiles_check(h, wt, b, cen, d2, 2, True)
