// normals_rows (common/normals_rows.h): rng.h's normals_row for eight rows at once, one row per float64
// lane of an AVX-512 register. Each lane performs the scalar code's operations in the same order: the
// integer hashes, conversions of integers < 2^24 (exact), frexp (getexp / getmant: exact), +, -, *, /
// and sqrt (all correctly rounded in IEEE 754 double, as in the scalar code; no FMA: the intrinsics
// are separate multiplies and adds and the file is compiled with -ffp-contract=off), selections and
// negations (exact), and the final rounding to float (to nearest even, as static_cast<float>). So each
// lane's results are the scalar function's, bit for bit; tests/test_kernels.py checks them against
// robbench/rng.py. Rows past a multiple of eight, CPUs without AVX-512 and ROBBENCH_NO_AVX512=1 run
// normals_row itself.
#include "common/normals_rows.h"
#include "common/rng.h"

#include <immintrin.h>

#include <cstdlib>

namespace robbench {
namespace {

bool normals_avx512() {  // as bounds_cpu.cpp's has_avx512 (ROBBENCH_NO_AVX512=1: the portable loop)
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("ROBBENCH_NO_AVX512") == nullptr;
  return on;
}

#define RB_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl"), always_inline)) inline

RB_AVX512 __m256i hash32_v(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  return x;
}

RB_AVX512 __m512d mul(__m512d a, __m512d b) { return _mm512_mul_pd(a, b); }
RB_AVX512 __m512d add(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
RB_AVX512 __m512d cst(double c) { return _mm512_set1_pd(c); }

// log_uniform (rng.h) per lane.
RB_AVX512 __m512d log_uniform_v(__m256i bits) {
  const __m256i w = _mm256_add_epi32(_mm256_srli_epi32(bits, 8), _mm256_set1_epi32(1));
  const __m512d v = _mm512_cvtepu32_pd(w);  // exact, 1 <= v <= 2^24
  // frexp: v = m 2^e, 0.5 <= m < 1
  const __m512d m = _mm512_getmant_pd(v, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);
  __m512d e = add(_mm512_getexp_pd(v), cst(1.0));
  const __mmask8 low = _mm512_cmp_pd_mask(m, cst(0.7071067811865476), _CMP_LT_OQ);
  const __m512d f = _mm512_mask_mul_pd(m, low, m, cst(2.0));
  e = _mm512_mask_sub_pd(e, low, e, cst(1.0));
  const __m512d s = _mm512_div_pd(_mm512_sub_pd(f, cst(1.0)), add(f, cst(1.0)));
  const __m512d s2 = mul(s, s);
  __m512d p = cst(1.0 / 13.0);
  p = add(mul(p, s2), cst(1.0 / 11.0));
  p = add(mul(p, s2), cst(1.0 / 9.0));
  p = add(mul(p, s2), cst(1.0 / 7.0));
  p = add(mul(p, s2), cst(1.0 / 5.0));
  p = add(mul(p, s2), cst(1.0 / 3.0));
  p = add(mul(p, s2), cst(1.0));
  return add(mul(_mm512_sub_pd(e, cst(24.0)), cst(0.6931471805599453)), mul(mul(s, cst(2.0)), p));
}

// sincos_turn (rng.h) per lane.
RB_AVX512 void sincos_turn_v(__m256i bits, __m512d* c_out, __m512d* s_out) {
  const __m256i octant = _mm256_srli_epi32(bits, 29);
  const __m512d t = mul(_mm512_cvtepu32_pd(_mm256_and_si256(_mm256_srli_epi32(bits, 8), _mm256_set1_epi32(0x1FFFFF))),
                        cst(1.0 / 2097152.0));
  const __mmask8 odd = _mm256_test_epi32_mask(octant, _mm256_set1_epi32(1));
  const __m512d phi = mul(_mm512_mask_sub_pd(t, odd, cst(1.0), t), cst(0.7853981633974483));
  const __m512d x2 = mul(phi, phi);
  __m512d ps = cst(-1.0 / 39916800.0);
  ps = add(mul(ps, x2), cst(1.0 / 362880.0));
  ps = add(mul(ps, x2), cst(-1.0 / 5040.0));
  ps = add(mul(ps, x2), cst(1.0 / 120.0));
  ps = add(mul(ps, x2), cst(-1.0 / 6.0));
  ps = add(mul(ps, x2), cst(1.0));
  const __m512d sin_phi = mul(ps, phi);
  __m512d pc = cst(1.0 / 479001600.0);
  pc = add(mul(pc, x2), cst(-1.0 / 3628800.0));
  pc = add(mul(pc, x2), cst(1.0 / 40320.0));
  pc = add(mul(pc, x2), cst(-1.0 / 720.0));
  pc = add(mul(pc, x2), cst(1.0 / 24.0));
  pc = add(mul(pc, x2), cst(-1.0 / 2.0));
  pc = add(mul(pc, x2), cst(1.0));
  const __m512d cos_phi = pc;
  const __m512d sa = _mm512_mask_blend_pd(odd, sin_phi, cos_phi);
  const __m512d ca = _mm512_mask_blend_pd(odd, cos_phi, sin_phi);
  // quadrant q = octant >> 1: (c, s) = (ca, sa), (-sa, ca), (-ca, -sa), (sa, -ca)
  const __m256i q = _mm256_srli_epi32(octant, 1);
  const __mmask8 swap = _mm256_test_epi32_mask(q, _mm256_set1_epi32(1));          // q = 1, 3
  const __mmask8 neg_c = _mm256_cmpeq_epi32_mask(q, _mm256_set1_epi32(1)) |
                         _mm256_cmpeq_epi32_mask(q, _mm256_set1_epi32(2));        // q = 1, 2
  const __mmask8 neg_s = _mm256_cmpge_epu32_mask(q, _mm256_set1_epi32(2));        // q = 2, 3
  const __m512d c = _mm512_mask_blend_pd(swap, ca, sa);
  const __m512d s = _mm512_mask_blend_pd(swap, sa, ca);
  const __m512d sign = cst(-0.0);
  *c_out = _mm512_mask_xor_pd(c, neg_c, c, sign);
  *s_out = _mm512_mask_xor_pd(s, neg_s, s, sign);
}

__attribute__((target("avx512f,avx512dq,avx512vl")))
void normals8_avx512(const uint32_t* ka, const uint32_t* kb, const uint32_t* j, int64_t k, float* out) {
  const __m256i jv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j));
  const __m256i a = hash32_v(_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ka)), jv));
  const __m256i b = hash32_v(_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb)), jv));
  const __m256i lane_k = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                            _mm256_set1_epi32(static_cast<int>(k)));  // row offsets in out
  for (int64_t i = 0; i < k; i += 2) {
    const __m256i idx = _mm256_set1_epi32(static_cast<int>(i));
    const __m256i u1 = hash32_v(_mm256_xor_si256(a, hash32_v(_mm256_xor_si256(b, idx))));
    const __m256i u2 = hash32_v(_mm256_xor_si256(a, hash32_v(_mm256_xor_si256(b, _mm256_add_epi32(idx,
                                                                                 _mm256_set1_epi32(1))))));
    const __m512d radius = _mm512_sqrt_pd(mul(log_uniform_v(u1), cst(-2.0)));
    __m512d c, s;
    sincos_turn_v(u2, &c, &s);
    const __m256 e0 = _mm512_cvtpd_ps(mul(radius, c));
    _mm256_i32scatter_ps(out + i, lane_k, e0, 4);
    if (i + 1 < k) _mm256_i32scatter_ps(out + i + 1, lane_k, _mm512_cvtpd_ps(mul(radius, s)), 4);
  }
}

}  // namespace

void normals_rows(const uint32_t* ka, const uint32_t* kb, const uint32_t* j, int64_t n, int64_t k, float* out) {
  int64_t r = 0;
  if (normals_avx512())
    for (; r + 8 <= n; r += 8) normals8_avx512(ka + r, kb + r, j + r, k, out + r * k);
  for (; r < n; ++r) normals_row(ka[r], kb[r], j[r], k, out + r * k);
}

}  // namespace robbench
