// Pairwise sigmoid loss  L = sum_ij softplus(-z_ij * s_ij),  s = scale * q @ k^T + bias,
// z = +1 on the diagonal (j == i) and -1 elsewhere (SigLIP), on the CPU, tile by tile.
//
// A GEMM fills one bounded (BR x BC) tile at a time (csrc/score_tiles.h); a fused loop turns it
// into per-row loss sums (forward) or the gradient tile dL/ds (backward), which two more GEMMs
// fold into Gq = G @ k and Gk = G^T @ q.  Nothing of size N x M is ever allocated.  Threads own
// disjoint rows and every sum has a fixed order, so results are deterministic.  fp32/bf16/fp16
// inputs are computed in fp32, fp64 inputs in fp64.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "fast_math.h"
#include "score_tiles.h"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

// 512 x 1024 fp32 tiles (2 MB): on this 2-core CPU the backward's tile GEMMs ran ~20% faster
// than with 256 x 2048 (same measurement as csrc/similarity_lse_cpu.cpp).
constexpr int64_t kTileRows = 512;
constexpr int64_t kTileCols = 1024;

using fastcl::sigmoid;
using fastcl::softplus;

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The two row kernels live in their own functions with restrict pointers: inlined into the
// parallel_for lambda, GCC kept a scalar loop hot (seen with perf: 15 ns per element).
template <typename T>
__attribute__((noinline)) T softplus_row_sum(const T* __restrict s, int64_t n, T bias) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += softplus(s[c] + bias);  // -inf + bias stays -inf
  return acc;
}

// s[c] <- sigmoid(s[c] + bias); returns the row's sum.
template <typename T>
__attribute__((noinline)) T sigmoid_row_fill(T* __restrict s, int64_t n, T bias) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) {
    const T g = sigmoid(s[c] + bias);
    s[c] = g;
    acc += g;
  }
  return acc;
}

// Row r of a tile starting at (i0, j0) holds the positive pair when column i0 + r - j0 is inside.
inline int64_t diag_col(int64_t i0, int64_t r, int64_t j0, int64_t nc) {
  const int64_t c = i0 + r - j0;
  return (c >= 0 && c < nc) ? c : -1;
}

// Per-row loss sums accumulate in T; the final sum over rows runs in double in row order.
template <typename T>
at::Tensor forward_impl(const at::Tensor& qf, const at::Tensor& kf, T scale, T bias) {
  const int64_t N = qf.size(0);
  at::Tensor row_loss = at::zeros({N}, qf.options());
  T* rl = row_loss.data_ptr<T>();
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols, fastcl::score_tile_slots(N, kTileRows),
                              [&](int64_t, at::Tensor& tile, const at::Tensor&, const at::Tensor&, int64_t i0,
                                  int64_t j0) {
    const int64_t nr = tile.size(0), nc = tile.size(1);
    T* t = tile.data_ptr<T>();
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* s = t + r * nc;
        const int64_t d = diag_col(i0, r, j0, nc);
        T pos_term = 0;
        if (d >= 0) {  // the positive pair leaves the vector loop: softplus(-s) there
          pos_term = softplus(-(s[d] + bias));
          s[d] = -std::numeric_limits<T>::infinity();  // softplus(-inf) = 0 below
        }
        // The tile already holds scale * q.k (BLAS alpha).
        rl[i0 + r] += softplus_row_sum<T>(s, nc, bias) + pos_term;
      }
    });
  });
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += static_cast<double>(rl[i]);
  return at::full({}, total, qf.options());
}

// G_ij = dL/ds_ij = sigmoid(s_ij) off the diagonal and -sigmoid(-s_ii) on it.
// Returns Gq = G @ k (N, D), Gk = G^T @ q (M, D) and sum(G) (0-d), all in the compute type.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& qf, const at::Tensor& kf,
                                                             T scale, T bias, bool need_q, bool need_k) {
  const int64_t N = qf.size(0);
  const int64_t slots = fastcl::score_tile_slots(N, kTileRows, fastcl::grad_slot_bytes(kf, need_k));
  fastcl::TileGrads grads(qf, kf, slots, need_q, need_k);
  at::Tensor row_g = at::zeros({N}, qf.options());
  T* rg = row_g.data_ptr<T>();
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols, slots,
                              [&](int64_t slot, at::Tensor& tile, const at::Tensor& q_strip,
                                  const at::Tensor& k_chunk, int64_t i0, int64_t j0) {
    const int64_t nr = tile.size(0), nc = tile.size(1);
    T* t = tile.data_ptr<T>();
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* s = t + r * nc;
        const int64_t d = diag_col(i0, r, j0, nc);
        T pos_g = 0;
        if (d >= 0) {
          pos_g = -sigmoid(-(s[d] + bias));
          s[d] = -std::numeric_limits<T>::infinity();  // sigmoid(-inf) = 0 below
        }
        const T acc = sigmoid_row_fill<T>(s, nc, bias);
        if (d >= 0) s[d] = pos_g;
        rg[i0 + r] += acc + pos_g;
      }
    });
    grads.accumulate(slot, tile, q_strip, k_chunk, i0, j0);
  });
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += static_cast<double>(rg[i]);
  auto [Gq, Gk] = grads.finish();
  return {Gq, Gk, at::full({}, total, qf.options())};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "fastcl: q and k must be 2-D");
  TORCH_CHECK(q.size(1) == k.size(1), "fastcl: q and k must have the same feature size D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "fastcl cpu backend: tensors must be on the CPU");
}

at::Tensor sigmoid_pair_fwd(const at::Tensor& q, const at::Tensor& k, double scale, double bias) {
  check_inputs(q, k);
  const auto ct = compute_type(q);
  at::Tensor qf = q.to(ct).contiguous(), kf = k.to(ct).contiguous();
  if (ct == at::kDouble) return forward_impl<double>(qf, kf, scale, bias);
  return forward_impl<float>(qf, kf, static_cast<float>(scale), static_cast<float>(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_pair_bwd(const at::Tensor& q, const at::Tensor& k,
                                                                double scale, double bias, bool need_q,
                                                                bool need_k) {
  check_inputs(q, k);
  const auto ct = compute_type(q);
  at::Tensor qf = q.to(ct).contiguous(), kf = k.to(ct).contiguous();
  if (ct == at::kDouble) return backward_impl<double>(qf, kf, scale, bias, need_q, need_k);
  return backward_impl<float>(qf, kf, static_cast<float>(scale), static_cast<float>(bias), need_q, need_k);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcl_C, m) {
  m.def("sigmoid_pair_fwd(Tensor q, Tensor k, float scale, float bias) -> Tensor", &sigmoid_pair_fwd);
  m.def("sigmoid_pair_bwd(Tensor q, Tensor k, float scale, float bias, bool need_q=True, bool need_k=True) -> "
        "(Tensor, Tensor, Tensor)",
        &sigmoid_pair_bwd);
}
