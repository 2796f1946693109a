// robbench Monte Carlo ops: schemas (once) and CPU implementations.
//
// mlp_count: for B points, count samples z_bj = mu_b + eta_bj * sigma_b (counter-based RNG, rng.h)
// whose MLP-decoded output lies within sqrt(r2_b) of center_b; blocks of rows, never B x S x D.
// The hidden layers always run with the same ATen calls, block shapes and element alignment as the
// torch reference in robbench/montecarlo.py, so the last layer's input is bit-identical to the
// reference's. Two arguments select how the last layer is done (bounds.h has the analysis):
//   `screen`: a Lipschitz bound decides "inside" for samples whose hidden vector is close
//     enough to that of mu_b, with no last-layer work at all;
//   `precision` 1 (bf16): the remaining samples' last layer is one bf16 GEMM (fp32 accumulation,
//     oneDNN/AVX512-BF16) with a rigorous element-wise bound on the difference to the fp32 reference;
//     samples the bound cannot decide are recomputed with the reference's fp32 last layer.
//   precision 0 (fp32) without screen: the reference's layers (same ATen calls), then a fused distance
//   pass with a rigorous summation band (fp32_final_count). Every mode gives exactly the reference's
//   decisions.
//   precision 0 (fp32): the last layer of the samples left goes through a per-sample early exit first
//     (early_exit.h: exact columns in blocks, rigorous bound on the rest, reference for the undecided).
//   stats = [samples rechecked in fp32, samples through the bf16 last layer, samples screened,
//            samples through the early exit, last-layer columns it computed, of those samples rechecked].
// mlp_count_ids: mlp_count with the stream keys made from the stream ids and the subnormal check inside.
// mlp_sq_distances: the fp32 squared distances (B, n) of the same samples.
// count_le: the generic path's fused epilogue (distance, threshold, count) for any decoder output.
// normals: the RNG itself (tests compare it bit for bit with robbench/rng.py).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include <c10/util/BFloat16.h>

#include "common/blocks.h"
#include "common/bf16_product.h"
#include "common/bf16_rows.h"
#include "common/bounds.h"
#include "common/checks.h"
#include "common/decoder.h"
#include "common/early_exit.h"
#include "common/fused_hidden.h"
#include "common/normals_rows.h"
#include "common/rng.h"
#include "common/switches.h"

namespace robbench {
namespace {

constexpr int64_t kPiece = 32768;

// The reference's sigmoid (decoding.activate_) runs on pieces whose ATen thread chunks are kPiece elements
// starting at multiples of 32, so every element takes the vectorised path. Here the same kPiece chunks run
// in one parallel region, each one serial ATen sigmoid_ (ATen runs serially inside a parallel region):
// the same element-wise results, one fork-join per activation instead of one per piece (up to 25 per
// block), which on small calls and on a busy machine cost more than the sigmoid itself.
void activate_(at::Tensor& x, int64_t act) {
  if (act == kActRelu) {
    x.relu_();
  } else if (act == kActSigmoid) {
    at::Tensor flat = x.view({-1});
    const int64_t n = flat.numel(), pieces = (n + kPiece - 1) / kPiece;
    at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) flat.slice(0, p * kPiece, std::min(n, (p + 1) * kPiece)).sigmoid_();
    });
  }
}


// Per-thread workspaces of mlp_count's block loop: the block's z, each hidden layer's output, the fp32
// recheck's input rows and last-layer output. Fresh tensors of these sizes (up to 6.5 MB) came from the
// heap's top or from mmap on every block, and glibc returned them to the kernel between blocks: 1.7k-16.7k
// page faults per replay of the recorded margin calls (benchmarks/README.md, session 7). Each OS thread
// keeps its own slots across calls (concurrent calls from other threads never share one); a view of a
// slot is valid until the same thread asks for that slot again. The buffers come from at::empty like
// fresh ones (the same 64-byte alignment, row stride = cols) and a view starts at the buffer's start, so
// the ATen calls that write into them (at::addmm_out: the same kernel as at::addmm) see the same operands
// and layout as the reference's and give the same results bit for bit. Slots stay at most kWsMaxRows rows
// (larger requests get a fresh tensor) and grow in steps of kWsStep rows: ~13 MB per calling thread for the
// trained decoders (K = 256, P = 800, 2048-row blocks; the recheck's up to 2560 rows).
// ROBBENCH_WORKSPACES=0 (read per request) hands out fresh tensors instead: A/B in one process for benchmarks.
enum WsSlot : int { kWsZ = 0, kWsRecheckIn, kWsRecheckOut, kWsHidden };  // hidden layer l: kWsHidden + l
constexpr int64_t kWsMaxRows = 8192, kWsStep = 512;
at::Tensor workspace_rows(int slot, int64_t rows, int64_t cols, const at::TensorOptions& o) {
  thread_local std::vector<at::Tensor> ws;
  if (rows > kWsMaxRows || !switch_on("ROBBENCH_WORKSPACES")) return at::empty({rows, cols}, o);
  if (static_cast<int>(ws.size()) <= slot) ws.resize(slot + 1);
  at::Tensor& t = ws[slot];
  if (!t.defined() || t.size(0) < rows || t.size(1) != cols || t.scalar_type() != o.dtype().toScalarType())
    t = at::empty({(rows + kWsStep - 1) / kWsStep * kWsStep, cols}, o);
  return t.narrow(0, 0, rows);
}

// z rows (point-major) of a block, zero-padded to at least pad_to rows: (max(m, pad_to), k) fp32; in the
// calling thread's kWsZ workspace when `reuse`.
at::Tensor latents(const at::Tensor& mu, const at::Tensor& sigma, const int64_t* ka, const int64_t* kb,
                   const Block& blk, int64_t offset, int64_t pad_to, bool reuse = false) {
  const int64_t k = mu.size(1), ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns;
  ROBBENCH_ASSERT_CONTIGUOUS(mu);
  ROBBENCH_ASSERT_CONTIGUOUS(sigma);
  at::Tensor z = reuse ? workspace_rows(kWsZ, std::max(m, pad_to), k, mu.options())
                       : at::empty({std::max(m, pad_to), k}, mu.options());
  float* zp = z.data_ptr<float>();
  std::fill(zp + m * k, zp + z.numel(), 0.f);
  const float* mup = mu.data_ptr<float>();
  const float* sgp = sigma.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    // the rows' stream keys and sample indices, then their normals eight rows at a time
    thread_local std::vector<uint32_t> keys;
    const int64_t nr = r1 - r0;
    keys.resize(3 * nr);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = blk.p0 + r / ns;
      keys[r - r0] = static_cast<uint32_t>(ka[b]);
      keys[nr + r - r0] = static_cast<uint32_t>(kb[b]);
      keys[2 * nr + r - r0] = static_cast<uint32_t>(offset + blk.s0 + r % ns);
    }
    normals_rows(keys.data(), keys.data() + nr, keys.data() + 2 * nr, nr, k, zp + r0 * k);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = blk.p0 + r / ns;
      float* row = zp + r * k;
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

// fp32 squared distances of a block, exactly as backends.sq_distance_blocks: (points, samples).
at::Tensor block_sq_fp32(const at::Tensor& z, const at::Tensor& center, const Block& blk,
                         const std::vector<at::Tensor>& wts, const std::vector<at::Tensor>& bs,
                         const std::vector<int64_t>& acts) {
  const int64_t npts = blk.p1 - blk.p0, ns = blk.s1 - blk.s0, D = center.size(1);
  at::Tensor out = mlp_forward_fp32(z, wts, bs, acts);
  at::Tensor y = out.narrow(0, 0, npts * ns).narrow(1, 0, D).view({npts, ns, D});
  y.sub_(center.slice(0, blk.p0, blk.p1).unsqueeze(1));
  return y.mul_(y).sum(2);
}

struct Weights {
  std::vector<at::Tensor> wts, bs;
  std::vector<int64_t> acts;
};

Weights unpack(at::TensorList wts, at::TensorList bs, at::IntArrayRef acts, int64_t k, int64_t D) {
  check_mlp(wts, bs, acts, k, D, at::Device(at::kCPU));
  Weights w;
  for (size_t l = 0; l < wts.size(); ++l) {
    w.wts.push_back(wts[l].contiguous());
    w.bs.push_back(bs[l].contiguous());
    w.acts.push_back(acts[l]);
  }
  return w;
}

// What a call needs of its last layer beyond the weights: the bound constants (an SVD, ~40 ms at 1 thread)
// and V^T for the bf16 pass's rows (prepare_bf16_rows). Made once per last layer and cached by its
// contents: a call's last layer hits an entry only when its shape, activation, D and every byte of its
// weights and bias equal the entry's own copies (memcmp, ~30 us for 800 KB). So a decoder plan rebuilt
// with new tensors (each run wraps the model anew) finds its entry, and a changed weight set at a reused
// address cannot alias a stale one.
struct LastLayerEntry {
  at::Tensor wt, b;  // private copies of the last layer it was made from: (K, P), (P,) fp32
  int64_t act = 0, D = 0;
  uint64_t sig = 0;  // a few sampled values: lookups memcmp only entries that match
  std::shared_ptr<const LastLayerBound> bound;
  at::Tensor vt16;    // (16, K) fp32: the bound's V^T, rows past its k zero (prepare_bf16_rows)
  std::shared_ptr<const Bf16Product> product;  // the bf16 product with fp32 output; null where unusable
};

uint64_t layer_signature(const at::Tensor& wt, const at::Tensor& b, int64_t act, int64_t D) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t x) { h = (h ^ x) * 1099511628211ull; };
  mix(static_cast<uint64_t>(wt.size(0)));
  mix(static_cast<uint64_t>(wt.size(1)));
  mix(static_cast<uint64_t>(act));
  mix(static_cast<uint64_t>(D));
  const float* wp = wt.data_ptr<float>();
  const int64_t n = wt.numel(), step = std::max<int64_t>(1, n / 61);
  for (int64_t i = 0; i < n; i += step) mix(__builtin_bit_cast(uint32_t, wp[i]));
  const float* bp = b.data_ptr<float>();
  const int64_t nb = b.numel(), bstep = std::max<int64_t>(1, nb / 7);
  for (int64_t i = 0; i < nb; i += bstep) mix(__builtin_bit_cast(uint32_t, bp[i]));
  return h;
}

struct LastLayerCache {
  std::mutex mutex;
  std::vector<std::shared_ptr<const LastLayerEntry>> entries;  // at most 16, oldest first
  int64_t hits = 0, misses = 0;
};
LastLayerCache& last_layer_cache() {
  static LastLayerCache c;
  return c;
}

std::shared_ptr<const LastLayerEntry> cached_last_layer(const Weights& w, int64_t D) {
  LastLayerCache& cache = last_layer_cache();
  const at::Tensor& wt = w.wts.back();
  const at::Tensor& b = w.bs.back();
  const int64_t act = w.acts.back();
  ROBBENCH_ASSERT_CONTIGUOUS(wt);
  ROBBENCH_ASSERT_CONTIGUOUS(b);
  const uint64_t sig = layer_signature(wt, b, act, D);
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    for (const auto& e : cache.entries) {
      if (e->sig == sig && e->act == act && e->D == D && e->wt.sizes() == wt.sizes() && e->b.sizes() == b.sizes() &&
          std::memcmp(e->wt.data_ptr<float>(), wt.data_ptr<float>(), wt.numel() * sizeof(float)) == 0 &&
          std::memcmp(e->b.data_ptr<float>(), b.data_ptr<float>(), b.numel() * sizeof(float)) == 0) {
        ++cache.hits;
        return e;
      }
    }
  }
  auto made = std::make_shared<LastLayerEntry>();  // outside the lock: another thread's call need not wait
  made->wt = wt.clone();
  made->b = b.clone();
  made->act = act;
  made->D = D;
  made->sig = sig;
  made->bound = std::make_shared<const LastLayerBound>(LastLayerBound::make(made->wt, made->b, act, D));
  const at::Tensor& vk = made->bound->vk;
  TORCH_CHECK(vk.size(1) <= 16, "prepare_bf16_rows takes at most 16 columns of V, got ", vk.size(1));
  made->vt16 = at::zeros({16, vk.size(0)}, vk.options());
  made->vt16.narrow(0, 0, vk.size(1)).copy_(vk.t());
  made->product = Bf16Product::make(made->bound->wt_bf16);
  std::lock_guard<std::mutex> lock(cache.mutex);
  ++cache.misses;
  if (cache.entries.size() >= 16) cache.entries.erase(cache.entries.begin());
  cache.entries.push_back(made);
  return made;
}

// Hidden layers (all but the last) with the reference's ATen calls: (rows, K) fp32. `reuse`: each layer's
// output in the calling thread's workspace (at::addmm_out, the kernel behind at::addmm), so the result is
// only valid until this thread's next call with `reuse`. skip_last: leave out the last hidden layer (its input
// is returned; the fused hidden layer computes it, bounds.h part 8).
at::Tensor hidden_fp32(const at::Tensor& z, const Weights& w, bool reuse = false, bool skip_last = false) {
  at::Tensor h = z;
  for (size_t l = 0; l + 1 + (skip_last ? 1 : 0) < w.wts.size(); ++l) {
    if (reuse) {
      at::Tensor out = workspace_rows(kWsHidden + static_cast<int>(l), h.size(0), w.wts[l].size(1), h.options());
      at::addmm_out(out, w.bs[l], h, w.wts[l]);
      h = out;
    } else {
      h = at::addmm(w.bs[l], h, w.wts[l]);
    }
    activate_(h, w.acts[l]);
  }
  return h;
}

// A default-on switch of the environment: on unless `name` is set to "0" (A/B switches for benchmarks).
// ROBBENCH_FUSED_EPILOGUE=0 turns the fused distance pass off (benchmarks compare both in one process).
bool fused_epilogue_enabled() { return switch_on("ROBBENCH_FUSED_EPILOGUE"); }

// The per-sample early exit of the fp32 last layer is opt-in: ROBBENCH_EARLY_EXIT=1 (adaptive) or =force
// (on where it does not pay; tests). On the margin workload's calls (a few thousand samples, 128-1536 per
// point) it lost: replayed at 1 thread 1.01-1.12x torch with it vs 1.07-1.14x without, at 2 threads
// 0.81-1.29x vs 1.29-1.32x (its per-point GEMMs of 128 x 64 and short parallel loops; benchmarks/README.md).
// ROBBENCH_EXIT_COLUMNS sets the widths of its column blocks (comma-separated, the last one repeats;
// default 64,64,128).
int early_exit_mode() {  // 0 off, 1 adaptive, 2 forced
  const char* v = std::getenv("ROBBENCH_EARLY_EXIT");
  if (v == nullptr) return 0;
  const std::string s(v);
  return s == "0" ? 0 : (s == "force" ? 2 : 1);
}

// The early exit costs more than it saves when it computes most columns anyway (a decoder whose samples
// sit close to r relative to the tail bound: beta = 10 computed 93 % of the columns in
// benchmarks/levers.py). A call stops using it after a block when more than kExitMaxShare of the
// columns were needed, and later calls on the same last layer skip it, probing again every
// kExitProbeEvery calls. Only speed depends on this memory (a stale entry for a reused address included).
constexpr double kExitMaxShare = 0.6;
constexpr int kExitProbeEvery = 16;
struct ExitMemory {
  std::mutex mutex;
  std::map<std::pair<const void*, int64_t>, std::pair<int, double>> last;  // -> (calls since probe, share)
};
ExitMemory& exit_memory() {
  static ExitMemory m;
  return m;
}
bool exit_worth_trying(const at::Tensor& wt) {
  ExitMemory& mem = exit_memory();
  std::lock_guard<std::mutex> lock(mem.mutex);
  auto it = mem.last.find({wt.data_ptr(), wt.numel()});
  if (std::getenv("ROBBENCH_EXIT_MEMORY") != nullptr && std::string(std::getenv("ROBBENCH_EXIT_MEMORY")) == "0")
    return true;
  if (it == mem.last.end() || it->second.second <= kExitMaxShare) return true;
  if (++it->second.first >= kExitProbeEvery) {
    it->second.first = 0;
    return true;
  }
  return false;
}
void exit_remember(const at::Tensor& wt, double share) {
  ExitMemory& mem = exit_memory();
  std::lock_guard<std::mutex> lock(mem.mutex);
  if (mem.last.size() > 64) mem.last.clear();
  mem.last[{wt.data_ptr(), wt.numel()}] = {0, share};
}
std::vector<int64_t> early_exit_columns() {
  const char* v = std::getenv("ROBBENCH_EXIT_COLUMNS");
  std::vector<int64_t> w;
  for (const char* s = v; s != nullptr && *s;) {
    char* end = nullptr;
    const long long x = std::strtoll(s, &end, 10);
    if (end == s) break;
    if (x >= 8) w.push_back(x);
    s = *end == ',' ? end + 1 : end;
  }
  if (w.empty()) w = {64, 64, 128};
  return w;
}

// One sample's side of r^2 as the reference's fp32 sum of t_d = fl(fl(y_d - c_d)^2) decides it: the same
// terms summed in double (error <= D 2^-53 relative, any order), then 1 (inside) / 0 (outside) where the
// fp32 sum is certainly on that side (relative ``band``), -1 where only the reference's own sum can tell.
inline int8_t band_decide(const float* y, const float* c, int64_t D, double band, float r2) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent accumulators: the lanes vectorise
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int j = 0; j < 8; ++j) {
      const float diff = y[d + j] - c[d + j];
      lane[j] += static_cast<double>(diff * diff);
    }
  }
  double acc = 0.0;
  for (; d < D; ++d) {
    const float diff = y[d] - c[d];
    acc += static_cast<double>(diff * diff);
  }
  for (int j = 0; j < 8; ++j) acc += lane[j];
  const double lim = static_cast<double>(r2);
  return acc * (1.0 + band) <= lim ? 1 : (acc * (1.0 - band) > lim ? 0 : -1);
}

// The reference's fp32 final layer for rows idx (block-relative) of h, then the distance epilogue fused
// into one pass over each output row, counted into counts. The GEMM sees >= 64 rows; MKL's result for a
// row does not depend on the other rows then (tests/test_kernels.py checks this bit for bit against the
// full-block reference), and the activation is the reference's own ATen call, so each row's outputs y are
// the reference's. The reference then forms t_d = fl(fl(y_d - c_d)^2) and sums them in fp32 (ATen's
// reduction, whatever its order): |fl-sum - sum t| <= gamma_{D-1} * sum t for non-negative terms. The fused
// pass sums the same terms in double (error <= D 2^-53 relative) and decides "inside" / "outside" when
// the reference's sum is certainly on one side of r^2 (band: (D + 4) u relative, u = 2^-24, slack for a
// term rounded differently); rows inside the band (~1e-4 of rows at the median radius) get the
// reference's own sub/mul/sum on their gathered rows. Instead of a gather of the centers (a q x D copy),
// sub, mul and a reduction (four passes over the output), one read.
// The same for q rows of hr (>= 64 rows, zero padding past q) whose points are pts[0..q).
// The last layer's output goes to the calling thread's kWsRecheckOut workspace (at::addmm_out: at::addmm's kernel).
void fp32_rows_count(const at::Tensor& hr, int64_t q, const int64_t* pts_of, const at::Tensor& center,
                     const at::Tensor& r2, const Weights& w, at::Tensor& counts) {
  const int64_t D = center.size(1);
  if (q == 0) return;
  at::Tensor out = workspace_rows(kWsRecheckOut, hr.size(0), w.wts.back().size(1), hr.options());
  at::addmm_out(out, w.bs.back(), hr, w.wts.back());
  activate_(out, w.acts.back());
  if (!fused_epilogue_enabled()) {  // A/B switch for benchmarks: the reference's four-pass epilogue
    at::Tensor pts = at::from_blob(const_cast<int64_t*>(pts_of), {q}, at::kLong).clone();
    at::Tensor y = out.narrow(0, 0, q).narrow(1, 0, D);
    y.sub_(center.index_select(0, pts));
    at::Tensor inside = (y.mul_(y).sum(1) <= r2.index_select(0, pts));
    counts.index_add_(0, pts, inside.to(at::kLong));
    return;
  }
  ROBBENCH_ASSERT_CONTIGUOUS(out);
  ROBBENCH_ASSERT_CONTIGUOUS(center);
  const int64_t P = out.size(1);
  const float* op = out.data_ptr<float>();
  const float* cen = center.data_ptr<float>();
  const float* r2p = r2.data_ptr<float>();
  const double u = std::ldexp(1.0, -24);
  const double band = (D + 4) * u / (1.0 - (D + 4) * u);
  std::vector<int8_t> dec(q);
  at::parallel_for(0, q, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = pts_of[i];
      dec[i] = band_decide(op + i * P, cen + b * D, D, band, r2p[b]);
    }
  });
  int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<int64_t> amb;
  for (int64_t i = 0; i < q; ++i) {
    if (dec[i] == 1) cp[pts_of[i]] += 1;
    else if (dec[i] < 0) amb.push_back(i);
  }
  if (amb.empty()) return;
  // the reference's epilogue (ATen sub, mul, sum: per-row results independent of the other rows)
  const int64_t na = static_cast<int64_t>(amb.size());
  at::Tensor sel = at::from_blob(amb.data(), {na}, at::kLong).clone();
  std::vector<int64_t> pv(na);
  for (int64_t a = 0; a < na; ++a) pv[a] = pts_of[amb[a]];
  at::Tensor pts = at::from_blob(pv.data(), {na}, at::kLong).clone();
  at::Tensor y = out.index_select(0, sel).narrow(1, 0, D);
  y.sub_(center.index_select(0, pts));
  at::Tensor inside = (y.mul_(y).sum(1) <= r2.index_select(0, pts));
  counts.index_add_(0, pts, inside.to(at::kLong));
}

void fp32_final_count(const at::Tensor& h, const std::vector<int64_t>& idx, int64_t m, const Block& blk,
                      const at::Tensor& center, const at::Tensor& r2, const Weights& w, at::Tensor& counts) {
  const int64_t q = static_cast<int64_t>(idx.size()), ns = blk.s1 - blk.s0;
  if (q == 0) return;
  at::Tensor hr = h;
  if (q != m) {  // the rows gathered (exact copies) into a workspace, zero rows up to kMinGemmRows
    ROBBENCH_ASSERT_CONTIGUOUS(h);
    const int64_t K = h.size(1);
    hr = workspace_rows(kWsRecheckIn, std::max(q, kMinGemmRows), K, h.options());
    const float* hp = h.data_ptr<float>();
    float* rp = hr.data_ptr<float>();
    for (int64_t i = 0; i < q; ++i) std::memcpy(rp + i * K, hp + idx[i] * K, K * sizeof(float));
    std::fill(rp + q * K, rp + hr.numel(), 0.f);
  }
  std::vector<int64_t> pts(q);
  for (int64_t i = 0; i < q; ++i) pts[i] = blk.p0 + idx[i] / ns;
  fp32_rows_count(hr, q, pts.data(), center, r2, w, counts);
}

// The reference's last hidden layer for q rows x (q, k) contiguous of its input: ATen's addmm_out and
// activation (the reference's kernels) on the rows zero-padded to >= kMinGemmRows rows. As for the fp32
// recheck (fp32_rows_count), MKL's result for a row does not depend on the other rows then
// (tests/test_fused_hidden.py checks it bit for bit for hidden layers' shapes), so each row is the
// reference's h (bounds.h part 8). Returns (>= q, K) rows in the calling thread's buffer (valid until
// its next call).
at::Tensor exact_hidden_rows(const float* x, int64_t q, int64_t k, const Weights& w) {
  const size_t l = w.wts.size() - 2;
  const int64_t K = w.wts[l].size(1), g = std::max(q, kMinGemmRows);
  const at::TensorOptions o = w.wts[l].options();
  thread_local at::Tensor xg, og;  // views start at the buffer's start, row stride = cols (as workspace_rows)
  if (!xg.defined() || xg.size(0) < g || xg.size(1) != k) xg = at::empty({g, k}, o);
  if (!og.defined() || og.size(0) < g || og.size(1) != K) og = at::empty({g, K}, o);
  at::Tensor xr = xg.narrow(0, 0, g), out = og.narrow(0, 0, g);
  float* gp = xr.data_ptr<float>();
  std::copy(x, x + q * k, gp);
  std::fill(gp + q * k, gp + g * k, 0.f);
  at::addmm_out(out, w.bs[l], xr, w.wts[l]);
  activate_(out, w.acts[l]);
  return out;
}

// fp32 rechecks of the bf16 pass, collected across blocks (each row's hidden vector and point) so that
// the reference's GEMM sees many rows at once instead of one padded >= 64-row GEMM per block: a row's
// result does not depend on the other rows (see above), so which block it came from does not matter.
// With the fused hidden layer (bounds.h part 8) the rows' inputs x of the last hidden layer are kept
// instead (add_inputs) and the reference's h is made from them at the flush (exact_hidden_rows).
struct PendingRechecks {
  std::vector<float> h, x;
  std::vector<int64_t> pts;
  int64_t K = 0, kx = 0;
  void add(const at::Tensor& hb, const std::vector<int64_t>& rows, const Block& blk) {
    const int64_t ns = blk.s1 - blk.s0;
    const float* hp = hb.data_ptr<float>();
    for (int64_t r : rows) {
      h.insert(h.end(), hp + r * K, hp + (r + 1) * K);
      pts.push_back(blk.p0 + r / ns);
    }
  }
  void add_inputs(const at::Tensor& xb, const std::vector<int64_t>& rows, const Block& blk) {
    const int64_t ns = blk.s1 - blk.s0;
    kx = xb.size(1);
    const float* xp = xb.data_ptr<float>();
    for (int64_t r : rows) {
      x.insert(x.end(), xp + r * kx, xp + (r + 1) * kx);
      pts.push_back(blk.p0 + r / ns);
    }
  }
  void flush(const at::Tensor& center, const at::Tensor& r2, const Weights& w, at::Tensor& counts) {
    const int64_t q = static_cast<int64_t>(pts.size());
    if (q == 0) return;
    if (!x.empty()) {  // one kind per call: the fused layer is used for every bf16 block of a call or for none
      TORCH_INTERNAL_ASSERT(h.empty() && static_cast<int64_t>(x.size()) == q * kx);
      const at::Tensor hx = exact_hidden_rows(x.data(), q, kx, w);
      h.assign(hx.data_ptr<float>(), hx.data_ptr<float>() + q * K);
      x.clear();
    }
    at::Tensor hr = workspace_rows(kWsRecheckIn, std::max(q, kMinGemmRows), K, center.options());
    float* rp = hr.data_ptr<float>();
    std::copy(h.begin(), h.end(), rp);
    std::fill(rp + q * K, rp + hr.numel(), 0.f);
    fp32_rows_count(hr, q, pts.data(), center, r2, w, counts);
    h.clear();
    pts.clear();
  }
};
// fp32 rechecks of the bf16 pass are done once this many rows are pending (and at the end of a call).
constexpr int64_t kRecheckRows = 512;
// Rows per chunk of the bf16 pass: its (rows, P) fp32 intermediates (a, y) stay in L2.
constexpr int64_t kBandRows = 128;

// The fused hidden layer (bounds.h part 8, hidden_rows) unless ROBBENCH_FUSED_HIDDEN=0 (read per call: A/B in
// one process). Its rows go to the bf16 pass kFusedRows at a time (16 x 1 KB for K = 256: still in L1).
bool fused_hidden_enabled() { return switch_on("ROBBENCH_FUSED_HIDDEN"); }
constexpr int64_t kFusedRows = 16;
constexpr int64_t kIdentityRows[kFusedRows] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};


// Workspaces of the bf16 pass (~1.3 MB for the trained decoders; the refinement's e, cols, lg are only
// touched for the rows the band leaves undecided). Each OS thread keeps its own across calls
// (thread_local: concurrent calls from other threads never share one): fresh large allocations
// page-fault on every touch, ~330 faults per thread and call when they were allocated per call.
// e, cols, lg: the refinement's slope-bound scratch (one row), recomputed units and their logits.
struct BandBuffers {
  at::Tensor hq, hb, pv, s16, s, a, y, e, cols, lg;  // s16: at::mm's bf16 product; s: the product in fp32
  std::vector<float> sq;          // per row: fp32 ||ĥ||^2 (first rows), ||δh||^2 (next rows)
  std::vector<double> nhb, ndh;   // per row: their norm_up
  static BandBuffers make(int64_t rows, int64_t K, int64_t P, int64_t k, const at::TensorOptions& o) {
    return {at::empty({rows, K}, o), at::empty({rows, K}, o.dtype(at::kBFloat16)), at::empty({rows, k}, o),
            at::empty({rows, P}, o.dtype(at::kBFloat16)), at::empty({rows, P}, o), at::empty({rows, P}, o),
            at::empty({rows, P}, o),
            at::empty({P}, o), at::empty({(rows + 1) * P}, o.dtype(at::kInt)), at::empty({rows * P}, o),
            std::vector<float>(2 * rows), std::vector<double>(rows), std::vector<double>(rows)};
  }
  static BandBuffers& local(int64_t rows, int64_t K, int64_t P, int64_t k, const at::TensorOptions& o) {
    thread_local BandBuffers b;
    if (!b.hq.defined() || b.hq.size(0) < rows || b.hq.size(1) != K || b.s.size(1) != P || b.pv.size(1) != k)
      b = make(rows, K, P, k, o);
    return b;
  }
};

// The bf16 pass's epilogue fused with the band (LastLayerBound::decide_epilogue, bounds.h part 5) unless
// ROBBENCH_BAND_FUSED=0 (read per chunk; A/B in benchmarks): then the separate passes below.
bool band_fused() { return switch_on("ROBBENCH_BAND_FUSED"); }

// The fused epilogue inside the product's tiles (LastLayerBound::decide_tiles, bounds.h part 7) where
// brgemm runs, unless ROBBENCH_BAND_TILES=0 (read per call; A/B in benchmarks): then the whole product
// first and decide_epilogue per row. ROBBENCH_TILE_STORE_Y=1: the tile pass also stores ŷ of every row
// instead of recomputing a, ŷ for the rows the refinement takes (same decisions either way).
struct BandTiles {
  bool on = true, store_y = false;
  static BandTiles from_env() {
    return {switch_on("ROBBENCH_BAND_TILES"), switch_set("ROBBENCH_TILE_STORE_Y")};
  }
};

// The unfused epilogue of a chunk: a = fl(s + b) and y = act~(a) by ATen's ops.
void unfused_epilogue(const at::Tensor& sv, at::Tensor& a, at::Tensor& y, const at::Tensor& bias, int64_t act) {
  at::add_out(a, sv, bias);
  if (act == kActSigmoid) at::sigmoid_out(y, a);
  else if (act == kActRelu) at::relu_out(y, a);
  else y.copy_(a);
}

// The refinement of undecided bf16 rows (bounds.h, part 4): on unless ROBBENCH_BAND_REFINE=0 (A/B in
// benchmarks). kappa: the target band as a fraction of the sample's distance gap |‖ŷ - c‖ - r|;
// max_share: a row needing more than this share of the D units goes straight to the fp32 reference.
// ROBBENCH_REFINE_KAPPA / ROBBENCH_REFINE_SHARE override them (tuning only; decisions never change).
// ROBBENCH_REFINE_CENTER=0 drops the reference hidden vectors, ROBBENCH_REFINE_BY_LEVEL=0 groups rows by
// point only (session 4's grouping): A/B switches for benchmarks, the decisions are the reference's either way.
struct RefineConfig {
  bool on = true, center = true, by_level = true, audit = false;
  double kappa = 0.9, max_share = 0.6;
  static RefineConfig from_env() {
    RefineConfig c;
    c.on = switch_on("ROBBENCH_BAND_REFINE");
    c.center = switch_on("ROBBENCH_REFINE_CENTER");
    c.by_level = switch_on("ROBBENCH_REFINE_BY_LEVEL");
    c.audit = std::getenv("ROBBENCH_REFINE_AUDIT") != nullptr;
    if (const char* k = std::getenv("ROBBENCH_REFINE_KAPPA")) c.kappa = std::atof(k);
    if (const char* k = std::getenv("ROBBENCH_REFINE_SHARE")) c.max_share = std::atof(k);
    return c;
  }
};

// ROBBENCH_REFINE_AUDIT=1 (tests): each refined row's mixed output y is compared with an fp32 last layer
// (at::addmm + sigmoid: another summation order, covered by the same bound): ||y_ref - y|| <= E must hold.
// With ROBBENCH_BAND_STATS the call prints the rows audited, the violations and max ||y_ref - y|| / E.
struct RefineAudit {
  std::mutex mu;
  int64_t rows = 0, violations = 0;
  double max_ratio = 0;
  void check(const at::Tensor& h, const Weights& w, const float* y, int64_t D, double E) {
    at::Tensor ref = at::addmm(w.bs.back(), h, w.wts.back()).sigmoid_().narrow(1, 0, D).to(at::kDouble);
    at::Tensor mine = at::from_blob(const_cast<float*>(y), {1, D}, at::kFloat).to(at::kDouble);
    const double err = (ref - mine).norm().item<double>();
    std::lock_guard<std::mutex> lock(mu);
    rows += 1;
    violations += err > E;
    max_ratio = std::max(max_ratio, err / E);
  }
  void print() const {
    fprintf(stderr, "robbench refine audit: rows %lld violations %lld max_ratio %.6g\n", static_cast<long long>(rows),
            static_cast<long long>(violations), max_ratio);
  }
};

// The refinement's rows of one chunk (bounds.h part 4): row i of the chunk, its point b, its own units (a
// bitset at word offset bits_off), their slope level and the bound e_rest on the units left.
struct RefineRow {
  int64_t i, b, bits_off;
  int level;
  double e_rest;
};
constexpr int kGroupMax = 4;  // rows per group (dots_avx512's tiles)

// un = the union of nr bitsets of `words` words; returns its number of bits. The POPCNT instruction where the
// CPU has it: without it, GCC calls libgcc's __popcountdi2 per word (0.8 % of β = 0.1's replayed calls in
// perf, session 8, when the shortest path below counted each union this way).
__attribute__((target_clones("popcnt", "default")))
int64_t union_words(const uint64_t* const* sets, int nr, int64_t words, uint64_t* un) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t x = 0;
    for (int v = 0; v < nr; ++v) x |= sets[v][w];
    un[w] = x;
    n += __builtin_popcountll(x);
  }
  return n;
}

// sizes[g - 1] = |sets[0] ∪ ... ∪ sets[g - 1]| for g = 1..nr (the runs of rows ending at one row, growing
// backwards), in one pass over the words: nr ORs and popcounts per word instead of nr (nr + 1) / 2 ORs.
__attribute__((target_clones("popcnt", "default")))
void nested_union_sizes(const uint64_t* const* sets, int nr, int64_t words, int64_t* sizes) {
  for (int g = 0; g < nr; ++g) sizes[g] = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t x = 0;
    for (int g = 0; g < nr; ++g) {
      x |= sets[g][w];
      sizes[g] += __builtin_popcountll(x);
    }
  }
}

// The rows' unit sets (bitsets over the D units, refine_select's): the union of a run of rows and its size
// in a few word operations per 64 units.
class UnitSets {
 public:
  UnitSets(const std::vector<RefineRow>& rows, const uint64_t* bits, int64_t D) : rows_(rows), bits_(bits),
      words_((D + 63) / 64), un_(words_) {}
  // |union of the sets of rows [u, e)| (kept for write_union); u < e <= u + kGroupMax
  int64_t union_size(size_t u, size_t e) {
    const uint64_t* sets[kGroupMax];
    for (size_t v = u; v < e; ++v) sets[v - u] = bits_ + rows_[v].bits_off;
    return union_words(sets, static_cast<int>(e - u), words_, un_.data());
  }
  // sizes[g - 1] = |union of the sets of rows [e - g, e)| for g = 1..nr (nr <= min(e, kGroupMax))
  void union_sizes_ending(size_t e, int nr, int64_t* sizes) const {
    const uint64_t* sets[kGroupMax];
    for (int g = 0; g < nr; ++g) sets[g] = bits_ + rows_[e - 1 - g].bits_off;
    nested_union_sizes(sets, nr, words_, sizes);
  }
  // The union of rows [u, e) into cols (ascending); returns its size.
  int64_t write_union(size_t u, size_t e, int32_t* cols) {
    union_size(u, e);
    int64_t n = 0;
    for (int64_t w = 0; w < words_; ++w)
      for (uint64_t x = un_[w]; x != 0; x &= x - 1) cols[n++] = static_cast<int32_t>(w * 64 + __builtin_ctzll(x));
    return n;
  }

 private:
  const std::vector<RefineRow>& rows_;
  const uint64_t* bits_;
  int64_t words_;
  std::vector<uint64_t> un_;
};

// Rows of a point with the same slope level have nearly the same units: order the rows by (point, level)
// (stable; they come in ascending point order).
void order_refine_rows(std::vector<RefineRow>& rows) {
  std::stable_sort(rows.begin(), rows.end(), [](const RefineRow& x, const RefineRow& y) {
    return x.b != y.b ? x.b < y.b : x.level < y.level;
  });
}

// Groups of the refinement's rows: runs of at most kGroupMax consecutive rows of one point, chosen per point
// by a shortest path over the cost model c(nr) x |union| (dots_avx512's cycles per union unit, measured on
// β = 0.1's calls: a W_j load serves all nr rows, so the union's size dominates and a small group costs
// almost as much as a full one). by_level = false: session 4's grouping (runs of kGroupMax in row order).
// Returns the group starts and, last, rows.size().
std::vector<size_t> refine_groups(const std::vector<RefineRow>& rows, UnitSets& sets, bool by_level) {
  constexpr double kCost[kGroupMax + 1] = {0, 25, 32, 36, 40};
  std::vector<size_t> cut;
  for (size_t p0 = 0; p0 < rows.size();) {
    size_t p1 = p0 + 1;
    while (p1 < rows.size() && rows[p1].b == rows[p0].b) ++p1;
    if (!by_level) {
      for (size_t x = p0; x < p1; x += kGroupMax) cut.push_back(x);
      p0 = p1;
      continue;
    }
    const size_t m = p1 - p0;
    std::vector<double> f(m + 1, 0.0);
    std::vector<int> from(m + 1, 0);
    for (size_t x = 1; x <= m; ++x) {
      f[x] = std::numeric_limits<double>::infinity();
      const int gmax = static_cast<int>(std::min<size_t>(kGroupMax, x));
      int64_t size[kGroupMax];  // |union of rows [x - g, x)| of the point
      sets.union_sizes_ending(p0 + x, gmax, size);
      for (int g = 1; g <= gmax; ++g) {
        const double c = f[x - g] + kCost[g] * static_cast<double>(size[g - 1]);
        if (c < f[x]) {
          f[x] = c;
          from[x] = g;
        }
      }
    }
    std::vector<size_t> starts;
    for (size_t x = m; x > 0; x -= from[x]) starts.push_back(p0 + x - from[x]);
    cut.insert(cut.end(), starts.rbegin(), starts.rend());
    p0 = p1;
  }
  cut.push_back(rows.size());
  return cut;
}

// The call's c (B, D): c_b >= |δW h_c,b| (LastLayerBound::refine_centers), computed on the call's first
// refined row, once (call_once: chunks of one call run on several threads).
struct RefineCenters {
  const LastLayerBound* bound = nullptr;
  at::Tensor h;               // (B, K) contiguous, or undefined: no reference hidden vectors
  const float* hc = nullptr;  // h's data
  at::Tensor c;
  std::once_flag once;
  RefineCenters(const LastLayerBound* b, const at::Tensor& hcs) : bound(b) {
    if (b == nullptr || !hcs.defined() || hcs.size(0) == 0) return;
    h = hcs.contiguous();
    hc = h.data_ptr<float>();
  }
  const float* get(int64_t p) {
    if (hc == nullptr) return nullptr;
    std::call_once(once, [&] { c = bound->refine_centers(h); });
    return c.data_ptr<float>() + p * bound->D;
  }
};
}  // namespace

at::Tensor normals_cpu(const at::Tensor& ka, const at::Tensor& kb, const at::Tensor& j, int64_t k) {
  const at::Device cpu(at::kCPU);
  check_tensor(ka, "ka", at::kLong, cpu, 1);
  check_tensor(kb, "kb", at::kLong, cpu, 1);
  check_tensor(j, "j", at::kLong, cpu, 1);
  TORCH_CHECK(kb.sizes() == ka.sizes() && j.sizes() == ka.sizes(), "kb and j must match ka's shape ", ka.sizes());
  TORCH_CHECK(k >= 1, "k must be positive, got ", k);
  at::Tensor kac = ka.contiguous(), kbc = kb.contiguous(), jc = j.contiguous();
  const int64_t n = ka.size(0);
  at::Tensor out = at::empty({n, k}, ka.options().dtype(at::kFloat));
  const int64_t *pa = kac.data_ptr<int64_t>(), *pb = kbc.data_ptr<int64_t>(), *pj = jc.data_ptr<int64_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {  // normals_rows: the same numbers as normals_row
    std::vector<uint32_t> keys(3 * (r1 - r0));
    for (int64_t r = r0; r < r1; ++r) {
      keys[r - r0] = static_cast<uint32_t>(pa[r]);
      keys[(r1 - r0) + r - r0] = static_cast<uint32_t>(pb[r]);
      keys[2 * (r1 - r0) + r - r0] = static_cast<uint32_t>(pj[r]);
    }
    normals_rows(keys.data(), keys.data() + (r1 - r0), keys.data() + 2 * (r1 - r0), r1 - r0, k, po + r0 * k);
  });
  return out;
}

at::Tensor mlp_sq_distances_cpu(const at::Tensor& mu_, const at::Tensor& sigma_, const at::Tensor& center_,
                                const at::Tensor& ka_, const at::Tensor& kb_, int64_t n, int64_t offset,
                                at::TensorList weights_t, at::TensorList biases, at::IntArrayRef acts,
                                int64_t chunk_rows) {
  check_sampling_inputs(mu_, sigma_, center_, ka_, kb_, at::kCPU);
  check_samples(n, offset, chunk_rows);
  at::Tensor mu = mu_.contiguous(), sigma = sigma_.contiguous(), center = center_.contiguous();
  at::Tensor ka = ka_.contiguous(), kb = kb_.contiguous();
  Weights w = unpack(weights_t, biases, acts, mu.size(1), center.size(1));
  at::Tensor out = at::empty({mu.size(0), n}, mu.options());
  for (const Block& blk : make_blocks(mu.size(0), n, chunk_rows, kMinGemmRows)) {
    at::Tensor z = latents(mu, sigma, ka.data_ptr<int64_t>(), kb.data_ptr<int64_t>(), blk, offset, kMinGemmRows);
    out.slice(0, blk.p0, blk.p1).slice(1, blk.s0, blk.s1).copy_(block_sq_fp32(z, center, blk, w.wts, w.bs, w.acts));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> mlp_count_cpu(const at::Tensor& mu_, const at::Tensor& sigma_,
                                                 const at::Tensor& center_, const at::Tensor& r2_,
                                                 const at::Tensor& ka_, const at::Tensor& kb_, int64_t n,
                                                 int64_t offset, at::TensorList weights_t, at::TensorList biases,
                                                 at::IntArrayRef acts, int64_t precision, bool screen_arg,
                                                 int64_t chunk_rows) {
  // The ATen calls below see no autograd or inference-mode bookkeeping (as inside any kernel): the per-thread
  // workspaces are written by at::addmm_out and in-place activations, which autograd refuses when a weight
  // requires grad ("out=... arguments don't support automatic differentiation") and which a workspace made
  // by an earlier call under torch.inference_mode() refuses outside it (an inference tensor updated in
  // place); tests/test_session7_rigor.py. The counts never needed either.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_sampling_inputs(mu_, sigma_, center_, ka_, kb_, at::kCPU);
  check_r2(r2_, mu_.size(0), mu_.device());
  check_precision(precision);
  check_samples(n, offset, chunk_rows);
  at::Tensor mu = mu_.contiguous(), sigma = sigma_.contiguous(), center = center_.contiguous();
  at::Tensor r2 = r2_.contiguous(), ka = ka_.contiguous(), kb = kb_.contiguous();
  const int64_t B = mu.size(0), D = center.size(1);
  Weights w = unpack(weights_t, biases, acts, mu.size(1), D);
  at::Tensor counts = at::zeros({B}, mu.options().dtype(at::kLong));
  ROBBENCH_ASSERT_CONTIGUOUS(r2);
  ROBBENCH_ASSERT_CONTIGUOUS(center);
  int64_t* cp = counts.data_ptr<int64_t>();
  const float* r2p = r2.data_ptr<float>();
  const float* cen = center.data_ptr<float>();
  int64_t rechecked = 0, bf16_rows = 0, screened = 0, exit_rows = 0, exit_columns = 0, exit_rechecked = 0;
  bool use_bf16 = precision == kBf16;
  bool screen = screen_arg;
  const bool any_bound = use_bf16 || screen;
  const bool screen_requested = screen;
  // held by shared_ptr: another thread's call may evict the cache entry meanwhile
  const std::shared_ptr<const LastLayerEntry> last = any_bound ? cached_last_layer(w, D) : nullptr;
  const LastLayerBound* bound = last ? last->bound.get() : nullptr;
  const int64_t K = w.wts.back().size(0);

  // Screen constants per point: the reference hidden vector h_c of mu_b and off_b = ||act(W h_c + b) - c_b||
  // in float64 (bounds.h, part 1).
  at::Tensor hc;
  std::vector<double> off(B, 0.0);
  const int exit_mode = early_exit_mode();
  const bool early = precision == kFp32 && exit_mode > 0 && B > 0 &&
                     (exit_mode == 2 || exit_worth_trying(w.wts.back()));
  if ((screen_requested || early) && B > 0) {
    at::Tensor mpad = mu;
    if (B < kMinGemmRows) mpad = at::cat({mu, at::zeros({kMinGemmRows - B, mu.size(1)}, mu.options())});
    hc = hidden_fp32(mpad, w).narrow(0, 0, B).contiguous();
  }
  // fp32 last layer with per-sample early exit (early_exit.h); undecided rows get fp32_final_count
  std::unique_ptr<EarlyExit> exit_plan;
  if (early) exit_plan = std::make_unique<EarlyExit>(w.wts.back(), w.bs.back(), w.acts.back(), hc, center,
                                                     early_exit_columns());
  auto final_count = [&](const at::Tensor& h, const std::vector<int64_t>& rows, int64_t m, const Block& blk) {
    if (exit_plan && !rows.empty()) {
      std::vector<int64_t> left = exit_plan->run(h, rows, blk, r2p, cp, &exit_columns);
      exit_rows += static_cast<int64_t>(rows.size());
      fp32_final_count(h, left, m, blk, center, r2, w, counts);
      exit_rechecked += static_cast<int64_t>(left.size());
      if (exit_mode == 1 && exit_rows >= 1024 && exit_columns > kExitMaxShare * exit_rows * D) exit_plan.reset();
    } else {
      fp32_final_count(h, rows, m, blk, center, r2, w, counts);
    }
  };
  if (screen_requested && B > 0) {
    // off_b (bounds.h, part 1): the fp32 last layer on h_c, its distance to c_b in float64, plus the fp32
    // layer's own error bound (the `ref` term of screen_upper with ||h_c||)
    at::Tensor yc = at::addmm(w.bs.back(), hc, w.wts.back());
    activate_(yc, w.acts.back());
    ROBBENCH_ASSERT_CONTIGUOUS(yc);
    ROBBENCH_ASSERT_CONTIGUOUS(hc);
    const float* ycp = yc.data_ptr<float>();
    const float* hcp = hc.data_ptr<float>();
    const int64_t P = yc.size(1);
    const double sqD = std::sqrt(static_cast<double>(D));
    for (int64_t b = 0; b < B; ++b) {
      double o2 = 0, h2 = 0;
      for (int64_t j = 0; j < D; ++j) {
        const double d = static_cast<double>(ycp[b * P + j]) - static_cast<double>(cen[b * D + j]);
        o2 += d * d;
      }
      for (int64_t k = 0; k < K; ++k) h2 += static_cast<double>(hcp[b * K + k]) * hcp[b * K + k];
      const double hn = std::sqrt(h2) * (1 + 1e-9);
      off[b] = (std::sqrt(o2) + sqD * (bound->lip * bound->gK1 * (bound->maxW * hn + bound->maxb) + bound->ev)) *
               (1 + 1e-9);
    }
  }

  PendingRechecks pending;
  pending.K = K;
  const RefineConfig refine = RefineConfig::from_env();
  const int64_t max_cols = static_cast<int64_t>(refine.max_share * static_cast<double>(D));
  // The refinement's reference hidden vectors (bounds.h part 4): the screen's h_c, computed here when the
  // screen is off; c = |δW h_c| for every point by one GEMM on the call's first refined row.
  if (refine.on && refine.center && use_bf16 && bound != nullptr && bound->act == kActSigmoid && !hc.defined() &&
      B > 0) {
    at::Tensor mpad = mu;
    if (B < kMinGemmRows) mpad = at::cat({mu, at::zeros({kMinGemmRows - B, mu.size(1)}, mu.options())});
    hc = hidden_fp32(mpad, w).narrow(0, 0, B).contiguous();
  }
  RefineCenters centers(bound, refine.center ? hc : at::Tensor());
  RefineAudit audit;
  std::atomic<int64_t> refined_rows{0}, refined_units{0}, recomputed{0};
  // The last hidden layer by own loops where it feeds the bf16 pass (bounds.h part 8): h' and the bound
  // eps >= ||h - h'|| per row, which the screen, the band and the refinement add; the rows left to the fp32
  // recheck get the reference's h at the flush (PendingRechecks::add_inputs, exact_hidden_rows).
  const size_t nl = w.wts.size();
  const bool fuse_hidden = use_bf16 && nl >= 2 && HiddenLayer::fusable(w.acts[nl - 2]) && fused_hidden_enabled();
  const HiddenLayer hl = fuse_hidden ? HiddenLayer::make(w.wts[nl - 2], w.bs[nl - 2], w.acts[nl - 2]) : HiddenLayer();
  for (const Block& blk : make_blocks(B, n, chunk_rows, kMinGemmRows)) {
    const int64_t ns = blk.s1 - blk.s0, m = (blk.p1 - blk.p0) * ns;
    at::Tensor z = latents(mu, sigma, ka.data_ptr<int64_t>(), kb.data_ptr<int64_t>(), blk, offset, kMinGemmRows,
                           /*reuse=*/true);
    // fh: the fused hidden layer (part 8); x is its input, h holds h' of every row in screen blocks (unused
    // otherwise: the chunks make h' of their rows in hq). Else h is the reference's.
    const bool fh = fuse_hidden && use_bf16, fh_rows = fh && !screen;  // fh_rows: h' made in the chunks
    at::Tensor x, h;
    std::vector<double> eps(fh ? m : 0, 0.0);  // per row: >= ||h - h'|| (part 8)
    if (fh) {
      x = hidden_fp32(z, w, /*reuse=*/true, /*skip_last=*/true);
      ROBBENCH_ASSERT_CONTIGUOUS(x);
      h = workspace_rows(kWsHidden + static_cast<int>(nl - 2), x.size(0), K, x.options());
    } else {
      h = hidden_fp32(z, w, /*reuse=*/true);  // bit-identical to the reference's last-layer input
    }
    const float* xp = fh ? x.data_ptr<float>() : nullptr;
    if (fh && !fh_rows) {  // screen block: h' of every row first (the screen reads its norms)
      std::vector<int64_t> all(m);
      for (int64_t r = 0; r < m; ++r) all[r] = r;
      float* hm = h.data_ptr<float>();
      at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
        std::vector<float> s2(r1 - r0);
        hidden_rows(hl, xp, all.data() + r0, r1 - r0, hm + r0 * K, s2.data(), eps.data() + r0);
      });
    }
    if (!screen && !use_bf16) {
      std::vector<int64_t> all(m);
      for (int64_t r = 0; r < m; ++r) all[r] = r;
      final_count(h, all, m, blk);
      continue;
    }
    const float* hp = h.data_ptr<float>();
    // Lipschitz screen: per row ||h|| and ||h - h_c||
    std::vector<double> nh(m);
    std::vector<int8_t> state(m, -1);  // 1 inside (decided), -1 undecided
    const float* hcp = screen ? hc.data_ptr<float>() : nullptr;
    if (!fh_rows) at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {  // fh_rows: the chunks fill nh
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = blk.p0 + r / ns;
        float s2, d2 = 0.f;
        sq_norms(hp + r * K, screen ? hcp + b * K : nullptr, K, &s2, &d2);
        // with h' (part 8): ||h|| <= ||h'|| + eps, ||h - h_c|| <= ||h' - h_c|| + eps
        const double e = fh ? eps[r] : 0.0;
        nh[r] = bound->norm_up(s2) + e;
        if (screen) {
          const double U = bound->screen_upper(nh[r], bound->norm_up(d2) + e, off[b]);
          state[r] = bound->classify(U, 0.0, static_cast<double>(r2p[b])) == 1 ? 1 : -1;
        }
      }
    });
    std::vector<int64_t> rest;
    for (int64_t r = 0; r < m; ++r) {
      if (state[r] == 1) cp[blk.p0 + r / ns] += 1;
      else rest.push_back(r);
    }
    screened += m - static_cast<int64_t>(rest.size());
    // A screen that decides little costs more (norms, row gathers) than it saves: off for the rest.
    if (screen && 8 * (m - static_cast<int64_t>(rest.size())) < m) screen = false;
    if (!use_bf16 || rest.empty()) {
      final_count(h, rest, m, blk);
      continue;
    }
    // bf16 final layer for the remaining rows, element-wise band (bounds.h, parts 2 and 3), in chunks of
    // at most kBandRows rows so that the (rows, P) intermediates stay in cache, in per-thread buffers
    // reused across blocks and calls. One parallel region over the chunks (each thread runs its chunks'
    // GEMMs single-threaded): several short parallel regions per chunk cost a fork-join each, ruinous
    // when a core is busy.
    const int64_t q = static_cast<int64_t>(rest.size()), P = bound->P, nk = bound->vk.size(1);
    // As many chunks of at most kBandRows rows as a multiple of the threads: ATen splits the chunks into one
    // contiguous range per thread, so 13 chunks on 2 threads (7:6) or 3 (2:1) leave one thread idle at the end.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t nchunks = ((q + kBandRows - 1) / kBandRows + threads - 1) / threads * threads;
    const int64_t crows = (q + nchunks - 1) / nchunks;
    std::vector<int8_t> dec(q);
    // brgemm unless ROBBENCH_BRGEMM=0 or mkldnn is off (read per call: A/B in one process)
    const Bf16Product* product =
        Bf16Product::switched_on() && Bf16Product::usable_now() ? last->product.get() : nullptr;
    const BandTiles band_tiles = BandTiles::from_env();
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      BandBuffers& bb = BandBuffers::local(kBandRows, K, P, nk, h.options());
      for (int64_t ck = k0; ck < k1; ++ck) {
        const int64_t c0 = ck * crows, nc = std::min(crows, q - c0);
        if (nc <= 0) continue;
        at::Tensor hq = bb.hq.narrow(0, 0, nc), hb = bb.hb.narrow(0, 0, nc);
        at::Tensor pv = bb.pv.narrow(0, 0, nc), sv = bb.s.narrow(0, 0, nc), s16 = bb.s16.narrow(0, 0, nc);
        const float* hqp = hq.data_ptr<float>();
        double* nhb = bb.nhb.data();
        double* ndh = bb.ndh.data();
        // one pass per row: the exact row, ĥ (round to nearest even), fp32 ||ĥ||^2 and ||δh||^2, p = fl(δh V)
        float* sq = bb.sq.data();
        uint16_t* hbp = reinterpret_cast<uint16_t*>(hb.data_ptr<at::BFloat16>());
        if (fh_rows) {  // h' (part 8) of 16 rows at a time into hq, then their bf16 pass while they are in L1
          float* hqm = hq.data_ptr<float>();
          for (int64_t i0 = 0; i0 < nc; i0 += kFusedRows) {
            const int64_t g = std::min(kFusedRows, nc - i0);
            float s2[kFusedRows];
            double e[kFusedRows];
            hidden_rows(hl, xp, rest.data() + c0 + i0, g, hqm + i0 * K, s2, e);
            prepare_bf16_rows(hqm + i0 * K, kIdentityRows, g, K, last->vt16.data_ptr<float>(), nk, hqm + i0 * K,
                              hbp + i0 * K, sq + i0, sq + nc + i0, pv.data_ptr<float>() + i0 * nk);
            for (int64_t t = 0; t < g; ++t) {
              const int64_t r = rest[c0 + i0 + t];
              eps[r] = e[t];
              nh[r] = bound->norm_up(s2[t]) + e[t];
            }
          }
        } else {
          prepare_bf16_rows(hp, rest.data() + c0, nc, K, last->vt16.data_ptr<float>(), nk, hq.data_ptr<float>(), hbp,
                            sq, sq + nc, pv.data_ptr<float>());
        }
        // δh = h - ĥ = (h' - ĥ) + (h - h'): ||δh|| <= ||h' - ĥ|| + eps and ||Ŵ δh|| <= ||Ŵ (h' - ĥ)|| + ||Ŵ||_2 eps
        // (part 8; eps = 0 without the fused hidden layer, where h' = h)
        thread_local std::vector<double> nwdh;
        nwdh.resize(nc);
        const bool vec = row_vec();
        for (int64_t i = 0; i < nc; ++i) {
          const double e = fh ? eps[rest[c0 + i]] : 0.0, d0 = bound->norm_up(sq[nc + i]);
          nhb[i] = bound->norm_up(sq[i]);
          ndh[i] = d0 + e;
          nwdh[i] = bound->norm_w_dh(pv.data_ptr<float>() + i * nk, d0, vec) + bound->spec_Wb * e * (1 + 1e-12);
        }
        // s = ĥ Ŵ^T in fp32: brgemm's fp32 accumulation itself (s_round = 0), else at::mm's bf16 output
        // widened exactly (s_round = u): bounds.h, part 6
        double s_round = 0;
        // the product tile by tile, each tile's epilogue and band terms while it is in L1 (bounds.h, part 7)
        const bool fused = band_fused(), tiles = fused && product != nullptr && band_tiles.on;
        if (product == nullptr) {
          at::mm_out(s16, hb, bound->wt_bf16);
          sv.copy_(s16);
          s_round = LastLayerBound::u;
        } else if (!tiles) {  // with tiles, decide_tiles below runs the product
          product->run(reinterpret_cast<const uint16_t*>(hb.data_ptr<at::BFloat16>()), nc, sv.data_ptr<float>(), P);
        }
        at::Tensor a = bb.a.narrow(0, 0, nc), y = bb.y.narrow(0, 0, nc);
        const float* sp = sv.data_ptr<float>();
        float* ap = a.data_ptr<float>();
        float* yp = y.data_ptr<float>();
        std::vector<double> dist(nc);
        if (!fused) unfused_epilogue(sv, a, y, w.bs.back(), w.acts.back());
        // each row's band inputs: its point's center and r^2, ||h||, ||ĥ||, ||δh|| and the bound on ||Ŵ δh||
        std::vector<BandRow> brows(nc);
        for (int64_t i = 0; i < nc; ++i) {
          const int64_t r = rest[c0 + i], b = blk.p0 + r / ns;
          brows[i] = {cen + b * D, nh[r], nhb[i], ndh[i], static_cast<double>(r2p[b]), nwdh[i]};
        }
        if (tiles) {
          bound->decide_tiles(*product, reinterpret_cast<const uint16_t*>(hb.data_ptr<at::BFloat16>()), nc,
                              sv.data_ptr<float>(), ap, yp, band_tiles.store_y, brows.data(), dec.data() + c0,
                              dist.data());
        } else {
          for (int64_t i = 0; i < nc; ++i) {
            const BandRow& g = brows[i];
            // fused (bounds.h, part 5): a = fl(s + b), y = act~(a) (own sigmoid) and the band in one pass per row
            dec[c0 + i] = fused ? bound->decide_epilogue(sp + i * P, s_round, ap + i * P, yp + i * P, g.cen, g.norm_h,
                                                         g.norm_hb, g.norm_dh, g.r2, g.norm_wdh, &dist[i])
                                : bound->decide(sp + i * P, s_round, ap + i * P, yp + i * P, g.cen, g.norm_h,
                                                g.norm_hb, g.norm_dh, g.r2, g.norm_wdh, &dist[i]);
          }
        }
        if (!refine.on) continue;
        // Refinement (bounds.h, part 4): for each undecided row, the units with the largest bounds get
        // fp32 logits from the exact h; one activation call for the chunk; then the mixed band decides.
        float* tp = bb.e.data_ptr<float>();  // scratch: one row's slope bounds
        int32_t* colp = bb.cols.data_ptr<int32_t>();
        float* lgp = bb.lg.data_ptr<float>();
        // Each row's own units H = {t_j > its level's threshold} go to sel; groups of rows of one point share
        // the union of their sets (a superset of a row's own set keeps its bound valid: e_rest covers every
        // unit left) and each W_j load (refine_groups).
        struct Group { int64_t col_off, n, lg_off, first; int nr; };
        const int64_t words = (D + 63) / 64;
        thread_local std::vector<uint64_t> sel;  // the rows' unit sets
        if (static_cast<int64_t>(sel.size()) < nc * words) sel.resize(nc * words);
        std::vector<RefineRow> todo;
        int64_t sel_used = 0;
        for (int64_t i = 0; i < nc; ++i) {
          if (dec[c0 + i] >= 0) continue;
          // the tile pass kept only s of most rows: a and ŷ of this one, as it computed them
          if (tiles && !band_tiles.store_y) bound->epilogue_row(sp + i * P, ap + i * P, yp + i * P);
          const int64_t r = rest[c0 + i], b = blk.p0 + r / ns;
          const double target = refine.kappa * std::fabs(dist[i] - std::sqrt(static_cast<double>(r2p[b])));
          const float* cb = centers.get(b);
          double dist_c = 0;
          if (cb != nullptr) {
            float s2, d2;
            sq_norms(hqp + i * K, centers.hc + b * K, K, &s2, &d2);
            dist_c = bound->norm_up(d2) + (fh ? eps[r] : 0.0);  // hq holds h' (part 8): + ||h - h'||
          }
          double e_rest = 0;
          int level = 0;
          const int64_t nsel = bound->refine_select(sp + i * P, s_round, ap + i * P, yp + i * P, nh[r], nhb[i],
                                                    ndh[i], brows[i].norm_wdh, cb, dist_c,
                                                    target, max_cols, tp, sel.data() + sel_used, &e_rest, &level);
          if (nsel < 0) continue;
          todo.push_back({i, b, sel_used, level, e_rest});
          sel_used += words;
        }
        if (todo.empty()) continue;
        if (refine.by_level) order_refine_rows(todo);
        UnitSets sets(todo, sel.data(), D);
        const std::vector<size_t> cut = refine_groups(todo, sets, refine.by_level);
        std::vector<Group> groups;
        int64_t used = 0, lg_used = 0;
        for (size_t q = 0; q + 1 < cut.size(); ++q) {
          const size_t u = cut[q], e = cut[q + 1];
          Group g{used, sets.write_union(u, e, colp + used), lg_used, static_cast<int64_t>(u),
                  static_cast<int>(e - u)};
          const float* hs[kGroupMax];
          float* outs[kGroupMax];
          for (int r = 0; r < g.nr; ++r) {
            hs[r] = hqp + todo[u + r].i * K;
            outs[r] = lgp + lg_used + r * g.n;
          }
          bound->refine_logits(hs, g.nr, colp + used, g.n, outs);
          used += g.n;
          lg_used += g.nr * g.n;
          refined_units += g.nr * g.n;
          groups.push_back(g);
        }
        if (lg_used > 0) {  // refine_select: sigmoid last layers only; the own sigmoid (bounds.h, part 5)
          if (fused) sigmoid_fp32(lgp, lgp, lg_used);
          else bb.lg.narrow(0, 0, lg_used).sigmoid_();
        }
        for (const Group& g : groups)
          for (int slot = 0; slot < g.nr; ++slot) {
            const RefineRow& t = todo[g.first + slot];
            const int64_t r = rest[c0 + t.i];
            double E = 0;
            // with h' (part 8): Δ'_j grows by ||W_j|| eps <= rd2_j eps / (2 g_{K+1}); this relies on refine_decide
            // using norm_h only in Δ'_j = rd2_j norm_h + bd2_j
            const double nh_ref = fh ? nh[r] + eps[r] / (2 * bound->gK1) : nh[r];
            dec[c0 + t.i] = bound->refine_decide(yp + t.i * P, cen + t.b * D, colp + g.col_off, g.n,
                                                 lgp + g.lg_off + slot * g.n, nh_ref, t.e_rest,
                                                 static_cast<double>(r2p[t.b]), &E);
            if (refine.audit) audit.check(hq.narrow(0, t.i, 1), w, yp + t.i * P, D, E);
          }
        refined_rows += static_cast<int64_t>(todo.size());
      }
    });
    std::vector<int64_t> redo;
    for (int64_t i = 0; i < q; ++i) {
      if (dec[i] == 1) cp[blk.p0 + rest[i] / ns] += 1;
      else if (dec[i] < 0) redo.push_back(rest[i]);
    }
    rechecked += static_cast<int64_t>(redo.size());
    bf16_rows += q;
    // The band is worst-case: when it leaves more than half of the rows undecided the bf16 pass
    // (about 0.35 of an fp32 last layer, conversions and band included) no longer pays, so the rest of
    // the call runs the fp32 final layer (same decisions).
    if (2 * static_cast<int64_t>(redo.size()) > q) use_bf16 = false;
    if (fh) {
      pending.add_inputs(x, redo, blk);
      recomputed += static_cast<int64_t>(redo.size());
    } else {
      pending.add(h, redo, blk);
    }
    if (static_cast<int64_t>(pending.pts.size()) >= kRecheckRows) pending.flush(center, r2, w, counts);
  }
  pending.flush(center, r2, w, counts);
  at::Tensor stats = at::empty({6}, counts.options());
  stats[0] = rechecked;
  stats[1] = bf16_rows;
  stats[2] = screened;
  stats[3] = exit_rows;       // samples through the early exit
  stats[4] = exit_columns;    // last-layer columns (of D) it computed for them
  stats[5] = exit_rechecked;  // of those samples, recomputed by the reference's full fp32 last layer
  if (std::getenv("ROBBENCH_BAND_STATS") != nullptr && bf16_rows > 0)  // benchmarks read this
    fprintf(stderr, "robbench bf16 band: rows %lld refined %lld rechecked %lld units %lld hidden-recomputed %lld\n",
            static_cast<long long>(bf16_rows), static_cast<long long>(refined_rows.load()),
            static_cast<long long>(rechecked), static_cast<long long>(refined_units.load()),
            static_cast<long long>(recomputed.load()));
  if (refine.audit && std::getenv("ROBBENCH_BAND_STATS") != nullptr) audit.print();
  if (exit_rows > 0) exit_remember(w.wts.back(), static_cast<double>(exit_columns) / (exit_rows * D));
  if (std::getenv("ROBBENCH_EXIT_STATS") != nullptr && exit_rows > 0)  // benchmarks/levers.py reads this
    fprintf(stderr, "robbench early exit: rows %lld columns %lld of %lld rechecked %lld\n",
            static_cast<long long>(exit_rows), static_cast<long long>(exit_columns),
            static_cast<long long>(exit_rows * D), static_cast<long long>(exit_rechecked));
  return {counts, stats};
}

// Whether this thread's fp32 arithmetic keeps subnormal numbers (kernels.denormals_are_ieee without its ATen
// calls): MXCSR (FTZ/DAZ after torch.set_flush_denormal(True)) is per thread and the op runs in the calling
// thread. volatile: computed at run time, under the thread's own MXCSR.
bool thread_keeps_subnormals() {
  volatile float tiny = 0x1p-140f;
  volatile float half = tiny * 0.5f;
  return half != 0.f;
}

// mlp_count with the stream keys made here from the stream ids (rng.stream_keys: ka = h(h(lo ^ c) ^ hi),
// kb = h(ka ^ 0x68E31DA4) on each id's two 32-bit words, h = lowbias32, c = rng.seed_key(seed)) and the
// calling thread's subnormal check: while it flushes subnormals nothing is computed and stats = [-1] (the
// caller then runs the torch reference; kernels.count_within). One op call per Monte Carlo call instead of
// the keys' numpy calls and the check's ATen calls (benchmarks/README.md, session 10).
std::tuple<at::Tensor, at::Tensor> mlp_count_ids_cpu(const at::Tensor& mu, const at::Tensor& sigma,
                                                     const at::Tensor& center, const at::Tensor& r2,
                                                     const at::Tensor& ids_, int64_t c, int64_t n, int64_t offset,
                                                     at::TensorList weights_t, at::TensorList biases,
                                                     at::IntArrayRef acts, int64_t precision, bool screen,
                                                     int64_t chunk_rows) {
  if (!thread_keeps_subnormals())
    return {at::empty({0}, at::kLong), at::full({1}, -1, at::kLong)};
  check_tensor(mu, "mu", at::kFloat, at::Device(at::kCPU), 2);
  check_tensor(ids_, "stream_ids", at::kLong, at::Device(at::kCPU), 1);
  TORCH_CHECK(ids_.size(0) == mu.size(0), "stream_ids must be (B,) with B = ", mu.size(0), ", got ", ids_.sizes());
  TORCH_CHECK(c >= 0 && c <= 0xFFFFFFFFLL, "c must be a 32-bit key (rng.seed_key), got ", c);
  const at::Tensor ids = ids_.contiguous();
  const int64_t B = ids.size(0);
  at::Tensor ka = at::empty({B}, ids.options()), kb = at::empty({B}, ids.options());
  const int64_t* s = ids.data_ptr<int64_t>();
  int64_t* pa = ka.data_ptr<int64_t>();
  int64_t* pb = kb.data_ptr<int64_t>();
  const uint32_t cc = static_cast<uint32_t>(c);
  for (int64_t i = 0; i < B; ++i) {
    const uint64_t v = static_cast<uint64_t>(s[i]);  // two's complement: the same 64 bits as numpy's view
    const uint32_t a = hash32(hash32(static_cast<uint32_t>(v) ^ cc) ^ static_cast<uint32_t>(v >> 32));
    pa[i] = a;
    pb[i] = hash32(a ^ 0x68E31DA4u);
  }
  return mlp_count_cpu(mu, sigma, center, r2, ka, kb, n, offset, weights_t, biases, acts, precision, screen,
                       chunk_rows);
}

// The generic path's epilogue: the reference computes t_d = fl(fl(y_d - c_d)^2) and sums them in fp32
// (ATen's reduction); here the same terms are summed in double and a sample is decided where the
// reference's fp32 sum is certainly on one side of r^2 (the band of fp32_final_count); the few samples
// inside the band (ties, one ulp away) get the reference's own sub/mul/sum on their gathered rows, whose
// per-row results do not depend on the other rows. So the counts are the reference's, ties included.
at::Tensor count_le_cpu(const at::Tensor& y_, const at::Tensor& center_, const at::Tensor& r2_) {
  const at::Device cpu(at::kCPU);
  check_tensor(y_, "y", at::kFloat, cpu, 3);
  check_tensor(center_, "center", at::kFloat, cpu, 2);
  TORCH_CHECK(center_.size(0) == y_.size(0) && center_.size(1) == y_.size(2), "center must be (B, D) matching y ",
              y_.sizes());
  check_r2(r2_, y_.size(0), cpu);
  at::Tensor y = y_.contiguous(), center = center_.contiguous(), r2 = r2_.contiguous();
  ROBBENCH_ASSERT_CONTIGUOUS(y);
  const int64_t B = y.size(0), S = y.size(1), D = y.size(2);
  at::Tensor counts = at::zeros({B}, y.options().dtype(at::kLong));
  const float *yp = y.data_ptr<float>(), *cp = center.data_ptr<float>(), *rp = r2.data_ptr<float>();
  const double u = std::ldexp(1.0, -24);
  const double band = (D + 4) * u / (1.0 - (D + 4) * u);
  std::vector<int8_t> dec(B * S);
  at::parallel_for(0, B * S, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / S;
      dec[i] = band_decide(yp + i * D, cp + b * D, D, band, rp[b]);
    }
  });
  int64_t* out = counts.data_ptr<int64_t>();
  std::vector<int64_t> amb, amb_pts;
  for (int64_t i = 0; i < B * S; ++i) {
    if (dec[i] == 1) out[i / S] += 1;
    else if (dec[i] < 0) { amb.push_back(i); amb_pts.push_back(i / S); }
  }
  if (amb.empty()) return counts;
  const int64_t na = static_cast<int64_t>(amb.size());
  at::Tensor sel = at::from_blob(amb.data(), {na}, at::kLong).clone();
  at::Tensor pts = at::from_blob(amb_pts.data(), {na}, at::kLong).clone();
  at::Tensor ya = y.view({B * S, D}).index_select(0, sel);
  ya.sub_(center.index_select(0, pts));
  at::Tensor inside = ya.mul_(ya).sum(1) <= r2.index_select(0, pts);
  counts.index_add_(0, pts, inside.to(at::kLong));
  return counts;
}

// [entries, hits, misses] of the last-layer cache (cached_last_layer): tests check that a rebuilt plan with
// the same weights hits and that changed contents at the same address miss.
std::vector<int64_t> last_layer_cache_stats() {
  LastLayerCache& cache = last_layer_cache();
  std::lock_guard<std::mutex> lock(cache.mutex);
  return {static_cast<int64_t>(cache.entries.size()), cache.hits, cache.misses};
}

TORCH_LIBRARY(robbench, m) {
  m.def("normals(Tensor ka, Tensor kb, Tensor j, int k) -> Tensor");
  m.def("mlp_sq_distances(Tensor mu, Tensor sigma, Tensor center, Tensor ka, Tensor kb, int n, int offset, "
        "Tensor[] weights_t, Tensor[] biases, int[] acts, int chunk_rows) -> Tensor");
  m.def("mlp_count(Tensor mu, Tensor sigma, Tensor center, Tensor r2, Tensor ka, Tensor kb, int n, int offset, "
        "Tensor[] weights_t, Tensor[] biases, int[] acts, int precision, bool screen, int chunk_rows) -> "
        "(Tensor, Tensor)");
  m.def("mlp_count_ids(Tensor mu, Tensor sigma, Tensor center, Tensor r2, Tensor stream_ids, int c, int n, "
        "int offset, Tensor[] weights_t, Tensor[] biases, int[] acts, int precision, bool screen, int chunk_rows) "
        "-> (Tensor, Tensor)");
  m.def("count_le(Tensor y, Tensor center, Tensor r2) -> Tensor");
  m.def("last_layer_cache_stats() -> int[]", &last_layer_cache_stats);
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) {
  m.impl("normals", &normals_cpu);
  m.impl("mlp_sq_distances", &mlp_sq_distances_cpu);
  m.impl("mlp_count", &mlp_count_cpu);
  m.impl("mlp_count_ids", &mlp_count_ids_cpu);
  m.impl("count_le", &count_le_cpu);
}

}  // namespace robbench
