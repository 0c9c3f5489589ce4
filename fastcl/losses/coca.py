"""The captioning cross-entropy of open_clip's ``CoCaLoss`` (``fastcl.nn.CoCaLoss`` adds the CLIP
loss), in row blocks.

``nn.CrossEntropyLoss(ignore_index=pad_id)(logits.permute(0, 2, 1), labels)`` over (B, T, V)
vocabulary logits keeps a log-softmax of the logits' size, and under autocast an fp32 copy of
them and an fp32 gradient too: several times the logits themselves.  ``_TokenCrossEntropy``
walks row blocks of the (B * T, V) logits within the workspace bound, keeps one fp32 LSE per
token, and writes the gradient straight in the logits' dtype.
"""
import numbers

import torch

from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import autocast_off, compute_dtype, graph_grads
from fastcl.ops.strips import row_blocks
from fastcl.validation import _eager, check_float_tensor


def _block_bytes(dtype: torch.dtype) -> int:
    """Scratch per logit of a block: two temporaries of the compute dtype (a half block's upcast
    and its shifted copy; LSE's own shifted copy in the forward)."""
    return 2 * torch.finfo(compute_dtype(dtype)).bits // 8


def _token_ce_sum(logits, target, valid):
    """(sum over valid rows of LSE(row) - row[target], LSE (R,)), walking row blocks;
    differentiable PyTorch (the forward, and the backward under create_graph=True)."""
    ct = compute_dtype(logits.dtype)
    total, lses = torch.zeros((), dtype=ct, device=logits.device), []
    for r0, r1 in row_blocks(logits.shape[0], logits.shape[1], _block_bytes(logits.dtype)):
        x = logits[r0:r1].to(ct)
        lse = x.logsumexp(dim=1)
        per = lse - x.gather(1, target[r0:r1]).squeeze(1)
        total = total + torch.where(valid[r0:r1], per, 0.0).sum()
        lses.append(lse)
        del x
    lse = torch.cat(lses) if lses else logits.new_empty((0,), dtype=ct)
    # NaN anywhere gives NaN, padding included (PyTorch would skip a NaN padded token).
    return total + torch.where(torch.isnan(lse).any(), float("nan"), 0.0), lse


class _TokenCrossEntropy(torch.autograd.Function):
    """(sum over tokens with ``valid`` of ``LSE(logits_t) - logits_t[label_t]``, the target ids
    (R, 1) int64 (padding at 0), LSE (R,)): the sum 0-d in the compute dtype and differentiable in
    the (R, V) logits (twice too: under create_graph=True the backward differentiates a recomputed
    graph).  The target and LSE are for the backward (non-differentiable): outputs rather than ctx
    attributes, so that torch.func transforms (setup_context style, a per-sample vmap rule) take
    the Function.  It runs outside autocast, in the compute dtype."""

    @staticmethod
    def forward(logits, labels, valid):
        target = labels.masked_fill(~valid, 0)[:, None]
        with autocast_off(logits.device):
            total, lse = _token_ce_sum(logits, target, valid)
        return total, target, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _, valid = inputs
        _, target, lse = output
        ctx.mark_non_differentiable(target, lse)
        ctx.save_for_backward(logits, target, valid, lse)

    @staticmethod
    def backward(ctx, grad, _target, _lse):
        logits, target, valid, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (logits.view_as(logits),)
            with autocast_off(logits.device):
                total = _token_ce_sum(inputs[0], target, valid)[0]
            return graph_grads([total], [grad], inputs, ctx.needs_input_grad, 3)
        ct = lse.dtype
        out = torch.empty_like(logits)
        with autocast_off(logits.device):
            for r0, r1 in row_blocks(logits.shape[0], logits.shape[1], _block_bytes(logits.dtype)):
                p = (logits[r0:r1].to(ct) - lse[r0:r1, None]).exp_()
                p.scatter_add_(1, target[r0:r1], torch.full_like(lse[r0:r1, None], -1.0))
                p.mul_(torch.where(valid[r0:r1], grad, torch.zeros_like(grad))[:, None])
                out[r0:r1] = p  # the copy rounds to the logits' dtype
                del p
        return out, None, None


_TokenCrossEntropy.vmap = staticmethod(per_sample_vmap(_TokenCrossEntropy))


def check_pad_id(pad_id) -> int:
    """An integer token id (numpy integers too), returned as an int."""
    if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral):
        raise TypeError(f"pad_id must be an int, got {type(pad_id).__name__}")
    if not -2**63 <= pad_id < 2**63:  # compared with int64 token ids
        raise ValueError(f"pad_id must fit in int64, got {pad_id}")
    return int(pad_id)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``nn.CrossEntropyLoss(ignore_index=pad_id)(logits.permute(0, 2, 1), labels)``: the mean over
    tokens whose label is not ``pad_id`` of ``LSE(logits) - logit[label]``; NaN when every token is
    padding (as PyTorch gives; T = 0 too), with zero gradient.  NaN in any logit, a padded
    token's included, gives NaN (PyTorch skips padded tokens entirely).

    Args:
        logits: (B, T, V) float32, bfloat16, float16 or float64 vocabulary logits.
        labels: (B, T) integer token ids in [0, V) (``pad_id`` anywhere).
        pad_id: the ignored token id (open_clip's tokenizer pads with 0).

    Returns:
        0-d float32 tensor (float64 for float64 logits).
    """
    check_float_tensor("logits", logits, "(B, T, V)", non_empty=False)
    if logits.shape[2] == 0:
        raise ValueError("logits must have a vocabulary of at least one entry, got shape (B, T, 0)")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (B, T) to match logits "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device}, got {labels.device}")
    pad_id = check_pad_id(pad_id)
    flat = labels.reshape(-1).long()
    valid = flat != pad_id
    vocab = logits.shape[2]
    outside = valid & ((flat < 0) | (flat >= vocab))
    if _eager() and bool(outside.any()):
        bad = flat[outside]
        raise ValueError(f"labels must lie in [0, {vocab}) (the vocabulary, logits.shape[2]) or equal pad_id="
                         f"{pad_id}, got {int(bad[0])}")
    total = _TokenCrossEntropy.apply(logits.reshape(-1, vocab), flat, valid)[0]
    return total / valid.sum().to(total.dtype)

