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

// y = σ~(x) for a float32 CPU tensor: the AVX-512 code where the band runs it, or (portable) the scalar one.
at::Tensor sigmoid_fp32_cpu(const at::Tensor& x, bool portable) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (portable) {
    for (int64_t i = 0; i < xc.numel(); ++i) yp[i] = sigmoid_scalar(xp[i]);
  } else {
    sigmoid_fp32(xp, yp, xc.numel());
  }
  return y;
}

// The largest |σ~(±x) - σ(±x)| (σ in float64: 1 / (1 + exp(-x)), error ~1e-16) over the floats x >= 0 whose
// bit patterns are first, first + stride, ... <= last (both signs of each), in units of v = 2^-24, and the x
// where it occurs (signed). NaN results count as an infinite error. Returns [max error / v, x].
std::vector<double> sigmoid_error_scan_cpu(int64_t first, int64_t last, int64_t stride, bool portable) {
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
      if (portable) {
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
}  // namespace robbench

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("sigmoid_fp32(Tensor x, bool portable=False) -> Tensor");
  m.def("sigmoid_error_scan(int first, int last, int stride, bool portable=False) -> float[]",
        &robbench::sigmoid_error_scan_cpu);
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("sigmoid_fp32", &robbench::sigmoid_fp32_cpu); }
