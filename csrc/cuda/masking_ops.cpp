// ATen glue: registers the CUDA implementations of fastcl_C::masking_segment_gather and
// fastcl_C::masking_indices (schemas in csrc/masking_cpu.cpp) on top of the raw-pointer launchers
// in masking.cu.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../masking_args.h"
#include "masking.cuh"

namespace {

// The launchers' DType for a dtype the op checked (float32, float16, bfloat16 or float64).
fastcl_masking::DType dtype_code(at::ScalarType st) {
  return st == at::kFloat ? fastcl_masking::kF32
       : st == at::kHalf ? fastcl_masking::kF16
       : st == at::kBFloat16 ? fastcl_masking::kBF16 : fastcl_masking::kF64;
}

at::Tensor segment_gather_cuda_op(const at::Tensor& src_in, const at::Tensor& start,
                                  const c10::optional<at::Tensor>& count, const c10::optional<at::Tensor>& order,
                                  const c10::optional<at::Tensor>& fill_in, const c10::optional<at::Tensor>& pos_in,
                                  bool out_fp32) {
  auto d = fastcl_masking::check_args(src_in, start, count, order, fill_in, pos_in);
  TORCH_CHECK(src_in.is_cuda(), "src must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.stride(2) == 1 ? src_in : src_in.contiguous();
  at::Tensor fill, pos;
  if (fill_in.has_value()) fill = fill_in->contiguous().view({-1});
  if (pos_in.has_value()) pos = pos_in->stride(1) == 1 ? *pos_in : pos_in->contiguous();
  const auto st = src.scalar_type();
  const auto acc_t = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({d.B, d.R, d.D}, src.options().dtype(out_fp32 ? acc_t : st));
  if (out.numel() == 0) return out;

  fastcl_masking::SegmentGatherArgs a{};
  a.src = src.data_ptr();
  a.start = start.data_ptr<int64_t>();
  a.count = count ? count->data_ptr<int64_t>() : nullptr;
  a.order = order ? order->data_ptr<int64_t>() : nullptr;
  a.fill = fill.defined() ? fill.data_ptr() : nullptr;
  a.pos = pos.defined() ? pos.data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.B = d.B; a.S = d.S; a.R = d.R; a.D = d.D; a.J = d.J;
  a.src_sb = src.stride(0); a.src_ss = src.stride(1);
  a.start_sb = start.stride(0); a.start_sr = start.stride(1);
  a.count_sb = count ? count->stride(0) : 0; a.count_sr = count ? count->stride(1) : 0;
  a.order_sb = order ? order->stride(0) : 0; a.order_sj = order ? order->stride(1) : 0;
  a.pos_ss = pos.defined() ? pos.stride(0) : 0;
  a.dtype = dtype_code(st);
  a.out_fp32 = out_fp32;
  const cudaError_t err = fastcl_masking::segment_gather_cuda(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masking_segment_gather CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_indices_cuda_op(const at::Tensor& noise, int64_t keep,
                                                                    at::ScalarType mask_dtype) {
  TORCH_CHECK(noise.is_cuda() && noise.dim() == 2, "noise must be a (B, L) CUDA tensor, got ", noise.sizes(),
              " on ", noise.device());
  const auto st = noise.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "noise must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t B = noise.size(0), L = noise.size(1);
  TORCH_CHECK(0 <= keep && keep <= L, "keep must be in [0, L] = [0, ", L, "], got ", keep);
  TORCH_CHECK(mask_dtype == at::kFloat || mask_dtype == at::kDouble, "mask_dtype must be float32 or float64, got ",
              mask_dtype);
  const c10::cuda::CUDAGuard guard(noise.device());
  const auto opts = noise.options();
  at::Tensor ids_restore = at::empty({B, L}, opts.dtype(at::kLong));
  at::Tensor ids_keep = at::empty({B, keep}, opts.dtype(at::kLong));
  at::Tensor mask = at::empty({B, L}, opts.dtype(mask_dtype));
  if (B * L == 0) return {ids_restore, ids_keep, mask};
  fastcl_masking::MaskIndicesArgs a{};
  a.noise = noise.data_ptr();
  a.ids_restore = ids_restore.data_ptr<int64_t>();
  a.ids_keep = ids_keep.data_ptr<int64_t>();
  a.mask = mask.data_ptr();
  a.B = B; a.L = L; a.K = keep;
  a.noise_sb = noise.stride(0); a.noise_sl = noise.stride(1);
  a.dtype = dtype_code(st);
  a.mask_f64 = mask_dtype == at::kDouble;
  const cudaError_t err = fastcl_masking::mask_indices_cuda(a, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "masking_indices CUDA launch failed: ", cudaGetErrorString(err));
  return {ids_restore, ids_keep, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcl_C, CUDA, m) {
  m.impl("masking_segment_gather", &segment_gather_cuda_op);
  m.impl("masking_indices", &mask_indices_cuda_op);
}
