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

// Fast epilogue sigmoid (bounds.h part 9; AVX-512 only): σ^(x) = p_i(z) for x >= 0, 1 - σ^(|x|) for x < 0,
// with t = min(|x|, 14.5) (NaN stays NaN), z = fl(t + 1) in [1, 15.5], i = the segment of z: its exponent's
// two low bits and its two leading fraction bits (16 segments, four per octave of z: [1, 1.25), ...,
// [8, 10), ..., [14, 16)), taken by vpermps from the low 4 bits of z's bits >> 21, and p_i a cubic in z (fp32
// coefficients, FMA Horner; fitted to σ(z - 1) near-minimax per segment: benchmarks/sigmoid_fast_fit.py). Absolute
// error <= kSigFastErr for every float x: checked for all 2^32 bit patterns by
// benchmarks/sigmoid_fast_exhaustive.py (max 5.90e-6, at x = -3.99997) and on 10^7 dense floats plus every
// segment boundary and the clamp +- 64 ulps by tests/test_fast_sigmoid.py. 13 vector operations (4 of them
// vpermps) against the exact sigmoid's ~22.
constexpr double kSigFastErr = 6.5e-6;
constexpr float kSigFastClamp = 14.5f;
// kSigFastTab[k][lane]: coefficient of z^k for the segment whose index is lane (lane = ((127 + e) & 3) << 2 |
// q for z in 2^e [1 + q / 4, 1 + (q + 1) / 4))
alignas(64) constexpr float kSigFastTab[4][16] = {
    {0x1.47303cp-3f, 0x1.0d3af8p-4f, 0x1.3a1882p-6f, 0x1.9f8a22p-5f, 0x1.a8ff78p-3f, 0x1.eb9564p-2f, 0x1.65d20cp-1f, 0x1.ad112cp-1f, 0x1.e05904p-1f, 0x1.f8a4e0p-1f, 0x1.fe6d48p-1f, 0x1.ff9fccp-1f, 0x1.14de60p-2f, 0x1.0fb802p-2f, 0x1.009888p-2f, 0x1.c7ea0cp-3f},
    {0x1.7aa4e2p-2f, 0x1.ef4afep-2f, 0x1.1017a4p-1f, 0x1.029944p-1f, 0x1.902c38p-2f, 0x1.cf1baap-3f, 0x1.d9ccbcp-4f, 0x1.c672a6p-5f, 0x1.2a0e3cp-6f, 0x1.d0969cp-9f, 0x1.55db0ap-11f, 0x1.22d80ep-13f, 0x1.829bccp-3f, 0x1.9ae640p-3f, 0x1.d6fdeap-3f, 0x1.1c77ccp-2f},
    {-0x1.44fe24p-5f, -0x1.5f37f4p-4f, -0x1.a21ca0p-4f, -0x1.840e96p-4f, -0x1.123598p-4f, -0x1.144de2p-5f, -0x1.ef860ep-7f, -0x1.a5ac5cp-8f, -0x1.d87e5cp-10f, -0x1.33bc3ap-12f, -0x1.84d142p-15f, -0x1.264ce8p-17f, 0x1.f63eecp-5f, 0x1.a9c2d8p-5f, 0x1.0a65b6p-5f, 0x1.5730b4p-8f},
    {-0x1.391814p-10f, 0x1.497596p-8f, 0x1.c38fd8p-8f, 0x1.96eea2p-8f, 0x1.0316e0p-8f, 0x1.c1e8c2p-10f, 0x1.5f7540p-11f, 0x1.085154p-12f, 0x1.f78194p-15f, 0x1.115ac0p-17f, 0x1.281246p-20f, 0x1.8e836ep-23f, -0x1.4f4256p-6f, -0x1.2710ccp-6f, -0x1.c1190ap-7f, -0x1.16f45cp-7f},
};

struct SigFastTables {
  __m512 c0, c1, c2, c3;
};

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline SigFastTables sigmoid_fast_tables() {
  return {_mm512_load_ps(kSigFastTab[0]), _mm512_load_ps(kSigFastTab[1]), _mm512_load_ps(kSigFastTab[2]),
          _mm512_load_ps(kSigFastTab[3])};
}

__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline __m512 sigmoid_fast_avx512(__m512 x, const SigFastTables& tab) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // min(14.5, |x|): a NaN x gives NaN (minps returns its 2nd operand then; vrangeps would give 14.5)
  const __m512 z = _mm512_add_ps(_mm512_min_ps(_mm512_set1_ps(kSigFastClamp), _mm512_abs_ps(x)), one);
  const __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(z), 21);  // vpermps reads the low 4 bits
  __m512 p = _mm512_permutexvar_ps(idx, tab.c3);
  p = _mm512_fmadd_ps(p, z, _mm512_permutexvar_ps(idx, tab.c2));
  p = _mm512_fmadd_ps(p, z, _mm512_permutexvar_ps(idx, tab.c1));
  p = _mm512_fmadd_ps(p, z, _mm512_permutexvar_ps(idx, tab.c0));
  return _mm512_mask_sub_ps(p, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), one, p);  // 1 - σ^(|x|)
}

}  // namespace robbench
