// Plain-C++ interface of the CUDA masking kernel (no torch headers), shared by masking.cu and
// the ATen glue in masking_ops.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastcl_masking {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct SegmentGatherArgs {
  const void* src;        // (B, S, D), element stride 1 along D
  const int64_t* start;   // (B, R)
  const int64_t* count;   // (B, R) or null: then n = (0 <= start < J)
  const int64_t* order;   // (B, J) or null: then row = start + j
  const void* fill;       // (D,) contiguous or null
  const void* pos;        // (S, D), element stride 1 along D, or null
  void* out;              // (B, R, D) contiguous
  int64_t B, S, R, D, J;
  int64_t src_sb, src_ss, start_sb, start_sr, count_sb, count_sr, order_sb, order_sj, pos_ss;
  int dtype;              // DType of src, fill and pos
  bool out_fp32;          // out is float32 (float64 for kF64) instead of the src dtype
};

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t segment_gather_cuda(const SegmentGatherArgs& a, cudaStream_t stream);

// The index tensors of random_masking from its noise: each token's rank in the stable ascending
// sort of its row (NaN last).  ids_restore = rank, mask = (rank >= K), ids_keep[rank] = token.
struct MaskIndicesArgs {
  const void* noise;     // (B, L), any strides
  int64_t* ids_restore;  // (B, L) contiguous
  int64_t* ids_keep;     // (B, K) contiguous
  void* mask;            // (B, L) contiguous, float32 (float64 if mask_f64)
  int64_t B, L, K, noise_sb, noise_sl;
  int dtype;             // DType of noise
  bool mask_f64;
};

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t mask_indices_cuda(const MaskIndicesArgs& a, cudaStream_t stream);

}  // namespace fastcl_masking
