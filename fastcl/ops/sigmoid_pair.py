"""``sigmoid_pair_loss``: the SigLIP pairwise sigmoid loss summed over all pairs, without the matrix.

    L = sum_ij softplus(-z_ij * s_ij),   s = scale * q @ k.T + bias,   z = +1 iff j == i, else -1

The fused backends sit behind two ``torch.library`` custom ops (forward and backward), so the
op is opaque to ``torch.compile`` and its autograd formula lives here once:

    G = dL/ds = sigmoid(s) off the diagonal, -sigmoid(-s) on it     (recomputed tile by tile)
    Gq = G @ k,  Gk = G.T @ q,  gsum = sum(G)                        (from the kernels)
    dq = g * scale * Gq,  dk = g * scale * Gk,  dscale = g * sum(q * Gq),  dbias = g * gsum

The backends return dq and dk already scaled, in the input dtype (fastcl/ops/strip_grads.py).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastcl.ops.dispatch import fused_kernel, resolve_backend
from fastcl.ops.eager import eager_autograd, needs_custom_op
from fastcl.ops.reference import check_fits, compute_dtype, graph_grads, reference_logits, scalar_tensor
from fastcl.ops.strip_grads import finish_full, formed_sides
from fastcl.validation import check_op_inputs, check_pair, check_scalar

Tensor = torch.Tensor


_FORWARD = {
    "cpu": lambda q, k, s, b: torch.ops.fastcl_C.sigmoid_pair_fwd(q, k, float(s), float(b)),
    "triton": "fastcl.kernels.sigmoid_pair:sigmoid_pair_forward",
    "cuda": "fastcl.ops.strips:sigmoid_forward",
}


def _cpu_grads(q, k, scale, bias, grad_scale, out_dtype, need_dq=True, need_dk=True):
    need_dq, need_dk = formed_sides(need_dq, need_dk)
    gq, gk, gsum = torch.ops.fastcl_C.sigmoid_pair_bwd(q, k, float(scale), float(bias), need_dq, need_dk)
    return (*finish_full(q, k, gq if need_dq else None, gk if need_dk else None, grad_scale, out_dtype,
                         need_dq=need_dq, need_dk=need_dk), gsum)


# Each returns (dq, dk, qgq, gsum): see _sp_bwd.
_BACKWARD = {
    "cpu": _cpu_grads,
    "triton": "fastcl.kernels.sigmoid_pair:sigmoid_pair_backward",
    "cuda": "fastcl.ops.strips:sigmoid_grads",
}


def _check_inputs(q, k, scalars) -> None:
    # The op is callable directly (torch.ops.fastcl); kernels need rows.  No value is read.
    check_pair("q", q, "k", k)
    check_op_inputs(q.device, scalars)


def _sp_fwd_impl(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    _check_inputs(q, k, [("scale", scale), ("bias", bias)])
    return fused_kernel("sigmoid_pair_loss", backend, _FORWARD)(q, k, scale, bias)


_sp_fwd = torch.library.custom_op("fastcl::sigmoid_pair_fwd", mutates_args=())(_sp_fwd_impl)


@_sp_fwd.register_fake
def _(q, k, scale, bias, backend):
    _check_inputs(q, k, [("scale", scale), ("bias", bias)])
    return q.new_empty((), dtype=compute_dtype(q.dtype))


def _sp_bwd_impl(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, grad_scale: Tensor, out_dtype: torch.dtype,
                 need_dq: bool, need_dk: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, qgq, gsum)``: dq = grad_scale * G @ k (N, D), dk = grad_scale * G.T @ q (M, D) in
    out_dtype; qgq = sum(q * (G @ k)) and gsum = sum(G), 0-d fp32 (fp64).  ``need_dq`` / ``need_dk``
    False: that gradient comes back (0, D), not formed where the backend can skip it."""
    _check_inputs(q, k, [("scale", scale), ("bias", bias), ("grad_scale", grad_scale)])
    # with neither side asked for, q's: the fused Triton kernels form it anyway (for sum(G))
    need_dq, need_dk = formed_sides(need_dq, need_dk, prefer_q=True)
    dq, dk, qgq, gsum = fused_kernel("sigmoid_pair_loss", backend, _BACKWARD)(q, k, scale, bias, grad_scale,
                                                                            out_dtype, need_dq, need_dk)
    return dq, dk, qgq, gsum


_sp_bwd = torch.library.custom_op("fastcl::sigmoid_pair_bwd", mutates_args=())(_sp_bwd_impl)


@_sp_bwd.register_fake
def _(q, k, scale, bias, grad_scale, out_dtype, need_dq, need_dk, backend):
    _check_inputs(q, k, [("scale", scale), ("bias", bias), ("grad_scale", grad_scale)])
    ct = compute_dtype(q.dtype)
    need_dq, need_dk = formed_sides(need_dq, need_dk, prefer_q=True)
    return (q.new_empty((q.shape[0] if need_dq else 0, q.shape[1]), dtype=out_dtype),
            k.new_empty((k.shape[0] if need_dk else 0, k.shape[1]), dtype=out_dtype),
            q.new_empty((), dtype=ct), q.new_empty((), dtype=ct))


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, backend = inputs
    ctx.save_for_backward(q, k, scale, bias)
    ctx.backend = backend


def _graph_backward(ctx, g):
    # create_graph=True: differentiable ops on the materialised logits (the fused op has no derivative)
    inputs = tuple(t.view_as(t) for t in ctx.saved_tensors)  # q and k may be one tensor
    return graph_grads([reference_sigmoid_pair_loss(*inputs)], [g], inputs, ctx.needs_input_grad, 5)


def _backward(ctx, g):
    if torch.is_grad_enabled():  # create_graph=True
        return _graph_backward(ctx, g)
    q, k, scale, bias = ctx.saved_tensors
    g = g.to(scale.dtype)
    bwd = _sp_bwd if needs_custom_op(q, k, scale, bias, g) else _sp_bwd_impl
    dq, dk, qgq, gsum = bwd(q, k, scale, bias, g * scale, q.dtype, ctx.needs_input_grad[0],
                            ctx.needs_input_grad[1], ctx.backend)
    dscale = (g * qgq).to(scale.dtype) if ctx.needs_input_grad[2] else None
    dbias = (g * gsum).to(bias.dtype) if ctx.needs_input_grad[3] else None
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None, dscale, dbias, None)


_sp_fwd.register_autograd(_backward, setup_context=_setup_context)
_SpFwdEager = eager_autograd("SigmoidPairEager", _sp_fwd_impl, _setup_context, _backward)


def reference_sigmoid_pair_loss(q: Tensor, k: Tensor, scale, bias) -> Tensor:
    """Materialised (N, M) version of ``sigmoid_pair_loss``: the oracle and fallback backend.

    q: (N, D) and k: (M, D), float32, bfloat16, float16 or float64, one dtype and device; scale,
    bias: float or 0-d tensor.  Returns the 0-d sum of -log sigmoid(z * s), z = 1 on the diagonal
    and -1 elsewhere; float32 (float64 for float64 inputs)."""
    s = reference_logits(q, k, scale, bias)
    z = -torch.ones_like(s)
    d = min(s.shape)
    z[torch.arange(d), torch.arange(d)] = 1.0
    return -F.logsigmoid(z * s).sum()


def sigmoid_pair_loss(q: Tensor, k: Tensor, scale, bias, *, backend: Optional[str] = None) -> Tensor:
    """Sum over all (i, j) of ``-logsigmoid(z_ij * (scale * q_i . k_j + bias))``, never storing the matrix.

    ``z_ij = +1`` on the diagonal (``j == i``, the positive pairs) and ``-1`` elsewhere, as in
    SigLIP.  Stable at any magnitude (softplus and sigmoid are evaluated from ``exp(-|x|)``).

    Args:
        q: (N, D) float32, bfloat16, float16 or float64.
        k: (M, D), same dtype and device; M may differ from N (columns past N are all negatives).
        scale: positive Python float or 0-d floating tensor (may require grad); the sign of a GPU
            tensor is not checked, as reading it would synchronise the device (``check_scalar``).
        bias: Python float or 0-d floating tensor (may require grad).
        backend: "auto", "reference", "cpu", "triton" or "cuda" (float32/bfloat16/float16 on
            CUDA; fastcl.ops.strips); default ``FASTCL_BACKEND`` or "auto".

    Returns:
        0-d tensor, float32 (float64 for float64 inputs); differentiable in q, k, scale, bias.
    """
    check_pair("q", q, "k", k)
    scale = check_scalar("scale", scale, positive=True, device=q.device)
    bias = check_scalar("bias", bias, device=q.device)
    check_fits("scale", scale, compute_dtype(q.dtype))  # every backend alike: no inf from a finite scale
    check_fits("bias", bias, compute_dtype(q.dtype))
    name = resolve_backend(backend, q.device, ("sigmoid_pair", q.shape[0], k.shape[0], q.shape[1], q.dtype))
    if name == "reference":
        return reference_sigmoid_pair_loss(q, k, scale, bias)
    ct = compute_dtype(q.dtype)
    scale_t, bias_t = scalar_tensor(scale, q.device, ct), scalar_tensor(bias, q.device, ct, "bias")
    fwd = _sp_fwd if needs_custom_op(q, k, scale_t, bias_t) else _SpFwdEager.apply
    return fwd(q, k, scale_t, bias_t, name)
