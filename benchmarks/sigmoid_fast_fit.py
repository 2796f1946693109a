"""How the fast epilogue sigmoid's table (csrc/common/sigmoid.h, kSigFastTab) was made: per segment of
z = 1 + min(|x|, 14.5) (four per octave of z, 16 in all), a cubic in z fitted to σ(z - 1) by reweighted least
squares towards minimax, its coefficients rounded to fp32, the error of an fp32 Horner evaluation estimated on a
dense grid, and the table printed in lane order (lane = ((127 + e) & 3) << 2 | q for z in 2^e [1 + q/4, 1 + (q+1)/4)).
The proven bound is the exhaustive check's (benchmarks/sigmoid_fast_exhaustive.py), not this estimate.
Usage: python benchmarks/sigmoid_fast_fit.py (numpy only)."""
import numpy as np
def sig(t): return 1/(1+np.exp(-t))
TC = 14.5
def seg_bounds(k):  # k = 0..15 segment index in order of z: octave e = k//4 (z in [2^e, 2^(e+1))), quarter q = k%4
    e, q = divmod(k, 4); return 2.0**e * (1 + q / 4), 2.0**e * (1 + (q + 1) / 4)
def fitseg(z0, z1, deg=3):
    n = 200
    z = (z0 + z1) / 2 + (z1 - z0) / 2 * np.cos(np.pi * (np.arange(n) + .5) / n)
    f = sig(np.minimum(z - 1, TC))
    # minimax-ish: Chebyshev interpolation then a few Remez-like reweighted LS passes
    zz = np.linspace(z0, z1, 4001); ff = sig(np.minimum(zz - 1, TC))
    w = np.ones_like(zz)
    for it in range(60):
        c = np.polynomial.polynomial.polyfit(zz - z0, ff, deg, w=np.sqrt(w))
        r = np.abs(np.polynomial.polynomial.polyval(zz - z0, c) - ff); w *= (1 + r / r.max()) 
    P = np.polynomial.Polynomial(c)(np.polynomial.Polynomial([-z0, 1])).coef  # in z
    c32 = P.astype(np.float32)
    zf = zz.astype(np.float32)
    p = c32[3]
    for k in (2, 1, 0): p = (np.float64(p) * zf + c32[k]).astype(np.float32)  # ~FMA
    err = np.abs(p.astype(np.float64) - ff).max()
    return c32, err
tabs = np.zeros((4, 16), np.float32); worst = 0
for k in range(16):
    z0, z1 = seg_bounds(k)
    if z1 > 16: z1 = 16
    c, err = fitseg(z0, min(z1, TC + 1 + 1e-9) if z0 < TC + 1 else z1)
    e, q = divmod(k, 4); lane = ((127 + e) & 3) << 2 | q
    tabs[:, lane] = c; worst = max(worst, err)
    print(k, z0, z1, "lane", lane, "err %.2e" % err, c)
print("worst %.3e" % worst)
for r in range(4): print("{" + ", ".join(float(x).hex() + "f" for x in tabs[r]) + "},")
