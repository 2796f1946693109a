// hidden_rows (common/fused_hidden.h): the last hidden layer of the bf16 pass's rows by own fp32 loops, with
// a per-row bound on the distance to ATen's result (bounds.h part 8). The AVX-512 loop runs two rows at a
// time over blocks of up to 128 units, the rows sharing each load of W^T; bias, activation, ||h'||^2 and the
// error bound are formed while the block is in registers.
#include "common/fused_hidden.h"
#include "common/bounds.h"
#include "common/checks.h"
#include "common/decoder.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace robbench {

bool HiddenLayer::fusable(int64_t act) { return act == kActRelu || act == kActNone; }

HiddenLayer HiddenLayer::make(const at::Tensor& wt, const at::Tensor& b, int64_t act) {
  TORCH_INTERNAL_ASSERT(wt.is_contiguous() && b.is_contiguous() && wt.scalar_type() == at::kFloat);
  TORCH_INTERNAL_ASSERT(fusable(act));
  HiddenLayer L;
  L.wt = wt.data_ptr<float>();
  L.b = b.data_ptr<float>();
  L.k = wt.size(0);
  L.K = wt.size(1);
  L.act = act;
  // 2 g_{k+1} ||W||_F and 2 g_{k+1} ||b|| + sqrt(K) 1e-30 (part 8), float64 sums of fp32 squares (relative
  // error < 1e-12 here), inflated 1e-6
  const double v = 1.0 / 16777216.0, n = static_cast<double>(L.k + 1), g2 = 2 * (n * v / (1.0 - n * v));
  double w2 = 0, b2 = 0;
  for (int64_t i = 0; i < L.k * L.K; ++i) w2 += static_cast<double>(L.wt[i]) * L.wt[i];
  for (int64_t j = 0; j < L.K; ++j) b2 += static_cast<double>(L.b[j]) * L.b[j];
  L.wf = std::sqrt(w2) * (1 + 1e-6);
  L.bn = std::sqrt(b2) * (1 + 1e-6);
  L.ea = g2 * std::sqrt(w2) * (1 + 1e-6);
  L.eb = (g2 * std::sqrt(b2) + std::sqrt(static_cast<double>(L.K)) * 1e-30) * (1 + 1e-6);
  return L;
}

namespace {

bool hidden_avx512() {  // as bf16_rows_cpu.cpp's rows_avx512 (read once per process)
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && std::getenv("ROBBENCH_NO_AVX512") == nullptr;
  return on;
}

// sq_norm_up(sum, n) (bounds.h) with its constants hoisted out of the row loops: sqrt((sum + n 2^-149) fac).
struct NormUp {
  double add, fac;
  explicit NormUp(int64_t n) {
    const double v = 1.0 / 16777216.0, m = static_cast<double>(n + 2);
    add = static_cast<double>(n) * 0x1p-149;
    fac = 1 + 2 * (m * v / (1.0 - m * v));
  }
  double operator()(float sum) const { return std::sqrt((static_cast<double>(sum) + add) * fac); }
};

float sum_sq(const float* x, int64_t k) {
  float s = 0.f;
  for (int64_t i = 0; i < k; ++i) s += x[i] * x[i];
  return s;
}

void hidden_rows_portable(const HiddenLayer& L, const float* x, const int64_t* rows, int64_t n, float* out, float* s2,
                          double* eps) {
  const int64_t k = L.k, K = L.K;
  const NormUp nx(k);
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + rows[i] * k;
    float* h = out + i * K;
    const double nz = nx(sum_sq(xr, k));
    for (int64_t j = 0; j < K; ++j) h[j] = L.b[j];
    for (int64_t c = 0; c < k; ++c)
      for (int64_t j = 0; j < K; ++j) h[j] += xr[c] * L.wt[c * K + j];
    float sh = 0.f;
    for (int64_t j = 0; j < K; ++j) {
      if (L.act == kActRelu) h[j] = h[j] < 0.f ? 0.f : h[j];  // NaN stays NaN, as ATen's relu
      sh += h[j] * h[j];
    }
    s2[i] = sh;
    eps[i] = L.eps(nz);
  }
}

// Two rows (x0, x1; the same row twice for an odd tail) over NV vectors of 16 units starting at unit j0.
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void hidden_block(
    const HiddenLayer& L, const float* x0, const float* x1, int64_t j0, float* h0, float* h1, __m512& sh0,
    __m512& sh1) {
  const int64_t K = L.K;
  __mmask16 mk[NV];
  __m512 a0[NV], a1[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + 16 * v;
    mk[v] = K - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - j)) - 1u);
    a0[v] = _mm512_maskz_loadu_ps(mk[v], L.b + j);
    a1[v] = a0[v];
  }
  for (int64_t c = 0; c < L.k; ++c) {
    const __m512 b0 = _mm512_set1_ps(x0[c]), b1 = _mm512_set1_ps(x1[c]);
    const float* wc = L.wt + c * K + j0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512 w = _mm512_maskz_loadu_ps(mk[v], wc + 16 * v);
      a0[v] = _mm512_fmadd_ps(b0, w, a0[v]);
      a1[v] = _mm512_fmadd_ps(b1, w, a1[v]);
    }
  }
  const bool relu = L.act == kActRelu;
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const int64_t j = j0 + 16 * v;
    if (relu) {  // max(0, a) keeps a NaN, as ATen's relu
      a0[v] = _mm512_max_ps(zero, a0[v]);
      a1[v] = _mm512_max_ps(zero, a1[v]);
    }
    sh0 = _mm512_fmadd_ps(a0[v], a0[v], sh0);
    sh1 = _mm512_fmadd_ps(a1[v], a1[v], sh1);
    _mm512_mask_storeu_ps(h0 + j, mk[v], a0[v]);
    if (h1 != nullptr) _mm512_mask_storeu_ps(h1 + j, mk[v], a1[v]);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void hidden_rows_avx512(const HiddenLayer& L, const float* x, const int64_t* rows, int64_t n, float* out, float* s2,
                        double* eps) {
  const int64_t k = L.k, K = L.K, nv = (K + 15) / 16;
  const NormUp nx(k);
  for (int64_t i = 0; i < n; i += 2) {
    const bool two = i + 1 < n;
    const float* x0 = x + rows[i] * k;
    const float* x1 = two ? x + rows[i + 1] * k : x0;
    float* h0 = out + i * K;
    float* h1 = two ? h0 + K : nullptr;
    __m512 sh0 = _mm512_setzero_ps(), sh1 = sh0;
    for (int64_t v0 = 0; v0 < nv; v0 += 8) {
      const int64_t j0 = 16 * v0;
      switch (std::min<int64_t>(8, nv - v0)) {
        case 8: hidden_block<8>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 7: hidden_block<7>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 6: hidden_block<6>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 5: hidden_block<5>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 4: hidden_block<4>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 3: hidden_block<3>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        case 2: hidden_block<2>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
        default: hidden_block<1>(L, x0, x1, j0, h0, h1, sh0, sh1); break;
      }
    }
    s2[i] = _mm512_reduce_add_ps(sh0);
    eps[i] = L.eps(nx(sum_sq(x0, k)));
    if (two) {
      s2[i + 1] = _mm512_reduce_add_ps(sh1);
      eps[i + 1] = L.eps(nx(sum_sq(x1, k)));
    }
  }
}

}  // namespace

void hidden_rows(const HiddenLayer& layer, const float* x, const int64_t* rows, int64_t n, float* out, float* s2,
                 double* eps) {
  if (hidden_avx512()) hidden_rows_avx512(layer, x, rows, n, out, s2, eps);
  else hidden_rows_portable(layer, x, rows, n, out, s2, eps);
}

// The op robbench::hidden_rows (tests only): hidden_rows on every row of x (n, k) with the layer
// wt (k, K), b (K,), act (ReLU or none); returns (h' (n, K), s2 (n,), eps (n,) float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hidden_rows_cpu(const at::Tensor& x_, const at::Tensor& wt_,
                                                               const at::Tensor& b_, int64_t act) {
  const at::Device cpu(at::kCPU);
  check_tensor(x_, "x", at::kFloat, cpu, 2);
  check_tensor(wt_, "wt", at::kFloat, cpu, 2);
  check_tensor(b_, "b", at::kFloat, cpu, 1);
  TORCH_CHECK(wt_.size(0) == x_.size(1) && b_.size(0) == wt_.size(1), "wt must be (k, K) with k = ", x_.size(1),
              " and b (K,), got ", wt_.sizes(), " and ", b_.sizes());
  TORCH_CHECK(HiddenLayer::fusable(act), "act must be ReLU (", kActRelu, ") or none (", kActNone, "), got ", act);
  at::Tensor x = x_.contiguous(), wt = wt_.contiguous(), b = b_.contiguous();
  const int64_t n = x.size(0), K = wt.size(1);
  const HiddenLayer L = HiddenLayer::make(wt, b, act);
  std::vector<int64_t> rows(n);
  for (int64_t i = 0; i < n; ++i) rows[i] = i;
  at::Tensor h = at::empty({n, K}, x.options()), s2 = at::empty({n}, x.options());
  at::Tensor eps = at::empty({n}, x.options().dtype(at::kDouble));
  hidden_rows(L, x.data_ptr<float>(), rows.data(), n, h.data_ptr<float>(), s2.data_ptr<float>(),
              eps.data_ptr<double>());
  return {h, s2, eps};
}

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("hidden_rows(Tensor x, Tensor wt, Tensor b, int act) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("hidden_rows", &hidden_rows_cpu); }

}  // namespace robbench
