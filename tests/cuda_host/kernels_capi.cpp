// C entry points to the launchers of csrc/cuda, compiled for the CPU with ../cuda_host.h, for
// ctypes (tests/_cuda_host.py).  Pointers are host memory; each call returns a cudaError_t.
#include <cstdio>

#include "masking.cuh"
#include "similarity_strips.cuh"

using fastcl_strips::StripArgs;

namespace {

StripArgs strip_args(float* scores, int64_t R, int64_t M, int64_t ld, const float* scale, const float* bias,
                     int has_diag, int64_t diag) {
  StripArgs a{};
  a.scores = scores;
  a.R = R;
  a.M = M;
  a.ld = ld;
  a.scale = scale;
  a.bias = bias;
  a.has_diag = has_diag != 0;
  a.diag = diag;
  return a;
}

}  // namespace

extern "C" {

// -fsanitize=alignment calls these on a misaligned access (no sanitizer runtime is linked): a
// GPU would fault there, so the launch fails with the place in the message.
struct HostSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct HostTypeMismatch {
  HostSourceLocation loc;
  const void* type;
  unsigned char log_alignment, check_kind;
};

void __ubsan_handle_type_mismatch_v1(const HostTypeMismatch* d, uintptr_t ptr) {
  char msg[512];
  snprintf(msg, sizeof msg, "misaligned address %#lx for %d-byte alignment at %s:%u", static_cast<unsigned long>(ptr),
           1 << d->log_alignment, d->loc.file, d->loc.line);
  auto& s = cuda_host::state();
  if (s.cur != nullptr) cuda_host::fail(msg);  // in a kernel: the launch fails
  s.failed = true;                              // host code: the next error string says it
  s.error = msg;
  s.last = cudaErrorLaunchFailure;
}

void __ubsan_handle_type_mismatch_v1_abort(const HostTypeMismatch* d, uintptr_t ptr) {
  __ubsan_handle_type_mismatch_v1(d, ptr);
}

void host_set_reverse(int reverse) { cuda_host::state().reverse = reverse != 0; }
const char* host_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
int64_t host_launches() { return cuda_host::state().launches; }

void host_lse_fwd_plan(int64_t R, int64_t M, int sm_count, int64_t* out) {
  const auto p = fastcl_strips::lse_fwd_plan(R, M, sm_count);
  out[0] = p.row_groups;
  out[1] = p.col_splits;
  out[2] = p.cols_per_split;
}

int host_lse_fwd(float* scores, int64_t R, int64_t M, int64_t ld, const float* scale, const float* bias, int has_diag,
                 int64_t diag, int rows, int cols, const int64_t* plan, float* row_part, float* col_part,
                 float* row_out, float* col_out) {
  const fastcl_strips::LseFwdPlan p{plan[0], plan[1], plan[2]};
  return fastcl_strips::lse_fwd(strip_args(scores, R, M, ld, scale, bias, has_diag, diag), rows != 0, cols != 0, p,
                                row_part, col_part, row_out, col_out, nullptr);
}

int host_lse_bwd(float* scores, int64_t R, int64_t M, int64_t ld, const float* scale, const float* bias, int has_diag,
                 int64_t diag, const float* row_lse, const float* g_row, const float* col_lse, const float* g_col,
                 int out_type) {
  return fastcl_strips::lse_bwd(strip_args(scores, R, M, ld, scale, bias, has_diag, diag), row_lse, g_row, col_lse,
                                g_col, static_cast<fastcl_strips::OutType>(out_type), nullptr);
}

int host_sigmoid_fwd(float* scores, int64_t R, int64_t M, int64_t ld, const float* scale, const float* bias,
                     int64_t diag, float* row_sum) {
  return fastcl_strips::sigmoid_fwd(strip_args(scores, R, M, ld, scale, bias, 1, diag), row_sum, nullptr);
}

int host_sigmoid_bwd(float* scores, int64_t R, int64_t M, int64_t ld, const float* scale, const float* bias,
                     int64_t diag, int out_type, float* row_sum) {
  return fastcl_strips::sigmoid_bwd(strip_args(scores, R, M, ld, scale, bias, 1, diag),
                                    static_cast<fastcl_strips::OutType>(out_type), row_sum, nullptr);
}

int host_segment_gather(const fastcl_masking::SegmentGatherArgs* a) {
  return fastcl_masking::segment_gather_cuda(*a, nullptr);
}

int host_mask_indices(const fastcl_masking::MaskIndicesArgs* a) {
  return fastcl_masking::mask_indices_cuda(*a, nullptr);
}

}  // extern "C"
