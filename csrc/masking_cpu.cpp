// Token masking on the CPU: the one "segment gather" behind random_masking, gather_tokens and
// restore_tokens (see kernels/masking.py for the formula).  OpenMP threads (at::parallel_for)
// own disjoint output rows, so there are no atomics and results are deterministic; segment sums
// run in fp32 (fp64 for fp64) in ascending order.  Plain copies use memcpy.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "masking_args.h"

namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Large fresh outputs are mostly page-fault time when first written (the dense backward
// gradient is B*L*D).  Asking for transparent huge pages before the first touch cuts the faults
// 512-fold where the kernel's THP mode is "madvise"; elsewhere this is a harmless no-op.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Strides {
  int64_t sb, ss, ob, orow, tb, tr, cb, cr, qb, qj, ps;
};

template <typename T, typename O>
void segment_gather_impl(const T* src, const int64_t* start, const int64_t* count, const int64_t* order,
                         const T* fill, const T* pos, O* out, fastcl_masking::Dims d, Strides s) {
  using A = typename AccOf<T>::type;
  std::atomic<bool> bad{false};
  at::parallel_for(0, d.B * d.R, 16, [&](int64_t i0, int64_t i1) {
    std::vector<A> acc(d.D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / d.R, r = i % d.R;
      const int64_t s0 = start[b * s.tb + r * s.tr];
      // Without count, an out-of-range start marks an empty row (the un-shuffle's masked slots).
      const int64_t n = count ? count[b * s.cb + r * s.cr] : (s0 >= 0 && s0 < d.J ? 1 : 0);
      O* o = out + b * s.ob + r * s.orow;
      if (n <= 0) {
        for (int64_t c = 0; c < d.D; ++c) o[c] = fill ? static_cast<O>(static_cast<A>(fill[c])) : O(0);
        continue;
      }
      if (s0 < 0 || s0 + n > d.J) { bad = true; continue; }
      auto row_of = [&](int64_t j) { return order ? order[b * s.qb + (s0 + j) * s.qj] : s0 + j; };
      if (n == 1 && !pos && std::is_same<T, O>::value) {
        const int64_t row = row_of(0);
        if (row < 0 || row >= d.S) { bad = true; continue; }
        std::memcpy(o, src + b * s.sb + row * s.ss, d.D * sizeof(T));
        continue;
      }
      // -0.0 is the additive identity: a one-term sum reproduces the term bit for bit.
      std::fill(acc.begin(), acc.end(), A(-0.0));
      for (int64_t j = 0; j < n; ++j) {
        const int64_t row = row_of(j);
        if (row < 0 || row >= d.S) { bad = true; break; }
        const T* x = src + b * s.sb + row * s.ss;
        if (pos) {
          const T* p = pos + row * s.ps;
#pragma omp simd
          for (int64_t c = 0; c < d.D; ++c) acc[c] += static_cast<A>(x[c]) + static_cast<A>(p[c]);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < d.D; ++c) acc[c] += static_cast<A>(x[c]);
        }
      }
      for (int64_t c = 0; c < d.D; ++c) o[c] = static_cast<O>(acc[c]);
    }
  });
  TORCH_CHECK(!bad.load(), "masking_segment_gather: an index is out of range");
}

at::Tensor segment_gather_cpu(const at::Tensor& src_in, const at::Tensor& start,
                              const c10::optional<at::Tensor>& count, const c10::optional<at::Tensor>& order,
                              const c10::optional<at::Tensor>& fill_in, const c10::optional<at::Tensor>& pos_in,
                              bool out_fp32) {
  auto d = fastcl_masking::check_args(src_in, start, count, order, fill_in, pos_in);
  TORCH_CHECK(src_in.device().is_cpu(), "src must be a CPU tensor");
  // Batch and row strides are free; the feature dim must be unit-stride for the inner loops.
  const at::Tensor src = src_in.stride(2) == 1 ? src_in : src_in.contiguous();
  c10::optional<at::Tensor> fill, pos;
  if (fill_in.has_value()) fill = fill_in->contiguous().view({-1});
  if (pos_in.has_value()) pos = pos_in->stride(1) == 1 ? *pos_in : pos_in->contiguous();
  const auto st = src.scalar_type();
  const auto acc_t = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({d.B, d.R, d.D}, src.options().dtype(out_fp32 ? acc_t : st));
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  Strides s{src.stride(0), src.stride(1), out.stride(0), out.stride(1), start.stride(0), start.stride(1),
            count ? count->stride(0) : 0, count ? count->stride(1) : 0,
            order ? order->stride(0) : 0, order ? order->stride(1) : 0, pos ? pos->stride(0) : 0};
  const int64_t* cnt = count ? count->data_ptr<int64_t>() : nullptr;
  const int64_t* ord = order ? order->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "masking_segment_gather", [&] {
    using A = typename AccOf<scalar_t>::type;
    const scalar_t* f = fill ? fill->data_ptr<scalar_t>() : nullptr;
    const scalar_t* p = pos ? pos->data_ptr<scalar_t>() : nullptr;
    if (out_fp32)
      segment_gather_impl<scalar_t, A>(src.data_ptr<scalar_t>(), start.data_ptr<int64_t>(), cnt, ord, f, p,
                                       out.data_ptr<A>(), d, s);
    else
      segment_gather_impl<scalar_t, scalar_t>(src.data_ptr<scalar_t>(), start.data_ptr<int64_t>(), cnt, ord, f,
                                              p, out.data_ptr<scalar_t>(), d, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcl_C, m) {
  m.def("masking_segment_gather(Tensor src, Tensor start, Tensor? count, Tensor? order, Tensor? fill, "
        "Tensor? pos, bool out_fp32) -> Tensor");
  // (ids_restore, ids_keep, mask) of random_masking from its noise; CUDA only (csrc/cuda/masking.cu):
  // on the CPU a sort is cheaper than its L * L compares.
  m.def("masking_indices(Tensor noise, int keep, ScalarType mask_dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastcl_C, CPU, m) {
  m.impl("masking_segment_gather", &segment_gather_cpu);
}
