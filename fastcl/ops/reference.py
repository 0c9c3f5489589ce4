"""Pure-PyTorch reference ops: they materialise the N x M matrix.  Test oracle and fallback."""
from typing import Optional, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype is computed and reported in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale, bias=None,
                     exclude_diagonal: Optional[int] = None) -> torch.Tensor:
    """(N, M) logits ``scale * q @ k.T + bias`` in the compute dtype, -inf where j == i + offset."""
    ct = compute_dtype(q.dtype)
    s = (q.to(ct) @ k.to(ct).T) * (scale.to(ct) if isinstance(scale, torch.Tensor) else scale)
    if bias is not None:
        s = s + (bias.to(ct) if isinstance(bias, torch.Tensor) else bias)
    if exclude_diagonal is not None:
        n, m = s.shape
        rows = torch.arange(n, device=s.device)[:, None]
        cols = torch.arange(m, device=s.device)[None, :]
        s = s.masked_fill(cols == rows + exclude_diagonal, float("-inf"))
    return s


def reference_similarity_lse(q, k, scale, bias=None, *, rows=True, cols=False,
                             exclude_diagonal=None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Row (N,) and column (M,) log-sum-exp of the materialised logits; None where not asked."""
    s = reference_logits(q, k, scale, bias, exclude_diagonal)
    return (torch.logsumexp(s, 1) if rows else None, torch.logsumexp(s, 0) if cols else None)
