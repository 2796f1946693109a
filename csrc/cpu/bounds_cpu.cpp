// The constants and per-sample decisions of bounds.h (see there for the analysis). Any summation
// order is covered by the analysis, so the loops may use SIMD reductions.
#include "common/bounds.h"
#include "common/decoder.h"

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace robbench {

namespace {

template <bool kSig>
inline void band_sums_impl(const uint16_t* s_bits, const float* a, const float* y, const float* cen,
                           const float* rW, const float* rdW, const float* rWf, const float* babs, int64_t D,
                           float k_dw, float k_w, float k_wf, float g_b, float ev2, float* d2_out,
                           float* e2_out) {
  const float u = 1.0f / 256.0f, v = 1.0f / 16777216.0f;
  float d2 = 0.f, e2 = 0.f;
#pragma omp simd reduction(+ : d2, e2)
  for (int64_t j = 0; j < D; ++j) {
    const float sj = __builtin_bit_cast(float, static_cast<uint32_t>(s_bits[j]) << 16);
    const float diff = y[j] - cen[j];
    d2 += diff * diff;
    // Δ_j, each term's few roundings covered by the factor 1 + 1e-5
    const float abs_s = sj < 0.f ? -sj : sj, abs_a = a[j] < 0.f ? -a[j] : a[j];
    const float delta =
        (rdW[j] * k_dw + rW[j] * k_w + rWf[j] * k_wf + babs[j] * g_b + u * abs_s + v * abs_a + 1e-30f) * 1.00001f;
    float e = delta;
    if constexpr (kSig) {
      const float m = y[j] * (1.0f - y[j]) + 32.0f * v;
      float t = m * (1.0f + delta + delta * delta) * 1.00001f;
      t = delta <= 1.0f ? t : 0.25f;
      const float slope = t < 0.25f ? t : 0.25f;
      e = (slope * delta + ev2) * 1.00001f;
    }
    e2 += e * e;
  }
  *d2_out = d2;
  *e2_out = e2;
}

// The same sums with AVX-512 intrinsics (GCC does not if-convert the sigmoid variant of the loop).
// Lane sums are added in a different order than the scalar loop: the analysis covers any order.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void band_sums_avx512(const uint16_t* s_bits, const float* a, const float* y, const float* cen, const float* rW,
                      const float* rdW, const float* rWf, const float* babs, int64_t D, bool sigmoid, float k_dw,
                      float k_w, float k_wf, float g_b, float ev2, float* d2_out, float* e2_out) {
  const __m512 vu = _mm512_set1_ps(1.0f / 256.0f), vv = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m512 one = _mm512_set1_ps(1.0f), quarter = _mm512_set1_ps(0.25f), infl = _mm512_set1_ps(1.00001f);
  const __m512 tiny = _mm512_set1_ps(1e-30f), v32 = _mm512_set1_ps(32.0f / 16777216.0f);
  const __m512 kdw = _mm512_set1_ps(k_dw), kw = _mm512_set1_ps(k_w), kwf = _mm512_set1_ps(k_wf);
  const __m512 gb = _mm512_set1_ps(g_b), vev2 = _mm512_set1_ps(ev2);
  __m512 d2 = _mm512_setzero_ps(), e2 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    const __m512i sb = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s_bits + j)));
    const __m512 sj = _mm512_castsi512_ps(_mm512_slli_epi32(sb, 16));
    const __m512 yj = _mm512_loadu_ps(y + j), aj = _mm512_loadu_ps(a + j);
    const __m512 diff = _mm512_sub_ps(yj, _mm512_loadu_ps(cen + j));
    d2 = _mm512_add_ps(d2, _mm512_mul_ps(diff, diff));
    __m512 delta = _mm512_mul_ps(_mm512_loadu_ps(rdW + j), kdw);
    delta = _mm512_add_ps(delta, _mm512_mul_ps(_mm512_loadu_ps(rW + j), kw));
    delta = _mm512_add_ps(delta, _mm512_mul_ps(_mm512_loadu_ps(rWf + j), kwf));
    delta = _mm512_add_ps(delta, _mm512_mul_ps(_mm512_loadu_ps(babs + j), gb));
    delta = _mm512_add_ps(delta, _mm512_mul_ps(vu, _mm512_abs_ps(sj)));
    delta = _mm512_add_ps(delta, _mm512_mul_ps(vv, _mm512_abs_ps(aj)));
    delta = _mm512_mul_ps(_mm512_add_ps(delta, tiny), infl);
    __m512 e = delta;
    if (sigmoid) {
      const __m512 m = _mm512_add_ps(_mm512_mul_ps(yj, _mm512_sub_ps(one, yj)), v32);
      __m512 t = _mm512_mul_ps(_mm512_mul_ps(m, _mm512_add_ps(_mm512_add_ps(one, delta), _mm512_mul_ps(delta, delta))), infl);
      t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(delta, one, _CMP_LE_OQ), quarter, t);  // Δ > 1 (or NaN): 1/4
      t = _mm512_min_ps(t, quarter);
      e = _mm512_mul_ps(_mm512_add_ps(_mm512_mul_ps(t, delta), vev2), infl);
    }
    e2 = _mm512_add_ps(e2, _mm512_mul_ps(e, e));
  }
  float d2s = _mm512_reduce_add_ps(d2), e2s = _mm512_reduce_add_ps(e2);
  if (j < D) {
    float d2t, e2t;
    if (sigmoid)
      band_sums_impl<true>(s_bits + j, a + j, y + j, cen + j, rW + j, rdW + j, rWf + j, babs + j, D - j, k_dw, k_w,
                           k_wf, g_b, ev2, &d2t, &e2t);
    else
      band_sums_impl<false>(s_bits + j, a + j, y + j, cen + j, rW + j, rdW + j, rWf + j, babs + j, D - j, k_dw, k_w,
                            k_wf, g_b, ev2, &d2t, &e2t);
    d2s += d2t;
    e2s += e2t;
  }
  *d2_out = d2s;
  *e2_out = e2s;
}

void band_sums(const uint16_t* s_bits, const float* a, const float* y, const float* cen, const float* rW,
               const float* rdW, const float* rWf, const float* babs, int64_t D, bool sigmoid, float k_dw,
               float k_w, float k_wf, float g_b, float ev2, float* d2_out, float* e2_out) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  if (avx512)
    band_sums_avx512(s_bits, a, y, cen, rW, rdW, rWf, babs, D, sigmoid, k_dw, k_w, k_wf, g_b, ev2, d2_out, e2_out);
  else if (sigmoid)
    band_sums_impl<true>(s_bits, a, y, cen, rW, rdW, rWf, babs, D, k_dw, k_w, k_wf, g_b, ev2, d2_out, e2_out);
  else
    band_sums_impl<false>(s_bits, a, y, cen, rW, rdW, rWf, babs, D, k_dw, k_w, k_wf, g_b, ev2, d2_out, e2_out);
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

__attribute__((target_clones("avx512f", "avx2", "default")))
void bf16_sq_norms(const float* h, const uint16_t* hb, int64_t K, float* sb_out, float* sd_out) {
  float sb = 0.f, sd = 0.f;
#pragma omp simd reduction(+ : sb, sd)
  for (int64_t k = 0; k < K; ++k) {
    const float x = __builtin_bit_cast(float, static_cast<uint32_t>(hb[k]) << 16);
    const float d = h[k] - x;  // exact: x is h rounded to 8 significant bits
    sb += x * x;
    sd += d * d;
  }
  *sb_out = sb;
  *sd_out = sd;
}

LastLayerBound LastLayerBound::make(const at::Tensor& wt, const at::Tensor& b, int64_t act, int64_t D) {
  LastLayerBound m;
  m.K = wt.size(0);
  m.P = wt.size(1);
  m.D = D;
  m.act = act;
  m.wt_bf16 = wt.to(at::kBFloat16).contiguous();
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
  m.lip = act == kActSigmoid ? 0.25 : 1.0;
  m.ev = act == kActSigmoid ? 16 * v : 0.0;
  return m;
}

double LastLayerBound::screen_upper(double norm_h, double dist_h, double off) const {
  const double ref = std::sqrt(static_cast<double>(D)) * (lip * gK1 * (maxW * norm_h + maxb) + ev);
  return (lip * spectral * dist_h * (1 + 1e-9) + off + ref) * (1 + 1e-12);
}

int8_t LastLayerBound::decide(const at::BFloat16* s, const float* a, const float* y, const float* cen,
                              double norm_h, double norm_hb, double norm_dh, double r2) const {
  const double inf = 1 + 1e-9;
  const float k_dw = static_cast<float>(norm_h * inf * (1 + 1e-6));
  const float k_w = static_cast<float>((norm_dh + gK * norm_hb) * inf * (1 + 1e-6));
  const float k_wf = static_cast<float>(gK1 * norm_h * inf * (1 + 1e-6));
  const float g_b = static_cast<float>(gK1 * (1 + 1e-6));
  float d2f, e2f;
  band_sums(reinterpret_cast<const uint16_t*>(s), a, y, cen, rW.data(), rdW.data(), rWf.data(), babs.data(), D,
            act == kActSigmoid, k_dw, k_w, k_wf, g_b, static_cast<float>(2 * ev), &d2f, &e2f);
  const double sl = 2 * q + 1e-6;  // fp32 sums of D nonnegative terms, any order (bounds.h)
  const double E = std::sqrt(static_cast<double>(e2f) * (1 + sl)) * (1 + 1e-12) + 1e-30;
  const double dist = std::sqrt(static_cast<double>(d2f));
  const double hi = dist * std::sqrt(1 + sl) * (1 + 1e-12) + E;
  const double lo = std::max(0.0, dist * std::sqrt(1 - sl) * (1 - 1e-12) - E);
  return classify(hi, lo, r2);
}

}  // namespace robbench
