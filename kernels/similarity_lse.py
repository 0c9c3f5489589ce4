"""Triton kernels for the row/column log-sum-exp of ``S = scale * q @ k.T + bias``.

Forward: one pass over the score tiles gives the exact row LSE and, per row block, a partial
column LSE; a small logsumexp over the (rows / BLOCK_M, M) partials merges the columns.  No
atomics.  Very large N runs in groups of rows so the partials stay bounded (``forward_group_rows``).

Backward, two modes (``lse_grads(mode=...)``; ``backward_mode`` picks):
  * "fused" (D <= 256): one kernel keeps a (BLOCK, D) accumulator and loops over the other side,
    forming dS = g_row * P_row + g_col * P_col per tile and multiplying it straight into
    Gq = dS @ k.  The same kernel with q/k and row/col roles swapped gives Gk = dS.T @ q.
  * "strip" (any D): a kernel writes dS for a block of rows x columns into a bounded workspace
    and cuBLAS folds it into the gradients (fastcl/ops/strip_grads.py: no whole fp32 Gq or Gk).

``FASTCL_TRITON_TILE`` replaces the fixed launch shape (``tile_override``), for sweeps.

``FASTCL_TRITON_EXP=shared`` (opt-in until timed on a GPU; ``exp_mode``) makes the forward and
the dS tiles take one exp per score for both sides instead of one per side.

Every kernel works on CPU tensors under TRITON_INTERPRET=1.  The interpreter's ``tl.dot`` is
wrong for bf16 operands, so they are upcast there (``UPCAST``), which only changes rounding.
"""
import os
from typing import Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastcl.ops.dispatch import triton_interpreting
from fastcl.ops.intmath import cdiv, next_power_of_2
from fastcl.ops.strip_grads import finish_full, formed_sides, strip_grads
from fastcl.ops.strips import workspace_bytes

FUSED_MAX_D = 256
# Rows per strip at least this many, so that dS_strip @ k (a strip x D output over a long K) has
# enough output tiles for the GPU.  On an H100 (N=32768, D=768, bf16) the CLIP step went from
# 23.2 to 18.7 ms when strips grew from 1024 to 2048 rows, together with the fp32 accumulation
# moving into cuBLAS (both changes in one run; not separated).
STRIP_MIN_ROWS = 2048


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 of fp32 ``x``.  FAST: the hardware approximation (MUFU.LG2, absolute error about
    2^-22), one instruction where libdevice's exact log2 takes about 30 on sm_90; the interpreter
    has no libdevice."""
    if FAST:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _score_tile(a_ptr, b_ptr, offs_a, offs_b, NA, NB, D, stride_a, stride_b, scale, bias, diag_off,
                HAS_DIAG: tl.constexpr, MASK_BOUNDS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BLOCK_A, BLOCK_B) fp32 tile of scale * a @ b.T + bias, -inf on the excluded diagonal (b
    index == a index + diag_off) and, with MASK_BOUNDS, outside the matrix.  Without it entries
    past NA or NB hold bias (their rows read as zeros): for callers whose tiles never cross the
    edge, or that mask those entries themselves (a masked store, their own select); a select per
    score is ~7% of the forward's instructions."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_rows = offs_a.to(tl.int64)[:, None] * stride_a
    b_rows = offs_b.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + a_rows + offs_d[None, :], mask=(offs_a[:, None] < NA) & (offs_d[None, :] < D), other=0.0)
        b = tl.load(b_ptr + b_rows + offs_d[None, :], mask=(offs_b[:, None] < NB) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IS_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    s = acc * scale + bias
    if MASK_BOUNDS:
        valid = (offs_a[:, None] < NA) & (offs_b[None, :] < NB)
        if HAS_DIAG:
            valid = valid & (offs_b[None, :] != offs_a[:, None] + diag_off)
        s = tl.where(valid, s, float("-inf"))
    elif HAS_DIAG:
        s = tl.where(offs_b[None, :] != offs_a[:, None] + diag_off, s, float("-inf"))
    return s


@triton.jit
def _lse_fwd_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, row_ptr, colpart_ptr, N, M, D, stride_q, stride_k,
                    diag_off, col_span, ROWS: tl.constexpr, COLS: tl.constexpr, HAS_DIAG: tl.constexpr,
                    MASK_BOUNDS: tl.constexpr,
                    SHARED_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                    PRECISION: tl.constexpr, FAST_LOG: tl.constexpr):
    # Program (pid, split) covers rows [pid * BLOCK_M, +BLOCK_M) x columns [split * col_span, +col_span)
    # (its last tile masked at the range's end): its row LSE over them goes to row_ptr[split, :].
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    # Base-2 scores straight from the product (exp2 is the native instruction): one FMA each.
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    bias2 = tl.load(bias_ptr).to(tl.float32) * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_lo = split * col_span
    c_hi = tl.minimum(c_lo + col_span, M)  # the range's end masks its last tile: ranges never overlap
    for n0 in range(c_lo, c_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s2 = _score_tile(q_ptr, k_ptr, offs_m, offs_n, N, c_hi, D, stride_q, stride_k, scale2, bias2, diag_off,
                         HAS_DIAG, MASK_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION)
        if SHARED_EXP and COLS:
            # One exp per score for both sides: p = 2^(s - t_i) with t_i the tile's row max; the
            # columns reuse it through the tile max R: 2^(s - R) = p * 2^(t_i - R).
            t_i = tl.max(s2, 1)
            t_ref = tl.where(t_i == float("-inf"), 0.0, t_i)
            p = tl.exp2(s2 - t_ref[:, None])
            if ROWS:
                m_new = tl.maximum(m_i, t_i)
                ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - ref) + tl.sum(p, 1) * tl.exp2(t_ref - ref)
                m_i = m_new
            big_r = tl.max(t_i, 0)
            r_ref = tl.where(big_r == float("-inf"), 0.0, big_r)
            a = tl.where(t_i == float("-inf"), 0.0, tl.exp2(t_ref - r_ref))
            lc = tl.sum(p * a[:, None], 0)
            part = (r_ref + _log2(lc, FAST_LOG)) * 0.6931471805599453
            # A column far below R (its sum near fp32's smallest normals, or empty) is redone
            # exactly; in practice that is the matrix's edge tiles.  The tile is recomputed rather
            # than kept: holding s2 through the loop spilled registers on sm_90.
            if tl.min(lc, 0) < 1.0e-24:
                sx = _score_tile(q_ptr, k_ptr, offs_m, offs_n, N, c_hi, D, stride_q, stride_k, scale2, bias2,
                                 diag_off, HAS_DIAG, MASK_BOUNDS, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, IS_FP32,
                                 PRECISION)
                mc = tl.max(sx, 0)
                refc = tl.where(mc == float("-inf"), 0.0, mc)
                part = (refc + _log2(tl.sum(tl.exp2(sx - refc[None, :]), 0), FAST_LOG)) * 0.6931471805599453
            tl.store(colpart_ptr + pid.to(tl.int64) * M + offs_n, part, mask=offs_n < c_hi)
        else:
            if ROWS:
                m_new = tl.maximum(m_i, tl.max(s2, 1))
                ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # never -inf - -inf
                l_i = l_i * tl.exp2(m_i - ref) + tl.sum(tl.exp2(s2 - ref[:, None]), 1)
                m_i = m_new
            if COLS:
                mc = tl.max(s2, 0)
                refc = tl.where(mc == float("-inf"), 0.0, mc)
                lc = tl.sum(tl.exp2(s2 - refc[None, :]), 0)
                part = (refc + _log2(lc, FAST_LOG)) * 0.6931471805599453
                tl.store(colpart_ptr + pid.to(tl.int64) * M + offs_n, part, mask=offs_n < c_hi)
    if ROWS:
        ref = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(row_ptr + split.to(tl.int64) * N + offs_m, (ref + _log2(l_i, FAST_LOG)) * 0.6931471805599453,
                 mask=offs_m < N)


@triton.jit
def _load_stats(lse_ptr, g_ptr, offs, n, ACTIVE: tl.constexpr, BLOCK: tl.constexpr):
    """(lse, weight) for one side, or zeros when that side's statistics were not computed."""
    if ACTIVE:
        lse = tl.load(lse_ptr + offs, mask=offs < n, other=0.0)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0)
    else:
        lse = tl.zeros((BLOCK,), dtype=tl.float32)
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    return lse, g


@triton.jit
def _dscore_tile(s2, lse_a, g_a, lse_b, g_b, A_STATS: tl.constexpr, B_STATS: tl.constexpr,
                 SHARED_EXP: tl.constexpr):
    """dS = g_a * exp(s - lse_a) + g_b * exp(s - lse_b) from base-2 scores s2 = s * log2(e) and
    natural LSEs; lse = -inf (all excluded) counts as 0."""
    if (SHARED_EXP and A_STATS) and B_STATS:  # Triton 3.3 rejects a chained and
        # One exp per score: with P = 2^(s - la) and t the block's largest finite la,
        # dS = P * (g_a + 2^(la - t) * g_b * 2^(t - lb)).  2^(t - lb) may not overflow, so a
        # block with a column LSE more than 64 (base 2) below t takes the exact form.
        la = tl.where(lse_a == float("-inf"), float("inf"), lse_a) * 1.4426950408889634
        lb = tl.where(lse_b == float("-inf"), float("inf"), lse_b) * 1.4426950408889634
        finite_a = la < float("inf")
        t = tl.max(tl.where(finite_a, la, float("-inf")), 0)
        t = tl.where(t == float("-inf"), 0.0, t)
        alpha = tl.where(finite_a, tl.exp2(la - t), 0.0)
        gap = t - lb
        beta_g = g_b * tl.exp2(gap)
        # The test needs only the statistics, so it comes first: one branch runs, and the tile is
        # not held through both (that spilled registers on sm_90).
        if tl.max(gap, 0) > 64.0:
            ds = g_a[:, None] * tl.exp2(s2 - la[:, None]) + g_b[None, :] * tl.exp2(s2 - lb[None, :])
        else:
            ds = tl.exp2(s2 - la[:, None]) * (g_a[:, None] + alpha[:, None] * beta_g[None, :])
    else:
        ds = tl.zeros(s2.shape, dtype=tl.float32)
        if A_STATS:
            la = tl.where(lse_a == float("-inf"), float("inf"), lse_a) * 1.4426950408889634
            ds += g_a[:, None] * tl.exp2(s2 - la[:, None])
        if B_STATS:
            lb = tl.where(lse_b == float("-inf"), float("inf"), lse_b) * 1.4426950408889634
            ds += g_b[None, :] * tl.exp2(s2 - lb[None, :])
    return ds


@triton.jit
def _grad_fused_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, lse_a_ptr, g_a_ptr, lse_b_ptr, g_b_ptr, out_ptr,
                       NA, NB, D, stride_a, stride_b, stride_o, diag_off,
                       A_STATS: tl.constexpr, B_STATS: tl.constexpr, HAS_DIAG: tl.constexpr,
                       SHARED_EXP: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out[a] = sum_b dS[a, b] * b_vec[b] for one block of a rows; BLOCK_D covers all of D."""
    pid = tl.program_id(0)
    offs_a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634  # base-2 scores
    bias2 = tl.load(bias_ptr).to(tl.float32) * 1.4426950408889634
    lse_a, g_a = _load_stats(lse_a_ptr, g_a_ptr, offs_a, NA, A_STATS, BLOCK_A)
    acc = tl.zeros((BLOCK_A, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        s2 = _score_tile(a_ptr, b_ptr, offs_a, offs_b, NA, NB, D, stride_a, stride_b, scale2, bias2, diag_off,
                         HAS_DIAG, True, BLOCK_A, BLOCK_B, BLOCK_D, UPCAST, IS_FP32, PRECISION)
        lse_b, g_b = _load_stats(lse_b_ptr, g_b_ptr, offs_b, NB, B_STATS, BLOCK_B)
        ds = _dscore_tile(s2, lse_a, g_a, lse_b, g_b, A_STATS, B_STATS, SHARED_EXP)
        b = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * stride_b + offs_d[None, :],
                    mask=(offs_b[:, None] < NB) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        if IS_FP32:
            acc = tl.dot(ds, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(ds.to(b.dtype), b, acc)
    tl.store(out_ptr + offs_a.to(tl.int64)[:, None] * stride_o + offs_d[None, :], acc,
             mask=(offs_a[:, None] < NA) & (offs_d[None, :] < D))


@triton.jit
def _strip_block(scale_ptr, bias_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's local row and column offsets in its gradient block, and scale, bias (fp32)."""
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return local, local_n, tl.load(scale_ptr).to(tl.float32), tl.load(bias_ptr).to(tl.float32)


@triton.jit
def _dscore_strip_kernel(q_ptr, k_ptr, scale_ptr, bias_ptr, row_ptr, grow_ptr, col_ptr, gcol_ptr, ds_ptr,
                         gs_ptr, gpos_ptr, pos_ptr,
                         row0, N_STRIP, col0, N_COLS, D, stride_q, stride_k, stride_ds, diag_off,
                         ROWS: tl.constexpr, COLS: tl.constexpr, HAS_DIAG: tl.constexpr,
                         SHARED_EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr,
                         PRECISION: tl.constexpr, FINAL: tl.constexpr, POS: tl.constexpr):
    """dS for rows [row0, row0 + N_STRIP) x columns [col0, col0 + N_COLS), written in the
    workspace's dtype at local coordinates.  FINAL: g * (dS + g_pos_i at (i, pos_i)) instead, with
    g = grad_scale (1 where it is 0), the positive weights added in fp32 before the tile is rounded
    (POS 0: none, 1: pos_i = i, 2: pos_i from pos_ptr), so the tile alone gives dq and dk."""
    local, local_n, scale, bias = _strip_block(scale_ptr, bias_ptr, BLOCK_M, BLOCK_N)
    offs_m = row0 + local
    offs_n = col0 + local_n
    # Base-2 scores.  Rows and columns past the block read as zeros (its ends are the counts) and
    # are never stored, and nothing here sums over the tile: no bounds select.
    s2 = _score_tile(q_ptr, k_ptr, offs_m, offs_n, row0 + N_STRIP, col0 + N_COLS, D, stride_q, stride_k,
                     scale * 1.4426950408889634, bias * 1.4426950408889634, diag_off, HAS_DIAG, False, BLOCK_M,
                     BLOCK_N, BLOCK_D, UPCAST, IS_FP32, PRECISION)
    lse_r, g_r = _load_stats(row_ptr, grow_ptr, offs_m, row0 + N_STRIP, ROWS, BLOCK_M)
    lse_c, g_c = _load_stats(col_ptr, gcol_ptr, offs_n, col0 + N_COLS, COLS, BLOCK_N)
    ds = _dscore_tile(s2, lse_r, g_r, lse_c, g_c, ROWS, COLS, SHARED_EXP)
    if FINAL:
        if POS != 0:
            in_rows = offs_m < row0 + N_STRIP
            g_pos = tl.load(gpos_ptr + offs_m, mask=in_rows, other=0.0)
            if POS == 1:
                pos = offs_m
            else:
                pos = tl.load(pos_ptr + offs_m, mask=in_rows, other=-1).to(tl.int32)
            ds += tl.where(offs_n[None, :] == pos[:, None], g_pos[:, None], 0.0)
        gs = tl.load(gs_ptr).to(tl.float32)
        ds = ds * tl.where(gs == 0.0, 1.0, gs)  # 0 keeps the tile: qgq needs it (strip_grads)
    tl.store(ds_ptr + local.to(tl.int64)[:, None] * stride_ds + local_n[None, :],
             ds.to(ds_ptr.dtype.element_ty), mask=(local[:, None] < N_STRIP) & (local_n[None, :] < N_COLS))


# The fixed bf16/fp16 launch shapes (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) on a GPU, by
# role.  On an H200 at N = M = 32768, D = 768 (benchmarks/results/h200_20261128_275e1b9_clip_bench.log,
# "sweep"), 64 x 128 with 4 warps took the rows+cols forward from 5.39 to 5.00 ms and the dS strips
# from 14.26 to 11.82 ms against 128 x 128 with 8 warps, which kept the row-only forward ahead
# (3.56 against 3.99 ms).  The sigmoid strips were not swept and keep 128 x 128.
HALF_SHAPES = {"lse": (64, 128, 64, 4, 3), "lse_rows": (128, 128, 64, 8, 3), "sigmoid": (128, 128, 64, 8, 3)}


def _config(q: torch.Tensor, role: str = "lse") -> dict:
    """One fixed launch configuration per situation (interpreter: small tiles for speed).

    ``role``: "lse" (the forward with column statistics, and the dS strips), "lse_rows" (the
    row-only forward) or "sigmoid" (the sigmoid strips): the half shapes of ``HALF_SHAPES``.

    ``launch`` holds num_warps and num_stages for every kernel that shares the shape;
    ``fwd_launch`` adds the register cap (``FASTCL_TRITON_TILE``'s sixth value) for the forward
    only: capped at 128, the other kernels spill (dS, the sigmoid strips, fp32)."""
    if role not in HALF_SHAPES:
        raise ValueError(f"role must be one of {tuple(HALF_SHAPES)}, got {role!r}")
    interp = q.device.type == "cpu"
    is_fp32 = q.dtype == torch.float32  # float64 never gets here (_check)
    upcast = interp
    precision = "ieee" if (interp or not torch.backends.cuda.matmul.allow_tf32) else "tf32"
    tile = None if interp else tile_override()
    if interp:
        bm, bn, bd, launch = 64, 64, 64, {}
    elif tile is not None:
        bm, bn, bd, warps, stages, *cap = tile
        launch = dict(num_warps=warps, num_stages=stages)
    else:
        # fp32 takes 64-column tiles: at 128 x 128 x 32 its forward spills registers on sm_90 (the
        # ptxas counts checked by tests/test_triton_lse_compile.py).
        if q.dtype == torch.float32:
            bm, bn, bd, warps, stages = 128, 64, 32, 8, 3
        else:
            bm, bn, bd, warps, stages = HALF_SHAPES[role]
        launch = dict(num_warps=warps, num_stages=stages)
    fwd_launch = dict(launch, maxnreg=cap[0]) if tile is not None and cap else launch
    # The hardware log2 is libdevice's, which the interpreter lacks (also with CUDA tensors).
    fast_log = not (interp or triton_interpreting())
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=max(16, min(bd, next_power_of_2(q.shape[1]))),
                UPCAST=upcast, IS_FP32=is_fp32 or upcast, PRECISION=precision, FAST_LOG=fast_log, launch=launch,
                fwd_launch=fwd_launch)


def gpu_launch_shape(dtype: torch.dtype, d: int = 768, role: str = "lse") -> Tuple[int, ...]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages[, maxnreg]) of the kernels of ``role`` (see
    ``_config``) on a GPU for inputs of ``dtype`` and feature size ``d`` (``_config``'s choice,
    ``FASTCL_TRITON_TILE`` included; maxnreg caps the forward only)."""
    c = _config(torch.empty(1, d, dtype=dtype, device="meta"), role)  # a meta tensor stands in for CUDA
    cap = (c["fwd_launch"]["maxnreg"],) if "maxnreg" in c["fwd_launch"] else ()
    return (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], c["launch"]["num_warps"], c["launch"]["num_stages"]) + cap


def tile_override():
    """FASTCL_TRITON_TILE="BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages[,maxnreg]" replaces the fixed
    launch shape of the LSE kernels on a GPU (for benchmark sweeps; the interpreter keeps its small
    tiles); None when unset.  Blocks must be powers of two of at least 16, warps 1 to 16; the
    optional maxnreg (32 to 255) caps the forward's registers per thread, so more programs share
    an SM (the other kernels keep the shape uncapped)."""
    raw = os.environ.get("FASTCL_TRITON_TILE", "").strip()
    if not raw:
        return None
    try:
        vals = tuple(int(v) for v in raw.split(","))
    except ValueError:
        vals = ()
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731
    if (len(vals) not in (5, 6) or not all(pow2(v) for v in vals[:3]) or not 1 <= vals[3] <= 16
            or vals[3] & (vals[3] - 1) or not 1 <= vals[4] <= 8 or not all(32 <= v <= 255 for v in vals[5:])):
        raise ValueError("FASTCL_TRITON_TILE must be BLOCK_M,BLOCK_N,BLOCK_D,num_warps,num_stages[,maxnreg] with "
                         "power-of-two blocks >= 16, num_warps a power of two <= 16, 1-8 stages and maxnreg "
                         f"32-255, got {raw!r}")
    return vals


def _check(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("Triton kernels got CPU tensors; set TRITON_INTERPRET=1 to run them in the interpreter")
    if q.dtype == torch.float64:
        raise TypeError("the triton backend supports float32, bfloat16 and float16 inputs, got float64; "
                        "use backend='reference' (or 'cpu' for CPU tensors) for float64")


def autotune_enabled() -> bool:
    """FASTCL_TRITON_AUTOTUNE=1 times a few launch shapes of the forward and strip kernels per
    problem size and keeps the fastest (opt-in: the fixed shapes in ``_config`` are the default)."""
    flag = os.environ.get("FASTCL_TRITON_AUTOTUNE", "0")
    if flag not in ("0", "1"):
        raise ValueError(f"FASTCL_TRITON_AUTOTUNE must be 0 or 1, got {flag!r}")
    return flag == "1"


# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages[, maxnreg]) tried by the opt-in autotuner on a
# GPU; maxnreg applies to the forward only.  Its bf16/fp16 128,128,32 forward capped at 128
# registers fits two programs per SM without spilling (sm_90, benchmarks/triton_sm90_resources.py
# --sweep), where uncapped ptxas takes 155 and fits one; fp32 and the dS kernel spill when capped.
# 64,128,32,4,4 compiles to 128 registers and 48 KB for both bf16 kernels (exact exp): four
# programs per SM, where the default 64,128,64,4,3 fits two (forward) and three (dS).
TUNE_SHAPES = ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 3), (128, 64, 64, 4, 4),
               (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
               (128, 128, 32, 8, 3, 128), (128, 256, 64, 8, 3), (64, 64, 64, 4, 3))
# In the interpreter (tests), two small shapes, timed with a wall clock.
TUNE_SHAPES_INTERPRETER = ((64, 64, 32, 4, 1), (32, 64, 16, 4, 1))
_TUNED = {}


def _wall_clock_bench(kernel_call, quantiles):
    import time
    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms for _ in quantiles]


def _tuned(kernel, key, interpreter: bool):
    """``kernel`` wrapped in triton.autotune over TUNE_SHAPES (one wrapper per kernel and mode);
    register caps reach the forward only, as in ``_config``."""
    name = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), interpreter)
    if name not in _TUNED:
        shapes = TUNE_SHAPES_INTERPRETER if interpreter else TUNE_SHAPES
        capped = kernel is _lse_fwd_kernel
        configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), num_warps=w, num_stages=st,
                                 maxnreg=cap[0] if cap and capped else None)
                   for bm, bn, bd, w, st, *cap in shapes]
        extra = dict(do_bench=_wall_clock_bench) if interpreter else {}
        _TUNED[name] = triton.autotune(configs, key=key, **extra)(kernel)
    return _TUNED[name]


def forward_group_rows(n: int, m: int, block_m_min: int, block_m_max: int, sms: int) -> int:
    """Rows per forward launch: the launch's column partials ((rows / block_m_min) x m fp32) fit half
    the workspace, but every launch keeps at least two row blocks per SM (``sms``: 0 in the
    interpreter), so a single launch covers every N up to 2 * sms * block_m_max rows.  The
    partials are thus at most max(workspace / 2, 2 * sms * m * 4 bytes): 138 MB at M = 131072
    on 132 SMs, against 512 MB for one launch over N = 131072 rows.  (They are merged in place,
    ``_merge_column_partials``.)"""
    fit = (workspace_bytes() // 2) // (4 * m) * block_m_min
    rows = max(fit, 2 * sms * block_m_max, block_m_max)
    return min(n, rows - rows % block_m_max)


def forward_column_splits(row_blocks: int, sms: int, max_splits: int = 8) -> int:
    """Column ranges per row block in the forward.  Each program walks all M columns of its row
    block, so with fewer row blocks than SMs (N=8192: 64 blocks of 128 rows on 132 SMs) most SMs
    idle; splitting the columns into s ranges gives s times the programs.  Picks the smallest s
    that minimises the waves per unit of work, ceil(row_blocks * s / sms) / s (one program per SM
    at a time); 1 in the interpreter (``sms`` 0)."""
    if sms <= 0 or row_blocks >= 2 * sms:
        return 1
    cost = {s: -(-row_blocks * s // sms) / s for s in range(1, max_splits + 1)}
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= best * 1.01)


# Column ranges are multiples of this (the widest BLOCK_N of TUNE_SHAPES), so that only the last
# range has a partial tile; the kernels mask each range at its end whatever BLOCK_N is.
SPLIT_ALIGN = 256


def crosses_edge(rows: int, cols: int, cfg: dict, col_span: int = 0) -> bool:
    """Whether a launch over ``rows`` x ``cols`` in ``cfg``'s BLOCK_M x BLOCK_N tiles (its columns
    in ranges of ``col_span`` when that is given) has tiles that cross the matrix's or a range's
    edge: only those need the kernels' bounds select (MASK_BOUNDS), as their sums include them."""
    return bool(rows % cfg["BLOCK_M"] or cols % cfg["BLOCK_N"] or (col_span and col_span % cfg["BLOCK_N"]))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 0 for CPU tensors (the interpreter)."""
    return 0 if device.type == "cpu" else torch.cuda.get_device_properties(device).multi_processor_count


def column_ranges(row_blocks: int, m: int, sms: int) -> Tuple[int, int]:
    """(col_span, ranges): the forward's m columns in ``ranges`` ranges of ``col_span`` columns (the
    last one shorter), ``forward_column_splits`` of them rounded to SPLIT_ALIGN columns."""
    col_span = cdiv(cdiv(m, forward_column_splits(row_blocks, sms)), SPLIT_ALIGN) * SPLIT_ALIGN
    return col_span, cdiv(m, col_span)


def lse_forward(q, k, scale, bias, rows: bool, cols: bool, diag_offset):
    """Row LSE (N,) and column LSE (M,) (empty when not asked), fp32.

    q: (N, D), k: (M, D) of one float dtype on one device; scale, bias: 0-d fp32 tensors there.
    """
    _check(q, k)
    q, k = q.contiguous(), k.contiguous()
    n, d = q.shape
    m = k.shape[0]
    cfg = _config(q, "lse" if cols else "lse_rows")
    tune = autotune_enabled()
    interp = q.device.type == "cpu"
    shapes = TUNE_SHAPES_INTERPRETER if interp else TUNE_SHAPES
    bm_min = min(sh[0] for sh in shapes) if tune else cfg["BLOCK_M"]
    bm_max = max(sh[0] for sh in shapes) if tune else cfg["BLOCK_M"]
    sms = sm_count(q.device)
    group = forward_group_rows(n, m, bm_min, bm_max, sms)
    col_span, splits = column_ranges(cdiv(min(n, group), cfg["BLOCK_M"]), m, sms)
    row = torch.empty(n if rows else 0, device=q.device, dtype=torch.float32)
    # Row LSE per column range (splits > 1), merged below; with one range the kernel writes ``row``.
    rowpart = torch.empty((splits, group) if rows and splits > 1 else (0,), device=q.device, dtype=torch.float32)
    col = torch.full((m,) if cols else (0,), float("-inf"), device=q.device, dtype=torch.float32)
    colpart = torch.empty((cdiv(group, bm_min), m) if cols else (0,), device=q.device, dtype=torch.float32)
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)
    flags = dict(ROWS=rows, COLS=cols, HAS_DIAG=diag_offset is not None, SHARED_EXP=exp_mode() == "shared",
                 UPCAST=cfg["UPCAST"], IS_FP32=cfg["IS_FP32"], PRECISION=cfg["PRECISION"], FAST_LOG=cfg["FAST_LOG"])
    for r0 in range(0, n, group):  # groups in order: the column merge is deterministic
        q_g = q[r0:r0 + group]
        ng = q_g.shape[0]
        # (splits, ng) contiguous, as the kernel indexes it (the last group may be short).
        part = rowpart.view(-1)[:splits * ng].view(splits, ng) if rows and splits > 1 else None
        row_out = (row[r0:r0 + ng] if part is None else part) if rows else dummy
        args = (q_g, k, scale.float(), bias.float(), row_out, colpart if cols else dummy,
                ng, m, d, q.stride(0), k.stride(0), 0 if diag_offset is None else r0 + int(diag_offset), col_span)
        if tune:  # the tile is the autotuner's choice: keep the bounds select
            kernel = _tuned(_lse_fwd_kernel, ["N", "M", "D"], interp)
            kernel[lambda meta: (cdiv(ng, meta["BLOCK_M"]), splits)](*args, **flags, MASK_BOUNDS=True)
            grid_m = cdiv(ng, kernel.best_config.kwargs["BLOCK_M"])
        else:
            grid_m = cdiv(ng, cfg["BLOCK_M"])
            # Whole tiles everywhere (N = M = 32768, say): no score needs the bounds select.
            edge = crosses_edge(ng, m, cfg, col_span if splits > 1 else 0)
            _lse_fwd_kernel[(grid_m, splits)](*args, **flags, MASK_BOUNDS=edge, BLOCK_M=cfg["BLOCK_M"],
                                              BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], **cfg["fwd_launch"])
        if part is not None:
            torch.logsumexp(part, dim=0, out=row[r0:r0 + ng])
        if cols:
            _merge_column_partials(colpart[:grid_m], col, first=r0 == 0)
    return row, col


def _merge_column_partials(parts: torch.Tensor, col: torch.Tensor, first: bool) -> None:
    """col (M,) = logsumexp of parts (P, M) over P (first group) or logaddexp(col, that).

    Works in place on ``parts`` (scratch, overwritten by the next group): a handful of launches
    and no (P, M) temporary, where ``torch.logsumexp`` would take another copy of ``parts``.  The
    steps are logsumexp's own (shift by the column max, infinities shifted by 0), so the result is
    the same, NaN and +-inf included."""
    ref = parts.amax(dim=0)
    ref.masked_fill_(ref.abs() == float("inf"), 0.0)
    lse = parts.sub_(ref).exp_().sum(dim=0).log_().add_(ref)
    if first:
        col.copy_(lse)
    else:
        torch.logaddexp(col, lse, out=col)


def backward_mode(d: int) -> str:
    """Backward mode: FASTCL_TRITON_BWD = "strip", "fused" (D <= 256, no workspace) or "auto".

    "auto" is "strip": on an H100 at N=32768, D=256, bf16 the strip backward made the CLIP step
    10.8 ms against 21.3 ms for "fused" (benchmarks/results/h100_20261127_f6a3808_clip_bench.json),
    and on an H200 14.7 ms against 19.7 ms (h200_20261128_275e1b9_clip_bench.json).  Smaller D is
    not measured yet; "fused" stays available as the workspace-free mode.
    """
    mode = os.environ.get("FASTCL_TRITON_BWD", "auto")
    if mode not in ("auto", "fused", "strip"):
        raise ValueError(f"FASTCL_TRITON_BWD must be auto, fused or strip, got {mode!r}")
    if mode == "fused" and d > FUSED_MAX_D:
        raise ValueError(f"FASTCL_TRITON_BWD=fused supports D <= {FUSED_MAX_D}, got D={d}")
    return "strip" if mode == "auto" else mode


def exp_mode() -> str:
    """How the kernels form row and column terms: FASTCL_TRITON_EXP = "exact" (default) or "shared".

    "exact" takes one exp per score and side.  "shared" takes one exp per score for both sides
    (a shared per-tile reference, with an exact fallback for tiles where it would lose range);
    it does less work but has not been timed on a GPU yet, so it is opt-in
    (benchmarks/gpu_bench.py times both in its breakdown).
    """
    mode = os.environ.get("FASTCL_TRITON_EXP", "exact")
    if mode not in ("exact", "shared"):
        raise ValueError(f"FASTCL_TRITON_EXP must be exact or shared, got {mode!r}")
    return mode


def lse_grads(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, diag_offset, grad_scale,
              out_dtype, need_dq=True, need_dk=True, mode=None):
    """``(dq, dk, qgq)`` of ``fastcl::similarity_lse_bwd`` (see there): dq (N, D), dk (M, D) in
    out_dtype, qgq 0-d fp32, for dS = g_row * P_row + g_col * P_col.

    row_lse/col_lse (N,)/(M,) are the forward's outputs (empty when that side was not computed);
    g_pos (N,) or None, pos_index (N,) int64 or None; scale, bias, grad_scale: 0-d fp32 tensors
    on q's device.  ``need_dq`` / ``need_dk`` False skip that side (it comes back (0, D)).
    """
    _check(q, k)
    q, k = q.contiguous(), k.contiguous()
    mode = mode or backward_mode(q.shape[1])
    rows, cols = row_lse.numel() > 0, col_lse.numel() > 0
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    row_lse, col_lse, g_row, g_col = f32(row_lse), f32(col_lse), f32(g_row), f32(g_col)
    g_pos = None if g_pos is None else f32(g_pos)
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    stats = (row_lse if rows else dummy, g_row if rows else dummy, col_lse if cols else dummy,
             g_col if cols else dummy)
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    if mode == "fused":
        gq = _grad_fused(q, k, scale, bias, *stats, rows, cols, diag_offset) if need_dq else None
        gk = _grad_fused(k, q, scale, bias, stats[2], stats[3], stats[0], stats[1], cols, rows,
                         None if diag_offset is None else -int(diag_offset)) if need_dk else None
        return finish_full(q, k, gq, gk, grad_scale, out_dtype, g_pos, pos_index, need_dq=need_dq, need_dk=need_dk)
    return _grad_strip(q, k, scale, bias, *stats, rows, cols, diag_offset, g_pos, pos_index, grad_scale, out_dtype,
                       need_dq, need_dk)


def grad_fused_config(a: torch.Tensor) -> dict:
    """Constexprs and launch options of ``_grad_fused_kernel`` for rows ``a`` (N, D) (the flags
    of ``_config`` plus BLOCK_A/BLOCK_B/BLOCK_D, whole D in one block, and ``launch``)."""
    cfg = _config(a)
    block_d = max(16, next_power_of_2(a.shape[1]))
    if a.device.type == "cpu":
        block_a, block_b, launch = 64, cfg["BLOCK_N"], {}
    else:
        block_a, block_b = (64 if block_d <= 128 else 32), 64
        launch = dict(num_warps=4 if block_d <= 64 else 8, num_stages=2)
    return dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d, UPCAST=cfg["UPCAST"], IS_FP32=cfg["IS_FP32"],
                PRECISION=cfg["PRECISION"], launch=launch)


def _grad_fused(a, b, scale, bias, lse_a, g_a, lse_b, g_b, a_stats, b_stats, diag_offset):
    na, d = a.shape
    cfg = grad_fused_config(a)
    launch = cfg.pop("launch")
    out = torch.empty((na, d), device=a.device, dtype=torch.float32)
    _grad_fused_kernel[(cdiv(na, cfg["BLOCK_A"]),)](
        a, b, scale.float(), bias.float(), lse_a, g_a, lse_b, g_b, out, na, b.shape[0], d,
        a.stride(0), b.stride(0), out.stride(0), 0 if diag_offset is None else int(diag_offset),
        A_STATS=a_stats, B_STATS=b_stats, HAS_DIAG=diag_offset is not None,
        SHARED_EXP=exp_mode() == "shared", **cfg, **launch)
    return out


def finished_tiles(dtype: torch.dtype) -> bool:
    """Whether the strip backward's dS kernel writes finished tiles (FINAL) for inputs of ``dtype``.
    fp16 keeps the generic tiles: its range (65504) would not hold a tile scaled by a large logit
    scale times a loss-scaled gradient, where the fp32 P takes the scale afterwards."""
    return dtype != torch.float16


def strip_grads_triton(q, k, grad_scale, launch, out_dtype, g_pos=None, pos_index=None, need_dq=True, need_dk=True,
                       launch_final=None, role="lse"):
    """``strip_grads`` with a Triton tile kernel: ``launch(tile, r0, nr, c0, nc, cfg)`` writes the
    gradient tile of rows [r0, r0 + nr) x columns [c0, c0 + nc) into ``tile`` ((nr, nc), q's dtype);
    ``launch_final``, if given, the same with the finished tile (``strip_grads``' form_final_tile).
    Strips hold at least STRIP_MIN_ROWS rows on a GPU (one row block in the interpreter); the tiles
    take ``role``'s launch shape (``_config``)."""
    cfg = _config(q, role)
    interp = q.device.type == "cpu"

    def tile_former(fn):
        def form_tile(ws, r0, nr, c0, nc):
            tile = ws[:nr * nc].view(nr, nc)
            fn(tile, r0, nr, c0, nc, cfg)
            return tile
        return form_tile

    return strip_grads(q, k, grad_scale, tile_former(launch), tile_dtype=q.dtype, out_dtype=out_dtype, g_pos=g_pos,
                       pos_index=pos_index,
                       min_rows=cfg["BLOCK_M"] if interp else STRIP_MIN_ROWS, row_align=cfg["BLOCK_M"],
                       col_align=cfg["BLOCK_N"], need_dq=need_dq, need_dk=need_dk,
                       form_final_tile=None if launch_final is None else tile_former(launch_final))


def _grad_strip(q, k, scale, bias, row_lse, g_row, col_lse, g_col, rows, cols, diag_offset, g_pos, pos_index,
                grad_scale, out_dtype, need_dq=True, need_dk=True):
    d = k.shape[1]
    # Everything but the block is the same for every launch: built once (the strip loop's host
    # time is what bounds small strips, not the GPU).
    scale, bias, gs = scale.float(), bias.float(), grad_scale.float()
    shared = exp_mode() == "shared"
    tuned = _tuned(_dscore_strip_kernel, ["N_STRIP", "N_COLS", "D"], q.device.type == "cpu") \
        if autotune_enabled() else None
    pos_mode = 0 if g_pos is None else (1 if pos_index is None else 2)
    gpos_arg = row_lse if g_pos is None else g_pos  # an unread pointer when POS is 0
    pos_arg = pos_index if pos_index is not None else gpos_arg
    diag = 0 if diag_offset is None else int(diag_offset)

    def launcher(final):
        def launch(tile, r0, nr, c0, nc, cfg):
            args = (q, k, scale, bias, row_lse, g_row, col_lse, g_col, tile, gs, gpos_arg, pos_arg, r0, nr, c0, nc, d,
                    q.stride(0), k.stride(0), tile.stride(0), diag)
            flags = dict(ROWS=rows, COLS=cols, HAS_DIAG=diag_offset is not None, SHARED_EXP=shared,
                         UPCAST=cfg["UPCAST"], IS_FP32=cfg["IS_FP32"], PRECISION=cfg["PRECISION"], FINAL=final,
                         POS=pos_mode if final else 0)
            if tuned is not None:
                tuned[lambda meta: (cdiv(nr, meta["BLOCK_M"]), cdiv(nc, meta["BLOCK_N"]))](*args, **flags)
            else:
                grid = (cdiv(nr, cfg["BLOCK_M"]), cdiv(nc, cfg["BLOCK_N"]))
                _dscore_strip_kernel[grid](*args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                           BLOCK_D=cfg["BLOCK_D"], **cfg["launch"])
        return launch
    final = launcher(True) if finished_tiles(q.dtype) else None
    return strip_grads_triton(q, k, grad_scale, launcher(False), out_dtype, g_pos, pos_index, need_dq, need_dk,
                              launch_final=final)
