"""Triton kernel for token masking: one "segment gather" that covers every masking op.

    out[b, r, :] = sum_{j < n} (src[b, row_j, :] + pos[row_j, :])   if n > 0
                 = fill[:]  (or 0)                                   if n == 0
    with row_j = order[b, start[b, r] + j]  (or start[b, r] + j without ``order``)
    and  n     = count[b, r]  (or, without ``count``, 1 if 0 <= start[b, r] < S else 0)

Gather (n == 1), un-shuffle with a mask token (n in {0, 1}) and the index_add backward (CSR
segments) are all this one pass; sums run in fp32 (fp64 for fp64) in ascending j, so results
are deterministic.  Kernels and launch helpers only: no autograd, no validation.

Two kernels implement it.  Without ``count`` (every forward, and the backward of
``random_masking``) each output row is one source row or the fill, so ``_row_copy_kernel`` moves a
2-D tile of ROWS rows x BLOCK_D columns per program with one masked load and one store, and
copies bits unchanged when nothing is added.  With ``count`` (CSR segments: backwards with
repeated indices) ``_segment_gather_kernel`` runs one program per output row and loops over its
segment.

``_mask_indices_kernel`` makes the index tensors of ``random_masking`` from the noise (a stable
argsort computed as ranks) in one launch, in place of a sort, a scatter and a compare.
"""
import functools
import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from fastcl.ops.intmath import cdiv, next_power_of_2


@triton.jit
def _round_to_out(acc, out_ty: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr):
    """Round the fp32/fp64 accumulator ``acc`` to ``out_ty`` (round to nearest even)."""
    if BF16_RNE_BY_HAND:
        # The interpreter truncates fp32 -> bf16; round to nearest even with integer ops instead.
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(acc != acc, 0x7FC0, bits)
        res = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = acc.to(out_ty)
    return res


@triton.jit
def _row_copy_kernel(
    src, start, order, fill, pos, out,
    BR, R, D, S, n_dblocks,
    stride_sb, stride_ss, stride_ob, stride_or,
    stride_tb, stride_tr, stride_qb, stride_qj, stride_ps,
    HAS_ORDER: tl.constexpr, HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, CONVERT: tl.constexpr,
    ACC_F64: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, EVEN_D: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, r] = src[b, row] (+ pos[row]) with row = start[b, r] (or order[b, start[b, r]]) if
    0 <= start[b, r] < S, else fill (or 0).  Program p covers flat output rows
    [ROWS * (p // n_dblocks), +ROWS) and columns [BLOCK_D * (p % n_dblocks), +BLOCK_D): the D
    blocks of one row block are neighbours in launch order, so whole rows stream together."""
    pid = tl.program_id(0)
    rblock = pid // n_dblocks
    dblock = pid - rblock * n_dblocks
    rid = rblock.to(tl.int64) * ROWS + tl.arange(0, ROWS)   # flat output row b * R + r
    rmask = rid < BR
    b = rid // R
    r = rid - b * R
    s0 = tl.load(start + b * stride_tb + r * stride_tr, mask=rmask, other=-1)
    # Out-of-range start means "not kept" (the un-shuffle and the masking backward use it).
    keep = rmask & (s0 >= 0) & (s0 < S)
    if HAS_ORDER:
        row = tl.load(order + b * stride_qb + s0 * stride_qj, mask=keep, other=0)
    else:
        row = s0
    offs = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    if EVEN_D:
        # D % BLOCK_D == 0: no column mask, so the row mask alone decides (keeps 16-byte vectors).
        lmask = keep[:, None]
        smask = rmask[:, None]
    else:
        dmask = offs < D
        lmask = keep[:, None] & dmask[None, :]
        smask = rmask[:, None] & dmask[None, :]
    v = tl.load(src + (b * stride_sb + row * stride_ss)[:, None] + offs[None, :], mask=lmask, other=0.0)
    if HAS_FILL:
        f = tl.load(fill + offs, mask=offs < D, other=0.0)
    else:
        f = tl.zeros([BLOCK_D], dtype=v.dtype)
    if CONVERT:
        # An addend or a wider output: compute in the accumulator type, round once.
        acc_ty = tl.float64 if ACC_F64 else tl.float32
        acc = v.to(acc_ty)
        if HAS_POS:
            acc += tl.load(pos + (row * stride_ps)[:, None] + offs[None, :], mask=lmask, other=0.0).to(acc_ty)
        acc = tl.where(keep[:, None], acc, f.to(acc_ty)[None, :])
        res = _round_to_out(acc, out.dtype.element_ty, BF16_RNE_BY_HAND)
    else:
        # A pure copy: move the bits as they are (NaN payloads and -0.0 included).
        res = tl.where(keep[:, None], v, f[None, :])
    tl.store(out + (b * stride_ob + r * stride_or)[:, None] + offs[None, :], res, mask=smask)


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
    res = _round_to_out(acc, out.dtype.element_ty, BF16_RNE_BY_HAND)
    tl.store(out + b * stride_ob + r * stride_or + offs, res, mask=dmask)


@triton.jit
def _mask_indices_kernel(
    noise, ids_restore, ids_keep, mask, L, K, stride_nb, stride_nl,
    KEY_F64: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Rank of each noise value in its row, as a stable ascending sort orders them (NaN last,
    ties by position): ids_restore[b, i] = rank, mask[b, i] = rank >= K, ids_keep[b, rank] = i
    for rank < K.  Program (b, p) ranks [BLOCK_I * p, +BLOCK_I) of row b against the whole row."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    imask = i < L
    i64 = i.to(tl.int64)  # index * stride can pass 2**31 for a strided view of many rows
    row = noise + b * stride_nb
    key_ty = tl.float64 if KEY_F64 else tl.float32
    ki = tl.load(row + i64 * stride_nl, mask=imask, other=0.0).to(key_ty)
    ki_nan = ki != ki
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jmask = j < L
        kj = tl.load(row + j.to(tl.int64) * stride_nl, mask=jmask, other=0.0).to(key_ty)
        kj_nan = kj != kj
        kj_num = kj == kj  # not ~kj_nan: Triton 3.3's interpreter has no int1 bitwise not
        # j sorts before i: a smaller key (every number is smaller than NaN), or an equal key
        # (NaNs are equal to each other; -0.0 == 0.0) at an earlier position.
        less = (kj[None, :] < ki[:, None]) | (ki_nan[:, None] & kj_num[None, :])
        tie = (kj[None, :] == ki[:, None]) | (ki_nan[:, None] & kj_nan[None, :])
        before = (less | (tie & (j[None, :] < i[:, None]))) & jmask[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    out = b * L + i
    tl.store(ids_restore + out, rank.to(tl.int64), mask=imask)
    tl.store(mask + out, (rank >= K).to(mask.dtype.element_ty), mask=imask)
    tl.store(ids_keep + b * K + rank, i64, mask=imask & (rank < K))


def mask_indices(noise: torch.Tensor, keep: int, mask_dtype: torch.dtype = torch.float32):
    """MAE's index tensors from ``noise`` in one launch: a stable argsort done as ranks.

    Every element is compared with its whole row, so the cost is L * L compares per row (for
    the short rows of masking, one launch instead of a sort, a scatter and a compare).

    Args:
        noise: (B, L) float32, float16, bfloat16 or float64, any strides.
        keep: K in [0, L], tokens kept per row.
        mask_dtype: float32 or float64, the dtype of ``mask``.

    Returns:
        ids_restore (B, L) int64: the rank of each token in the stable ascending sort of its row
        (NaN last); ids_keep (B, K) int64: the tokens of ranks 0..K-1 in rank order; mask (B, L)
        ``mask_dtype``: 1.0 where the rank is >= K (removed), else 0.0.
    """
    B, L = noise.shape
    ids_restore = torch.empty((B, L), device=noise.device, dtype=torch.int64)
    ids_keep = torch.empty((B, keep), device=noise.device, dtype=torch.int64)
    mask = torch.empty((B, L), device=noise.device, dtype=mask_dtype)
    if B * L == 0:
        return ids_restore, ids_keep, mask
    block_i = 64
    grid = (B, cdiv(L, block_i))
    _mask_indices_kernel[grid](
        noise, ids_restore, ids_keep, mask, L, keep, noise.stride(0), noise.stride(1),
        KEY_F64=noise.dtype == torch.float64, BLOCK_I=block_i, BLOCK_J=64, num_warps=4,
    )
    return ids_restore, ids_keep, mask


# Bytes one _row_copy_kernel program moves in (and out): 8 KB is 64 B (four 16-byte vectors) per
# thread at 4 warps, enough loads in flight per SM to cover DRAM latency.  Unmeasured choice.
ROW_COPY_TILE_BYTES = 8192


def row_copy_config(D: int, elem_bytes: int) -> Dict[str, int]:
    """Launch shape of ``_row_copy_kernel`` for rows of ``D`` elements of ``elem_bytes`` bytes.

    BLOCK_D is the largest power of two (at most 512) whose padding of D wastes at most 1/8 of
    the lanes, else the least wasteful one: D=768 gives 256 (three full blocks, where a single
    1024-wide block would idle a quarter of its lanes).  ROWS fills ``ROW_COPY_TILE_BYTES``.
    Returns {"ROWS", "BLOCK_D", "num_warps"} (a fresh dict; the shape is computed once per size,
    as it took ~30 us on the host, about as long as a launch).
    """
    return dict(_row_copy_config(D, elem_bytes, ROW_COPY_TILE_BYTES))


@functools.lru_cache(maxsize=256)
def _row_copy_config(D: int, elem_bytes: int, tile_bytes: int) -> Dict[str, int]:
    top = min(512, next_power_of_2(D))
    cands = [bd for bd in (1 << i for i in range(10)) if min(16, top) <= bd <= top]
    waste = {bd: cdiv(D, bd) * bd - D for bd in cands}
    good = [bd for bd in cands if 8 * waste[bd] <= cdiv(D, bd) * bd]
    block_d = max(good) if good else min(cands, key=lambda bd: (waste[bd], -bd))
    rows = max(1, min(64, tile_bytes // (block_d * elem_bytes)))
    rows = 1 << (rows.bit_length() - 1)  # tl.arange needs a power of two
    # About 16 bytes (one vector) per thread and repetition: 4 warps for a full tile, fewer for tiny ones.
    num_warps = max(1, min(4, rows * block_d * elem_bytes // (32 * 16 * 4)))
    return {"ROWS": rows, "BLOCK_D": block_d, "num_warps": num_warps}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def segment_gather(src: torch.Tensor, start: torch.Tensor, count: Optional[torch.Tensor] = None,
                   order: Optional[torch.Tensor] = None, fill: Optional[torch.Tensor] = None,
                   pos: Optional[torch.Tensor] = None, out_fp32: bool = False,
                   config: Optional[Dict[str, int]] = None) -> torch.Tensor:
    """Launch the segment gather (see module docstring); inputs are assumed validated.

    Args:
        src: (B, S, D) float tensor with ``stride(2) == 1`` (other strides are free).
        start: (B, R) int64 start of each output row's segment (into ``order`` or ``src``).
        count: optional (B, R) int64 segment lengths.
        order: optional (B, J) int64 row indices into ``src``.
        fill: optional contiguous (D,) tensor, dtype of ``src``, for rows with an empty segment.
        pos: optional (S, D) tensor, dtype of ``src``, ``stride(1) == 1``, added to each row read.
        out_fp32: write float32 (float64 for float64 ``src``) instead of ``src.dtype``.
        config: optional launch shape {"ROWS", "BLOCK_D", "num_warps"} for the row-copy kernel
            (used without ``count``; default ``row_copy_config``), for benchmark sweeps.

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
    bf16_by_hand = out_dtype == torch.bfloat16 and _interpreting()
    J = order.shape[1] if order is not None else S
    dummy = start
    ordr = order if order is not None else dummy
    if count is None:
        cfg = config or row_copy_config(D, src.element_size())
        n_dblocks = cdiv(D, cfg["BLOCK_D"])
        grid = (cdiv(B * R, cfg["ROWS"]) * n_dblocks,)
        _row_copy_kernel[grid](
            src, start, ordr, fill if fill is not None else src, pos if pos is not None else src, out,
            B * R, R, D, J, n_dblocks,
            src.stride(0), src.stride(1), out.stride(0), out.stride(1),
            start.stride(0), start.stride(1), ordr.stride(0), ordr.stride(1),
            pos.stride(0) if pos is not None else 0,
            HAS_ORDER=order is not None, HAS_FILL=fill is not None, HAS_POS=pos is not None,
            CONVERT=pos is not None or out_dtype != src.dtype, ACC_F64=acc_f64,
            BF16_RNE_BY_HAND=bf16_by_hand, EVEN_D=D % cfg["BLOCK_D"] == 0,
            ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )
        return out
    # CSR segments: one program per output row; whole rows fit in a block up to D = 4096, then tile D.
    block_d = min(next_power_of_2(D), 4096)
    num_warps = 8 if block_d >= 2048 else (4 if block_d >= 512 else (2 if block_d >= 128 else 1))
    grid = (B * R, cdiv(D, block_d))
    _segment_gather_kernel[grid](
        src, start, count, ordr, fill if fill is not None else src, pos if pos is not None else src, out,
        R, D, J,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        start.stride(0), start.stride(1), count.stride(0), count.stride(1),
        ordr.stride(0), ordr.stride(1), pos.stride(0) if pos is not None else 0,
        HAS_COUNT=True, HAS_ORDER=order is not None, HAS_FILL=fill is not None,
        HAS_POS=pos is not None, ACC_F64=acc_f64, BF16_RNE_BY_HAND=bf16_by_hand,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
