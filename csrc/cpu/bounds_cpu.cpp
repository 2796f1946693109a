// The constants and per-sample decisions of bounds.h (see there for the analysis). Any summation
// order is covered by the analysis, so the loops may use SIMD reductions.
#include "common/bounds.h"
#include "common/bf16_product.h"
#include "common/decoder.h"
#include "common/sigmoid.h"
#include "common/switches.h"

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace robbench {

namespace {

// Per-sample sums of one band pass: d2 = Σ (y - c)^2, e2 = Σ e_j^2 (part 2), f2 = Σ (t_j ρ_j + 2 ev)^2 and
// tmax = max_j t_j (part 3 with the threshold τ = 0: every unit in H).
struct BandSums {
  float d2 = 0, e2 = 0, f2 = 0, tmax = 0;
};

struct BandArgs {
  const float *rW, *rdW, *rWf, *babs;
  float k_dw, k_w, k_w3, k_wf, g_b, ev2;  // k_w: ||δh|| + g_K ||ĥ|| (part 2); k_w3: g_K ||ĥ|| (part 3)
  // the AVX-512 terms (bounds.h, part 5): per-unit c0 and the scalars above times k2,
  // x_s = (u_s + v (1 + v)) k2 (the coefficient of |s_j|)
  const float* c0 = nullptr;
  float x_dw = 0, x_w = 0, x_w3 = 0, x_wf = 0, x_s = 0, x_ev2 = 0;
  // the relative rounding of the product's output s: u when it was rounded to bf16, 0 when s is the fp32
  // accumulation itself (bounds.h, part 6)
  float u_s = static_cast<float>(LastLayerBound::u);
};

// The same arguments for the units from j on (the AVX-512 loops' scalar tails): every per-unit array
// advanced, every scalar kept.
BandArgs units_from(const BandArgs& g, int64_t j) {
  BandArgs t = g;
  t.rW += j;
  t.rdW += j;
  t.rWf += j;
  t.babs += j;
  if (t.c0 != nullptr) t.c0 += j;
  return t;
}

// One sample's per-element band terms (parts 2 and 3), shared by decide and refine_select.
BandArgs band_args(const LastLayerBound& b, double s_round, double norm_h, double norm_hb, double norm_dh) {
  const double inf = 1 + 1e-9, pad = 1 + 1e-6, k2 = LastLayerBound::k2;
  const double k_dw = norm_h * inf * pad, k_w = (norm_dh + b.gK * norm_hb) * inf * pad;
  const double k_w3 = b.gK * norm_hb * inf * pad, k_wf = b.gK1 * norm_h * inf * pad;
  BandArgs g{b.rW.data(), b.rdW.data(), b.rWf.data(), b.babs.data(), static_cast<float>(k_dw),
             static_cast<float>(k_w), static_cast<float>(k_w3), static_cast<float>(k_wf),
             static_cast<float>(b.gK1 * pad), static_cast<float>(2 * b.ev)};
  g.c0 = b.c0.data();
  g.x_dw = static_cast<float>(k_dw * k2);
  g.x_w = static_cast<float>(k_w * k2);
  g.x_w3 = static_cast<float>(k_w3 * k2);
  g.x_wf = static_cast<float>(k_wf * k2);
  g.x_s = static_cast<float>((s_round + LastLayerBound::v * (1 + LastLayerBound::v)) * k2);
  g.u_s = static_cast<float>(s_round);
  g.x_ev2 = static_cast<float>(2 * b.ev * k2);
  return g;
}

// One unit's band terms (bounds.h parts 2 and 3), shared by the band pass and the refinement's buckets:
// Δ_j and ρ_j (each term's few roundings covered by the factor 1 + 1e-5), the local slope bound t_j
// (1 without a sigmoid), e_j = t_j Δ_j + 2 ev and f_j = t_j ρ_j + 2 ev (Δ_j and ρ_j without a sigmoid).
struct UnitTerms {
  float delta, rho, t, e, f;
};

template <bool kSig>
inline UnitTerms unit_terms(const BandArgs& g, int64_t j, const float* s, const float* a, const float* y) {
  const float v = 1.0f / 16777216.0f;
  const float abs_s = s[j] < 0.f ? -s[j] : s[j], abs_a = a[j] < 0.f ? -a[j] : a[j];
  const float common = g.rWf[j] * g.k_wf + g.babs[j] * g.g_b + g.u_s * abs_s + v * abs_a + 1e-30f;
  const float delta = (g.rdW[j] * g.k_dw + g.rW[j] * g.k_w + common) * 1.00001f;
  const float rho = (g.rW[j] * g.k_w3 + common) * 1.00001f;
  float t = 1.0f;
  if constexpr (kSig) {
    const float m = y[j] * (1.0f - y[j]) + 32.0f * v;
    t = m * (1.0f + delta + delta * delta) * 1.00001f;
    t = delta <= 1.0f ? t : 0.25f;
    t = t < 0.25f ? t : 0.25f;
  }
  const float e = kSig ? (t * delta + g.ev2) * 1.00001f : delta;
  const float f = kSig ? (t * rho + g.ev2) * 1.00001f : rho;
  return {delta, rho, t, e, f};
}

template <bool kSig>
inline void band_sums_impl(const float* s, const float* a, const float* y, const float* cen, int64_t D,
                           const BandArgs& g, BandSums* out) {
  for (int64_t j = 0; j < D; ++j) {
    const float diff = y[j] - cen[j];
    out->d2 += diff * diff;
    const UnitTerms u = unit_terms<kSig>(g, j, s, a, y);
    out->e2 += u.e * u.e;
    out->f2 += u.f * u.f;
    out->tmax = std::max(out->tmax, u.t);
  }
}

// unit_terms for 16 units at j with AVX-512 (the same expressions, lane by lane).
struct UnitTermsV {
  __m512 delta, rho, t, e, f;
};

// The same bounds for 16 units at j with AVX-512, in fewer operations (bounds.h, part 5): the per-unit
// constant c0_j >= (g_{K+1} + v (1 + v)) |b_j| precomputed, v |a_j| bounded by v (1 + v) (|s_j| + |b_j|),
// FMAs, and the factor 1 + 1e-5 of each chain folded into its inputs (k2 = 1 + 2e-5 on c0 and the
// per-sample scalars x_*): every chain rounds at most 7 times.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline UnitTermsV unit_terms_avx512(const BandArgs& g, int64_t j, __m512 sj, __m512 yj, bool sigmoid) {
  const __m512 one = _mm512_set1_ps(1.0f), quarter = _mm512_set1_ps(0.25f), infl = _mm512_set1_ps(1.00001f);
  const __m512 v32 = _mm512_set1_ps(32.0f / 16777216.0f);
  const __m512 rw = _mm512_loadu_ps(g.rW + j);
  __m512 common = _mm512_fmadd_ps(_mm512_loadu_ps(g.rWf + j), _mm512_set1_ps(g.x_wf), _mm512_loadu_ps(g.c0 + j));
  common = _mm512_fmadd_ps(_mm512_abs_ps(sj), _mm512_set1_ps(g.x_s), common);
  const __m512 delta = _mm512_fmadd_ps(_mm512_loadu_ps(g.rdW + j), _mm512_set1_ps(g.x_dw),
                                       _mm512_fmadd_ps(rw, _mm512_set1_ps(g.x_w), common));
  const __m512 rho = _mm512_fmadd_ps(rw, _mm512_set1_ps(g.x_w3), common);
  if (!sigmoid) return {delta, rho, one, delta, rho};
  const __m512 vev2 = _mm512_set1_ps(g.x_ev2);
  const __m512 m = _mm512_fmadd_ps(yj, _mm512_sub_ps(one, yj), v32);
  const __m512 q = _mm512_fmadd_ps(delta, delta, _mm512_add_ps(one, delta));  // 1 + Δ + Δ^2
  __m512 t = _mm512_mul_ps(_mm512_mul_ps(m, q), infl);
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(delta, one, _CMP_LE_OQ), quarter, t);  // Δ > 1 (or NaN): 1/4
  t = _mm512_min_ps(t, quarter);
  return {delta, rho, t, _mm512_fmadd_ps(t, delta, vev2), _mm512_fmadd_ps(t, rho, vev2)};
}

// The same from s and y in memory (a is not read: its rounding is bounded through |s_j| and |b_j|).
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline UnitTermsV unit_terms_avx512(const BandArgs& g, int64_t j, const float* s, const float* /*a*/, __m512 yj,
                                    bool sigmoid) {
  return unit_terms_avx512(g, j, _mm512_loadu_ps(s + j), yj, sigmoid);
}

// act~ of the fused pass: the own sigmoid; ReLU and identity exact (NaN stays NaN, as ATen's).
inline float act_scalar(float a, int64_t act) {
  if (act == kActSigmoid) return sigmoid_scalar(a);
  if (act == kActRelu) return a > 0.0f || std::isnan(a) ? a : 0.0f;
  return a;
}

// ReLU or identity, 16 lanes (the sigmoid goes through sigmoid_rows_avx512).
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline __m512 relu_or_identity_avx512(__m512 a, int64_t act) {
  return act == kActRelu ? _mm512_max_ps(_mm512_setzero_ps(), a) : a;  // NaN: the 2nd operand, NaN
}

// Lane accumulators of one band pass: the sums of BandSums, 16 lanes each.
struct BandAccV {
  __m512 d2, e2, f2, tmax;
};

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void band_acc_init(BandAccV& acc) {
  acc.d2 = acc.e2 = acc.f2 = acc.tmax = _mm512_setzero_ps();
}

// Adds the 16 units at j: (y - c)^2, e^2 (part2), f^2 and the maximum of t. Sums of products by FMA (any
// order, FMA or not: the sums' slack covers them).
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void band_acc_add(BandAccV& acc, int64_t j, __m512 yj, const float* cen, const UnitTermsV& u, bool part2) {
  const __m512 diff = _mm512_sub_ps(yj, _mm512_loadu_ps(cen + j));
  acc.d2 = _mm512_fmadd_ps(diff, diff, acc.d2);
  if (part2) acc.e2 = _mm512_fmadd_ps(u.e, u.e, acc.e2);
  acc.f2 = _mm512_fmadd_ps(u.f, u.f, acc.f2);
  acc.tmax = _mm512_max_ps(acc.tmax, u.t);
}

// The lane sums into out, then the units j0..D-1 (fewer than 16) by the scalar loop.
// Lane sums are added in a different order than the scalar loop: the analysis covers any order.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void band_acc_finish(const BandAccV& acc, const float* s, const float* a, const float* y, const float* cen,
                     int64_t j0, int64_t D, bool sigmoid, const BandArgs& g, BandSums* out) {
  out->d2 = _mm512_reduce_add_ps(acc.d2);
  out->e2 = _mm512_reduce_add_ps(acc.e2);
  out->f2 = _mm512_reduce_add_ps(acc.f2);
  out->tmax = _mm512_reduce_max_ps(acc.tmax);
  if (j0 >= D) return;
  const int64_t j = j0;
  BandSums tail;
  const BandArgs gt = units_from(g, j);
  if (sigmoid) band_sums_impl<true>(s + j, a + j, y + j, cen + j, D - j, gt, &tail);
  else band_sums_impl<false>(s + j, a + j, y + j, cen + j, D - j, gt, &tail);
  out->d2 += tail.d2;
  out->e2 += tail.e2;
  out->f2 += tail.f2;
  out->tmax = std::max(out->tmax, tail.tmax);
}

// The band sums from a and y in memory, with AVX-512 intrinsics (GCC does not if-convert the sigmoid
// variant of the scalar loop).
__attribute__((target("avx512f,avx512bw,avx512vl")))
void band_sums_avx512(const float* s, const float* a, const float* y, const float* cen, int64_t D,
                      bool sigmoid, bool part2, const BandArgs& g, BandSums* out) {
  BandAccV acc;
  band_acc_init(acc);
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m512 yj = _mm512_loadu_ps(y + j);
    band_acc_add(acc, j, yj, cen, unit_terms_avx512(g, j, s, a, yj, sigmoid), part2);
  }
  band_acc_finish(acc, s, a, y, cen, j, D, sigmoid, g, out);
}

// The own sigmoid over x[0..n) in blocks of 128 (sigmoid_avx512_n), then 16; returns how many it did (the
// rest: sigmoid_scalar).
__attribute__((target("avx512f,avx512bw,avx512vl")))
int64_t sigmoid_rows_avx512(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    __m512 xs[8], ys[8];
    for (int q = 0; q < 8; ++q) xs[q] = _mm512_loadu_ps(x + i + 16 * q);
    sigmoid_avx512_n<8>(xs, ys);
    for (int q = 0; q < 8; ++q) _mm512_storeu_ps(y + i + 16 * q, ys[q]);
  }
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, sigmoid_avx512(_mm512_loadu_ps(x + i)));
  return i;
}

// The fused pass over one row: a = fl(s + b) and y = act~(a) (own sigmoid) for the row's units into a, y
// (L1-resident: 2 x 4 D bytes), then the band sums reading them back. Separate loops, not one: the
// sigmoid's dependency chain (~60 cycles) inside the band loop left the core waiting (measured: no gain
// over the separate ATen passes); alone, eight vectors at a time, its iterations overlap.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void epilogue_row_avx512(const float* s, const float* bias, int64_t act, float* a, float* y, int64_t D) {
  int64_t j = 0;
  for (; j + 16 <= D; j += 16)  // fl(s + b)
    _mm512_storeu_ps(a + j, _mm512_add_ps(_mm512_loadu_ps(s + j), _mm512_loadu_ps(bias + j)));
  for (; j < D; ++j) a[j] = s[j] + bias[j];
  j = 0;
  if (act == kActSigmoid) j = sigmoid_rows_avx512(a, y, D);
  else
    for (; j + 16 <= D; j += 16) _mm512_storeu_ps(y + j, relu_or_identity_avx512(_mm512_loadu_ps(a + j), act));
  for (; j < D; ++j) y[j] = act_scalar(a[j], act);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void band_epilogue_avx512(const float* s, const float* bias, int64_t act, float* a, float* y,
                          const float* cen, int64_t D, bool part2, const BandArgs& g, BandSums* out) {
  epilogue_row_avx512(s, bias, act, a, y, D);
  band_sums_avx512(s, a, y, cen, D, act == kActSigmoid, part2, g, out);
}

// Part 7's lean terms in the tile pass unless ROBBENCH_LEAN_TERMS=0 (read per call of decide_tiles; A/B).
bool lean_terms() { return switch_on("ROBBENCH_LEAN_TERMS"); }
// Part 9's fast sigmoid in the tile pass's lean rows unless ROBBENCH_FAST_SIGMOID=0 (read per call; A/B).
bool fast_sigmoid() { return switch_on("ROBBENCH_FAST_SIGMOID"); }
// m_j's additive term with the fast sigmoid: 2 kSigFastErr >= kSigFastErr (1 + kSigFastErr) (part 9),
// rounded up to fp32
const float kSigFastSlope = std::nextafter(static_cast<float>(2 * kSigFastErr), 1.0f);

// AVX-512 loops where the CPU has them; ROBBENCH_NO_AVX512=1 (read once per process) runs the portable
// loops instead, so that tests can check them on any machine.
bool has_avx512() {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && std::getenv("ROBBENCH_NO_AVX512") == nullptr;
  return avx512;
}

void band_sums(const float* s, const float* a, const float* y, const float* cen, int64_t D, bool sigmoid,
               bool part2, const BandArgs& g, BandSums* out) {
  if (has_avx512()) band_sums_avx512(s, a, y, cen, D, sigmoid, part2, g, out);
  else if (sigmoid) band_sums_impl<true>(s, a, y, cen, D, g, out);
  else band_sums_impl<false>(s, a, y, cen, D, g, out);
}

// The fused pass where AVX-512 runs; else the portable loops (a, y with the scalar own sigmoid, then the
// scalar band sums).
void band_epilogue(const float* s, const float* bias, int64_t act, float* a, float* y, const float* cen,
                   int64_t D, bool part2, const BandArgs& g, BandSums* out) {
  if (has_avx512()) return band_epilogue_avx512(s, bias, act, a, y, cen, D, part2, g, out);
  for (int64_t j = 0; j < D; ++j) {
    a[j] = s[j] + bias[j];
    y[j] = act_scalar(a[j], act);
  }
  if (act == kActSigmoid) band_sums_impl<true>(s, a, y, cen, D, g, out);
  else band_sums_impl<false>(s, a, y, cen, D, g, out);
}

// Part 7 (bounds.h): NV vectors of one row of a product tile, units j0 .. j0 + 16 NV - 1: a = fl(s + b),
// ŷ = act~(a) (the own sigmoid, NV vectors interleaved), the band terms, added to the row's lane
// accumulators acc (d2, e2, f2, tmax: 16 floats each) that carry the sums across the row's column blocks;
// ŷ also to y when y != nullptr.
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void tile_row_avx512(const float* s, const float* bias, int64_t j0, int64_t act, bool part2,
                            const BandArgs& g, const float* cen, float* y, float* acc) {
  const bool sigmoid = act == kActSigmoid;
  __m512 sv[NV], av[NV], yv[NV];
  for (int q = 0; q < NV; ++q) {
    sv[q] = _mm512_loadu_ps(s + j0 + 16 * q);
    av[q] = _mm512_add_ps(sv[q], _mm512_loadu_ps(bias + j0 + 16 * q));
  }
  if (sigmoid) sigmoid_avx512_n<NV>(av, yv);
  else
    for (int q = 0; q < NV; ++q) yv[q] = relu_or_identity_avx512(av[q], act);
  if (y != nullptr)
    for (int q = 0; q < NV; ++q) _mm512_storeu_ps(y + j0 + 16 * q, yv[q]);
  BandAccV A{_mm512_load_ps(acc), _mm512_load_ps(acc + 16), _mm512_load_ps(acc + 32), _mm512_load_ps(acc + 48)};
  for (int q = 0; q < NV; ++q) {
    const int64_t j = j0 + 16 * q;
    band_acc_add(A, j, yv[q], cen, unit_terms_avx512(g, j, sv[q], yv[q], sigmoid), part2);
  }
  _mm512_store_ps(acc, A.d2);
  _mm512_store_ps(acc + 16, A.e2);
  _mm512_store_ps(acc + 32, A.f2);
  _mm512_store_ps(acc + 48, A.tmax);
}

// Part 7's lean terms (sigmoid rows decided by part 3, the product's fp32 output): NR rows x NV vectors of a
// tile, units j0 .. j0 + 16 NV - 1 (NR NV sigmoids interleaved: one vector's ~70-cycle chain alone leaves
// the core waiting). Row r: s[r] its product row, vq[r] >= (1 + Δ* + Δ*^2) k2 (Δ* >= every Δ_j of the row;
// +inf when Δ* > 1), vx[r] >= the coefficients of rW_j and rWf_j in ρ_j; t_j = min(1/4, fl(m_j vq)),
// m_j = fl(ŷ fl(1 - ŷ) + 32 v), ρ_j <= fl(rsum_j vx + c0_j), f_j = fl(t_j ρ_j + 2 ev k2); acc[r] holds d2
// (lanes 0..15), f2 (32..47) and tmax (48..63); ŷ also to y[r] when y[r] != nullptr.
// Fast (part 9): ŷ by the fast sigmoid (within kSigFastErr of σ), vsl = fl32(2 kSigFastErr) rounded up in
// place of 32 v in m_j, and vev2 = (ev + kSigFastErr) k2 (the caller's).
template <int NR, int NV, bool Fast>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void tile_rows_lean_avx512(const float* const* s, const float* bias, int64_t j0, const float* rsum,
                                  const float* c0, const float* vq, const float* vx, __m512 vev2,
                                  const float* const* cen, float* const* y, float* const* acc) {
  const __m512 one = _mm512_set1_ps(1.0f), quarter = _mm512_set1_ps(0.25f);
  const __m512 v32 = _mm512_set1_ps(Fast ? kSigFastSlope : 32.0f / 16777216.0f);
  __m512 av[NR * NV], yv[NR * NV];
  for (int q = 0; q < NV; ++q) {
    const __m512 bq = _mm512_loadu_ps(bias + j0 + 16 * q);
    for (int r = 0; r < NR; ++r) av[r * NV + q] = _mm512_add_ps(_mm512_loadu_ps(s[r] + j0 + 16 * q), bq);
  }
  if constexpr (Fast) {  // one vector at a time in the source (the compiler interleaves them without spills)
    const SigFastTables tab = sigmoid_fast_tables();
    for (int i = 0; i < NR * NV; ++i) yv[i] = sigmoid_fast_avx512(av[i], tab);
  } else {
    sigmoid_avx512_n<NR * NV>(av, yv);
  }
  for (int r = 0; r < NR; ++r) {
    if (y[r] != nullptr)
      for (int q = 0; q < NV; ++q) _mm512_storeu_ps(y[r] + j0 + 16 * q, yv[r * NV + q]);
    const __m512 q_r = _mm512_set1_ps(vq[r]), x_r = _mm512_set1_ps(vx[r]);
    __m512 d2 = _mm512_load_ps(acc[r]), f2 = _mm512_load_ps(acc[r] + 32), tmax = _mm512_load_ps(acc[r] + 48);
    for (int q = 0; q < NV; ++q) {
      const int64_t j = j0 + 16 * q;
      const __m512 yj = yv[r * NV + q];
      const __m512 m = _mm512_fmadd_ps(yj, _mm512_sub_ps(one, yj), v32);
      const __m512 t = _mm512_min_ps(_mm512_mul_ps(m, q_r), quarter);  // NaN or +inf: 1/4
      const __m512 rho = _mm512_fmadd_ps(_mm512_loadu_ps(rsum + j), x_r, _mm512_loadu_ps(c0 + j));
      const __m512 f = _mm512_fmadd_ps(t, rho, vev2);
      const __m512 diff = _mm512_sub_ps(yj, _mm512_loadu_ps(cen[r] + j));
      d2 = _mm512_fmadd_ps(diff, diff, d2);
      f2 = _mm512_fmadd_ps(f, f, f2);
      tmax = _mm512_max_ps(tmax, t);
    }
    _mm512_store_ps(acc[r], d2);
    _mm512_store_ps(acc[r] + 32, f2);
    _mm512_store_ps(acc[r] + 48, tmax);
  }
}

template <int NR, bool Fast>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void tile_rows_lean_nv(int64_t nv, const float* const* s, const float* bias, int64_t j0, const float* rsum,
                              const float* c0, const float* vq, const float* vx, __m512 vev2,
                              const float* const* cen, float* const* y, float* const* acc) {
  switch (nv) {
    case 4: tile_rows_lean_avx512<NR, 4, Fast>(s, bias, j0, rsum, c0, vq, vx, vev2, cen, y, acc); break;
    case 3: tile_rows_lean_avx512<NR, 3, Fast>(s, bias, j0, rsum, c0, vq, vx, vev2, cen, y, acc); break;
    case 2: tile_rows_lean_avx512<NR, 2, Fast>(s, bias, j0, rsum, c0, vq, vx, vev2, cen, y, acc); break;
    case 1: tile_rows_lean_avx512<NR, 1, Fast>(s, bias, j0, rsum, c0, vq, vx, vev2, cen, y, acc); break;
    default: break;
  }
}

// Part 4 (refinement): units are split by their slope bound t at the thresholds kTauR: per threshold b,
// over the units with t <= kTauR[b] (every unit for b = 0: t <= 1/4 always), Σ e_j^2 (the per-element
// bound) and Σ f_j^2 (f = t (ρ + c) + 2 ev, the L_hi element bound); max t over L_hi <= kTauR[i].
// H = {t > kTauR[i]} is recomputed; the rest splits into L_hi = {kTauR[k] < t <= kTauR[i]} and
// L_lo = {t <= kTauR[k]}.
// Rank of the projection V in N(δh) (part 3). 32 decides ~12 % more of the band's undecided rows at β = 0.1
// but costs more (δh V per row: 0.10 → 0.17 µs at 1 thread) than it saves.
constexpr int64_t kProjRank = 16;

// Finer near 1/4, where β = 0.1's unsaturated units are; measured on its undecided samples, two more
// thresholds (1/1024, 1/8192 for 1/512) or the max t per threshold (instead of the threshold itself) change
// the recomputed units by < 1 % but cost a fifth of the pass.
constexpr int kBuckets = 8;
constexpr float kTauR[kBuckets] = {0.25f, 0.1875f, 0.125f, 0.09375f, 1.0f / 16, 1.0f / 32, 1.0f / 64, 1.0f / 512};

struct Buckets {  // cumulative: index b covers the units with t <= kTauR[b]
  float e2[kBuckets] = {}, f2[kBuckets] = {};
};

// The refinement's tighter terms with a reference hidden vector h_c (bounds.h part 4): c (D,) >= |δW h_c|,
// k_d >= ||h - h_c||, k_dh >= ||δh|| (each inflated like band_args). c == nullptr: part 2/3's e and f.
struct RefineArgs {
  const float* c;
  float k_d, k_dh;
};

// t_j into t (D,) and the bucket sums of e~_j^2 and ((t∘(ρ + c) + 2 ev)_j)^2 (bounds.h part 4), with the
// expressions (and roundings) of unit_terms for t and ρ.
void refine_buckets_impl(const float* s, const float* a, const float* y, int64_t D, const BandArgs& g,
                         const RefineArgs& ra, float* tout, Buckets* out) {
  for (int64_t j = 0; j < D; ++j) {
    const UnitTerms u = unit_terms<true>(g, j, s, a, y);
    const float t = u.t;
    float e = u.e, f = u.f;
    if (ra.c != nullptr) {
      const float x = std::min(g.rdW[j] * g.k_dw, ra.c[j] + g.rdW[j] * ra.k_d);
      const float dl = (u.rho + g.rW[j] * ra.k_dh + x) * 1.00001f;
      e = (t * dl + g.ev2) * 1.00001f;
      f = (t * (u.rho + ra.c[j]) + g.ev2) * 1.00001f;
    }
    tout[j] = t;
    for (int b = 0; b < kBuckets && t <= kTauR[b]; ++b) {
      out->e2[b] += e * e;
      out->f2[b] += f * f;
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void refine_buckets_avx512(const float* s, const float* a, const float* y, int64_t D, const BandArgs& g,
                           const RefineArgs& ra, float* tout, Buckets* out) {
  __m512 E[kBuckets], F[kBuckets];
  for (int b = 0; b < kBuckets; ++b) E[b] = F[b] = _mm512_setzero_ps();
  const __m512 infl = _mm512_set1_ps(1.00001f), vev2 = _mm512_set1_ps(g.ev2);
  const __m512 kdw = _mm512_set1_ps(g.k_dw), kd = _mm512_set1_ps(ra.k_d), kdh = _mm512_set1_ps(ra.k_dh);
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const UnitTermsV u = unit_terms_avx512(g, j, s, a, _mm512_loadu_ps(y + j), true);
    const __m512 t = u.t;
    __m512 e = u.e, f = u.f;
    if (ra.c != nullptr) {
      const __m512 cj = _mm512_loadu_ps(ra.c + j), rdw = _mm512_loadu_ps(g.rdW + j);
      const __m512 x = _mm512_min_ps(_mm512_mul_ps(rdw, kdw), _mm512_add_ps(cj, _mm512_mul_ps(rdw, kd)));
      const __m512 dl = _mm512_mul_ps(
          _mm512_add_ps(_mm512_add_ps(u.rho, _mm512_mul_ps(_mm512_loadu_ps(g.rW + j), kdh)), x), infl);
      e = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(t, dl), vev2), infl);
      f = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(t, _mm512_add_ps(u.rho, cj)), vev2), infl);
    }
    _mm512_storeu_ps(tout + j, t);
    const __m512 e2 = _mm512_mul_ps(e, e), f2 = _mm512_mul_ps(f, f);
    E[0] = _mm512_add_ps(E[0], e2);  // t <= kTauR[0] = 1/4 always (t is never NaN)
    F[0] = _mm512_add_ps(F[0], f2);
    for (int b = 1; b < kBuckets; ++b) {
      const __mmask16 le = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kTauR[b]), _CMP_LE_OQ);
      E[b] = _mm512_mask_add_ps(E[b], le, E[b], e2);
      F[b] = _mm512_mask_add_ps(F[b], le, F[b], f2);
    }
  }
  for (int b = 0; b < kBuckets; ++b) {
    out->e2[b] = _mm512_reduce_add_ps(E[b]);
    out->f2[b] = _mm512_reduce_add_ps(F[b]);
  }
  if (j < D) {
    const BandArgs gt = units_from(g, j);
    RefineArgs rt{ra.c != nullptr ? ra.c + j : nullptr, ra.k_d, ra.k_dh};
    refine_buckets_impl(s + j, a + j, y + j, D - j, gt, rt, tout + j, out);
  }
}

// out[c] = fl(fl(W_{cols[c]} . h) + b): K products summed in any order (FMA), then the bias.
void dots_scalar(const float* W, int64_t K, const float* h, const int32_t* cols, int64_t n, const float* b,
                 float* out) {
  for (int64_t c = 0; c < n; ++c) {
    const float* w = W + static_cast<int64_t>(cols[c]) * K;
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * h[k];
    out[c] = acc + b[cols[c]];
  }
}

// NR rows x four columns per step (each W row loaded once for the NR rows), 16 lanes, masked tail over K.
template <int NR>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void dots_avx512(const float* W, int64_t K, const float* const* h, const int32_t* cols, int64_t n, const float* b,
                 float* const* out) {
  const int64_t kfull = K & ~int64_t{15};
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - kfull)) - 1u);
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const float* w[4];
    for (int q = 0; q < 4; ++q) w[q] = W + static_cast<int64_t>(cols[c + q]) * K;
    // the next step's rows of W, a line per k step: rows are scattered (the units' indices), which the
    // hardware prefetcher does not follow
    const float* wn[4];
    for (int q = 0; q < 4; ++q) wn[q] = W + static_cast<int64_t>(cols[std::min(c + 4 + q, n - 1)]) * K;
    __m512 acc[NR][4];
    for (int r = 0; r < NR; ++r)
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kfull; k += 16) {
      __m512 wv[4];
      for (int q = 0; q < 4; ++q) wv[q] = _mm512_loadu_ps(w[q] + k);
      for (int q = 0; q < 4; ++q) _mm_prefetch(reinterpret_cast<const char*>(wn[q] + k), _MM_HINT_T0);
      for (int r = 0; r < NR; ++r) {
        const __m512 hv = _mm512_loadu_ps(h[r] + k);
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(wv[q], hv, acc[r][q]);
      }
    }
    if (tail) {
      __m512 wv[4];
      for (int q = 0; q < 4; ++q) wv[q] = _mm512_maskz_loadu_ps(tail, w[q] + kfull);
      for (int r = 0; r < NR; ++r) {
        const __m512 hv = _mm512_maskz_loadu_ps(tail, h[r] + kfull);
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(wv[q], hv, acc[r][q]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int q = 0; q < 4; ++q) out[r][c + q] = _mm512_reduce_add_ps(acc[r][q]) + b[cols[c + q]];
  }
  for (int r = 0; r < NR && c < n; ++r) dots_scalar(W, K, h[r], cols + c, n - c, b, out[r] + c);
}

// The units j with t[j] > th as a bitset (bit j % 64 of word j / 64; ceil(D / 64) words); returns their count.
int64_t select_above_scalar(const float* t, int64_t D, float th, uint64_t* bits) {
  int64_t n = 0;
  for (int64_t w = 0; w * 64 < D; ++w) bits[w] = 0;
  for (int64_t j = 0; j < D; ++j)
    if (t[j] > th) {
      bits[j / 64] |= uint64_t{1} << (j % 64);
      ++n;
    }
  return n;
}

__attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))  // every AVX-512 CPU has POPCNT (not implied)
int64_t select_above_avx512(const float* t, int64_t D, float th, uint64_t* bits) {
  const __m512 vth = _mm512_set1_ps(th);
  int64_t n = 0, j = 0;
  for (int64_t w = 0; w * 64 < D; ++w) bits[w] = 0;
  for (; j + 16 <= D; j += 16) {
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(t + j), vth, _CMP_GT_OQ);
    bits[j / 64] |= static_cast<uint64_t>(m) << (j % 64);  // j % 64 is a multiple of 16
    n += __builtin_popcount(m);
  }
  for (; j < D; ++j)
    if (t[j] > th) {
      bits[j / 64] |= uint64_t{1} << (j % 64);
      ++n;
    }
  return n;
}

int64_t select_above(const float* t, int64_t D, float th, uint64_t* bits) {
  return has_avx512() ? select_above_avx512(t, D, th, bits) : select_above_scalar(t, D, th, bits);
}

// Σ_c e'_j^2 over the refined units j = cols[c] (sigmoid; bounds.h part 4), fp32, each e' with a few
// roundings covered by the factor 1 + 1e-5.
__attribute__((target_clones("avx512f", "avx2", "default")))
float refined_e2(const int32_t* cols, int64_t n, const float* rd2, const float* bd2, float nh, const float* yr,
                 float ev2) {
  const float v32 = 32.0f / 16777216.0f;
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) {
    const int32_t j = cols[c];
    const float d = (rd2[j] * nh + bd2[j]) * 1.00001f;
    const float yj = yr[c];
    float t = (yj * (1.0f - yj) + v32) * (1.0f + d + d * d) * 1.00001f;
    t = t < 0.25f ? t : 0.25f;
    t = d <= 1.0f ? t : 0.25f;
    const float e = (t * d + ev2) * 1.00001f;
    acc += e * e;
  }
  return acc;
}

// fp32 sum Σ (y - c)^2 over D units (any order).
__attribute__((target_clones("avx512f", "avx2", "default")))
void mixed_sq_dist(const float* y, const float* cen, int64_t D, float* d2_out) {
  float d2 = 0.f;
#pragma omp simd reduction(+ : d2)
  for (int64_t j = 0; j < D; ++j) {
    const float d = y[j] - cen[j];
    d2 += d * d;
  }
  *d2_out = d2;
}
}  // namespace

__attribute__((target_clones("avx512f", "avx2", "default")))
void sq_norms(const float* h, const float* hc, int64_t K, float* s2_out, float* d2_out) {
  float s2 = 0.f, d2 = 0.f;
  if (hc == nullptr) {
#pragma omp simd reduction(+ : s2)
    for (int64_t k = 0; k < K; ++k) s2 += h[k] * h[k];
  } else {
#pragma omp simd reduction(+ : s2, d2)
    for (int64_t k = 0; k < K; ++k) {
      const float d = h[k] - hc[k];
      s2 += h[k] * h[k];
      d2 += d * d;
    }
  }
  *s2_out = s2;
  *d2_out = d2;
}

LastLayerBound LastLayerBound::make(const at::Tensor& wt, const at::Tensor& b, int64_t act, int64_t D) {
  LastLayerBound m;
  m.K = wt.size(0);
  m.P = wt.size(1);
  m.D = D;
  m.act = act;
  // Ŵ = bf16(W) with subnormal values (exponent field 0, |Ŵ_jk| < 2^-126) set to 0: the bf16 product's
  // instruction (VDPBF16PS) reads them as 0 whatever h_k is, so δW = W - Ŵ must carry them (bounds.h part 2)
  m.wt_bf16 = wt.to(at::kBFloat16).contiguous();
  m.wt_bf16.masked_fill_(m.wt_bf16.view(at::kShort).bitwise_and(0x7F80).eq(0), 0);
  at::Tensor w = wt.narrow(1, 0, D).to(at::kDouble).t().contiguous();              // (D, K)
  at::Tensor wb = m.wt_bf16.narrow(1, 0, D).to(at::kDouble).t().contiguous();      // (D, K)
  const double inf = 1 + 1e-6;
  auto to_vec = [&](const at::Tensor& t) {
    at::Tensor f = (t * inf).to(at::kFloat).contiguous();
    return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + D);
  };
  m.rW = to_vec(wb.norm(2, {1}));
  m.rdW = to_vec((w - wb).norm(2, {1}));
  m.rWf = to_vec(w.norm(2, {1}));
  m.babs = to_vec(b.narrow(0, 0, D).to(at::kDouble).abs());
  at::Tensor bf = b.narrow(0, 0, D).contiguous();
  m.bias.assign(bf.data_ptr<float>(), bf.data_ptr<float>() + D);
  // LAPACK's SVD in float64 is accurate to ~1e-15 relative; 1e-6 covers it many times over.
  m.spectral = at::linalg_matrix_norm(w, 2).item<double>() * inf + 1e-300;
  m.maxW = w.norm(2, {1}).max().item<double>() * inf;
  m.maxb = b.narrow(0, 0, D).to(at::kDouble).abs().max().item<double>() * inf;
  m.gK = gamma(static_cast<double>(m.K));
  m.gK1 = gamma(static_cast<double>(m.K + 1));
  m.q = gamma(static_cast<double>(D + 2));
  // part 3 (bounds.h): ||δW||_2, ||Ŵ||_2, the leading right singular vectors V of Ŵ, λ and ||R||_2
  {
    const double fro = wb.norm().item<double>();
    m.spec_dW = at::linalg_matrix_norm(w - wb, 2).item<double>() * inf + 1e-12 * fro + 1e-300;
    m.spec_Wb = at::linalg_matrix_norm(wb, 2).item<double>() * inf + 1e-12 * fro + 1e-300;
    const int64_t k = std::min<int64_t>({kProjRank, m.K, D});
    auto svd = at::linalg_svd(wb, false);
    m.vk = std::get<2>(svd).narrow(0, 0, k).t().to(at::kFloat).contiguous();  // (K, k) fp32: exact numbers
    at::Tensor v = m.vk.to(at::kDouble);
    at::Tensor M = at::mm(wb, v);                                            // (D, k)
    at::Tensor G = at::mm(M.t(), M);
    at::Tensor lam = (G.abs().sum(1) * (1 + 1e-9) + 1e-11 * fro * fro).contiguous();  // >= G_ll + Σ|G_lm|
    m.lam.assign(lam.data_ptr<double>(), lam.data_ptr<double>() + k);
    at::Tensor R = wb - at::mm(M, v.t());
    const double vmax = v.norm(2, {0}).max().item<double>() * inf;
    m.vmax = vmax;
    m.rho_R = at::linalg_matrix_norm(R, 2).item<double>() * inf +
              1e-12 * fro * (1 + std::sqrt(static_cast<double>(k)) * vmax) + 1e-300;
  }
  // part 5: the AVX-512 band's per-unit constant (float64, then fp32: k2 covers that rounding too)
  m.c0.resize(D);
  for (int64_t j = 0; j < D; ++j)
    m.c0[j] = static_cast<float>((m.gK1 * (1 + 1e-6) + v * (1 + v)) * m.babs[j] * k2 + 1e-30);
  // part 7: the maxima of the per-unit constants (fp32 maxima of fp32 values: exact), and rW_j + rWf_j in
  // float64, inflated by 1e-6 before its fp32 rounding
  m.unit_max.assign(4, 0.f);
  for (int64_t j = 0; j < D; ++j) {
    m.unit_max[0] = std::max(m.unit_max[0], m.rdW[j]);
    m.unit_max[1] = std::max(m.unit_max[1], m.rW[j]);
    m.unit_max[2] = std::max(m.unit_max[2], m.rWf[j]);
    m.unit_max[3] = std::max(m.unit_max[3], m.c0[j]);
  }
  m.rsum.resize(D);
  for (int64_t j = 0; j < D; ++j)
    m.rsum[j] = static_cast<float>((static_cast<double>(m.rW[j]) + m.rWf[j]) * (1 + 1e-6));
  m.w_rows = wt.narrow(1, 0, D).t().contiguous();  // (D, K): W's rows, exact fp32 (part 4)
  // δW = W - Ŵ: fp32 minus its bf16 rounding, exact in fp32 (at most 16 significant bits)
  m.dw_rows = (m.w_rows - m.wt_bf16.narrow(1, 0, D).t().to(at::kFloat)).contiguous();
  {
    const double g2 = 2 * gamma(static_cast<double>(m.K + 1)) * (1 + 1e-6);
    m.rd2.resize(D);
    m.bd2.resize(D);
    for (int64_t j = 0; j < D; ++j) {
      m.rd2[j] = static_cast<float>(g2 * m.rWf[j]);
      m.bd2[j] = static_cast<float>(g2 * m.babs[j]);
    }
  }
  m.lip = act == kActSigmoid ? 0.25 : 1.0;
  m.ev = act == kActSigmoid ? 16 * v : 0.0;
  return m;
}

double LastLayerBound::screen_upper(double norm_h, double dist_h, double off) const {
  const double ref = std::sqrt(static_cast<double>(D)) * (lip * gK1 * (maxW * norm_h + maxb) + ev);
  return (lip * spectral * dist_h * (1 + 1e-9) + off + ref) * (1 + 1e-12);
}

namespace {
// Σ_l λ_l (|p_l| + slack)^2 over k <= 16 terms, 8 lanes at a time (the same products as the scalar loop,
// summed in another order: any order of these k float64 additions is within the 1e-12 of norm_w_dh).
__attribute__((target("avx512f,avx512vl")))
double lam_sum_avx512(const double* lam, const float* p, int64_t k, double slack) {
  const __m512d vs = _mm512_set1_pd(slack);
  __m512d acc = _mm512_setzero_pd();
  for (int64_t l = 0; l < k; l += 8) {
    const __mmask8 mk = k - l >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << (k - l)) - 1);
    const __m512d pl = _mm512_add_pd(_mm512_abs_pd(_mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, p + l))), vs);
    // lanes past k: λ = 0, so they add 0 * slack^2 = 0
    acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_mul_pd(_mm512_maskz_loadu_pd(mk, lam + l), pl), pl));
  }
  return _mm512_reduce_add_pd(acc);
}
}  // namespace

bool row_vec() { return switch_on("ROBBENCH_ROW_VEC"); }

double LastLayerBound::norm_w_dh(const float* p, double norm_dh, bool vec) const {
  // |p_l| <= |fl(V_l . δh)| + g_K ||V_l|| ||δh|| (any-order fp32 dot product); sum in float64
  const double slack = gK * vmax * norm_dh * (1 + 1e-9);
  double acc = 0;
  if (vec && has_avx512()) {
    acc = lam_sum_avx512(lam.data(), p, static_cast<int64_t>(lam.size()), slack);
  } else {
    for (size_t l = 0; l < lam.size(); ++l) {
      const double pl = std::fabs(static_cast<double>(p[l])) + slack;
      acc += lam[l] * pl * pl;
    }
  }
  const double viaV = std::sqrt(acc) * (1 + 1e-12) + rho_R * norm_dh * (1 + 1e-12);
  return std::min(viaV, spec_Wb * norm_dh * (1 + 1e-12));
}

namespace {
// The decision from one sample's band sums (parts 2 and 3), shared by decide and decide_epilogue.
int8_t band_decision(const LastLayerBound& b, const BandSums& bs, double norm_h, double norm_dh, double r2,
                     double norm_wdh, double* dist_out, double* bound_out = nullptr) {
  const double sl = 2 * b.q + 1e-6;  // fp32 sums of D nonnegative terms, any order (bounds.h)
  // with the absolute underflow term (dist_up): without a sigmoid (ev = 0) the terms f_j = ρ_j can be
  // ~2^-76 for tiny outputs, their squares round to 0, and Σ f_j^2 = 0 while ||f|| = sqrt(D) 2^-76
  auto up = [&](float sum) { return b.dist_up(sum, sl); };
  double E;
  if (norm_wdh >= 0) {  // part 3 only (part 2's sum e2 is not accumulated then), τ = 0
    const double mk = static_cast<double>(bs.tmax);
    E = (mk * (b.spec_dW * norm_h + norm_wdh) * (1 + 1e-12) + up(bs.f2)) * (1 + 1e-12);
  } else {
    E = up(bs.e2);
  }
  E += 1e-30;
  if (bound_out != nullptr) *bound_out = E;
  if (dist_out != nullptr) *dist_out = std::sqrt(static_cast<double>(bs.d2));
  const double hi = b.dist_up(bs.d2, sl) + E;
  const double lo = std::max(0.0, b.dist_down(bs.d2, sl) - E);
  return b.classify(hi, lo, r2);
}

// band_decision for 8 rows at once, lane by lane the same float64 operations in the same order (no FMA:
// -ffp-contract=off), so the same E, dist and decisions; part 2 or 3 per lane by the sign of norm_wdh.
// Inputs per lane: the row's fp32 sums d2, e2 (part 2) or f2 (part 3) in sel, tmax, and its BandRow.
__attribute__((target("avx512f,avx512vl")))
void band_decisions8(const LastLayerBound& b, __mmask8 lanes, const float* d2, const float* e2, const float* f2,
                     const float* tmax, const BandRow* rows, int8_t* dec, double* dist, double* bound) {
  alignas(64) double nh[8] = {}, nw[8] = {}, r2[8] = {};
  for (int i = 0; i < 8; ++i) {
    if (!((lanes >> i) & 1)) continue;
    nh[i] = rows[i].norm_h;
    nw[i] = rows[i].norm_wdh;
    r2[i] = rows[i].r2;
  }
  const __m512d zero = _mm512_setzero_pd(), one12 = _mm512_set1_pd(1 + 1e-12);
  const double sl = 2 * b.q + 1e-6, under = static_cast<double>(b.D) * 0x1p-149;
  const __m512d vup = _mm512_set1_pd(1 + sl), vdn = _mm512_set1_pd(1 - sl), vun = _mm512_set1_pd(under);
  const __m512d vd2 = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(lanes, d2));
  const __m512d vnw = _mm512_load_pd(nw);
  const __mmask8 p3 = _mm512_cmp_pd_mask(vnw, zero, _CMP_GE_OQ);
  // dist_up of f2 (part 3 lanes) or e2 (part 2 lanes)
  const __m512d vsel = _mm512_cvtps_pd(_mm256_mask_blend_ps(p3, _mm256_maskz_loadu_ps(lanes, e2),
                                                            _mm256_maskz_loadu_ps(lanes, f2)));
  const __m512d upsel = _mm512_mul_pd(_mm512_sqrt_pd(_mm512_add_pd(_mm512_mul_pd(vsel, vup), vun)), one12);
  const __m512d mk = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(lanes, tmax));
  const __m512d first = _mm512_mul_pd(
      _mm512_mul_pd(mk, _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(b.spec_dW), _mm512_load_pd(nh)), vnw)), one12);
  __m512d E = _mm512_mask_blend_pd(p3, upsel, _mm512_mul_pd(_mm512_add_pd(first, upsel), one12));
  E = _mm512_add_pd(E, _mm512_set1_pd(1e-30));
  if (bound != nullptr) _mm512_mask_storeu_pd(bound, lanes, E);
  _mm512_mask_storeu_pd(dist, lanes, _mm512_sqrt_pd(vd2));
  const __m512d dup = _mm512_mul_pd(_mm512_sqrt_pd(_mm512_add_pd(_mm512_mul_pd(vd2, vup), vun)), one12);
  const __m512d ddn = _mm512_mul_pd(
      _mm512_sqrt_pd(_mm512_max_pd(_mm512_sub_pd(_mm512_mul_pd(vd2, vdn), vun), zero)), _mm512_set1_pd(1 - 1e-12));
  const __m512d hi = _mm512_add_pd(dup, E);
  const __m512d lo = _mm512_max_pd(_mm512_sub_pd(ddn, E), zero);  // NaN -> 0, as std::max(0.0, x)
  const __m512d vr2 = _mm512_load_pd(r2);
  // classify: (1 + q) hi^2 (1 + 1e-12) + under < r2 inside, (1 - q) lo^2 (1 - 1e-12) - under > r2 outside
  const __m512d in = _mm512_add_pd(
      _mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(1 + b.q), hi), hi), one12), vun);
  const __m512d out = _mm512_sub_pd(
      _mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(1 - b.q), lo), lo), _mm512_set1_pd(1 - 1e-12)), vun);
  const __mmask8 mi = _mm512_cmp_pd_mask(in, vr2, _CMP_LT_OQ), mo = _mm512_cmp_pd_mask(out, vr2, _CMP_GT_OQ);
  for (int i = 0; i < 8; ++i)
    if ((lanes >> i) & 1) dec[i] = ((mi >> i) & 1) ? 1 : ((mo >> i) & 1) ? 0 : -1;
}
}  // namespace

int8_t LastLayerBound::decide(const float* s, double s_round, const float* a, const float* y, const float* cen,
                              double norm_h, double norm_hb, double norm_dh, double r2, double norm_wdh,
                              double* dist_out) const {
  const BandArgs g = band_args(*this, s_round, norm_h, norm_hb, norm_dh);
  BandSums bs;
  band_sums(s, a, y, cen, D, act == kActSigmoid, norm_wdh < 0, g, &bs);
  return band_decision(*this, bs, norm_h, norm_dh, r2, norm_wdh, dist_out);
}

int8_t LastLayerBound::decide_epilogue(const float* s, double s_round, float* a, float* y, const float* cen,
                                       double norm_h, double norm_hb, double norm_dh, double r2, double norm_wdh,
                                       double* dist_out, double* bound_out) const {
  const BandArgs g = band_args(*this, s_round, norm_h, norm_hb, norm_dh);
  BandSums bs;
  band_epilogue(s, bias.data(), act, a, y, cen, D, norm_wdh < 0, g, &bs);
  return band_decision(*this, bs, norm_h, norm_dh, r2, norm_wdh, dist_out, bound_out);
}

namespace {
// Part 7: decide_tiles with AVX-512. Per block of kRows rows: for each column block (units < D only),
// brgemm one tile, then its epilogue row by row while the tile (kRows x kCols fp32, 16 KiB) is in L1; the
// units past the last whole vector (D % 16 of them) by the scalar terms into a per-row BandSums; after the
// last column block, the row's sums and band_decision.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void decide_tiles_avx512(const LastLayerBound& b, const Bf16Product& prod, const uint16_t* hb, int64_t n, float* s,
                         float* a, float* y, bool store_y, const BandRow* rows, int8_t* dec, double* dist,
                         double* bound) {
  constexpr int64_t kR = Bf16Product::kRows, kC = Bf16Product::kCols;
  static_assert(kC % 16 == 0, "column blocks are whole vectors");
  const int64_t P = b.P, D = b.D, K = b.K, jv = D / 16 * 16;  // units < jv in vectors, the rest scalar
  const bool sigmoid = b.act == kActSigmoid, lean_on = sigmoid && lean_terms();
  // part 9: the fast sigmoid in the lean rows, unless ŷ is kept for the refinement (store_y: it reads ŷ with
  // the exact sigmoid's ev) or ROBBENCH_FAST_SIGMOID=0 (read per call; A/B)
  const bool fast = !store_y && fast_sigmoid();
  const bool vec = row_vec();  // ROBBENCH_ROW_VEC=0: band_decision row by row (read per call; A/B)
  const float* bias = b.bias.data();
  alignas(64) float acc[kR][64];  // per row: the lane accumulators d2, e2, f2, tmax (16 each)
  BandArgs g[kR];
  BandSums tail[kR];
  float xq[kR];  // lean rows: >= (1 + Δ* + Δ*^2) k2, Δ* >= every Δ_j of the row (+inf when Δ* > 1)
  float xr[kR];  // lean rows: >= the coefficients of rW_j and rWf_j in ρ_j (part 7)
  bool lean[kR];
  const __m512 vev2 = _mm512_set1_ps(static_cast<float>(2 * b.ev * LastLayerBound::k2));
  const __m512 vevf = _mm512_set1_ps(static_cast<float>((b.ev + kSigFastErr) * LastLayerBound::k2));
  const float vinf = std::numeric_limits<float>::infinity();
  for (int64_t r0 = 0; r0 < n; r0 += kR) {
    const int64_t m = std::min(kR, n - r0);
    for (int64_t i = 0; i < m; ++i) {
      const BandRow& rw = rows[r0 + i];
      g[i] = band_args(b, 0.0, rw.norm_h, rw.norm_hb, rw.norm_dh);  // fp32 output: s_round = 0 (part 6)
      tail[i] = BandSums{};
      for (int l = 0; l < 64; ++l) acc[i][l] = 0.f;
      lean[i] = lean_on && rw.norm_wdh >= 0;
      // |s_j| <= (1 + g_K) ||Ŵ_j|| ||ĥ|| + 2^-100 (part 7): x_s |s_j| moves into the coefficients of rW_j
      const double xs = static_cast<double>(g[i].x_s) * (1 + b.gK) * rw.norm_hb * (1 + 1e-9);
      const double ds = (b.unit_max[0] * static_cast<double>(g[i].x_dw) + b.unit_max[1] * (g[i].x_w + xs) +
                         b.unit_max[2] * static_cast<double>(g[i].x_wf) + b.unit_max[3]) * (1 + 1e-9);
      // e^Δ <= 1 + Δ + Δ^2 for Δ <= 1 (part 2); else t = 1/4
      xq[i] = ds <= 1 ? static_cast<float>((1 + ds + ds * ds) * LastLayerBound::k2) : vinf;
      xr[i] = static_cast<float>(std::max(static_cast<double>(g[i].x_w3) + xs, static_cast<double>(g[i].x_wf)) *
                                 (1 + 1e-6));
    }
    float* sb = s + r0 * P;
    for (int64_t c0 = 0; c0 < D; c0 += kC) {
      prod.run_tile(hb + r0 * K, m, c0, sb, P);
      const int64_t c1 = std::min(c0 + kC, D), nv = (std::min(c1, jv) - c0) / 16;  // whole vectors < D
      for (int64_t i = 0; i < m;) {
        const float* si = sb + i * P;
        const BandRow& rw = rows[r0 + i];
        float* yi = store_y ? y + (r0 + i) * P : nullptr;
        int64_t step = 1;
        if (lean[i] && i + 1 < m && lean[i + 1]) {  // two rows at a time
          const float* sr[2] = {si, si + P};
          const float* cr[2] = {rw.cen, rows[r0 + i + 1].cen};
          float* yr[2] = {yi, store_y ? yi + P : nullptr};
          float* ar[2] = {acc[i], acc[i + 1]};
          if (fast) tile_rows_lean_nv<2, true>(nv, sr, bias, c0, b.rsum.data(), b.c0.data(), xq + i, xr + i, vevf, cr, yr, ar);
          else tile_rows_lean_nv<2, false>(nv, sr, bias, c0, b.rsum.data(), b.c0.data(), xq + i, xr + i, vev2, cr, yr, ar);
          step = 2;
        } else if (lean[i]) {
          float* ar[1] = {acc[i]};
          if (fast)
            tile_rows_lean_nv<1, true>(nv, &si, bias, c0, b.rsum.data(), b.c0.data(), xq + i, xr + i, vevf, &rw.cen,
                                       &yi, ar);
          else
            tile_rows_lean_nv<1, false>(nv, &si, bias, c0, b.rsum.data(), b.c0.data(), xq + i, xr + i, vev2, &rw.cen,
                                        &yi, ar);
        } else {
          const bool part2 = rw.norm_wdh < 0;
          switch (nv) {
            case 4: tile_row_avx512<4>(si, bias, c0, b.act, part2, g[i], rw.cen, yi, acc[i]); break;
            case 3: tile_row_avx512<3>(si, bias, c0, b.act, part2, g[i], rw.cen, yi, acc[i]); break;
            case 2: tile_row_avx512<2>(si, bias, c0, b.act, part2, g[i], rw.cen, yi, acc[i]); break;
            case 1: tile_row_avx512<1>(si, bias, c0, b.act, part2, g[i], rw.cen, yi, acc[i]); break;
            default: break;
          }
        }
        // the last units, as band_epilogue's scalar tail (a and y kept for the refinement)
        for (int64_t k = i; k < i + step && c1 > jv; ++k) {
          const float* sk = sb + k * P;
          const float* ck = rows[r0 + k].cen;
          float* ak = a + (r0 + k) * P;
          float* yk = y + (r0 + k) * P;
          for (int64_t j = jv; j < D; ++j) {
            ak[j] = sk[j] + bias[j];
            yk[j] = act_scalar(ak[j], b.act);
          }
          const BandArgs gt = units_from(g[k], jv);
          if (sigmoid) band_sums_impl<true>(sk + jv, ak + jv, yk + jv, ck + jv, D - jv, gt, &tail[k]);
          else band_sums_impl<false>(sk + jv, ak + jv, yk + jv, ck + jv, D - jv, gt, &tail[k]);
        }
        i += step;
      }
    }
    if (vec) {  // the same sums, then band_decision's float64 arithmetic 8 rows at a time
      alignas(64) float sd2[kR], se2[kR], sf2[kR], stm[kR];
      for (int64_t i = 0; i < m; ++i) {
        sd2[i] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i])) + tail[i].d2;
        se2[i] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 16)) + tail[i].e2;
        sf2[i] = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 32)) + tail[i].f2;
        stm[i] = std::max(_mm512_reduce_max_ps(_mm512_load_ps(acc[i] + 48)), tail[i].tmax);
      }
      for (int64_t i = 0; i < m; i += 8) {
        const int64_t w = std::min<int64_t>(8, m - i);
        band_decisions8(b, static_cast<__mmask8>((1u << w) - 1), sd2 + i, se2 + i, sf2 + i, stm + i, rows + r0 + i,
                        dec + r0 + i, dist + r0 + i, bound != nullptr ? bound + r0 + i : nullptr);
      }
      continue;
    }
    for (int64_t i = 0; i < m; ++i) {
      // lane sums, then the scalar units: an fp32 sum of the same nonnegative terms in another order
      const BandRow& rw = rows[r0 + i];
      BandSums bs;
      bs.d2 = _mm512_reduce_add_ps(_mm512_load_ps(acc[i])) + tail[i].d2;
      bs.e2 = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 16)) + tail[i].e2;
      bs.f2 = _mm512_reduce_add_ps(_mm512_load_ps(acc[i] + 32)) + tail[i].f2;
      bs.tmax = std::max(_mm512_reduce_max_ps(_mm512_load_ps(acc[i] + 48)), tail[i].tmax);
      dec[r0 + i] = band_decision(b, bs, rw.norm_h, rw.norm_dh, rw.r2, rw.norm_wdh, &dist[r0 + i],
                                  bound != nullptr ? bound + r0 + i : nullptr);
    }
  }
  Bf16Product::release();
}
}  // namespace

void LastLayerBound::decide_tiles(const Bf16Product& prod, const uint16_t* hb, int64_t n, float* s, float* a,
                                  float* y, bool store_y, const BandRow* rows, int8_t* dec, double* dist,
                                  double* bound) const {
  TORCH_CHECK(prod.K == K && prod.P == P, "decide_tiles: the product's shape (", prod.K, ", ", prod.P,
              ") is not the layer's (", K, ", ", P, ")");
  if (has_avx512()) return decide_tiles_avx512(*this, prod, hb, n, s, a, y, store_y, rows, dec, dist, bound);
  prod.run(hb, n, s, P);
  for (int64_t i = 0; i < n; ++i) {
    const BandRow& rw = rows[i];
    dec[i] = decide_epilogue(s + i * P, 0.0, a + i * P, y + i * P, rw.cen, rw.norm_h, rw.norm_hb, rw.norm_dh, rw.r2,
                             rw.norm_wdh, &dist[i], bound != nullptr ? bound + i : nullptr);
  }
}

void LastLayerBound::epilogue_row(const float* s, float* a, float* y) const {
  int64_t j = 0;
  if (has_avx512()) {
    epilogue_row_avx512(s, bias.data(), act, a, y, D);
    j = D / 16 * 16;
  }
  for (; j < D; ++j) {
    a[j] = s[j] + bias[j];
    y[j] = act_scalar(a[j], act);
  }
}

void sigmoid_fp32(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  if (has_avx512()) i = sigmoid_rows_avx512(x, y, n);
  for (; i < n; ++i) y[i] = sigmoid_scalar(x[i]);
}

at::Tensor LastLayerBound::refine_centers(const at::Tensor& hc) const {
  // c_bj = (|fl(δW_j . h_c,b)| + g_K ||δW_j|| ||h_c,b||) (1 + 1e-5): fp32 products summed in any order (one
  // fp32 GEMM; bounds.h part 4)
  at::Tensor c = at::mm(hc, dw_rows.t()).contiguous();  // (B, D)
  float* cp = c.data_ptr<float>();
  const float* hp = hc.data_ptr<float>();
  for (int64_t p = 0; p < hc.size(0); ++p) {
    float s2, unused;
    sq_norms(hp + p * K, nullptr, K, &s2, &unused);
    const float slack = static_cast<float>(gK * norm_up(s2) * (1 + 1e-6));
    for (int64_t j = 0; j < D; ++j) cp[p * D + j] = (std::fabs(cp[p * D + j]) + rdW[j] * slack) * 1.00001f;
  }
  return c;
}

int64_t LastLayerBound::refine_select(const float* s, double s_round, const float* a, const float* y, double norm_h,
                                      double norm_hb, double norm_dh, double norm_wdh, const float* c,
                                      double dist_c, double target, int64_t max_cols, float* t, uint64_t* bits,
                                      double* e_rest, int* level) const {
  // a tie (or NaN) is for the reference; ReLU / identity have t = 1 everywhere: nothing to single out
  if (!(target > 0) || act != kActSigmoid || norm_wdh < 0) return -1;
  const BandArgs g = band_args(*this, s_round, norm_h, norm_hb, norm_dh);  // the per-element terms of decide
  // the reference hidden vector only where it is closer to h than 0 is (bounds.h part 4)
  const bool use_c = c != nullptr && dist_c < norm_h;
  const double inf = 1 + 1e-9, pad = 1 + 1e-6;
  const RefineArgs ra{use_c ? c : nullptr, static_cast<float>(dist_c * inf * pad),
                      static_cast<float>(norm_dh * inf * pad)};
  Buckets bk;
  if (has_avx512()) refine_buckets_avx512(s, a, y, D, g, ra, t, &bk);
  else refine_buckets_impl(s, a, y, D, g, ra, t, &bk);
  const double sl = 2 * q + 1e-6;  // fp32 sums of nonnegative terms, any order (bounds.h)
  auto up = [&](double sum) { return std::sqrt(sum * (1 + sl)) * (1 + 1e-12); };
  // >= ||δW h|| + ||Ŵ δh||, or ||δW (h - h_c)|| + ||Ŵ δh|| (then ||t∘(δW h_c)|| is in the buckets' f)
  const double spec = spec_dW * (use_c ? dist_c : norm_h) + norm_wdh;
  // H = buckets < i (recomputed); the rest split into L_hi = buckets i..k-1 (spectral, max t) and
  // L_lo = buckets >= k (per element). The smallest H whose best split meets the target.
  // Σ_{L_hi} f^2 = S_i - S_k for the exact cumulative sums S; each fp32 sum F is within a factor
  // 1 ± sl of its S, so S_i - S_k <= F_i / (1 - sl) - F_k / (1 + sl).
  auto f_hi = [&](int i, int k) {
    const double fk = k < kBuckets ? static_cast<double>(bk.f2[k]) / (1 + sl) : 0.0;
    return std::sqrt(std::max(0.0, static_cast<double>(bk.f2[i]) / (1 - sl) - fk)) * (1 + 1e-12);
  };
  double lo[kBuckets + 1];  // the per-element bound of L_lo = {t <= kTauR[k]}
  for (int k = 0; k < kBuckets; ++k) lo[k] = up(bk.e2[k]);
  lo[kBuckets] = 0;
  for (int i = 0; i < kBuckets; ++i) {
    const double mx = kTauR[i];  // >= max t over L_hi (⊂ {t <= kTauR[i]})
    double best = lo[i];  // k = i: L_hi empty
    for (int k = i + 1; k <= kBuckets; ++k)
      if (lo[k] + mx * spec < best) best = std::min(best, lo[k] + mx * spec + f_hi(i, k));
    best *= 1 + 1e-12;
    if (best <= target) {
      // i = 0: H = {t > 1/4} is empty (t <= 1/4 always)
      const int64_t n = select_above(t, D, kTauR[i], bits);
      if (n > max_cols) return -1;
      *e_rest = best;
      if (level != nullptr) *level = i;
      return n;
    }
  }
  return -1;
}

void LastLayerBound::refine_logits(const float* const* h, int nr, const int32_t* cols, int64_t n,
                                   float* const* out) const {
  const float* W = w_rows.data_ptr<float>();
  if (!has_avx512() || nr < 1 || nr > 4) {
    for (int r = 0; r < nr; ++r) dots_scalar(W, K, h[r], cols, n, bias.data(), out[r]);
    return;
  }
  switch (nr) {
    case 1: dots_avx512<1>(W, K, h, cols, n, bias.data(), out); break;
    case 2: dots_avx512<2>(W, K, h, cols, n, bias.data(), out); break;
    case 3: dots_avx512<3>(W, K, h, cols, n, bias.data(), out); break;
    default: dots_avx512<4>(W, K, h, cols, n, bias.data(), out); break;
  }
}

int8_t LastLayerBound::refine_decide(float* y, const float* cen, const int32_t* cols, int64_t n, const float* yr,
                                     double norm_h, double e_rest, double r2, double* bound_out) const {
  // Δ'_j = 2 g_{K+1} (||W_j|| ||h|| + |b_j|) (rd2 = 2 g_{K+1} ||W_j||, bd2 = 2 g_{K+1} |b_j|, inflated);
  // e'_j and the sum of their squares in fp32 (per-element factor 1 + 1e-5, sum slack as elsewhere)
  const float nh = static_cast<float>(norm_h * (1 + 1e-6));
  const float eh2 = refined_e2(cols, n, rd2.data(), bd2.data(), nh, yr, static_cast<float>(2 * ev));
  for (int64_t c = 0; c < n; ++c) y[cols[c]] = yr[c];
  float d2;
  mixed_sq_dist(y, cen, D, &d2);
  const double sl = 2 * q + 1e-6;  // fp32 sums of <= D nonnegative terms, any order (bounds.h)
  // ||e|| <= sqrt(||e_H||^2 + ||e_L||^2) (disjoint supports), ||e_L|| <= e_rest
  const double E = std::sqrt(static_cast<double>(eh2) * (1 + sl) + e_rest * e_rest) * (1 + 1e-12) + 1e-30;
  if (bound_out != nullptr) *bound_out = E;
  const double hi = dist_up(d2, sl) + E;
  const double lo = std::max(0.0, dist_down(d2, sl) - E);
  return classify(hi, lo, r2);
}

}  // namespace robbench
