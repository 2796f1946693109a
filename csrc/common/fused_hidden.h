// The last hidden layer of an MLP decoder computed by own fp32 loops for the bf16 pass, instead of ATen's
// addmm + bias copy + ReLU and a second read of h for its bf16 rounding (bounds.h part 8 has the bound
// on the difference to ATen's h). Host code only.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace robbench {

// The layer h = act(x W^T + b) (act: ReLU or identity) and its error bound (bounds.h part 8):
// eps(nx) = nx ea + eb >= 2 g_{k+1} (nx ||W||_F + ||b||) + sqrt(K) 1e-30 for any nx >= ||x||, and +inf where
// nx ||W||_F + ||b|| >= 2^127: an fp32 partial sum might overflow in one order and not in the other (Higham's
// bound assumes no overflow).
struct HiddenLayer {
  const float* wt = nullptr;  // (k, K) = W^T row-major (the plan's weights_t, contiguous)
  const float* b = nullptr;   // (K,)
  int64_t k = 0, K = 0, act = 0;
  double ea = 0, eb = 0;      // inflated 1e-6 (float64 norms); eps evaluates in float64: (1 + 1e-9) covers it
  double wf = 0, bn = 0;      // ||W||_F, ||b|| inflated 1e-6: the overflow test
  double eps(double nx) const {
    if (nx * wf + bn >= 0x1p127) return __builtin_inf();  // NaN nx: not taken, the NaN goes on
    return (nx * ea + eb) * (1 + 1e-9);
  }

  // Whether the layer can be fused: ReLU or identity (the bound of part 8 needs a 1-Lipschitz monotone act).
  static bool fusable(int64_t act);
  // wt (k, K), b (K,) contiguous fp32; they must outlive the object.
  static HiddenLayer make(const at::Tensor& wt, const at::Tensor& b, int64_t act);
};

// For the n rows x[rows[i]] (layer.k fp32 each, row stride layer.k):
//   out[i] (K,) = h'_i = act(fl(x W^T + b)) (fp32 sums of the k + 1 terms in any order, FMA or not),
//                 at out + i * K
//   s2[i]       = fp32 Σ_j h'_ij^2 (any order)
//   eps[i]      >= ||h_i - h'_i|| for the reference's h_i = act(ATen's fp32 addmm) (bounds.h part 8)
// ROBBENCH_NO_AVX512=1 (or no AVX-512) runs the portable loop (the same bound, other rounding).
void hidden_rows(const HiddenLayer& layer, const float* x, const int64_t* rows, int64_t n, float* out, float* s2,
                 double* eps);

}  // namespace robbench
