// The decoder plan's constants, shared by the CPU and CUDA ops and mirrored in robbench/decoding.py
// (tests/test_decoding.py checks that both sides agree).
#pragma once
#include <cstdint>

namespace robbench {

// Activation applied after a linear layer (MLPPlan.acts): ACT_NONE, ACT_RELU, ACT_SIGMOID.
enum Act : int64_t { kActNone = 0, kActRelu = 1, kActSigmoid = 2 };
constexpr int64_t kActMax = kActSigmoid;

// Every GEMM sees at least this many rows (short blocks are zero-padded): MKL's small-M kernels sum in
// another order, which would make a sample's fp32 value depend on its block. (MIN_GEMM_ROWS)
constexpr int64_t kMinGemmRows = 64;

// Layer widths are zero-padded to multiples of this. (PAD)
constexpr int64_t kPad = 32;

// The last-layer precisions of mlp_count's `precision` argument (kernels.PRECISIONS).
enum Precision : int64_t { kFp32 = 0, kBf16 = 1 };

}  // namespace robbench
