// Argument checks shared by the CPU and CUDA ops.
//
// TORCH_CHECK: what a caller can get wrong (shape, dtype, device of every tensor argument, scalar
// ranges); each message names the argument. TORCH_INTERNAL_ASSERT: what the op itself guarantees
// (contiguity after .contiguous(), before raw pointers are taken).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "common/decoder.h"

namespace robbench {

// A tensor argument on `device` with dtype `dtype` and `dim` dimensions (dim < 0: any).
inline void check_tensor(const at::Tensor& t, const std::string& name, at::ScalarType dtype, const at::Device& device,
                         int64_t dim = -1) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (like mu), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(dim < 0 || t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

// The sampling inputs: mu, sigma (B, k) float32; center (B, D) float32; ka, kb (B,) int64, all on
// mu's device, which must be of `device_type` (kCPU for the CPU ops, kCUDA for the CUDA ones).
inline void check_sampling_inputs(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& center,
                                  const at::Tensor& ka, const at::Tensor& kb, at::DeviceType device_type) {
  TORCH_CHECK(mu.defined() && mu.device().type() == device_type, "mu must be a ", device_type, " tensor");
  const at::Device dev = mu.device();
  check_tensor(mu, "mu", at::kFloat, dev, 2);
  check_tensor(sigma, "sigma", at::kFloat, dev, 2);
  TORCH_CHECK(sigma.sizes() == mu.sizes(), "sigma must have mu's shape ", mu.sizes(), ", got ", sigma.sizes());
  check_tensor(center, "center", at::kFloat, dev, 2);
  TORCH_CHECK(center.size(0) == mu.size(0), "center must be (B, D) with B = ", mu.size(0));
  check_tensor(ka, "ka", at::kLong, dev, 1);
  check_tensor(kb, "kb", at::kLong, dev, 1);
  TORCH_CHECK(ka.size(0) == mu.size(0) && kb.size(0) == mu.size(0), "ka and kb must be (B,) with B = ", mu.size(0));
}

// r2: (B,) float32 squared radii on `dev`.
inline void check_r2(const at::Tensor& r2, int64_t B, const at::Device& dev) {
  check_tensor(r2, "r2", at::kFloat, dev, 1);
  TORCH_CHECK(r2.size(0) == B, "r2 must be (B,) with B = ", B, ", got ", r2.sizes());
}

// Sample indices offset .. offset + n - 1 must fit the RNG's 32-bit counter; blocks need rows.
inline void check_samples(int64_t n, int64_t offset, int64_t chunk_rows) {
  TORCH_CHECK(n >= 0 && offset >= 0 && offset + n <= (int64_t(1) << 32),
              "n and offset: sample indices must lie in [0, 2^32), got offset ", offset, ", n ", n);
  TORCH_CHECK(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
}

// The MLP plan: weights_t[l] (in, out_pad) float32 with out_pad % kPad == 0, biases[l] (out_pad,),
// acts[l] an Act code; the first layer takes k inputs, the last has at least D outputs.
inline void check_mlp(at::TensorList wts, at::TensorList bs, at::IntArrayRef acts, int64_t k, int64_t D,
                      const at::Device& dev) {
  TORCH_CHECK(!wts.empty() && wts.size() == bs.size() && wts.size() == acts.size(),
              "weights_t, biases and acts must have one entry per layer");
  int64_t in = k;
  for (size_t l = 0; l < wts.size(); ++l) {
    check_tensor(wts[l], "weights_t[" + std::to_string(l) + "]", at::kFloat, dev, 2);
    check_tensor(bs[l], "biases[" + std::to_string(l) + "]", at::kFloat, dev, 1);
    TORCH_CHECK(wts[l].size(0) == in, "weights_t[", l, "] must be (", in, ", out), got ", wts[l].sizes());
    TORCH_CHECK(wts[l].size(1) % kPad == 0, "weights_t[", l, "] width must be padded to a multiple of ", kPad);
    TORCH_CHECK(bs[l].size(0) == wts[l].size(1), "biases[", l, "] must be (", wts[l].size(1), ",)");
    TORCH_CHECK(acts[l] >= 0 && acts[l] <= kActMax, "acts[", l, "] must be 0 (none), 1 (relu) or 2 (sigmoid)");
    in = wts[l].size(1);
  }
  TORCH_CHECK(in >= D, "the last layer has fewer outputs (", in, ") than center has features (", D, ")");
}

inline void check_precision(int64_t precision) {
  TORCH_CHECK(precision == kFp32 || precision == kBf16, "precision must be 0 (fp32) or 1 (bf16), got ",
              precision);
}

// Before raw pointers: the op made `t` contiguous itself.
#define ROBBENCH_ASSERT_CONTIGUOUS(t) TORCH_INTERNAL_ASSERT((t).is_contiguous(), #t " must be contiguous here")

}  // namespace robbench
