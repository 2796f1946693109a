// Test hooks for the own sigmoid of the bf16 band's fused pass (common/sigmoid.h; its error bound is
// derived in bounds.h, part 5): the element-wise op and a scan of its error against float64 σ over
// ranges of fp32 bit patterns (every float of a range in seconds).
#include "common/bounds.h"
#include "common/sigmoid.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace robbench {
namespace {

bool fast_sigmoid_available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// The fast epilogue sigmoid of bounds.h part 9 element-wise (masked vectors for the last elements).
__attribute__((target("avx512f,avx512bw,avx512vl")))
void sigmoid_fast(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, k, sigmoid_fast_avx512(_mm512_maskz_loadu_ps(k, x + i), sigmoid_fast_tables()));
  }
}

// y = σ~(x) for a float32 CPU tensor: the AVX-512 code where the band runs it, or (portable) the scalar one;
// fast: part 9's fast sigmoid (AVX-512 only).
at::Tensor sigmoid_fp32_cpu(const at::Tensor& x, bool portable, bool fast) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  TORCH_CHECK(!(fast && portable), "the fast sigmoid has no portable version");
  TORCH_CHECK(!fast || fast_sigmoid_available(), "the fast sigmoid needs AVX-512 (F, BW, VL)");
  if (fast) {
    sigmoid_fast(xp, yp, xc.numel());
  } else if (portable) {
    for (int64_t i = 0; i < xc.numel(); ++i) yp[i] = sigmoid_scalar(xp[i]);
  } else {
    sigmoid_fp32(xp, yp, xc.numel());
  }
  return y;
}

// The largest |σ~(±x) - σ(±x)| (σ in float64: 1 / (1 + exp(-x)), error ~1e-16) over the floats x >= 0 whose
// bit patterns are first, first + stride, ... <= last (both signs of each), in units of v = 2^-24, and the x
// where it occurs (signed). NaN results count as an infinite error. Returns [max error / v, x].
std::vector<double> sigmoid_error_scan_cpu(int64_t first, int64_t last, int64_t stride, bool portable, bool fast) {
  TORCH_CHECK(!(fast && portable), "the fast sigmoid has no portable version");
  TORCH_CHECK(!fast || fast_sigmoid_available(), "the fast sigmoid needs AVX-512 (F, BW, VL)");
  TORCH_CHECK(0 <= first && first <= last && last <= 0x7f800000, "need 0 <= first <= last <= 0x7f800000 (+inf), got ",
              first, ", ", last);
  TORCH_CHECK(stride >= 1, "stride must be positive, got ", stride);
  const int64_t count = (last - first) / stride + 1;
  constexpr int64_t kBlock = 4096;
  const int64_t nblocks = (count + kBlock - 1) / kBlock;
  std::vector<double> err(nblocks, 0.0), where(nblocks, 0.0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> x(2 * kBlock), y(2 * kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, n = std::min(kBlock, count - i0);
      for (int64_t i = 0; i < n; ++i) {
        x[i] = __builtin_bit_cast(float, static_cast<uint32_t>(first + (i0 + i) * stride));
        x[n + i] = -x[i];
      }
      if (fast) {
        sigmoid_fast(x.data(), y.data(), 2 * n);
      } else if (portable) {
        for (int64_t i = 0; i < 2 * n; ++i) y[i] = sigmoid_scalar(x[i]);
      } else {
        sigmoid_fp32(x.data(), y.data(), 2 * n);
      }
      double worst = 0.0, at_x = 0.0;
      for (int64_t i = 0; i < 2 * n; ++i) {
        const double xd = x[i], ref = 1.0 / (1.0 + std::exp(-xd));
        const double e = std::isnan(y[i]) ? INFINITY : std::fabs(static_cast<double>(y[i]) - ref);
        if (e > worst) {
          worst = e;
          at_x = xd;
        }
      }
      err[b] = worst;
      where[b] = at_x;
    }
  });
  const int64_t best = std::max_element(err.begin(), err.end()) - err.begin();
  return {err[best] * 16777216.0, where[best]};
}

}  // namespace

// The fast sigmoid's proven bound (bounds.h part 9), for tests: [kSigFastErr, kSigFastClamp].
std::vector<double> sigmoid_fast_constants() { return {kSigFastErr, static_cast<double>(kSigFastClamp)}; }
}  // namespace robbench

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("sigmoid_fp32(Tensor x, bool portable=False, bool fast=False) -> Tensor");
  m.def("sigmoid_error_scan(int first, int last, int stride, bool portable=False, bool fast=False) -> float[]",
        &robbench::sigmoid_error_scan_cpu);
  m.def("sigmoid_fast_constants() -> float[]", &robbench::sigmoid_fast_constants);
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("sigmoid_fp32", &robbench::sigmoid_fp32_cpu); }
