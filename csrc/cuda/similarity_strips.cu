// Fused epilogues of the cuda backend's strip method (interface and layout in
// similarity_strips.cuh; the driver is fastcl/ops/strips.py).
//
// Every kernel reads the fp32 score strip once, with 16-byte loads when the row stride, M and
// the base pointer allow it (else 4-byte loads, still coalesced).  Math is fp32; log-sum-exps
// run in base 2 on the SFU's approximate exp2/log2 (exp2_approx, log2_approx).  Reductions run in
// a fixed order (shuffle trees, then partial buffers merged by one thread per output): no
// atomics, deterministic.
#include "similarity_strips.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace fastcl_strips {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // row-wise kernels: one warp per row, 8 rows per block
constexpr int kUnroll = 4;        // 16-byte loads in flight per lane and round

// 2^x and log2(x) as one SFU instruction each (ex2/lg2.approx.ftz: about 2 ulp; subnormals flush
// to 0, which no sum here needs: every sum has a term of 1 at its maximum).  exp2f/log2f
// compiled to the SFU instruction plus a subnormal fix-up of 3-4 instructions.  The host build
// of the tests (tests/cuda_host) takes the libm functions.
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ float log2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return log2f(x);
#endif
}

// ---- online log-sum-exp in base 2: value = m + log2(l) ----
struct Lse2 {
  float m, l;
};

__device__ __forceinline__ Lse2 lse_empty() { return {-CUDART_INF_F, 0.f}; }

// Adds one term x (already times log2 e) with one exp2f.  m is never NaN (a NaN x fails both
// tests below m's update), so a NaN term turns l into NaN for good: NaN in gives NaN out.
__device__ __forceinline__ void lse_push(Lse2& a, float x) {
  if (x > a.m) {
    a.l = a.l * exp2_approx(a.m - x) + 1.f;  // m = -inf: 2^-inf = 0
    a.m = x;
  } else if (x != -CUDART_INF_F) {
    a.l += exp2_approx(x - a.m);
  }
}

__device__ __forceinline__ void lse_merge(Lse2& a, const Lse2& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -CUDART_INF_F) {  // both empty (l = 0, or NaN, which the sum keeps)
    a.l += b.l;
    return;
  }
  a.l = a.l * exp2_approx(a.m - m) + b.l * exp2_approx(b.m - m);
  a.m = m;
}

// Natural-log value; an empty set (m = -inf, l = 0) gives -inf.
__device__ __forceinline__ float lse_value(const Lse2& a) { return (a.m + log2_approx(a.l)) * kLn2; }

// Folds terms x[0], x[S], ..., x[(K - 1) S] (base 2) into a, branch-free: m' = max(m, x...),
// l' = l 2^(m - m') + sum 2^(x - m'), one exp per term and one per fold.  fmaxf skips a NaN
// term, which the sum keeps: NaN in gives NaN out.  All -inf (excluded) leaves (-inf, l).
template <int K, int S>
__device__ __forceinline__ void lse_fold(Lse2& a, const float* x) {
  float m = a.m;
#pragma unroll
  for (int i = 0; i < K; ++i) m = fmaxf(m, x[i * S]);
  const float ref = m == -CUDART_INF_F ? 0.f : m;  // never -inf - -inf
  float l = a.l * exp2_approx(a.m - ref);
#pragma unroll
  for (int i = 0; i < K; ++i) l += exp2_approx(x[i * S] - ref);
  a.m = m;
  a.l = l;
}

__device__ __forceinline__ Lse2 lse_warp_reduce(Lse2 a) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    Lse2 b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.l = __shfl_xor_sync(0xffffffffu, a.l, off);
    lse_merge(a, b);
  }
  return a;
}

// ---- loads and stores ----
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Plain (coherent) loads on purpose: the backward kernels overwrite the strip they read, so
// the read-only path (__ldg / const __restrict__) would be wrong there.
template <int VEC>
__device__ __forceinline__ void load_vec(const float* p, float (&x)[VEC]) {
  const Pack<float, VEC> v = *reinterpret_cast<const Pack<float, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) x[e] = v.v[e];
}

template <typename O> __device__ __forceinline__ O from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename O, int VEC>
__device__ __forceinline__ void store_vec(O* p, const float (&x)[VEC]) {
  Pack<O, VEC> v;
#pragma unroll
  for (int e = 0; e < VEC; ++e) v.v[e] = from_float<O>(x[e]);
  *reinterpret_cast<Pack<O, VEC>*>(p) = v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte path: every row start is 16-byte aligned and no vector crosses column M.
inline bool can_vectorise(const StripArgs& a) { return aligned16(a.scores) && a.ld % 4 == 0 && a.M % 4 == 0; }

// ---- LSE forward: row and column partials in one read ----
template <int VEC, bool ROWS, bool COLS>
__global__ void __launch_bounds__(kFwdThreads) lse_fwd_kernel(StripArgs a, int64_t cols_per_split,
                                                              float* row_part, float* col_part) {
  constexpr int G = kFwdRowsPerBlock;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * G;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t c_end = min(a.M, c_begin + cols_per_split);
  // Base-2 logits straight from the raw score: s * log2(e) = x * (scale log2 e) + bias log2 e.
  const float sc = *a.scale * kLog2e, bi = *a.bias * kLog2e;
  Lse2 row[G];
#pragma unroll
  for (int g = 0; g < G; ++g) row[g] = lse_empty();

  for (int64_t c0 = c_begin + static_cast<int64_t>(threadIdx.x) * VEC; c0 < c_end; c0 += kFwdThreads * VEC) {
    float x[G][VEC];
#pragma unroll
    for (int g = 0; g < G; ++g) {  // all G loads first, so they are in flight together
      if (r0 + g < a.R) load_vec<VEC>(a.scores + (r0 + g) * a.ld + c0, x[g]);
    }
    // Scores in place (base 2, -inf where excluded), then each row folds its VEC new terms and
    // each column its G terms: branch-free (one compare-and-branch per term had made this
    // epilogue instruction-bound on its 4-byte-per-score strip).
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t r = r0 + g;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool valid = r < a.R && !(a.has_diag && c0 + e == r + a.diag);
        x[g][e] = valid ? fmaf(x[g][e], sc, bi) : -CUDART_INF_F;
      }
      if (ROWS) lse_fold<VEC, 1>(row[g], x[g]);
    }
    if (COLS) {
      float out[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        Lse2 col = lse_empty();
        lse_fold<G, VEC>(col, &x[0][e]);
        out[e] = lse_value(col);
      }
      store_vec<float, VEC>(col_part + static_cast<int64_t>(blockIdx.x) * a.M + c0, out);
    }
  }

  if (ROWS) {  // each row: shuffle tree in every warp, then the 8 warps in order
    __shared__ Lse2 warp_part[kFwdThreads / kWarp][G];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const Lse2 w = lse_warp_reduce(row[g]);
      if (lane == 0) warp_part[warp][g] = w;
    }
    __syncthreads();
    if (threadIdx.x < G && r0 + threadIdx.x < a.R) {
      Lse2 acc = warp_part[0][threadIdx.x];
      for (int w = 1; w < kFwdThreads / kWarp; ++w) lse_merge(acc, warp_part[w][threadIdx.x]);
      row_part[static_cast<int64_t>(blockIdx.y) * a.R + r0 + threadIdx.x] = lse_value(acc);
    }
  }
}

// out[l] = LSE over p of part[p, l] (natural log in and out), p ascending.
__global__ void lse_merge_kernel(const float* part, int64_t P, int64_t L, float* out) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= L) return;
  Lse2 acc = lse_empty();
  for (int64_t p = 0; p < P; ++p) lse_push(acc, part[p * L + l] * kLog2e);
  out[l] = lse_value(acc);
}

template <int VEC, bool ROWS, bool COLS>
cudaError_t launch_lse_fwd(const StripArgs& a, const LseFwdPlan& p, float* row_part, float* col_part,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.row_groups), static_cast<unsigned>(p.col_splits));
  lse_fwd_kernel<VEC, ROWS, COLS><<<grid, kFwdThreads, 0, stream>>>(a, p.cols_per_split, row_part, col_part);
  return cudaGetLastError();
}

template <int VEC>
cudaError_t dispatch_lse_fwd(const StripArgs& a, bool rows, bool cols, const LseFwdPlan& p, float* row_part,
                             float* col_part, cudaStream_t stream) {
  if (rows && cols) return launch_lse_fwd<VEC, true, true>(a, p, row_part, col_part, stream);
  if (rows) return launch_lse_fwd<VEC, true, false>(a, p, row_part, col_part, stream);
  return launch_lse_fwd<VEC, false, true>(a, p, row_part, col_part, stream);
}

cudaError_t launch_merge(const float* part, int64_t P, int64_t L, float* out, cudaStream_t stream) {
  const int64_t blocks = (L + 255) / 256;
  lse_merge_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, P, L, out);
  return cudaGetLastError();
}

// ---- row-wise kernels: one warp per row, optionally writing a tile in place and summing it ----
//
// In place with a narrower output: round t reads fp32 columns [c, c + W) (bytes [4c, 4c + 4W)
// of the row) and then writes output columns [c, c + W) (bytes [2c, 2c + 2W)).  Those bytes
// were all read in rounds <= t, and later rounds read only bytes >= 4(c + W); the __syncwarp
// between a round's loads and its stores orders the lanes.  Rows never overlap.
template <class Op, typename OutT, int VEC, bool WRITE, bool SUM>
__global__ void __launch_bounds__(kRowThreads) rowwise_kernel(StripArgs a, Op op, float* row_sum) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= a.R) return;  // whole warps leave together, so __syncwarp below stays full
  const float* in = a.scores + r * a.ld;
  OutT* out = reinterpret_cast<OutT*>(a.scores) + r * a.ld * static_cast<int64_t>(sizeof(float) / sizeof(OutT));
  const float sc = *a.scale, bi = *a.bias;
  op.begin_row(r);
  float sum = 0.f;
  constexpr int64_t kRound = static_cast<int64_t>(kWarp) * VEC * kUnroll;
  for (int64_t base = 0; base < a.M; base += kRound) {
    float x[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + (static_cast<int64_t>(u) * kWarp + lane) * VEC;
      if (c < a.M) load_vec<VEC>(in + c, x[u]);
    }
    if (WRITE) __syncwarp();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = base + (static_cast<int64_t>(u) * kWarp + lane) * VEC;
      if (c < a.M) {
        float y[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          y[e] = op(fmaf(x[u][e], sc, bi), r, c + e, a.has_diag && c + e == r + a.diag);
          if (SUM) sum += y[e];
        }
        if (WRITE) store_vec<OutT, VEC>(out + c, y);
      }
    }
  }
  if (SUM) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) row_sum[r] = sum;
  }
}

// dS of the LSE backward.
struct LseGradOp {
  const float *row_lse, *g_row, *col_lse, *g_col;
  float lr, gr;
  // An LSE of -inf (every entry excluded) counts as +inf, so its probabilities are 0.
  __device__ __forceinline__ static float log2_lse(float v) { return v == -CUDART_INF_F ? CUDART_INF_F : v * kLog2e; }
  __device__ __forceinline__ void begin_row(int64_t r) {
    if (row_lse) {
      lr = log2_lse(row_lse[r]);
      gr = g_row[r];
    }
  }
  __device__ __forceinline__ float operator()(float s, int64_t, int64_t c, bool special) const {
    if (special) return 0.f;  // excluded entry: P = 0 (even where the score is NaN)
    const float s2 = s * kLog2e;
    float d = 0.f;
    if (row_lse) d = gr * exp2_approx(s2 - lr);
    if (col_lse) d = fmaf(g_col[c], exp2_approx(s2 - log2_lse(col_lse[c])), d);
    return d;
  }
};

// t = -z s: -s on the positive pair, s elsewhere.
__device__ __forceinline__ float signed_logit(float s, bool positive) { return positive ? -s : s; }

// log1p(e) for e in [0, 1] as 2 atanh(z), z = e / (2 + e) in [0, 1/3], by the series through z^13
// (the rest is below 2^-26 of it): ~5 ulp relative for every normal e, tiny ones included, in a
// dozen FMAs and one fast reciprocal, where log1pf's ~40 instructions made the epilogue
// instruction-bound rather than bandwidth-bound.
__device__ __forceinline__ float log1p_unit(float e) {
  const float z = __fdividef(e, 2.f + e);
  const float w = z * z;
  float p = fmaf(w, 1.f / 13.f, 1.f / 11.f);
  p = fmaf(p, w, 1.f / 9.f);
  p = fmaf(p, w, 1.f / 7.f);
  p = fmaf(p, w, 1.f / 5.f);
  p = fmaf(p, w, 1.f / 3.f);
  p = fmaf(p, w, 1.f);
  return 2.f * z * p;
}

struct SoftplusOp {
  __device__ __forceinline__ void begin_row(int64_t) {}
  // softplus(t) = max(t, 0) + log1p(exp(-|t|)): no overflow, relative precision for tiny terms.
  __device__ __forceinline__ float operator()(float s, int64_t, int64_t, bool positive) const {
    const float t = signed_logit(s, positive);
    return fmaxf(t, 0.f) + log1p_unit(expf(-fabsf(t)));
  }
};

struct SigmoidGradOp {
  __device__ __forceinline__ void begin_row(int64_t) {}
  // dL/ds = sigmoid(t) * dt/ds, sigmoid from exp(-|t|) only (never overflows; NaN stays NaN).
  __device__ __forceinline__ float operator()(float s, int64_t, int64_t, bool positive) const {
    const float t = signed_logit(s, positive);
    const float e = expf(-fabsf(t));
    const float inv = __fdividef(1.f, 1.f + e);  // 1 + e in [1, 2]: the fast reciprocal is within 2 ulp
    const float sg = t >= 0.f ? inv : e * inv;
    return positive ? -sg : sg;
  }
};

template <class Op, typename OutT, bool WRITE, bool SUM>
cudaError_t launch_rowwise(const StripArgs& a, const Op& op, float* row_sum, cudaStream_t stream) {
  const int64_t blocks = (a.R + kRowThreads / kWarp - 1) / (kRowThreads / kWarp);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (can_vectorise(a))
    rowwise_kernel<Op, OutT, 4, WRITE, SUM><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(a, op, row_sum);
  else
    rowwise_kernel<Op, OutT, 1, WRITE, SUM><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(a, op, row_sum);
  return cudaGetLastError();
}

template <class Op, bool SUM>
cudaError_t launch_rowwise_out(const StripArgs& a, const Op& op, OutType out, float* row_sum, cudaStream_t stream) {
  switch (out) {
    case kOutF32: return launch_rowwise<Op, float, true, SUM>(a, op, row_sum, stream);
    case kOutF16: return launch_rowwise<Op, __half, true, SUM>(a, op, row_sum, stream);
    case kOutBF16: return launch_rowwise<Op, __nv_bfloat16, true, SUM>(a, op, row_sum, stream);
    default: return cudaErrorInvalidValue;
  }
}

bool empty(const StripArgs& a) { return a.R <= 0 || a.M <= 0; }

}  // namespace

cudaError_t lse_fwd(const StripArgs& a, bool rows, bool cols, const LseFwdPlan& plan, float* row_part,
                    float* col_part, float* row_out, float* col_out, cudaStream_t stream) {
  if (empty(a) || !(rows || cols)) return cudaSuccess;
  // With one partial per output, the kernel writes the output itself.
  const bool merge_rows = rows && plan.col_splits > 1, merge_cols = cols && plan.row_groups > 1;
  if ((merge_rows && !row_part) || (merge_cols && !col_part)) return cudaErrorInvalidValue;
  float* rp = merge_rows ? row_part : row_out;
  float* cp = merge_cols ? col_part : col_out;
  cudaError_t err = can_vectorise(a) ? dispatch_lse_fwd<4>(a, rows, cols, plan, rp, cp, stream)
                                     : dispatch_lse_fwd<1>(a, rows, cols, plan, rp, cp, stream);
  if (err != cudaSuccess) return err;
  if (merge_rows && (err = launch_merge(row_part, plan.col_splits, a.R, row_out, stream)) != cudaSuccess) return err;
  if (merge_cols) err = launch_merge(col_part, plan.row_groups, a.M, col_out, stream);
  return err;
}

cudaError_t lse_bwd(const StripArgs& a, const float* row_lse, const float* g_row, const float* col_lse,
                    const float* g_col, OutType out, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  if (!row_lse != !g_row || !col_lse != !g_col) return cudaErrorInvalidValue;
  LseGradOp op{row_lse, g_row, col_lse, g_col, 0.f, 0.f};
  return launch_rowwise_out<LseGradOp, false>(a, op, out, nullptr, stream);
}

cudaError_t sigmoid_fwd(const StripArgs& a, float* row_sum, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  return launch_rowwise<SoftplusOp, float, false, true>(a, SoftplusOp{}, row_sum, stream);
}

cudaError_t sigmoid_bwd(const StripArgs& a, OutType out, float* row_sum, cudaStream_t stream) {
  if (empty(a)) return cudaSuccess;
  return launch_rowwise_out<SigmoidGradOp, true>(a, SigmoidGradOp{}, out, row_sum, stream);
}

}  // namespace fastcl_strips
