// The bf16 last layer's product with fp32 output: s = ĥ Ŵ^T through oneDNN's brgemm ukernel
// (at::native::cpublas::brgemm), exact bf16 products accumulated in fp32, no bf16 rounding of s.
//
// What bounds.h assumes of this product: every s_j within g_K Σ_k |Ŵ_jk ĥ_k| + 2^-100 of the exact
// Σ_k Ŵ_jk ĥ_k (products exact, fp32 accumulation in any order and association, subnormals possibly
// flushed: <= 2^-100 absolute in total). make() checks exactly that on an adversarial product of the
// layer's shape before it hands out a product, and hands out none when brgemm is unusable here.
//
// brgemm's behaviour that callers rely on (ATen/native/CPUBlas.cpp): its kernels are JIT-compiled per
// thread and per shape (rows, columns, K, strides) on first use and kept in a thread_local cache for the
// life of the thread (about 0.05-0.1 ms each here); run() stays within 2 column widths and kRows row
// counts per layer, so a thread compiles at most 2 kRows kernels per layer shape. A call from a thread
// only touches that thread's cache, so run() may be called concurrently on disjoint outputs.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>

namespace robbench {

class Bf16Product {
 public:
  // Rows per brgemm call and column block width: chosen by measurement at 1 thread, K = 256, P = 784
  // (benchmarks/README.md, session 6): 64 x 64 was at or within 2 % of the best of the shapes tried
  // for 33..256 rows; the (64, K) row tile (32 KiB) and the (K, 64) block (32 KiB) stay in L1/L2.
  static constexpr int64_t kRows = 64;
  static constexpr int64_t kCols = 64;

  // wt_bf16: (K, P) bf16 = Ŵ^T (CPU, any strides). nullptr when brgemm throws (no oneDNN ukernel, CPU
  // without AVX-512, mkldnn disabled) or when the self-check fails; `why` (if given) then says which.
  // Callers keep the product with the layer and check switched_on() and usable_now() per call.
  static std::shared_ptr<const Bf16Product> make(const at::Tensor& wt_bf16, std::string* why = nullptr);

  // False when ROBBENCH_BRGEMM=0 (A/B switch, read per call): the callers then use at::mm's bf16 output.
  static bool switched_on();

  // False while torch.backends.mkldnn is disabled: brgemm then throws (ATen checks the flag on every call),
  // so a caller holding a product from earlier checks this before run() and falls back to at::mm.
  static bool usable_now() { return at::globalContext().userEnabledMkldnn(); }

  // s (n, ld_s) fp32 = ĥ Ŵ^T for hb (n, K) bf16 bits with row stride K; ld_s >= P. Single-threaded;
  // call it from inside a parallel region, each thread on its own rows and output.
  void run(const uint16_t* hb, int64_t n, float* s, int64_t ld_s) const;

  // One tile of run(), for callers that work on each tile while it is in L1 (bounds.h, part 7): columns
  // c0 .. c0 + min(kCols, P - c0) - 1 (c0 a multiple of kCols) of s (m, ld_s) for hb (m, K), m <= kRows;
  // s points at the row block's column 0. The same brgemm calls as run(), so the same guarantee; a caller
  // ends its thread's work with release().
  void run_tile(const uint16_t* hb, int64_t m, int64_t c0, float* s, int64_t ld_s) const;
  static void release();

  // Self-check, also for tests: the worst |s - ref| / tol over an adversarial (kRows + 5, K) x (K, P)
  // product (mixed signs, magnitudes 2^-20..2^20, some subnormal bf16 values) against float64, with
  // tol = g_K Σ|Ŵ_jk ĥ_k| + 2^-100 plus the float64 reference's own error; <= 1 passes. fault (tests
  // only: the check must be able to fail): 0 none, 1 the packing's k pairs swapped, 2 s rounded to bf16.
  static double self_check_ratio(int64_t K, int64_t P, int64_t fault = 0);

  int64_t K = 0, P = 0;

 private:
  at::Tensor packed_;  // column blocks of width kCols (the last narrower): ((K+1)/2, ld, 2) VNNI pairs each
};

}  // namespace robbench
