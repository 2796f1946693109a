// robbench::mlp_attack_step: one step of the maximum-damage attack (plugins/attacks.py) on an MLP VAE,
// fused: encoder forward of x + delta, decoder forward over the eta draws, the objective, its gradient
// with respect to delta (a hand-written backward through ATen's own backward functions, no autograd),
// the normalised step and the exact projection onto {||delta|| <= radius} ∩ {lo <= x + delta <= hi}.
// robbench::mlp_stall_ascent runs robbench.projection.stall_ascent's whole loop over these steps (one call
// per ascent, from robbench_plugins.fused_attack); every other model takes the autograd path, which these
// ops reproduce up to float rounding (tests/test_fused_attack.py).
//
// Shapes: B points, N rows (rows[n] indexes the point of row n; several rows may share a point),
// D input features, E encoder outputs, k latents, F decoder outputs, S eta draws.
//   x (B, D), delta (N, D), rows (N,) int64, center (B, F) = g(mu(x)), mu_fix / sig_fix (B, k) = the
//   clean encoder outputs (used where the route or the model keeps them fixed).
//   eta: (S, B, k) fixed draws, or, when n_half > 0, antithetic draws computed here from the
//   counter-based RNG (rng.h, bit-exact with robbench.rng): for row n, samples j0 .. j0 + n_half - 1 of
//   stream (ka, kb)[rows[n]], then their negatives (S = 2 n_half); S = 0 and n_half = 0: eta = 0.
//   Objective per row: mean_s sqrt(||g(mu_r + eta_s * sigma_r) - center||^2 + 1e-12), or with eta = 0
//   the plain distance ||g(mu_r) - center||.
//   route: 0 = both (mu, sigma of x + delta), 1 = mu (sigma clean), 2 = sigma (mu clean; with eta = 0 the
//   value does not depend on delta and the gradient is 0, as in the autograd path).
//   sigma_kind: 0 = the encoder outputs [mu | pre] and sigma = softplus(pre) + sigma_offset (E = 2k);
//   1 = the encoder outputs mu (E = k) and sigma = sig_fix does not depend on x.
//   mode 0: (value (N,), an empty tensor); 1: (value, gradient (N, D)); 2: (value, new delta (N, D)): the move
//   step_len[n] * g / ||g|| (g the gradient with non-finite entries zeroed), projected exactly (in
//   float64) onto the feasible set of radius (B,)[rows[n]].
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/bf16_product.h"
#include "common/checks.h"
#include "common/rng.h"
#include "common/sigmoid.h"

#include <dlfcn.h>
#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace robbench {
namespace {

// The op runs on the calling thread alone: at 25-200 rows per product a split across threads costs more in
// synchronisation than it saves, and on a loaded machine oneDNN's and MKL's OpenMP regions wait for
// descheduled threads (measured: a pre-solve step 3-30 ms at 2 threads against 0.4 ms at 1). The guard
// sets the calling thread's OpenMP thread count (torch's own libgomp) to 1, and MKL's thread-local count
// (MKL keeps its own, set by torch: MKL_Set_Num_Threads_Local, the C entry of mkl_set_num_threads_local,
// looked up at run time, absent in builds without MKL), and restores both.
using MklLocalFn = int (*)(int);

MklLocalFn mkl_local_threads() {
  static const MklLocalFn fn = reinterpret_cast<MklLocalFn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}

struct OneThread {
#ifdef _OPENMP
  int prev = omp_get_max_threads();
#endif
  int mkl_prev = 0;
  OneThread() {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    if (auto fn = mkl_local_threads()) mkl_prev = fn(1);
  }
  ~OneThread() {
#ifdef _OPENMP
    omp_set_num_threads(prev);
#endif
    if (auto fn = mkl_local_threads()) fn(mkl_prev);  // 0 restores "use the global setting"
  }
};

// Activation codes of robbench_plugins.fused_attack.ACT_CODES.
enum AttackAct : int64_t {
  kAttNone = 0, kAttRelu = 1, kAttSigmoid = 2, kAttElu = 3, kAttLeakyRelu = 4, kAttTanh = 5,
  kAttSoftplus = 6, kAttGelu = 7
};
constexpr int64_t kAttActMax = kAttGelu;

at::Tensor act_forward(const at::Tensor& pre, int64_t act) {
  switch (act) {
    case kAttRelu: return at::relu(pre);
    case kAttSigmoid: return at::sigmoid(pre);
    case kAttElu: return at::elu(pre);
    case kAttLeakyRelu: return at::leaky_relu(pre, 0.01);
    case kAttTanh: return at::tanh(pre);
    case kAttSoftplus: return at::softplus(pre, 1.0, 20.0);
    case kAttGelu: return at::gelu(pre);
    default: return pre;
  }
}

// d loss / d pre from d loss / d out, with ATen's own backward formulas (those autograd uses).
at::Tensor act_backward(const at::Tensor& grad, const at::Tensor& pre, const at::Tensor& out, int64_t act) {
  switch (act) {
    case kAttRelu: return at::threshold_backward(grad, out, 0);
    case kAttSigmoid: return at::sigmoid_backward(grad, out);
    case kAttElu: return at::elu_backward(grad, 1.0, 1.0, 1.0, false, pre);
    case kAttLeakyRelu: return at::leaky_relu_backward(grad, pre, 0.01, false);
    case kAttTanh: return at::tanh_backward(grad, out);
    case kAttSoftplus: return at::softplus_backward(grad, pre, 1.0, 20.0);
    case kAttGelu: return at::gelu_backward(grad, pre);
    default: return grad;
  }
}

struct Mlp {
  at::TensorList w, b;
  at::IntArrayRef acts;
  // oneDNN's pre-packed forms of w and of w^T (see packed_weight), per layer; undefined where the layer
  // is small (MKL) or packing is off.
  std::vector<at::Tensor> packed, packed_t;
  // The bf16 products of the large layers (see bf16_weight): x ŵ^T (forward) and g ŵ (backward), per layer;
  // null where the layer is small, the bf16 steps are off or brgemm is unusable here.
  std::vector<std::shared_ptr<const Bf16Product>> bf16_fwd, bf16_bwd;
};

// oneDNN's fp32 linear (mkldnn::_linear_pointwise, the op torch.compile's CPU code calls): on this
// project's CPUs (AVX-512) about twice MKL's sgemm throughput at these small row counts, same fp32
// arithmetic (another summation order). Unavailable (a build without oneDNN) or ROBBENCH_ATTACK_GEMM=mkl
// (A/B runs): at::mm / at::addmm.
constexpr int64_t kDnnlMinWeights = 32768;
constexpr int64_t kDnnlMinRows = 3;
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);

// A registered op by name, typed; nullptr where this torch build lacks it (e.g. without oneDNN).
template <class Fn>
const c10::TypedOperatorHandle<Fn>* find_op(const char* name) {
  try {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
    return new c10::TypedOperatorHandle<Fn>(op.typed<Fn>());
  } catch (const std::exception&) {
    return nullptr;
  }
}

const c10::TypedOperatorHandle<LinearFn>* dnnl_linear_op() {
  static const c10::TypedOperatorHandle<LinearFn>* handle = []() -> const c10::TypedOperatorHandle<LinearFn>* {
    const char* env = std::getenv("ROBBENCH_ATTACK_GEMM");
    if ((env && std::string(env) == "mkl") || !at::hasMKLDNN()) return nullptr;
    return find_op<LinearFn>("mkldnn::_linear_pointwise");
  }();
  return handle;
}

using ReorderFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);
const c10::TypedOperatorHandle<ReorderFn>* dnnl_reorder_op() {
  static const c10::TypedOperatorHandle<ReorderFn>* handle = find_op<ReorderFn>("mkldnn::_reorder_linear_weight");
  return handle;
}

// oneDNN reorders a plain weight into its blocked layout on every product (~10-15 us of fixed cost at the
// attack's 3-100 rows, a third of the product at a few rows); a weight pre-packed once
// (mkldnn::_reorder_linear_weight, as torch.compile's freezing does) skips that, with the same results
// (the same kernel). The cache keeps the packed forms of the last kKeep weights (and of their transposes,
// for the backward products), each beside a copy of the weight it packed: a lookup compares the contents
// (memcmp, ~15 us for a 784 x 256 weight here; once per op call), so a weight changed in place, through .data or not, is never served
// stale, and a freed weight's address reused by another is harmless.
constexpr size_t kKeep = 16;
constexpr int64_t kPackBatchHint = 64;  // the layout oneDNN picks for this batch size serves 3-200 rows alike

// A cache of what is made from a weight, keyed by the weight's contents: the last kKeep entries, most
// recently used last, each beside a copy of its weight (a lookup memcmps it, so a weight changed in place is
// never served stale). get(w, make) returns the entry for w, made by make(w contiguous) on a miss (under the
// lock: concurrent op calls make each entry once).
template <typename Made>
class WeightCache {
 public:
  template <typename Make>
  Made get(const at::Tensor& w, Make make) {
    const at::Tensor wc = w.contiguous();
    const size_t bytes = static_cast<size_t>(wc.numel()) * sizeof(float);
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = entries_.size(); i-- > 0;) {
      const Entry& e = entries_[i];
      if (e.copy.sizes() == wc.sizes() &&
          std::memcmp(e.copy.template data_ptr<float>(), wc.data_ptr<float>(), bytes) == 0) {
        Entry hit = e;
        entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
        entries_.push_back(hit);
        return hit.made;
      }
    }
    Entry e{wc.clone(), make(wc)};
    if (entries_.size() >= kKeep) entries_.erase(entries_.begin());
    entries_.push_back(e);
    return e.made;
  }

 private:
  struct Entry {
    at::Tensor copy;
    Made made;
  };
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

// (w packed, w^T packed) for the products x w^T and x w.
std::pair<at::Tensor, at::Tensor> packed_weight(const at::Tensor& w) {
  static WeightCache<std::pair<at::Tensor, at::Tensor>> cache;
  return cache.get(w, [](const at::Tensor& wc) {
    // x w = x (w^T)^T: for the backward products oneDNN packs the (in, out) weight w^T.
    return std::make_pair(dnnl_reorder_op()->call(wc, kPackBatchHint),
                          dnnl_reorder_op()->call(wc.t().contiguous(), kPackBatchHint));
  });
}

// A/B switches, read from the environment at each op call (so runs can be interleaved in one process):
// ROBBENCH_ATTACK_DNNL=plain: oneDNN on the plain weights at every row count, as before the pack cache;
// ROBBENCH_ATTACK_PROJ=scalar: the projection's sums in sequential order (project_row);
// ROBBENCH_ATTACK_SMALL=off: no small-row kernels (small_linear); =<n>: they take products on <= n rows.
thread_local bool tl_plain_dnnl = false;
thread_local bool tl_scalar_projection_env = false;
constexpr int64_t kSmallRows = 64;
thread_local bool tl_small_off = false;
thread_local int64_t tl_small_rows = kSmallRows;

// ROBBENCH_ATTACK_BF16: which products of the large layers (>= kDnnlMinWeights weights) run in bf16 (exact
// bf16 products, fp32 accumulation, fp32 output: Bf16Product). "steps" (the default): those of the ascent
// steps (mode 2: the gradient that sets a step's direction); every objective value (mode 0: the scores that
// pick the best iterate and decide the stalls, the candidates' scores) and every gradient of mode 1 stay in
// fp32, so the attack returns an fp32-scored best iterate. "off" (or "0"): everything in fp32 (the engine
// before session 6). "all": the values in bf16 too (A/B only). Where brgemm is unusable (no AVX512-BF16,
// torch.backends.mkldnn disabled) the products stay in fp32.
enum Bf16Mode : int { kBf16Off = 0, kBf16Steps = 1, kBf16All = 2 };
constexpr Bf16Mode kBf16Default = kBf16Steps;
thread_local Bf16Mode tl_bf16 = kBf16Default;

// An "off | <n>" switch from the environment: {off, n}, n = dflt when unset or off.
struct CountSwitch {
  bool off;
  int64_t n;
};
CountSwitch read_count_switch(const char* name, int64_t dflt) {
  const char* env = std::getenv(name);
  const bool off = env && std::string(env) == "off";
  return {off, env && !off ? static_cast<int64_t>(std::atoi(env)) : dflt};
}

void read_ab_switches() {
  const char* env = std::getenv("ROBBENCH_ATTACK_DNNL");
  tl_plain_dnnl = env && std::string(env) == "plain";
  const char* proj = std::getenv("ROBBENCH_ATTACK_PROJ");
  tl_scalar_projection_env = proj && std::string(proj) == "scalar";
  const CountSwitch small = read_count_switch("ROBBENCH_ATTACK_SMALL", kSmallRows);
  tl_small_off = small.off;
  tl_small_rows = small.n;
  const char* bf = std::getenv("ROBBENCH_ATTACK_BF16");
  const std::string bfs = bf ? bf : "";
  if (bfs.empty()) tl_bf16 = kBf16Default;
  else if (bfs == "steps" || bfs == "1") tl_bf16 = kBf16Steps;
  else if (bfs == "off" || bfs == "0") tl_bf16 = kBf16Off;
  else if (bfs == "all") tl_bf16 = kBf16All;
  else TORCH_CHECK(false, "ROBBENCH_ATTACK_BF16 must be steps, off or all, got '", bfs, "'");
}

// The bf16 products of a weight w (out, in): (x ŵ^T, g ŵ) with ŵ = w rounded to bf16 (RNE), made once and
// kept beside a copy of the weight they were made from (Bf16Product::make costs 2-3 ms: its self-check);
// a lookup compares the contents, as packed_weight does, so a weight changed in place is never served
// stale. Null products where make() refused (brgemm unusable, self-check failed): the layer then stays in
// fp32; a refusal because torch.backends.mkldnn is disabled is not cached (it can be re-enabled).
using Bf16Pair = std::pair<std::shared_ptr<const Bf16Product>, std::shared_ptr<const Bf16Product>>;

Bf16Pair bf16_weight(const at::Tensor& w) {
  static WeightCache<Bf16Pair> cache;
  if (!Bf16Product::usable_now()) return {};
  return cache.get(w, [](const at::Tensor& wc) {
    const at::Tensor wb = wc.to(at::kBFloat16);
    // forward x ŵ^T: Bf16Product takes Ŵ^T (in, out); backward g ŵ = g (ŵ^T)^T: it takes ŵ (out, in)
    return Bf16Pair(Bf16Product::make(wb.t().contiguous()), Bf16Product::make(wb));
  });
}

// The bias and activation applied in place to n rows of y (stride P) right after their product, while the
// rows are in cache: y = act(y + b), act none, relu or sigmoid (the own fp32 sigmoid of common/sigmoid.h,
// within 5.4 v of the exact one: these are step directions, not values).
__attribute__((target("avx512f,avx512bw,avx512vl")))
void bias_act_rows(float* y, int64_t n, int64_t P, const float* b, int64_t act) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < n; ++r) {
    float* yr = y + r * P;
    for (int64_t j = 0; j < P; j += 16) {
      const __mmask16 m = P - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (P - j)) - 1u);
      __m512 v = _mm512_maskz_loadu_ps(m, yr + j);
      if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + j));
      if (act == kAttRelu) v = _mm512_max_ps(zero, v);  // max(0, NaN) is NaN, as at::relu
      else if (act == kAttSigmoid) v = sigmoid_avx512(v);
      _mm512_mask_storeu_ps(yr + j, m, v);
    }
  }
}

bool fused_bf16_epilogue_available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// y (N, P) = x ŵ^T (+ b) through a Bf16Product: x rounded to bf16 (RNE), exact products, fp32 accumulation
// and output. x: (N, prod.K). With `fused` (forward layers), relu and sigmoid are applied too, per row tile
// right after its product, and *fused is set (the layer's output then stands for its pre-activation, as on
// oneDNN's fused path).
at::Tensor bf16_linear(const at::Tensor& x, const Bf16Product& prod, const at::Tensor& b, int64_t act = kAttNone,
                       bool* fused = nullptr) {
  const at::Tensor xb = x.to(at::kBFloat16).contiguous();
  const int64_t N = xb.size(0), K = prod.K, P = prod.P;
  at::Tensor y = at::empty({N, P}, xb.options().dtype(at::kFloat));
  const bool epi = fused_bf16_epilogue_available();
  const bool fuse_act = epi && fused && (act == kAttRelu || act == kAttSigmoid);
  const at::Tensor bc = b.defined() ? b.contiguous() : at::Tensor();
  const uint16_t* px = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  float* py = y.data_ptr<float>();
  for (int64_t r0 = 0; r0 < N; r0 += Bf16Product::kRows) {
    const int64_t m = std::min(Bf16Product::kRows, N - r0);
    prod.run(px + r0 * K, m, py + r0 * P, P);
    if (epi && (bc.defined() || fuse_act))
      bias_act_rows(py + r0 * P, m, P, bc.defined() ? bc.data_ptr<float>() : nullptr, fuse_act ? act : kAttNone);
  }
  if (!epi && bc.defined()) y.add_(bc);
  if (fused) *fused = fuse_act;
  return y;
}

// Products on up to kSmallRows rows. The attack's late bisection steps run on 1-8 active rows (4-32
// decoder rows); there a oneDNN / MKL call costs mostly its fixed overhead (primitive lookup, allocation,
// its own weight layout) and the read of the weight. These AVX-512 kernels read the weight w (out, in) as
// it is, for both products: x w^T (forward: per output, dot products over in) and g w (backward: per
// block of input columns, a sum over out of g-scaled weight rows). So there is no pack to look up, and the
// backward product of a layer can find its weight still in L2 after the forward (decoder), or the next
// forward after the backward (encoder). fp32 FMAs, summed in another order than oneDNN's (float rounding).
// The limit, 64 rows, was the fastest of 8 / 16 / 32 / 64 / 128 / 256 on recorded beta-VAE attack calls
// (benchmarks/README.md, session 4); without AVX-512 every product goes to oneDNN / MKL as before.

bool small_kernels_available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// y[r][c] = x_r . w_c (+ b_c) for R rows of x (stride K) and C rows of w (stride K); y stride ldy.
template <int R, int C>
__attribute__((target("avx512f"), always_inline)) inline void dot_block(const float* x, const float* w, int64_t K,
                                                                         const float* b, float* y, int64_t ldy) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * K + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (i < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - i)) - 1u);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_maskz_loadu_ps(m, w + c * K + i);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + i);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]) + (b ? b[c] : 0.0f);
}

// y (N, M) = x (N, K) w^T + b, w (M, K) row-major. A block of weight rows stays in L1 over all rows of x;
// 16 (4 x 4) or 8 (1 x 8) independent accumulators keep both FMA pipes busy.
__attribute__((target("avx512f")))
void small_forward(const float* x, int64_t N, int64_t K, const float* w, int64_t M, const float* b, float* y) {
  const int64_t N4 = N / 4 * 4;
  int64_t o = 0;
  for (; o + 8 <= M; o += 8) {
    const float* bo = b ? b + o : nullptr;
    for (int64_t n = 0; n < N4; n += 4) {
      dot_block<4, 4>(x + n * K, w + o * K, K, bo, y + n * M + o, M);
      dot_block<4, 4>(x + n * K, w + (o + 4) * K, K, bo ? bo + 4 : nullptr, y + n * M + o + 4, M);
    }
    for (int64_t n = N4; n < N; ++n) dot_block<1, 8>(x + n * K, w + o * K, K, bo, y + n * M + o, M);
  }
  for (; o < M; ++o) {
    const float* bo = b ? b + o : nullptr;
    for (int64_t n = 0; n < N; ++n) dot_block<1, 1>(x + n * K, w + o * K, K, bo, y + n * M + o, M);
  }
}

// out[r][i0 + 16 c + j] = sum_o g[r][o] w[o][i0 + 16 c + j] for R rows of g (stride M), C vectors of
// columns (the last one masked by `last`), over all M rows of w (stride K).
template <int R, int C>
__attribute__((target("avx512f"), always_inline)) inline void axpy_block(const float* g, int64_t M, const float* w,
                                                                          int64_t K, int64_t i0, __mmask16 last,
                                                                          float* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t o = 0; o < M; ++o) {
    const float* wo = w + o * K + i0;
    __m512 wv[C];
    for (int c = 0; c < C; ++c)
      wv[c] = c + 1 < C ? _mm512_loadu_ps(wo + 16 * c) : _mm512_maskz_loadu_ps(last, wo + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 gv = _mm512_set1_ps(g[r * M + o]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(gv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      if (c + 1 < C) _mm512_storeu_ps(out + r * K + i0 + 16 * c, acc[r][c]);
      else _mm512_mask_storeu_ps(out + r * K + i0 + 16 * c, last, acc[r][c]);
}

// axpy_block over all columns: blocks of C vectors, then single vectors, the last one masked.
template <int R, int C>
__attribute__((target("avx512f"), always_inline)) inline void axpy_rows(const float* g, int64_t M, const float* w,
                                                                         int64_t K, float* out) {
  int64_t i = 0;
  for (; i + 16 * C <= K; i += 16 * C) axpy_block<R, C>(g, M, w, K, i, 0xFFFF, out);
  for (; i + 16 <= K; i += 16) axpy_block<R, 1>(g, M, w, K, i, 0xFFFF, out);
  if (i < K) axpy_block<R, 1>(g, M, w, K, i, static_cast<__mmask16>((1u << (K - i)) - 1u), out);
}

// out (N, K) = g (N, M) w, w (M, K) row-major: the backward product of a layer with weight w. R x C = 16
// (8 x 2, 4 x 4) or 8 (2 x 4, 1 x 8) independent accumulators.
__attribute__((target("avx512f")))
void small_backward(const float* g, int64_t N, int64_t M, const float* w, int64_t K, float* out) {
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) axpy_rows<8, 2>(g + n * M, M, w, K, out + n * K);
  for (; n + 4 <= N; n += 4) axpy_rows<4, 4>(g + n * M, M, w, K, out + n * K);
  for (; n + 2 <= N; n += 2) axpy_rows<2, 4>(g + n * M, M, w, K, out + n * K);
  for (; n < N; ++n) axpy_rows<1, 8>(g + n * M, M, w, K, out + n * K);
}

// True when the small-row kernels take every product on at most `rows` rows.
bool small_kernels_cover(int64_t rows) {
  return !tl_small_off && rows <= tl_small_rows && small_kernels_available();
}

// The small-row product x w^T + b, or x w when `transposed`, where the kernels cover x's rows; else undefined.
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool transposed) {
  const int64_t N = x.size(0);
  if (N == 0 || !small_kernels_cover(N)) return at::Tensor();
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = wc.size(0), K = wc.size(1);
  if (!transposed) {
    at::Tensor y = at::empty({N, M}, xc.options());
    const at::Tensor bc = b.defined() ? b.contiguous() : at::Tensor();
    small_forward(xc.data_ptr<float>(), N, K, wc.data_ptr<float>(), M, bc.defined() ? bc.data_ptr<float>() : nullptr,
                  y.data_ptr<float>());
    return y;
  }
  TORCH_INTERNAL_ASSERT(!b.defined(), "the backward product has no bias");
  at::Tensor out = at::empty({N, K}, xc.options());
  small_backward(xc.data_ptr<float>(), N, M, wc.data_ptr<float>(), K, out.data_ptr<float>());
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t act = kAttNone,
                  bool* fused = nullptr, bool transposed = false, const at::Tensor& packed = at::Tensor()) {
  if (at::Tensor y = small_linear(x, w, b, transposed); y.defined()) {
    if (fused) *fused = false;
    return y;
  }
  const auto* op = w.numel() >= kDnnlMinWeights && (!packed.defined() || x.size(0) >= kDnnlMinRows)
                       ? dnnl_linear_op()
                       : nullptr;
  if (fused) *fused = false;
  if (op) {
    const char* attr = "none";
    if (fused && (act == kAttRelu || act == kAttSigmoid || act == kAttTanh)) {
      attr = act == kAttRelu ? "relu" : act == kAttSigmoid ? "sigmoid" : "tanh";
      *fused = true;
    }
    const at::Tensor weight = packed.defined() ? packed : (transposed ? w.t() : w);
    return op->call(x, weight, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt, attr,
                    c10::List<std::optional<at::Scalar>>(), std::nullopt);
  }
  const at::Tensor wt = transposed ? w : w.t();
  return b.defined() ? at::addmm(b, x, wt) : at::mm(x, wt);
}

// Fills net.packed / packed_t for the layers that go to oneDNN (once per op call: the lookup compares the
// weights' contents), unless ROBBENCH_ATTACK_DNNL=plain or this build lacks oneDNN's reorder.
void pack_layers(Mlp& net) {
  if (tl_plain_dnnl || !dnnl_linear_op() || !dnnl_reorder_op()) return;
  net.packed.assign(net.w.size(), at::Tensor());
  net.packed_t.assign(net.w.size(), at::Tensor());
  for (size_t l = 0; l < net.w.size(); ++l)
    if (net.w[l].numel() >= kDnnlMinWeights) std::tie(net.packed[l], net.packed_t[l]) = packed_weight(net.w[l]);
}

// Fills net.bf16_fwd / bf16_bwd for the large layers (a lookup in bf16_weight's cache).
void bf16_layers(Mlp& net) {
  net.bf16_fwd.assign(net.w.size(), nullptr);
  net.bf16_bwd.assign(net.w.size(), nullptr);
  for (size_t l = 0; l < net.w.size(); ++l)
    if (net.w[l].numel() >= kDnnlMinWeights) std::tie(net.bf16_fwd[l], net.bf16_bwd[l]) = bf16_weight(net.w[l]);
}

// The layer's bf16 product for this call (forward or backward), or null for the fp32 path.
const Bf16Product* bf16_of(const Mlp& net, size_t l, bool backward, bool bf16) {
  const auto& v = backward ? net.bf16_bwd : net.bf16_fwd;
  if (!bf16 || v.empty() || !v[l] || !Bf16Product::usable_now()) return nullptr;
  return v[l].get();
}

// Forward through the layers, keeping every pre-activation and output for the backward pass (a layer
// whose activation oneDNN applied keeps its output as "pre": act_backward reads only the output there).
// bf16: the large layers' products in bf16 (bf16_layers filled them).
at::Tensor mlp_forward(const Mlp& net, at::Tensor h, std::vector<at::Tensor>* pres, std::vector<at::Tensor>* outs,
                       bool bf16 = false) {
  for (size_t l = 0; l < net.w.size(); ++l) {
    bool fused = false;
    const Bf16Product* prod = bf16_of(net, l, false, bf16);
    at::Tensor pre = prod ? bf16_linear(h, *prod, net.b[l], net.acts[l], &fused)
                          : linear(h, net.w[l], net.b[l], net.acts[l], &fused, false,
                                   net.packed.empty() ? at::Tensor() : net.packed[l]);
    h = fused ? pre : act_forward(pre, net.acts[l]);
    if (pres) {
      pres->push_back(pre);
      outs->push_back(h);
    }
  }
  return h;
}

// g: d loss / d output of the last layer (or / d its pre-activation when `last_done`).
at::Tensor mlp_backward(const Mlp& net, at::Tensor g, const std::vector<at::Tensor>& pres,
                        const std::vector<at::Tensor>& outs, bool last_done = false, bool bf16 = false) {
  for (size_t l = net.w.size(); l-- > 0;) {
    if (!(last_done && l + 1 == net.w.size())) g = act_backward(g, pres[l], outs[l], net.acts[l]);
    const Bf16Product* prod = bf16_of(net, l, true, bf16);
    g = prod ? bf16_linear(g, *prod, at::Tensor())
             : linear(g, net.w[l], at::Tensor(), kAttNone, nullptr, true,
                      net.packed_t.empty() ? at::Tensor() : net.packed_t[l]);
  }
  return g;
}

void check_mlp_layers(const Mlp& net, const std::string& name, int64_t in) {
  const at::Device cpu(at::kCPU);
  TORCH_CHECK(!net.w.empty() && net.w.size() == net.b.size() && net.w.size() == net.acts.size(),
              name, "_w, ", name, "_b and ", name, "_acts must have one entry per layer");
  for (size_t l = 0; l < net.w.size(); ++l) {
    check_tensor(net.w[l], name + "_w[" + std::to_string(l) + "]", at::kFloat, cpu, 2);
    check_tensor(net.b[l], name + "_b[" + std::to_string(l) + "]", at::kFloat, cpu, 1);
    TORCH_CHECK(net.w[l].size(1) == in, name, "_w[", l, "] must be (out, ", in, "), got ", net.w[l].sizes());
    TORCH_CHECK(net.b[l].size(0) == net.w[l].size(0), name, "_b[", l, "] must be (", net.w[l].size(0), ",)");
    TORCH_CHECK(net.acts[l] >= 0 && net.acts[l] <= kAttActMax, name, "_acts[", l, "] must be an activation code 0..",
                kAttActMax, ", got ", net.acts[l]);
    in = net.w[l].size(0);
  }
}

int64_t mlp_out(const Mlp& net) { return net.w.back().size(0); }

// Exact Euclidean projection of v onto {||d|| <= r} ∩ {lo - x <= d <= hi - x} for one row, in float64:
// the same fixed point iteration as robbench.projection.project_ball_box (see its docstring). The sums are
// vectorised (omp simd: lane partial sums, added in another order than the Python reference, which the
// fixed point absorbs to float64 rounding); ROBBENCH_ATTACK_PROJ=scalar runs the sequential loops (A/B).
template <bool kSimd>
__attribute__((always_inline)) inline void project_row_body(const float* v, const float* x, double r, double lo_box,
                                                            double hi_box, int64_t D, float* out) {
  const double r2 = r * r;
  double full2 = 0.0;
  if constexpr (kSimd) {
#pragma omp simd reduction(+ : full2)
    for (int64_t i = 0; i < D; ++i) {
      const double xi = x[i], vi = v[i];
      const double f = std::max(std::min(vi, hi_box - xi), lo_box - xi);
      full2 += f * f;
    }
  } else {
    for (int64_t i = 0; i < D; ++i) {
      const double xi = x[i], vi = v[i];
      const double f = std::max(std::min(vi, hi_box - xi), lo_box - xi);
      full2 += f * f;
    }
  }
  double t = 1.0;
  if (full2 > r2) {
    for (int it = 0; it < 100; ++it) {
      double c = 0.0, s = 0.0;
      if constexpr (kSimd) {
#pragma omp simd reduction(+ : c, s)
        for (int64_t i = 0; i < D; ++i) {
          const double xi = x[i], vi = v[i];
          const double lo = lo_box - xi, hi = hi_box - xi, tv = t * vi;
          const bool clipped = tv > hi || tv < lo;
          const double face = vi > 0 ? hi : lo;
          c += clipped ? face * face : 0.0;
          s += clipped ? 0.0 : vi * vi;
        }
      } else {
        for (int64_t i = 0; i < D; ++i) {
          const double xi = x[i], vi = v[i];
          const double lo = lo_box - xi, hi = hi_box - xi, tv = t * vi;
          if (tv > hi || tv < lo) {
            const double face = vi > 0 ? hi : lo;
            c += face * face;
          } else {
            s += vi * vi;
          }
        }
      }
      double t_next = std::min(std::sqrt(std::max(r2 - c, 0.0) / std::max(s, 1e-300)), 1.0);
      if (it > 0) t_next = std::max(t_next, t);  // after the first solve t only rises
      if (t_next == t) break;
      t = t_next;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const double xi = x[i];
    out[i] = static_cast<float>(std::max(std::min(t * static_cast<double>(v[i]), hi_box - xi), lo_box - xi));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void project_row_simd(const float* v, const float* x, double r, double lo_box, double hi_box, int64_t D, float* out) {
  project_row_body<true>(v, x, r, lo_box, hi_box, D, out);
}

void project_row_scalar(const float* v, const float* x, double r, double lo_box, double hi_box, int64_t D,
                        float* out) {
  project_row_body<false>(v, x, r, lo_box, hi_box, D, out);
}

void project_row(const float* v, const float* x, double r, double lo_box, double hi_box, int64_t D, float* out) {
  if (tl_scalar_projection_env) project_row_scalar(v, x, r, lo_box, hi_box, D, out);
  else project_row_simd(v, x, r, lo_box, hi_box, D, out);
}

// The objective's epilogue, fused: y (S' N, F) decoder outputs (S' = max(S, 1), draw-major), center (N, F).
// value[n] = mean_s sqrt(||y_sn - c_n||^2 + floor) (floor 1e-12 with draws, 0 without). With gpre, also
// d value / d pre of the decoder's last layer when it ends in a sigmoid (y (1 - y) (y - c) / (S' dist)),
// or d value / d y otherwise; a zero distance (no draws) has gradient 0.
at::Tensor distance_epilogue(const at::Tensor& y, const at::Tensor& center, int64_t S, bool sigmoid_last,
                             at::Tensor* gpre) {
  const int64_t Sp = std::max<int64_t>(S, 1), N = center.size(0), F = center.size(1);
  const double floor = S > 0 ? 1e-12 : 0.0;
  ROBBENCH_ASSERT_CONTIGUOUS(y);
  ROBBENCH_ASSERT_CONTIGUOUS(center);
  at::Tensor dist = at::empty({Sp, N}, y.options());
  const float *py = y.data_ptr<float>(), *pc = center.data_ptr<float>();
  float* pd = dist.data_ptr<float>();
  float* pg = nullptr;
  if (gpre) {
    *gpre = at::empty_like(y);
    pg = gpre->data_ptr<float>();
  }
  at::parallel_for(0, Sp * N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* yr = py + r * F;
      const float* cr = pc + (r % N) * F;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < F; ++i) {
        const float e = yr[i] - cr[i];
        acc += e * e;
      }
      const float d = static_cast<float>(std::sqrt(static_cast<double>(acc) + floor));
      pd[r] = d;
      if (!pg) continue;
      const float scale = d > 0 ? 1.0f / (d * static_cast<float>(Sp)) : 0.0f;
      float* gr = pg + r * F;
      if (sigmoid_last) {
#pragma omp simd
        for (int64_t i = 0; i < F; ++i) gr[i] = (yr[i] - cr[i]) * scale * (yr[i] * (1.0f - yr[i]));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < F; ++i) gr[i] = (yr[i] - cr[i]) * scale;
      }
    }
  });
  return dist.mean(0);
}

// The validated inputs every call shares (see the file comment for the shapes).
struct Problem {
  at::Tensor x, center, mu_fix, sig_fix, ka, kb, radius;
  Mlp enc, dec;
  int64_t route, sigma_kind;
  double sigma_offset, lo_box, hi_box;
  int64_t B, D, k;
};

Problem make_problem(const at::Tensor& x, const at::Tensor& center, const at::Tensor& mu_fix, const at::Tensor& sig_fix,
                     const at::Tensor& ka, const at::Tensor& kb, int64_t n_half, at::TensorList enc_w,
                     at::TensorList enc_b, at::IntArrayRef enc_acts, at::TensorList dec_w, at::TensorList dec_b,
                     at::IntArrayRef dec_acts, int64_t route, int64_t sigma_kind, double sigma_offset,
                     const at::Tensor& radius, bool need_radius, double lo_box, double hi_box, int64_t max_rows,
                     bool steps) {
  const at::Device cpu(at::kCPU);
  check_tensor(x, "x", at::kFloat, cpu, 2);
  check_tensor(center, "center", at::kFloat, cpu, 2);
  check_tensor(mu_fix, "mu_fix", at::kFloat, cpu, 2);
  check_tensor(sig_fix, "sig_fix", at::kFloat, cpu, 2);
  const int64_t B = x.size(0), D = x.size(1), k = mu_fix.size(1);
  TORCH_CHECK(center.size(0) == B && mu_fix.size(0) == B && sig_fix.sizes() == mu_fix.sizes(),
              "center, mu_fix and sig_fix must have B = ", B, " rows (mu_fix, sig_fix: (B, k))");
  TORCH_CHECK(route >= 0 && route <= 2, "route must be 0 (both), 1 (mu) or 2 (sigma), got ", route);
  TORCH_CHECK(sigma_kind == 0 || sigma_kind == 1, "sigma_kind must be 0 (softplus head) or 1 (fixed), got ",
              sigma_kind);
  Mlp enc{enc_w, enc_b, enc_acts}, dec{dec_w, dec_b, dec_acts};
  check_mlp_layers(enc, "enc", D);
  check_mlp_layers(dec, "dec", k);
  if (!small_kernels_cover(max_rows)) {  // else no product of the call goes to oneDNN: no pack lookup
    pack_layers(enc);
    pack_layers(dec);
  }
  if (tl_bf16 == kBf16All || (tl_bf16 == kBf16Steps && steps)) {  // the call computes steps in bf16
    bf16_layers(enc);
    bf16_layers(dec);
  }
  TORCH_CHECK(mlp_out(enc) == (sigma_kind == 0 ? 2 * k : k), "the encoder must output ", sigma_kind == 0 ? 2 * k : k,
              " features for sigma_kind ", sigma_kind, ", got ", mlp_out(enc));
  TORCH_CHECK(center.size(1) == mlp_out(dec), "center must be (B, ", mlp_out(dec), ")");
  if (n_half > 0) {
    check_tensor(ka, "ka", at::kLong, cpu, 1);
    check_tensor(kb, "kb", at::kLong, cpu, 1);
    TORCH_CHECK(ka.size(0) == B && kb.size(0) == B, "ka and kb must be (B,) with B = ", B);
  }
  if (need_radius) {
    check_tensor(radius, "radius", at::kFloat, cpu, 1);
    TORCH_CHECK(radius.size(0) == B, "radius must be (B,) with B = ", B);
  }
  return Problem{x.contiguous(), center.contiguous(), mu_fix.contiguous(), sig_fix.contiguous(),
                 n_half > 0 ? ka.contiguous() : ka, n_half > 0 ? kb.contiguous() : kb,
                 need_radius ? radius.contiguous() : radius, enc, dec, route, sigma_kind, sigma_offset, lo_box,
                 hi_box, B, D, k};
}

// rows (N,) in [0, B); delta (N, D); eta (S, B, k) fixed draws (used when n_half == 0; empty: eta = 0).
void check_call(const Problem& P, const at::Tensor& rows, const at::Tensor& delta, const at::Tensor& eta, int64_t j0,
                int64_t n_half) {
  const at::Device cpu(at::kCPU);
  check_tensor(delta, "delta", at::kFloat, cpu, 2);
  check_tensor(rows, "rows", at::kLong, cpu, 1);
  const int64_t N = delta.size(0);
  TORCH_CHECK(delta.size(1) == P.D, "delta must be (N, ", P.D, "), got ", delta.sizes());
  TORCH_CHECK(rows.size(0) == N, "rows must be (N,) with N = ", N, ", got ", rows.sizes());
  TORCH_CHECK(n_half >= 0 && j0 >= 0 && j0 + n_half <= (int64_t(1) << 32),
              "j0 and n_half: sample indices must lie in [0, 2^32)");
  if (N > 0) {
    const auto r = at::aminmax(rows);
    TORCH_CHECK(std::get<0>(r).item<int64_t>() >= 0 && std::get<1>(r).item<int64_t>() < P.B,
                "rows must index the B = ", P.B, " points");
  }
  if (n_half == 0 && eta.numel() > 0) {
    check_tensor(eta, "eta", at::kFloat, cpu, 3);
    TORCH_CHECK(eta.size(1) == P.B && eta.size(2) == P.k, "eta must be (S, ", P.B, ", ", P.k, "), got ", eta.sizes());
  }
}

// One evaluation (mode 0), gradient (1) or projected step (2) on rows of the problem (checked inputs).
// The rows of one call and the point data gathered for them (rows = 0..B-1: no copies).
struct RowSet {
  at::Tensor rows, xg, center, mu, sig, eta;  // eta: the fixed draws (S, N, k), or empty
};

RowSet row_set(const Problem& P, const at::Tensor& rows_, const at::Tensor& eta) {
  at::Tensor rows = rows_.contiguous();
  const int64_t N = rows.size(0);
  bool identity = N == P.B;
  const int64_t* pr = rows.data_ptr<int64_t>();
  for (int64_t n = 0; n < N && identity; ++n) identity = pr[n] == n;
  auto gather = [&](const at::Tensor& t, int64_t dim) { return identity ? t : t.index_select(dim, rows).contiguous(); };
  return RowSet{rows, gather(P.x, 0), gather(P.center, 0), gather(P.mu_fix, 0), gather(P.sig_fix, 0),
                eta.numel() > 0 ? gather(eta, 1) : eta};
}

// One evaluation (mode 0), gradient (1) or projected step (2) on the rows R (checked inputs); the draws
// are R.eta when fixed_eta, else antithetic from the streams (n_half > 0), else eta = 0.
std::tuple<at::Tensor, at::Tensor> core(const Problem& P, const RowSet& R, const at::Tensor& delta_, bool fixed_eta,
                                        int64_t j0, int64_t n_half, const at::Tensor& step_len_, int64_t mode) {
  const at::Tensor &x_ = P.x, &ka_ = P.ka, &kb_ = P.kb, &radius_ = P.radius;
  const Mlp &enc = P.enc, &dec = P.dec;
  const int64_t route = P.route, sigma_kind = P.sigma_kind, D = P.D, k = P.k, N = delta_.size(0);
  const double sigma_offset = P.sigma_offset, lo_box = P.lo_box, hi_box = P.hi_box;
  const bool use_eta = fixed_eta && n_half == 0 && R.eta.numel() > 0;
  // bf16 products (ROBBENCH_ATTACK_BF16): the steps' gradients (mode 2) by default, everything with "all"
  const bool bf16 = tl_bf16 == kBf16All || (tl_bf16 == kBf16Steps && mode == 2);
  const int64_t S = n_half > 0 ? 2 * n_half : (use_eta ? R.eta.size(0) : 0);
  const at::Tensor& rows = R.rows;
  const at::Tensor& xg = R.xg;
  at::Tensor delta = delta_.contiguous();
  at::Tensor center = R.center;

  // Encoder (the route decides whether it is needed at all).
  const bool mu_from_enc = route != 2;
  const bool sig_from_enc = route != 1 && S > 0 && sigma_kind == 0;
  std::vector<at::Tensor> enc_pre, enc_out;
  at::Tensor mu, sig, sig_pre;
  if (mu_from_enc || sig_from_enc) {
    at::Tensor out = mlp_forward(enc, xg + delta, &enc_pre, &enc_out, bf16);
    mu = mu_from_enc ? out.narrow(1, 0, k) : R.mu;
    if (sig_from_enc) {
      sig_pre = out.narrow(1, k, k);
      sig = at::softplus(sig_pre, 1.0, 20.0) + sigma_offset;
    }
  } else {
    mu = R.mu;
  }
  if (S > 0 && !sig.defined()) sig = R.sig;

  // eta (S, N, k)
  at::Tensor eta;
  if (n_half > 0) {
    eta = at::empty({S, N, k}, x_.options());
    at::Tensor kac = ka_.contiguous(), kbc = kb_.contiguous();
    const int64_t *pa = kac.data_ptr<int64_t>(), *pb = kbc.data_ptr<int64_t>(), *pr = rows.data_ptr<int64_t>();
    float* pe = eta.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t s = 0; s < n_half; ++s) {
          float* e = pe + (s * N + n) * k;
          normals_row(static_cast<uint32_t>(pa[pr[n]]), static_cast<uint32_t>(pb[pr[n]]),
                      static_cast<uint32_t>(j0 + s), k, e);
          float* neg = pe + ((s + n_half) * N + n) * k;
          for (int64_t i = 0; i < k; ++i) neg[i] = -e[i];
        }
    });
  } else if (S > 0) {
    eta = R.eta;
  }

  // Decoder over the draws and the objective.
  at::Tensor z;
  if (S > 0) {  // z = mu + eta * sigma, (S N, k)
    z = at::empty({S * N, k}, x_.options());
    const at::Tensor muc = mu.contiguous(), sigc = sig.contiguous(), etac = eta.contiguous();
    const float *pm = muc.data_ptr<float>(), *ps = sigc.data_ptr<float>(), *pe = etac.data_ptr<float>();
    float* pz = z.data_ptr<float>();
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < N * k; ++j) pz[s * N * k + j] = pm[j] + pe[s * N * k + j] * ps[j];
    eta = etac;
  } else {
    z = mu.contiguous();
  }
  std::vector<at::Tensor> dec_pre, dec_out;
  const bool grad = mode > 0;
  at::Tensor y = mlp_forward(dec, z, grad ? &dec_pre : nullptr, grad ? &dec_out : nullptr, bf16).contiguous();
  center = center.contiguous();
  // With a sigmoid last layer the epilogue also applies the sigmoid's derivative (fused).
  const bool sigmoid_last = dec.acts.back() == kAttSigmoid;
  at::Tensor gy;
  at::Tensor value = distance_epilogue(y, center, S, sigmoid_last, grad ? &gy : nullptr);
  if (mode == 0) return {value, at::empty({0}, x_.options())};

  // Backward through the decoder, the latent sample and the encoder.
  at::Tensor gz = mlp_backward(dec, gy, dec_pre, dec_out, sigmoid_last, bf16);  // (S N, k)
  at::Tensor gdelta;
  if (mu_from_enc || sig_from_enc) {
    // d/d encoder outputs: [sum_s gz | softplus'(pre) * sum_s gz * eta] (zeros for what delta does not reach)
    const int64_t E = sigma_kind == 0 ? 2 * k : k, Sp = std::max<int64_t>(S, 1);
    at::Tensor gout = at::zeros({N, E}, x_.options());
    const at::Tensor gzc = gz.contiguous();
    const float* pgz = gzc.data_ptr<float>();
    float* pgo = gout.data_ptr<float>();
    const at::Tensor sp = sig_from_enc ? sig_pre.contiguous() : at::Tensor();
    const float* pe = sig_from_enc ? eta.data_ptr<float>() : nullptr;
    const float* pp = sig_from_enc ? sp.data_ptr<float>() : nullptr;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < k; ++i) {
        float gm = 0.0f, gs = 0.0f;
        for (int64_t s = 0; s < Sp; ++s) {
          const int64_t j = (s * N + n) * k + i;
          gm += pgz[j];
          if (pe) gs += pgz[j] * pe[j];
        }
        if (mu_from_enc) pgo[n * E + i] = gm;
        if (pe) {  // softplus_backward(beta 1, threshold 20), as autograd computes it
          const float x = pp[n * k + i];
          const float ez = std::exp(x);
          pgo[n * E + k + i] = x > 20.0f ? gs : gs * ez / (ez + 1.0f);
        }
      }
    gdelta = mlp_backward(enc, gout, enc_pre, enc_out, false, bf16);
  } else {
    gdelta = at::zeros({N, D}, x_.options());
  }
  if (mode == 1) return {value, gdelta};

  // The normalised step and the projection, per row: g with non-finite entries replaced as
  // torch.nan_to_num does (nan 0, +-inf the largest finite floats), v = delta + step_len * g / max(||g||,
  // 1e-20) in float32, then the exact projection.
  gdelta = gdelta.contiguous();
  at::Tensor v = at::empty_like(delta);
  at::Tensor out = at::empty_like(delta);
  at::Tensor step_len = step_len_.contiguous();
  ROBBENCH_ASSERT_CONTIGUOUS(xg);
  ROBBENCH_ASSERT_CONTIGUOUS(delta);
  const float *pg = gdelta.data_ptr<float>(), *pdl = delta.data_ptr<float>(), *px = xg.data_ptr<float>(),
              *prad = radius_.data_ptr<float>(), *psl = step_len.data_ptr<float>();
  const int64_t* pr = rows.data_ptr<int64_t>();
  float *pv = v.data_ptr<float>(), *po = out.data_ptr<float>();
  constexpr float kMax = std::numeric_limits<float>::max();
  for (int64_t n = 0; n < N; ++n) {
    float* vr = pv + n * D;
    const float* gr = pg + n * D;
    double sq = 0.0;
    for (int64_t i = 0; i < D; ++i) {
      const float gi = std::isnan(gr[i]) ? 0.0f : std::min(std::max(gr[i], -kMax), kMax);
      vr[i] = gi;
      sq += static_cast<double>(gi) * gi;
    }
    const float norm = std::max(static_cast<float>(std::sqrt(sq)), 1e-20f);
    const float sl = psl[n];
    const float* dr = pdl + n * D;
    for (int64_t i = 0; i < D; ++i) vr[i] = dr[i] + sl * (vr[i] / norm);
    project_row(vr, px + n * D, static_cast<double>(prad[pr[n]]), lo_box, hi_box, D, po + n * D);
  }
  return {value, out};
}


std::tuple<at::Tensor, at::Tensor> mlp_attack_step_cpu(
    const at::Tensor& x_, const at::Tensor& delta_, const at::Tensor& rows_, const at::Tensor& center_,
    const at::Tensor& mu_fix_, const at::Tensor& sig_fix_, const at::Tensor& eta_, const at::Tensor& ka_,
    const at::Tensor& kb_, int64_t j0, int64_t n_half, at::TensorList enc_w, at::TensorList enc_b,
    at::IntArrayRef enc_acts, at::TensorList dec_w, at::TensorList dec_b, at::IntArrayRef dec_acts, int64_t route,
    int64_t sigma_kind, double sigma_offset, const at::Tensor& step_len_, const at::Tensor& radius_, double lo_box,
    double hi_box, int64_t mode) {
  const OneThread one_thread;
  read_ab_switches();
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (value), 1 (gradient) or 2 (step), got ", mode);
  const int64_t draws = n_half > 0 ? 2 * n_half : (eta_.numel() > 0 ? eta_.size(0) : 1);
  const Problem P = make_problem(x_, center_, mu_fix_, sig_fix_, ka_, kb_, n_half, enc_w, enc_b, enc_acts, dec_w, dec_b,
                                 dec_acts, route, sigma_kind, sigma_offset, radius_, mode == 2, lo_box, hi_box,
                                 delta_.size(0) * draws, mode == 2);
  check_call(P, rows_, delta_, eta_, j0, n_half);
  if (mode == 2) {
    check_tensor(step_len_, "step_len", at::kFloat, at::Device(at::kCPU), 1);
    TORCH_CHECK(step_len_.size(0) == delta_.size(0), "step_len must be (N,) with N = ", delta_.size(0));
  }
  return core(P, row_set(P, rows_, n_half > 0 ? at::empty({0}, x_.options()) : eta_), delta_, true, j0, n_half,
              step_len_, mode);
}

// The stall loop's rows split into groups, one thread each (mlp_stall_ascent). Every row's decisions (its
// step halving, best iterate, active flag) depend on that row alone and all rows check at the same steps,
// so contiguous groups can each run the whole loop on their own thread, joined once at the end: no
// per-step barrier (a split of each product across threads waited for descheduled threads on a loaded
// machine: 10-70x slower steps, see OneThread). Inside a group everything stays on its thread.
// The partition does not depend on the thread count: a row's last bits depend on the other rows of its
// products (kernel choice and blocking by row count), so a thread-count-dependent split made results
// differ between --threads 1 and 2 (session 9). Groups: min(kSplitGroups, rows / kSplitMinRows), run on
// min(groups, torch's intra-op threads) threads (one thread: one after another on the calling thread).
// ROBBENCH_ATTACK_SPLIT=off: one group, =<n>: at least n rows per group (A/B runs; read at each call by
// read_split_switch).
constexpr int64_t kSplitMinRows = 4;
constexpr int64_t kSplitGroups = 2;  // the machine's (and CI's) default torch thread count
thread_local bool tl_split_off = false;
thread_local int64_t tl_split_min_rows = kSplitMinRows;

void read_split_switch() {
  const CountSwitch split = read_count_switch("ROBBENCH_ATTACK_SPLIT", kSplitMinRows);
  tl_split_off = split.off;
  tl_split_min_rows = std::max<int64_t>(1, split.n);
}

// The number of row groups for a call on M rows (the same at every thread count).
int64_t split_groups(int64_t M) {
  if (tl_split_off) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(kSplitGroups, M / tl_split_min_rows));
}

struct StallResult {
  at::Tensor best, best_val;
  int64_t enc_rows, dec_rows;
};

// The stall loop on the rows given (rows (M,), delta0 (M, D) projected starts, alpha0 (M,)), on the
// calling thread.
StallResult stall_loop(const Problem& P, const at::Tensor& rows_, const at::Tensor& delta0, const at::Tensor& alpha0,
                       const at::Tensor& eval_eta_, int64_t n_half, int64_t steps, int64_t check_every,
                       double stall_tol, double min_step) {
  const int64_t M = delta0.size(0);
  const at::Tensor none = at::empty({0}, P.x.options());
  at::Tensor rows = rows_.contiguous();
  at::Tensor delta = delta0.contiguous().clone();
  at::Tensor best = delta.clone();
  const int64_t S_eval = eval_eta_.numel() > 0 ? eval_eta_.size(0) : 1;
  int64_t enc_rows = M, dec_rows = M * S_eval;
  at::Tensor best_val = std::get<0>(core(P, row_set(P, rows, eval_eta_), delta, true, 0, 0, none, 0)).contiguous();
  at::Tensor alpha = alpha0.contiguous().clone();
  float *pbv = best_val.data_ptr<float>(), *pal = alpha.data_ptr<float>(), *pd = delta.data_ptr<float>(),
        *pb = best.data_ptr<float>();
  const float *prad = P.radius.data_ptr<float>();
  const int64_t* prow = rows.data_ptr<int64_t>();
  const int64_t D = P.D;
  const float min_step_f = static_cast<float>(min_step), tol_f = static_cast<float>(stall_tol);
  std::vector<char> active(M);
  for (int64_t i = 0; i < M; ++i) active[i] = pal[i] >= min_step_f;

  at::Tensor idx, rows_a, step_len, cur;
  RowSet active_rows;
  auto gather = [&]() {
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < M; ++i)
      if (active[i]) ids.push_back(i);
    const int64_t n = static_cast<int64_t>(ids.size());
    idx = at::empty({n}, rows.options());
    rows_a = at::empty({n}, rows.options());
    step_len = at::empty({n}, P.x.options());
    cur = at::empty({n, D}, P.x.options());
    int64_t *pi = idx.data_ptr<int64_t>(), *pr = rows_a.data_ptr<int64_t>();
    float *ps = step_len.data_ptr<float>(), *pc = cur.data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = ids[j];
      pi[j] = i;
      pr[j] = prow[i];
      ps[j] = pal[i] * prad[prow[i]];  // alpha * radius in float32, as in stall_ascent
      std::copy(pd + i * D, pd + (i + 1) * D, pc + j * D);
    }
    active_rows = row_set(P, rows_a, eval_eta_);  // gathered once per active set, not per call
  };
  gather();
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t n = idx.size(0);
    if (n == 0) break;
    cur = std::get<1>(core(P, active_rows, cur, false, step * n_half, n_half, step_len, 2)).contiguous();
    enc_rows += n;
    dec_rows += n * (n_half > 0 ? 2 * n_half : 1);
    if ((step + 1) % check_every != 0 && step != steps - 1) continue;
    enc_rows += n;
    dec_rows += n * S_eval;
    at::Tensor val = std::get<0>(core(P, active_rows, cur, true, 0, 0, none, 0)).contiguous();
    const float *pv = val.data_ptr<float>(), *pc = cur.data_ptr<float>();
    const int64_t* pi = idx.data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = pi[j];
      const float bv = pbv[i], v = pv[j];
      const bool gain = v - bv > tol_f * std::fabs(bv);
      std::copy(pc + j * D, pc + (j + 1) * D, pd + i * D);
      if (v > bv) {
        pbv[i] = v;
        std::copy(pc + j * D, pc + (j + 1) * D, pb + i * D);
      }
      if (!gain) {  // back to the best iterate, half the step
        std::copy(pb + i * D, pb + (i + 1) * D, pd + i * D);
        pal[i] *= 0.5f;
      }
      active[i] = active[i] && pal[i] >= min_step_f;
    }
    gather();
  }
  return {best, best_val, enc_rows, dec_rows};
}

// robbench.projection.stall_ascent with the op's steps and scores, the whole loop here (same decisions,
// same order of updates): delta0 (R B, D) the projected starts, rows (R B,) their points, alpha0 (R B,)
// first steps (fractions of the radius). Steps use n_half antithetic draws j0 = step * n_half of the
// points' streams (n_half 0: eta = 0); scores use eval_eta (S, B, k) (empty: eta = 0).
// Returns every row's best scored iterate and its score, and (enc rows, dec rows, groups): the rows it
// ran through the encoder and the decoder and the number of row groups (threads) it ran in:
// ((R B, D), (R B,), (3,) int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_stall_ascent_cpu(
    const at::Tensor& x_, const at::Tensor& delta0_, const at::Tensor& rows_, const at::Tensor& center_,
    const at::Tensor& mu_fix_, const at::Tensor& sig_fix_, const at::Tensor& eval_eta_, const at::Tensor& ka_,
    const at::Tensor& kb_, int64_t n_half, at::TensorList enc_w, at::TensorList enc_b, at::IntArrayRef enc_acts,
    at::TensorList dec_w, at::TensorList dec_b, at::IntArrayRef dec_acts, int64_t route, int64_t sigma_kind,
    double sigma_offset, const at::Tensor& radius_, const at::Tensor& alpha0_, int64_t steps, int64_t check_every,
    double stall_tol, double min_step, double lo_box, double hi_box) {
  const int64_t threads = at::get_num_threads();  // before OneThread: the caller's intra-op thread count
  read_split_switch();
  const int64_t groups = split_groups(delta0_.size(0));
  const OneThread one_thread;
  read_ab_switches();
  const int64_t draws = std::max<int64_t>({2 * n_half, eval_eta_.numel() > 0 ? eval_eta_.size(0) : 1, 1});
  // Products run on a group's rows: the pack lookup is needed when the small kernels do not cover them.
  const int64_t group_rows = (delta0_.size(0) + groups - 1) / groups;
  const Problem P = make_problem(x_, center_, mu_fix_, sig_fix_, ka_, kb_, n_half, enc_w, enc_b, enc_acts, dec_w, dec_b,
                                 dec_acts, route, sigma_kind, sigma_offset, radius_, true, lo_box, hi_box,
                                 group_rows * draws, steps > 0);
  check_call(P, rows_, delta0_, eval_eta_, 0, 0);
  TORCH_CHECK(n_half >= 0 && steps * n_half < (int64_t(1) << 32), "steps * n_half must stay below 2^32");
  TORCH_CHECK(steps >= 0 && check_every >= 1, "steps must be >= 0 and check_every >= 1");
  check_tensor(alpha0_, "alpha0", at::kFloat, at::Device(at::kCPU), 1);
  const int64_t M = delta0_.size(0);
  TORCH_CHECK(alpha0_.size(0) == M, "alpha0 must be (N,) with N = ", M);
  at::Tensor counts = at::zeros({3}, rows_.options());
  int64_t* pc = counts.data_ptr<int64_t>();
  pc[2] = groups;
  if (groups == 1) {
    StallResult r = stall_loop(P, rows_, delta0_, alpha0_, eval_eta_, n_half, steps, check_every, stall_tol, min_step);
    pc[0] = r.enc_rows;
    pc[1] = r.dec_rows;
    return {r.best, r.best_val, counts};
  }
  // Group g: rows [g M / G, (g + 1) M / G). With several threads: one parallel region (at::parallel_for
  // over the groups, grain 1, a team of min(G, threads)), each group single-threaded inside (OneThread,
  // this thread's A/B switches); with one thread the groups run one after another here.
  std::vector<StallResult> parts(groups);
  auto run_groups = [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t a = g * M / groups, len = (g + 1) * M / groups - a;
      parts[g] = stall_loop(P, rows_.narrow(0, a, len), delta0_.narrow(0, a, len), alpha0_.narrow(0, a, len),
                            eval_eta_, n_half, steps, check_every, stall_tol, min_step);
    }
  };
  if (threads <= 1) {
    run_groups(0, groups);
  } else {
#ifdef _OPENMP
    omp_set_num_threads(static_cast<int>(std::min(threads, groups)));  // OneThread set 1 above; it restores
#endif
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      const OneThread inner;
      read_ab_switches();
      run_groups(g0, g1);
    });
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  std::vector<at::Tensor> bests, vals;
  for (const StallResult& r : parts) {
    bests.push_back(r.best);
    vals.push_back(r.best_val);
    pc[0] += r.enc_rows;
    pc[1] += r.dec_rows;
  }
  return {at::cat(bests, 0), at::cat(vals, 0), counts};
}

// project_ball_box for (N, D) rows: tests compare it with robbench.projection.project_ball_box.
at::Tensor project_ball_box_cpu(const at::Tensor& v_, const at::Tensor& x_, const at::Tensor& radius_, double lo_box,
                                double hi_box) {
  read_ab_switches();
  const at::Device cpu(at::kCPU);
  check_tensor(v_, "v", at::kFloat, cpu, 2);
  check_tensor(x_, "x", at::kFloat, cpu, 2);
  check_tensor(radius_, "radius", at::kFloat, cpu, 1);
  TORCH_CHECK(x_.sizes() == v_.sizes(), "x must have v's shape ", v_.sizes());
  TORCH_CHECK(radius_.size(0) == v_.size(0), "radius must be (N,) with N = ", v_.size(0));
  at::Tensor v = v_.contiguous(), x = x_.contiguous(), rad = radius_.to(at::kDouble).contiguous();
  at::Tensor out = at::empty_like(v);
  const int64_t N = v.size(0), D = v.size(1);
  const float *pv = v.data_ptr<float>(), *px = x.data_ptr<float>();
  const double* prad = rad.data_ptr<double>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) project_row(pv + n * D, px + n * D, prad[n], lo_box, hi_box, D, po + n * D);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("mlp_attack_step(Tensor x, Tensor delta, Tensor rows, Tensor center, Tensor mu_fix, Tensor sig_fix, "
        "Tensor eta, Tensor ka, Tensor kb, int j0, int n_half, Tensor[] enc_w, Tensor[] enc_b, int[] enc_acts, "
        "Tensor[] dec_w, Tensor[] dec_b, int[] dec_acts, int route, int sigma_kind, float sigma_offset, "
        "Tensor step_len, Tensor radius, float lo, float hi, int mode) -> (Tensor, Tensor)");
  m.def("mlp_stall_ascent(Tensor x, Tensor delta0, Tensor rows, Tensor center, Tensor mu_fix, Tensor sig_fix, "
        "Tensor eval_eta, Tensor ka, Tensor kb, int n_half, Tensor[] enc_w, Tensor[] enc_b, int[] enc_acts, "
        "Tensor[] dec_w, Tensor[] dec_b, int[] dec_acts, int route, int sigma_kind, float sigma_offset, "
        "Tensor radius, Tensor alpha0, int steps, int check_every, float stall_tol, float min_step, float lo, "
        "float hi) -> (Tensor, Tensor, Tensor)");
  m.def("project_ball_box(Tensor v, Tensor x, Tensor radius, float lo, float hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) {
  m.impl("mlp_attack_step", &mlp_attack_step_cpu);
  m.impl("mlp_stall_ascent", &mlp_stall_ascent_cpu);
  m.impl("project_ball_box", &project_ball_box_cpu);
}

}  // namespace robbench
