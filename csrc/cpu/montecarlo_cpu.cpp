// robbench Monte Carlo ops: schemas (once) and CPU implementations.
//
// mlp_count: for B points, count samples z_bj = mu_b + eta_bj * sigma_b (counter-based RNG, rng.h)
// whose MLP-decoded output lies within sqrt(r2_b) of center_b; blocks of rows, never B x S x D.
//   precision 0 ("fp32"): the same ATen calls, block shapes and element alignment as the torch
//   reference in robbench/montecarlo.py, hence bit-identical squared distances.
//   precision 1 ("bf16"): bf16 GEMMs (fp32 accumulation, oneDNN/AVX512-BF16), a per-sample rigorous
//   bound on |d_bf16 - d_fp32| (see bounds.h), and an fp32 recomputation of exactly the samples whose
//   bf16 distance cannot decide the comparison. Decisions equal precision 0's.
//   stats = [samples rechecked in fp32, samples that went through the bf16 pass].
// mlp_sq_distances: the fp32 squared distances (B, n) of the same samples.
// count_le: the generic path's fused epilogue (distance, threshold, count) for any decoder output.
// normals: the RNG itself (tests compare it bit for bit with robbench/rng.py).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <vector>

#include "common/bounds.h"
#include "common/rng.h"

namespace robbench {
namespace {

constexpr int64_t kMinGemmRows = 64;
constexpr int64_t kPiece = 32768;
enum Act : int64_t { kNone = 0, kRelu = 1, kSigmoid = 2 };

// Same split as montecarlo._pieces: every ATen thread chunk starts at a multiple of 32 elements.
void activate_(at::Tensor& x, int64_t act) {
  if (act == kRelu) {
    x.relu_();
  } else if (act == kSigmoid) {
    at::Tensor flat = x.view({-1});
    const int64_t n = flat.numel();
    int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t pow2 = 1;
    while (pow2 * 2 <= threads) pow2 *= 2;
    const int64_t big = kPiece * pow2;
    int64_t start = 0;
    for (; n - start >= big; start += big) flat.slice(0, start, start + big).sigmoid_();
    for (; start < n; start += kPiece) flat.slice(0, start, std::min(n, start + kPiece)).sigmoid_();
  }
}

struct Block {
  int64_t p0, p1, s0, s1;
};

// Mirror of montecarlo._blocks.
std::vector<Block> make_blocks(int64_t B, int64_t n, int64_t rows) {
  rows = std::max(rows, kMinGemmRows);
  int64_t c = (B * n > rows) ? rows / std::max<int64_t>(1, B) : n;
  c = std::max<int64_t>(1, std::min(n, c));
  const int64_t nb = std::max<int64_t>(1, std::min(B, rows / c));
  std::vector<Block> out;
  for (int64_t p0 = 0; p0 < B; p0 += nb)
    for (int64_t s0 = 0; s0 < n; s0 += c) out.push_back({p0, std::min(B, p0 + nb), s0, std::min(n, s0 + c)});
  return out;
}

// z rows (point-major) of a block, zero-padded to at least pad_to rows: (max(m, pad_to), k) fp32.
at::Tensor latents(const at::Tensor& mu, const at::Tensor& sigma, const int64_t* ka, const int64_t* kb,
                   const Block& blk, int64_t offset, int64_t pad_to) {
  const int64_t k = mu.size(1), ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns;
  at::Tensor z = at::zeros({std::max(m, pad_to), k}, mu.options());
  float* zp = z.data_ptr<float>();
  const float* mup = mu.data_ptr<float>();
  const float* sgp = sigma.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = blk.p0 + r / ns;
      const uint32_t j = static_cast<uint32_t>(offset + blk.s0 + r % ns);
      float* row = zp + r * k;
      normals_row(static_cast<uint32_t>(ka[b]), static_cast<uint32_t>(kb[b]), j, k, row);
      for (int64_t i = 0; i < k; ++i) {
        const float scaled = row[i] * sgp[b * k + i];  // eta * sigma, then + mu: as torch does
        row[i] = scaled + mup[b * k + i];
      }
    }
  });
  return z;
}

at::Tensor mlp_forward_fp32(const at::Tensor& z, const std::vector<at::Tensor>& wts,
                            const std::vector<at::Tensor>& bs, const std::vector<int64_t>& acts) {
  at::Tensor h = z;
  for (size_t l = 0; l < wts.size(); ++l) {
    h = at::addmm(bs[l], h, wts[l]);
    activate_(h, acts[l]);
  }
  return h;
}

// fp32 squared distances of a block, exactly as montecarlo._torch_sq_distances: (points, samples).
at::Tensor block_sq_fp32(const at::Tensor& z, const at::Tensor& center, const Block& blk,
                         const std::vector<at::Tensor>& wts, const std::vector<at::Tensor>& bs,
                         const std::vector<int64_t>& acts) {
  const int64_t npts = blk.p1 - blk.p0, ns = blk.s1 - blk.s0, D = center.size(1);
  at::Tensor out = mlp_forward_fp32(z, wts, bs, acts);
  at::Tensor y = out.narrow(0, 0, npts * ns).narrow(1, 0, D).view({npts, ns, D});
  y.sub_(center.slice(0, blk.p0, blk.p1).unsqueeze(1));
  return y.mul_(y).sum(2);
}

void check_inputs(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& center, const at::Tensor& ka,
                  const at::Tensor& kb) {
  TORCH_CHECK(mu.dim() == 2 && mu.scalar_type() == at::kFloat, "mu must be (B, k) float32");
  TORCH_CHECK(sigma.sizes() == mu.sizes() && sigma.scalar_type() == at::kFloat, "sigma must match mu");
  TORCH_CHECK(center.dim() == 2 && center.size(0) == mu.size(0) && center.scalar_type() == at::kFloat,
              "center must be (B, D) float32");
  TORCH_CHECK(ka.dim() == 1 && ka.size(0) == mu.size(0) && ka.scalar_type() == at::kLong,
              "ka must be (B,) int64");
  TORCH_CHECK(kb.sizes() == ka.sizes() && kb.scalar_type() == at::kLong, "kb must be (B,) int64");
}

struct Weights {
  std::vector<at::Tensor> wts, bs;
  std::vector<int64_t> acts;
};

Weights unpack(at::TensorList wts, at::TensorList bs, at::IntArrayRef acts, int64_t k, int64_t D) {
  TORCH_CHECK(!wts.empty() && wts.size() == bs.size() && wts.size() == acts.size(),
              "weights_t, biases and acts must have one entry per layer");
  Weights w;
  int64_t in = k;
  for (size_t l = 0; l < wts.size(); ++l) {
    TORCH_CHECK(wts[l].dim() == 2 && wts[l].size(0) == in && wts[l].scalar_type() == at::kFloat,
                "weights_t[", l, "] must be (", in, ", out) float32");
    TORCH_CHECK(wts[l].size(1) % 32 == 0, "weights_t[", l, "] width must be padded to a multiple of 32");
    TORCH_CHECK(bs[l].dim() == 1 && bs[l].size(0) == wts[l].size(1), "biases[", l, "] must be (out,)");
    TORCH_CHECK(acts[l] >= 0 && acts[l] <= 2, "acts[", l, "] must be 0 (none), 1 (relu) or 2 (sigmoid)");
    w.wts.push_back(wts[l].contiguous());
    w.bs.push_back(bs[l].contiguous());
    w.acts.push_back(acts[l]);
    in = wts[l].size(1);
  }
  TORCH_CHECK(in >= D, "the last layer has fewer outputs than center has features");
  return w;
}

// The bound's constants need an SVD per layer: cache them per weight set. The key includes a checksum
// of the values, so a new weight tensor allocated at a freed address cannot hit a stale entry.
const BoundModel& cached_bound(const Weights& w, int64_t D) {
  static std::mutex mutex;
  static std::map<std::vector<double>, BoundModel> cache;
  std::vector<double> key{static_cast<double>(D)};
  for (size_t l = 0; l < w.wts.size(); ++l) {
    key.push_back(static_cast<double>(reinterpret_cast<uintptr_t>(w.wts[l].data_ptr())));
    key.push_back(static_cast<double>(w.wts[l].numel()));
    key.push_back(w.wts[l].to(at::kDouble).sum().item<double>());
    key.push_back(w.wts[l].to(at::kDouble).abs().sum().item<double>());
    key.push_back(w.bs[l].to(at::kDouble).sum().item<double>());
    key.push_back(static_cast<double>(w.acts[l]));
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() > 16) cache.clear();
    it = cache.emplace(key, BoundModel::from_weights(w.wts, w.bs, w.acts, D)).first;
  }
  return it->second;
}

}  // namespace

at::Tensor normals_cpu(const at::Tensor& ka, const at::Tensor& kb, const at::Tensor& j, int64_t k) {
  TORCH_CHECK(ka.dim() == 1 && ka.scalar_type() == at::kLong, "ka must be (N,) int64");
  TORCH_CHECK(kb.sizes() == ka.sizes() && j.sizes() == ka.sizes(), "kb and j must match ka");
  TORCH_CHECK(k >= 1, "k must be positive");
  at::Tensor kac = ka.contiguous(), kbc = kb.contiguous(), jc = j.contiguous();
  const int64_t n = ka.size(0);
  at::Tensor out = at::empty({n, k}, ka.options().dtype(at::kFloat));
  const int64_t *pa = kac.data_ptr<int64_t>(), *pb = kbc.data_ptr<int64_t>(), *pj = jc.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      normals_row(static_cast<uint32_t>(pa[r]), static_cast<uint32_t>(pb[r]), static_cast<uint32_t>(pj[r]), k,
                  po + r * k);
  });
  return out;
}

at::Tensor mlp_sq_distances_cpu(const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& center_,
                                const at::Tensor& ka_, const at::Tensor& kb_, int64_t n, int64_t offset,
                                at::TensorList weights_t, at::TensorList biases, at::IntArrayRef acts,
                                int64_t chunk_rows) {
  check_inputs(mu_, sigma_, center_, ka_, kb_);
  at::Tensor mu = mu_.contiguous(), sigma = sigma_.contiguous(), center = center_.contiguous();
  at::Tensor ka = ka_.contiguous(), kb = kb_.contiguous();
  Weights w = unpack(weights_t, biases, acts, mu.size(1), center.size(1));
  at::Tensor out = at::empty({mu.size(0), n}, mu.options());
  for (const Block& blk : make_blocks(mu.size(0), n, chunk_rows)) {
    at::Tensor z = latents(mu, sigma, ka.data_ptr<int64_t>(), kb.data_ptr<int64_t>(), blk, offset, kMinGemmRows);
    out.slice(0, blk.p0, blk.p1).slice(1, blk.s0, blk.s1).copy_(block_sq_fp32(z, center, blk, w.wts, w.bs, w.acts));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> mlp_count_cpu(const at::Tensor& mu_, const at::Tensor& sigma_,
                                                 const at::Tensor& center_, const at::Tensor& r2_,
                                                 const at::Tensor& ka_, const at::Tensor& kb_, int64_t n,
                                                 int64_t offset, at::TensorList weights_t, at::TensorList biases,
                                                 at::IntArrayRef acts, int64_t precision, int64_t chunk_rows) {
  check_inputs(mu_, sigma_, center_, ka_, kb_);
  TORCH_CHECK(r2_.dim() == 1 && r2_.size(0) == mu_.size(0) && r2_.scalar_type() == at::kFloat,
              "r2 must be (B,) float32");
  TORCH_CHECK(precision == 0 || precision == 1, "precision must be 0 (fp32) or 1 (bf16 + fp32 recheck)");
  TORCH_CHECK(n >= 0 && offset >= 0 && offset + n <= (int64_t(1) << 32), "sample indices must lie in [0, 2^32)");
  at::Tensor mu = mu_.contiguous(), sigma = sigma_.contiguous(), center = center_.contiguous();
  at::Tensor r2 = r2_.contiguous(), ka = ka_.contiguous(), kb = kb_.contiguous();
  const int64_t B = mu.size(0), D = center.size(1);
  Weights w = unpack(weights_t, biases, acts, mu.size(1), D);
  at::Tensor counts = at::zeros({B}, mu.options().dtype(at::kLong));
  int64_t* cp = counts.data_ptr<int64_t>();
  const float* r2p = r2.data_ptr<float>();
  int64_t rechecked = 0, bf16_rows = 0;
  // The bound is worst-case (all roundings aligned); when it leaves most samples undecided the bf16
  // pass only adds work, so after the first block the op falls back to fp32 (same decisions).
  bool use_bf16 = precision == 1;

  const BoundModel* bound = nullptr;
  std::vector<at::Tensor> wts_bf, bs_bf;
  if (precision == 1) {
    bound = &cached_bound(w, D);
    for (size_t l = 0; l < w.wts.size(); ++l) {
      wts_bf.push_back(w.wts[l].to(at::kBFloat16));
      bs_bf.push_back(w.bs[l].to(at::kBFloat16));
    }
  }

  for (const Block& blk : make_blocks(B, n, chunk_rows)) {
    const int64_t ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns;
    at::Tensor z = latents(mu, sigma, ka.data_ptr<int64_t>(), kb.data_ptr<int64_t>(), blk, offset, kMinGemmRows);
    if (!use_bf16) {
      at::Tensor d2 = block_sq_fp32(z, center, blk, w.wts, w.bs, w.acts);
      counts.slice(0, blk.p0, blk.p1).add_((d2 <= r2.slice(0, blk.p0, blk.p1).unsqueeze(1)).sum(1));
      continue;
    }
    // bf16 forward; per row the norm of each hidden layer's input, for the error bound
    at::Tensor h = z.to(at::kBFloat16);
    std::vector<at::Tensor> norms;  // (M,) float64 each: ||input of layer l||
    norms.push_back(z.narrow(0, 0, m).to(at::kDouble).norm(2, {1}));
    for (size_t l = 0; l < w.wts.size(); ++l) {
      h = at::addmm(bs_bf[l], h, wts_bf[l]);
      if (l + 1 < w.wts.size()) {
        activate_(h, w.acts[l]);
        norms.push_back(h.narrow(0, 0, m).to(at::kDouble).norm(2, {1}));
      }
    }
    // fused epilogue: activation, distance, bound, decision
    std::vector<int8_t> decision(m);  // 1 inside, 0 outside, -1 recheck
    at::Tensor yf = h.to(at::kFloat);
    activate_(yf, w.acts.back());
    const float* yp = yf.data_ptr<float>();
    const at::BFloat16* ap = h.data_ptr<at::BFloat16>();
    const int64_t P = h.size(1);
    const float* cen = center.data_ptr<float>();
    std::vector<const double*> np;
    for (auto& t : norms) np.push_back(t.data_ptr<double>());
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      std::vector<double> hn(np.size());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = blk.p0 + r / ns;
        for (size_t l = 0; l < np.size(); ++l) hn[l] = np[l][r];
        decision[r] = bound->decide(ap + r * P, yp + r * P, cen + b * D, hn.data(), static_cast<double>(r2p[b]));
      }
    });
    std::vector<int64_t> redo;
    for (int64_t r = 0; r < m; ++r) {
      const int64_t b = blk.p0 + r / ns;
      if (decision[r] == 1) cp[b] += 1;
      else if (decision[r] < 0) redo.push_back(r);
    }
    rechecked += static_cast<int64_t>(redo.size());
    bf16_rows += m;
    if (2 * static_cast<int64_t>(redo.size()) > m) use_bf16 = false;
    if (redo.empty()) continue;
    // fp32 recomputation of the undecided rows, same ATen path as the reference
    const int64_t q = static_cast<int64_t>(redo.size());
    at::Tensor idx = at::from_blob(redo.data(), {q}, at::kLong).clone();
    at::Tensor zr = z.index_select(0, idx);
    if (q < kMinGemmRows) zr = at::cat({zr, at::zeros({kMinGemmRows - q, zr.size(1)}, zr.options())});
    at::Tensor out = mlp_forward_fp32(zr, w.wts, w.bs, w.acts);
    at::Tensor pts = at::floor_divide(idx, ns) + blk.p0;
    at::Tensor y = out.narrow(0, 0, q).narrow(1, 0, D);
    y.sub_(center.index_select(0, pts));
    at::Tensor inside = (y.mul_(y).sum(1) <= r2.index_select(0, pts));
    counts.index_add_(0, pts, inside.to(at::kLong));
  }
  at::Tensor stats = at::empty({2}, counts.options());
  stats[0] = rechecked;
  stats[1] = bf16_rows;
  return {counts, stats};
}

at::Tensor count_le_cpu(const at::Tensor& y_, const at::Tensor& center_, const at::Tensor& r2_) {
  TORCH_CHECK(y_.dim() == 3 && y_.scalar_type() == at::kFloat, "y must be (B, S, D) float32");
  TORCH_CHECK(center_.dim() == 2 && center_.size(0) == y_.size(0) && center_.size(1) == y_.size(2),
              "center must be (B, D) matching y");
  TORCH_CHECK(r2_.dim() == 1 && r2_.size(0) == y_.size(0), "r2 must be (B,)");
  at::Tensor y = y_.contiguous(), center = center_.contiguous().to(at::kFloat), r2 = r2_.contiguous().to(at::kFloat);
  const int64_t B = y.size(0), S = y.size(1), D = y.size(2);
  at::Tensor counts = at::zeros({B}, y.options().dtype(at::kLong));
  const float *yp = y.data_ptr<float>(), *cp = center.data_ptr<float>(), *rp = r2.data_ptr<float>();
  int64_t* out = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c = 0;
      for (int64_t s = 0; s < S; ++s) {
        const float* row = yp + (b * S + s) * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float diff = row[d] - cp[b * D + d];
          acc += diff * diff;
        }
        c += acc <= rp[b];
      }
      out[b] = c;
    }
  });
  return counts;
}

TORCH_LIBRARY(robbench, m) {
  m.def("normals(Tensor ka, Tensor kb, Tensor j, int k) -> Tensor");
  m.def("mlp_sq_distances(Tensor mu, Tensor sigma, Tensor center, Tensor ka, Tensor kb, int n, int offset, "
        "Tensor[] weights_t, Tensor[] biases, int[] acts, int chunk_rows) -> Tensor");
  m.def("mlp_count(Tensor mu, Tensor sigma, Tensor center, Tensor r2, Tensor ka, Tensor kb, int n, int offset, "
        "Tensor[] weights_t, Tensor[] biases, int[] acts, int precision, int chunk_rows) -> (Tensor, Tensor)");
  m.def("count_le(Tensor y, Tensor center, Tensor r2) -> Tensor");
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) {
  m.impl("normals", &normals_cpu);
  m.impl("mlp_sq_distances", &mlp_sq_distances_cpu);
  m.impl("mlp_count", &mlp_count_cpu);
  m.impl("count_le", &count_le_cpu);
}

}  // namespace robbench
