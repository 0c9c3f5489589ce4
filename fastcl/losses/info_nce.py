"""InfoNCE: cross-entropy of each query against all keys, fused."""
from typing import Optional

import torch

from fastcl.losses._common import default_positives, positive_logits, reduce_loss
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import _eager, check_index, check_pair, check_reduction, resolve_scale


def info_nce(query: torch.Tensor, keys: torch.Tensor, *, temperature=None, logit_scale=None,
             positives: Optional[torch.Tensor] = None, symmetric: bool = False, exclude_self: bool = False,
             reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE loss ``mean_i [ LSE_j s_ij - s_i,p(i) ]`` with ``s = scale * query @ keys.T``.

    Args:
        query: (N, D) float tensor.  Not normalised here.
        keys: (M, D), same dtype/device.
        temperature: positive float or 0-d tensor; scale = 1 / temperature.  Default 0.07 when
            neither ``temperature`` nor ``logit_scale`` is given.
        logit_scale: positive float or 0-d tensor used as the scale directly.
        positives: optional (N,) int64 positive key of each query; default ``arange(N)`` (M >= N).
        symmetric: also add the keys->query direction over the positive columns, averaged 1:1.
        exclude_self: drop entry (i, i) from every denominator (query set == key set layouts);
            positives must then avoid the diagonal.
        reduction: "mean", "sum" or "none" (per-query losses (N,)).
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (N,) for ``reduction="none"``.
    """
    check_pair("query", query, "keys", keys)
    scale = resolve_scale(temperature, logit_scale, default_temperature=0.07)
    check_reduction(reduction)
    n, m = query.shape[0], keys.shape[0]
    if positives is None:
        positives = default_positives(n, m, query.device, "query", "keys")
    else:
        check_index("positives", positives, n, m, query.device)
        positives = positives.long()
    if exclude_self and _eager() and bool((positives == torch.arange(n, device=query.device)).any()):
        raise ValueError("positives must not point at the excluded diagonal when exclude_self=True")
    out = similarity_lse(query, keys, scale, rows=True, cols=symmetric,
                         exclude_diagonal=0 if exclude_self else None, backend=backend)
    row_lse, col_lse = out if symmetric else (out, None)
    pos = positive_logits(query, keys, positives, scale)
    per_sample = row_lse - pos
    if symmetric:
        per_sample = 0.5 * (per_sample + col_lse.index_select(0, positives) - pos)
    return reduce_loss(per_sample, reduction)
