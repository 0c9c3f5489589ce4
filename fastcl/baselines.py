"""Naive PyTorch versions of the fused ops: they materialise every matrix.

These are the single copy of the baselines that ``fastcl bench`` and ``benchmarks/`` time the
fused kernels against.  They are written for clarity, the way a user would write them first.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def naive_clip(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
               logit_bias=None) -> torch.Tensor:
    """Symmetric CLIP cross-entropy as open_clip computes it: both (N, N) logit matrices are
    formed by their own matmul and stored.

    image_features, text_features: (N, D) float; logit_scale: float or 0-d tensor (exponentiated).
    Returns a 0-d tensor in the input dtype.
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def naive_info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE with positives on the diagonal: query (N, D), keys (M >= N, D) float -> 0-d."""
    logits = query @ keys.T / temperature
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def naive_ntxent(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over 2N normalised views with the (2N, 2N) similarity stored.

    out0, out1: (N, D) float (normalised here) -> 0-d mean over the 2N anchors.
    """
    n = out0.shape[0]
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(sim, target)


def naive_supcon(features: torch.Tensor, labels: Optional[torch.Tensor] = None, temperature: float = 0.07,
                 base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss ("all" contrast mode) computed the way the SupContrast
    reference does: float (V*B, V*B) positive and self masks, max-shifted logits, exp, log-sum.

    features: (B, V, D) float, normalised rows; labels: optional (B,) int64 (None = each sample
    its own class, i.e. SimCLR).  Returns the 0-d mean over the V*B anchors.
    """
    b, v, _ = features.shape
    z = torch.cat(features.unbind(1))  # view-major (V*B, D)
    if labels is None:
        labels = torch.arange(b, device=z.device)
    lab = labels.repeat(v)
    n = v * b
    mask = torch.eq(lab[:, None], lab[None, :]).to(z.dtype)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, device=z.device, dtype=z.dtype)
    mask = mask * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    n_pos = mask.sum(1)
    mean_pos = (mask * log_prob).sum(1) / torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    return -(temperature / base_temperature) * mean_pos.mean()


def naive_random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor,
                         pos_embed: Optional[torch.Tensor] = None):
    """MAE's ``random_masking`` recipe, literally: ``x + pos_embed`` materialised, argsort the
    noise, and gather with a repeated (B, K, D) int64 index.

    x: (B, L, D) float; noise: (B, L) float; pos_embed: optional (L, D) or (1, L, D).  Returns
    (x_kept (B, K, D), mask (B, L) float32 with 1 = removed, ids_restore (B, L) int64,
    ids_keep (B, K) int64), K = int(L * (1 - mask_ratio)).
    """
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, *pos_embed.shape[-2:])
    b, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore, ids_keep


def naive_siglip(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                 logit_bias) -> torch.Tensor:
    """Sigmoid loss ``-sum log sigmoid(z * (s I T^T + b)) / N`` with the (N, N) logits stored.

    image_features, text_features: (N, D) float; z = +1 on the diagonal, -1 elsewhere.  0-d.
    """
    logits = logit_scale * image_features @ text_features.T + logit_bias
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


def naive_dcl(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Decoupled contrastive loss as lightly (>= 1.5.21) writes it, both directions averaged.

    out0, out1: (N, D) float, normalised here.  For anchor a_i the loss is
    -s(a_i, b_i) + LSE over the union {s(a_i, a_j), s(a_i, b_j) : j != i}: the negatives of both
    views, concatenated, with the positive left out.
    """
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)

    def one_way(x, y):
        negatives = torch.cat([(x @ x.T / temperature).masked_fill(eye, float("-inf")),
                               (x @ y.T / temperature).masked_fill(eye, float("-inf"))], dim=1)
        return (torch.logsumexp(negatives, dim=1) - (x * y).sum(1) / temperature).mean()
    return 0.5 * (one_way(a, b) + one_way(b, a))


def naive_hypersphere(z_a: torch.Tensor, z_b: torch.Tensor, t: float = 1.0, lam: float = 1.0,
                      alpha: float = 2.0) -> torch.Tensor:
    """lightly's HypersphereLoss as it computes it: the uniformity through ``torch.pdist``'s
    N (N - 1) / 2 distances.  z_a, z_b: (N, D) float -> 0-d in their dtype."""
    x, y = F.normalize(z_a), F.normalize(z_b)
    align = (x - y).norm(dim=1).pow(alpha).mean()

    def uniformity(v):
        return torch.pdist(v, p=2).pow(2).mul(-t).exp().mean().log()
    return align + lam * (uniformity(x) + uniformity(y)) / 2.0
