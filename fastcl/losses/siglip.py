"""SigLIP loss with open_clip ``SigLipLoss`` semantics, on the fused ``sigmoid_pair_loss`` op."""
from typing import Optional

import torch

from fastcl.ops.sigmoid_pair import sigmoid_pair_loss
from fastcl.validation import check_pair, check_scalar


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """``-logsigmoid(z * (s * I @ T.T + b)).sum() / N``, z = +1 on matching pairs (diagonal), -1 elsewhere.

    Equals open_clip's ``SigLipLoss`` on one process (features are not normalised here), in
    value and in the gradients of both feature sets, ``logit_scale`` and ``logit_bias``, without
    storing the N x M logits.

    Args:
        image_features: (N, D) float32, bfloat16, float16 or float64.
        text_features: (M, D), M >= N, same dtype and device; texts past N are negatives for every
            image (fewer texts than images is refused: image i's positive is text i).
        logit_scale: positive float or 0-d tensor, already exponentiated (open_clip convention).
        logit_bias: float, 0-d tensor, or None for no bias (as open_clip).
        backend: see ``fastcl.ops.sigmoid_pair_loss``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    check_pair("image_features", image_features, "text_features", text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    if m < n:
        raise ValueError(f"text_features has {m} rows but image_features has {n}: image i's positive is text i, "
                         "so every image needs its text (texts past N are extra negatives)")
    logit_scale = check_scalar("logit_scale", logit_scale, positive=True, device=image_features.device)
    if logit_bias is not None:
        logit_bias = check_scalar("logit_bias", logit_bias, device=image_features.device)
    total = sigmoid_pair_loss(image_features, text_features, logit_scale, 0.0 if logit_bias is None else logit_bias,
                              backend=backend)
    return total / image_features.shape[0]
