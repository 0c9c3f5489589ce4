"""Model-aware contrastive loss (MACL, Huang et al., ICML 2023) with lightly ``MACLLoss`` semantics, fused.

NT-Xent's 2N anchors with a temperature that follows the batch's alignment,
``t = temperature * (1 + alpha * (A - A_0))`` where ``A`` is the mean positive similarity
(no gradient), and each anchor's term ``-log p_i`` weighted by ``1 / (1 - p_i + 1e-8)`` (no
gradient), ``p_i`` the softmax probability of its positive.  ``log p_i`` is the positive logit
minus the row LSE (self excluded), which ``similarity_lse`` gives without the 2N x 2N matrix.
"""
from typing import Optional

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import positive_logits
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_views

EPS = 1e-8  # lightly's: the smallest temperature, and the weight's guard against p = 1


def check_macl_args(temperature, alpha, a_0) -> None:
    """lightly's checks: temperature >= 1e-8, alpha and A_0 in [0, 1] (ValueError naming them)."""
    for name, v in (("temperature", temperature), ("alpha", alpha), ("A_0", a_0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not temperature >= EPS:
        raise ValueError(f"temperature must be at least {EPS}, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= a_0 <= 1.0:
        raise ValueError(f"A_0 must be in [0, 1], got {a_0}")


def macl_loss(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.1, alpha: float = 0.5, a_0: float = 0.0,
              *, backend: Optional[str] = None) -> torch.Tensor:
    """MACL between two views, as lightly's ``MACLLoss(temperature, alpha, A_0)(z0, z1)``.

    Both views are L2-normalised here.  With ``z = cat(z0, z1)`` (2N, D), anchor ``i``'s logits are
    ``z_i . z_j / t`` for every ``j != i``, its positive the same sample in the other view;
    ``t = temperature * (1 + alpha * (A - a_0))`` with ``A`` the mean positive cosine
    similarity, detached.  The loss is ``mean_i -w_i log p_i`` with ``w_i = 1 / (1 - p_i + 1e-8)``
    detached.  ``t`` stays positive when ``alpha * (a_0 - A) < 1``, which holds whenever
    ``alpha < 0.5`` or ``a_0 <= A`` (the defaults keep ``t >= temperature / 2``).

    Args:
        z0: (N, D) float32, bfloat16, float16 or float64; first view.
        z1: (N, D), same dtype and device; second view.
        temperature: base temperature, at least 1e-8.
        alpha: in [0, 1], how far the temperature follows the alignment.
        a_0: in [0, 1], the alignment at which the temperature is the base one (lightly's ``A_0``).
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    check_views(z0, z1)
    check_macl_args(temperature, alpha, a_0)
    n = z0.shape[0]
    z = torch.cat([l2_normalize(z0), l2_normalize(z1)], dim=0)
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    cos = positive_logits(z, z, partner, 1.0)  # (2N,) in the compute dtype, with gradient
    t = temperature * (1 + alpha * (cos.detach().mean() - a_0))
    lse = similarity_lse(z, z, 1.0 / t, rows=True, exclude_diagonal=0, backend=backend)
    log_p = cos / t - lse
    weight = 1.0 / (1.0 - log_p.detach().exp() + EPS)
    return (-weight * log_p).mean()
