"""CLIP loss with distillation from a fixed teacher, as open_clip's ``DistillClipLoss``, in bounded memory.

open_clip adds to the CLIP loss ``-(softmax(teacher logits) * log_softmax(student logits)).sum(1).mean()``
for both directions.  As each teacher row sums to 1, a row's term is the student's LSE minus
``s * q_i . (sum_j P_ij k_j)``, P the teacher's softmax, written as the contrastive row term
``LSE_i - s q_i . k_i`` minus ``s * q_i . (sum_j (P - I)_ij k_j)`` so that the two large parts
cancel before rounding (a student equal to its teacher gives 0, not a rounding step of the largest
logit).  The LSEs come from the fused op (the same call as the contrastive part); the weighted sums
come from ``_TeacherWeighted``, which walks row blocks of (P - I) and keeps none of them: memory
O(block x N), not N x N.
"""
from typing import Optional, Tuple

import torch

from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import apply_function, autocast_off, compute_dtype, scalar_tensor
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.ops.strips import row_blocks
from fastcl.validation import check_pair, check_scalar


def _teacher_weights(qt: torch.Tensor, ktc: torch.Tensor, scale_t: torch.Tensor, r0: int, r1: int, ct):
    """Rows [r0, r1) of P - I, P = softmax_j(scale_t * qt_i . kt_j); ``ktc`` is kt in ``ct``."""
    w = torch.softmax((qt[r0:r1].to(ct) @ ktc.T) * scale_t, dim=1)
    w.diagonal(offset=r0).sub_(1.0)
    return w


class _TeacherWeighted(torch.autograd.Function):
    """r_i = q_i . sum_j (P - I)_ij k_j with P = softmax_j(scale_t * qt_i . kt_j), (N,) in the
    compute dtype; differentiable in q and k (the teacher qt, kt, scale_t is fixed).  The backward
    is linear in q, k and the incoming gradient, so under create_graph=True its own ops form the
    second derivative.  It runs outside autocast: the blocks stay in the compute dtype in both
    passes, so under autocast the gradient is still that of the value.  setup_context style with a
    per-sample vmap rule, so torch.func transforms (grad, vmap and their nestings) take it."""

    @staticmethod
    def forward(q, k, qt, kt, scale_t):
        ct = compute_dtype(q.dtype)
        with autocast_off(q.device):
            kc, ktc = k.to(ct), kt.to(ct)
            out = torch.empty(q.shape[0], dtype=ct, device=q.device)
            for r0, r1 in row_blocks(q.shape[0], k.shape[0]):
                w = _teacher_weights(qt, ktc, scale_t, r0, r1, ct)
                out[r0:r1] = (q[r0:r1].to(ct) * (w @ kc)).sum(1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        q, k, qt, kt, scale_t = ctx.saved_tensors
        ct = g.dtype
        need_q, need_k = ctx.needs_input_grad[:2]
        # Out of place: under vmap(grad) these are batched tensors, which cannot be written into a
        # plain buffer.
        gq, gk = [], torch.zeros(k.shape, dtype=ct, device=k.device) if need_k else None
        with autocast_off(q.device):
            kc, ktc = k.to(ct), kt.to(ct)
            for r0, r1 in row_blocks(q.shape[0], k.shape[0]):
                w = _teacher_weights(qt, ktc, scale_t, r0, r1, ct)
                if need_q:
                    gq.append(g[r0:r1, None] * (w @ kc))
                if need_k:
                    gk = gk + w.T @ (g[r0:r1, None] * q[r0:r1].to(ct))
        if need_q:
            gq = torch.cat(gq).to(q.dtype) if gq else torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        return (gq if need_q else None, None if gk is None else gk.to(k.dtype), None, None, None)


_TeacherWeighted.vmap = staticmethod(per_sample_vmap(_TeacherWeighted))


def distill_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                      dist_image_features: torch.Tensor, dist_text_features: torch.Tensor, dist_logit_scale, *,
                      backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(contrastive_loss, distill_loss)`` of open_clip's ``DistillClipLoss`` on one process.

    ``contrastive_loss`` is the CLIP loss of the student, ``(CE(s I T^T) + CE(s T I^T)) / 2``;
    ``distill_loss`` is ``(H(P_I, S_I) + H(P_T, S_T)) / 2``, the mean over rows of the
    cross-entropy between the teacher's softmax P (``dist_logit_scale * I' T'^T``, and its
    transpose) and the student's log-softmax.  Features are not normalised here.  The teacher is
    fixed, as in open_clip's training (its features come from a frozen model under no_grad): its
    tensors must not require grad.

    Args:
        image_features, text_features: (N, D) student features, float32/bfloat16/float16/float64,
            same dtype and device.
        logit_scale: positive float or 0-d tensor (exponentiated; may require grad).
        dist_image_features, dist_text_features: (N, D') teacher features (D' may differ from D;
            any float dtype), on the student's device, not requiring grad.
        dist_logit_scale: positive float or 0-d tensor, not requiring grad.
        backend: see ``fastcl.ops.similarity_lse`` (the student's LSEs).

    Returns:
        Two 0-d tensors, float32 (float64 for float64 inputs).
    """
    check_pair("image_features", image_features, "text_features", text_features)
    check_pair("dist_image_features", dist_image_features, "dist_text_features", dist_text_features)
    logit_scale = check_scalar("logit_scale", logit_scale, positive=True, device=image_features.device)
    dist_logit_scale = check_scalar("dist_logit_scale", dist_logit_scale, positive=True, device=image_features.device)
    n = image_features.shape[0]
    if text_features.shape[0] != n or dist_image_features.shape[0] != n or dist_text_features.shape[0] != n:
        raise ValueError("image_features, text_features, dist_image_features and dist_text_features must have the "
                         f"same number of rows, got {image_features.shape[0]}, {text_features.shape[0]}, "
                         f"{dist_image_features.shape[0]} and {dist_text_features.shape[0]}")
    if dist_image_features.device != image_features.device:
        raise ValueError(f"dist_image_features must be on {image_features.device}, got {dist_image_features.device}")
    for name, t in (("dist_image_features", dist_image_features), ("dist_text_features", dist_text_features),
                    ("dist_logit_scale", dist_logit_scale)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} must not require grad: the teacher is fixed (open_clip computes its "
                             "features under torch.no_grad); detach it")
    ct = compute_dtype(image_features.dtype)
    row, col, pos = similarity_lse(image_features, text_features, logit_scale, rows=True, cols=True, positives=True,
                                   backend=backend)
    contrastive = 0.5 * ((row - pos).mean() + (col - pos).mean())
    scale_t = scalar_tensor(dist_logit_scale, image_features.device, ct, "dist_logit_scale")
    weighted_i = apply_function(_TeacherWeighted, image_features, text_features, dist_image_features,
                                dist_text_features, scale_t)
    weighted_t = apply_function(_TeacherWeighted, text_features, image_features, dist_text_features,
                                dist_image_features, scale_t)
    distill = 0.5 * ((row - pos - logit_scale * weighted_i).mean() + (col - pos - logit_scale * weighted_t).mean())
    return contrastive, distill
