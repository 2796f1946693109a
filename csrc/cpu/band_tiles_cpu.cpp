// Test and benchmark ops for the tile-wise band (LastLayerBound::decide_tiles, bounds.h part 7):
//   robbench::band_tiles_check(Tensor h, Tensor wt, Tensor b, Tensor cen, Tensor r2, int act, bool tiles)
//       -> (Tensor dec, Tensor dist, Tensor bound)
//     the bf16 band's decisions (n, R) int8 (1 inside, 0 outside, -1 undecided) at R radii^2 per row r2
//     (n, R), ||ŷ - c|| (n,) float64 and the band's E >= ||y_ref - ŷ|| (n,) float64
//     for hidden rows h (n, K) fp32, the last layer wt (K, P) = W^T, b (P,), act (0 identity, 1 ReLU,
//     2 sigmoid), per-row centers cen (n, P); tiles: decide_tiles (true) or the whole
//     product then decide_epilogue per row (false). The rows' ĥ, norms and δh V as the chunk loop makes them.
//   robbench::band_tiles_timing(Tensor h, Tensor wt, Tensor b, Tensor cen, Tensor r2, int repeats) -> float[]
//     microseconds per pass over h's rows (sigmoid): [product alone, product + row epilogue, tile pass],
//     the best of 8 interleaved rounds of the calling thread's CPU time after a warm-up; decide_tiles'
//     switch ROBBENCH_LEAN_TERMS applies.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#include "common/bf16_product.h"
#include "common/bf16_rows.h"
#include "common/bounds.h"
#include "common/decoder.h"

namespace robbench {
namespace {

// One band set-up: the layer's bound and product, the rows' ĥ bits, norms and per-row arguments.
struct BandSetup {
  std::shared_ptr<const LastLayerBound> bound;
  std::shared_ptr<const Bf16Product> prod;
  std::vector<uint16_t> hb;
  std::vector<BandRow> rows;
  at::Tensor cen;
  int64_t n = 0, P = 0;
};

BandSetup make_setup(const at::Tensor& h, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& cen,
                     const at::Tensor& r2, int64_t act) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(), "h must be (n, K) fp32 CPU");
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kFloat && wt.size(0) == h.size(1),
              "wt must be (K, P) fp32 with K = h.size(1)");
  const int64_t n = h.size(0), K = h.size(1), P = wt.size(1);
  TORCH_CHECK(b.dim() == 1 && b.size(0) == P && b.scalar_type() == at::kFloat, "b must be (P,) fp32");
  TORCH_CHECK(cen.dim() == 2 && cen.size(0) == n && cen.size(1) == P && cen.scalar_type() == at::kFloat,
              "cen must be (n, P) fp32");
  TORCH_CHECK(r2.dim() == 1 && r2.size(0) == n && r2.scalar_type() == at::kFloat, "r2 must be (n,) fp32");
  TORCH_CHECK(act == kActNone || act == kActRelu || act == kActSigmoid, "act must be 0, 1 or 2, got ", act);
  BandSetup st;
  st.n = n;
  st.P = P;
  const at::Tensor wtc = wt.contiguous(), bc = b.contiguous();
  st.bound = std::make_shared<const LastLayerBound>(LastLayerBound::make(wtc, bc, act, P));
  std::string why;
  st.prod = Bf16Product::make(st.bound->wt_bf16, &why);
  TORCH_CHECK(st.prod != nullptr, "band_tiles: ", why);
  const at::Tensor hc = h.contiguous();
  const at::Tensor& vk = st.bound->vk;
  const int64_t nk = vk.size(1);
  at::Tensor vt16 = at::zeros({16, K}, h.options());
  vt16.narrow(0, 0, nk).copy_(vk.t());
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  std::vector<float> hq(n * K), sq(2 * n), pv(n * nk);
  st.hb.resize(n * K);
  prepare_bf16_rows(hc.data_ptr<float>(), idx.data(), n, K, vt16.data_ptr<float>(), nk, hq.data(), st.hb.data(),
                    sq.data(), sq.data() + n, pv.data());
  st.cen = cen.contiguous();
  const float* cp = st.cen.data_ptr<float>();
  const at::Tensor r2c = r2.contiguous();
  const float* rp = r2c.data_ptr<float>();
  st.rows.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    float s2, unused;
    sq_norms(hq.data() + i * K, nullptr, K, &s2, &unused);
    const double ndh = st.bound->norm_up(sq[n + i]);
    st.rows[i] = {cp + i * P, st.bound->norm_up(s2), st.bound->norm_up(sq[i]), ndh, static_cast<double>(rp[i]),
                  st.bound->norm_w_dh(pv.data() + i * nk, ndh, row_vec())};
  }
  return st;
}

// The row path: the whole product, then decide_epilogue per row.
void rows_pass(const BandSetup& st, float* s, float* a, float* y, int8_t* dec, double* dist, double* bound) {
  st.prod->run(st.hb.data(), st.n, s, st.P);
  for (int64_t i = 0; i < st.n; ++i) {
    const BandRow& r = st.rows[i];
    dec[i] = st.bound->decide_epilogue(s + i * st.P, 0.0, a + i * st.P, y + i * st.P, r.cen, r.norm_h, r.norm_hb,
                                       r.norm_dh, r.r2, r.norm_wdh, &dist[i], bound != nullptr ? bound + i : nullptr);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> band_tiles_check(const at::Tensor& h, const at::Tensor& wt,
                                                                const at::Tensor& b, const at::Tensor& cen,
                                                                const at::Tensor& r2, int64_t act, bool tiles) {
  TORCH_CHECK(r2.dim() == 2 && r2.size(0) == h.size(0) && r2.size(1) > 0 && r2.scalar_type() == at::kFloat,
              "r2 must be (n, R) fp32, R >= 1 radii per row");
  const at::Tensor r2c = r2.contiguous();
  BandSetup st = make_setup(h, wt, b, cen, r2c.select(1, 0).contiguous(), act);
  const int64_t R = r2.size(1);
  const float* rp = r2c.data_ptr<float>();
  std::vector<float> s(st.n * st.P), a(st.n * st.P), y(st.n * st.P);
  at::Tensor dec = at::empty({st.n, R}, at::kChar), dist = at::empty({st.n}, at::kDouble),
             bound = at::empty({st.n}, at::kDouble);
  std::vector<int8_t> d(st.n);
  for (int64_t k = 0; k < R; ++k) {
    for (int64_t i = 0; i < st.n; ++i) st.rows[i].r2 = static_cast<double>(rp[i * R + k]);
    if (tiles)
      st.bound->decide_tiles(*st.prod, st.hb.data(), st.n, s.data(), a.data(), y.data(), false, st.rows.data(),
                             d.data(), dist.data_ptr<double>(), bound.data_ptr<double>());
    else
      rows_pass(st, s.data(), a.data(), y.data(), d.data(), dist.data_ptr<double>(), bound.data_ptr<double>());
    for (int64_t i = 0; i < st.n; ++i) dec.data_ptr<int8_t>()[i * R + k] = d[i];
  }
  return {dec, dist, bound};
}

std::vector<double> band_tiles_timing(const at::Tensor& h, const at::Tensor& wt, const at::Tensor& b,
                                      const at::Tensor& cen, const at::Tensor& r2, int64_t repeats) {
  TORCH_CHECK(repeats > 0, "repeats must be positive, got ", repeats);
  const BandSetup st = make_setup(h, wt, b, cen, r2, kActSigmoid);
  std::vector<float> s(st.n * st.P), a(st.n * st.P), y(st.n * st.P);
  std::vector<int8_t> dec(st.n);
  std::vector<double> dist(st.n);
  // the calling thread's CPU time (another job on the core does not count), the best of 8 rounds each
  auto now_us = [] {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
  };
  auto product = [&] { st.prod->run(st.hb.data(), st.n, s.data(), st.P); };
  auto rows = [&] { rows_pass(st, s.data(), a.data(), y.data(), dec.data(), dist.data(), nullptr); };
  auto tiles = [&] {
    st.bound->decide_tiles(*st.prod, st.hb.data(), st.n, s.data(), a.data(), y.data(), false, st.rows.data(),
                           dec.data(), dist.data());
  };
  product();
  rows();
  tiles();
  std::vector<double> best(3, 1e300);
  for (int round = 0; round < 8; ++round) {
    int k = 0;
    for (const std::function<void()>& f : {std::function<void()>(product), std::function<void()>(rows),
                                           std::function<void()>(tiles)}) {
      const double t0 = now_us();
      for (int64_t r = 0; r < repeats; ++r) f();
      best[k] = std::min(best[k], (now_us() - t0) / repeats);
      ++k;
    }
  }
  return best;
}

}  // namespace
}  // namespace robbench

TORCH_LIBRARY_FRAGMENT(robbench, m) {
  m.def("band_tiles_check(Tensor h, Tensor wt, Tensor b, Tensor cen, Tensor r2, int act, bool tiles) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("band_tiles_timing(Tensor h, Tensor wt, Tensor b, Tensor cen, Tensor r2, int repeats) -> float[]",
        &robbench::band_tiles_timing);
}

TORCH_LIBRARY_IMPL(robbench, CPU, m) { m.impl("band_tiles_check", &robbench::band_tiles_check); }
