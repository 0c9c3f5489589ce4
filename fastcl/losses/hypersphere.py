"""Alignment and uniformity on the hypersphere (Wang and Isola), as lightly's ``HypersphereLoss``.

lightly's uniformity term ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` goes through ``torch.pdist``,
N (N - 1) / 2 distances and their exps.  For unit rows ``||x_i - x_j||^2 = 2 - 2 x_i . x_j``, so it
is ``LSE_{i != j}(2t x_i . x_j) - log 2 - 2t - log(N (N - 1) / 2)``: one row LSE with the diagonal
excluded, from the fused op, and no N x N anything.
"""
import math
from typing import Optional

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import compute_dtype
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_scalar, check_views


def uniformity(x: torch.Tensor, t: float, backend: Optional[str] = None) -> torch.Tensor:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of unit rows x (N, D); 0-d in the compute dtype,
    NaN for N < 2 (an empty mean, as lightly gives)."""
    n = x.shape[0]
    ct = compute_dtype(x.dtype)
    if isinstance(t, torch.Tensor):  # a learnable t: its constant term in the compute dtype too
        t = t.reshape(()).to(ct)
    if n < 2:
        return x.sum(dtype=ct) * float("nan")  # NaN, on the graph
    lse = similarity_lse(x, x, 2.0 * t, rows=True, exclude_diagonal=0, backend=backend)
    return torch.logsumexp(lse, dim=0) - (math.log(2.0) + 2.0 * t + math.log(n * (n - 1) / 2))


def hypersphere_loss(z_a: torch.Tensor, z_b: torch.Tensor, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """lightly's ``HypersphereLoss(t, lam, alpha)(z_a, z_b)``:
    ``mean_i ||x_i - y_i||^alpha + lam * (U(x) + U(y)) / 2`` with x, y the L2-normalised rows and
    ``U(x) = log mean_{i<j} exp(-t ||x_i - x_j||^2)``, computed in O(N) memory beyond the inputs.

    Args:
        z_a, z_b: (N, D) float32, bfloat16, float16 or float64; row i of each is a view of sample i.
        t: positive float, the uniformity's temperature.
        lam: float, the uniformity's weight.
        alpha: positive float, the power of the alignment distance.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs); NaN for N = 1, as lightly gives.
    """
    check_views(z_a, z_b)
    check_scalar("t", t, positive=True)
    check_scalar("lam", lam)
    check_scalar("alpha", alpha, positive=True)
    ct = compute_dtype(z_a.dtype)
    x, y = l2_normalize(z_a), l2_normalize(z_b)
    align = (x.to(ct) - y.to(ct)).norm(dim=1).pow(alpha).mean()
    return align + lam * (uniformity(x, t, backend) + uniformity(y, t, backend)) / 2.0
