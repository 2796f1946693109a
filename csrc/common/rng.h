// Counter-based standard normals, bit-exact with robbench/rng.py (see its docstring for the scheme).
// Only +, -, *, /, sqrt and frexp are used on doubles, each exactly rounded by IEEE 754, and the
// translation unit is compiled with -ffp-contract=off so no FMA changes a rounding. Usable from
// host and device code.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define RB_HD __host__ __device__ __forceinline__
#else
#define RB_HD inline
#endif

namespace robbench {

RB_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// ln(u) for u = ((bits >> 8) + 1) / 2^24.
RB_HD double log_uniform(uint32_t bits) {
  const double v = static_cast<double>((bits >> 8) + 1u);
  int e;
  double m = std::frexp(v, &e);  // exact
  double f = m;
  if (m < 0.7071067811865476) {
    f = m * 2.0;
    e -= 1;
  }
  const double s = (f - 1.0) / (f + 1.0);
  const double s2 = s * s;
  // coefficients 1/(2n+1), n = 6..0, Horner exactly as in rng.py
  double p = 1.0 / 13.0;
  p = p * s2 + 1.0 / 11.0;
  p = p * s2 + 1.0 / 9.0;
  p = p * s2 + 1.0 / 7.0;
  p = p * s2 + 1.0 / 5.0;
  p = p * s2 + 1.0 / 3.0;
  p = p * s2 + 1.0;
  return (static_cast<double>(e) - 24.0) * 0.6931471805599453 + (s * 2.0) * p;
}

RB_HD void sincos_turn(uint32_t bits, double* c_out, double* s_out) {
  const uint32_t octant = bits >> 29;
  const double t = static_cast<double>((bits >> 8) & 0x1FFFFFu) * (1.0 / 2097152.0);
  const bool odd = (octant & 1u) == 1u;
  const double phi = (odd ? 1.0 - t : t) * 0.7853981633974483;
  const double x2 = phi * phi;
  // (-1)^n/(2n+1)!, n = 5..0 and (-1)^n/(2n)!, n = 6..0, as Python computes them
  double ps = -1.0 / 39916800.0;
  ps = ps * x2 + 1.0 / 362880.0;
  ps = ps * x2 + -1.0 / 5040.0;
  ps = ps * x2 + 1.0 / 120.0;
  ps = ps * x2 + -1.0 / 6.0;
  ps = ps * x2 + 1.0;
  const double sin_phi = ps * phi;
  double pc = 1.0 / 479001600.0;
  pc = pc * x2 + -1.0 / 3628800.0;
  pc = pc * x2 + 1.0 / 40320.0;
  pc = pc * x2 + -1.0 / 720.0;
  pc = pc * x2 + 1.0 / 24.0;
  pc = pc * x2 + -1.0 / 2.0;
  pc = pc * x2 + 1.0;
  const double cos_phi = pc;
  const double sa = odd ? cos_phi : sin_phi;
  const double ca = odd ? sin_phi : cos_phi;
  switch (octant >> 1) {
    case 0: *c_out = ca; *s_out = sa; break;
    case 1: *c_out = -sa; *s_out = ca; break;
    case 2: *c_out = -ca; *s_out = -sa; break;
    default: *c_out = sa; *s_out = -ca; break;
  }
}

// eta[0..k) for one (stream keys ka, kb; sample j).
RB_HD void normals_row(uint32_t ka, uint32_t kb, uint32_t j, int64_t k, float* eta) {
  const uint32_t a = hash32(ka ^ j);
  const uint32_t b = hash32(kb ^ j);
  for (int64_t i = 0; i < k; i += 2) {
    const uint32_t idx = static_cast<uint32_t>(i);
    const uint32_t u1 = hash32(a ^ hash32(b ^ idx));
    const uint32_t u2 = hash32(a ^ hash32(b ^ (idx + 1u)));
    const double radius = std::sqrt(log_uniform(u1) * -2.0);
    double c, s;
    sincos_turn(u2, &c, &s);
    eta[i] = static_cast<float>(radius * c);
    if (i + 1 < k) eta[i + 1] = static_cast<float>(radius * s);
  }
}

}  // namespace robbench
