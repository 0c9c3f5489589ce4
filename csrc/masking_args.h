// Argument checks shared by the CPU and CUDA implementations of fastcl_C::masking_segment_gather.
// The Python layer validates user input with friendly errors; these checks keep a direct call of
// the op from reaching a kernel with shapes or dtypes it cannot handle.
#pragma once
#include <ATen/ATen.h>

namespace fastcl_masking {

struct Dims {
  int64_t B, S, R, D, J;  // J: rows addressable by start (order length, or S without order)
};

inline void check_index(const char* name, const at::Tensor& t, int64_t B, const at::Device& dev) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B, name, " must be (B, *) with B=", B, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
}

inline Dims check_args(const at::Tensor& src, const at::Tensor& start, const c10::optional<at::Tensor>& count,
                       const c10::optional<at::Tensor>& order, const c10::optional<at::Tensor>& fill,
                       const c10::optional<at::Tensor>& pos) {
  TORCH_CHECK(src.dim() == 3, "src must be (B, S, D), got ", src.sizes());
  auto st = src.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "src must be float32, float64, float16 or bfloat16, got ", st);
  Dims d{src.size(0), src.size(1), start.size(1), src.size(2), src.size(1)};
  check_index("start", start, d.B, src.device());
  if (count.has_value()) {
    check_index("count", *count, d.B, src.device());
    TORCH_CHECK(count->size(1) == d.R, "count must be (B, R) like start, got ", count->sizes());
  }
  if (order.has_value()) {
    check_index("order", *order, d.B, src.device());
    d.J = order->size(1);
  }
  if (fill.has_value()) {
    TORCH_CHECK(fill->numel() == d.D && fill->scalar_type() == st && fill->device() == src.device(),
                "fill must have D=", d.D, " elements, dtype ", st, " and src's device");
  }
  if (pos.has_value()) {
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == d.S && pos->size(1) == d.D && pos->scalar_type() == st &&
                    pos->device() == src.device(),
                "pos must be (S, D) = (", d.S, ", ", d.D, ") with src's dtype and device, got ", pos->sizes());
  }
  return d;
}

}  // namespace fastcl_masking
