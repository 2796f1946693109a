// The per-row preparation of the bf16 last layer (montecarlo_cpu.cpp, bounds.h parts 2 and 3) in one pass
// over each gathered hidden row, instead of an ATen gather, an ATen bf16 copy, a norms loop, a δh loop and
// an MKL GEMM with N = k (<= 16) columns. Host code only.
#pragma once
#include <cstdint>

namespace robbench {

// For the n rows h[rows[i]] (K fp32 each) of h:
//   hq[i] (K,)  = h[rows[i]]                                   (the exact rows, for the refinement)
//   hb[i] (K,)  = ĥ = bf16 bits of h rounded to nearest even  (ATen's rounding; NaN -> 0xFFFF as its vector loops),
//                 then subnormal values (exponent field 0) and -0 set to +0 (the product reads subnormals as 0:
//                 bounds.h part 2)
//   sb[i], sd[i] = fp32 sums (any order) of ĥ_k^2 and of δh_k^2, δh = h - ĥ (exact in fp32)
//   pv[i] (nk,) = fp32 δh V (any order, FMA or not); Vt = V^T as (16, K) row-major, rows l >= nk zero,
//                 nk <= 16
// Any summation order is what bounds.h assumes for these sums (norm_up, norm_w_dh), so the AVX-512 loop
// and the portable loop may differ in the last bits of sb, sd, pv; both are rigorous.
void prepare_bf16_rows(const float* h, const int64_t* rows, int64_t n, int64_t K, const float* Vt, int64_t nk,
                       float* hq, uint16_t* hb, float* sb, float* sd, float* pv);

}  // namespace robbench
