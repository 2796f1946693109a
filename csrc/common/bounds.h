// Rigorous per-sample bound on |d_bf16 - d_fp32| for an MLP decoder, and the decision it allows.
//
// Notation (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 2-3): u = 2^-8 is the unit
// roundoff of bf16, v = 2^-24 that of fp32, g_n = n v / (1 - n v). Exact arithmetic with the fp32
// weights W_l, b_l defines h_l (h_0 = z, identical in both paths). Per layer with K inputs:
//   bf16 path  ã = Σ_k Ŵ_jk ĥ_k + b̂_j accumulated in fp32, Ŵ = W(1+ε), b̂ = b(1+ε), |ε| <= u, and
//              ĥ = h̃(1+ε'), |ε'| <= u2 = 2u + u^2 (rounding of the previous fp32 value to bf16,
//              counted twice in case a library rounds before and after adding the bias).
//   => ||ã - a||_2 <= ||W||_2 E + (c + g(1+c)) |||W|||_2 ||h̃|| + (u + g(1+u)) ||b||,
//      c = (1+u)(1+u2) - 1, g = g_{K+1}, E = ||h̃ - h||, ||h̃|| <= ||ĥ|| / (1 - u2).
//   fp32 path  ||â - a|| <= ||W||_2 F + g |||W|||_2 ||h_f|| + g ||b||, ||h_f|| <= ||h̃|| + E + F.
//   ReLU is 1-Lipschitz, sigmoid 1/4-Lipschitz (+ its evaluation error <= 4v per element, <= 4v sqrt(n)).
//   Last layer, per output j (Cauchy-Schwarz on row j): |ã_j - a_j| <= ||W_j|| (E + (c+g(1+c))||h̃||)
//      + (u + g(1+u)) |b_j| + u/(1-u) |ã_j| (bf16 output rounding); |â_j - a_j| <= ||W_j|| (F + g||h_f||)
//      + g |b_j|. With Δ_j their sum, |ỹ_j - ŷ_j| <= Δ_j max_{|t - ã_j| <= Δ_j} σ'(t) + 8v(|ỹ_j| + Δ_j),
//      where σ'(t) <= min(1/4, e^{-|t|}) and e^{-|t|} <= e^Δ m/(1-m), m = min(ỹ, 1-ỹ) (so no exp is needed).
//   Distances: the reference d_f^2 = fl(Σ (ŷ - c)^2) lies within a factor 1 ± q, q = g_{D+2}, of
//      ||ŷ - c||^2, and | ||ŷ - c|| - ||ỹ - c|| | <= E_y = ||ỹ - ŷ||_2.
// So the fp32 comparison d_f^2 <= r^2 is certainly true when (1+q)(||ỹ-c|| + E_y)^2 < r^2 and certainly
// false when (1-q)(||ỹ-c|| - E_y)_+^2 > r^2; otherwise the sample is recomputed in fp32.
// Float evaluation of the bound itself (<= ~10 roundings per term, sums of <= D terms) is covered by
// inflating E_y by 1e-3 relative and the norms' sums by q.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace robbench {

struct LayerConst {
  double spectral = 0;  // upper bound on ||W||_2
  double abs_norm = 0;  // upper bound on || |W| ||_2
  double bias_norm = 0;
  double g = 0;         // g_{K+1}
  double lipschitz = 1;
  double act_eval = 0;  // activation evaluation error bound (l2)
};

struct BoundModel {
  static constexpr double u = 1.0 / 256.0;
  static constexpr double u2 = 2.0 * u + u * u;
  static constexpr double v = 1.0 / 16777216.0;
  std::vector<LayerConst> layers;  // all but the last
  LayerConst last;
  std::vector<float> row_norm;     // ||W_j|| of the last layer, (D,)
  std::vector<float> bias_abs;     // |b_j| of the last layer, (D,)
  int64_t last_act = 0;
  int64_t D = 0;
  double q = 0;

  static double gamma(double n) { return n * v / (1.0 - n * v); }

  static LayerConst layer_const(const at::Tensor& wt, const at::Tensor& b, int64_t act) {
    at::Tensor w = wt.to(at::kDouble).t();  // (out, in)
    LayerConst c;
    // LAPACK's SVD in float64 is accurate to ~1e-15 relative; 1e-6 covers it many times over.
    c.spectral = at::linalg_matrix_norm(w, 2).item<double>() * (1 + 1e-6) + 1e-300;
    const double fro = at::linalg_matrix_norm(w, "fro").item<double>();
    const double l1 = w.abs().sum(0).max().item<double>(), linf = w.abs().sum(1).max().item<double>();
    c.abs_norm = std::min(fro, std::sqrt(l1 * linf)) * (1 + 1e-6);
    c.bias_norm = b.to(at::kDouble).norm().item<double>() * (1 + 1e-6);
    c.g = gamma(static_cast<double>(w.size(1) + 1));
    c.lipschitz = act == 2 ? 0.25 : 1.0;
    c.act_eval = act == 2 ? 4 * v * std::sqrt(static_cast<double>(w.size(0))) : 0.0;
    return c;
  }

  static BoundModel from_weights(const std::vector<at::Tensor>& wts, const std::vector<at::Tensor>& bs,
                                 const std::vector<int64_t>& acts, int64_t D) {
    BoundModel m;
    for (size_t l = 0; l + 1 < wts.size(); ++l) m.layers.push_back(layer_const(wts[l], bs[l], acts[l]));
    m.last = layer_const(wts.back(), bs.back(), acts.back());
    at::Tensor wl = wts.back().to(at::kDouble).t().narrow(0, 0, D);  // (D, in)
    at::Tensor rn = (wl.norm(2, {1}) * (1 + 1e-6)).to(at::kFloat).contiguous();
    at::Tensor ba = bs.back().narrow(0, 0, D).abs().contiguous();
    m.row_norm.assign(rn.data_ptr<float>(), rn.data_ptr<float>() + D);
    m.bias_abs.assign(ba.data_ptr<float>(), ba.data_ptr<float>() + D);
    m.last_act = acts.back();
    m.D = D;
    m.q = gamma(static_cast<double>(D + 2));
    return m;
  }

  // Propagate (E, F) through the hidden layers; norms[l] = ||ĥ_l|| (input of layer l, l = 0..L-1).
  // Returns {E, F, H} at the input of the last layer.
  void propagate(const double* norms, double* E_out, double* F_out, double* H_out) const {
    const double c = (1 + u) * (1 + u2) - 1;
    double E = 0, F = 0;
    for (size_t l = 0; l < layers.size(); ++l) {
      const LayerConst& L = layers[l];
      const double H = norms[l] / (1 - u2);
      const double Hf = H + E + F;
      const double eb = L.spectral * E + (c + L.g * (1 + c)) * L.abs_norm * H + (u + L.g * (1 + u)) * L.bias_norm;
      const double ef = L.spectral * F + L.g * L.abs_norm * Hf + L.g * L.bias_norm;
      E = L.lipschitz * eb + L.act_eval;
      F = L.lipschitz * ef + L.act_eval;
    }
    *E_out = E;
    *F_out = F;
    *H_out = norms[layers.size()] / (1 - u2);
  }

  // One sample: a = last-layer bf16 pre-activations (P >= D), y = act(a) in fp32 (computed by ATen),
  // c = centre (D,), norms as in propagate. Returns 1 (inside), 0 (outside) or -1 (recheck in fp32).
  int8_t decide(const at::BFloat16* a, const float* y, const float* cen, const double* norms, double r2) const;
};

}  // namespace robbench
