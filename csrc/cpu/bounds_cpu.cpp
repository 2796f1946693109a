// The per-sample decision of bounds.h (vectorised epilogue of the bf16 path). Any summation order is
// covered by the analysis, so the loops may use SIMD reductions.
#include "common/bounds.h"

#include <c10/util/BFloat16.h>

namespace robbench {

namespace {
__attribute__((target_clones("avx512f", "avx2", "default")))
void epilogue_sums(const uint16_t* a_bits, const float* y, const float* cen, const float* rn, const float* ba,
                   int64_t D, int64_t act, float k_row, float k_bias, float u_out, float v8,
                   float* d2_out, float* e2_out) {
  float d2 = 0.f, e2 = 0.f;
#pragma omp simd reduction(+ : d2, e2)
  for (int64_t j = 0; j < D; ++j) {
    uint32_t bits = static_cast<uint32_t>(a_bits[j]) << 16;
    float aj;
    __builtin_memcpy(&aj, &bits, 4);
    const float yj = y[j];
    const float diff = yj - cen[j];
    d2 += diff * diff;
    const float delta = rn[j] * k_row + ba[j] * k_bias + u_out * std::fabs(aj);
    float slope = 1.0f;
    if (act == 2) {
      // m bounds min(σ, 1-σ) of the exact σ(ã_j): ỹ_j carries an evaluation error <= 4v (absolute)
      const float m = std::fmin(yj, 1.0f - yj) + 0.5f * v8;
      // e^{-|t|} <= e^Δ m / (1 - m) with e^Δ <= 1 + Δ + Δ^2 for Δ <= 1; ×(1 + 1e-5) for the float ops.
      const float tail = (1.0f + delta + delta * delta) * m / (1.0f - m) * 1.00001f;
      slope = (delta <= 1.0f && m < 0.5f) ? std::fmin(0.25f, tail) : 0.25f;
    }
    const float dy = delta * slope + v8 * (std::fabs(yj) + delta);
    e2 += dy * dy;
  }
  *d2_out = d2;
  *e2_out = e2;
}
}  // namespace

int8_t BoundModel::decide(const at::BFloat16* a, const float* y, const float* cen, const double* norms,
                          double r2) const {
  double E, F, H;
  propagate(norms, &E, &F, &H);
  const double c = (1 + u) * (1 + u2) - 1;
  const double Hf = H + E + F;
  const LayerConst& L = last;
  // per-output |ã_j - â_j| <= rn_j * k_row + |b_j| * k_bias + u/(1-u) |ã_j|
  const double k_row = E + (c + L.g * (1 + c)) * H + F + L.g * Hf;
  const double k_bias = u + L.g * (1 + u) + L.g;
  float d2f, e2f;
  epilogue_sums(reinterpret_cast<const uint16_t*>(a), y, cen, row_norm.data(), bias_abs.data(), D, last_act,
                static_cast<float>(k_row * (1 + 1e-6)), static_cast<float>(k_bias * (1 + 1e-6)),
                static_cast<float>(u / (1 - u) * (1 + 1e-6)), static_cast<float>(8 * v), &d2f, &e2f);
  const double eps = 1e-3;  // float evaluation of the sums (see bounds.h)
  const double Ey = std::sqrt(static_cast<double>(e2f)) * (1 + eps) + 1e-30;
  const double dist = std::sqrt(static_cast<double>(d2f));
  const double hi = dist * std::sqrt((1 + eps) / (1 - eps)) + Ey;
  const double lo = std::max(0.0, dist * std::sqrt((1 - eps) / (1 + eps)) - Ey);
  if ((1 + q) * hi * hi * (1 + 1e-12) < r2) return 1;
  if ((1 - q) * lo * lo * (1 - 1e-12) > r2) return 0;
  return -1;
}

}  // namespace robbench
