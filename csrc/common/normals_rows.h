// The RNG's standard normals (rng.h) for many rows at once: the same numbers, bit for bit, as normals_row
// for each row. Host code only.
#pragma once
#include <cstdint>

namespace robbench {

// out[r * k + i] = eta_i of normals_row(ka[r], kb[r], j[r], k, .) for r < n (out: (n, k) fp32).
void normals_rows(const uint32_t* ka, const uint32_t* kb, const uint32_t* j, int64_t n, int64_t k, float* out);

}  // namespace robbench
