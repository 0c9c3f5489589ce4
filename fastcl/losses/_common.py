"""Cheap O((N + M) * D) pieces shared by the losses built on ``similarity_lse``."""
import torch

from fastcl.ops.reference import compute_dtype


def positive_logits(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, scale, bias=None) -> torch.Tensor:
    """(N,) ``scale * <q_i, k_index[i]> + bias`` in the compute dtype (fp32, or fp64)."""
    ct = compute_dtype(q.dtype)
    dots = (q.to(ct) * k.index_select(0, index).to(ct)).sum(-1)
    out = dots * scale
    return out + bias if bias is not None else out


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
