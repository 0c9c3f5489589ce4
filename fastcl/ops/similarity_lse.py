"""``similarity_lse``: row/column log-sum-exp of ``scale * q @ k.T + bias`` without the matrix.

The fused backends sit behind two ``torch.library`` custom ops (forward and backward), so the
op is opaque to ``torch.compile`` (no graph break) and its autograd formula lives here once:

    dS = g_row[:, None] * P_row + g_col[None, :] * P_col     (recomputed tile by tile)
    Gq = dS @ k,  Gk = dS.T @ q                               (from the kernels, fp32)
    dq = scale * Gq,  dk = scale * Gk,  dscale = sum(q * Gq),  dbias = sum(dS)
"""
from typing import Optional, Tuple

import torch

from fastcl.ops.dispatch import fused_kernel, resolve_backend
from fastcl.ops.reference import compute_dtype, reference_similarity_lse
from fastcl.validation import check_offset, check_pair, check_scalar

Tensor = torch.Tensor


_FORWARD = {
    "cpu": lambda q, k, s, b, r, c, d: torch.ops.fastcl_C.sim_lse_fwd(q, k, float(s), float(b), r, c, d),
    "triton": "fastcl.kernels.similarity_lse:lse_forward",
    "cuda": "fastcl.ops.strips:lse_forward",
}
_BACKWARD = {
    "cpu": lambda q, k, s, b, rl, cl, gr, gc, d: torch.ops.fastcl_C.sim_lse_bwd(
        q, k, float(s), float(b), rl, cl, gr, gc, d),
    "triton": "fastcl.kernels.similarity_lse:lse_backward",
    "cuda": "fastcl.ops.strips:lse_backward",
}


@torch.library.custom_op("fastcl::similarity_lse_fwd", mutates_args=())
def _lse_fwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, rows: bool, cols: bool,
             diag_offset: Optional[int], backend: str) -> Tuple[Tensor, Tensor]:
    row, col = fused_kernel("similarity_lse", backend, _FORWARD)(q, k, scale, bias, rows, cols, diag_offset)
    return row, col


@_lse_fwd.register_fake
def _(q, k, scale, bias, rows, cols, diag_offset, backend):
    ct = compute_dtype(q.dtype)
    return (q.new_empty((q.shape[0] if rows else 0,), dtype=ct),
            k.new_empty((k.shape[0] if cols else 0,), dtype=ct))


@torch.library.custom_op("fastcl::similarity_lse_bwd", mutates_args=())
def _lse_bwd(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, row_lse: Tensor, col_lse: Tensor,
             g_row: Tensor, g_col: Tensor, diag_offset: Optional[int], backend: str) -> Tuple[Tensor, Tensor]:
    gq, gk = fused_kernel("similarity_lse", backend, _BACKWARD)(q, k, scale, bias, row_lse, col_lse, g_row, g_col,
                                                               diag_offset)
    return gq, gk


@_lse_bwd.register_fake
def _(q, k, scale, bias, row_lse, col_lse, g_row, g_col, diag_offset, backend):
    ct = compute_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=ct), k.new_empty(k.shape, dtype=ct)


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, rows, cols, diag_offset, backend = inputs
    row, col = output
    ctx.save_for_backward(q, k, scale, bias, row, col)
    ctx.diag_offset, ctx.backend = diag_offset, backend


def _masked_sum(g: Tensor, lse: Tensor) -> Tensor:
    # sum_j P_ij = 1 for every row that has at least one entry (lse > -inf).
    return torch.where(lse > float("-inf"), g, torch.zeros_like(g)).sum()


def _sum_of_products(x: Tensor, y: Tensor, rows: int = 4096) -> Tensor:
    """sum(x * y) in y's dtype, a block of rows at a time so no (N, D) temporary is made."""
    total = y.new_zeros(())
    for i in range(0, x.shape[0], rows):
        total = total + (x[i:i + rows].to(y.dtype) * y[i:i + rows]).sum()
    return total


def _backward(ctx, g_row, g_col):
    q, k, scale, bias, row, col = ctx.saved_tensors
    g_row = torch.zeros_like(row) if g_row is None else g_row.to(row.dtype).contiguous()
    g_col = torch.zeros_like(col) if g_col is None else g_col.to(col.dtype).contiguous()
    gq, gk = _lse_bwd(q, k, scale, bias, row, col, g_row, g_col, ctx.diag_offset, ctx.backend)
    s = scale.to(gq.dtype)
    # dscale first: it needs the unscaled Gq, which is then scaled in place (no extra (N, D) copy).
    dscale = _sum_of_products(q, gq).to(scale.dtype) if ctx.needs_input_grad[2] else None
    dq = gq.mul_(s).to(q.dtype) if ctx.needs_input_grad[0] else None
    dk = gk.mul_(s).to(k.dtype) if ctx.needs_input_grad[1] else None
    dbias = None
    if ctx.needs_input_grad[3]:
        dbias = (_masked_sum(g_row, row) + _masked_sum(g_col, col)).to(bias.dtype)
    return dq, dk, dscale, dbias, None, None, None, None


_lse_fwd.register_autograd(_backward, setup_context=_setup_context)


def _as_scalar_tensor(value, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device=device, dtype=dtype)
    return torch.tensor(float(value), device=device, dtype=dtype)


def similarity_lse(q: Tensor, k: Tensor, scale, bias=None, *, rows: bool = True, cols: bool = False,
                   exclude_diagonal: Optional[int] = None, backend: Optional[str] = None):
    """Log-sum-exp over rows and/or columns of ``S = scale * q @ k.T + bias``, never storing S.

    Args:
        q: (N, D) float32, bfloat16, float16 or float64.
        k: (M, D), same dtype and device as ``q``.
        scale: positive Python float or 0-d floating tensor (may require grad).
        bias: optional Python float or 0-d floating tensor (may require grad).
        rows: return the row LSE, shape (N,).
        cols: return the column LSE, shape (M,).
        exclude_diagonal: if an int ``offset``, entries with ``j == i + offset`` are left out.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (float32/bfloat16/float16 on
            CUDA; fastcl.ops.strips); default ``FASTCL_BACKEND`` or "auto".

    Returns:
        The row LSE (N,), the column LSE (M,), or the tuple (row, col) when both are asked for;
        float32 (float64 for float64 inputs).  A row with every entry excluded gives -inf.
    """
    check_pair("q", q, "k", k)
    check_scalar("scale", scale, positive=True)
    if bias is not None:
        check_scalar("bias", bias)
    check_offset("exclude_diagonal", exclude_diagonal)
    if not (rows or cols):
        raise ValueError("at least one of rows or cols must be True")
    name = resolve_backend(backend, q.device, ("similarity_lse", q.shape[0], k.shape[0], q.shape[1], q.dtype))
    if name == "reference":
        row, col = reference_similarity_lse(q, k, scale, bias, rows=rows, cols=cols,
                                            exclude_diagonal=exclude_diagonal)
    else:
        ct = compute_dtype(q.dtype)
        scale_t = _as_scalar_tensor(scale, q.device, ct)
        bias_t = _as_scalar_tensor(0.0 if bias is None else bias, q.device, ct)
        row, col = _lse_fwd(q, k, scale_t, bias_t, rows, cols, exclude_diagonal, name)
    if rows and cols:
        return row, col
    return row if rows else col
