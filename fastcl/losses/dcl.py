"""Decoupled contrastive loss (Yeh et al.) with lightly ``DCLLoss`` semantics, fused.

``0.5 * (l(out0, out1) + l(out1, out0))`` with
``l(a, b) = mean_i [ -w_i s_ab_ii + LSE_{j != i} s_aa_ij + LSE_{j != i} s_ab_ij ]`` (two separate
log-sum-exps; the positive never enters a denominator).  The diagonal exclusion of
``similarity_lse`` is all it takes: s_ba's row LSE is s_ab's column LSE, so three fused calls
cover both directions.
"""
from typing import Callable, Optional

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import compute_dtype
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_pair, check_scalar


def _weights(weight_fn, a: torch.Tensor, b: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    if weight_fn is None:
        return None
    w = weight_fn(a, b)
    if isinstance(w, torch.Tensor) and w.numel() not in (1, n):
        raise ValueError(f"weight_fn must return a scalar or ({n},) tensor, got shape {tuple(w.shape)}")
    return w


def dcl_loss(out0: torch.Tensor, out1: torch.Tensor, temperature=0.1,
             weight_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """DCL (or DCLW with a ``weight_fn``) between two views, as lightly's ``DCLLoss``.

    Both outputs are L2-normalised here; ``weight_fn(a, b)`` receives the normalised views
    (``(out0, out1)`` then ``(out1, out0)``) and returns the (N,) weights of the positive term.

    Args:
        out0: (N, D) float32, bfloat16, float16 or float64; first view.
        out1: (N, D), same dtype and device; second view.
        temperature: positive float or 0-d tensor.
        weight_fn: optional callable ``(a (N, D), b (N, D)) -> (N,)`` weights.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    check_pair("out0", out0, "out1", out1)
    if out0.shape[0] != out1.shape[0]:
        raise ValueError(f"out0 and out1 must have the same batch size, got {out0.shape[0]} and {out1.shape[0]}")
    check_scalar("temperature", temperature, positive=True)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
    n = out0.shape[0]
    a, b = l2_normalize(out0), l2_normalize(out1)
    scale = 1.0 / temperature
    lse_aa = similarity_lse(a, a, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_bb = similarity_lse(b, b, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_ab, lse_ba = similarity_lse(a, b, scale, rows=True, cols=True, exclude_diagonal=0, backend=backend)
    ct = compute_dtype(a.dtype)
    pos = (a.to(ct) * b.to(ct)).sum(-1) * scale
    w_ab, w_ba = _weights(weight_fn, a, b, n), _weights(weight_fn, b, a, n)
    pos_ab = pos if w_ab is None else pos * w_ab
    pos_ba = pos if w_ba is None else pos * w_ba
    l_ab = (lse_aa + lse_ab - pos_ab).mean()
    l_ba = (lse_bb + lse_ba - pos_ba).mean()
    return 0.5 * (l_ab + l_ba)
