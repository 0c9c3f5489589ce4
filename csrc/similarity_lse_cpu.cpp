// Row/column log-sum-exp of S = scale * q @ k^T + bias on the CPU, tile by tile.
//
// ATen's matmul fills one bounded (BR x BC) tile at a time; fused OpenMP loops turn it into
// online log-sum-exp statistics (forward) or the combined gradient tile (backward), which is
// folded straight into dq/dk by two more matmuls.  Nothing of size N x M is ever allocated.
// Every reduction has a fixed order (threads own disjoint rows or columns), so results are
// deterministic.  fp32/bf16/fp16 inputs are computed in fp32, fp64 inputs in fp64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "fast_math.h"
#include "score_tiles.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 512;
constexpr int64_t kTileCols = 1024;

using fastcl::fast_exp;  // shared vectorisable exp, csrc/fast_math.h

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Sets the excluded entries (j == i + offset) of a tile starting at (i0, j0) to -inf.  The bias
// is a constant shift, so it never touches the tile: LSE(s + b) = LSE(s) + b.
template <typename T>
void mask_diagonal(at::Tensor& tile, int64_t i0, int64_t j0, int64_t offset) {
  T* t = tile.data_ptr<T>();
  const int64_t nr = tile.size(0), nc = tile.size(1);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t c = i0 + r + offset - j0;
    if (c >= 0 && c < nc) t[r * nc + c] = neg_inf<T>();
  }
}

// Online update of (max, sum) with one tile row; the reference point is 0 while the row is
// still all -inf, so that -inf - -inf never appears.
template <typename T>
void update_rows(const T* tile, int64_t nr, int64_t nc, T* row_m, T* row_s) {
  at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = tile + r * nc;
      T mt = neg_inf<T>();
#pragma omp simd reduction(max : mt)
      for (int64_t c = 0; c < nc; ++c) mt = s[c] > mt ? s[c] : mt;
      T m_old = row_m[r];
      T m_new = mt > m_old ? mt : m_old;
      T ref = m_new == neg_inf<T>() ? T(0) : m_new;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < nc; ++c) acc += fast_exp(s[c] - ref);
      T factor = m_old == neg_inf<T>() ? T(0) : fast_exp(m_old - ref);
      row_s[r] = row_s[r] * factor + acc;
      row_m[r] = m_new;
    }
  });
}

template <typename T>
void update_cols(const T* tile, int64_t nr, int64_t nc, T* col_m, T* col_s) {
  at::parallel_for(0, nc, 256, [&](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    std::vector<T> m_new(col_m + c0, col_m + c1), ref(w);
    for (int64_t r = 0; r < nr; ++r) {
      const T* s = tile + r * nc + c0;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) m_new[c] = s[c] > m_new[c] ? s[c] : m_new[c];
    }
    for (int64_t c = 0; c < w; ++c) {
      ref[c] = m_new[c] == neg_inf<T>() ? T(0) : m_new[c];
      T m_old = col_m[c0 + c];
      T factor = m_old == neg_inf<T>() ? T(0) : fast_exp(m_old - ref[c]);
      col_s[c0 + c] *= factor;
      col_m[c0 + c] = m_new[c];
    }
    T* sum = col_s + c0;
    for (int64_t r = 0; r < nr; ++r) {
      const T* s = tile + r * nc + c0;
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) sum[c] += fast_exp(s[c] - ref[c]);
    }
  });
}

// lse = m + log(s) + bias; a row with every entry excluded gives -inf.
template <typename T>
void finish_lse(const T* m, const T* s, T bias, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = m[i] + std::log(s[i]) + bias;
}

at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& qf, const at::Tensor& kf, T scale,
                                                T bias, bool rows, bool cols, bool has_diag,
                                                int64_t offset) {
  const int64_t N = qf.size(0), M = kf.size(0);
  auto opts = qf.options();
  at::Tensor row_m = at::full({rows ? N : 0}, neg_inf<T>(), opts), row_s = at::zeros({rows ? N : 0}, opts);
  at::Tensor col_m = at::full({cols ? M : 0}, neg_inf<T>(), opts), col_s = at::zeros({cols ? M : 0}, opts);
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols,
                              [&](at::Tensor& tile, const at::Tensor&, const at::Tensor&, int64_t i0, int64_t j0) {
    if (has_diag) mask_diagonal<T>(tile, i0, j0, offset);
    const int64_t nr = tile.size(0), nc = tile.size(1);
    const T* t = tile.data_ptr<T>();
    if (rows) update_rows<T>(t, nr, nc, row_m.data_ptr<T>() + i0, row_s.data_ptr<T>() + i0);
    if (cols) update_cols<T>(t, nr, nc, col_m.data_ptr<T>() + j0, col_s.data_ptr<T>() + j0);
  });
  at::Tensor row_lse = at::empty_like(row_m), col_lse = at::empty_like(col_m);
  if (rows) finish_lse<T>(row_m.data_ptr<T>(), row_s.data_ptr<T>(), bias, row_lse.data_ptr<T>(), N);
  if (cols) finish_lse<T>(col_m.data_ptr<T>(), col_s.data_ptr<T>(), bias, col_lse.data_ptr<T>(), M);
  return {row_lse, col_lse};
}

// dS = g_row[i] * exp(s - row_lse[i]) + g_col[j] * exp(s - col_lse[j]), then
// Gq += dS @ k, Gk += dS^T @ q.  The tile holds s - bias, so the bias moves into the LSEs.
// A fully excluded row/column (lse = -inf) contributes 0.
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& qf, const at::Tensor& kf, T scale,
                                                 T bias, const at::Tensor& row_lse,
                                                 const at::Tensor& col_lse, const at::Tensor& g_row,
                                                 const at::Tensor& g_col, bool has_diag,
                                                 int64_t offset) {
  const bool rows = row_lse.numel() > 0, cols = col_lse.numel() > 0;
  auto safe = [bias](const at::Tensor& lse) {
    return at::where(at::isneginf(lse), at::full({}, std::numeric_limits<T>::infinity(), lse.options()), lse - bias).contiguous();
  };
  at::Tensor rl = rows ? safe(row_lse) : row_lse, cl = cols ? safe(col_lse) : col_lse;
  at::Tensor gr = rows ? g_row.to(qf.scalar_type()).contiguous() : g_row;
  at::Tensor gc = cols ? g_col.to(qf.scalar_type()).contiguous() : g_col;
  at::Tensor Gq = at::zeros_like(qf), Gk = at::zeros_like(kf);
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols,
                              [&](at::Tensor& tile, const at::Tensor& q_strip, const at::Tensor& k_chunk,
                                  int64_t i0, int64_t j0) {
    if (has_diag) mask_diagonal<T>(tile, i0, j0, offset);
    const int64_t nr = tile.size(0), nc = tile.size(1);
    T* t = tile.data_ptr<T>();
    const T* rlp = rows ? rl.data_ptr<T>() + i0 : nullptr;
    const T* grp = rows ? gr.data_ptr<T>() + i0 : nullptr;
    const T* clp = cols ? cl.data_ptr<T>() + j0 : nullptr;
    const T* gcp = cols ? gc.data_ptr<T>() + j0 : nullptr;
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* s = t + r * nc;
        if (rows && cols) {
          const T gri = grp[r], rli = rlp[r];
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c)
            s[c] = gri * fast_exp(s[c] - rli) + gcp[c] * fast_exp(s[c] - clp[c]);
        } else if (rows) {
          const T gri = grp[r], rli = rlp[r];
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c) s[c] = gri * fast_exp(s[c] - rli);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < nc; ++c) s[c] = gcp[c] * fast_exp(s[c] - clp[c]);
        }
      }
    });
    fastcl::accumulate_tile_grads(Gq, Gk, tile, q_strip, k_chunk, i0, j0);
  });
  return {Gq, Gk};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "fastcl: q and k must be 2-D");
  TORCH_CHECK(q.size(1) == k.size(1), "fastcl: q and k must have the same feature size D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "fastcl cpu backend: tensors must be on the CPU");
}

std::tuple<at::Tensor, at::Tensor> sim_lse_fwd(const at::Tensor& q, const at::Tensor& k, double scale,
                                               double bias, bool rows, bool cols,
                                               c10::optional<int64_t> diag_offset) {
  check_inputs(q, k);
  const auto ct = compute_type(q);
  at::Tensor qf = q.to(ct).contiguous(), kf = k.to(ct).contiguous();
  const bool has_diag = diag_offset.has_value();
  const int64_t off = diag_offset.value_or(0);
  if (ct == at::kDouble) return forward_impl<double>(qf, kf, scale, bias, rows, cols, has_diag, off);
  return forward_impl<float>(qf, kf, static_cast<float>(scale), static_cast<float>(bias), rows, cols,
                             has_diag, off);
}

std::tuple<at::Tensor, at::Tensor> sim_lse_bwd(const at::Tensor& q, const at::Tensor& k, double scale,
                                               double bias, const at::Tensor& row_lse,
                                               const at::Tensor& col_lse, const at::Tensor& g_row,
                                               const at::Tensor& g_col,
                                               c10::optional<int64_t> diag_offset) {
  check_inputs(q, k);
  TORCH_CHECK(row_lse.numel() == 0 || (row_lse.numel() == q.size(0) && g_row.numel() == q.size(0)),
              "fastcl: row statistics do not match q");
  TORCH_CHECK(col_lse.numel() == 0 || (col_lse.numel() == k.size(0) && g_col.numel() == k.size(0)),
              "fastcl: column statistics do not match k");
  const auto ct = compute_type(q);
  at::Tensor qf = q.to(ct).contiguous(), kf = k.to(ct).contiguous();
  at::Tensor rl = row_lse.to(ct).contiguous(), cl = col_lse.to(ct).contiguous();
  const bool has_diag = diag_offset.has_value();
  const int64_t off = diag_offset.value_or(0);
  if (ct == at::kDouble)
    return backward_impl<double>(qf, kf, scale, bias, rl, cl, g_row, g_col, has_diag, off);
  return backward_impl<float>(qf, kf, static_cast<float>(scale), static_cast<float>(bias), rl, cl,
                              g_row, g_col, has_diag, off);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcl_C, m) {
  m.def("sim_lse_fwd(Tensor q, Tensor k, float scale, float bias, bool rows, bool cols, int? diag_offset) -> (Tensor, Tensor)",
        &sim_lse_fwd);
  m.def("sim_lse_bwd(Tensor q, Tensor k, float scale, float bias, Tensor row_lse, Tensor col_lse, Tensor g_row, Tensor g_col, int? diag_offset) -> (Tensor, Tensor)",
        &sim_lse_bwd);
}
