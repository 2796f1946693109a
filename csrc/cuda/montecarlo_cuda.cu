// CUDA implementations of the robbench Monte Carlo ops (schemas live in csrc/cpu/montecarlo_cpu.cpp).
//
// Same semantics as the CPU ops: counter-based normals (common/rng.h, bit-exact with robbench/rng.py),
// the MLP decoder through ATen (cuBLAS) in fp32, and a fused distance / threshold / count epilogue
// kernel, in blocks of rows so memory is flat in S. Precision 1 (bf16 + recheck) and the screen are
// served by the fp32 path on the GPU for now (decisions are identical by definition; stats report no
// bf16 or screened samples). Arguments are checked with common/checks.h, like the CPU ops.
// Only core ATen headers are used (no c10/cuda), so this file also compiles against a CPU-only torch
// (CI compiles it with nvcc wherever nvcc exists); kernels are launched on the legacy default stream.
// NOTE: never run on a GPU during development (no GPU was available); see benchmarks/README.md.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "common/blocks.h"
#include "common/checks.h"
#include "common/decoder.h"
#include "common/rng.h"

namespace robbench {
namespace {

constexpr int kThreads = 256;

__global__ void latents_kernel(const float* __restrict__ mu, const float* __restrict__ sigma,
                               const int64_t* __restrict__ ka, const int64_t* __restrict__ kb, int64_t p0,
                               int64_t ns, int64_t first_sample, int64_t k, int64_t m, float* __restrict__ z) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= m) return;
  const int64_t b = p0 + r / ns;
  const uint32_t j = static_cast<uint32_t>(first_sample + r % ns);
  float* row = z + r * k;
  normals_row(static_cast<uint32_t>(ka[b]), static_cast<uint32_t>(kb[b]), j, k, row);
  for (int64_t i = 0; i < k; ++i) {
    const float scaled = __fmul_rn(row[i], sigma[b * k + i]);  // no FMA: round like the CPU path
    row[i] = __fadd_rn(scaled, mu[b * k + i]);
  }
}

__global__ void normals_kernel(const int64_t* ka, const int64_t* kb, const int64_t* j, int64_t n, int64_t k,
                               float* out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r < n)
    normals_row(static_cast<uint32_t>(ka[r]), static_cast<uint32_t>(kb[r]), static_cast<uint32_t>(j[r]), k,
                out + r * k);
}

// One warp per row: squared distance of y[r, :D] (row stride P) to center[point(r)].
__global__ void sq_distance_kernel(const float* __restrict__ y, int64_t P, const float* __restrict__ center,
                                   int64_t D, int64_t p0, int64_t ns, int64_t m, float* __restrict__ d2) {
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= m) return;
  const int64_t b = p0 + warp / ns;
  float acc = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float diff = __fsub_rn(y[warp * P + d], center[b * D + d]);
    acc = __fadd_rn(acc, __fmul_rn(diff, diff));
  }
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) d2[warp] = acc;
}

__global__ void threshold_count_kernel(const float* __restrict__ d2, const float* __restrict__ r2, int64_t p0,
                                       int64_t ns, int64_t m, unsigned long long* __restrict__ counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= m) return;
  const int64_t b = p0 + r / ns;
  if (d2[r] <= r2[b]) atomicAdd(counts + b, 1ull);
}

inline unsigned blocks_for(int64_t n, int64_t per = kThreads) {
  return static_cast<unsigned>((n + per - 1) / per);
}


// Block rows' squared distances (m,) in fp32 on the device.
at::Tensor block_sq(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& center, const at::Tensor& ka,
                    const at::Tensor& kb, const Block& blk, int64_t offset, at::TensorList wts, at::TensorList bs,
                    at::IntArrayRef acts) {
  const int64_t k = mu.size(1), ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns, D = center.size(1);
  ROBBENCH_ASSERT_CONTIGUOUS(mu);
  ROBBENCH_ASSERT_CONTIGUOUS(sigma);
  ROBBENCH_ASSERT_CONTIGUOUS(center);
  at::Tensor z = at::zeros({std::max(m, kMinGemmRows), k}, mu.options());
  latents_kernel<<<blocks_for(m), kThreads>>>(mu.data_ptr<float>(), sigma.data_ptr<float>(),
                                               ka.data_ptr<int64_t>(), kb.data_ptr<int64_t>(), blk.p0, ns,
                                               offset + blk.s0, k, m, z.data_ptr<float>());
  at::Tensor h = z;
  for (size_t l = 0; l < wts.size(); ++l) {
    h = at::addmm(bs[l], h, wts[l]);
    if (acts[l] == kActRelu) h.relu_();
    else if (acts[l] == kActSigmoid) h.sigmoid_();
  }
  TORCH_INTERNAL_ASSERT(h.is_contiguous() && h.size(1) >= D, "decoded block must be contiguous with >= D columns");
  at::Tensor d2 = at::empty({m}, mu.options());
  sq_distance_kernel<<<blocks_for(m * 32), kThreads>>>(h.data_ptr<float>(), h.size(1), center.data_ptr<float>(),
                                                        D, blk.p0, ns, m, d2.data_ptr<float>());
  return d2;
}

}  // namespace

at::Tensor normals_cuda(const at::Tensor& ka, const at::Tensor& kb, const at::Tensor& j, int64_t k) {
  TORCH_CHECK(ka.defined() && ka.is_cuda(), "ka must be a CUDA tensor");
  check_tensor(ka, "ka", at::kLong, ka.device(), 1);
  check_tensor(kb, "kb", at::kLong, ka.device(), 1);
  check_tensor(j, "j", at::kLong, ka.device(), 1);
  TORCH_CHECK(kb.sizes() == ka.sizes() && j.sizes() == ka.sizes(), "kb and j must match ka's shape ", ka.sizes());
  TORCH_CHECK(k >= 1, "k must be positive, got ", k);
  at::Tensor kac = ka.contiguous(), kbc = kb.contiguous(), jc = j.contiguous();
  at::Tensor out = at::empty({ka.size(0), k}, ka.options().dtype(at::kFloat));
  normals_kernel<<<blocks_for(ka.size(0)), kThreads>>>(kac.data_ptr<int64_t>(), kbc.data_ptr<int64_t>(),
                                                       jc.data_ptr<int64_t>(), ka.size(0), k,
                                                       out.data_ptr<float>());
  return out;
}

at::Tensor mlp_sq_distances_cuda(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& center,
                                 const at::Tensor& ka, const at::Tensor& kb, int64_t n, int64_t offset,
                                 at::TensorList weights_t, at::TensorList biases, at::IntArrayRef acts,
                                 int64_t chunk_rows) {
  check_sampling_inputs(mu, sigma, center, ka, kb, at::kCUDA);
  check_mlp(weights_t, biases, acts, mu.size(1), center.size(1), mu.device());
  check_samples(n, offset, chunk_rows);
  at::Tensor out = at::empty({mu.size(0), n}, mu.options());
  const at::Tensor muc = mu.contiguous(), sc = sigma.contiguous(), cc = center.contiguous();
  const at::Tensor kac = ka.contiguous(), kbc = kb.contiguous();
  for (const Block& blk : make_blocks(mu.size(0), n, chunk_rows, kMinGemmRows)) {
    at::Tensor d2 = block_sq(muc, sc, cc, kac, kbc, blk, offset, weights_t, biases, acts);
    out.slice(0, blk.p0, blk.p1).slice(1, blk.s0, blk.s1).copy_(d2.view({blk.p1 - blk.p0, blk.s1 - blk.s0}));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> mlp_count_cuda(const at::Tensor& mu, const at::Tensor& sigma,
                                                  const at::Tensor& center, const at::Tensor& r2,
                                                  const at::Tensor& ka, const at::Tensor& kb, int64_t n,
                                                  int64_t offset, at::TensorList weights_t, at::TensorList biases,
                                                  at::IntArrayRef acts, int64_t precision, bool screen,
                                                  int64_t chunk_rows) {
  check_sampling_inputs(mu, sigma, center, ka, kb, at::kCUDA);
  check_r2(r2, mu.size(0), mu.device());
  check_mlp(weights_t, biases, acts, mu.size(1), center.size(1), mu.device());
  check_precision(precision);
  check_samples(n, offset, chunk_rows);
  // bf16 and the Lipschitz screen only skip work on the CPU; the GPU path always computes the fp32 last
  // layer, which gives the reference's decisions by definition.
  (void)screen;
  const int64_t B = mu.size(0);
  at::Tensor counts = at::zeros({B}, mu.options().dtype(at::kLong));
  at::Tensor r2c = r2.contiguous();
  const at::Tensor muc = mu.contiguous(), sc = sigma.contiguous(), cc = center.contiguous();
  const at::Tensor kac = ka.contiguous(), kbc = kb.contiguous();
  for (const Block& blk : make_blocks(B, n, chunk_rows, kMinGemmRows)) {
    const int64_t ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns;
    at::Tensor d2 = block_sq(muc, sc, cc, kac, kbc, blk, offset, weights_t, biases, acts);
    threshold_count_kernel<<<blocks_for(m), kThreads>>>(
        d2.data_ptr<float>(), r2c.data_ptr<float>(), blk.p0, ns, m,
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  }
  return {counts, at::zeros({6}, counts.options())};  // the CPU op's stats (rechecked, ..., early exit): none here
}

at::Tensor count_le_cuda(const at::Tensor& y_, const at::Tensor& center_, const at::Tensor& r2_) {
  TORCH_CHECK(y_.defined() && y_.is_cuda(), "y must be a CUDA tensor");
  check_tensor(y_, "y", at::kFloat, y_.device(), 3);
  check_tensor(center_, "center", at::kFloat, y_.device(), 2);
  TORCH_CHECK(center_.size(0) == y_.size(0) && center_.size(1) == y_.size(2), "center must be (B, D) matching y ",
              y_.sizes());
  check_r2(r2_, y_.size(0), y_.device());
  at::Tensor y = y_.contiguous(), center = center_.contiguous(), r2 = r2_.contiguous();
  ROBBENCH_ASSERT_CONTIGUOUS(y);
  const int64_t B = y.size(0), S = y.size(1), D = y.size(2), m = B * S;
  at::Tensor d2 = at::empty({m}, y.options());
  sq_distance_kernel<<<blocks_for(m * 32), kThreads>>>(y.data_ptr<float>(), D, center.data_ptr<float>(), D, 0, S,
                                                        m, d2.data_ptr<float>());
  at::Tensor counts = at::zeros({B}, y.options().dtype(at::kLong));
  threshold_count_kernel<<<blocks_for(m), kThreads>>>(d2.data_ptr<float>(), r2.data_ptr<float>(), 0, S, m,
                                                      reinterpret_cast<unsigned long long*>(
                                                          counts.data_ptr<int64_t>()));
  return counts;
}

TORCH_LIBRARY_IMPL(robbench, CUDA, m) {
  m.impl("normals", &normals_cuda);
  m.impl("mlp_sq_distances", &mlp_sq_distances_cuda);
  m.impl("mlp_count", &mlp_count_cuda);
  m.impl("count_le", &count_le_cuda);
}

}  // namespace robbench
