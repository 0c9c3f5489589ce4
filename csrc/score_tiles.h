// Tile-by-tile traversal of S = scale * q @ k^T shared by the CPU kernels: one bounded
// (rows x cols) buffer, filled by one BLAS call per tile, handed to a visitor; nothing of size
// N x M is allocated.  Tiles are visited in a fixed order, so results are deterministic.
#pragma once

#include <torch/extension.h>

#include "tile_gemm.h"

#include <algorithm>
#include <cstdint>

namespace fastcl {

// visit(tile (nr, nc), q_strip (nr, D), k_chunk (nc, D), i0, j0) for every tile; the tile holds
// scale * q_strip @ k_chunk^T (BLAS beta = 0, so the buffer's old contents are ignored).
template <typename Visit>
void for_each_score_tile(const at::Tensor& q, const at::Tensor& k, double scale, int64_t tile_rows,
                         int64_t tile_cols, Visit&& visit) {
  const int64_t N = q.size(0), M = k.size(0);
  const int64_t BR = std::min(tile_rows, N), BC = std::min(tile_cols, M);
  at::Tensor buf = at::empty({BR * BC}, q.options());
  for (int64_t i0 = 0; i0 < N; i0 += BR) {
    const int64_t nr = std::min(BR, N - i0);
    const at::Tensor q_strip = q.narrow(0, i0, nr);
    for (int64_t j0 = 0; j0 < M; j0 += BC) {
      const int64_t nc = std::min(BC, M - j0);
      const at::Tensor k_chunk = k.narrow(0, j0, nc);
      at::Tensor tile = buf.narrow(0, 0, nr * nc).view({nr, nc});
      tile_gemm(tile, q_strip, k_chunk.t(), /*beta=*/0, /*alpha=*/scale);
      visit(tile, q_strip, k_chunk, i0, j0);
    }
  }
}

// Gq[i0 : i0 + nr] += G @ k_chunk and Gk[j0 : j0 + nc] += G^T @ q_strip for a gradient tile G.
inline void accumulate_tile_grads(at::Tensor& Gq, at::Tensor& Gk, const at::Tensor& G, const at::Tensor& q_strip,
                                  const at::Tensor& k_chunk, int64_t i0, int64_t j0) {
  tile_gemm(Gq.narrow(0, i0, G.size(0)), G, k_chunk, 1, 1);
  tile_gemm(Gk.narrow(0, j0, G.size(1)), G.t(), q_strip, 1, 1);
}

}  // namespace fastcl
