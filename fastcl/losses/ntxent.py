"""NT-Xent (SimCLR) loss with lightly ``NTXentLoss`` semantics, fused."""
from typing import Optional

import torch
import torch.nn.functional as F

from fastcl.losses._common import reduce_loss
from fastcl.ops.reference import compute_dtype, positive_logits
from fastcl.ops.similarity_lse import similarity_lse, similarity_lse_with_index
from fastcl.validation import check_pair, check_reduction, check_scalar, check_views


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation of (N, D) ``x`` computed in fp32/fp64, returned in ``x.dtype``.

    Normalising half-precision rows in fp32 keeps the norm exact; the result is rounded once.
    """
    return F.normalize(x.to(compute_dtype(x.dtype)), dim=1).to(x.dtype)


def ntxent_loss(out0: torch.Tensor, out1: torch.Tensor, temperature=0.5, *, reduction: str = "mean",
                backend: Optional[str] = None) -> torch.Tensor:
    """NT-Xent over the 2N views, as lightly's ``NTXentLoss`` without a memory bank.

    Both outputs are L2-normalised here.  With ``z = cat(out0, out1)`` (2N, D), anchor ``i``'s
    logits are ``z_i . z_j / temperature`` for every ``j != i``; its positive is the same sample in
    the other view (``(i + N) mod 2N``).  The loss is the cross-entropy averaged over the 2N anchors.
    Only the (2N,) row log-sum-exp is computed, by ``similarity_lse``; no 2N x 2N matrix is stored.

    Args:
        out0: (N, D) float32, bfloat16, float16 or float64; first view.
        out1: (N, D), same dtype and device; second view.
        temperature: positive float or 0-d floating tensor (may require grad).
        reduction: "mean" (default, lightly's), "sum", or "none" for the (2N,) per-anchor losses
            ordered as ``cat(out0, out1)``.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (2N,) for ``reduction="none"``.
    """
    check_views(out0, out1)
    temperature = check_scalar("temperature", temperature, positive=True, device=out0.device)
    check_reduction(reduction)
    n = out0.shape[0]
    z = torch.cat([l2_normalize(out0), l2_normalize(out1)], dim=0)
    scale = 1.0 / temperature
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    # partner is built here, in range by construction: its values are not read back.
    lse, pos = similarity_lse_with_index(z, z, scale, rows=True, exclude_diagonal=0, index=partner, backend=backend)
    return reduce_loss(lse - pos, reduction)


def ntxent_bank_loss(out0: torch.Tensor, out1: torch.Tensor, negatives: torch.Tensor, temperature=0.5, *,
                     reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """NT-Xent against a memory bank of negatives (MoCo), as lightly's ``NTXentLoss`` with a bank.

    ``out0`` and ``out1`` are L2-normalised here; the bank's rows are used as given (lightly stores
    normalised outputs).  Anchor i is ``out0_i`` only: its logits are its positive ``out0_i . out1_i``
    and ``out0_i . negatives_j`` for every bank row j, over ``temperature``; the loss is the
    cross-entropy with the positive as the target, ``logaddexp(pos_i, LSE_j neg_ij) - pos_i``.  The
    bank gets no gradient.

    Args:
        out0: (N, D) float32, bfloat16, float16 or float64; first view (the anchors).
        out1: (N, D), same dtype and device; second view (the positives).
        negatives: (K, D) floating tensor on the same device, K >= 1 (cast to out0's dtype).
        temperature: positive float or 0-d floating tensor (may require grad).
        reduction: "mean" (default, lightly's), "sum", or "none" for the (N,) per-anchor losses.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (N,) for ``reduction="none"``.
    """
    check_views(out0, out1)
    if not isinstance(negatives, torch.Tensor) or not negatives.is_floating_point():
        raise TypeError(f"negatives must be a floating tensor, got {getattr(negatives, 'dtype', type(negatives))}")
    negatives = negatives.detach().to(out0.dtype)  # once: a (K, D) bank may be large
    check_pair("out0", out0, "negatives", negatives)
    temperature = check_scalar("temperature", temperature, positive=True, device=out0.device)
    check_reduction(reduction)
    a, b = l2_normalize(out0), l2_normalize(out1)
    scale = 1.0 / temperature
    lse_neg = similarity_lse(a, negatives, scale, rows=True, backend=backend)
    pos = positive_logits(a, b, None, scale)
    return reduce_loss(torch.logaddexp(pos, lse_neg) - pos, reduction)

