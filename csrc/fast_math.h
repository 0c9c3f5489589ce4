// Branch-free elementwise math shared by the CPU kernels, written so that GCC vectorises the
// OpenMP simd loops that call it (std::exp/std::log1p would keep those loops scalar).
// float overloads are accurate to a few ulp; double overloads call libm, so that fp64 inputs
// (gradcheck) get full precision.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastcl {

// exp via a Cephes-style polynomial on a range-reduced argument.  Underflow (and -inf) gives
// exactly 0; overflow gives +inf; NaN stays NaN.
inline float fast_exp(float x) {
  float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // Round to nearest by adding and removing 1.5 * 2^23: unlike std::floor this vectorises
  // without -ffast-math (GCC keeps floor scalar under the default trapping-math rules).
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  float y = p * two_n;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.3f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}
inline double fast_exp(double x) { return std::exp(x); }

// log(u) for u in [1, 2] (the only range the softplus below needs): mantissa/exponent split
// plus a minimax polynomial around 1.
inline float fast_log_1_2(float u) {
  int32_t bits;
  std::memcpy(&bits, &u, sizeof(float));
  int32_t e = ((bits >> 23) & 0xff) - 126;  // u = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  const bool below = m < 0.707106781186547524f;
  const float ef = static_cast<float>(e) - (below ? 1.0f : 0.0f);
  m = below ? m + m - 1.0f : m - 1.0f;  // now log(u) = log1p(m) + ef * ln2, |m| < 0.42
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return m + y + 0.693359375f * ef;
}

// log1p(e) for e in [0, 1]; Kahan's trick keeps full relative precision when 1 + e rounds.
inline float fast_log1p_unit(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  // Divide by a denominator that is never 0, so the division may be evaluated on every lane:
  // a possibly-trapping division under a condition keeps GCC from vectorising the caller.
  const float r = fast_log_1_2(u) * (e / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? e : r;
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)); never overflows, NaN -> NaN.
inline float softplus(float x) {
  const float a = x < 0.0f ? -x : x;
  const float y = (x > 0.0f ? x : 0.0f) + fast_log1p_unit(fast_exp(-a));
  return x != x ? x : y;
}
inline double softplus(double x) {
  return (x > 0.0 ? x : 0.0) + std::log1p(std::exp(-std::fabs(x)));  // NaN flows through log1p
}

// sigmoid(x) = 1 / (1 + exp(-x)) from exp(-|x|) only, so it never overflows; NaN -> NaN.
template <typename T>
inline T sigmoid(T x) {
  const T a = x < T(0) ? -x : x;
  const T e = fast_exp(-a);
  const T inv = T(1) / (T(1) + e);
  return x >= T(0) ? inv : (x != x ? x : e * inv);
}

}  // namespace fastcl
