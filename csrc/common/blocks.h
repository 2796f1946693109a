// How a (points x samples) workload is cut into blocks of about `rows` decoded rows: the same plan as
// robbench/decoding.py's blocks, so every backend decodes the same rows together (GEMM results can
// depend on the block shape; the plan keeps them bit-identical). Host code only.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace robbench {

struct Block {
  int64_t p0, p1, s0, s1;  // points [p0, p1) x samples [s0, s1)
};

inline std::vector<Block> make_blocks(int64_t B, int64_t n, int64_t rows, int64_t min_rows) {
  rows = std::max(rows, min_rows);
  int64_t c = (B * n > rows) ? rows / std::max<int64_t>(1, B) : n;
  c = std::max<int64_t>(1, std::min(n, c));
  const int64_t nb = std::max<int64_t>(1, std::min(B, rows / c));
  std::vector<Block> out;
  for (int64_t p0 = 0; p0 < B; p0 += nb)
    for (int64_t s0 = 0; s0 < n; s0 += c) out.push_back({p0, std::min(B, p0 + nb), s0, std::min(n, s0 + c)});
  return out;
}

}  // namespace robbench
