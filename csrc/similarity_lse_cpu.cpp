// Row/column log-sum-exp of S = scale * q @ k^T + bias on the CPU, tile by tile.
//
// A GEMM fills one bounded (BR x BC) tile at a time (csrc/score_tiles.h); fused loops turn it
// into online log-sum-exp statistics (forward) or the combined gradient tile (backward), which
// is folded straight into dq/dk by two more GEMMs.  Nothing of size N x M is ever allocated.
// Every reduction has a fixed order (per-slot and per-chunk partials merged in order), so
// results are deterministic.  fp32/bf16/fp16 inputs are computed in fp32, fp64 inputs in fp64.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "fast_math.h"
#include "score_tiles.h"

#include <algorithm>
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

// Folds a partial (max m_p, sum s_p of exp(x - m_p)) into a running (m, s).  A partial whose
// max is -inf carries sum 0, or NaN when its entries were NaN, and is simply added.
template <typename T>
inline void merge_stat(T& m, T& s, T m_p, T s_p) {
  if (m_p == neg_inf<T>()) {
    s += s_p;
    return;
  }
  const T m_new = m_p > m ? m_p : m;
  s = s * fast_exp(m - m_new) + s_p * fast_exp(m_p - m_new);
  m = m_new;
}

// Rows per chunk of a tile: chunks are the unit of parallel work within a tile (when the
// traversal has one slot) and each keeps its own column partials, merged in chunk order.
constexpr int64_t kChunkRows = 64;

// The column statistics reuse the row exponentials e = exp(s - m_row) through one shared
// reference R per tile: exp(s - R) = e * exp(m_row - R).  That is exact to fp32 for every
// column whose tile maximum lies within kSharedRefGap of R (the terms that matter stay normal
// floats); the rare column further below R is recomputed on its own.
constexpr double kSharedRefGap = 60.0;

// Scratch for the column partials of one tile, reused across tiles.
template <typename T>
struct ColumnScratch {
  std::vector<T> sum, max, chunk_ref, row_max;
};

// Online row and/or column (max, sum) statistics of one (nr x nc) tile, one exp per element.
template <typename T>
void update_stats(const T* tile, int64_t nr, int64_t nc, T* row_m, T* row_s, T* col_m, T* col_s,
                  ColumnScratch<T>& w) {
  const bool cols = col_m != nullptr;
  const int64_t chunks = (nr + kChunkRows - 1) / kChunkRows;
  w.row_max.resize(nr);
  if (cols) {
    w.sum.assign(chunks * nc, T(0));
    w.max.assign(chunks * nc, neg_inf<T>());
    w.chunk_ref.resize(chunks);
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kChunkRows, r1 = std::min(nr, r0 + kChunkRows);
      T R = neg_inf<T>();
      for (int64_t r = r0; r < r1; ++r) {
        const T* s = tile + r * nc;
        T mt = neg_inf<T>();
#pragma omp simd reduction(max : mt)
        for (int64_t j = 0; j < nc; ++j) mt = s[j] > mt ? s[j] : mt;
        w.row_max[r] = mt;
        R = mt > R ? mt : R;
      }
      T* cs = cols ? w.sum.data() + c * nc : nullptr;
      T* cm = cols ? w.max.data() + c * nc : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const T* s = tile + r * nc;
        const T m = w.row_max[r];
        const T ref = m == neg_inf<T>() ? T(0) : m;  // an all -inf row gives e = 0 (or NaN)
        T acc = 0;
        if (cols) {
          const T a = m == neg_inf<T>() ? T(0) : fast_exp(m - R);
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < nc; ++j) {
            const T e = fast_exp(s[j] - ref);
            acc += e;
            cs[j] += a * e;
            cm[j] = s[j] > cm[j] ? s[j] : cm[j];
          }
        } else {
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < nc; ++j) acc += fast_exp(s[j] - ref);
        }
        if (row_m != nullptr) merge_stat(row_m[r], row_s[r], m, acc);
      }
      if (cols) w.chunk_ref[c] = R;
    }
  });
  if (!cols) return;
  T R = neg_inf<T>();
  for (int64_t c = 0; c < chunks; ++c) R = w.chunk_ref[c] > R ? w.chunk_ref[c] : R;
  at::parallel_for(0, nc, 256, [&](int64_t j0, int64_t j1) {
    const int64_t width = j1 - j0;
    std::vector<T> sum(width, T(0)), mx(width, neg_inf<T>());
    for (int64_t c = 0; c < chunks; ++c) {
      const T Rc = w.chunk_ref[c];
      const T f = Rc == neg_inf<T>() ? T(0) : fast_exp(Rc - R);
      const T* cs = w.sum.data() + c * nc + j0;
      const T* cm = w.max.data() + c * nc + j0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        sum[j] += f * cs[j];
        mx[j] = cm[j] > mx[j] ? cm[j] : mx[j];
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const T m = mx[j];
      T s = sum[j];
      if (m != neg_inf<T>()) {
        if (m >= R - T(kSharedRefGap)) {
          s *= fast_exp(R - m);  // re-reference the sum to the column's own maximum
        } else {
          s = 0;
          for (int64_t r = 0; r < nr; ++r) s += fast_exp(tile[r * nc + j0 + j] - m);
        }
      }
      merge_stat(col_m[j0 + j], col_s[j0 + j], m, s);
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
  // Column statistics are accumulated per slot (slot 0 in col_m/col_s) and merged in slot order.
  const int64_t slots = fastcl::score_tile_slots(N, kTileRows, cols ? 2 * M * int64_t(sizeof(T)) : 0);
  std::vector<at::Tensor> slot_m{col_m}, slot_s{col_s};
  for (int64_t x = 1; x < slots && cols; ++x) {
    slot_m.push_back(at::full({M}, neg_inf<T>(), opts));
    slot_s.push_back(at::zeros({M}, opts));
  }
  std::vector<ColumnScratch<T>> scratch(slots);
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols, slots,
                              [&](int64_t slot, at::Tensor& tile, const at::Tensor&, const at::Tensor&,
                                  int64_t i0, int64_t j0) {
    if (has_diag) mask_diagonal<T>(tile, i0, j0, offset);
    const int64_t nr = tile.size(0), nc = tile.size(1);
    const T* t = tile.data_ptr<T>();
    update_stats<T>(t, nr, nc, rows ? row_m.data_ptr<T>() + i0 : nullptr, rows ? row_s.data_ptr<T>() + i0 : nullptr,
                    cols ? slot_m[slot].data_ptr<T>() + j0 : nullptr, cols ? slot_s[slot].data_ptr<T>() + j0 : nullptr,
                    scratch[slot]);
  });
  if (cols) {
    T* cm = col_m.data_ptr<T>();
    T* cs = col_s.data_ptr<T>();
    for (int64_t x = 1; x < slots; ++x) {
      const T* pm = slot_m[x].data_ptr<T>();
      const T* ps = slot_s[x].data_ptr<T>();
      for (int64_t j = 0; j < M; ++j) merge_stat(cm[j], cs[j], pm[j], ps[j]);
    }
  }
  at::Tensor row_lse = at::empty_like(row_m), col_lse = at::empty_like(col_m);
  if (rows) finish_lse<T>(row_m.data_ptr<T>(), row_s.data_ptr<T>(), bias, row_lse.data_ptr<T>(), N);
  if (cols) finish_lse<T>(col_m.data_ptr<T>(), col_s.data_ptr<T>(), bias, col_lse.data_ptr<T>(), M);
  return {row_lse, col_lse};
}

// Scratch for the combined gradient tile, reused across tiles.
template <typename T>
struct GradientScratch {
  std::vector<T> alpha, beta_g;
  std::vector<int64_t> exact_cols;
};

// dS = g_row[i] * exp(s - rl[i]) + g_col[j] * exp(s - cl[j]) with one exp per element:
// with P = exp(s - rl[i]) and a shared reference T0 = max_i rl[i],
//   dS = P * (g_row[i] + exp(rl[i] - T0) * g_col[j] * exp(T0 - cl[j])).
// exp(T0 - cl[j]) may not overflow, so columns with T0 - cl[j] > kSharedRefGap (rare: a column
// whose LSE is far below every row's) take the exact two-exp form.  An excluded row or column
// has lse +inf here and contributes 0.
template <typename T>
void gradient_tile_both(T* tile, int64_t nr, int64_t nc, const T* rl, const T* gr, const T* cl,
                        const T* gc, GradientScratch<T>& w) {
  const T inf = std::numeric_limits<T>::infinity();
  T T0 = neg_inf<T>();
  for (int64_t r = 0; r < nr; ++r)
    if (rl[r] < inf) T0 = rl[r] > T0 ? rl[r] : T0;
  if (T0 == neg_inf<T>()) T0 = 0;
  w.alpha.resize(nr);
  w.beta_g.resize(nc);
  w.exact_cols.clear();
  for (int64_t r = 0; r < nr; ++r) w.alpha[r] = rl[r] < inf ? fast_exp(rl[r] - T0) : T(0);
  for (int64_t j = 0; j < nc; ++j) {
    const bool exact = cl[j] < inf && T0 - cl[j] > T(kSharedRefGap);
    if (exact) w.exact_cols.push_back(j);
    w.beta_g[j] = exact ? T(0) : gc[j] * fast_exp(T0 - cl[j]);  // cl = +inf gives 0, NaN stays NaN
  }
  const T* bg = w.beta_g.data();
  at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
    std::vector<T> saved(w.exact_cols.size());
    for (int64_t r = r0; r < r1; ++r) {
      T* s = tile + r * nc;
      for (size_t x = 0; x < saved.size(); ++x) saved[x] = s[w.exact_cols[x]];
      const T gri = gr[r], rli = rl[r], ai = w.alpha[r];
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) s[j] = fast_exp(s[j] - rli) * (gri + ai * bg[j]);
      for (size_t x = 0; x < saved.size(); ++x) {
        const int64_t j = w.exact_cols[x];
        s[j] += gc[j] * fast_exp(saved[x] - cl[j]);
      }
    }
  });
}

// dS = g_row[i] * exp(s - row_lse[i]) + g_col[j] * exp(s - col_lse[j]), then
// Gq += dS @ k, Gk += dS^T @ q.  The tile holds s - bias, so the bias moves into the LSEs.
// A fully excluded row/column (lse = -inf) contributes 0.
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& qf, const at::Tensor& kf, T scale,
                                                 T bias, const at::Tensor& row_lse,
                                                 const at::Tensor& col_lse, const at::Tensor& g_row,
                                                 const at::Tensor& g_col, bool has_diag,
                                                 int64_t offset, bool need_q, bool need_k) {
  const bool rows = row_lse.numel() > 0, cols = col_lse.numel() > 0;
  auto safe = [bias](const at::Tensor& lse) {
    return at::where(at::isneginf(lse), at::full({}, std::numeric_limits<T>::infinity(), lse.options()), lse - bias).contiguous();
  };
  at::Tensor rl = rows ? safe(row_lse) : row_lse, cl = cols ? safe(col_lse) : col_lse;
  at::Tensor gr = rows ? g_row.to(qf.scalar_type()).contiguous() : g_row;
  at::Tensor gc = cols ? g_col.to(qf.scalar_type()).contiguous() : g_col;
  const int64_t slots = fastcl::score_tile_slots(qf.size(0), kTileRows, fastcl::grad_slot_bytes(kf, need_k));
  fastcl::TileGrads grads(qf, kf, slots, need_q, need_k);
  std::vector<GradientScratch<T>> scratch(slots);
  fastcl::for_each_score_tile(qf, kf, scale, kTileRows, kTileCols, slots,
                              [&](int64_t slot, at::Tensor& tile, const at::Tensor& q_strip,
                                  const at::Tensor& k_chunk, int64_t i0, int64_t j0) {
    if (has_diag) mask_diagonal<T>(tile, i0, j0, offset);
    const int64_t nr = tile.size(0), nc = tile.size(1);
    T* t = tile.data_ptr<T>();
    const T* rlp = rows ? rl.data_ptr<T>() + i0 : nullptr;
    const T* grp = rows ? gr.data_ptr<T>() + i0 : nullptr;
    const T* clp = cols ? cl.data_ptr<T>() + j0 : nullptr;
    const T* gcp = cols ? gc.data_ptr<T>() + j0 : nullptr;
    if (rows && cols) {
      gradient_tile_both<T>(t, nr, nc, rlp, grp, clp, gcp, scratch[slot]);
    } else {
      at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          T* s = t + r * nc;
          if (rows) {
            const T gri = grp[r], rli = rlp[r];
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) s[c] = gri * fast_exp(s[c] - rli);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < nc; ++c) s[c] = gcp[c] * fast_exp(s[c] - clp[c]);
          }
        }
      });
    }
    grads.accumulate(slot, tile, q_strip, k_chunk, i0, j0);
  });
  return grads.finish();
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
                                               c10::optional<int64_t> diag_offset, bool need_q, bool need_k) {
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
    return backward_impl<double>(qf, kf, scale, bias, rl, cl, g_row, g_col, has_diag, off, need_q, need_k);
  return backward_impl<float>(qf, kf, static_cast<float>(scale), static_cast<float>(bias), rl, cl,
                              g_row, g_col, has_diag, off, need_q, need_k);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastcl_C, m) {
  m.def("sim_lse_fwd(Tensor q, Tensor k, float scale, float bias, bool rows, bool cols, int? diag_offset) -> (Tensor, Tensor)",
        &sim_lse_fwd);
  m.def("sim_lse_bwd(Tensor q, Tensor k, float scale, float bias, Tensor row_lse, Tensor col_lse, Tensor g_row, "
        "Tensor g_col, int? diag_offset, bool need_q=True, bool need_k=True) -> (Tensor, Tensor)",
        &sim_lse_bwd);
}
