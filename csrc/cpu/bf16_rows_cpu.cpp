// prepare_bf16_rows (common/bf16_rows.h): gather, bf16 rounding, the two norms and δh V of the bf16
// pass's rows in one read of each row. The AVX-512 loop keeps δh in a register and forms δh V with FMAs:
// one accumulator per column l of V, lane-wise over k, summed across the lanes at the end of the row.
// bounds.h's g_K bound on |fl(V_l . δh) - V_l . δh| holds for any order and association of the K
// products' summation, FMA included (Higham, Lemma 3.1: no term sees more than K roundings, each a
// factor 1 + θ, |θ| <= 2^-24; additions of exact zeros, from padding, do not round).
#include "common/bf16_rows.h"
#include "common/checks.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>

namespace robbench {
namespace {

// As bounds_cpu.cpp's has_avx512: ROBBENCH_NO_AVX512=1 (read once per process) runs the portable loop.
bool rows_avx512() {
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("ROBBENCH_NO_AVX512") == nullptr;
  return on;
}

void bf16_rows_portable(const float* h, const int64_t* rows, int64_t n, int64_t K, const float* Vt, int64_t nk,
                        float* hq, uint16_t* hb, float* sb, float* sd, float* pv) {
  for (int64_t i = 0; i < n; ++i) {
    const float* x = h + rows[i] * K;
    float* q = hq + i * K;
    uint16_t* b = hb + i * K;
    float* p = pv + i * nk;
    float s_b = 0.f, s_d = 0.f;
    for (int64_t l = 0; l < nk; ++l) p[l] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      q[k] = x[k];
      uint16_t bits = x[k] != x[k] ? uint16_t{0xFFFF} : c10::detail::round_to_nearest_even(x[k]);
      if ((bits & 0x7F80) == 0) bits = 0;  // subnormal (or zero) ĥ_k -> +0: δh_k = h_k carries it
      b[k] = bits;
      const float xh = __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16);
      const float d = x[k] - xh;  // exact: xh is x rounded to 8 significant bits
      s_b += xh * xh;
      s_d += d * d;
      for (int64_t l = 0; l < nk; ++l) p[l] += d * Vt[l * K + k];
    }
    sb[i] = s_b;
    sd[i] = s_d;
  }
}

// 16 vectors -> one: lane l = the sum of a[l]'s 16 lanes (a transpose by shuffles, adds at each level).
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

constexpr int64_t kAhead = 2;  // prefetch distance in rows

__attribute__((target("avx512f,avx512bw,avx512vl")))
void bf16_rows_avx512(const float* h, const int64_t* rows, int64_t n, int64_t K, const float* Vt, int64_t nk,
                      float* hq, uint16_t* hb, float* sb, float* sd, float* pv) {
  const __mmask16 vm = static_cast<__mmask16>((1u << nk) - 1u);
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF), qnan = _mm512_set1_epi32(0xFFFF);
  for (int64_t i = 0; i < n; ++i) {
    const float* x = h + rows[i] * K;
    float* q = hq + i * K;
    uint16_t* b = hb + i * K;
    if (i + kAhead < n) {  // h's block (~2 MB) is in L3, not L2: fetch a later row while this one computes
      const char* nx = reinterpret_cast<const char*>(h + rows[i + kAhead] * K);
      for (int64_t c = 0; c < K * 4; c += 64) _mm_prefetch(nx + c, _MM_HINT_T0);
    }
    __m512 s_b = _mm512_setzero_ps(), s_d = _mm512_setzero_ps();
    __m512 acc[16];
    for (int l = 0; l < 16; ++l) acc[l] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
      _mm512_mask_storeu_ps(q + k, m, v);
      // c10's round_to_nearest_even: (bits + 0x7FFF + lsb) >> 16, NaN -> 0xFFFF as ATen's vector loops
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
      r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(r, bias)), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
      // subnormal (or zero) ĥ_k -> +0 (exponent field 0): δh_k = h_k carries it (bounds.h part 2)
      r = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(r, _mm512_set1_epi32(0x7F80)), r);
      _mm256_mask_storeu_epi16(b + k, m, _mm512_cvtepi32_epi16(r));
      const __m512 xh = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
      const __m512 d = _mm512_sub_ps(v, xh);  // exact; zero in masked-off lanes
      s_b = _mm512_add_ps(s_b, _mm512_mul_ps(xh, xh));
      s_d = _mm512_add_ps(s_d, _mm512_mul_ps(d, d));
      // p_l += V_l[k..k+16) . δh[k..k+16), lane-wise (rows l >= nk of Vt are zero)
#pragma GCC unroll 16
      for (int l = 0; l < 16; ++l) acc[l] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, Vt + l * K + k), d, acc[l]);
    }
    sb[i] = _mm512_reduce_add_ps(s_b);
    sd[i] = _mm512_reduce_add_ps(s_d);
    _mm512_mask_storeu_ps(pv + i * nk, vm, sum_lanes16(acc));
  }
}

}  // namespace

void prepare_bf16_rows(const float* h, const int64_t* rows, int64_t n, int64_t K, const float* Vt, int64_t nk,
                       float* hq, uint16_t* hb, float* sb, float* sd, float* pv) {
  if (rows_avx512() && nk <= 16) bf16_rows_avx512(h, rows, n, K, Vt, nk, hq, hb, sb, sd, pv);
  else bf16_rows_portable(h, rows, n, K, Vt, nk, hq, hb, sb, sd, pv);
}

// The op robbench::bf16_rows (tests only): prepare_bf16_rows on rows `rows` of h (n, K) fp32 with
// vt = V^T (nk, K) fp32, nk <= 16; returns (hq (m, K), hb (m, K) bf16, sb (m,), sd (m,), pv (m, nk)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bf16_rows_cpu(const at::Tensor& h_,
                                                                                      const at::Tensor& rows_,
                                                                                      const at::Tensor& vt_) {
  const at::Device cpu(at::kCPU);
  check_tensor(h_, "h", at::kFloat, cpu, 2);
  check_tensor(rows_, "rows", at::kLong, cpu, 1);
  check_tensor(vt_, "vt", at::kFloat, cpu, 2);
  const int64_t K = h_.size(1), nk = vt_.size(0), m = rows_.size(0);
  TORCH_CHECK(vt_.size(1) == K && nk >= 1 && nk <= 16, "vt must be (nk, K) with 1 <= nk <= 16 and K = ", K,
              ", got ", vt_.sizes());
  TORCH_CHECK(m == 0 || (rows_.min().item<int64_t>() >= 0 && rows_.max().item<int64_t>() < h_.size(0)),
              "rows must index h's ", h_.size(0), " rows");
  at::Tensor h = h_.contiguous(), rows = rows_.contiguous();
  at::Tensor vt = at::zeros({16, K}, h.options());
  vt.narrow(0, 0, nk).copy_(vt_);
  at::Tensor hq = at::empty({m, K}, h.options()), hb = at::empty({m, K}, h.options().dtype(at::kBFloat16));
  at::Tensor sb = at::empty({m}, h.options()), sd = at::empty({m}, h.options()), pv = at::empty({m, nk}, h.options());
  prepare_bf16_rows(h.data_ptr<float>(), rows.data_ptr<int64_t>(), m, K, vt.data_ptr<float>(), nk,
                    hq.data_ptr<float>(), reinterpret_cast<uint16_t*>(hb.data_ptr<at::BFloat16>()),
                    sb.data_ptr<float>(), sd.data_ptr<float>(), pv.data_ptr<float>());
  return {hq, hb, sb, sd, pv};
}

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("bf16_rows(Tensor h, Tensor rows, Tensor vt) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("bf16_rows", &bf16_rows_cpu); }

}  // namespace robbench
