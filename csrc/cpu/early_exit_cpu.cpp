// Per-sample early exit of the last layer (the bound and its proof: csrc/common/early_exit.h).
#include "common/early_exit.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/bounds.h"
#include "common/decoder.h"

namespace robbench {
namespace {
constexpr double kV = 1.0 / 16777216.0;
double gam(double n) { return n * kV / (1.0 - n * kV); }
double act_d(int64_t act, double t) {
  if (act == kActSigmoid) return 1.0 / (1.0 + std::exp(-t));
  if (act == kActRelu) return t > 0 ? t : 0.0;
  return t;
}
}  // namespace

EarlyExit::EarlyExit(const at::Tensor& wt, const at::Tensor& b, int64_t act, const at::Tensor& hc,
                     const at::Tensor& center, const std::vector<int64_t>& widths)
    : wt_(wt), b_(b), hc_(hc.contiguous()), center_(center.contiguous()), act_(act) {
  K_ = wt.size(0);
  D_ = center.size(1);
  start_.push_back(0);
  for (size_t i = 0; start_.back() < D_; ++i)
    start_.push_back(std::min(D_, start_.back() + std::max<int64_t>(1, widths[std::min(i, widths.size() - 1)])));
  nc_ = static_cast<int64_t>(start_.size()) - 1;
  lip_ = act == kActSigmoid ? 0.25 : 1.0;
  ev_ = act == kActSigmoid ? 16 * kV : 0.0;
  gK1_ = gam(static_cast<double>(K_ + 1));
  gc_ = (K_ + 2) * std::ldexp(1.0, -53) / (1 - (K_ + 2) * std::ldexp(1.0, -53));
  q_ = gam(static_cast<double>(D_ + 2)) + 4 * kV;
  at::Tensor wd = wt.narrow(1, 0, D_).to(at::kDouble);  // (K, D)
  at::Tensor rn = (wd.norm(2, {0}) * (1 + 1e-6)).contiguous();
  at::Tensor bd = b.narrow(0, 0, D_).to(at::kDouble).abs().contiguous();
  rowW_.assign(rn.data_ptr<double>(), rn.data_ptr<double>() + D_);
  babs_.assign(bd.data_ptr<double>(), bd.data_ptr<double>() + D_);
  const double nW = rn.norm().item<double>() * (1 + 1e-9), nb = bd.norm().item<double>() * (1 + 1e-9);
  E_w_ = 2 * lip_ * gK1_ * nW * (1 + 1e-9);
  E_0_ = (2 * lip_ * gK1_ * nb + 2 * ev_ * std::sqrt(static_cast<double>(D_))) * (1 + 1e-9) + 1e-300;
  pts_.resize(hc_.size(0));
}

double EarlyExit::tb(const Point& pt, int64_t j, double delta) const {
  const double rho = (rowW_[j] * delta + gK1_ * (rowW_[j] * (pt.hcn + delta) + babs_[j]) + pt.eps[j]) * (1 + 1e-12);
  const double lo = act_d(act_, pt.ac[j] - rho) - ev_, hi = act_d(act_, pt.ac[j] + rho) + ev_;
  const double c = pt.c[j];
  const double m = std::max(hi - c, c - lo);
  return m * m * (1 + 1e-12);
}

int EarlyExit::grid_index(double s, double delta) const {
  constexpr int kMinGrid = -512;
  if (!(delta > s * std::exp2(kMinGrid / 16.0))) return kMinGrid;
  int g = static_cast<int>(std::ceil(16.0 * std::log2(delta / s)));
  while (s * std::exp2(g / 16.0) < delta) ++g;  // guard the log's rounding: delta <= delta_g
  return std::max(g, kMinGrid);
}

void EarlyExit::prepare(int64_t p, double delta_typ) {
  Point& pt = pts_[p];
  at::Tensor hcp = hc_[p].to(at::kDouble);
  pt.hcn = hcp.norm().item<double>() * (1 + 1e-9);
  if (!wd_.defined()) {
    wd_ = wt_.narrow(1, 0, D_).to(at::kDouble).t().contiguous();  // (D, K), once per call
    bd_ = b_.narrow(0, 0, D_).to(at::kDouble);
  }
  at::Tensor ac = (at::mv(wd_, hcp) + bd_).contiguous();
  pt.ac.assign(ac.data_ptr<double>(), ac.data_ptr<double>() + D_);
  pt.eps.resize(D_);
  for (int64_t j = 0; j < D_; ++j) pt.eps[j] = gc_ * (rowW_[j] * pt.hcn + babs_[j]) * 2 + 1e-300;
  const float* cen = center_.data_ptr<float>() + p * D_;
  pt.c.assign(cen, cen + D_);  // original order while the order is chosen
  std::vector<double> t(D_);
  // Order by an estimate of E[(y_j - c_j)^2]: the offset (act(a_cj) - c_j)^2 (an attacked point's mean
  // decodes away from the center) plus the linearisation act'(a_cj)^2 ||W_j||^2 delta^2 / K (h - h_c of
  // norm delta in a random direction), capped by the bound t_j(delta). Ordering by t_j alone puts the
  // saturated units first when delta is large (their interval covers [0, 1]), which contribute least.
  for (int64_t j = 0; j < D_; ++j) {
    double slope = 1.0;
    if (act_ == kActSigmoid) {
      const double y = act_d(act_, pt.ac[j]);
      slope = y * (1 - y);
    } else if (act_ == kActRelu) {
      slope = pt.ac[j] > 0 ? 1.0 : 0.5;
    }
    const double lin = slope * rowW_[j] * delta_typ, off = act_d(act_, pt.ac[j]) - pt.c[j];
    t[j] = std::min(off * off + lin * lin / static_cast<double>(K_), tb(pt, j, delta_typ));
  }
  pt.order.resize(D_);
  std::iota(pt.order.begin(), pt.order.end(), 0);
  std::stable_sort(pt.order.begin(), pt.order.end(), [&](int64_t a, int64_t b) { return t[a] > t[b]; });
  // permute the per-column data into block order
  std::vector<double> ac2(D_), eps2(D_), c2(D_);
  for (int64_t i = 0; i < D_; ++i) {
    ac2[i] = pt.ac[pt.order[i]];
    eps2[i] = pt.eps[pt.order[i]];
    c2[i] = pt.c[pt.order[i]];
  }
  pt.ac.swap(ac2);
  pt.eps.swap(eps2);
  pt.c.swap(c2);
  at::Tensor ord = at::from_blob(pt.order.data(), {D_}, at::kLong).clone();
  at::Tensor wp = wt_.index_select(1, ord), bp = b_.index_select(0, ord);
  pt.w.clear();
  pt.b.clear();
  for (int64_t c = 0; c < nc_; ++c) {
    const int64_t c0 = start_[c], w = start_[c + 1] - c0;
    pt.w.push_back(wp.narrow(1, c0, w).contiguous());
    pt.b.push_back(bp.narrow(0, c0, w).contiguous());
  }
  pt.ready = true;
}

const std::vector<double>& EarlyExit::tail(int64_t p, int g) {
  Point& pt = pts_[p];
  auto it = pt.tails.find(g);
  if (it != pt.tails.end()) return it->second;
  const double delta = (pt.hcn + 1e-6) * std::exp2(g / 16.0);
  // t_i for every column in block order (float64 ATen ops: vectorised sigmoid, error ~1e-16 relative,
  // far inside the 1e-12 inflation). rowW_/babs_ are by original column: map through order.
  if (!pt.rw_ord.defined()) {
    at::Tensor ord = at::from_blob(pt.order.data(), {D_}, at::kLong);
    pt.rw_ord = at::from_blob(rowW_.data(), {D_}, at::kDouble).index_select(0, ord);
    pt.bb_ord = at::from_blob(babs_.data(), {D_}, at::kDouble).index_select(0, ord);
    pt.ac_t = at::from_blob(pt.ac.data(), {D_}, at::kDouble).clone();
    pt.eps_t = at::from_blob(pt.eps.data(), {D_}, at::kDouble).clone();
    pt.c_t = at::from_blob(pt.c.data(), {D_}, at::kDouble).clone();
  }
  at::Tensor rho = (pt.rw_ord * (delta + gK1_ * (pt.hcn + delta)) + pt.bb_ord * gK1_ + pt.eps_t) * (1 + 1e-12);
  at::Tensor lo = pt.ac_t - rho, hi = pt.ac_t + rho;
  if (act_ == kActSigmoid) {
    lo = lo.sigmoid_();
    hi = hi.sigmoid_();
  } else if (act_ == kActRelu) {
    lo = lo.relu_();
    hi = hi.relu_();
  }
  at::Tensor mx = at::maximum(hi + ev_ - pt.c_t, pt.c_t - (lo - ev_));
  at::Tensor tt = (mx * mx * (1 + 1e-12)).contiguous();
  const double* t = tt.data_ptr<double>();
  std::vector<double> out(nc_, 0.0);
  double acc = 0;
  for (int64_t c = nc_ - 1; c >= 0; --c) {
    out[c] = acc * (1 + 1e-12);  // columns after block c
    for (int64_t i = start_[c + 1] - 1; i >= start_[c]; --i) acc += t[i];
  }
  return pt.tails.emplace(g, std::move(out)).first->second;
}

std::vector<int64_t> EarlyExit::run(const at::Tensor& h, const std::vector<int64_t>& idx, const Block& blk,
                                    const float* r2, int64_t* counts, int64_t* columns_done) {
  std::vector<int64_t> undecided;
  const int64_t ns = blk.s1 - blk.s0, n = static_cast<int64_t>(idx.size());
  const float* hp = h.data_ptr<float>();
  const float* hcp = hc_.data_ptr<float>();
  for (int64_t i0 = 0; i0 < n;) {
    const int64_t p = blk.p0 + idx[i0] / ns;
    int64_t i1 = i0;
    while (i1 < n && blk.p0 + idx[i1] / ns == p) ++i1;
    const int64_t m = i1 - i0;
    // per row: ||h|| and delta >= ||h - h_c|| (fp32 sums inflated: sq_norm_up)
    std::vector<double> nh(m), dl(m);
    at::parallel_for(0, m, 64, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        float s2, d2;
        sq_norms(hp + idx[i0 + a] * K_, hcp + p * K_, K_, &s2, &d2);
        nh[a] = sq_norm_up(s2, K_);
        dl[a] = sq_norm_up(d2, K_);
      }
    });
    Point& pt = pts_[p];
    if (!pt.ready) {
      std::vector<double> sorted(dl);
      std::nth_element(sorted.begin(), sorted.begin() + m / 2, sorted.end());
      prepare(p, sorted[m / 2]);
    }
    const double s = pt.hcn + 1e-6;
    std::vector<const std::vector<double>*> tails(m);
    for (int64_t a = 0; a < m; ++a) tails[a] = &tail(p, grid_index(s, dl[a]));
    // hs row e holds point row act[e] (-1: decided). Decided rows are compacted away only when they are
    // more than 1/8 of hs: a gather costs about a fifth of a 64-column GEMM per row.
    std::vector<int64_t> act(m);
    std::iota(act.begin(), act.end(), 0);
    std::vector<double> P(m, 0.0);
    const double lim = static_cast<double>(r2[p]);
    const double under = static_cast<double>(D_) * 0x1p-149;
    at::Tensor rows_all = at::empty({m}, at::kLong);
    for (int64_t a = 0; a < m; ++a) rows_all.data_ptr<int64_t>()[a] = idx[i0 + a];
    if (!h_buf_[0].defined() || h_buf_[0].numel() < m * K_) {
      h_buf_[0] = at::empty({m * K_}, h.options());
      h_buf_[1] = at::empty({m * K_}, h.options());
      out_buf_ = at::empty({m * D_}, h.options());
    }
    int cur = 0;
    at::Tensor hs = h_buf_[cur].narrow(0, 0, m * K_).view({m, K_});
    at::index_select_out(hs, h, 0, rows_all);
    int64_t live = m;
    for (int64_t c = 0; c < nc_ && live > 0; ++c) {
      const int64_t na = static_cast<int64_t>(act.size()), c0 = start_[c];
      at::Tensor out = out_buf_.narrow(0, 0, na * (start_[c + 1] - c0)).view({na, start_[c + 1] - c0});
      at::addmm_out(out, pt.b[c], hs, pt.w[c]);  // (na, w): own GEMM, bounded against the reference
      if (act_ == kActSigmoid) out.sigmoid_();
      else if (act_ == kActRelu) out.relu_();
      const int64_t w = out.size(1);
      if (columns_done) *columns_done += na * w;
      const float* op = out.data_ptr<float>();
      const bool last = c + 1 == nc_;
      std::vector<int8_t> dec(na, 2);  // 2: decided in an earlier block
      at::parallel_for(0, na, 16, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t a = act[e];
          if (a < 0) continue;
          const float* y = op + e * w;
          double acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < w; ++j) {
            const double d = static_cast<double>(y[j]) - pt.c[c0 + j];
            acc += d * d;
          }
          P[a] += acc;
          const double sp = std::sqrt(P[a]), E = E_w_ * nh[a] + E_0_;
          const double lo = std::max(0.0, sp * (1 - 1e-12) - E);
          const double hi = sp * (1 + 1e-12) + E;
          const double T = last ? 0.0 : (*tails[a])[c];
          // under: the reference's underflowed squares (classify in bounds.h)
          if ((1 - q_) * lo * lo * (1 - 1e-12) - under > lim) dec[e] = 0;
          else if ((1 + q_) * (hi * hi + T) * (1 + 1e-12) + under < lim) dec[e] = 1;
          else dec[e] = -1;
        }
      });
      for (int64_t e = 0; e < na; ++e) {
        if (dec[e] == 0 || dec[e] == 1) {
          counts[p] += dec[e];
          act[e] = -1;
          --live;
        }
      }
      if (last) {
        for (int64_t e = 0; e < na; ++e)
          if (act[e] >= 0) undecided.push_back(idx[i0 + act[e]]);
      } else if (live > 0 && 8 * live < 7 * na) {
        std::vector<int64_t> keep, next;
        for (int64_t e = 0; e < na; ++e)
          if (act[e] >= 0) {
            keep.push_back(e);
            next.push_back(act[e]);
          }
        const int64_t nk = static_cast<int64_t>(keep.size());
        at::Tensor nxt = h_buf_[1 - cur].narrow(0, 0, nk * K_).view({nk, K_});
        at::index_select_out(nxt, hs, 0, at::from_blob(keep.data(), {nk}, at::kLong));
        hs = nxt;
        cur = 1 - cur;
        act.swap(next);
      }
    }
    i0 = i1;
  }
  return undecided;
}

}  // namespace robbench
