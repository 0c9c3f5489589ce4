"""Drop-in ``nn.Module`` losses: thin wrappers that check arguments and call the functional API."""
from typing import Optional

import torch
from torch import nn

from fastcl.losses.clip import clip_loss
from fastcl.losses.dcl import dcl_loss
from fastcl.losses.info_nce import info_nce
from fastcl.losses.ntxent import ntxent_loss
from fastcl.losses.siglip import siglip_loss
from fastcl.losses.supcon import CONTRAST_MODES, supcon_loss, supcon_loss_pml
from fastcl.validation import check_reduction, check_scalar


def _no_distributed(cls: str, gather_distributed: bool) -> None:
    if gather_distributed:
        raise NotImplementedError(f"{cls}(gather_distributed=True) is not implemented yet; "
                                  "use gather_distributed=False")


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``.

    ``forward(image_features (N, D), text_features (N, D), logit_scale (0-d, exponentiated),
    logit_bias=None, output_dict=False)`` returns the 0-d loss, or ``{"contrastive_loss": loss}``.
    The constructor takes open_clip's arguments; multi-process ones (world_size > 1) are not
    supported yet and raise NotImplementedError.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 label_smoothing: float = 0.0, backend: Optional[str] = None):
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
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias,
                         label_smoothing=self.label_smoothing, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(nn.Module):
    """InfoNCE as a module: ``forward(query (N, D), keys (M, D), positives=None) -> 0-d loss``.

    ``temperature`` is fixed unless ``learnable_temperature=True``, which makes it a parameter
    stored as log(1/T) (the CLIP parameterisation).
    """

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, exclude_self: bool = False,
                 reduction: str = "mean", learnable_temperature: bool = False, label_smoothing: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        check_reduction(reduction)
        self.label_smoothing = label_smoothing
        self.symmetric, self.exclude_self, self.reduction, self.backend = symmetric, exclude_self, reduction, backend
        if learnable_temperature:
            self.log_scale = nn.Parameter(torch.tensor(-float(torch.log(torch.tensor(float(temperature))))))
        else:
            self.log_scale = None
            self.temperature = float(temperature)

    def forward(self, query, keys, positives: Optional[torch.Tensor] = None):
        """query (N, D), keys (M, D) (M = N * g with hard negatives), positives (N,) int64 or None."""
        kw = dict(positives=positives, symmetric=self.symmetric, exclude_self=self.exclude_self,
                  reduction=self.reduction, label_smoothing=self.label_smoothing, backend=self.backend)
        if self.log_scale is not None:
            return info_nce(query, keys, logit_scale=self.log_scale.exp(), **kw)
        return info_nce(query, keys, temperature=self.temperature, **kw)


class NTXentLoss(nn.Module):
    """Drop-in for lightly's ``NTXentLoss`` (no memory bank, one process).

    ``forward(out0 (N, D), out1 (N, D)) -> 0-d loss``; see ``fastcl.losses.ntxent.ntxent_loss``.
    ``memory_bank_size > 0`` and ``gather_distributed=True`` raise NotImplementedError.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False, *,
                 backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        if memory_bank_size:
            raise NotImplementedError("NTXentLoss with a memory bank is not implemented; use memory_bank_size=0")
        _no_distributed("NTXentLoss", gather_distributed)
        self.temperature, self.backend = temperature, backend

    def forward(self, out0, out1):
        return ntxent_loss(out0, out1, self.temperature, backend=self.backend)


class DCLLoss(nn.Module):
    """Drop-in for lightly's ``DCLLoss``: ``forward(out0 (N, D), out1 (N, D)) -> 0-d loss``.

    ``weight_fn(a (N, D), b (N, D)) -> (N,)`` weights the positive term (DCLW);
    ``gather_distributed=True`` raises NotImplementedError.
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
        _no_distributed("DCLLoss", gather_distributed)
        self.temperature, self.weight_fn, self.backend = temperature, weight_fn, backend

    def forward(self, out0, out1):
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, backend=self.backend)


class SupConLoss(nn.Module):
    """Supervised contrastive loss; accepts both common calling forms.

    * SupContrast form: ``forward(features (bsz, n_views, D), labels=None (bsz,), mask=None
      (bsz, bsz))`` with ``temperature``, ``base_temperature`` and ``contrast_mode`` as in the
      reference implementation; features are not normalised.
    * pytorch-metric-learning form: ``forward(embeddings (N, D), labels (N,))`` (a 2-D first
      argument).  Embeddings are normalised, ``base_temperature`` and ``contrast_mode`` are not
      used, and the mean runs over anchors with a non-zero loss.  For a drop-in of PML's
      ``SupConLoss(temperature=0.1)`` construct ``SupConLoss(temperature=0.1)``.

    Returns a 0-d loss.  ``gather_distributed=True`` raises NotImplementedError.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all", base_temperature: float = 0.07, *,
                 gather_distributed: bool = False, backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        check_scalar("base_temperature", base_temperature, positive=True)
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
        _no_distributed("SupConLoss", gather_distributed)
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.backend = backend

    def forward(self, features, labels=None, mask=None):
        if isinstance(features, torch.Tensor) and features.dim() == 2:
            if mask is not None:
                raise ValueError("mask is only accepted with 3-D features (bsz, n_views, D)")
            if labels is None:
                raise ValueError("labels is required with 2-D embeddings (pytorch-metric-learning form)")
            return supcon_loss_pml(features, labels, self.temperature, backend=self.backend)
        return supcon_loss(features, labels, mask, self.temperature, self.base_temperature, self.contrast_mode,
                           backend=self.backend)


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` on one process.

    ``forward(image_features (N, D), text_features (N, D), logit_scale (0-d, exponentiated),
    logit_bias (0-d), output_dict=False)`` returns the 0-d loss or ``{"contrastive_loss": loss}``.
    ``world_size > 1`` raises NotImplementedError.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: Optional[str] = None,
                 *, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size), got {rank!r}")
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of None, 'bidir', 'shift', 'reduce', 'gather', got {dist_impl!r}")
        if world_size > 1:
            raise NotImplementedError("SigLipLoss across processes (world_size > 1) is not implemented yet")
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
