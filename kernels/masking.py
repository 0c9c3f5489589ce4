"""Triton kernel for token masking: one "segment gather" that covers every masking op.

    out[b, r, :] = sum_{j < n} (src[b, row_j, :] + pos[row_j, :])   if n > 0
                 = fill[:]  (or 0)                                   if n == 0
    with row_j = order[b, start[b, r] + j]  (or start[b, r] + j without ``order``)
    and  n     = count[b, r]  (or, without ``count``, 1 if 0 <= start[b, r] < S else 0)

Gather (n == 1), un-shuffle with a mask token (n in {0, 1}) and the index_add backward (CSR
segments) are all this one pass; sums run in fp32 (fp64 for fp64) in ascending j, so results
are deterministic.  Kernels and launch helpers only: no autograd, no validation.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_gather_kernel(
    src, start, count, order, fill, pos, out,
    R, D, S,
    stride_sb, stride_ss, stride_ob, stride_or,
    stride_tb, stride_tr, stride_cb, stride_cr, stride_qb, stride_qj, stride_ps,
    HAS_COUNT: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_FILL: tl.constexpr,
    HAS_POS: tl.constexpr, ACC_F64: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = (pid % R).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    s0 = tl.load(start + b * stride_tb + r * stride_tr).to(tl.int64)
    if HAS_COUNT:
        n = tl.load(count + b * stride_cb + r * stride_cr).to(tl.int64)
    else:
        # Out-of-range start means "not kept": the un-shuffle and the masking backward use it.
        n = ((s0 >= 0) & (s0 < S)).to(tl.int64)
    # Start the sum at -0.0, the additive identity, so a single -0.0 term stays -0.0 (bit-exact copy).
    if ACC_F64:
        acc = tl.full([BLOCK_D], -0.0, dtype=tl.float64)
    else:
        acc = tl.full([BLOCK_D], -0.0, dtype=tl.float32)
    # A while loop: the trip count is loaded data (also keeps the interpreter happy).
    j = n * 0
    while j < n:
        if HAS_ORDER:
            row = tl.load(order + b * stride_qb + (s0 + j) * stride_qj).to(tl.int64)
        else:
            row = s0 + j
        v = tl.load(src + b * stride_sb + row * stride_ss + offs, mask=dmask, other=0.0).to(acc.dtype)
        if HAS_POS:
            v += tl.load(pos + row * stride_ps + offs, mask=dmask, other=0.0).to(acc.dtype)
        acc += v
        j += 1
    if HAS_FILL:
        f = tl.load(fill + offs, mask=dmask, other=0.0).to(acc.dtype)
    else:
        f = tl.zeros([BLOCK_D], dtype=acc.dtype)
    acc = tl.where(n > 0, acc, f)
    if BF16_RNE_BY_HAND:
        # The interpreter truncates fp32 -> bf16; round to nearest even with integer ops instead.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(acc != acc, 0x7FC0, bits)
        res = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = acc.to(out.dtype.element_ty)
    tl.store(out + b * stride_ob + r * stride_or + offs, res, mask=dmask)


def segment_gather(src: torch.Tensor, start: torch.Tensor, count: Optional[torch.Tensor] = None,
                   order: Optional[torch.Tensor] = None, fill: Optional[torch.Tensor] = None,
                   pos: Optional[torch.Tensor] = None, out_fp32: bool = False) -> torch.Tensor:
    """Launch the segment gather (see module docstring); inputs are assumed validated.

    Args:
        src: (B, S, D) float tensor with ``stride(2) == 1`` (other strides are free).
        start: (B, R) int64 start of each output row's segment (into ``order`` or ``src``).
        count: optional (B, R) int64 segment lengths.
        order: optional (B, J) int64 row indices into ``src``.
        fill: optional contiguous (D,) tensor, dtype of ``src``, for rows with an empty segment.
        pos: optional (S, D) tensor, dtype of ``src``, ``stride(1) == 1``, added to each row read.
        out_fp32: write float32 (float64 for float64 ``src``) instead of ``src.dtype``.

    Returns:
        (B, R, D) contiguous tensor.
    """
    B, S, D = src.shape
    R = start.shape[1]
    acc_f64 = src.dtype == torch.float64
    out_dtype = (torch.float64 if acc_f64 else torch.float32) if out_fp32 else src.dtype
    out = torch.empty((B, R, D), device=src.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    # One program per output row: whole rows fit in a block up to D = 4096, then tile D.
    block_d = min(triton.next_power_of_2(D), 4096)
    num_warps = 8 if block_d >= 2048 else (4 if block_d >= 512 else (2 if block_d >= 128 else 1))
    dummy = start
    cnt = count if count is not None else dummy
    ordr = order if order is not None else dummy
    grid = (B * R, triton.cdiv(D, block_d))
    _segment_gather_kernel[grid](
        src, start, cnt, ordr, fill if fill is not None else src, pos if pos is not None else src, out,
        R, D, order.shape[1] if order is not None else S,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        start.stride(0), start.stride(1), cnt.stride(0), cnt.stride(1),
        ordr.stride(0), ordr.stride(1), pos.stride(0) if pos is not None else 0,
        HAS_COUNT=count is not None, HAS_ORDER=order is not None, HAS_FILL=fill is not None,
        HAS_POS=pos is not None, ACC_F64=acc_f64,
        BF16_RNE_BY_HAND=out_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1",
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
