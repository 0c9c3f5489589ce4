// Stand-in for cuda_fp16.h: an IEEE binary16 storage type with round-to-nearest-even conversion
// (GCC's _Float16 rounds that way on x86-64).
#pragma once

struct __half {
  _Float16 v;
};

inline __half __float2half_rn(float x) { return __half{static_cast<_Float16>(x)}; }
inline float __half2float(__half h) { return static_cast<float>(h.v); }
