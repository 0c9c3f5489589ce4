// Plain-C++ interface of the fused strip epilogues (no torch headers), shared by
// similarity_strips.cu and the ATen glue in similarity_strips_ops.cpp.
//
// A "strip" is R rows of raw fp32 scores x[i, j] = q[row0 + i] . k[j] that cuBLAS wrote into a
// workspace (row stride ld >= M floats).  The logit is s = scale * x + bias.  The epilogues read
// the strip once; the backward ones overwrite it in place with a gradient tile in the input
// dtype (row i of the tile occupies the first bytes of row i of the fp32 strip, so its row
// stride is ld * 4 / sizeof(out) elements).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastcl_strips {

enum OutType : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2 };

struct StripArgs {
  float* scores;        // (R, ld) fp32, columns [0, M) used
  int64_t R, M, ld;
  const float* scale;   // device scalars, read by the kernels (no host sync)
  const float* bias;
  bool has_diag;        // entry (i, j) with j == i + diag is special: excluded (LSE) or the
  int64_t diag;         // positive pair (sigmoid); the driver folds row0 into diag
};

// LSE forward: one block of kFwdThreads threads covers kFwdRowsPerBlock rows and one column
// split.  Each block writes one column partial (an LSE over its rows) and one row partial per
// row (an LSE over its columns); a merge kernel reduces the partials in a fixed order.
// fastcl/ops/strips.py sizes strips with the same constants (PARTIAL_ROWS, SPLIT_COLS).
constexpr int kFwdThreads = 256;
constexpr int kFwdRowsPerBlock = 16;
constexpr int64_t kFwdSplitCols = 1024;  // column splits are multiples of this many columns

struct LseFwdPlan {
  int64_t row_groups;       // ceil(R / kFwdRowsPerBlock): rows of the column-partial buffer
  int64_t col_splits;       // rows of the row-partial buffer
  int64_t cols_per_split;   // a multiple of kFwdSplitCols
};

// Enough blocks for about four per SM, never a split without columns.
inline LseFwdPlan lse_fwd_plan(int64_t R, int64_t M, int sm_count) {
  LseFwdPlan p;
  p.row_groups = (R + kFwdRowsPerBlock - 1) / kFwdRowsPerBlock;
  const int64_t chunks = (M + kFwdSplitCols - 1) / kFwdSplitCols;
  const int64_t target = 4 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  int64_t splits = (target + p.row_groups - 1) / p.row_groups;
  if (splits > chunks) splits = chunks;
  if (splits > 65535) splits = 65535;  // gridDim.y limit
  if (splits < 1) splits = 1;
  const int64_t per = (chunks + splits - 1) / splits;
  p.cols_per_split = per * kFwdSplitCols;
  p.col_splits = (M + p.cols_per_split - 1) / p.cols_per_split;
  if (p.col_splits < 1) p.col_splits = 1;
  return p;
}

// Row LSE (R,) into row_out when rows, the strip's column LSE (M,) into col_out when cols
// (natural log, fp32; -inf for an empty set, NaN if any term is NaN).  row_part must hold
// col_splits x R floats when rows and col_splits > 1 (else may be null); col_part must hold
// row_groups x M floats when cols and row_groups > 1 (else may be null).
cudaError_t lse_fwd(const StripArgs& a, bool rows, bool cols, const LseFwdPlan& plan, float* row_part,
                    float* col_part, float* row_out, float* col_out, cudaStream_t stream);

// LSE backward, in place: dS = g_row[i] * exp(s - row_lse[i]) + g_col[j] * exp(s - col_lse[j]).
// row_lse/g_row (R,) and col_lse/g_col (M,) are null for an inactive side; an LSE of -inf (all
// entries excluded) gives a zero term; excluded entries give 0.
cudaError_t lse_bwd(const StripArgs& a, const float* row_lse, const float* g_row, const float* col_lse,
                    const float* g_col, OutType out, cudaStream_t stream);

// Sigmoid-pair forward: row_sum[i] = sum_j softplus(t), t = -s on the positive pair, s elsewhere.
cudaError_t sigmoid_fwd(const StripArgs& a, float* row_sum, cudaStream_t stream);

// Sigmoid-pair backward, in place: G = sigmoid(s) off the positive pair, -sigmoid(-s) on it;
// row_sum[i] = sum_j G (fp32, before rounding to the output dtype).
cudaError_t sigmoid_bwd(const StripArgs& a, OutType out, float* row_sum, cudaStream_t stream);

}  // namespace fastcl_strips
