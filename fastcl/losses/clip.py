"""CLIP loss with open_clip ``ClipLoss`` semantics, fused."""
from typing import Optional

import torch

from fastcl.losses._common import check_label_smoothing, mean_logits, reduce_loss, smoothed_ce
from fastcl.ops.reference import take_rows
from fastcl.ops.similarity_lse import similarity_lse, similarity_lse_with_index
from fastcl.validation import check_index, check_pair, check_reduction, check_scalar


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
              logit_bias=None, *, labels: Optional[torch.Tensor] = None, reduction: str = "mean",
              label_smoothing: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Symmetric CLIP cross-entropy: ``(CE(s I T^T + b, y) + CE(s T I^T + b, y)) / 2``.

    Equals open_clip's ``ClipLoss`` (features are not normalised here) in value and gradient,
    including the gradient of ``logit_scale``, without storing the N x M logits.

    Args:
        image_features: (N, D) float32, bfloat16, float16 or float64 tensor.
        text_features: (M, D), same dtype/device; M == N unless ``labels`` is given.
        logit_scale: positive float or 0-d tensor, already exponentiated (open_clip convention).
        logit_bias: optional float or 0-d tensor added to every logit.
        labels: optional (N,) int64, the positive text column of each image (M >= N layouts with
            hard negatives).  The text->image term covers the labelled columns.
        reduction: "mean", "sum" or "none" (per-image losses (N,)).
        label_smoothing: in [0, 1], as ``F.cross_entropy(..., label_smoothing=...)`` in both
            directions: image rows smooth over the M texts, text columns over the N images.
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (N,) for ``reduction="none"``.
    """
    check_pair("image_features", image_features, "text_features", text_features)
    logit_scale = check_scalar("logit_scale", logit_scale, positive=True, device=image_features.device)
    if logit_bias is not None:
        logit_bias = check_scalar("logit_bias", logit_bias, device=image_features.device)
    check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    n, m = image_features.shape[0], text_features.shape[0]
    diagonal = labels is None
    if labels is None:
        if m != n:
            raise ValueError(f"text_features has {m} rows but image_features has {n}; "
                             "fastcl.clip_loss(..., labels=...) takes layouts with extra (hard-negative) texts")
        labels = torch.arange(n, device=image_features.device)
    else:
        labels = check_index("labels", labels, (n,), m, image_features.device)
    # The positives' gradient folds into the op's backward: no extra (N, D) buffers.
    if diagonal:
        row_lse, col_lse, pos = similarity_lse(image_features, text_features, logit_scale, logit_bias, rows=True,
                                               cols=True, positives=True, backend=backend)
    else:  # labels were range-checked above: not again (each check waits for the device)
        row_lse, col_lse, pos = similarity_lse_with_index(image_features, text_features, logit_scale, logit_bias,
                                                          rows=True, cols=True, index=labels, backend=backend)
    row_mean = col_mean = None
    if label_smoothing > 0.0:
        row_mean = mean_logits(image_features, text_features, logit_scale, logit_bias)
        col_mean = take_rows(mean_logits(text_features, image_features, logit_scale, logit_bias), labels)
    per_sample = 0.5 * (smoothed_ce(row_lse, pos, row_mean, label_smoothing)
                        + smoothed_ce(col_lse if diagonal else take_rows(col_lse, labels), pos, col_mean,
                                      label_smoothing))
    return reduce_loss(per_sample, reduction)
