"""InfoNCE: cross-entropy of each query against all keys, fused."""
from typing import Optional

import torch

from fastcl.losses._common import check_label_smoothing, default_positives, mean_logits, reduce_loss, smoothed_ce
from fastcl.ops.reference import take_rows
from fastcl.ops.similarity_lse import similarity_lse, similarity_lse_with_index
from fastcl.validation import _eager, check_flags, check_index, check_pair, check_reduction, resolve_scale


def info_nce(query: torch.Tensor, keys: torch.Tensor, *, temperature=None, logit_scale=None,
             positives: Optional[torch.Tensor] = None, symmetric: bool = False, exclude_self: bool = False,
             reduction: str = "mean", label_smoothing: float = 0.0,
             backend: Optional[str] = None) -> torch.Tensor:
    """InfoNCE loss ``mean_i [ LSE_j s_ij - s_i,p(i) ]`` with ``s = scale * query @ keys.T``.

    Args:
        query: (N, D) float32, bfloat16, float16 or float64 tensor.  Not normalised here.
        keys: (M, D), same dtype/device.
        temperature: positive float or 0-d tensor; scale = 1 / temperature.  Default 0.07 when
            neither ``temperature`` nor ``logit_scale`` is given.
        logit_scale: positive float or 0-d tensor used as the scale directly.
        positives: optional (N,) int64 positive key of each query; default ``arange(N)`` (M >= N).
            Keys may outnumber queries (M = N * g: in-batch plus hard negatives); every key is a
            candidate for every query.
        symmetric: also add the keys->query direction over the positive columns, averaged 1:1.
        exclude_self: drop entry (i, i) from every denominator (query set == key set layouts);
            positives must then avoid the diagonal.
        reduction: "mean", "sum" or "none" (per-query losses (N,)).
        label_smoothing: in [0, 1], as in ``F.cross_entropy``: the target mixes the one-hot with
            a uniform distribution over the row's candidates (the M keys, or M - 1 with
            ``exclude_self``); with ``symmetric`` the column term smooths over the N queries.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (N,) for ``reduction="none"``.
    """
    check_pair("query", query, "keys", keys)
    scale = resolve_scale(temperature, logit_scale, default_temperature=0.07, device=query.device)
    check_reduction(reduction)
    check_flags(symmetric=symmetric, exclude_self=exclude_self)
    label_smoothing = check_label_smoothing(label_smoothing)
    n, m = query.shape[0], keys.shape[0]
    diagonal = positives is None
    if positives is None:
        positives = default_positives(n, m, query.device, "query", "keys")
    else:
        positives = check_index("positives", positives, (n,), m, query.device)
    if exclude_self and _eager() and bool((positives == torch.arange(n, device=query.device)).any()):
        raise ValueError("positives must not point at the excluded diagonal when exclude_self=True")
    # The positive logits come from the op itself, which folds their gradient into its backward.
    excl = 0 if exclude_self else None
    if diagonal:
        out = similarity_lse(query, keys, scale, rows=True, cols=symmetric, exclude_diagonal=excl, positives=True,
                             backend=backend)
    else:  # positives were range-checked above: not again (each check waits for the device)
        out = similarity_lse_with_index(query, keys, scale, rows=True, cols=symmetric, exclude_diagonal=excl,
                                        index=positives, backend=backend)
    row_lse, col_lse, pos = out if symmetric else (out[0], None, out[1])
    row_mean = col_mean = None
    if label_smoothing > 0.0:
        row_mean = mean_logits(query, keys, scale, exclude_diagonal=exclude_self)
        if symmetric:
            col_mean = take_rows(mean_logits(keys, query, scale, exclude_diagonal=exclude_self), positives)
    per_sample = smoothed_ce(row_lse, pos, row_mean, label_smoothing)
    if symmetric:
        col_term = smoothed_ce(take_rows(col_lse, positives), pos, col_mean, label_smoothing)
        per_sample = 0.5 * (per_sample + col_term)
    return reduce_loss(per_sample, reduction)
