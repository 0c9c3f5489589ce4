"""Model-aware contrastive loss (MACL, Huang et al., ICML 2023) with lightly ``MACLLoss`` semantics, fused.

NT-Xent's 2N anchors with a temperature that follows the batch's alignment,
``t = temperature * (1 + alpha * (A - A_0))`` where ``A`` is the mean positive similarity
(no gradient), and each anchor's term ``-log p_i`` weighted by ``1 / (1 - p_i + 1e-8)`` (no
gradient), ``p_i`` the softmax probability of its positive.  Both come from the positive logit
and the LSE over the negatives, which ``similarity_lse`` gives without the 2N x 2N matrix.
"""
import numbers
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import positive_logits
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_scalar, check_views

EPS = 1e-8  # lightly's: the smallest temperature, and the weight's guard against p = 1


def check_macl_args(temperature, alpha, a_0, a_0_name: str = "a_0",
                    device: Optional[torch.device] = None) -> Tuple[float, float, float]:
    """lightly's checks: temperature >= 1e-8, alpha and A_0 in [0, 1] (ValueError naming them;
    ``a_0_name`` is the caller's name for A_0).  Real numbers of any kind (numpy scalars too) or
    one-element tensors on ``device`` or the CPU (``check_scalar``; read once here); returns the
    three as Python floats."""
    for name, v in (("temperature", temperature), ("alpha", alpha), (a_0_name, a_0)):
        if isinstance(v, torch.Tensor):
            check_scalar(name, v, device=device)
        elif isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    temperature, alpha, a_0 = (float(v) for v in (temperature, alpha, a_0))
    if not temperature >= EPS:
        raise ValueError(f"temperature must be at least {EPS}, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= a_0 <= 1.0:
        raise ValueError(f"{a_0_name} must be in [0, 1], got {a_0}")
    return temperature, alpha, a_0


def macl_loss(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.1, alpha: float = 0.5, a_0: float = 0.0,
              *, backend: Optional[str] = None) -> torch.Tensor:
    """MACL between two views, as lightly's ``MACLLoss(temperature, alpha, A_0)(z0, z1)``.

    Both views are L2-normalised here.  With ``z = cat(z0, z1)`` (2N, D), anchor ``i``'s logits are
    ``z_i . z_j / t`` for every ``j != i``, its positive the same sample in the other view;
    ``t = temperature * (1 + alpha * (A - a_0))`` with ``A`` the mean positive cosine
    similarity, detached.  The loss is ``mean_i -w_i log p_i`` with ``w_i = 1 / (1 - p_i + 1e-8)``
    detached, ``p_i`` the softmax probability of the positive.  ``log p_i = -softplus(d_i)`` and
    ``1 - p_i = sigmoid(d_i)`` come from ``d_i`` = (LSE over the negatives) - (positive logit),
    with the negatives' LSE fused as in DCL: no cancellation when p is close to 1, where
    ``1 - exp(log p)`` in fp32 loses every digit that the weight then multiplies.  ``t`` may reach 0
    or below only when ``alpha * (1 + a_0) >= 1``; then the logits change sign as lightly's do
    (the fused op takes a positive scale, so the keys are negated instead).  One sample (no
    negatives) gives 0, as in lightly.

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
    check_views(z0, z1, ("z0", "z1"))
    temperature, alpha, a_0 = check_macl_args(temperature, alpha, a_0, device=z0.device)
    n = z0.shape[0]
    a, b = l2_normalize(z0), l2_normalize(z1)
    z = torch.cat([a, b], dim=0)
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    cos = positive_logits(z, z, partner, 1.0)  # (2N,) in the compute dtype, with gradient
    t = temperature * (1 + alpha * (cos.detach().mean() - a_0))
    if n == 1:  # no negatives: p = 1 and lightly's loss is exactly 0, with a zero gradient
        return (cos * 0.0).mean()
    ka, kb = a, b
    if alpha * (1 + a_0) >= 1:  # t may be <= 0 (decided from the settings: no read of t)
        sign = torch.where(t < 0, -1.0, 1.0).to(a.dtype)
        ka, kb = a * sign, b * sign
    # NaN inputs make t NaN, and t = 0 makes the scale infinite: lightly's loss is NaN then.  The
    # op refuses such scales, so it gets 1 and the NaN is added back (no read of t).
    scale = 1.0 / t.abs()
    bad = ~torch.isfinite(scale)
    scale = torch.where(bad, torch.ones_like(scale), scale)
    # Negatives of anchor a_i: a_j and b_j for j != i (DCL's union), likewise for b_i.
    lse_aa = similarity_lse(a, ka, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_bb = similarity_lse(b, kb, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_ab, lse_ba = similarity_lse(a, kb, scale, rows=True, cols=True, exclude_diagonal=0, backend=backend)
    neg = torch.cat([torch.logaddexp(lse_aa, lse_ab), torch.logaddexp(lse_bb, lse_ba)])
    d = neg - cos / t
    log_p = -F.softplus(d)
    weight = 1.0 / (torch.sigmoid(d.detach()) + EPS)
    loss = (-weight * log_p).mean()
    return torch.where(bad, torch.full_like(loss, float("nan")), loss)
