"""Alignment and uniformity on the hypersphere (Wang and Isola), as lightly's ``HypersphereLoss``.

lightly's uniformity term ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` goes through ``torch.pdist``,
N (N - 1) / 2 distances and their exps.  Here it is one row LSE of the fused op with the diagonal
excluded: with rows centred on their mean, ``y = x - mean(x)`` (distances do not change, and
centring keeps a nearly collapsed batch from cancelling ``2 - 2 cos`` to nothing), and ``n_j =
||y_j||^2``, ``-t ||y_i - y_j||^2 = 2t [y_i, 1] . [y_j, -n_j / 2] - t n_i``: the column term rides
in one extra coordinate and the row term is added after the LSE.  No N x N anything, and no
assumption that the rows are unit (F.normalize leaves a zero row at zero).
"""
import math
from typing import Optional

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import autocast_off, compute_dtype
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_scalar, check_views


def uniformity(x: torch.Tensor, t, backend: Optional[str] = None) -> torch.Tensor:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` of the rows of x (N, D); 0-d in the compute dtype.
    NaN for N < 2 (lightly's empty mean), off the inputs' graph as lightly's is."""
    n = x.shape[0]
    ct = compute_dtype(x.dtype)
    if isinstance(t, torch.Tensor):
        t = t.reshape(()).to(ct)
    if n < 2:
        return torch.full((), float("nan"), dtype=ct, device=x.device) + t * 0
    with autocast_off(x.device):
        y = x.to(ct) - x.to(ct).mean(dim=0)
        sq = (y * y).sum(dim=1)
        # zero columns up to a multiple of 8: rows stay 16-byte aligned for the GPU kernels
        pad = y.new_zeros(n, -(y.shape[1] + 1) % 8)
        q = torch.cat([y, torch.ones_like(sq)[:, None], pad], dim=1).to(x.dtype)
        k = torch.cat([y, -0.5 * sq[:, None], pad], dim=1).to(x.dtype)
    lse = similarity_lse(q, k, 2.0 * t, rows=True, exclude_diagonal=0, backend=backend)
    # Each term is near 0 for a collapsed batch and its LSE near log(N (N - 1)): the last step in
    # float64 keeps fp32's rounding of that log out of the small result.
    return (torch.logsumexp((lse - t * sq).double(), dim=0) - math.log(n * (n - 1))).to(ct)


def hypersphere_loss(z_a: torch.Tensor, z_b: torch.Tensor, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """lightly's ``HypersphereLoss(t, lam, alpha)(z_a, z_b)``:
    ``mean_i ||x_i - y_i||^alpha + lam * (U(x) + U(y)) / 2`` with x, y the L2-normalised rows and
    ``U(x) = log mean_{i<j} exp(-t ||x_i - x_j||^2)``, computed in O(N * D) memory.

    Args:
        z_a, z_b: (N, D) float32, bfloat16, float16 or float64; row i of each is a view of sample i.
        t: positive float, the uniformity's temperature.
        lam: float, the uniformity's weight.
        alpha: positive float, the power of the alignment distance.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs); NaN for N = 1, as lightly gives.
    """
    check_views(z_a, z_b, ("z_a", "z_b"))
    t = check_scalar("t", t, positive=True, device=z_a.device)
    lam = check_scalar("lam", lam, device=z_a.device)
    alpha = check_scalar("alpha", alpha, positive=True, device=z_a.device)
    ct = compute_dtype(z_a.dtype)
    x, y = l2_normalize(z_a), l2_normalize(z_b)
    align = (x.to(ct) - y.to(ct)).norm(dim=1).pow(alpha).mean()
    return align + lam * (uniformity(x, t, backend) + uniformity(y, t, backend)) / 2.0
