"""Euclidean distances of the PML-form losses, computed by ``torch.cdist`` as PML computes them.

PML's ``LpDistance`` calls ``torch.cdist``, whose Gram-matrix rounding decides whether the
distance of two (near-)duplicate rows is 0 or a few ulps, and so whether a pair counts as a loss
above 0.  Calling it too keeps those decisions PML's wherever the shapes are PML's (cdist's GEMM
rounds a row alike only for the same number of rows).  Its backward is written out here in
differentiable ops, so a second derivative exists (cdist's own backward has none).
"""
import torch


class _Cdist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k):
        d = torch.cdist(q, k)
        ctx.save_for_backward(q, k, d)
        return d

    @staticmethod
    def backward(ctx, grad):
        q, k, d = ctx.saved_tensors
        w = torch.where(d > 0, grad / d, 0.0)  # d(d_ij)/dq_i = (q_i - k_j) / d_ij; 0 at d = 0, as cdist
        gq = w.sum(1, keepdim=True) * q - w @ k if ctx.needs_input_grad[0] else None
        gk = w.sum(0)[:, None] * k - w.T @ q if ctx.needs_input_grad[1] else None
        return gq, gk


def euclidean_distances(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) of q (N, D) and k (M, D), same float dtype: ``torch.cdist``'s
    values; a distance of 0 takes no gradient, as cdist's.  Twice differentiable."""
    return _Cdist.apply(q, k)
