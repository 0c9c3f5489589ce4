"""Triton kernels for ``sigmoid_pair_loss``: ``sum_ij softplus(-z_ij * (scale * q_i . k_j + bias))``.

z = +1 on the diagonal (j == i), -1 elsewhere.  Tiles of ``q @ k.T`` are recomputed and never
stored.  The forward writes one partial loss sum per row block (no atomics) and the host adds
the partials in fp64 (two-stage, deterministic).  The backward is split by ownership like the
fused-attention backward: one kernel owns row blocks (Gq = G @ k, plus partial sums of G for
the bias), one owns column blocks (Gk = G^T @ q); neither needs atomics.

Those kernels hold a (BLOCK, D) block of each side, which suits D <= 256.  Above that, for fp32
at any D (the fused kernels spill on sm_90), or with FASTCL_TRITON_BWD=strip, the forward loops
over D in chunks and the backward writes G a block of rows x columns at a time for cuBLAS, as
the LSE kernels' strip backward does (``sigmoid_mode``).

Products run on the input dtype with fp32 accumulation (bf16/fp16 tensor cores).  fp32 products
are IEEE in the fused kernels; the strip kernels share the LSE kernels' ``_config``, which takes
TF32 when torch.backends.cuda.matmul.allow_tf32 is set.  float64 is refused, as by the LSE
kernels: Triton before 3.5 has no float64 tl.dot, and compiled for sm_90 the whole-D float64
blocks spill at D = 128 and need 384 KB of shared memory (an SM has 227 KB) at D = 768.
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from fastcl.kernels import similarity_lse as lse_kernels
from fastcl.kernels.similarity_lse import (FUSED_MAX_D, _config as _strip_config, _score_tile, _strip_block,
                                           strip_grads_triton)
from fastcl.ops.strip_grads import finish_full, formed_sides
from fastcl.ops.dispatch import triton_interpreting
from fastcl.ops.intmath import cdiv, next_power_of_2


@triton.jit
def _softplus(t):
    # max(t, 0) + log1p(e) with e = exp(-|t|) in [0, 1].  log1p(e) = 2 atanh(z), z = e / (2 + e) in
    # [0, 1/3], by its series through z^13 (the rest is below 2^-26 of it): within ~5 ulp relative
    # for every normal e, tiny ones included, in a dozen FMAs, where libdevice's log (~30
    # instructions a score) made the epilogue as long as the tile's matrix product on sm_90.
    e = tl.exp(-tl.abs(t))
    z = e / (2.0 + e)
    w = z * z
    p = w * 0.07692307692307693 + 0.09090909090909091
    p = p * w + 0.1111111111111111
    p = p * w + 0.14285714285714285
    p = p * w + 0.2
    p = p * w + 0.3333333333333333
    p = p * w + 1.0
    return tl.maximum(t, 0.0) + 2.0 * z * p


@triton.jit
def _sigmoid(t):
    # From exp(-|t|) only, so it never overflows; NaN stays NaN.
    e = tl.exp(-tl.abs(t))
    inv = 1.0 / (1.0 + e)
    return tl.where(t >= 0.0, inv, e * inv)


@triton.jit
def _tile_t(q, k, scale, bias, rows, cols, N, M, PRECISION: tl.constexpr, MASK_BOUNDS: tl.constexpr):
    # t = -z * s: s off the diagonal, -s on it; -inf outside the matrix (softplus = sigmoid = 0),
    # selected only when the launch has tiles that cross the edge (MASK_BOUNDS).
    s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision=PRECISION)
    s = scale * s + bias
    diag = rows[:, None] == cols[None, :]
    t = tl.where(diag, -s, s)
    if MASK_BOUNDS:
        t = tl.where((rows[:, None] < N) & (cols[None, :] < M), t, float("-inf"))
    return t, diag


@triton.jit
def _load_rows(ptr, idx, n, stride, dd, D, DOT_FP32: tl.constexpr):
    """(len(idx), BLOCK_D) block of rows ``idx`` (zeros past n and D); fp32 when DOT_FP32, as the
    interpreter's tl.dot is wrong on bf16 operands."""
    # int64 offsets: N * D may pass 2^31.
    x = tl.load(ptr + idx.to(tl.int64)[:, None] * stride + dd[None, :], mask=(idx[:, None] < n) & (dd[None, :] < D),
                other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, part_ptr, scale_ptr, bias_ptr, N, M, D, stride_q, stride_k,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, MASK_BOUNDS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, N, stride_q, dd, D, DOT_FP32)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, cols, M, stride_k, dd, D, DOT_FP32)
        t, diag = _tile_t(q, k, scale, bias, rows, cols, N, M, PRECISION, MASK_BOUNDS)
        acc += tl.sum(_softplus(t), axis=1)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _grad_tile(q, k, scale, bias, rows, cols, N, M, PRECISION: tl.constexpr, MASK_BOUNDS: tl.constexpr):
    # G = dL/ds: sigmoid(s) off the diagonal, -sigmoid(-s) on it, 0 outside the matrix.
    t, diag = _tile_t(q, k, scale, bias, rows, cols, N, M, PRECISION, MASK_BOUNDS)
    sg = _sigmoid(t)
    return tl.where(diag, -sg, sg)


@triton.jit
def _bwd_rows_kernel(q_ptr, k_ptr, gq_ptr, gpart_ptr, scale_ptr, bias_ptr, N, M, D,
                     stride_q, stride_k, stride_gq,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, MASK_BOUNDS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, N, stride_q, dd, D, DOT_FP32)
    scale = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    gq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    gsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, cols, M, stride_k, dd, D, DOT_FP32)
        g = _grad_tile(q, k, scale, bias, rows, cols, N, M, PRECISION, MASK_BOUNDS)
        gsum += tl.sum(g, axis=1)
        # G is rounded to the operand dtype so the product runs on tensor cores.
        gq += tl.dot(g.to(k.dtype), k, out_dtype=tl.float32, input_precision=PRECISION)
    tl.store(gq_ptr + rows.to(tl.int64)[:, None] * stride_gq + dd[None, :], gq,
             mask=(rows[:, None] < N) & (dd[None, :] < D))
    tl.store(gpart_ptr + pid, tl.sum(gsum, axis=0))


@triton.jit
def _signed_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, scale, bias, MASK_BOUNDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # t = -z * s as in _tile_t, with s from the D-chunked score tile of the LSE kernels; -inf
    # outside the matrix (softplus and sigmoid give 0 there) only where a tile crosses its edge.
    s = _score_tile(q_ptr, k_ptr, rows, cols, N, M, D, stride_q, stride_k, scale, bias, 0,
                    False, False, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION)
    diag = rows[:, None] == cols[None, :]
    t = tl.where(diag, -s, s)
    if MASK_BOUNDS:
        t = tl.where((rows[:, None] < N) & (cols[None, :] < M), t, float("-inf"))
    return t, diag


@triton.jit
def _fwd_chunked_kernel(q_ptr, k_ptr, part_ptr, scale_ptr, bias_ptr, N, M, D, stride_q, stride_k, col_span,
                        MASK_BOUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Program (pid, split): rows [pid * BLOCK_M, +BLOCK_M) x columns [split * col_span, +col_span).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo = split * col_span
    c_hi = tl.minimum(c_lo + col_span, M)  # the range's end masks its last tile: ranges never overlap
    for j0 in range(c_lo, c_hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        t, diag = _signed_tile(q_ptr, k_ptr, rows, cols, N, c_hi, D, stride_q, stride_k, scale, bias, MASK_BOUNDS,
                               BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION)
        acc += tl.sum(_softplus(t), axis=1)
    tl.store(part_ptr + pid * tl.num_programs(1) + split, tl.sum(acc, axis=0))


@triton.jit
def _grad_strip_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, g_ptr, gpart_ptr, row0, N_STRIP, col0, N_COLS, D,
                       stride_q, stride_k, stride_g, MASK_BOUNDS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """G for rows [row0, row0 + N_STRIP) x columns [col0, col0 + N_COLS) into the workspace (local
    coordinates), plus one partial sum of G per tile (gpart[pid_m, pid_n]) for the bias gradient."""
    local, local_n, scale, bias = _strip_block(scale_ptr, bias_ptr, BLOCK_M, BLOCK_N)
    rows = row0 + local
    cols = col0 + local_n
    # Rows and columns past the block are masked by passing its ends as the counts.
    t, diag = _signed_tile(q_ptr, k_ptr, rows, cols, row0 + N_STRIP, col0 + N_COLS, D, stride_q, stride_k,
                           scale, bias, MASK_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION)
    sg = _sigmoid(t)
    g = tl.where(diag, -sg, sg)
    tl.store(g_ptr + local.to(tl.int64)[:, None] * stride_g + local_n[None, :], g.to(g_ptr.dtype.element_ty),
             mask=(local[:, None] < N_STRIP) & (local_n[None, :] < N_COLS))
    tl.store(gpart_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g, axis=1), axis=0))


SIGMOID_FUSED_MAX_D = 1024  # (BLOCK, D) blocks of 16 x 1024 take ~98 KB of shared memory (sm_90 compile)


def sigmoid_mode(q: torch.Tensor) -> str:
    """"fused" (one kernel per pass, (BLOCK, D) blocks) or "strip" (D-chunked tiles, cuBLAS backward).

    FASTCL_TRITON_BWD=auto picks "fused" for bf16/fp16 with D <= 256 (timed on an H100 at
    D=128, bf16) and "strip" otherwise: above that a whole-D block would not fit in registers
    (by design, not timed yet), and fp32's IEEE products leave the fused kernels spilling when
    compiled for sm_90 (tens of thousands of spill instructions in the backward at D=128; the
    strip kernels have none).  "fused" and "strip" force a mode; "fused" takes D <= 1024.
    """
    mode = os.environ.get("FASTCL_TRITON_BWD", "auto")
    if mode not in ("auto", "fused", "strip"):
        raise ValueError(f"FASTCL_TRITON_BWD must be auto, fused or strip, got {mode!r}")
    if mode == "auto":
        half = q.dtype in (torch.bfloat16, torch.float16)
        return "fused" if half and q.shape[1] <= FUSED_MAX_D else "strip"
    if mode == "fused" and q.shape[1] > SIGMOID_FUSED_MAX_D:
        # whole-D blocks: at D = 2048 they take ~200 KB of shared memory, more than sm_80/86 have
        raise ValueError(f"FASTCL_TRITON_BWD=fused supports D <= {SIGMOID_FUSED_MAX_D} for sigmoid_pair_loss, "
                         f"got D={q.shape[1]}; use strip (or auto)")
    return mode


def _config(q: torch.Tensor, k: torch.Tensor):
    """Launch constants shared by the forward and backward kernels."""
    d = q.shape[1]
    block_d = max(16, next_power_of_2(d))
    block = 64 if block_d <= 128 else (32 if block_d <= 512 else 16)
    interp = triton_interpreting()
    return dict(
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
        DOT_FP32=bool(interp and q.dtype in (torch.bfloat16, torch.float16)),
        PRECISION="ieee" if (q.dtype == torch.float32 or interp) else "tf32",
    )


def _prepare(q, k, scale, bias):
    lse_kernels._check(q, k)  # the same device and dtype rules (no float64)
    q, k = q.contiguous(), k.contiguous()
    scale = scale.to(device=q.device, dtype=torch.float32).reshape(1).contiguous()
    bias = bias.to(device=q.device, dtype=torch.float32).reshape(1).contiguous()
    return q, k, scale, bias


def sigmoid_pair_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
    """Loss sum, 0-d fp32.

    q (N, D), k (M, D): float32/bfloat16/float16 on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1``.  scale, bias: 0-d tensors (kept on the device, no host sync).
    """
    q, k, scale, bias = _prepare(q, k, scale, bias)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    if sigmoid_mode(q) == "strip":
        sc = _strip_config(q, "sigmoid")
        row_blocks = cdiv(n, sc["BLOCK_M"])
        # Few row blocks: the columns in ranges, as in the LSE forward.
        col_span, ranges = lse_kernels.column_ranges(row_blocks, m, lse_kernels.sm_count(q.device))
        grid = (row_blocks, ranges)
        partial = torch.empty(grid, device=q.device, dtype=torch.float32)
        edge = lse_kernels.crosses_edge(n, m, sc, col_span if ranges > 1 else 0)
        _fwd_chunked_kernel[grid](q, k, partial, scale, bias, n, m, d, q.stride(0), k.stride(0), col_span,
                                  MASK_BOUNDS=edge, BLOCK_M=sc["BLOCK_M"], BLOCK_N=sc["BLOCK_N"], BLOCK_D=sc["BLOCK_D"],
                                  UPCAST=sc["UPCAST"], IS_FP32=sc["IS_FP32"], PRECISION=sc["PRECISION"],
                                  **sc["launch"])
        return partial.to(torch.float64).sum().float()
    cfg = _config(q, k)
    grid = (cdiv(n, cfg["BLOCK_M"]),)
    partial = torch.empty(grid[0], device=q.device, dtype=torch.float32)
    _fwd_kernel[grid](q, k, partial, scale, bias, n, m, d, q.stride(0), k.stride(0), **cfg,
                      MASK_BOUNDS=lse_kernels.crosses_edge(n, m, cfg))
    return partial.to(torch.float64).sum().float()


def sigmoid_pair_backward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          grad_scale: torch.Tensor, out_dtype: torch.dtype, need_dq: bool = True,
                          need_dk: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, qgq, gsum)`` with ``G = dL/ds``: dq = grad_scale * G @ k (N, D), dk = grad_scale *
    G^T @ q (M, D) in out_dtype, qgq = sum(q * (G @ k)) and gsum = sum(G), 0-d fp32.
    grad_scale: 0-d tensor on q's device.  ``need_dq`` / ``need_dk`` False skip that side's
    products where the mode allows (it comes back (0, D)); the fused mode forms the q side always,
    for sum(G)."""
    q, k, scale, bias = _prepare(q, k, scale, bias)
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    if sigmoid_mode(q) == "strip":
        parts = []

        def launch(tile, r0, nr, c0, nc, sc):
            grid = (cdiv(nr, sc["BLOCK_M"]), cdiv(nc, sc["BLOCK_N"]))
            gpart = torch.empty(grid, device=q.device, dtype=torch.float32)
            _grad_strip_kernel[grid](q, k, scale, bias, tile, gpart, r0, nr, c0, nc, d,
                                     q.stride(0), k.stride(0), tile.stride(0),
                                     MASK_BOUNDS=lse_kernels.crosses_edge(nr, nc, sc),
                                     BLOCK_M=sc["BLOCK_M"], BLOCK_N=sc["BLOCK_N"], BLOCK_D=sc["BLOCK_D"],
                                     UPCAST=sc["UPCAST"], IS_FP32=sc["IS_FP32"], PRECISION=sc["PRECISION"],
                                     **sc["launch"])
            parts.append(gpart.to(torch.float64).sum())
        dq, dk, qgq = strip_grads_triton(q, k, grad_scale, launch, out_dtype, need_dq=need_dq, need_dk=need_dk,
                                         role="sigmoid")
        return dq, dk, qgq, torch.stack(parts).sum().float()
    cfg = _config(q, k)
    gq = torch.empty((n, d), device=q.device, dtype=torch.float32)
    gk = torch.empty((m, d), device=q.device, dtype=torch.float32) if need_dk else None
    row_grid = (cdiv(n, cfg["BLOCK_M"]),)
    gpart = torch.empty(row_grid[0], device=q.device, dtype=torch.float32)
    _bwd_rows_kernel[row_grid](q, k, gq, gpart, scale, bias, n, m, d,
                               q.stride(0), k.stride(0), gq.stride(0), **cfg,
                               MASK_BOUNDS=lse_kernels.crosses_edge(n, m, cfg))
    # G^T has the same form with q and k swapped (the positive pairs stay on the diagonal), so
    # the row kernel on (k, q) gives G^T @ q; its partial sums of G are not needed again, so it
    # never needs the bounds select: entries past the edge meet zero rows of q in the product, or
    # belong to rows it does not store.
    if need_dk:
        col_grid = (cdiv(m, cfg["BLOCK_M"]),)
        scratch = torch.empty(col_grid[0], device=q.device, dtype=torch.float32)
        _bwd_rows_kernel[col_grid](k, q, gk, scratch, scale, bias, m, n, d,
                                   k.stride(0), q.stride(0), gk.stride(0), **cfg, MASK_BOUNDS=False)
    dq, dk, qgq = finish_full(q, k, gq, gk if need_dk else None, grad_scale, out_dtype, need_dq=need_dq,
                              need_dk=need_dk)
    return dq, dk, qgq, gpart.to(torch.float64).sum().float()
