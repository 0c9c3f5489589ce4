"""Decoupled contrastive loss (Yeh et al.) with lightly ``DCLLoss`` semantics, fused.

``0.5 * (l(out0, out1) + l(out1, out0))`` with, for the default ``negatives="union"`` (Eq. 6 of
the DCL paper; lightly >= 1.5.21, where PR #1827 changed the aggregation),
``l(a, b) = mean_i [ -w_i s_ab_ii + LSE( {s_aa_ij : j != i} U {s_ab_ij : j != i} ) ]``, and for
``negatives="separate"`` (lightly <= 1.5.20) two log-sum-exps added,
``l(a, b) = mean_i [ -w_i s_ab_ii + LSE_{j != i} s_aa_ij + LSE_{j != i} s_ab_ij ]``.
Either way the positive never enters a denominator.  The diagonal exclusion of
``similarity_lse`` is all it takes: s_ba's row LSE is s_ab's column LSE, so three fused calls
cover both directions; the union is ``logaddexp`` of the two row LSEs.
"""
from typing import Callable, Optional

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import compute_dtype
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import check_scalar, check_views

NEGATIVES = ("union", "separate")


def check_negatives(negatives) -> None:
    """``negatives`` must be "union" or "separate"; ValueError naming it otherwise."""
    if not isinstance(negatives, str) or negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")


def check_dcl_args(out0, out1, temperature, weight_fn, negatives):
    """The argument checks of ``dcl_loss`` (also run per rank by the distributed DCL); returns the
    temperature (a tensor as 0-d).

    out0, out1: (N, D) float tensors, same dtype and device; temperature: positive float or 0-d
    tensor; weight_fn: callable or None; negatives: "union" or "separate".  Raises
    TypeError/ValueError naming the argument."""
    check_views(out0, out1)
    temperature = check_scalar("temperature", temperature, positive=True, device=out0.device)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
    check_negatives(negatives)
    return temperature


def negative_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's weights, as lightly's ``negative_mises_fisher_weights``: ``2 - N * softmax(out0_i .
    out1_i / sigma)`` over the batch, without gradient.

    out0, out1: (N, D) (the normalised views, as ``DCLLoss`` passes them); returns (N,) in their dtype."""
    similarity = (out0.detach() * out1.detach()).sum(1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def _weights(weight_fn, a: torch.Tensor, b: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    if weight_fn is None:
        return None
    w = weight_fn(a, b)
    if isinstance(w, bool) or not isinstance(w, (torch.Tensor, int, float)):
        raise TypeError(f"weight_fn must return a number or a tensor, got {type(w).__name__}")
    # An (N, 1) result would broadcast the positive term to (N, N): refused, not averaged.
    if isinstance(w, torch.Tensor) and tuple(w.shape) not in ((), (1,), (n,)):
        raise ValueError(f"weight_fn must return a scalar or ({n},) tensor, got shape {tuple(w.shape)}")
    if isinstance(w, torch.Tensor) and w.device != a.device and not (w.dim() == 0 and w.device.type == "cpu"):
        raise ValueError(f"weight_fn must return a tensor on the inputs' device ({a.device}), got {w.device}")
    return w


def dcl_weights(weight_fn, a: torch.Tensor, b: torch.Tensor):
    """``(weight_fn(a, b), weight_fn(b, a))``, each a scalar or (N,) (None without ``weight_fn``).

    a, b: (N, D) normalised views.  ValueError if ``weight_fn`` returns another shape."""
    n = a.shape[0]
    return _weights(weight_fn, a, b, n), _weights(weight_fn, b, a, n)


def _logaddexp_of_lse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``logaddexp(x, y)`` of two LSEs, where both -inf (no negatives: N = 1) gives -inf with a
    zero gradient, as lightly's logsumexp over an empty row; torch's logaddexp gives NaN there."""
    empty = (x == float("-inf")) & (y == float("-inf"))
    return torch.logaddexp(x.masked_fill(empty, 0.0), y.masked_fill(empty, 0.0)).masked_fill(empty, float("-inf"))


def dcl_from_lse(lse_aa: torch.Tensor, lse_ab: torch.Tensor, lse_bb: torch.Tensor, lse_ba: torch.Tensor,
                 a: torch.Tensor, b: torch.Tensor, scale, weights, negatives: str) -> torch.Tensor:
    """The DCL loss of anchors ``a``, ``b`` from their negatives' row log-sum-exps.

    Args:
        lse_aa, lse_ab: (N,) float32/float64 LSE of a_i against the negatives among the a's, the b's.
        lse_bb, lse_ba: (N,) the same for the anchors b_i.
        a, b: (N, D) normalised views, same dtype; row i of each is the other's positive.
        scale: 1 / temperature (float or 0-d tensor).
        weights: ``dcl_weights`` output.
        negatives: "union" or "separate".

    Returns:
        0-d float32 tensor (float64 for float64 inputs): ``0.5 * (mean l_a + mean l_b)``.
    """
    ct = compute_dtype(a.dtype)
    pos = (a.to(ct) * b.to(ct)).sum(-1) * scale
    w_ab, w_ba = weights
    pos_ab = pos if w_ab is None else pos * w_ab
    pos_ba = pos if w_ba is None else pos * w_ba
    if negatives == "union":
        neg_a, neg_b = _logaddexp_of_lse(lse_aa, lse_ab), _logaddexp_of_lse(lse_bb, lse_ba)
    else:
        neg_a, neg_b = lse_aa + lse_ab, lse_bb + lse_ba
    return 0.5 * ((neg_a - pos_ab).mean() + (neg_b - pos_ba).mean())


def dcl_loss(out0: torch.Tensor, out1: torch.Tensor, temperature=0.1,
             weight_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None, *,
             negatives: str = "union", backend: Optional[str] = None) -> torch.Tensor:
    """DCL (or DCLW with a ``weight_fn``) between two views, as lightly's ``DCLLoss``.

    Both outputs are L2-normalised here; ``weight_fn(a, b)`` receives the normalised views
    (``(out0, out1)`` then ``(out1, out0)``) and returns the (N,) weights of the positive term.
    The default ``negatives="union"`` takes one log-sum-exp over both views' negatives, as lightly
    >= 1.5.21 and Eq. 6 of the paper; ``"separate"`` adds one log-sum-exp per view, as lightly
    <= 1.5.20.

    Args:
        out0: (N, D) float32, bfloat16, float16 or float64; first view.
        out1: (N, D), same dtype and device; second view.
        temperature: positive float or 0-d tensor.
        weight_fn: optional callable ``(a (N, D), b (N, D)) -> (N,)`` weights.
        negatives: "union" (default) or "separate".
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    temperature = check_dcl_args(out0, out1, temperature, weight_fn, negatives)
    a, b = l2_normalize(out0), l2_normalize(out1)
    scale = 1.0 / temperature
    lse_aa = similarity_lse(a, a, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_bb = similarity_lse(b, b, scale, rows=True, exclude_diagonal=0, backend=backend)
    lse_ab, lse_ba = similarity_lse(a, b, scale, rows=True, cols=True, exclude_diagonal=0, backend=backend)
    return dcl_from_lse(lse_aa, lse_ab, lse_bb, lse_ba, a, b, scale, dcl_weights(weight_fn, a, b), negatives)
