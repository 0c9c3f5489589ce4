"""Euclidean distances of the PML-form losses, computed by ``torch.cdist`` as PML computes them.

PML's ``LpDistance`` calls ``torch.cdist``, whose Gram-matrix rounding decides whether the
distance of two (near-)duplicate rows is 0 or a few ulps, and so whether a pair counts as a loss
above 0.  Calling it too keeps those decisions PML's wherever the shapes are PML's (cdist's GEMM
rounds a row alike only for the same number of rows).  Its backward is written out here in
differentiable ops, so a second derivative exists (cdist's own backward has none).
"""
import torch

from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import apply_function


def distance_grads(grad: torch.Tensor, d: torch.Tensor, q: torch.Tensor, k: torch.Tensor, need_q: bool = True,
                   need_k: bool = True):
    """(dq (N, D) or None, dk (M, D) or None) of ``sum(grad * d)`` for the distances d (N, M) of
    q (N, D) and k (M, D): d(d_ij)/dq_i = (q_i - k_j) / d_ij, and 0 at d = 0, as cdist's.
    Differentiable ops, so it has a derivative of its own."""
    w = torch.where(d > 0, grad / d, 0.0)
    gq = w.sum(1, keepdim=True) * q - w @ k if need_q else None
    gk = w.sum(0)[:, None] * k - w.T @ q if need_k else None
    return gq, gk


class _Cdist(torch.autograd.Function):
    """cdist's distances (N, M) with ``distance_grads`` as the backward.  setup_context style
    with a per-sample vmap rule, so torch.func transforms take it."""

    @staticmethod
    def forward(q, k):
        return torch.cdist(q, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output)

    @staticmethod
    def backward(ctx, grad):
        q, k, d = ctx.saved_tensors
        return distance_grads(grad, d, q, k, *ctx.needs_input_grad)


_Cdist.vmap = staticmethod(per_sample_vmap(_Cdist))


def euclidean_distances(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) of q (N, D) and k (M, D), same float dtype: ``torch.cdist``'s
    values; a distance of 0 takes no gradient, as cdist's.  Twice differentiable."""
    return apply_function(_Cdist, q, k)
