// Tile-by-tile traversal of S = scale * q @ k^T shared by the CPU kernels.  Nothing of size
// N x M is allocated: each worker ("slot") owns one bounded (rows x cols) buffer, filled by one
// GEMM per tile and handed to a visitor.
//
// Row strips are dealt to the slots round-robin (slot s visits strips s, s + slots, ...), each
// strip's tiles in column order.  A tile's GEMM and its elementwise pass then run on one core
// (its cache), and no GEMM call forks or joins threads.  Anything the visitors accumulate
// across strips (column statistics, Gk) is kept per slot and merged in slot order, so results
// are deterministic for a given thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "tile_gemm.h"

#include <algorithm>
#include <cstdint>

namespace fastcl {

// Number of slots for N rows: one per thread when every thread gets a strip and the extra
// per-slot state ((slots - 1) * per_slot_bytes) fits extra_budget; otherwise a single slot, whose
// GEMMs and visitors then use every thread (so a many-core machine never idles threads).
inline int64_t score_tile_slots(int64_t N, int64_t tile_rows, int64_t per_slot_bytes = 0,
                                int64_t extra_budget = int64_t(64) << 20) {
  const int64_t strips = (N + tile_rows - 1) / tile_rows;
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || strips < threads) return 1;
  if (per_slot_bytes > 0 && (threads - 1) > extra_budget / per_slot_bytes) return 1;
  return threads;
}

// visit(slot, tile (nr, nc), q_strip (nr, D), k_chunk (nc, D), i0, j0) for every tile; the tile
// holds scale * q_strip @ k_chunk^T (GEMM beta = 0, so the buffer's old contents are ignored).
// With one slot the traversal is sequential and the GEMMs and visitors use every thread.
template <typename Visit>
void for_each_score_tile(const at::Tensor& q, const at::Tensor& k, double scale, int64_t tile_rows,
                         int64_t tile_cols, int64_t slots, Visit&& visit) {
  const int64_t N = q.size(0), M = k.size(0);
  if (N == 0 || M == 0) return;  // no tiles (and BR or BC would be 0 below)
  const int64_t BR = std::min(tile_rows, N), BC = std::min(tile_cols, M);
  const int64_t strips = (N + BR - 1) / BR;
  auto run_slot = [&](int64_t slot) {
    at::Tensor buf = at::empty({BR * BC}, q.options());
    for (int64_t strip = slot; strip < strips; strip += slots) {
      const int64_t i0 = strip * BR, nr = std::min(BR, N - i0);
      const at::Tensor q_strip = q.narrow(0, i0, nr);
      for (int64_t j0 = 0; j0 < M; j0 += BC) {
        const int64_t nc = std::min(BC, M - j0);
        const at::Tensor k_chunk = k.narrow(0, j0, nc);
        at::Tensor tile = buf.narrow(0, 0, nr * nc).view({nr, nc});
        tile_gemm(tile, q_strip, k_chunk.t(), /*beta=*/0, /*alpha=*/scale);
        visit(slot, tile, q_strip, k_chunk, i0, j0);
      }
    }
  };
  if (slots <= 1) {
    run_slot(0);
    return;
  }
  // Worker threads start with default thread-local state; give them the caller's (dispatch key
  // exclusions, grad mode), so the ATen fallback GEMM behaves as on the calling thread.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t s = s0; s < s1; ++s) run_slot(s);
  });
}

// Gradient accumulators for one traversal: Gq (N, D) is shared (slots own disjoint rows);
// Gk (M, D) gets one buffer per slot, slot 0's being the result, summed in slot order.
struct TileGrads {
  bool need_q, need_k;  // a side nobody needs (a frozen tower, a memory bank) gets no products
  at::Tensor Gq;
  std::vector<at::Tensor> Gk;

  TileGrads(const at::Tensor& q, const at::Tensor& k, int64_t slots, bool need_q = true, bool need_k = true)
      : need_q(need_q), need_k(need_k), Gq(need_q ? at::zeros_like(q) : q.new_empty({0, q.size(1)})) {
    for (int64_t s = 0; s < slots; ++s) Gk.push_back(need_k ? at::zeros_like(k) : k.new_empty({0, k.size(1)}));
  }

  // Gq[i0 : i0 + nr] += G @ k_chunk and Gk[j0 : j0 + nc] += G^T @ q_strip for a gradient tile G.
  void accumulate(int64_t slot, const at::Tensor& G, const at::Tensor& q_strip, const at::Tensor& k_chunk,
                  int64_t i0, int64_t j0) {
    if (need_q) tile_gemm(Gq.narrow(0, i0, G.size(0)), G, k_chunk, 1, 1);
    if (need_k) tile_gemm(Gk[slot].narrow(0, j0, G.size(1)), G.t(), q_strip, 1, 1);
  }

  // (Gq, Gk) once the traversal is done.
  std::tuple<at::Tensor, at::Tensor> finish() {
    for (size_t s = 1; s < Gk.size(); ++s) Gk[0].add_(Gk[s]);
    return {Gq, Gk[0]};
  }
};

// Bytes of one slot's gradient state: one Gk buffer the size of k (M, D), when Gk is formed.
inline int64_t grad_slot_bytes(const at::Tensor& k, bool need_k = true) {
  return need_k ? k.numel() * k.element_size() : 0;
}

}  // namespace fastcl
