// ATen glue of the strip epilogues (similarity_strips.cu): checks, allocation, launch on the
// current stream.  Built only with CUDA PyTorch (setup.py); the Python driver that calls these
// ops once per strip is fastcl/ops/strips.py.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "similarity_strips.cuh"

namespace {

using fastcl_strips::StripArgs;

void check_scores(const at::Tensor& s) {
  TORCH_CHECK(s.is_cuda() && s.scalar_type() == at::kFloat && s.dim() == 2,
              "scores must be a 2-D float32 CUDA tensor, got ", s.scalar_type(), " of shape ", s.sizes(),
              " on ", s.device());
  TORCH_CHECK(s.stride(1) == 1 && s.stride(0) >= s.size(1), "scores must have unit column stride and row "
              "stride >= its column count, got strides ", s.strides());
}

void check_vector(const at::Tensor& t, int64_t n, const at::Tensor& scores, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == scores.device() && t.dim() == 1 && t.numel() == n &&
              t.is_contiguous(), name, " must be a contiguous float32 vector of ", n, " elements on ",
              scores.device(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

StripArgs make_args(const at::Tensor& scores, const at::Tensor& scale, const at::Tensor& bias,
                    c10::optional<int64_t> diag) {
  check_scores(scores);
  for (const auto* t : {&scale, &bias})
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == scores.device(),
                "scale and bias must be one-element float32 tensors on ", scores.device());
  StripArgs a{};
  a.scores = scores.data_ptr<float>();
  a.R = scores.size(0);
  a.M = scores.size(1);
  a.ld = scores.stride(0);
  a.scale = scale.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.has_diag = diag.has_value();
  a.diag = diag.value_or(0);
  return a;
}

fastcl_strips::OutType out_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fastcl_strips::kOutF32;
    case at::kHalf: return fastcl_strips::kOutF16;
    case at::kBFloat16: return fastcl_strips::kOutBF16;
    default: break;
  }
  TORCH_CHECK(false, "out_dtype must be float32, float16 or bfloat16, got ", t);
  return fastcl_strips::kOutF32;  // not reached
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> strip_lse_fwd(const at::Tensor& scores, const at::Tensor& scale,
                                                 const at::Tensor& bias, c10::optional<int64_t> diag, bool rows,
                                                 bool cols) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const StripArgs a = make_args(scores, scale, bias, diag);
  const auto opts = scores.options();
  at::Tensor row = at::empty({rows ? a.R : 0}, opts), col = at::empty({cols ? a.M : 0}, opts);
  if (a.R == 0 || a.M == 0) {  // empty sets: -inf
    row.fill_(-std::numeric_limits<float>::infinity());
    col.fill_(-std::numeric_limits<float>::infinity());
    return {row, col};
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto plan = fastcl_strips::lse_fwd_plan(a.R, a.M, sms);
  at::Tensor row_part, col_part;
  if (rows && plan.col_splits > 1) row_part = at::empty({plan.col_splits, a.R}, opts);
  if (cols && plan.row_groups > 1) col_part = at::empty({plan.row_groups, a.M}, opts);
  check_launch(fastcl_strips::lse_fwd(a, rows, cols, plan, row_part.defined() ? row_part.data_ptr<float>() : nullptr,
                                      col_part.defined() ? col_part.data_ptr<float>() : nullptr,
                                      rows ? row.data_ptr<float>() : nullptr, cols ? col.data_ptr<float>() : nullptr,
                                      at::cuda::getCurrentCUDAStream()),
               "cuda_strip_lse_fwd");
  return {row, col};
}

void strip_lse_bwd(const at::Tensor& scores, const at::Tensor& scale, const at::Tensor& bias,
                   c10::optional<int64_t> diag, const c10::optional<at::Tensor>& row_lse,
                   const c10::optional<at::Tensor>& g_row, const c10::optional<at::Tensor>& col_lse,
                   const c10::optional<at::Tensor>& g_col, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const StripArgs a = make_args(scores, scale, bias, diag);
  TORCH_CHECK(row_lse.has_value() == g_row.has_value() && col_lse.has_value() == g_col.has_value(),
              "row_lse/g_row and col_lse/g_col must be given in pairs");
  const float* stats[4] = {nullptr, nullptr, nullptr, nullptr};
  const c10::optional<at::Tensor>* given[4] = {&row_lse, &g_row, &col_lse, &g_col};
  const char* names[4] = {"row_lse", "g_row", "col_lse", "g_col"};
  for (int i = 0; i < 4; ++i) {
    if (!given[i]->has_value()) continue;
    check_vector(**given[i], i < 2 ? a.R : a.M, scores, names[i]);
    stats[i] = (*given[i])->data_ptr<float>();
  }
  check_launch(fastcl_strips::lse_bwd(a, stats[0], stats[1], stats[2], stats[3], out_type(out_dtype),
                                      at::cuda::getCurrentCUDAStream()),
               "cuda_strip_lse_bwd");
}

at::Tensor strip_sigmoid_fwd(const at::Tensor& scores, const at::Tensor& scale, const at::Tensor& bias,
                             int64_t diag) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const StripArgs a = make_args(scores, scale, bias, diag);
  at::Tensor row_sum = at::empty({a.R}, scores.options());
  check_launch(fastcl_strips::sigmoid_fwd(a, row_sum.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "cuda_strip_sigmoid_fwd");
  if (a.M == 0) row_sum.zero_();
  return row_sum;
}

at::Tensor strip_sigmoid_bwd(const at::Tensor& scores, const at::Tensor& scale, const at::Tensor& bias,
                             int64_t diag, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const StripArgs a = make_args(scores, scale, bias, diag);
  at::Tensor row_sum = at::empty({a.R}, scores.options());
  check_launch(fastcl_strips::sigmoid_bwd(a, out_type(out_dtype), row_sum.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream()),
               "cuda_strip_sigmoid_bwd");
  if (a.M == 0) row_sum.zero_();
  return row_sum;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcl_C, m) {
  m.def("cuda_strip_lse_fwd(Tensor scores, Tensor scale, Tensor bias, int? diag, bool rows, bool cols) "
        "-> (Tensor, Tensor)");
  m.def("cuda_strip_lse_bwd(Tensor(a!) scores, Tensor scale, Tensor bias, int? diag, Tensor? row_lse, "
        "Tensor? g_row, Tensor? col_lse, Tensor? g_col, ScalarType out_dtype) -> ()");
  m.def("cuda_strip_sigmoid_fwd(Tensor scores, Tensor scale, Tensor bias, int diag) -> Tensor");
  m.def("cuda_strip_sigmoid_bwd(Tensor(a!) scores, Tensor scale, Tensor bias, int diag, ScalarType out_dtype) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastcl_C, CUDA, m) {
  m.impl("cuda_strip_lse_fwd", &strip_lse_fwd);
  m.impl("cuda_strip_lse_bwd", &strip_lse_bwd);
  m.impl("cuda_strip_sigmoid_fwd", &strip_sigmoid_fwd);
  m.impl("cuda_strip_sigmoid_bwd", &strip_sigmoid_bwd);
}
