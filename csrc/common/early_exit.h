// Per-sample early exit of the last layer: exact fp32 columns in blocks, ordered per point so that the
// partial squared distance grows fast, and a rigorous bound on the columns not yet computed. Host code.
//
// Setting (as in bounds.h). The hidden vector h (K,) of a sample is bit-identical to the reference's.
// The reference computes ã = fl(W h + b) (its own GEMM), y_j = act~(ã_j) and F = fl(Σ_j fl(fl(y_j - c_j)^2))
// and decides "inside" iff F <= r2. Notation: v = 2^-24, g_n = n v / (1 - n v), λ = Lipschitz constant of
// act (1/4 for sigmoid, 1 for ReLU / identity), ev = evaluation error of act~ (16 v for sigmoid, 0 else).
// F lies in [(1 - q) S, (1 + q) S] with S = Σ_j (y_j - c_j)^2 and q = g_{D+2} + 4 v (the D squares
// and D - 1 additions of nonnegative terms, any order; 4 v spare for the rounded differences).
//
// Head (computed columns j in H). The kernel computes a'_j = W_j h + b_j for a block of output columns with
// its own fp32 GEMM call (another order and grouping than the reference's, FMA or not) and y'_j = act~(a'_j).
// Both a'_j and ã_j are within g_{K+1} (|W_j||h| + |b_j|) <= g_{K+1} (||W_j|| ||h|| + |b_j|) of a_j (Higham
// Lemma 3.1, Cauchy-Schwarz), so |y'_j - y_j| <= e_j = 2 λ g_{K+1} (||W_j|| ||h|| + |b_j|) + 2 ev and, by
// the triangle inequality in R^|H|, with P = Σ_{j in H} (y'_j - c_j)^2 (float64, exact differences, relative
// error < 1e-12 for D < 10^3):
//     (sqrt(P) - E)_+^2 <= Σ_{j in H} (y_j - c_j)^2 <= (sqrt(P) + E)^2,
//     E = ||e|| <= 2 λ g_{K+1} (||(||W_j||)_j|| ||h|| + ||b||) + 2 ev sqrt(D)   (one scalar per sample).
// Tail (columns j not in H). With h_c the reference hidden vector of the point's latent mean and
// δ >= ||h - h_c||, a_j = a_cj + W_j (h - h_c) with a_cj = W_j h_c + b_j (float64, error <= ε_j =
// g'_{K+2} (||W_j|| ||h_c|| + |b_j|), g' for 2^-53), so |W_j (h - h_c)| <= ||W_j|| δ and the reference's
//     ã_j in [a_cj - ρ_j, a_cj + ρ_j],   ρ_j(δ) = ||W_j|| δ + g_{K+1} (||W_j|| (||h_c|| + δ) + |b_j|) + ε_j
// (||h|| <= ||h_c|| + δ). act is monotone, so y_j in [act(a_cj - ρ_j) - ev, act(a_cj + ρ_j) + ev] and
//     (y_j - c_j)^2 <= t_j(δ) = max((hi_j - c_j)^2, (c_j - lo_j)^2)   (float64, inflated by 1e-12),
// nondecreasing in δ. The tail bound T(δ) = Σ_{j not in H} t_j(δ) is tabulated per point on a geometric
// grid δ_g = s 2^{g/16} (s = ||h_c|| + 1e-6) and looked up at the smallest grid point >= δ (an upper bound
// because T is nondecreasing).
// Decisions after each column block (exact for the reference's F, as F in [(1 - q) S - A, (1 + q) S + A],
// A = D 2^-149 for its squares that underflow, see LastLayerBound::classify):
//     outside  when (1 - q) (sqrt(P) (1 - 1e-12) - E)_+^2 (1 - 1e-12) - A > r2;
//     inside   when (1 + q) ((sqrt(P) (1 + 1e-12) + E)^2 + T) (1 + 1e-12) + A < r2;
// samples undecided after the last block (all columns computed, T = 0) get the reference's own fp32 last
// layer (the caller's fp32_final_count).
// Norms of h and h - h_c are fp32 sums of K squares (any order): bounded by sq_norm_up (bounds.h).
// Order: columns by decreasing t_j(δ_typ) (δ_typ = the median δ of the point's first rows), so that both
// the partial sum and the tail bound move fast; padded columns (>= D) are never computed.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <vector>

#include "common/blocks.h"

namespace robbench {

class EarlyExit {
 public:
  // wt: (K, P) fp32 last-layer weights (transposed, as the op receives them); b: (P,); hc: (B, K) the
  // reference hidden vectors of the points' latent means; center (B, D); widths: columns of the successive
  // column blocks (the last width repeats until D columns are covered).
  EarlyExit(const at::Tensor& wt, const at::Tensor& b, int64_t act, const at::Tensor& hc,
            const at::Tensor& center, const std::vector<int64_t>& widths);

  // Decide the block-relative rows idx (ascending) of a block's hidden matrix h (rows point-major, ns
  // samples per point); adds "inside" decisions to counts (B,), returns the rows left undecided.
  // columns_done (optional) accumulates the number of last-layer columns computed.
  std::vector<int64_t> run(const at::Tensor& h, const std::vector<int64_t>& idx, const Block& blk,
                           const float* r2, int64_t* counts, int64_t* columns_done);

 private:
  struct Point {
    bool ready = false;
    double hcn = 0;                        // ||h_c|| (upper bound)
    std::vector<double> ac, eps;           // (D,) a_cj in float64, its error bound ε_j
    std::vector<at::Tensor> w, b;          // per column block: (K, w) contiguous weights, (w,) biases
    std::vector<double> c;                 // (D,) the center in block order
    std::map<int, std::vector<double>> tails;  // grid index -> T after each block (nc,)
    std::vector<int64_t> order;            // column order
    at::Tensor rw_ord, bb_ord, ac_t, eps_t, c_t;  // float64 (D,) in block order, for the tail tables
  };
  void prepare(int64_t p, double delta_typ);
  const std::vector<double>& tail(int64_t p, int g);
  double tb(const Point& pt, int64_t j, double delta) const;
  int grid_index(double s, double delta) const;

  at::Tensor wt_, b_, hc_, center_, wd_, bd_;  // wd_, bd_: float64 W (D, K) and b (D,), made on first use
  int64_t K_, D_, act_, nc_;
  std::vector<int64_t> start_;       // (nc + 1,) first column of each block, then D
  at::Tensor out_buf_, h_buf_[2];    // reused workspaces (fresh large allocations page-fault every time)
  double lip_, ev_, gK1_, gc_, q_, E_w_, E_0_;
  std::vector<double> rowW_, babs_;  // (D,) ||W_j|| (inflated), |b_j|
  std::vector<Point> pts_;
};

}  // namespace robbench
