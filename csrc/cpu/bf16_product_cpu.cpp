// Bf16Product (common/bf16_product.h): the bf16 last layer's product with fp32 output through oneDNN's
// brgemm ukernel, its self-check, and two ops for tests and benchmarks:
//   robbench::bf16_product(Tensor hb, Tensor wt_bf16) -> Tensor          (n, P) fp32
//   robbench::bf16_product_self_check(int K, int P, int fault) -> float  Bf16Product::self_check_ratio
//   robbench::bf16_product_timing(Tensor hb, Tensor wt_bf16, int repeats) -> float[]
//
// cpublas::pack is unsupported without AMX (could_pack(kBFloat16) is false on AVX512-BF16 CPUs), but
// brgemm accepts a B packed by hand in the VNNI2 layout: for a column block of width w and row stride
// ld = w rounded up to 16, dst[(k/2) ld 2 + 2 j + (k & 1)] = Ŵ^T[k][j], zeros elsewhere (the pair partner
// of an odd K's last k, the columns beyond w). brgemm reads A with any row stride and handles an odd K
// itself (it reads no A element beyond column K - 1; tested).
#include "common/bf16_product.h"
#include "common/switches.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <vector>

namespace robbench {
namespace {

namespace cpublas = at::native::cpublas;

// A column block's row stride in B: its width rounded up to 16 (kCols is a multiple of 16), the strides
// AMX's brgemm accepts (16, 32, 48, 64); any stride works with AVX-512.
int64_t block_ld(int64_t w) { return (w + 15) / 16 * 16; }

// Ŵ^T (K, P) bf16 -> column blocks of width kCols, VNNI pairs; swap_pairs: a deliberately wrong layout.
at::Tensor pack_vnni(const at::Tensor& wt, bool swap_pairs) {
  const int64_t K = wt.size(0), P = wt.size(1), K2 = (K + 1) / 2;
  at::Tensor out = at::zeros({K2 * 2 * block_ld(P)}, wt.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t c0 = 0; c0 < P; c0 += Bf16Product::kCols) {
    const int64_t w = std::min(Bf16Product::kCols, P - c0), ld = block_ld(w);
    uint16_t* blk = dst + c0 * K2 * 2;
    for (int64_t k = 0; k < K; ++k) {
      uint16_t* pair_row = blk + (k / 2) * ld * 2 + ((k & 1) ^ int64_t{swap_pairs});
      for (int64_t j = 0; j < w; ++j) pair_row[j * 2] = src[k * P + c0 + j];
    }
  }
  return out;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// (rows, cols) bf16 of mixed signs, magnitudes 2^-20..2^21, some zeros; subnormal values (< 2^-126) at
// the K index k where k % period == phase and k < 256: with periods 31 and 37, at most 9 + 7 per dot
// product, each product below 2^-126 2^21 = 2^-105, so flushing them all stays below 16 2^-105 = 2^-101,
// within the bound's 2^-100.
at::Tensor adversarial(int64_t rows, int64_t cols, uint64_t seed, int64_t period, int64_t phase, bool k_is_col) {
  at::Tensor t = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* p = reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const uint64_t r = splitmix64(seed * 0x100000001B3ull + static_cast<uint64_t>(i * cols + j));
      const int64_t k = k_is_col ? j : i;
      const uint16_t sign = static_cast<uint16_t>((r & 1) << 15), mant = static_cast<uint16_t>((r >> 1) & 0x7F);
      uint16_t bits;
      if (k % period == phase && k < 256)
        bits = sign | static_cast<uint16_t>(mant | 1);  // exponent field 0: subnormal
      else if ((r >> 8) % 17 == 0)
        bits = sign;  // +-0
      else
        bits = sign | static_cast<uint16_t>((127 - 20 + static_cast<int64_t>((r >> 16) % 41)) << 7) | mant;
      p[i * cols + j] = bits;
    }
  return t;
}

// RNE to bf16 and back (self-check fault 2: what an at::mm with bf16 output would return).
float round_bf16(float x) { return static_cast<float>(c10::BFloat16(x)); }

}  // namespace

bool Bf16Product::switched_on() { return switch_on("ROBBENCH_BRGEMM"); }

std::shared_ptr<const Bf16Product> Bf16Product::make(const at::Tensor& wt_bf16, std::string* why) {
  TORCH_CHECK(wt_bf16.defined() && wt_bf16.device().is_cpu() && wt_bf16.scalar_type() == at::kBFloat16 &&
                  wt_bf16.dim() == 2 && wt_bf16.size(0) > 0 && wt_bf16.size(1) > 0,
              "wt_bf16 must be a non-empty (K, P) bfloat16 CPU tensor");
  auto fail = [&](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return std::shared_ptr<const Bf16Product>();
  };
  if (!usable_now()) return fail("oneDNN's brgemm is unusable here: torch.backends.mkldnn is disabled");
  const at::Tensor wt = wt_bf16.contiguous();
  auto prod = std::make_shared<Bf16Product>();
  prod->K = wt.size(0);
  prod->P = wt.size(1);
  try {
    const double ratio = self_check_ratio(prod->K, prod->P);
    if (!(ratio <= 1.0))
      return fail("oneDNN's brgemm failed the self-check (worst error " + std::to_string(ratio) + " x the bound)");
    prod->packed_ = pack_vnni(wt, false);
  } catch (const c10::Error& e) {
    return fail(std::string("oneDNN's brgemm is unusable here: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return fail(std::string("oneDNN's brgemm is unusable here: ") + e.what());
  }
  return prod;
}

void Bf16Product::run_tile(const uint16_t* hb, int64_t m, int64_t c0, float* s, int64_t ld_s) const {
  const int64_t w = std::min(kCols, P - c0), K2 = (K + 1) / 2;
  cpublas::brgemm(m, w, K, K, block_ld(w), ld_s, false, reinterpret_cast<const at::BFloat16*>(hb),
                  packed_.data_ptr<at::BFloat16>() + c0 * K2 * 2, s + c0, true);
}

// As ATen's and inductor's brgemm users do at the end of each thread's work: frees the AMX tile state
// where there is one (a no-op without AMX).
void Bf16Product::release() { cpublas::brgemm_release(true); }

void Bf16Product::run(const uint16_t* hb, int64_t n, float* s, int64_t ld_s) const {
  for (int64_t r0 = 0; r0 < n; r0 += kRows) {
    const int64_t m = std::min(kRows, n - r0);
    for (int64_t c0 = 0; c0 < P; c0 += kCols) run_tile(hb + r0 * K, m, c0, s + r0 * ld_s, ld_s);
  }
  release();
}

double Bf16Product::self_check_ratio(int64_t K, int64_t P, int64_t fault) {
  TORCH_CHECK(K > 0 && P > 0, "K and P must be positive, got ", K, ", ", P);
  TORCH_CHECK(fault >= 0 && fault <= 2, "fault must be 0, 1 or 2, got ", fault);
  const int64_t M = kRows + 5;  // a full row tile and a tail
  const at::Tensor h = adversarial(M, K, 1, 31, 5, true);
  const at::Tensor wt = adversarial(K, P, 2, 37, 3, false);
  Bf16Product prod;
  prod.K = K;
  prod.P = P;
  prod.packed_ = pack_vnni(wt, fault == 1);
  std::vector<float> s(M * P);
  prod.run(reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>()), M, s.data(), P);
  const at::Tensor hd = h.to(at::kDouble), wd = wt.to(at::kDouble);
  const at::Tensor ref = hd.mm(wd).contiguous(), mag = hd.abs().mm(wd.abs()).contiguous();
  const double* rp = ref.data_ptr<double>();
  const double* mp = mag.data_ptr<double>();
  // g_K for fp32, inflated; plus the float64 reference's own error (<= K 2^-53 Σ|.|, twice for safety)
  const double v = std::ldexp(1.0, -24), gK = K * v / (1 - K * v) * (1 + 1e-6) + 2 * K * std::ldexp(1.0, -53);
  double worst = 0;
  for (int64_t i = 0; i < M * P; ++i) {
    const double si = fault == 2 ? round_bf16(s[i]) : s[i];
    const double err = std::fabs(si - rp[i]), tol = gK * mp[i] + std::ldexp(1.0, -100);
    worst = std::max(worst, std::isnan(err) ? std::numeric_limits<double>::infinity() : err / tol);
  }
  return worst;
}

namespace {

std::shared_ptr<const Bf16Product> make_or_raise(const at::Tensor& hb, const at::Tensor& wt_bf16) {
  TORCH_CHECK(hb.device().is_cpu() && hb.scalar_type() == at::kBFloat16 && hb.dim() == 2,
              "hb must be an (n, K) bfloat16 CPU tensor, got ", hb.scalar_type(), " ", hb.sizes());
  TORCH_CHECK(wt_bf16.device().is_cpu() && wt_bf16.scalar_type() == at::kBFloat16 && wt_bf16.dim() == 2 &&
                  wt_bf16.size(0) == hb.size(1),
              "wt_bf16 must be a (K, P) bfloat16 CPU tensor with K = hb.size(1) = ", hb.size(1), ", got ",
              wt_bf16.scalar_type(), " ", wt_bf16.sizes());
  TORCH_CHECK(Bf16Product::switched_on(), "bf16_product: switched off (ROBBENCH_BRGEMM=0)");
  std::string why;
  auto prod = Bf16Product::make(wt_bf16, &why);
  TORCH_CHECK(prod != nullptr, "bf16_product: ", why);
  return prod;
}

// s = hb wt_bf16 in fp32 through Bf16Product, rows split over the threads in row tiles.
at::Tensor bf16_product_cpu(const at::Tensor& hb, const at::Tensor& wt_bf16) {
  auto prod = make_or_raise(hb, wt_bf16);
  const at::Tensor h = hb.contiguous();
  const int64_t n = h.size(0), K = prod->K, P = prod->P, tiles = (n + Bf16Product::kRows - 1) / Bf16Product::kRows;
  at::Tensor s = at::empty({n, P}, h.options().dtype(at::kFloat));
  const uint16_t* hp = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const int64_t r0 = t0 * Bf16Product::kRows, r1 = std::min(n, t1 * Bf16Product::kRows);
    prod->run(hp + r0 * K, r1 - r0, sp + r0 * P, P);
  });
  return s;
}

// Benchmarks: microseconds per product of the whole hb, [brgemm on the calling thread, at::mm_out with bf16
// output at torch's thread count (benchmarks use 1)], timed in alternating rounds of `repeats` products
// each after one warm-up product of each.
std::vector<double> bf16_product_timing_cpu(const at::Tensor& hb, const at::Tensor& wt_bf16, int64_t repeats) {
  TORCH_CHECK(repeats > 0, "repeats must be positive, got ", repeats);
  auto prod = make_or_raise(hb, wt_bf16);
  const at::Tensor h = hb.contiguous(), wt = wt_bf16.contiguous();
  const int64_t n = h.size(0), P = prod->P;
  at::Tensor s = at::empty({n, P}, h.options().dtype(at::kFloat)), sb = at::empty({n, P}, h.options());
  const uint16_t* hp = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  using clock = std::chrono::steady_clock;
  auto brg = [&] { prod->run(hp, n, s.data_ptr<float>(), P); };
  auto mm = [&] { at::mm_out(sb, h, wt); };
  brg();
  mm();
  double tb = 0, tm = 0;
  for (int round = 0; round < 2; ++round) {
    auto t0 = clock::now();
    for (int64_t r = 0; r < repeats; ++r) brg();
    auto t1 = clock::now();
    for (int64_t r = 0; r < repeats; ++r) mm();
    auto t2 = clock::now();
    tb += std::chrono::duration<double, std::micro>(t1 - t0).count();
    tm += std::chrono::duration<double, std::micro>(t2 - t1).count();
  }
  return {tb / (2 * repeats), tm / (2 * repeats)};
}

}  // namespace
}  // namespace robbench

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("bf16_product(Tensor hb, Tensor wt_bf16) -> Tensor");
  m.def("bf16_product_self_check(int K, int P, int fault=0) -> float", &robbench::Bf16Product::self_check_ratio);
  m.def("bf16_product_timing(Tensor hb, Tensor wt_bf16, int repeats) -> float[]",
        &robbench::bf16_product_timing_cpu);
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("bf16_product", &robbench::bf16_product_cpu); }
