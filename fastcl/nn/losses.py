"""Drop-in ``nn.Module`` losses: thin wrappers that check arguments and call the functional API."""
from typing import Optional

import torch
from torch import nn

from fastcl.losses import clip_loss, info_nce
from fastcl.validation import check_reduction, check_scalar


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``.

    ``forward(image_features (N, D), text_features (N, D), logit_scale (0-d, exponentiated),
    logit_bias=None, output_dict=False)`` returns the 0-d loss, or ``{"contrastive_loss": loss}``.
    The constructor takes open_clip's arguments; multi-process ones (world_size > 1) are not
    supported yet and raise NotImplementedError.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size), got {rank!r}")
        if world_size > 1 or use_horovod:
            raise NotImplementedError("ClipLoss across processes (world_size > 1, use_horovod) is not "
                                      "implemented yet; use world_size=1")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(nn.Module):
    """InfoNCE as a module: ``forward(query (N, D), keys (M, D), positives=None) -> 0-d loss``.

    ``temperature`` is fixed unless ``learnable_temperature=True``, which makes it a parameter
    stored as log(1/T) (the CLIP parameterisation).
    """

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, exclude_self: bool = False,
                 reduction: str = "mean", learnable_temperature: bool = False, backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        check_reduction(reduction)
        self.symmetric, self.exclude_self, self.reduction, self.backend = symmetric, exclude_self, reduction, backend
        if learnable_temperature:
            self.log_scale = nn.Parameter(torch.tensor(-float(torch.log(torch.tensor(float(temperature))))))
        else:
            self.log_scale = None
            self.temperature = float(temperature)

    def forward(self, query, keys, positives: Optional[torch.Tensor] = None):
        kw = dict(positives=positives, symmetric=self.symmetric, exclude_self=self.exclude_self,
                  reduction=self.reduction, backend=self.backend)
        if self.log_scale is not None:
            return info_nce(query, keys, logit_scale=self.log_scale.exp(), **kw)
        return info_nce(query, keys, temperature=self.temperature, **kw)
