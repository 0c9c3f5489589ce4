"""Gradients from gradient tiles with bounded scratch memory (the triton and cuda backends).

Both GPU backends can form the gradient tile T (dS of the LSE, or G of the sigmoid loss) for any
block of rows x columns.  ``strip_grads`` turns those tiles into the finished gradients

    dq = grad_scale * (T @ k + g_pos * k[pos])        (N, D) in out_dtype
    dk = grad_scale * (T.T @ q + scatter_pos(g_pos * q)) (M, D) in out_dtype
    qgq = sum(q * (T @ k + g_pos * k[pos]))            0-d, for the scale's gradient

(``g_pos``: optional weights of the positive pairs (i, pos_i), pos_i = i unless a ``pos_index``
is given, whose logits the forward returned as well), and
never holds more than the workspace budget (``fastcl.ops.strips.workspace_bytes``) of scratch:

    for each chunk of columns c:                      Gk_c  (cols, D) fp32 accumulator
        for each strip of rows r:                     T     (rows, cols) tile workspace
            form T[r, c];  P = T @ k_c                P     (rows, D) fp32
            dq_r (+)= grad_scale * P
            Gk_c += T.T @ q_r
        qgq += sum(k_c * Gk_c);  dk_c = grad_scale * Gk_c

No full-size fp32 accumulator exists: with half outputs dq is summed in its own dtype, one
rounding per column chunk (one chunk, i.e. a single rounding, whenever Gk fits the budget); with
fp32 outputs dq and dk are the accumulators.  ``plan`` picks the fewest chunks that fit.
"""
from typing import Callable, List, Optional, Tuple

import torch

from fastcl.ops.intmath import cdiv
from fastcl.ops.reference import index_sum_
from fastcl.ops.strips import mm_f32_into, workspace_bytes

Tensor = torch.Tensor


def formed_sides(need_dq: bool, need_dk: bool, prefer_q: bool = False) -> Tuple[bool, bool]:
    """(form Gq, form Gk): the sides asked for, and one when neither is, since qgq (the scale's
    gradient) needs one: k's, or q's with ``prefer_q``.  Every backend and fake shape uses it, so
    all agree on which gradient comes back (0, D)."""
    if need_dq or need_dk:
        return need_dq, need_dk
    return prefer_q, not prefer_q


def scratch_bytes(rows: int, cols: int, d: int, tile_itemsize: int, chunk_acc: bool, row_buffers: bool = True) -> int:
    """Scratch held at once: the tile workspace, P (fp32) and one transient of P's size (the
    gathered positive keys) unless the tiles are final (``row_buffers`` False: then, without a
    chunk, 8 * d bytes beside the tiles, so qgq's product rows fit even a tile narrower than
    one), and the column chunk's fp32 Gk when the outputs are not fp32 (``chunk_acc``)."""
    if row_buffers:
        tail = 8 * rows * d
    else:  # finished tiles: qgq's products go through the fp32 chunk, or through the tiles' space and one row
        tail = 0 if chunk_acc else 8 * d
    return tile_itemsize * rows * cols + tail + (4 * cols * d if chunk_acc else 0)


MAX_GRID_Y = 65535
MIN_TILE_COLS = 16  # the narrowest BLOCK_N of a Triton dot


def plan(n: int, m: int, d: int, tile_itemsize: int, chunk_acc: bool, budget: int,
         min_rows: int, row_align: int, col_align: int, row_buffers: bool = True) -> Tuple[int, int]:
    """(rows per strip, columns per chunk): the fewest column chunks for which a strip of at least
    ``min(n, min_rows)`` rows fits ``budget`` bytes, then as many rows as fit (a multiple of
    ``row_align`` unless all n).  If nothing fits, the smallest pieces (over the budget).  A chunk
    spans at most 65535 column tiles of the narrowest tile a kernel may run (16 columns, whatever
    shape the autotuner picks): the Triton tile kernels put the column tiles on the grid's y axis,
    which CUDA caps there.  ``row_buffers``: as in ``scratch_bytes``."""
    want = min(n, min_rows)
    last = None
    max_cols = max(col_align, MAX_GRID_Y * MIN_TILE_COLS // col_align * col_align)
    for chunks in range(max(1, cdiv(m, max_cols)), cdiv(m, col_align) + 1):
        cols = min(m, cdiv(cdiv(m, chunks), col_align) * col_align)
        if cols == last:
            continue
        last = cols
        fixed = scratch_bytes(0, cols, d, tile_itemsize, chunk_acc, row_buffers)
        per_row = scratch_bytes(1, cols, d, tile_itemsize, chunk_acc, row_buffers) - fixed
        rows = max(0, budget - fixed) // per_row
        if rows >= want:
            if rows >= n:
                return n, cols
            return max(want, rows - rows % row_align), cols
    return want, min(m, col_align)


FormTile = Callable[[Tensor, int, int, int, int], Tensor]


def strip_grads(q: Tensor, k: Tensor, grad_scale: Tensor, form_tile: FormTile, *, tile_dtype: torch.dtype,
                out_dtype: torch.dtype, g_pos: Optional[Tensor] = None, pos_index: Optional[Tensor] = None,
                min_rows: int, row_align: int, col_align: int, budget: Optional[int] = None,
                need_dq: bool = True, need_dk: bool = True,
                form_final_tile: Optional[FormTile] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, qgq)`` as in the module docstring.

    q (N, D), k (M, D): one float dtype; grad_scale: 0-d tensor on their device; g_pos: (N,)
    fp32 or None; pos_index: (N,) int64 in [0, M), or None for the pairs (i, i) (needs M >= N).
    Repeated pos_index entries add up, in a fixed order in eager mode (``reference.index_sum_``).
    ``form_tile(ws, r0, nr, c0, nc)`` returns the tile for rows [r0, r0 + nr) and columns
    [c0, c0 + nc) as an (nr, nc) tensor of q's dtype, written into the flat workspace ``ws``
    (``tile_dtype``; it may return a reinterpreting view of it).
    dq, dk: out_dtype; qgq: 0-d fp32 (fp64 for fp64 inputs).
    ``need_dq`` / ``need_dk`` False skip that side's products (a frozen tower, a memory bank): its
    gradient comes back empty, (0, D); qgq is formed from the side that is computed.
    ``form_final_tile``, if given, forms ``g * (T + g_pos_i at (i, pos_i))`` instead, g = grad_scale
    or 1 where grad_scale is 0 (the positive weights added before the tile is rounded); it is used
    when dk is asked for and the
    outputs are in the tile dtype: cuBLAS then writes dq and Gk straight from the tiles, with no
    fp32 P and fewer launches per strip (``_final_tile_grads``).
    """
    n, d = q.shape
    m = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    chunk_acc = need_dk and out_dtype != acc
    budget = workspace_bytes() if budget is None else budget
    if form_final_tile is not None and need_dk and out_dtype == tile_dtype == q.dtype:
        return _final_tile_grads(q, k, grad_scale, form_final_tile, out_dtype, chunk_acc, budget, min_rows,
                                 row_align, col_align, need_dq)
    rows, cols = plan(n, m, d, torch.empty((), dtype=tile_dtype).element_size(), chunk_acc, budget,
                      min_rows, row_align, col_align)
    dev = q.device
    ws = torch.empty(rows * cols, device=dev, dtype=tile_dtype)
    p = torch.empty((rows, d), device=dev, dtype=acc)
    gk_buf = torch.empty((cols, d), device=dev, dtype=acc) if chunk_acc else None
    dq = torch.empty((n if need_dq else 0, d), device=dev, dtype=out_dtype)
    dk = torch.empty((m if need_dk else 0, d), device=dev, dtype=out_dtype)
    qgq = torch.zeros((), device=dev, dtype=torch.float64)
    s = grad_scale.to(acc)
    for c0, nc in column_chunks(m, cols, col_align):
        k_c = k[c0:c0 + nc]
        gk = (gk_buf[:nc] if chunk_acc else dk[c0:c0 + nc]) if need_dk else None
        for r0 in range(0, n, rows):
            nr = min(rows, n - r0)
            tile = form_tile(ws, r0, nr, c0, nc)
            q_r, p_r = q[r0:r0 + nr], p[:nr]
            if need_dk:
                mm_f32_into(gk, tile.T, q_r, accumulate=r0 > 0)
            if not need_dq:
                continue
            mm_f32_into(p_r, tile, k_c, accumulate=False)
            if g_pos is not None:
                _add_positive_rows(p_r, k, g_pos, pos_index, r0, c0, nc)
            if not need_dk:  # qgq from this side: sum(q * Gq) over the block
                qgq += torch.mul(p_r, q_r).sum(dtype=torch.float64)
            if c0 == 0:  # one pass over P: scaled, rounded to dq's dtype
                torch.mul(p_r, s, out=dq[r0:r0 + nr])
            else:
                dq[r0:r0 + nr].addcmul_(p_r, s)
        if not need_dk:
            continue
        if g_pos is not None:
            _add_positive_columns(gk, q, g_pos, pos_index, c0, p)
        # sum(q * Gq) == sum(k * Gk): once per chunk over its Gk instead of once per block over P.
        qgq += _sum_of_products(gk, k_c, p)
        gk.mul_(s)
        if chunk_acc:
            dk[c0:c0 + nc].copy_(gk)
    return dq, dk, qgq.to(acc)


def _final_tile_grads(q: Tensor, k: Tensor, grad_scale: Tensor, form_final_tile: FormTile, out_dtype: torch.dtype,
                      chunk_acc: bool, budget: int, min_rows: int, row_align: int, col_align: int,
                      need_dq: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``strip_grads`` from finished tiles F = g * (T + positives), dk asked for, with g = grad_scale,
    or 1 where grad_scale is 0 (the device value is not read: a 0 would erase what qgq needs):

        dq[r] (+)= F[r, c] @ k_c      (out_dtype, written by cuBLAS: one rounding per chunk, and
                                       half split-K sums where torch allows them, as any half mm)
        Gk_c  (+)= F[r, c].T @ q_r    (fp32 chunk, or dk itself for fp32 outputs)
        qgq = sum(k * Gk) / g;  dq, dk times grad_scale / g (1, or 0 for a 0 grad_scale)

    Two products per strip and nothing else; the workspace holds the tiles (and, between strips,
    the qgq products)."""
    n, d = q.shape
    m = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    itemsize = q.element_size()
    rows, cols = plan(n, m, d, itemsize, chunk_acc, budget, min_rows, row_align, col_align, row_buffers=False)
    dev = q.device
    # One byte buffer of what scratch_bytes counts: the tiles and, with no chunk accumulator (fp32
    # outputs, whose dk is Gk), between chunks the rows of sum(k * Gk) (fp32 or fp64).
    acc_size = torch.empty((), dtype=acc).element_size()
    raw = torch.empty(scratch_bytes(rows, cols, d, itemsize, False, row_buffers=False) if not chunk_acc
                      else rows * cols * itemsize, device=dev, dtype=torch.uint8)
    ws = raw.view(q.dtype)
    step = raw.numel() // (d * acc_size)
    buf = None if chunk_acc else raw[:step * d * acc_size].view(acc).view(step, d)
    gk_buf = torch.empty((cols, d), device=dev, dtype=acc) if chunk_acc else None
    dq = torch.empty((n if need_dq else 0, d), device=dev, dtype=out_dtype)
    dk = torch.empty((m, d), device=dev, dtype=out_dtype)
    qgq = torch.zeros((), device=dev, dtype=torch.float64)
    gs = grad_scale.to(acc)  # compared in the dtype the kernel compares it in
    g = torch.where(gs == 0, torch.ones_like(gs), gs)
    keep = gs / g  # exactly 1, or 0 for a 0 grad_scale
    for c0, nc in column_chunks(m, cols, col_align):
        k_c = k[c0:c0 + nc]
        gk = gk_buf[:nc] if chunk_acc else dk[c0:c0 + nc]
        for r0 in range(0, n, rows):
            nr = min(rows, n - r0)
            tile = form_final_tile(ws, r0, nr, c0, nc)
            mm_f32_into(gk, tile.T, q[r0:r0 + nr], accumulate=r0 > 0)
            if need_dq:
                if c0 == 0:
                    torch.mm(tile, k_c, out=dq[r0:r0 + nr])
                else:
                    dq[r0:r0 + nr].addmm_(tile, k_c)
        if chunk_acc:  # dk first: then the chunk holds sum(k * Gk)'s products in place
            torch.mul(gk, keep, out=dk[c0:c0 + nc])
            qgq += gk.mul_(k_c).sum(dtype=torch.float64)
        else:
            qgq += _sum_of_products(gk, k_c, buf)
            gk.mul_(keep)
    dq.mul_(keep)
    return dq, dk, qgq.div_(g.to(torch.float64)).to(acc)


def column_chunks(m: int, cols: int, col_align: int) -> List[Tuple[int, int]]:
    """(start, width) of the column chunks: ``cols`` wide (a multiple of ``col_align``, or m), the
    last one taking the rest.  A rest narrower than ``col_align`` is widened by ``col_align``
    columns taken from the chunk before (when that leaves it ``col_align`` or more): a chunk of a
    few columns would make its positive-column sums long runs of one index (``index_sum_``)."""
    starts = list(range(0, m, cols))
    ends = starts[1:] + [m]
    if len(starts) > 1 and m - starts[-1] < col_align and cols >= 2 * col_align:
        starts[-1] -= col_align
        ends[-2] = starts[-1]
    return [(a, b - a) for a, b in zip(starts, ends)]


def _sum_of_products(a: Tensor, b: Tensor, buf: Tensor) -> Tensor:
    """sum(a * b) in fp64 for a (R, D) and b (R, D), through ``buf`` ((rows, D), a's dtype) a block
    of rows at a time: rows are summed in a's dtype, then in fp64."""
    total = torch.zeros((), device=a.device, dtype=torch.float64)
    step = buf.shape[0]
    for i in range(0, a.shape[0], step):
        j = min(i + step, a.shape[0])
        total += torch.mul(a[i:j], b[i:j], out=buf[:j - i]).sum(dim=1).sum(dtype=torch.float64)
    return total


def _add_positive_rows(p: Tensor, k: Tensor, g_pos: Tensor, pos_index: Optional[Tensor], r0: int, c0: int,
                       nc: int) -> None:
    """p (nr, D), rows [r0, r0 + nr) of Gq's part from columns [c0, c0 + nc): += g_pos_i * k_{pos_i} for
    the rows whose positive column lies in them.  Adding the term with the chunk that holds its
    column lets it cancel against dS_{i, pos_i} * k_{pos_i} before dq is rounded."""
    nr = p.shape[0]
    if pos_index is None:
        lo, hi = max(r0, c0), min(r0 + nr, c0 + nc)
        if lo < hi:
            p[lo - r0:hi - r0].addcmul_(g_pos[lo:hi, None], k[lo:hi])
        return
    idx = pos_index[r0:r0 + nr]
    inside = (idx >= c0) & (idx < c0 + nc)  # no host sync: rows outside add zeros
    p.addcmul_(torch.where(inside, g_pos[r0:r0 + nr], torch.zeros_like(g_pos[r0:r0 + nr]))[:, None],
               k.index_select(0, idx))


def _add_positive_columns(gk: Tensor, q: Tensor, g_pos: Tensor, pos_index: Optional[Tensor], c0: int,
                          buf: Tensor) -> None:
    """gk (nc, D), the columns [c0, c0 + nc) of Gk: += g_pos_i * q_i for every i with pos_i in them.
    ``buf`` (rows, D) is scratch of gk's dtype: the products go through it a block of rows at a time."""
    nc, n = gk.shape[0], q.shape[0]
    if pos_index is None:
        if c0 < n:
            top = min(c0 + nc, n)
            gk[:top - c0].addcmul_(g_pos[c0:top, None], q[c0:top])
        return
    inside = (pos_index >= c0) & (pos_index < c0 + nc)
    # No host sync: rows outside add exact zeros, spread over the chunk's rows (i mod nc) so that
    # no index gets a long run of them (index_sum_ sums a run serially on CUDA).
    spread = torch.arange(n, device=pos_index.device) % nc
    local = torch.where(inside, pos_index - c0, spread)
    weight = torch.where(inside, g_pos, torch.zeros_like(g_pos))
    step = buf.shape[0]
    for i in range(0, n, step):
        j = min(i + step, n)
        prod = torch.mul(weight[i:j, None], q[i:j], out=buf[:j - i])
        index_sum_(gk, local[i:j], prod)


def finish_full(q: Tensor, k: Tensor, gq: Optional[Tensor], gk: Optional[Tensor], grad_scale: Tensor,
                out_dtype: torch.dtype, g_pos: Optional[Tensor] = None, pos_index: Optional[Tensor] = None,
                rows: int = 4096, need_dq: bool = True, need_dk: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """The same ``(dq, dk, qgq)`` from whole fp32 (fp64) ``Gq = T @ k`` (N, D) and ``Gk = T.T @ q``
    (M, D), for the backends that form those (cpu, fused triton); gq and gk are overwritten.  A side
    not needed (``need_dq`` / ``need_dk`` False) may be given as None and comes back empty (0, D);
    qgq is formed from a side that is there."""
    n, d = q.shape
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    ref = gq if gq is not None else gk
    buf = torch.empty((min(max(n, k.shape[0]), rows), d), device=q.device, dtype=ref.dtype)
    if g_pos is not None and gq is not None:
        gq.addcmul_(g_pos[:, None], k[:n] if pos_index is None else k.index_select(0, pos_index))
    if g_pos is not None and gk is not None:
        _add_positive_columns(gk, q, g_pos, pos_index, 0, buf[:min(n, rows)])
    qgq = _sum_of_products(gq, q, buf) if gq is not None else _sum_of_products(gk, k, buf)
    s = grad_scale.to(ref.dtype)
    dq = gq.mul_(s).to(out_dtype) if need_dq and gq is not None else q.new_empty((0, d), dtype=out_dtype)
    dk = gk.mul_(s).to(out_dtype) if need_dk and gk is not None else q.new_empty((0, d), dtype=out_dtype)
    return dq, dk, qgq.to(ref.dtype)
