"""``similarity_lse``: row/column log-sum-exp of ``scale * q @ k.T + bias`` without the matrix.

The fused backends sit behind two ``torch.library`` custom ops (forward and backward), so the
op is opaque to ``torch.compile`` (no graph break) and its autograd formula lives here once
(plain eager calls take the same implementation and formula without the custom op's dispatch,
``fastcl.ops.eager``):

    dS = g_row[:, None] * P_row + g_col[None, :] * P_col     (recomputed tile by tile)
    Gq = dS @ k + g_pos * k[pos],  Gk = dS.T @ q + scatter_pos(g_pos * q)   (g_pos: positive logits)
    dq = scale * Gq,  dk = scale * Gk,  dscale = sum(q * Gq),  dbias = sum(dS) + sum(g_pos)

The backends return dq, dk already scaled in the input dtype and sum(q * Gq), so the GPU
backends never hold a whole fp32 Gq or Gk (fastcl/ops/strip_grads.py).
"""
from typing import Optional, Tuple, Union

import torch

from fastcl.ops.dispatch import fused_kernel, resolve_backend
from fastcl.ops.eager import eager_autograd, needs_custom_op
from fastcl.ops.reference import (check_fits, compute_dtype, graph_grads, positive_logits, reference_similarity_lse,
                                  row_dots, scalar_tensor, softmax_mass)
from fastcl.ops.strip_grads import finish_full, formed_sides
from fastcl.validation import check_flags, check_index, check_offset, check_op_inputs, check_pair, check_scalar

Tensor = torch.Tensor


_FORWARD = {
    "cpu": lambda q, k, s, b, r, c, d: torch.ops.fastcl_C.sim_lse_fwd(q, k, float(s), float(b), r, c, d),
    "triton": "fastcl.kernels.similarity_lse:lse_forward",
    "cuda": "fastcl.ops.strips:lse_forward",
}


def _cpu_grads(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, diag, grad_scale, out_dtype,
               need_dq=True, need_dk=True):
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    gq, gk = torch.ops.fastcl_C.sim_lse_bwd(q, k, float(scale), float(bias), row_lse, col_lse, g_row, g_col, diag,
                                            need_dq, need_dk)
    return finish_full(q, k, gq if need_dq else None, gk if need_dk else None, grad_scale, out_dtype, g_pos,
                       pos_index, need_dq=need_dq, need_dk=need_dk)


# Each returns (dq, dk, qgq): see _lse_bwd.
_BACKWARD = {
    "cpu": _cpu_grads,
    "triton": "fastcl.kernels.similarity_lse:lse_grads",
    "cuda": "fastcl.ops.strips:lse_grads",
}


def _check_fwd_inputs(q, k, scale, bias, positives, pos_index) -> None:
    # The op is callable directly (torch.ops.fastcl); kernels need rows.  No value is read.
    check_pair("q", q, "k", k)
    check_op_inputs(q.device, [("scale", scale), ("bias", bias)],
                    [("pos_index", pos_index if positives else None, (q.shape[0],))])


def _lse_fwd_impl(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, rows: bool, cols: bool,
                  diag_offset: Optional[int], positives: bool, pos_index: Optional[Tensor],
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    _check_fwd_inputs(q, k, scale, bias, positives, pos_index)
    row, col = fused_kernel("similarity_lse", backend, _FORWARD)(q, k, scale, bias, rows, cols, diag_offset)
    ct = compute_dtype(q.dtype)
    if positives:
        pos = row_dots(q, k, pos_index) * scale.to(ct) + bias.to(ct)
    else:
        pos = q.new_empty((0,), dtype=ct)
    return row, col, pos


_lse_fwd = torch.library.custom_op("fastcl::similarity_lse_fwd", mutates_args=())(_lse_fwd_impl)


@_lse_fwd.register_fake
def _(q, k, scale, bias, rows, cols, diag_offset, positives, pos_index, backend):
    _check_fwd_inputs(q, k, scale, bias, positives, pos_index)
    ct = compute_dtype(q.dtype)
    return (q.new_empty((q.shape[0] if rows else 0,), dtype=ct),
            k.new_empty((k.shape[0] if cols else 0,), dtype=ct),
            q.new_empty((q.shape[0] if positives else 0,), dtype=ct))


def _check_bwd_inputs(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, grad_scale) -> None:
    check_pair("q", q, "k", k)
    n, m = q.shape[0], k.shape[0]
    # Statistics of one side share its length (0: the side is off); pos_index's values are the
    # caller's to keep in [0, M) (the public functions check them, a read that waits for the device).
    check_op_inputs(q.device, [("scale", scale), ("bias", bias), ("grad_scale", grad_scale)],
                    [("row_lse", row_lse, (n, 0)), ("g_row", g_row, (row_lse.shape[0],)),
                     ("col_lse", col_lse, (m, 0)), ("g_col", g_col, (col_lse.shape[0],)),
                     ("g_pos", g_pos, (n, 0)), ("pos_index", pos_index, (n,))])


def _lse_bwd_impl(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, row_lse: Tensor, col_lse: Tensor,
                  g_row: Tensor, g_col: Tensor, g_pos: Tensor, pos_index: Optional[Tensor],
                  diag_offset: Optional[int], grad_scale: Tensor, out_dtype: torch.dtype, need_dq: bool,
                  need_dk: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, qgq)``: dq = grad_scale * Gq (N, D) and dk = grad_scale * Gk (M, D) in out_dtype,
    qgq = sum(q * Gq) 0-d fp32 (fp64), with Gq = dS @ k + g_pos * k[pos], Gk = dS.T @ q plus g_pos_i * q_i
    added to row pos_i, dS = g_row * P_row + g_col * P_col, pos = pos_index or (0, ..., N-1).  An empty
    row_lse / col_lse (0,) marks a side the forward did not compute; an empty g_pos (0,) means no
    positive logits.  ``need_dq`` / ``need_dk`` False: that gradient is not formed and comes back
    (0, D), so a frozen side (a memory bank, a locked tower) costs no products."""
    _check_bwd_inputs(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, grad_scale)
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    pos = g_pos if g_pos.numel() else None
    if row_lse.numel() == 0 and col_lse.numel() == 0:  # no softmax side: the positive logits alone, no kernel
        ct = compute_dtype(q.dtype)
        gq = q.new_zeros(q.shape, dtype=ct) if need_dq else None
        gk = k.new_zeros(k.shape, dtype=ct) if need_dk else None
        return finish_full(q, k, gq, gk, grad_scale, out_dtype, pos, pos_index, need_dq=need_dq, need_dk=need_dk)
    dq, dk, qgq = fused_kernel("similarity_lse", backend, _BACKWARD)(
        q, k, scale, bias, row_lse, col_lse, g_row, g_col, pos, pos_index, diag_offset, grad_scale, out_dtype,
        need_dq, need_dk)
    return dq, dk, qgq


_lse_bwd = torch.library.custom_op("fastcl::similarity_lse_bwd", mutates_args=())(_lse_bwd_impl)


@_lse_bwd.register_fake
def _(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, diag_offset, grad_scale, out_dtype,
      need_dq, need_dk, backend):
    _check_bwd_inputs(q, k, scale, bias, row_lse, col_lse, g_row, g_col, g_pos, pos_index, grad_scale)
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    return (q.new_empty((q.shape[0] if need_dq else 0, q.shape[1]), dtype=out_dtype),
            k.new_empty((k.shape[0] if need_dk else 0, k.shape[1]), dtype=out_dtype),
            q.new_empty((), dtype=compute_dtype(q.dtype)))


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, rows, cols, diag_offset, positives, pos_index, backend = inputs
    row, col, _ = output
    ctx.save_for_backward(q, k, scale, bias, row, col, pos_index)
    ctx.diag_offset, ctx.backend, ctx.positives = diag_offset, backend, positives
    ctx.rows, ctx.cols = rows, cols
    # An output the loss does not use gets None, not zeros: its side stays out of the backward, so
    # a NaN there (0 * NaN) cannot reach the other outputs' gradients, as with autograd's own ops.
    ctx.set_materialize_grads(False)


def _graph_backward(ctx, g_row, g_col, g_pos):
    # create_graph=True: differentiable ops on the materialised logits (the fused op has no derivative)
    *saved, pos_index = ctx.saved_tensors
    q, k, scale, bias = (t.view_as(t) for t in saved[:4])  # fresh aliases: q and k may be one tensor
    row, col = reference_similarity_lse(q, k, scale, bias, rows=ctx.rows, cols=ctx.cols,
                                        exclude_diagonal=ctx.diag_offset)
    pairs = [(out, g) for out, g in ((row, g_row), (col, g_col)) if out is not None and g is not None]
    if ctx.positives and g_pos is not None:
        pairs.append((positive_logits(q, k, pos_index, scale, bias), g_pos))
    return graph_grads([o for o, _ in pairs], [g for _, g in pairs], (q, k, scale, bias), ctx.needs_input_grad, 10)


def _backward(ctx, g_row, g_col, g_pos):
    if torch.is_grad_enabled():  # create_graph=True
        return _graph_backward(ctx, g_row, g_col, g_pos)
    q, k, scale, bias, row, col, pos_index = ctx.saved_tensors
    # A side without a gradient is left out (empty statistics), as if it had not been asked for.
    if g_row is None:
        row = g_row = row.new_empty((0,))
    if g_col is None:
        col = g_col = col.new_empty((0,))
    g_row, g_col = g_row.to(row.dtype).contiguous(), g_col.to(col.dtype).contiguous()
    if ctx.positives and g_pos is not None:
        g_pos = g_pos.to(row.dtype).contiguous()  # row and col share the compute dtype, even when empty
    else:
        g_pos = row.new_empty((0,))
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dq = dk = dscale = None
    if need_dq or need_dk or ctx.needs_input_grad[2]:  # the bias alone needs no product
        bwd = _lse_bwd if needs_custom_op(q, k, scale, bias, g_row, g_col, g_pos) else _lse_bwd_impl
        dq, dk, qgq = bwd(q, k, scale, bias, row, col, g_row, g_col, g_pos, pos_index, ctx.diag_offset, scale,
                          q.dtype, need_dq, need_dk, ctx.backend)
        dscale = qgq.to(scale.dtype) if ctx.needs_input_grad[2] else None
    dbias = None
    if ctx.needs_input_grad[3]:
        dbias = softmax_mass(g_row, row) + softmax_mass(g_col, col) + g_pos.sum()
        dbias = dbias.to(bias.dtype)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
            dscale, dbias, None, None, None, None, None, None)


_lse_fwd.register_autograd(_backward, setup_context=_setup_context)
_LseFwdEager = eager_autograd("SimilarityLseEager", _lse_fwd_impl, _setup_context, _backward)


def similarity_lse(q: Tensor, k: Tensor, scale, bias=None, *, rows: bool = True, cols: bool = False,
                   exclude_diagonal: Optional[int] = None, positives: Union[bool, Tensor] = False,
                   backend: Optional[str] = None):
    """Log-sum-exp over rows and/or columns of ``S = scale * q @ k.T + bias``, never storing S.

    Args:
        q: (N, D) float32, bfloat16, float16 or float64.
        k: (M, D), same dtype and device as ``q``.
        scale: positive Python float or 0-d floating tensor (may require grad); the sign of a GPU
            tensor is not checked, as reading it would synchronise the device (``check_scalar``).
        bias: optional Python float or 0-d floating tensor (may require grad).
        rows: return the row LSE, shape (N,).
        cols: return the column LSE, shape (M,).
        exclude_diagonal: if an int ``offset``, entries with ``j == i + offset`` are left out.
        positives: also return the (N,) logits of the positive pairs: ``True`` for ``S_ii`` (needs
            M >= N), or an (N,) integer tensor ``index`` for ``S_{i, index_i}``.  Their gradient is
            folded into the op's own backward, so a loss built from them allocates no extra
            (N, D) gradient buffers.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (float32/bfloat16/float16 on
            CUDA; fastcl.ops.strips); default ``FASTCL_BACKEND`` or "auto".

    Returns:
        The asked outputs in the order row LSE (N,), column LSE (M,), positive logits (N,): one
        tensor when one is asked for, else a tuple; float32 (float64 for float64 inputs).  A row
        with every entry excluded gives -inf.
    """
    return _similarity_lse(q, k, scale, bias, rows, cols, exclude_diagonal, positives, backend, "positives",
                           read_range=True)


def similarity_lse_with_index(q: Tensor, k: Tensor, scale, bias=None, *, rows: bool = True, cols: bool = False,
                              exclude_diagonal: Optional[int] = None, index: Tensor, backend: Optional[str] = None):
    """``similarity_lse(q, k, ..., positives=index)`` for an ``index`` the caller built or has
    range-checked already: (N,) integer tensor with values in [0, M).  Its shape, dtype and device
    are checked, its values are not read back (that read waits for the device on every call: the
    losses' own arange-built pairs would pay it every step).  Returns what ``similarity_lse`` does."""
    if not isinstance(index, torch.Tensor):  # a bool would mean the (i, i) pairs to _similarity_lse
        raise TypeError(f"index must be an (N,) integer tensor, got {type(index).__name__}")
    return _similarity_lse(q, k, scale, bias, rows, cols, exclude_diagonal, index, backend, "index",
                           read_range=False)


def _similarity_lse(q, k, scale, bias, rows, cols, exclude_diagonal, positives, backend, index_name: str,
                    read_range: bool):
    # positives: bool, or an index tensor checked under the caller's argument name ``index_name``.
    check_pair("q", q, "k", k)
    scale = check_scalar("scale", scale, positive=True, device=q.device)
    check_fits("scale", scale, compute_dtype(q.dtype))  # every backend alike: no inf from a finite scale
    if bias is not None:
        bias = check_scalar("bias", bias, device=q.device)
        check_fits("bias", bias, compute_dtype(q.dtype))
    check_offset("exclude_diagonal", exclude_diagonal)
    if exclude_diagonal is not None and not -q.shape[0] < exclude_diagonal < k.shape[0]:
        exclude_diagonal = None  # the diagonal misses the matrix: nothing to exclude (and no int64 edge cases)
    check_flags(rows=rows, cols=cols)
    if not (rows or cols):
        raise ValueError("at least one of rows or cols must be True")
    pos_index = None
    if isinstance(positives, torch.Tensor):
        pos_index = check_index(index_name, positives, (q.shape[0],), k.shape[0], q.device,
                                read_range=read_range).contiguous()
        positives = True
    elif not isinstance(positives, bool):
        raise TypeError(f"positives must be a bool or an (N,) integer tensor, got {type(positives).__name__}")
    elif positives and k.shape[0] < q.shape[0]:
        raise ValueError(f"positives=True needs k to have at least as many rows as q (the pairs (i, i)), "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    name = resolve_backend(backend, q.device, ("similarity_lse", q.shape[0], k.shape[0], q.shape[1], q.dtype))
    if name == "reference":
        row, col = reference_similarity_lse(q, k, scale, bias, rows=rows, cols=cols,
                                            exclude_diagonal=exclude_diagonal)
        pos = positive_logits(q, k, pos_index, scale, bias) if positives else None
    else:
        ct = compute_dtype(q.dtype)
        scale_t = scalar_tensor(scale, q.device, ct)
        bias_t = scalar_tensor(0.0 if bias is None else bias, q.device, ct, "bias")
        fwd = _lse_fwd if needs_custom_op(q, k, scale_t, bias_t, pos_index) else _LseFwdEager.apply
        row, col, pos = fwd(q, k, scale_t, bias_t, rows, cols, exclude_diagonal, positives, pos_index, name)
    out = [t for t, asked in ((row, rows), (col, cols), (pos, positives)) if asked]
    return out[0] if len(out) == 1 else tuple(out)
