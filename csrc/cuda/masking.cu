// CUDA token masking: the segment gather of kernels/masking.py (formula there), and the index
// tensors of random_masking from its noise (mask_indices_kernel, ranks as in that file).
// Two kernels.  Without `count` (every forward, and the backward of random_masking) each output
// row is one source row or the fill: row_copy_kernel gives each thread kRowsPerThread rows and
// issues all their loads before any store.  With `count` (CSR segments) segment_gather_kernel
// sums each segment.  In both, threads along x sweep a row's D elements in 16-byte vectors when
// the pointers, strides and D allow it, else element by element.  Sums run in fp32 (fp64 for
// fp64) in ascending segment order: deterministic, no atomics.
#include "masking.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace fastcl_masking {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename O> __device__ __forceinline__ O from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename O> __device__ __forceinline__ O from_acc(double x) { return static_cast<O>(x); }

// VEC consecutive elements as one aligned unit: 16 bytes compile to a single 128-bit access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, typename O, int VEC>
__global__ void segment_gather_kernel(SegmentGatherArgs a) {
  using A = typename Acc<T>::type;
  using PT = Pack<T, VEC>;
  using PO = Pack<O, VEC>;
  const int64_t row_id = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row_id >= a.B * a.R) return;
  const int64_t b = row_id / a.R, r = row_id % a.R;
  const int64_t s0 = a.start[b * a.start_sb + r * a.start_sr];
  int64_t n = a.count ? a.count[b * a.count_sb + r * a.count_sr] : ((s0 >= 0 && s0 < a.J) ? 1 : 0);
  // The host validates indices; a bad one here yields zeros instead of a wild read.
  if (n > 0 && (s0 < 0 || s0 + n > a.J)) n = 0;
  const T* src = static_cast<const T*>(a.src) + b * a.src_sb;
  const T* pos = static_cast<const T*>(a.pos);
  const T* fill = static_cast<const T*>(a.fill);
  PO* out = reinterpret_cast<PO*>(static_cast<O*>(a.out) + row_id * a.D);
  const int64_t nvec = a.D / VEC;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = A(-0.0);  // -0.0 + x == x bit for bit
    for (int64_t j = 0; j < n; ++j) {
      const int64_t row = a.order ? a.order[b * a.order_sb + (s0 + j) * a.order_sj] : s0 + j;
      if (row < 0 || row >= a.S) continue;
      const PT x = reinterpret_cast<const PT*>(src + row * a.src_ss)[v];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += to_acc(x.v[e]);
      if (pos) {
        const PT p = reinterpret_cast<const PT*>(pos + row * a.pos_ss)[v];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += to_acc(p.v[e]);
      }
    }
    PO o;
    if (n > 0) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<O>(acc[e]);
    } else if (fill) {
      const PT f = reinterpret_cast<const PT*>(fill)[v];
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<O>(to_acc(f.v[e]));
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_acc<O>(A(0));
    }
    out[v] = o;
  }
}

// Output rows per thread in row_copy_kernel: four 16-byte loads in flight per thread.
constexpr int kRowsPerThread = 4;

// out[b, r] = src[b, row] (+ pos[row]) with row = start[b, r] (or order[b, start[b, r]]) when
// 0 <= start[b, r] < J, else fill (or 0).  Block x covers blockDim.y * kRowsPerThread flat rows
// b * R + r; thread (x, y) owns rows first + k * blockDim.y.  Index math runs once per row;
// the element loop only adds the vector index.  CONVERT: a pos addend or a wider output, so
// values go through the accumulator type; otherwise the bits are copied as they are.
template <typename T, typename O, int VEC, bool CONVERT>
__global__ void __launch_bounds__(256) row_copy_kernel(SegmentGatherArgs a) {
  using A = typename Acc<T>::type;
  using PT = Pack<T, VEC>;
  using PO = Pack<O, VEC>;
  const int64_t rows = a.B * a.R;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y * kRowsPerThread + threadIdx.y;
  const PT* srow[kRowsPerThread];
  const PT* prow[kRowsPerThread];
  PO* orow[kRowsPerThread];
#pragma unroll
  for (int k = 0; k < kRowsPerThread; ++k) {
    const int64_t row_id = first + static_cast<int64_t>(k) * blockDim.y;
    srow[k] = nullptr;
    prow[k] = nullptr;
    orow[k] = row_id < rows ? reinterpret_cast<PO*>(static_cast<O*>(a.out) + row_id * a.D) : nullptr;
    if (!orow[k]) continue;
    const int64_t b = row_id / a.R, r = row_id - b * a.R;
    const int64_t s0 = a.start[b * a.start_sb + r * a.start_sr];
    if (s0 < 0 || s0 >= a.J) continue;  // not kept: fill
    const int64_t row = a.order ? a.order[b * a.order_sb + s0 * a.order_sj] : s0;
    if (row < 0 || row >= a.S) continue;  // the host validates; a bad index gives the fill, not a wild read
    srow[k] = reinterpret_cast<const PT*>(static_cast<const T*>(a.src) + b * a.src_sb + row * a.src_ss);
    if (CONVERT && a.pos) prow[k] = reinterpret_cast<const PT*>(static_cast<const T*>(a.pos) + row * a.pos_ss);
  }
  const PT* fill = static_cast<const PT*>(a.fill);
  const int64_t nvec = a.D / VEC;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    PT x[kRowsPerThread];
    PT p[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      if (srow[k]) x[k] = srow[k][v];
      if (CONVERT && prow[k]) p[k] = prow[k][v];
    }
    PT f;
    if (fill) {
      f = fill[v];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) f.v[e] = from_acc<T>(A(0));
    }
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      if (!orow[k]) continue;
      const PT in = srow[k] ? x[k] : f;
      PO o;
      if constexpr (CONVERT) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          A val = to_acc(in.v[e]);
          if (srow[k] && prow[k]) val += to_acc(p[k].v[e]);
          o.v[e] = from_acc<O>(val);
        }
      } else {
        o = in;  // T == O: a bit copy
      }
      orow[k][v] = o;
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, typename O>
cudaError_t launch(const SegmentGatherArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t bytes_sb = a.src_sb * sizeof(T), bytes_ss = a.src_ss * sizeof(T);
  const bool vec_ok = a.D % kVec == 0 && aligned16(a.src) && bytes_sb % 16 == 0 && bytes_ss % 16 == 0 &&
                      (!a.fill || aligned16(a.fill)) &&
                      (!a.pos || (aligned16(a.pos) && (a.pos_ss * sizeof(T)) % 16 == 0)) &&
                      (reinterpret_cast<uintptr_t>(a.out) % (kVec * sizeof(O))) == 0;
  const int vec = vec_ok ? kVec : 1;
  const int64_t nvec = a.D / vec;
  // About 256 threads a block: enough x-threads to cover a row in one sweep (a power of two
  // below a warp, so short rows share warps), the rest as rows.
  int tx;
  if (nvec >= 256) {
    tx = 256;
  } else if (nvec >= 32) {
    tx = static_cast<int>((nvec + 31) / 32) * 32;
  } else {
    tx = 1;
    while (tx < nvec) tx *= 2;
  }
  const int ty = 256 / tx;
  const int64_t rows = a.B * a.R;
  const bool row_copy = a.count == nullptr;
  const int64_t rows_per_block = static_cast<int64_t>(ty) * (row_copy ? kRowsPerThread : 1);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks)), block(tx, ty);
  if (row_copy) {
    // A bit copy (CONVERT = false) needs T == O and no pos.  kCopy keeps the false
    // instantiation out of the T != O launchers, where that branch never runs.
    constexpr bool kCopy = std::is_same<T, O>::value;
    const bool convert = !kCopy || a.pos != nullptr;
    if (vec_ok) {
      if (convert)
        row_copy_kernel<T, O, kVec, true><<<grid, block, 0, stream>>>(a);
      else
        row_copy_kernel<T, O, kVec, !kCopy><<<grid, block, 0, stream>>>(a);
    } else {
      if (convert)
        row_copy_kernel<T, O, 1, true><<<grid, block, 0, stream>>>(a);
      else
        row_copy_kernel<T, O, 1, !kCopy><<<grid, block, 0, stream>>>(a);
    }
  } else if (vec_ok) {
    segment_gather_kernel<T, O, kVec><<<grid, block, 0, stream>>>(a);
  } else {
    segment_gather_kernel<T, O, 1><<<grid, block, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_out(const SegmentGatherArgs& a, cudaStream_t stream) {
  if (a.out_fp32) return launch<T, typename Acc<T>::type>(a, stream);
  return launch<T, T>(a, stream);
}

// Whether token j sorts before token i in a stable ascending sort with NaN last (NaNs equal to
// each other, -0.0 equal to 0.0): the order torch's CUDA sort gives rows of more than 32 that
// hold no NaN (its radix sort, above 128, orders NaNs by their bits).
template <typename A>
__device__ __forceinline__ bool sorts_before(A kj, int64_t j, A ki, int64_t i) {
  const bool nan_j = kj != kj, nan_i = ki != ki;
  if (nan_j || nan_i) return nan_j && nan_i ? j < i : nan_i;
  return kj < ki || (kj == ki && j < i);
}

// One thread per token: its rank is the count of the row's tokens that sort before it (L
// compares; the short rows of masking are read from L1, every lane of a warp the same key).
template <typename T, typename M>
__global__ void __launch_bounds__(256) mask_indices_kernel(MaskIndicesArgs a) {
  using A = typename Acc<T>::type;
  const int64_t blocks_per_row = (a.L + blockDim.x - 1) / blockDim.x;
  const int64_t b = blockIdx.x / blocks_per_row;
  const int64_t i = (blockIdx.x - b * blocks_per_row) * blockDim.x + threadIdx.x;
  if (i >= a.L) return;
  const T* row = static_cast<const T*>(a.noise) + b * a.noise_sb;
  const A ki = to_acc(row[i * a.noise_sl]);
  int64_t rank = 0;
  for (int64_t j = 0; j < a.L; ++j) rank += sorts_before(to_acc(row[j * a.noise_sl]), j, ki, i) ? 1 : 0;
  a.ids_restore[b * a.L + i] = rank;
  static_cast<M*>(a.mask)[b * a.L + i] = rank >= a.K ? M(1) : M(0);
  if (rank < a.K) a.ids_keep[b * a.K + rank] = i;
}

template <typename T>
cudaError_t launch_mask_indices(const MaskIndicesArgs& a, cudaStream_t stream) {
  const int threads = a.L >= 256 ? 256 : static_cast<int>((a.L + 31) / 32) * 32;
  const int64_t blocks = threads == 0 ? 0 : a.B * ((a.L + threads - 1) / threads);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks)), block(threads);
  if (a.mask_f64)
    mask_indices_kernel<T, double><<<grid, block, 0, stream>>>(a);
  else
    mask_indices_kernel<T, float><<<grid, block, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t mask_indices_cuda(const MaskIndicesArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case kF32: return launch_mask_indices<float>(a, stream);
    case kF16: return launch_mask_indices<__half>(a, stream);
    case kBF16: return launch_mask_indices<__nv_bfloat16>(a, stream);
    case kF64: return launch_mask_indices<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t segment_gather_cuda(const SegmentGatherArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case kF32: return dispatch_out<float>(a, stream);
    case kF16: return dispatch_out<__half>(a, stream);
    case kBF16: return dispatch_out<__nv_bfloat16>(a, stream);
    case kF64: return dispatch_out<double>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastcl_masking
