"""Drop-in ``nn.Module`` losses: thin wrappers that check arguments and call the functional API."""
from functools import partial
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastcl.losses.clip import clip_loss
from fastcl.losses.coca import caption_loss, check_pad_id
from fastcl.distributed import group_info, is_distributed
from fastcl.losses.dcl import check_negatives, dcl_loss, negative_mises_fisher_weights
from fastcl.losses.distill import distill_clip_loss
from fastcl.losses.hypersphere import hypersphere_loss
from fastcl.losses.distributed import (SIGLIP_ALIASES, clip_loss_distributed, dcl_loss_distributed,
                                       ntxent_loss_distributed, resolve_dist_impl, siglip_loss_distributed,
                                       supcon_loss_distributed)
from fastcl.losses.info_nce import info_nce
from fastcl.losses.macl import check_macl_args, macl_loss
from fastcl.losses.ntxent import l2_normalize, ntxent_bank_loss, ntxent_loss
from fastcl.losses.siglip import siglip_loss
from fastcl.losses.supcon import CONTRAST_MODES, supcon_loss, supcon_loss_pml
from fastcl.nn.memory_bank import MemoryBank
from fastcl.validation import check_reduction, check_scalar, check_views


def _check_rank(rank, world_size) -> None:
    """open_clip's ``rank`` / ``world_size`` constructor arguments: ints, 0 <= rank < world_size."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size), got {rank!r}")


def _check_world(cls: str, rank: int, world_size: int, group) -> Optional[ValueError]:
    """The module's rank/world_size must describe ``group`` of an initialised torch.distributed.

    A mismatch (a rank argument left at 0 on every process, say) is returned, not raised: the
    distributed loss publishes it, so the ranks where it holds raise too instead of waiting."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"{cls}(world_size={world_size}) needs torch.distributed initialised "
                           "(torch.distributed.init_process_group) before the forward")
    g_rank, g_world = group_info(group)
    if (g_rank, g_world) != (rank, world_size):
        return ValueError(f"{cls}: rank={rank}, world_size={world_size} do not match the process group "
                          f"(rank {g_rank} of {g_world})")
    return None


class ClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``.

    ``forward(image_features (N, D), text_features (N, D), logit_scale (0-d, exponentiated),
    logit_bias=None, output_dict=False)`` returns the 0-d loss, or ``{"contrastive_loss": loss}``.
    The first five constructor arguments have open_clip's meaning.  With ``world_size > 1``
    (torch.distributed initialised, ``rank``/``world_size`` those of ``group``) the negatives come
    from every rank: ``dist_impl="gather"`` all-gathers the features (open_clip's behaviour, including
    ``gather_with_grad=False``), ``dist_impl="ring"`` passes text shards around a ring with
    O(N * D) remote memory per rank (needs ``gather_with_grad=True``).  ``cache_labels`` is
    accepted and has no effect (no label tensor is built).  Horovod is not supported.
    See ``fastcl.losses.distributed.clip_loss_distributed``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, dist_impl: str = "gather",
                 group=None, label_smoothing: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        _check_rank(rank, world_size)
        if use_horovod:
            raise NotImplementedError("ClipLoss(use_horovod=True) is not supported; use torch.distributed")
        self.dist_impl = resolve_dist_impl(dist_impl)
        if self.dist_impl == "ring" and world_size > 1 and not gather_with_grad:
            raise ValueError("ClipLoss(dist_impl='ring') needs gather_with_grad=True: the ring always sends "
                             "gradients to the remote shards")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.group, self.backend = rank, world_size, group, backend
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        """image_features, text_features: (N, D) float32, bfloat16, float16 or float64, same dtype and device,
        not normalised here.  logit_scale: positive float or 0-d floating tensor, already exponentiated;
        logit_bias: optional float or 0-d tensor added to every logit.  Returns a 0-d float32 tensor (float64
        for float64 inputs), this rank's loss with ``world_size > 1``; ``{"contrastive_loss": loss}`` with
        ``output_dict``."""
        if self.world_size > 1:
            err = _check_world(type(self).__name__, self.rank, self.world_size, self.group)
            loss = clip_loss_distributed(image_features, text_features, logit_scale, logit_bias,
                                         local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                                         dist_impl=self.dist_impl, group=self.group,
                                         label_smoothing=self.label_smoothing, backend=self.backend, local_error=err)
        else:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias,
                             label_smoothing=self.label_smoothing, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id=0, ...)``:
    ``forward(image_features (N, D), text_features (N, D), logits (B, T, V), labels (B, T),
    logit_scale, output_dict=False)`` returns ``(clip_loss_weight * clip_loss, caption_loss_weight *
    caption_loss)``, or a dict with keys ``contrastive_loss`` and ``caption_loss``.  The other
    constructor arguments are ``ClipLoss``'s (so the CLIP term works across ranks); the caption
    cross-entropy is local and runs in row blocks (``fastcl.losses.coca.caption_loss``)."""

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_scalar("caption_loss_weight", caption_loss_weight)
        check_scalar("clip_loss_weight", clip_loss_weight)
        self.caption_loss_weight, self.clip_loss_weight = caption_loss_weight, clip_loss_weight
        self.pad_id = check_pad_id(pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict: bool = False):
        """image_features, text_features: (N, D) float32, bfloat16, float16 or float64, same dtype and device;
        logits: (B, T, V) vocabulary logits, float32, bfloat16, float16 or float64; labels: (B, T) integer token
        ids in [0, V), ``pad_id`` ignored; logit_scale: positive float or 0-d tensor, already exponentiated.
        Returns ``(contrastive, caption)``, each weighted and 0-d float32 (float64 for float64 features, resp.
        logits), or ``{"contrastive_loss": ..., "caption_loss": ...}`` with ``output_dict``.  With
        ``clip_loss_weight=0`` the contrastive term is an int64 0 on the logits' device (as open_clip)."""
        clip_w, caption_w = self.clip_loss_weight, self.caption_loss_weight
        if isinstance(logits, torch.Tensor):  # 0-d weights on the inputs' device or the CPU
            clip_w = check_scalar("clip_loss_weight", clip_w, device=logits.device)
            caption_w = check_scalar("caption_loss_weight", caption_w, device=logits.device)
        if self.clip_loss_weight:
            contrastive = clip_w * super().forward(image_features, text_features, logit_scale)
        else:
            contrastive = torch.tensor(0, device=logits.device)
        caption = caption_loss(logits, labels, self.pad_id) * caption_w
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption


class DistillClipLoss(ClipLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss`` on one process: ``forward(image_features,
    text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    output_dict=False)`` returns ``(contrastive_loss, distill_loss)``, or a dict with those keys.
    The teacher (``dist_*``) is fixed and must not require grad; see
    ``fastcl.losses.distill.distill_clip_loss``.  ``world_size > 1`` is not supported yet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.world_size > 1:
            raise NotImplementedError("DistillClipLoss(world_size > 1) is not supported; it runs on one process")
        if self.label_smoothing:
            raise ValueError("DistillClipLoss takes no label_smoothing (open_clip's has none)")

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        """image_features, text_features: (N, D) student features, float32, bfloat16, float16 or float64, same
        dtype and device; logit_scale: positive float or 0-d tensor, exponentiated.  dist_image_features,
        dist_text_features: (N, D') teacher features of one of those dtypes (the two alike), on the student's
        device, not requiring grad; dist_logit_scale: positive float or 0-d tensor, not requiring grad.
        Returns ``(contrastive_loss, distill_loss)``, each a 0-d float32 tensor (float64 for float64 student
        features), or a dict with those keys with ``output_dict``."""
        contrastive, distill = distill_clip_loss(image_features, text_features, logit_scale, dist_image_features,
                                                 dist_text_features, dist_logit_scale, backend=self.backend)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class HypersphereLoss(nn.Module):
    """Drop-in for lightly's ``HypersphereLoss(t=1.0, lam=1.0, alpha=2.0)``: ``forward(z_a (N, D),
    z_b (N, D))`` returns the 0-d alignment plus ``lam`` times the mean uniformity of the two
    views, without lightly's N (N - 1) / 2 pairwise distances (see
    ``fastcl.losses.hypersphere.hypersphere_loss``)."""

    def __init__(self, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *, backend: Optional[str] = None):
        super().__init__()
        check_scalar("t", t, positive=True)
        check_scalar("lam", lam)
        check_scalar("alpha", alpha, positive=True)
        self.t, self.lam, self.alpha, self.backend = t, lam, alpha, backend

    def forward(self, z_a, z_b):
        """z_a, z_b: (N, D) float32, bfloat16, float16 or float64, same dtype and device (L2-normalised here);
        row i of each is a view of sample i.  Returns a 0-d float32 tensor (float64 for float64 inputs); NaN
        for one sample, as lightly."""
        return hypersphere_loss(z_a, z_b, self.t, self.lam, self.alpha, backend=self.backend)


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
            self.temperature = temperature  # a tensor keeps its autograd graph, as NTXentLoss does

    def forward(self, query, keys, positives: Optional[torch.Tensor] = None):
        """query: (N, D) float32, bfloat16, float16 or float64, not normalised here; keys: (M, D), same dtype
        and device (M = N * g with hard negatives); positives: optional (N,) int64, int32, int16, int8 or uint8
        index of each query's positive key, default ``arange(N)``.  Returns a 0-d float32 tensor (float64 for
        float64 inputs), or the (N,) per-query losses with ``reduction="none"``."""
        kw = dict(positives=positives, symmetric=self.symmetric, exclude_self=self.exclude_self,
                  reduction=self.reduction, label_smoothing=self.label_smoothing, backend=self.backend)
        if self.log_scale is not None:
            return info_nce(query, keys, logit_scale=self.log_scale.exp(), **kw)
        return info_nce(query, keys, temperature=self.temperature, **kw)


class NTXentLoss(nn.Module):
    """Drop-in for lightly's ``NTXentLoss``: ``forward(out0 (N, D), out1 (N, D)) -> 0-d loss``.

    Without a memory bank, see ``fastcl.losses.ntxent.ntxent_loss``.  With ``gather_distributed=True``
    and more than one rank in ``group`` the negatives come from every rank (lightly's semantics;
    ``dist_impl`` "gather" or "ring"), see ``fastcl.losses.distributed.ntxent_loss_distributed``.

    ``memory_bank_size`` (``(num_features, dim)``, or an int with the dim taken from the first
    batch) > 0 gives lightly's MoCo form: the anchors are ``out0`` only, their negatives the bank
    (``fastcl.nn.memory_bank.MemoryBank``) as it was before the call, and then the normalised
    ``out1`` is enqueued when ``out0`` requires grad (so evaluation leaves the bank alone); see
    ``fastcl.losses.ntxent.ntxent_bank_loss``.  With ``gather_distributed`` every rank enqueues
    all ranks' ``out1``.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, dist_impl: str = "gather", group=None,
                 backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed, group=group)
        self.temperature, self.backend = temperature, backend
        self.gather_distributed, self.dist_impl, self.group = gather_distributed, resolve_dist_impl(dist_impl), group

    def forward(self, out0, out1):
        """out0, out1: (N, D) float32, bfloat16, float16 or float64, same dtype and device (L2-normalised here);
        row i of each is the other's positive.  With a memory bank the anchors are ``out0`` only and ``out1`` is
        enqueued when ``out0`` requires grad.  Returns a 0-d float32 tensor (float64 for float64 inputs); with
        ``gather_distributed`` over several ranks, this rank's loss."""
        if self.memory_bank.enabled:
            err = None
            try:
                check_views(out0, out1)
            except (TypeError, ValueError) as e:  # published to the other ranks by the bank's enqueue
                err = e
            update = isinstance(out0, torch.Tensor) and out0.requires_grad
            negatives = self.memory_bank(l2_normalize(out1) if err is None else out1, update=update, local_error=err)
            return ntxent_bank_loss(out0, out1, negatives, self.temperature, backend=self.backend)
        if self.gather_distributed and is_distributed(self.group):
            return ntxent_loss_distributed(out0, out1, self.temperature, dist_impl=self.dist_impl,
                                           group=self.group, backend=self.backend)
        return ntxent_loss(out0, out1, self.temperature, backend=self.backend)


class DirectCLRLoss(NTXentLoss):
    """Drop-in for lightly's ``DirectCLRLoss``: ``NTXentLoss`` on the first ``loss_dim`` features
    of each (flattened) output, for use on the encoding without a projection head."""

    def __init__(self, loss_dim: int = 64, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, dist_impl: str = "gather", group=None,
                 backend: Optional[str] = None):
        if isinstance(loss_dim, bool) or not isinstance(loss_dim, int) or loss_dim < 1:
            raise ValueError(f"loss_dim must be a positive int, got {loss_dim!r}")
        super().__init__(temperature, memory_bank_size, gather_distributed, dist_impl=dist_impl, group=group,
                         backend=backend)
        self.loss_dim = loss_dim

    def forward(self, out0, out1):
        """out0, out1: (N, ...) float32, bfloat16, float16 or float64 outputs, same dtype and device, flattened
        to (N, F) and cut to their first ``loss_dim`` features; then as ``NTXentLoss.forward``.  Returns a 0-d
        float32 tensor (float64 for float64 inputs)."""
        # (1-D outputs go on as they are, to the argument checks, which publish their error
        # to the other ranks under gather_distributed)
        if isinstance(out0, torch.Tensor) and isinstance(out1, torch.Tensor) and out0.dim() >= 2 and out1.dim() >= 2:
            out0 = out0.flatten(start_dim=1)[:, :self.loss_dim]
            out1 = out1.flatten(start_dim=1)[:, :self.loss_dim]
        return super().forward(out0, out1)


class DCLLoss(nn.Module):
    """Drop-in for lightly's ``DCLLoss``: ``forward(out0 (N, D), out1 (N, D)) -> 0-d loss``.

    ``weight_fn(a (N, D), b (N, D)) -> (N,)`` weights the positive term (DCLW).  The default
    ``negatives="union"`` (one log-sum-exp over both views' negatives) matches lightly >= 1.5.21;
    ``negatives="separate"`` (one per view, added) matches lightly <= 1.5.20.  With
    ``gather_distributed=True`` and more than one rank in ``group`` the negatives come from every
    rank (lightly's semantics; ``dist_impl`` "gather" or "ring"), see
    ``fastcl.losses.distributed.dcl_loss_distributed``; on one process it is the plain loss.
    See ``fastcl.losses.dcl.dcl_loss``.
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 negatives: str = "union", dist_impl: str = "gather", group=None, backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
        check_negatives(negatives)
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this build lacks")
        self.temperature, self.weight_fn, self.negatives, self.backend = temperature, weight_fn, negatives, backend
        self.gather_distributed, self.dist_impl, self.group = gather_distributed, resolve_dist_impl(dist_impl), group

    def forward(self, out0, out1):
        """out0, out1: (N, D) float32, bfloat16, float16 or float64, same dtype and device (L2-normalised here);
        row i of each is the other's positive.  Returns a 0-d float32 tensor (float64 for float64 inputs); with
        ``gather_distributed`` over several ranks, this rank's loss."""
        if self.gather_distributed and is_distributed(self.group):
            return dcl_loss_distributed(out0, out1, self.temperature, self.weight_fn, negatives=self.negatives,
                                        dist_impl=self.dist_impl, group=self.group, backend=self.backend)
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, negatives=self.negatives,
                        backend=self.backend)


class DCLWLoss(DCLLoss):
    """Drop-in for lightly's ``DCLWLoss``: ``DCLLoss`` whose positive term is weighted by
    ``fastcl.losses.dcl.negative_mises_fisher_weights`` with ``sigma`` (no gradient through the
    weights).  ``forward(out0 (N, D), out1 (N, D)) -> 0-d loss``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 negatives: str = "union", dist_impl: str = "gather", group=None, backend: Optional[str] = None):
        check_scalar("sigma", sigma, positive=True)
        super().__init__(temperature, partial(negative_mises_fisher_weights, sigma=sigma), gather_distributed,
                         negatives=negatives, dist_impl=dist_impl, group=group, backend=backend)
        self.sigma = sigma


class MACLLoss(nn.Module):
    """Drop-in for lightly's ``MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)``:
    ``forward(z0 (N, D), z1 (N, D)) -> 0-d loss``; see ``fastcl.losses.macl.macl_loss``."""

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *,  # noqa: N803 (lightly's name)
                 backend: Optional[str] = None):
        super().__init__()
        check_macl_args(temperature, alpha, A_0, "A_0")
        self.temperature, self.alpha, self.A_0, self.backend = temperature, alpha, A_0, backend

    def forward(self, z0, z1):
        """z0, z1: (N, D) float32, bfloat16, float16 or float64, same dtype and device (L2-normalised here);
        row i of each is the other's positive.  Returns a 0-d float32 tensor (float64 for float64 inputs); 0
        for one sample, as lightly."""
        return macl_loss(z0, z1, self.temperature, self.alpha, self.A_0, backend=self.backend)


class SupConLoss(nn.Module):
    """Supervised contrastive loss; accepts both common calling forms.

    * SupContrast form: ``forward(features (bsz, n_views, D), labels=None (bsz,), mask=None
      (bsz, bsz))`` with ``temperature``, ``base_temperature`` and ``contrast_mode`` as in the
      reference implementation; features are not normalised.
    * pytorch-metric-learning form: ``forward(embeddings (N, D), labels (N,), indices_tuple=None,
      ref_emb=None (M, D), ref_labels=None (M,))`` (a 2-D first argument; the references by
      keyword).  Embeddings are normalised, ``base_temperature`` and ``contrast_mode`` are not
      used, and the mean runs over anchors with a non-zero loss.  ``indices_tuple`` is a miner's
      pairs (a1, p, a2, n) or triplets (a, p, n); with it the (N, M) matrix is formed, as in PML.
      For a drop-in of PML's ``SupConLoss(temperature=0.1)`` construct ``SupConLoss(temperature=0.1)``.

    Returns a 0-d loss.  With ``gather_distributed=True`` and more than one rank in ``group``, the
    SupContrast form takes its contrasts from every rank (``dist_impl`` "gather" or "ring"; see
    ``fastcl.losses.distributed.supcon_loss_distributed``); ``mask`` and the 2-D form then raise.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all", base_temperature: float = 0.07, *,
                 gather_distributed: bool = False, dist_impl: str = "gather", group=None,
                 backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        check_scalar("base_temperature", base_temperature, positive=True)
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.gather_distributed, self.dist_impl, self.group = gather_distributed, resolve_dist_impl(dist_impl), group
        self.backend = backend

    def forward(self, features, labels=None, mask=None, ref_emb=None, ref_labels=None, *, indices_tuple=None,
                exclude_self=False):
        """SupContrast form: features (bsz, n_views, D) float32, bfloat16, float16 or float64 (trailing dims
        flattened; not normalised); labels: optional (bsz,) integer or floating (not NaN) classes; mask:
        optional (bsz, bsz) float or bool positive weights, exclusive with labels; neither gives SimCLR.

        pytorch-metric-learning form: features (N, D) of those dtypes (normalised here); labels: (N,) integer or
        floating classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer tensors
        (a1, p, a2, n) or (a, p, n), also taken as the third positional argument; ref_emb: (M, D), same dtype
        and device; ref_labels: (M,) classes, required with ref_emb unless indices_tuple is given (the fourth
        and fifth positional arguments, as pytorch-metric-learning's wrappers pass them); exclude_self: with
        ref_emb, whose first N rows are then the anchors' own, leave out the pairs (i, i).

        Returns a 0-d float32 tensor (float64 for float64 inputs); with ``gather_distributed`` over several
        ranks, this rank's loss."""
        pml_form = isinstance(features, torch.Tensor) and features.dim() == 2
        err = None
        if pml_form and isinstance(mask, (tuple, list)):  # PML's third positional is indices_tuple
            if indices_tuple is not None:
                err = ValueError("indices_tuple given twice (third positional argument and keyword)")
            mask, indices_tuple = None, mask
        if (ref_emb is not None or ref_labels is not None or indices_tuple is not None or exclude_self is not False) \
                and not pml_form:
            err = err or ValueError("indices_tuple, ref_emb, ref_labels and exclude_self go with 2-D embeddings "
                                    "(the pytorch-metric-learning form)")
        if self.gather_distributed and is_distributed(self.group):
            # every error is published by the distributed loss, so that every rank raises
            if err is None and mask is not None:
                err = ValueError("SupConLoss(gather_distributed=True) takes labels, not mask: a (bsz, bsz) mask "
                                 "cannot describe pairs across ranks")
            elif err is None and pml_form:
                err = NotImplementedError("SupConLoss(gather_distributed=True) supports the SupContrast form "
                                          "(bsz, n_views, D), not 2-D embeddings")
            return supcon_loss_distributed(features, labels, self.temperature, self.base_temperature,
                                           self.contrast_mode, dist_impl=self.dist_impl, group=self.group,
                                           backend=self.backend, local_error=err)
        if err is not None:
            raise err
        if pml_form:
            if mask is not None:
                raise ValueError("mask is only accepted with 3-D features (bsz, n_views, D)")
            if labels is None and indices_tuple is None:
                raise ValueError("labels is required with 2-D embeddings (pytorch-metric-learning form), "
                                 "unless indices_tuple is given")
            return supcon_loss_pml(features, labels, self.temperature, indices_tuple=indices_tuple,
                                   ref_emb=ref_emb, ref_labels=ref_labels, exclude_self=exclude_self,
                                   backend=self.backend)
        return supcon_loss(features, labels, mask, self.temperature, self.base_temperature, self.contrast_mode,
                           backend=self.backend)


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss``.

    ``forward(image_features (N, D), text_features (N, D), logit_scale (0-d, exponentiated),
    logit_bias (0-d, or None for no bias), output_dict=False)`` returns the 0-d loss or
    ``{"contrastive_loss": loss}``.
    With ``world_size > 1`` each rank's images meet every rank's texts and the per-rank loss is not
    divided by the world size (open_clip's semantics; DDP averaging gives the global mean).
    ``dist_impl``: "ring" (also open_clip's "bidir", "shift", and None) or "gather" (also "reduce").
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: Optional[str] = None,
                 *, group=None, backend: Optional[str] = None):
        super().__init__()
        _check_rank(rank, world_size)
        self.impl = resolve_dist_impl(dist_impl, SIGLIP_ALIASES)
        self.cache_labels, self.rank, self.world_size, self.dist_impl = cache_labels, rank, world_size, dist_impl
        self.group, self.backend = group, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        """image_features: (N, D) float32, bfloat16, float16 or float64; text_features: (N, D), same dtype and
        device (on one process (M, D), M >= N: texts past N are negatives for every image); not normalised.
        logit_scale: positive float or 0-d floating tensor, already exponentiated; logit_bias: float, 0-d
        tensor, or None for no bias.  Returns a 0-d float32 tensor (float64 for float64 inputs), this rank's
        loss with ``world_size > 1``; ``{"contrastive_loss": loss}`` with ``output_dict``."""
        if self.world_size > 1:
            err = _check_world("SigLipLoss", self.rank, self.world_size, self.group)
            loss = siglip_loss_distributed(image_features, text_features, logit_scale, logit_bias,
                                           dist_impl=self.impl, group=self.group, backend=self.backend,
                                           local_error=err)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
