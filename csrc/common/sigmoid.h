// The own fp32 sigmoid of the bf16 band's fused pass (bounds.h, part 5: the derivation of its error
// bound). Header-only: bounds_cpu.cpp inlines it into the band loop, sigmoid_cpu.cpp exposes it to tests.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace robbench {

// Own sigmoid (bounds.h, part 5): σ(|x|) = 1 / (1 + E), E = e^-t, t = min(|x|, 32), E = 2^-n 2^-f with
// z = fl(t fl(log2 e)), n = nearest(z), f = z - n (exact), 2^-f by the degree-7 Taylor polynomial (fp32
// coefficients c_k = fl((-ln 2)^k / k!), FMA Horner), the 2^-n scaling exact; then one rounded add and
// reciprocal (a rounded divide in the portable code, rcp14 and one Newton step with AVX-512); x < 0:
// 1 - σ(|x|) (exact). Absolute error <= 5.4 v for every float x (NaN stays NaN). The two versions differ
// only in the reciprocal (results within an ulp or so).
constexpr float kSigC[8] = {0x1p+0f,          -0x1.62e43p-1f,   0x1.ebfbe0p-3f,   -0x1.c6b08ep-5f,
                            0x1.3b2ab6p-7f,   -0x1.5d87fep-10f, 0x1.430912p-13f, -0x1.ffcbfcp-17f};
constexpr float kSigL2E = 0x1.715476p+0f;  // fl(log2 e)
constexpr float kSigClamp = 32.0f;         // |σ(x) - σ(±32)| <= e^-32 beyond

inline float sigmoid_scalar(float x) {
  if (std::isnan(x)) return x;
  const float t = std::min(std::fabs(x), kSigClamp);
  const float z = t * kSigL2E;  // no FMA contraction (-ffp-contract=off): one rounding, as the vector code
  const float n = std::nearbyint(z);  // round to nearest even (default mode), as roundscale below
  const float f = z - n;
  float p = kSigC[7];
  for (int k = 6; k >= 0; --k) p = std::fma(p, f, kSigC[k]);
  const float r = 1.0f / (1.0f + std::ldexp(p, -static_cast<int>(n)));
  return x < 0.0f ? 1.0f - r : r;
}

// N vectors at once, each step applied to all N before the next: the ~70-cycle dependency chain of one
// vector left the core waiting (the out-of-order window does not reach the next loop iteration's).
template <int N>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void sigmoid_avx512_n(const __m512 (&x)[N], __m512 (&y)[N]) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 n[N], f[N], p[N];
  for (int i = 0; i < N; ++i) {
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(kSigClamp), _mm512_abs_ps(x[i]));  // NaN: the 2nd operand
    const __m512 z = _mm512_mul_ps(t, _mm512_set1_ps(kSigL2E));
    n[i] = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f[i] = _mm512_sub_ps(z, n[i]);
    p[i] = _mm512_set1_ps(kSigC[7]);
  }
  for (int k = 6; k >= 0; --k)
    for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], f[i], _mm512_set1_ps(kSigC[k]));
  for (int i = 0; i < N; ++i) {
    // p 2^-n, exact (p in [0.7, 1.5), 0 <= n <= 47: normal), by subtracting n from p's exponent field
    // (vscalefps was the pass's slowest instruction)
    const __m512 e = _mm512_castsi512_ps(
        _mm512_sub_epi32(_mm512_castps_si512(p[i]), _mm512_slli_epi32(_mm512_cvtps_epi32(n[i]), 23)));
    const __m512 d = _mm512_add_ps(one, e);
    // 1 / d by rcp14 and one Newton step (a divide cost ~4x the rest of the lanes' work): r0 (1 + fl(1 - d r0));
    // max(1/2, .) keeps r in [1/2, 1] (1/d >= 1/2: never farther from it) and NaN (the 2nd operand)
    const __m512 r0 = _mm512_rcp14_ps(d);
    const __m512 r = _mm512_max_ps(_mm512_set1_ps(0.5f), _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, one), r0));
    y[i] = _mm512_mask_sub_ps(r, _mm512_cmp_ps_mask(x[i], _mm512_setzero_ps(), _CMP_LT_OQ), one, r);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline __m512 sigmoid_avx512(__m512 x) {
  const __m512 xs[1] = {x};
  __m512 ys[1];
  sigmoid_avx512_n<1>(xs, ys);
  return ys[0];
}

}  // namespace robbench
