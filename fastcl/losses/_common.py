"""Cheap O((N + M) * D) pieces shared by the losses built on ``similarity_lse``."""
import numbers

import torch

from fastcl.ops.reference import compute_dtype


def reduce_loss(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def default_positives(n: int, m: int, device: torch.device, name: str, other: str) -> torch.Tensor:
    """arange(n): positives on the diagonal, which needs at least n columns."""
    if m < n:
        raise ValueError(f"{other} has {m} rows but {name} has {n}; give the positive column "
                         f"of each row explicitly when the keys are fewer than the queries")
    return torch.arange(n, device=device)


def mean_logits(q: torch.Tensor, k: torch.Tensor, scale, bias=None, exclude_diagonal: bool = False) -> torch.Tensor:
    """(N,) mean over the columns j of ``scale * q_i . k_j + bias``, in O((N + M) * D).

    With ``exclude_diagonal`` the entry j == i (when it exists) is left out of the mean, as the
    diagonal is left out of ``similarity_lse``.  This is the uniform part of label smoothing.
    """
    ct = compute_dtype(q.dtype)
    qf, kf = q.to(ct), k.to(ct)
    n, m = q.shape[0], k.shape[0]
    total = qf @ kf.sum(0)
    count = torch.full((n,), float(m), dtype=ct, device=q.device)
    if exclude_diagonal:
        d = min(n, m)
        total = torch.cat([total[:d] - (qf[:d] * kf[:d]).sum(-1), total[d:]])
        count[:d] -= 1
    out = total / count * scale
    return out + bias if bias is not None else out


def smoothed_ce(lse: torch.Tensor, pos: torch.Tensor, mean_logit: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``F.cross_entropy(..., label_smoothing=eps)`` per row from its O(1) pieces:
    ``(1 - eps) * (lse - pos) + eps * (lse - mean_j logit_j)``."""
    ce = lse - pos
    if label_smoothing == 0.0:
        return ce
    return (1.0 - label_smoothing) * ce + label_smoothing * (lse - mean_logit)


def check_label_smoothing(label_smoothing) -> float:
    """A float in [0, 1], as ``F.cross_entropy`` requires."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):  # numpy floats too
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)
