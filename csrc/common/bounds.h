// Certain decisions without the fp32 final layer: a Lipschitz screen and an element-wise bf16 band.
//
// Setting. The hidden layers are computed in fp32 with exactly the reference's ATen calls, so the
// input h (K,) of the last layer is bit-identical to the reference's (except where part 8 replaces the
// last hidden layer by h' with a bound on ||h - h'||). Only the last layer
// y = act(W h + b) (W: (D, K) rows W_j, act = sigmoid / ReLU / identity) is skipped or approximated.
// Notation: v = 2^-24 (fp32 unit roundoff), u = 2^-8 (bf16), g_n = n v / (1 - n v) (Higham, "Accuracy
// and Stability of Numerical Algorithms", Lemma 3.1: a sum of n products in any order and any
// association, FMA or not, is within g_n Σ|W_jk h_k| of the exact value).
//
// The reference.  a_j = W_j h + b_j exactly; its fp32 GEMM gives ã_j with
//     |ã_j - a_j| <= g_{K+1} (Σ_k |W_jk h_k| + |b_j|) <= g_{K+1} (||W_j|| ||h|| + |b_j|)       (Cauchy-Schwarz)
// y_j = act~(ã_j), where ATen's sigmoid is within a few ulps of σ: |act~(t) - act(t)| <= ev = 16 v
// (ReLU / identity: ev = 0). The reference's squared distance fl(Σ_j (y_j - c_j)^2) (D squares, D - 1
// additions of nonnegative terms, any order) lies in [(1 - q) S - A, (1 + q) S + A], S = ||y - c||^2,
// q = g_{D+2}, A = D 2^-149 (a square whose result underflows rounds with an absolute error <= 2^-150;
// additions of subnormals are exact; A matters only for distances below ~1e-20).
// So fl(d^2) <= r2 is certainly true when (1 + q) U^2 + A < r2 for an upper bound U >= ||y - c||, and
// certainly false when (1 - q) L^2 - A > r2 for a lower bound L <= ||y - c|| (classify()). Our own fp32
// sums of squares get the same absolute term (sq_norm_up, dist_up, dist_down).
//
// 1. Lipschitz screen (no final layer at all). For any reference hidden vector h_c (we use the
//    reference hidden vector of mu_b, the point's own latent mean):
//       ||y - c|| <= ||y - act(a)|| + ||act(a) - act(a_c)|| + ||act(a_c) - c||
//                 <= sqrt(D) max_j (λ g_{K+1}(||W_j|| ||h|| + |b_j|) + ev) + λ ||W||_2 ||h - h_c|| + off_b,
//    λ = Lipschitz constant of act (1/4 for sigmoid), ||W||_2 from an SVD in float64 (inflated by
//    1e-6 relative, far above LAPACK's error), and off_b >= ||act(W h_c + b) - c_b|| from the fp32 last
//    layer on h_c (session 5; it was a float64 GEMM): with ỹ_c = act~(fp32 GEMM of h_c), by the reference's
//    own analysis above, |ỹ_cj - act(a_cj)| <= ev + λ g_{K+1} (||W_j|| ||h_c|| + |b_j|), so
//       ||act(a_c) - c_b|| <= ||ỹ_c - c_b|| + sqrt(D) (λ g_{K+1} (max_j||W_j|| ||h_c|| + max|b|) + ev),
//    with ||ỹ_c - c_b|| and ||h_c|| summed in float64 from the fp32 numbers (relative error < 1e-13 for
//    D, K < 10^4); off_b is that bound inflated by 1e-9 relative, ||h_c|| too. Samples with
//    (1 + q) U^2 < r2 are "inside" with no final-layer work. Only an upper bound exists, so the screen
//    never decides "outside".
//
// 2. bf16 band. The final layer of the remaining rows is one bf16 GEMM s = fl_bf16(Σ_k Ŵ_jk ĥ_k) with
//    Ŵ = bf16(W), ĥ = bf16(h) (round to nearest) whose subnormal values are then set to 0 (session 6,
//    below), products exact in fp32, fp32 accumulation (oneDNN, AVX512-BF16; subnormals may be flushed:
//    <= 2^-100 absolute in total here), the result rounded to
//    bf16 (|rounding| <= u |s_j|); then a_j = fl(s_j + b_j) in fp32 (<= v |a_j|). With δW = W - Ŵ and
//    δh = h - ĥ (both known exactly), Ŵĥ - Wh = -Ŵ δh - δW h, hence by Cauchy-Schwarz per output j:
//       |a_j - ã_j| <= Δ_j = ||δW_j|| ||h|| + ||Ŵ_j|| (||δh|| + g_K ||ĥ||) + u |s_j| + v |a_j|
//                           + g_{K+1} (||W_j|| ||h|| + |b_j|) + 2^-100.
//    The row norms of W, Ŵ, δW are float64 computations inflated by 1e-6; the per-sample squared norms
//    (||h||^2, ||h - h_c||^2, ||ĥ||^2, ||δh||^2) are fp32 sums of K squares in any order, within a
//    factor 1 + g_{K+2} of the exact value once underflow is accounted for: a square or FMA whose result
//    is subnormal rounds with an absolute error <= 2^-150 instead (additions of subnormals are exact), so
//    sum_sq + K 2^-149 is inflated by 1 + 2 g_{K+2} (sq_norm_up(); matters only for ||h|| < ~1e-19).
//    Through the activation (mean value theorem, ξ between ã_j and a_j): |y_j - ŷ_j| <= e_j =
//    σ'(ξ) Δ_j + 2 ev, and since |d ln σ'/dt| = |1 - 2σ| <= 1, σ'(ξ) <= σ'(a_j) e^{Δ_j} with
//    σ'(a_j) = σ(1 - σ) <= ŷ_j (1 - ŷ_j) + 32 v (ŷ_j within ev of σ(a_j)) and e^Δ <= 1 + Δ + Δ^2 for
//    Δ <= 1; capped at 1/4. (ReLU / identity: e_j = Δ_j.)
//    Then | ||y - c|| - ||ŷ - c|| | <= ||e||, giving U = ||ŷ - c|| + ||e||, L = (||ŷ - c|| - ||e||)_+.
//    The per-element terms are evaluated in fp32 (<= 10 roundings each: inflated by 1e-5) and summed in
//    fp32 in any order (D nonnegative terms: relative error < g_D, inflated by 2 g_{D+2} + 1e-6), plus the
//    absolute term A (squares that underflow: without a sigmoid, ev = 0, a term ~u |s_j| of an output
//    |s_j| < 2^-67 squares below 2^-150 and rounds to 0; dist_up).
//    Subnormals (session 6). VDPBF16PS (AVX512-BF16, what oneDNN's bf16 kernels run here) reads subnormal
//    bf16 inputs as 0 (DAZ) and flushes subnormal results (FTZ), whatever MXCSR says. A subnormal Ŵ_jk
//    (|Ŵ_jk| < 2^-126, from a subnormal W_jk) drops the whole product Ŵ_jk ĥ_k, up to 2^-126 |ĥ_k| ~
//    2^-62 for ||h|| < 2^64 (above, ||h||^2 overflows and the band decides nothing): neither g_K Σ|Ŵĥ|
//    (tiny when the whole row W_j is subnormal) nor 2^-100 covers it (tests/test_kernels.py: the count was
//    256 where the reference's was 0). A subnormal ĥ_k (from a subnormal h_k) drops up to ||Ŵ_j|| 2^-126,
//    which g_K ||Ŵ_j|| ||ĥ|| covered only through sq_norm_up's K 2^-149 (||ĥ|| >= 2^-74.5 as computed),
//    so not when ĥ has normal entries whose products' rounding may use up g_K Σ|Ŵĥ| (no failing case was
//    found: it needs the worst-case rounding as well). So Ŵ and ĥ are made without subnormals: each bf16 value with
//    exponent field 0 is set to +0 (LastLayerBound::make, prepare_bf16_rows). Then δW_jk = W_jk and δh_k
//    = h_k exactly there, and the terms ||δW_j|| ||h||, ||δW||_2 ||h||, ||Ŵ_j|| ||δh||, N(δh) carry them
//    like any rounding error (δh_k^2 may underflow: sq_norm_up's K 2^-149; the products δh_k V_lk of p =
//    fl(δh V) may underflow, K 2^-150 in all, far below the 1e-6 inflation of norm_w_dh's slack g_K vmax
//    ||δh||: ||δh|| >= (K 2^-149)^(1/2) as computed, vmax ~ 1, so 1e-6 g_K vmax ||δh|| >= K^1.5 2^-119).
//    The instruction then sees only normal inputs: each product of two normal bf16 numbers is exact in
//    fp32 unless it is below 2^-126 (flushed: error < 2^-126), each addition exact-or-rounded as Higham's
//    model unless its result is below 2^-126 (flushed: error < 2^-126), so the flushes add at most
//    2 K 2^-126 <= 2^-100 for K <= 2^25 in total, the 2^-100 above (the code adds 1e-30 > 2^-100 + 2^-102,
//    which also covers the reference's own products that underflow, (K + 1) 2^-150, outside g_{K+1}'s
//    relative model). Checked on this CPU (AMD EPYC, AVX512-BF16): the instruction rounds each addition to
//    nearest even, in sequence, and reads a subnormal input as 0. Subnormal inputs with small products (the
//    product's self-check has some) stay inside the model; only large ones (W_jk tiny, h_k huge) broke it.
//
// 3. Tighter bf16 band (session 3). The per-row Cauchy-Schwarz terms ||δW_j|| ||h|| and ||Ŵ_j|| ||δh||
//    assume δh aligned with every row at once; measured, the band was ~25x the observed error. Write
//    t_j for the slope bound above (e_j = t_j Δ_j + 2 ev) and split Δ_j = |(δW h)_j| + |(Ŵ δh)_j| + ρ_j
//    (ρ_j: the remaining terms of Δ_j: g_K ||Ŵ_j|| ||ĥ||, u |s_j|, v |a_j|, the reference's own error,
//    2^-100). By the triangle inequality in R^D
//       ||e|| <= ||t∘(δW h)|| + ||t∘(Ŵ δh)|| + ||t∘ρ + 2 ev||,
//    and for any threshold τ, splitting the units into L = {t_j <= τ} and H = {t_j > τ},
//       ||t∘x|| <= sqrt(Σ_L t_j^2 x_j^2) + max_H t_j ||x||       (||x_H|| <= ||x||),
//    with |(δW h)_j| <= ||δW_j|| ||h||, ||δW h|| <= ||δW||_2 ||h|| (δW is rounding noise: ||δW||_2 is ~10x
//    below its Frobenius norm), |(Ŵ δh)_j| <= ||Ŵ_j|| ||δh|| and ||Ŵ δh|| <= N(δh) below. The band uses
//    τ = 0 (H = every unit): ||e|| <= max_j t_j (||δW||_2 ||h|| + N(δh)) + ||t∘ρ + 2 ev|| (part 2 is not
//    evaluated then: it never decided a sample more on the margin workload). Until session 5 the
//    thresholds ∞, 1/16 and 1/256 were accumulated as well and the smallest bound used: on the three
//    trained decoders' recorded margin calls they never decided a sample more (the same undecided rows,
//    counted), at a third of the pass's work. The refinement (part 4) splits the units by t instead.
//    N(δh): Ŵ (rows < D) has a few large singular values. With V (K x k, k <= 16, the leading right
//    singular vectors, stored in fp32 and used as exact numbers), M = Ŵ V and R = Ŵ - M V^T (both
//    float64), Ŵ δh = M (V^T δh) + R δh exactly, so ||Ŵ δh|| <= sqrt(Σ_l λ_l p_l^2) + ||R||_2 ||δh||, where
//    λ_l = G_ll + Σ_{m != l} |G_lm| (G = M^T M; p^T G p <= Σ λ_l p_l^2 since 2|p_l p_m| <= p_l^2 + p_m^2) and
//    |p_l| <= |fl(V_l . δh)| + g_K ||V_l|| ||δh|| (the fp32 dot product that computes it, in any order and
//    association, FMA or not: prepare_bf16_rows, bf16_rows.h). λ and
//    ||R||_2 are inflated by 1e-9 / 1e-6 relative plus 1e-11 ||Ŵ||_F^2 / 1e-12 ||Ŵ||_F (float64 rounding of M, G, R); also
//    N(δh) <= ||Ŵ||_2 ||δh||. Term sums are fp32 sums of nonnegative terms (inflated as above).
// 4. Refinement (session 4; sigmoid last layers). A sample the band leaves undecided is mostly undecided
//    because of its unsaturated output units (large t_j). For such a sample a set H of units is recomputed
//    in fp32 from the exact h: a'_j = fl(fl(Σ_k W_jk h_k) + b_j) (a dot product in any order, FMA or not,
//    then the bias), y'_j = act~(a'_j) (the own sigmoid of part 5, within ev). Both a'_j and the reference's ã_j are
//    sums of the K + 1 terms W_jk h_k, b_j, so each is within g_{K+1} (Σ_k |W_jk h_k| + |b_j|) of a_j:
//       |a'_j - ã_j| <= Δ'_j = 2 g_{K+1} (||W_j|| ||h|| + |b_j|)          (Cauchy-Schwarz, inflated norms),
//    and through the activation as in part 2 (mean value theorem, slope bound from y'_j):
//       |y'_j - y_j| <= e'_j = t'_j Δ'_j + 2 ev,  t'_j = min(1/4, (y'_j (1 - y'_j) + 32 v)(1 + Δ'_j + Δ'_j^2))
//    (1/4 if Δ'_j > 1), evaluated in fp32 (few roundings: factor 1 + 1e-5; Δ'_j ~ 2^-15 ||W_j|| ||h||).
//    The other units L keep ŷ_j with the bounds of parts 2/3 restricted to L: with the slope bounds t_j
//    of part 2 and any split L = L_hi ∪ L_lo,
//       ||e_L|| <= sqrt(Σ_{L_lo} e_j^2) + max_{L_hi} t_j (||δW||_2 ||h|| + N(δh)) + ||t∘ρ + 2 ev||_{L_hi}
//    (e_j = t_j Δ_j + 2 ev per element, part 2; the L_hi terms as in part 3, ||x_{L_hi}|| <= ||x||).
//    The sample's output is ŷ on L and y' on H; the supports are disjoint, so
//       ||y_ref - y_mix|| <= E = sqrt(Σ_H e'_j^2 + E_L^2),  E_L the bound above,
//    and U = ||y_mix - c|| + E, L = (||y_mix - c|| - E)_+ are classified as in the other parts (fp32 sums of
//    <= D nonnegative terms in any order: slack 2 g_{D+2} + 1e-6 as above).
//    Choice of H and of the split (speed only, any choice is rigorous): thresholds τ_b = 1/4, 3/16, 1/8,
//    3/32, 1/16, 1/32, 1/64, 1/512; per threshold, over the units with t_j <= τ_b, the fp32 sums Σ e_j^2
//    and Σ f_j^2 (f_j the L_hi element bound below; cumulative sums: each a sum of nonnegative terms,
//    slack as above). H = {t_j > τ_i}, L_hi = {τ_k < t_j <= τ_i}, L_lo = {t_j <= τ_k}: Σ_{L_lo} e^2 is
//    the sum at τ_k; Σ_{L_hi} f^2 = S_i - S_k for the exact sums S, and with F the fp32 sums
//    (|F - S| <= sl S) S_i - S_k <= F_i / (1 - sl) - F_k / (1 + sl); max_{L_hi} t <= τ_i. The smallest
//    H (smallest i) whose best k gives E_L <= T = κ | ||ŷ - c|| - r | (||ŷ - c|| from the band pass) is
//    taken. Samples of one point share the union of their H in groups of up to four (a superset of a
//    sample's H only adds exact units; its E_L still bounds the units left). No split, a tie, or |H| above
//    a cap sends the sample to the fp32 reference. Only near-ties are left for it.
//    Reference hidden vector (session 5). The L terms above bound |(δW h)_j| by ||δW_j|| ||h|| (per element)
//    and ||δW h|| by ||δW||_2 ||h||. For any fp32 vector h_c (we use the point's reference hidden vector of
//    part 1; the samples of one point lie close to it: ||h - h_c|| ~ 0.06 ||h|| at β = 0.1), exactly
//       δW h = δW h_c + δW (h - h_c),
//    so with c_j >= |(δW h_c)_j| (once per call: c_j = |fl(δW_j . h_c)| + g_K ||δW_j|| ||h_c||, an fp32 dot
//    product in any order (one fp32 GEMM for the call's points) of the exact fp32 numbers δW_jk = W_jk - Ŵ_jk (≤ 16 significant bits), inflated by
//    1 + 1e-5) and d >= ||h - h_c|| (fp32 sum of squares of fp32 differences: norm_up as in part 2):
//       |(δW h)_j| <= min(||δW_j|| ||h||, c_j + ||δW_j|| d)                                   (per element, L_lo)
//       ||t∘(δW h)||_{L_hi} <= ||t∘c||_{L_hi} + max_{L_hi} t ||δW||_2 d                       (L_hi)
//    Hence, with the same slope bounds t_j (computed from Δ_j >= Δ~_j below: t is increasing in Δ),
//       e_j <= e~_j = t_j Δ~_j + 2 ev,  Δ~_j = ρ_j + ||Ŵ_j|| ||δh|| + min(||δW_j|| ||h||, c_j + ||δW_j|| d),
//       ||e_L|| <= sqrt(Σ_{L_lo} e~_j^2) + max_{L_hi} t_j (||δW||_2 d + N(δh)) + ||f||_{L_hi},
//    f_j = t_j (c_j + ρ_j) + 2 ev (the L_hi vector's element bound, the triangle inequality as in part 3).
//    Each e~_j, (t∘(ρ + c) + 2 ev)_j is evaluated in fp32 from the inflated ρ_j (<= 10 roundings: factor
//    1 + 1e-5). Without h_c (or when d >= ||h||) the terms above are used (c = 0, d = ||h||).
// 5. Fused epilogue (session 5, CPU; decide_epilogue). a_j = fl(s_j + b_j) is formed as before, and
//    ŷ_j = σ~(a_j) by an own fp32 sigmoid (common/sigmoid.h) in the band pass's registers; the refinement's
//    y'_j (part 4) uses it too. Parts 2-4 need only |σ~(x) - σ(x)| <= ev for every fp32 x (absolute):
//    ev = 16 v covers ATen's sigmoid (the reference's own) and this one, which is within 5.4 v:
//    for x >= 0, with E = e^-x, t = min(x, 32) (x = +inf included):
//    (a) clamp: |e^-t - e^-x| <= e^-32 < 1e-6 v.
//    (b) z = fl(t L), L = fl(log2 e) = log2 e (1 + ε), |ε| <= v, so z = t log2 e (1 + θ), |θ| <= 2v + v^2
//        (a subnormal z: absolute error <= 2^-150, negligible), 2^-z = e^{-t (1 + θ)} and
//        |2^-z - e^-t| <= e^-t t |θ| e^{t |θ|} <= (2v + v^2) e^-1 (1 + 1e-5) <= 0.74 v   (t e^-t <= 1/e).
//    (c) n = nearest(z) (ties to even), f = z - n exactly (n = 0 for z <= 1/2, else z/2 <= n <= 2z:
//        Sterbenz), |f| <= 1/2, n >= 0, 2^-z = 2^-n 2^-f.
//    (d) p = Horner(c_7, ..., c_0; f) by FMA, c_k = fl((-ln 2)^k / k!): |p - 2^-f| <= 2.05 v, the sum of
//        the Lagrange remainder of the degree-7 Taylor polynomial (ln 2 / 2)^8 / 8! 2^(1/2) <= 0.123 v, the
//        coefficients' rounding Σ_k |c_k - (-ln 2)^k / k!| 2^-k <= 0.020 v, and Horner's: each FMA rounds
//        once (|δ| <= v), so the error of step k obeys err_k <= |f| err_{k+1} (1 + v) + v M_k, err_7 = 0,
//        M_k = Σ_{i>=k} |c_i| 2^{k-i} >= |Σ_{i>=k} c_i f^{i-k}| (M_0..M_3 = 1.414, 0.828, 0.271, 0.061):
//        err_0 <= 1.905 v (evaluated in float64, far from its precision).
//    (e) E' = 2^-n p exactly (n subtracted from p's exponent field; p in [0.7, 1.5), n <= 47: normal),
//        so |E' - E| <= 2.05 v + 0.74 v + 1e-6 v <= 2.8 v. E' <= 1 + 2v: for n >= 1, E' <= 2^-1 (2^(1/2) +
//        2.05 v); for n = 0, f = z >= 0, so p <= 1 + 2.05 v and p, an fp32 number, is <= 1 + 2v.
//    (f) d = fl(1 + E') in [1, 2] (1 + E' <= 2 + 2v rounds to 2: a tie, to even), |d - (1 + E')| <= 2v.
//    (g) r ~ 1/d in [1/2, 1] with |r - 1/d| <= 0.57 v: portable code r = fl(1 / d) (<= v/2); AVX-512
//        r0 = rcp14(d) (|d r0 - 1| = |ε| <= 2^-14), r1 = fl(r0 + r0 ê), ê = fl(1 - d r0) = ε (1 + δ) (FMAs),
//        r0 (1 + ε) = (1 - ε^2) / d, so |r0 (1 + ê) - 1/d| <= 2^-28 + 2^-14 (1 + 2^-14) v <= 0.07 v, plus
//        the final rounding <= v/2 (1/d <= 1); r = max(r1, 1/2) (1/d >= 1/2: no farther from 1/d).
//        |1/d - 1/(1 + E')| <= |d - (1 + E')| (both denominators >= 1); |1/(1 + E') - σ(x)| =
//        |1/(1 + E') - 1/(1 + E)| <= |E' - E|. So |r - σ(x)| <= 2.8 v + 2 v + 0.57 v <= 5.4 v.
//    (h) x < 0: σ(x) = 1 - σ(|x|) and σ~(x) = fl(1 - r) = 1 - r exactly (r in [1/2, 1]: Sterbenz): same
//        bound. NaN gives NaN (the band then decides nothing: every comparison is false).
//    Checked against float64 σ (tests/test_kernels.py): every float with 2^-26 <= |x| <= 64 and every 61st
//    float elsewhere (AVX-512 code; portable code strided); every non-NaN float once (session 5): max
//    1.59 v (AVX-512), 1.58 v (portable).
//    AVX-512 band terms (unit_terms_avx512; the portable loops keep the expressions of parts 2 and 3): the
//    same bounds in fewer operations. v |a_j| <= v (1 + v) (|s_j| + |b_j|) (a_j = fl(s_j + b_j)); the
//    per-unit constant c0_j = (g_{K+1} (1 + 1e-6) + v (1 + v)) |b_j| k2 + 1e-30 (the reference's bias
//    term, the bias add's |b_j| part, 2^-100) is computed in float64 and stored in fp32, and the
//    per-sample scalars (the k_* of part 2, 2 ev, s_round + v (1 + v): part 6) are multiplied by
//    k2 = 1 + 2e-5 before their fp32 rounding. Then Δ_j and ρ_j are sums of nonnegative products by <= 4 FMAs,
//    e_j = fl(t_j Δ_j + 2 ev k2) and f_j likewise (one FMA), t_j as in part 2 (its own 1 + 1e-5): each
//    chain rounds <= 7 times with the scalars' own rounding, (1 - v)^7 k2 > 1 + 1e-5, so each computed
//    term is >= its exact expression. The sums accumulate products by FMA in any order: the sums' slack
//    of parts 2 and 3.
// 6. The product with fp32 output (session 6, CPU). Where oneDNN's brgemm ukernel runs the bf16 product
//    (Bf16Product, common/bf16_product.h), s_j is its fp32 accumulation itself: exact bf16 products, fp32
//    accumulation in any order and association, subnormals possibly flushed — the model of part 2 — but
//    not rounded to bf16 afterwards. Part 2's Δ_j then holds without the term u |s_j| (its only source
//    was that final rounding); everything else is unchanged: a_j = fl(s_j + b_j) keeps v |a_j|
//    <= v (1 + v) (|s_j| + |b_j|). The code carries the output rounding as s_round (u for at::mm's bf16
//    output, widened exactly to fp32; 0 for brgemm's fp32 output) into the coefficient of |s_j| (x_s =
//    (s_round + v (1 + v)) k2 in part 5's terms, s_round |s_j| in the portable ones). On the three trained
//    decoders' recorded margin calls this leaves 15-30 % fewer samples for the refinement (part 4) and
//    22-48 % fewer for the fp32 recheck.
// 7. The band inside the product's tiles (session 7, CPU, brgemm only: s_round = 0; decide_tiles). Per block
//    of Bf16Product::kRows rows and per column block of kCols units, brgemm writes the tile, and a_j, ŷ_j and
//    the band terms of the block's units are formed at once (two rows interleaved) and added to per-row fp32
//    lane accumulators that carry over the column blocks; after the last block, the lane sums, the scalar
//    units past the last whole 16-lane vector (part 5's scalar terms), and the decision of parts 2 and 3.
//    Σ (ŷ_j - c_j)^2 and Σ f_j^2 are then fp32 sums of the same nonnegative terms in another order and
//    association (per lane across blocks, then across lanes, then the tail): the slack 2 g_{D+2} + 1e-6
//    covers any order, so nothing changes for the sums; max_j t_j is exact. ŷ and a are not kept
//    (ROBBENCH_TILE_STORE_Y=1 keeps ŷ): a row left undecided gets them again from s by the same code
//    (epilogue_row: the same vector and scalar units, so the same numbers) before the refinement (part 4).
//    Lean terms (sigmoid rows decided by part 3, norm_wdh >= 0; ROBBENCH_LEAN_TERMS=0 uses part 5's terms):
//    (a) |s_j| is not read. s_j is within g_K Σ_k |Ŵ_jk ĥ_k| + 2^-100 of the exact Σ_k Ŵ_jk ĥ_k (part 6),
//        both sums <= ||Ŵ_j|| ||ĥ|| (Cauchy-Schwarz), so |s_j| <= (1 + g_K) rW_j norm_hb + 2^-100 (rW_j >=
//        ||Ŵ_j||, norm_hb >= ||ĥ||). Part 5's term x_s |s_j| becomes xs rW_j with xs = x_s (1 + g_K) norm_hb
//        (float64, x (1 + 1e-9)), plus x_s 2^-100 < 2^-123, inside c0_j's 1e-30 (1e-30 - 2^-100 - 2^-102 >
//        1e-32). xs is ~1/K of the other coefficient of rW_j in ρ_j (g_K ||ĥ||): ρ_j grows by <= 0.4 %.
//    (b) One slope factor per row: Δ_j <= Δ* = (max rdW) x_dw + (max rW)(x_w + xs) + (max rWf) x_wf +
//        max c0 (maxima over the D units, float64, x (1 + 1e-9)). e^{Δ_j} <= e^{Δ*} <= 1 + Δ* + Δ*^2 for
//        Δ* <= 1, so part 2's slope bound holds with Q = 1 + Δ* + Δ*^2 for every unit of the row (Δ* > 1:
//        t_j = 1/4). Stored xq = fl32((1 + Δ*+ Δ*^2) k2) >= Q k2 (1 - v) (+inf when Δ* > 1).
//    (c) ρ_j <= X (rW_j + rWf_j) + c0_j with X = max(x_w3 + xs, x_wf) (1 + 1e-6) (>= both coefficients) and
//        rsum_j = fl32((rW_j + rWf_j) (1 + 1e-6)) >= rW_j + rWf_j (float64 sum of two fp32 values).
//    (d) Evaluation (per lane): m_j = fl(ŷ_j fl(1 - ŷ_j) + 32 v) >= (ŷ_j (1 - ŷ_j) + 32 v)(1 - v)^2 (one FMA,
//        32 v exact); t_j = min(1/4, fl(m_j xq)) >= min(1/4, (ŷ_j (1 - ŷ_j) + 32 v) Q k2 (1 - v)^4), which is
//        >= part 2's slope bound since k2 (1 - v)^4 > 1 (NaN or +inf: 1/4; a NaN ŷ leaves the row undecided
//        through its distance); ρ'_j = fl(rsum_j fl32(X) + c0_j) >= ρ_j k2 (1 - v)^3 (X and c0_j carry k2
//        through part 5's scalars x_* and constant, each rounded once to fp32); f_j = fl(t_j ρ'_j + fl32(2 ev
//        k2)) >= (t_j ρ_j + 2 ev) k2 (1 - v)^5 >= t_j ρ_j + 2 ev. So every f_j and max_j t_j bound what
//        part 3 needs, and the decision is part 3's with these (slightly larger) terms. On the three trained
//        decoders' recorded margin calls the lean terms leave +7 / +2 / +6 more of the 116,792 / 123,136 /
//        534,528 band rows to the refinement and the same rows to the fp32 recheck.
// 8. The last hidden layer by own loops (session 8, CPU; common/fused_hidden.h, ROBBENCH_FUSED_HIDDEN=0 turns it
//    off). Where the last hidden layer h = act1(x W1^T + b1) (x: (k,) its fp32 input, bit-identical to the
//    reference's; W1: (K, k); act1 = ReLU or identity) feeds the bf16 pass, the rows' h' = act1(fl'(x W1^T + b1))
//    comes from hidden_rows (each unit an fp32 sum of the k + 1 terms x_i W1_ji, b1_j in some order, FMA or
//    not), not from ATen's addmm + bias copy + ReLU. The reference's h_j = act1(ã_j) with ã_j another fp32 sum
//    of the same k + 1 terms, so both are within g_{k+1} (Σ_i |x_i W1_ji| + |b1_j|) of the exact a_j (Higham, as
//    above), and ReLU is 1-Lipschitz (identity too):
//       |h_j - h'_j| <= |ã_j - a'_j| <= 2 g_{k+1} (Σ_i |x_i W1_ji| + |b1_j|) <= 2 g_{k+1} (||x|| ||W1_j|| + |b1_j|),
//    so by Minkowski in R^K, with ||W1||_F^2 = Σ_j ||W1_j||^2,
//       ||h - h'|| <= eps = 2 g_{k+1} (||x|| ||W1||_F + ||b1||) + sqrt(K) 1e-30
//    (1e-30 per unit: products or sums that underflow, 2 (k + 1) 2^-150 with gradual underflow and
//    2 (k + 1) 2^-126 if either side flushes subnormals, < 1e-30 for k < 2^23). ||x|| is sq_norm_up of the
//    fp32 sum of squares, ||W1||_F and ||b1|| float64 sums inflated by 1e-6, eps evaluated in float64 and
//    inflated by 1e-9 (HiddenLayer::eps). A NaN or infinite x makes eps NaN or +inf, and then every bound that
//    uses it decides nothing. Overflow (review RA): Higham's bound holds only while no fp32 operation overflows,
//    and one order may overflow where the other does not (b = -2^127 and products 2^127, 2^127, -2^127: ours,
//    from the bias on, gives 0, MKL's products-first order +inf, and the reference's sigmoid(+inf) = 1). Every
//    intermediate of either order is at most (1 + g_{k+1}) S with S = Σ_i |x_i W1_ji| + |b1_j| <= ||x|| ||W1||_F +
//    ||b1||, so neither overflows while ||x|| ||W1||_F + ||b1|| < 2^127 (norms inflated 1e-6); from 2^127 on eps
//    is +inf (tests/test_fused_hidden.py, the overflowing layer: the band counted such samples inside before). (Measured on the three trained decoders, k = 10: eps ~ 6e-6 ||h'||, against
//    ||h - ĥ|| ~ 1e-3 ||h||.)
//    Every other part holds with h' in the place of h once eps is added where h enters, by the triangle
//    inequality, since ĥ = bf16(h') (the product's input) is what they take as exact:
//    - ||h|| <= ||h'|| + eps (norm_h of parts 1-4 and 7: the caller passes norm_up(||h'||^2) + eps);
//    - part 1: ||h - h_c|| <= ||h' - h_c|| + eps;
//    - parts 2, 3, 7: δh = h - ĥ = (h' - ĥ) + (h - h'), so ||δh|| <= ||h' - ĥ|| + eps and
//      ||Ŵ δh|| <= ||Ŵ (h' - ĥ)|| + ||Ŵ||_2 eps, the first term the norm_w_dh of part 3 with p = fl((h' - ĥ) V)
//      and ||h' - ĥ|| (what prepare_bf16_rows computes from h'), ||Ŵ||_2 = spec_Wb (the coefficient inflated
//      by 1e-12 relative, float64);
//    - part 4: the refined units' logits a'_j = fl(W_j . h' + b_j) are within g_{K+1} (||W_j|| ||h'|| + |b_j|)
//      of W_j h' + b_j, which is within ||W_j|| eps of W_j h + b_j, itself within g_{K+1} (||W_j|| ||h|| +
//      |b_j|) of the reference's ã_j; so |a'_j - ã_j| <= 2 g_{K+1} (||W_j|| n + |b_j|) + ||W_j|| eps with
//      n >= max(||h||, ||h'||), i.e. part 4's Δ'_j with norm_h = n + eps / (2 g_{K+1}) (rd2_j >= 2 g_{K+1}
//      ||W_j||); and the distance to the point's reference hidden vector d >= ||h - h_c|| is ||h' - h_c|| + eps.
//    The fp32 recheck needs the reference's own h: the rows it takes keep their x, and at the flush ATen's
//    addmm_out and activation (the reference's kernels) run on the gathered x rows zero-padded to >= 64 rows
//    (exact_hidden_rows). This relies on the assumption the recheck of the last layer already makes
//    (fp32_rows_count, common/blocks.h): with >= 64 rows MKL's result for a row does not depend on the other
//    rows, their number or the block the row came from (tests/test_fused_hidden.py checks it bit for bit on the
//    hidden layers' shapes, k = 1..40, K not a multiple of 16, at 1 and 2 threads).
// 9. Fast epilogue sigmoid (session 9, CPU AVX-512, the tile pass's lean rows; common/sigmoid.h,
//    ROBBENCH_FAST_SIGMOID=0 turns it off). There ŷ_j = σ^(a_j) with |σ^(x) - σ(x)| <= ε = kSigFastErr = 6.5e-6
//    for every float x (a cubic per segment of z = fl(1 + min(|x|, 14.5)), 1 - σ^(|x|) for x < 0, NaN kept;
//    the largest error over all 2^32 floats is 5.90e-6: benchmarks/sigmoid_fast_exhaustive.py). Parts 2, 3 and
//    7 used |ŷ_j - σ(a_j)| <= ev in two places, and only there:
//    (a) the element bound |y_j - ŷ_j| <= |act~(ã_j) - σ(ã_j)| + |σ(ã_j) - σ(a_j)| + |σ(a_j) - ŷ_j|
//        <= ev + σ'(ξ) Δ_j + ε: the constant 2 ev of e_j and f_j becomes ev + ε (ev for the reference's own
//        sigmoid), stored as fl32((ev + ε) k2), like 2 ev k2 in part 7 (d);
//    (b) the slope bound σ'(a_j) = g(σ(a_j)), g(y) = y (1 - y): |g(y) - g(ŷ)| = |y - ŷ| |1 - y - ŷ|
//        <= ε (1 + ε) for y in [0, 1] and ŷ in [-ε, 1 + ε] (σ^ is within ε of σ, so it lies there), so
//        σ'(a_j) <= ŷ_j (1 - ŷ_j) + ε (1 + ε): the term 32 v of m_j becomes 2 ε >= ε (1 + ε) (rounded up to
//        fp32; m_j's own roundings as in part 7 (d)). Unlike the exact sigmoid's, ŷ may leave [0, 1] by <= ε,
//        and then ŷ (1 - ŷ) < 0 and part 7 (d)'s relative rounding model of m_j needs one more term: for ŷ > 1,
//        fl(1 - ŷ) is exact (Sterbenz); for ŷ < 0, fl(1 - ŷ) = (1 - ŷ)(1 + δ) adds |ŷ (1 - ŷ)| v <= ε (1 + ε) v,
//        far inside the slack 2 ε - ε (1 + ε) = ε (1 - ε) the constant leaves.
//    Nothing else reads the fast ŷ: the decision is part 3's with these terms; dist (the refinement's target)
//    is a heuristic; a row left undecided gets a and ŷ again from s by epilogue_row with the exact sigmoid,
//    and the refinement (part 4) bounds that ŷ with ev as before (so with ROBBENCH_TILE_STORE_Y=1, where the
//    refinement would read the tile pass's ŷ, the exact sigmoid is kept). The scalar tail (D % 16 units)
//    keeps the exact sigmoid and its terms; each element's term bounds its own element, so the sums mix them
//    freely. On the three trained decoders' recorded margin calls ε moves +36 / +17 / +42 of the 116,794 /
//    123,136 / 534,528 band rows to the refinement and none to the fp32 recheck.
// 10. Per-row decisions 8 rows at a time (session 9; ROBBENCH_ROW_VEC=0 for the row-by-row code). No bound
//    changes. The tile pass's decision (band_decision: E, dist_up / dist_down, classify) runs in float64
//    AVX-512 lanes, one row per lane, with the same operations in the same order as the scalar code (the
//    extension is built with -ffp-contract=off, and vsqrtpd / vmulpd / vaddpd round each lane like their
//    scalar forms), so E, dist and the decision are bit for bit the scalar path's; max(x, 0) keeps
//    std::max(0.0, x)'s NaN -> 0. norm_w_dh's Σ_l λ_l (|p_l| + slack)^2 (k <= 16 nonnegative float64 terms)
//    is summed in 8 lanes and then across them: another order, relative error <= k 2^-53 < 2e-15 in any
//    order, which the factor 1 + 1e-12 on its square root already covered for the sequential sum.
// Samples that no bound decides get the reference's own fp32 final layer (recheck).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace robbench {

// Upper bound on sqrt(Σ x_k^2) from its fp32 sum of K squares in any order, FMA or not (part 2):
// underflowed squares add at most 2^-150 each, then the relative factor 1 + 2 g_{K+2}.
inline double sq_norm_up(float sum_sq, int64_t K) {
  const double v = 1.0 / 16777216.0, n = static_cast<double>(K + 2);
  return std::sqrt((static_cast<double>(sum_sq) + static_cast<double>(K) * 0x1p-149) * (1 + 2 * (n * v / (1.0 - n * v))));
}

class Bf16Product;

// ROBBENCH_ROW_VEC (default on; read per call, A/B): the tile pass's per-row decisions 8 rows at a time and
// norm_w_dh's sum with AVX-512 (the same bounds; benchmarks/README.md, session 9 a2).
bool row_vec();

// One row's inputs of the tile-wise band (LastLayerBound::decide_tiles): the sample's center cen (D,), r^2,
// and the per-sample norms of decide (||h||, ||ĥ||, ||δh||, norm_wdh >= ||Ŵ δh|| or negative).
struct BandRow {
  const float* cen;
  double norm_h, norm_hb, norm_dh, r2, norm_wdh;
};

struct LastLayerBound {
  static constexpr double u = 1.0 / 256.0;
  static constexpr double v = 1.0 / 16777216.0;
  at::Tensor wt_bf16;             // (K, P) bf16(W^T), for the bf16 GEMM
  std::vector<float> rW, rdW, rWf, babs, bias;  // (D,): ||Ŵ_j||, ||δW_j||, ||W_j||, |b_j|, b_j
  double spectral = 0;            // >= ||W[:D]||_2
  double maxW = 0, maxb = 0;      // max_j ||W_j||, max_j |b_j|
  double gK = 0, gK1 = 0, q = 0;  // g_K, g_{K+1}, g_{D+2}
  double lip = 1, ev = 0;         // Lipschitz constant and evaluation error of act
  int64_t act = 0, K = 0, D = 0, P = 0;
  // part 3: ||δW||_2, ||Ŵ||_2 (rows < D), V (K, k) fp32, λ (k,), ||R||_2 (inflated), max_l ||V_l||
  double spec_dW = 0, spec_Wb = 0, rho_R = 0, vmax = 0;
  at::Tensor vk;
  std::vector<double> lam;

  // part 4: W[:D] as (D, K) fp32 rows (the exact weights, for the refined units' dot products)
  at::Tensor w_rows, dw_rows;    // dw_rows: δW[:D] = W - Ŵ as (D, K) fp32 rows (exact)
  std::vector<float> rd2, bd2;  // (D,): 2 g_{K+1} ||W_j||, 2 g_{K+1} |b_j| (inflated)

  // part 5: the AVX-512 band's per-unit constant (D,) c0_j = (g_{K+1} (1 + 1e-6) + v (1 + v)) |b_j| k2 + 1e-30
  // (|b| the inflated values above); k2 also scales its per-sample scalars
  static constexpr double k2 = 1 + 2e-5;
  std::vector<float> c0;
  // part 7: max_j of rdW, rW, rWf, c0 (4,) and rsum (D,) >= rW_j + rWf_j, for the tile pass's lean terms
  std::vector<float> unit_max, rsum;

  // Upper bound on ||Ŵ δh|| from p = fl(δh V) (k,) and ||δh|| (part 3).
  // vec: the float64 sum over l with AVX-512 (another order, the same bound; ROBBENCH_ROW_VEC, row_vec()).
  double norm_w_dh(const float* p, double norm_dh, bool vec = false) const;

  static double gamma(double n) { return n * v / (1.0 - n * v); }
  // Upper bound on a norm from an fp32 sum of K squares (any order), see above.
  double norm_up(float sum_sq) const { return sq_norm_up(sum_sq, K); }
  static LastLayerBound make(const at::Tensor& wt, const at::Tensor& b, int64_t act, int64_t D);

  // Screen bound U for one sample: ||h||, ||h - h_c|| (float64), off_b.
  double screen_upper(double norm_h, double dist_h, double off) const;

  // bf16 band for one sample: s = the bf16 product's row (P,) as fp32 numbers, s_round its output rounding
  // (u when the product was rounded to bf16, 0 when s is its fp32 accumulation: part 6), a = fl(s + b)
  // (P,), y = act~(a) (P,), cen (D,), per-sample norms ||h||, ||ĥ||, ||δh||. Returns 1 (inside), 0
  // (outside) or -1 (undecided). norm_wdh >= ||Ŵ δh|| (norm_w_dh) enables the part-3 band; pass a negative
  // value for part 2 only. dist_out (optional) receives ||ŷ - c|| as computed (fp32 sum), for the
  // refinement's target.
  int8_t decide(const float* s, double s_round, const float* a, const float* y, const float* cen, double norm_h,
                double norm_hb, double norm_dh, double r2, double norm_wdh = -1.0,
                double* dist_out = nullptr) const;
  // The same decision fused with the epilogue (part 5): from the product's row s (>= D,), writes
  // a = fl(s + b) (D,) and y = act~(a) (D,) (own sigmoid, within ev of σ) while the band sums accumulate,
  // one pass over the D units. a and y are what refine_select / refine_decide read.
  // bound_out (optional, tests): receives the band's E >= ||y_ref - ŷ||.
  int8_t decide_epilogue(const float* s, double s_round, float* a, float* y, const float* cen, double norm_h,
                         double norm_hb, double norm_dh, double r2, double norm_wdh = -1.0,
                         double* dist_out = nullptr, double* bound_out = nullptr) const;

  // Part 7: the bf16 product s = ĥ Ŵ^T of n rows (hb (n, K) bf16 bits, row stride K) through prod, tile by
  // tile, each tile's epilogue (a = fl(s + b), ŷ = act~(a), band terms and partial sums) run while the tile
  // is in L1; then decide_epilogue's decision per row into dec (n,) and ||ŷ - c|| into dist (n,). s (n, P)
  // receives the product's columns < D; y (n, P) receives ŷ when store_y (else only the units past the
  // last whole 16-lane vector, with a: epilogue_row writes the rest for the rows the refinement needs).
  // Without AVX-512 (or ROBBENCH_NO_AVX512=1): prod.run, then decide_epilogue per row (a, y written).
  // bound (optional, tests): each row's band E.
  void decide_tiles(const Bf16Product& prod, const uint16_t* hb, int64_t n, float* s, float* a, float* y,
                    bool store_y, const BandRow* rows, int8_t* dec, double* dist, double* bound = nullptr) const;
  // a = fl(s + b) (D,) and y = act~(a) (D,) of one row from its product s, as decide_tiles and
  // decide_epilogue compute them (the same vector and scalar units, so the same values).
  void epilogue_row(const float* s, float* a, float* y) const;

  // Part 4, the points' reference hidden vectors hc (B, K) contiguous fp32: c (B, D) with c_bj >= |(δW h_c,b)_j|.
  at::Tensor refine_centers(const at::Tensor& hc) const;
  // Part 4, step 1 (sigmoid only): slope bounds t (D,) of one sample's bf16 outputs, the units H to
  // recompute in fp32 so that the bound on the rest, written to *e_rest, is <= target, as a bitset (unit j:
  // bit j % 64 of bits[j / 64], ceil(D / 64) words); returns |H|, or -1 when no split meets the target or
  // |H| > max_cols.
  // c (refine_centers' row of the sample's point, or nullptr) and dist_c >= ||h - h_c|| tighten the bound on the
  // rest; *level (optional) receives the slope-bound bucket of H (H = {t_j > level's threshold}).
  int64_t refine_select(const float* s, double s_round, const float* a, const float* y, double norm_h,
                        double norm_hb, double norm_dh, double norm_wdh, const float* c, double dist_c, double target,
                        int64_t max_cols, float* t, uint64_t* bits, double* e_rest, int* level = nullptr) const;
  // Step 2: logits fl(fl(W_j . h_r) + b_j) for j in cols[0..n) into out[r] (n,), for nr <= 4 rows h[r]
  // (fp32 dot products; the rows share each load of W_j).
  void refine_logits(const float* const* h, int nr, const int32_t* cols, int64_t n, float* const* out) const;
  // Step 3, with yr = act~(logits): writes y'_j into y for j in H and decides with the mixed output, the
  // bounds e'_j on H and e_rest on the rest. 1 inside, 0 outside, -1 undecided. bound_out (optional)
  // receives E >= ||y_ref - y|| (the audit of tests).
  int8_t refine_decide(float* y, const float* cen, const int32_t* cols, int64_t n, const float* yr,
                       double norm_h, double e_rest, double r2, double* bound_out = nullptr) const;

  // 1 when (1 + q) U^2 < r2 (certainly inside), 0 when (1 - q) L^2 > r2 (certainly outside), else -1.
  // The absolute term: the reference's squares fl((y_d - c_d)^2) that underflow round with an absolute
  // error <= 2^-150 each (additions of subnormals are exact), outside q's relative model.
  int8_t classify(double upper, double lower, double r2) const {
    const double under = static_cast<double>(D) * 0x1p-149;
    if ((1 + q) * upper * upper * (1 + 1e-12) + under < r2) return 1;
    if ((1 - q) * lower * lower * (1 - 1e-12) - under > r2) return 0;
    return -1;
  }
  // Bounds on sqrt(Σ_d x_d^2) from an fp32 sum `sum` of its D squares (any order, FMA or not): relative
  // slack sl (2 g_{D+2} + 1e-6, see part 2) and the same absolute underflow term as classify.
  double dist_up(float sum, double sl) const {
    return std::sqrt(static_cast<double>(sum) * (1 + sl) + static_cast<double>(D) * 0x1p-149) * (1 + 1e-12);
  }
  double dist_down(float sum, double sl) const {
    return std::sqrt(std::max(0.0, static_cast<double>(sum) * (1 - sl) - static_cast<double>(D) * 0x1p-149)) *
           (1 - 1e-12);
  }
};

// The own sigmoid of part 5 element-wise: y = σ~(x) (n,), |σ~(x) - σ(x)| <= 6 v for every float x.
void sigmoid_fp32(const float* x, float* y, int64_t n);

// Per-row fp32 sums of squares: ||h||^2 and (hc != nullptr) ||h - hc||^2 (||ĥ||^2 and ||h - ĥ||^2:
// prepare_bf16_rows, bf16_rows.h).
void sq_norms(const float* h, const float* hc, int64_t K, float* s2, float* d2);

}  // namespace robbench
