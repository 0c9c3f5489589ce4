"""Drop-ins for pytorch-metric-learning's losses, with its defaults and call signature.

``from fastcl.nn.pml import NTXentLoss, SupConLoss, TripletMarginLoss, MultiSimilarityLoss,
CircleLoss, ContrastiveLoss, SelfSupervisedLoss, CrossBatchMemory, DistributedLossWrapper``
replaces the PML imports of the same names.  Only PML's default distances and reducers are offered: the
constructors take PML's base-class keywords (``distance``, ``reducer``, ``collect_stats``,
``embedding_regularizer``, ``embedding_reg_weight``) at their defaults and refuse other values by name.
"""
import numbers
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from fastcl.distributed import all_gather_no_grad, exchange_shapes, group_info

from fastcl.losses.ntxent_pml import ntxent_loss_pml
from fastcl.losses.pair_pml import circle_loss_pml, contrastive_loss_pml, multi_similarity_loss_pml
from fastcl.losses.supcon import _check_labels, check_indices_tuple, supcon_loss_pml
from fastcl.losses.triplet_pml import pairs_as_triplets, triplet_margin_loss_pml
from fastcl.nn.losses import SupConLoss as SupConForms
from fastcl.ops.reference import compute_dtype
from fastcl.validation import check_embeddings, check_flags, check_pair, check_scalar


# PML's default distance and reducer of each loss: the only ones these drop-ins compute
_PML_DEFAULTS = {"NTXentLoss": ("CosineSimilarity", "MeanReducer"),
                 "SupConLoss": ("CosineSimilarity", "AvgNonZeroReducer"),
                 "TripletMarginLoss": ("LpDistance", "AvgNonZeroReducer"),
                 "MultiSimilarityLoss": ("CosineSimilarity", "MeanReducer"),
                 "CircleLoss": ("CosineSimilarity", "AvgNonZeroReducer"),
                 "ContrastiveLoss": ("LpDistance", "AvgNonZeroReducer")}


def _is_pml_default(kind: str, value, name: str) -> bool:
    """``value`` is a fresh instance of PML's ``name`` distance or reducer (by class name and
    settings, so PML need not be imported)."""
    if type(value).__name__ != name:
        return False
    if kind == "distance":
        return (getattr(value, "normalize_embeddings", None) is True and getattr(value, "power", None) == 1
                and (name != "LpDistance" or getattr(value, "p", None) == 2))
    return name != "AvgNonZeroReducer" or (getattr(value, "low", None) == 0 and getattr(value, "high", 0) is None)


def _check_pml_kwargs(loss_name: str, kwargs: dict) -> None:
    """PML's base-class keywords (``distance``, ``reducer``, ``collect_stats``,
    ``embedding_regularizer``, ``embedding_reg_weight``): accepted at PML's defaults, which is what
    is computed, and refused by name otherwise.  ``collect_stats`` is accepted and records nothing."""
    distance, reducer = _PML_DEFAULTS[loss_name]
    for key, value in kwargs.items():
        if key == "collect_stats":
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"collect_stats must be a bool or None, got {type(value).__name__}")
        elif key in ("distance", "reducer"):
            default = distance if key == "distance" else reducer
            if value is not None and not _is_pml_default(key, value, default):
                raise NotImplementedError(f"{loss_name}({key}={type(value).__name__}(...)) is not supported; only "
                                          f"{key}={default}() with its default settings, PML's default")
        elif key == "embedding_regularizer":
            if value is not None:
                raise NotImplementedError(f"{loss_name}(embedding_regularizer=...) is not supported; add the "
                                          "regularizer's term to the loss yourself")
        elif key != "embedding_reg_weight":  # unused without a regularizer, as in PML
            raise TypeError(f"{loss_name}() got an unexpected keyword argument {key!r}")


def _check_wrapped(loss) -> None:
    """A wrapper's ``loss``: anything called as pytorch-metric-learning calls its losses."""
    if not callable(loss):
        raise TypeError(f"loss must be a loss module with pytorch-metric-learning's call signature, got "
                        f"{type(loss).__name__}")


class NTXentLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.NTXentLoss(temperature=0.07)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over positive pairs (see
    ``fastcl.losses.ntxent_pml.ntxent_loss_pml``), without PML's (pairs x pairs) matrix.
    """

    def __init__(self, temperature: float = 0.07, **pml_kwargs):
        _check_pml_kwargs("NTXentLoss", pml_kwargs)
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, pairs (a1, p, a2, n) or triplets (a, p, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return ntxent_loss_pml(embeddings, labels, self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                               ref_labels=ref_labels, exclude_self=exclude_self)


class SupConLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SupConLoss(temperature=0.1)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over anchors with a non-zero loss (see
    ``fastcl.losses.supcon.supcon_loss_pml``); the fused op serves it unless a miner's pairs are given.
    """

    def __init__(self, temperature: float = 0.1, *, backend: Optional[str] = None, **pml_kwargs):
        _check_pml_kwargs("SupConLoss", pml_kwargs)
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, pairs (a1, p, a2, n) or triplets (a, p, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return supcon_loss_pml(embeddings, labels, self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                               ref_labels=ref_labels, exclude_self=exclude_self, backend=self.backend)


class TripletMarginLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.TripletMarginLoss(margin=0.05)`` with its
    defaults (``swap=False``, ``smooth_loss=False``, ``triplets_per_anchor="all"``; other values
    are refused).  ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None
    (M, D), ref_labels=None (M,))`` returns the 0-d mean over violating triplets (see
    ``fastcl.losses.triplet_pml.triplet_margin_loss_pml``), without PML's (N, M, M) triplet mask.
    """

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                 triplets_per_anchor="all", **pml_kwargs):
        _check_pml_kwargs("TripletMarginLoss", pml_kwargs)
        super().__init__()
        check_scalar("margin", margin)
        for name, value, default in (("swap", swap, False), ("smooth_loss", smooth_loss, False),
                                     ("triplets_per_anchor", triplets_per_anchor, "all")):
            if value != default:
                raise NotImplementedError(f"TripletMarginLoss({name}={value!r}) is not supported; only "
                                          f"{name}={default!r}, PML's default")
        self.margin = margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, triplets (a, p, n) or pairs (a1, p, a2, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return triplet_margin_loss_pml(embeddings, labels, self.margin, indices_tuple=indices_tuple, ref_emb=ref_emb,
                                       ref_labels=ref_labels, exclude_self=exclude_self)


class MultiSimilarityLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over anchors (see
    ``fastcl.losses.pair_pml.multi_similarity_loss_pml``), in row blocks instead of PML's (N, M)
    matrix and masks.
    """

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5, **pml_kwargs):
        _check_pml_kwargs("MultiSimilarityLoss", pml_kwargs)
        super().__init__()
        check_scalar("alpha", alpha, positive=True)
        check_scalar("beta", beta, positive=True)
        check_scalar("base", base)
        self.alpha, self.beta, self.base = alpha, beta, base

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, pairs (a1, p, a2, n) or triplets (a, p, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return multi_similarity_loss_pml(embeddings, labels, self.alpha, self.beta, self.base,
                                         indices_tuple=indices_tuple, ref_emb=ref_emb, ref_labels=ref_labels,
                                         exclude_self=exclude_self)


class CircleLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.CircleLoss(m=0.4, gamma=80)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over anchors with a loss above 0 (see
    ``fastcl.losses.pair_pml.circle_loss_pml``), in row blocks instead of PML's (N, M) matrices.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80, **pml_kwargs):
        _check_pml_kwargs("CircleLoss", pml_kwargs)
        super().__init__()
        check_scalar("m", m)
        check_scalar("gamma", gamma, positive=True)
        self.m, self.gamma = m, gamma

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, pairs (a1, p, a2, n) or triplets (a, p, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return circle_loss_pml(embeddings, labels, self.m, self.gamma, indices_tuple=indices_tuple, ref_emb=ref_emb,
                               ref_labels=ref_labels, exclude_self=exclude_self)


class ContrastiveLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.ContrastiveLoss(pos_margin=0, neg_margin=1)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the positive pairs' and the negative pairs' means over losses
    above 0, added (see ``fastcl.losses.pair_pml.contrastive_loss_pml``), without PML's lists of
    every pair.
    """

    def __init__(self, pos_margin: float = 0, neg_margin: float = 1, **pml_kwargs):
        _check_pml_kwargs("ContrastiveLoss", pml_kwargs)
        super().__init__()
        check_scalar("pos_margin", pos_margin)
        check_scalar("neg_margin", neg_margin)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
                exclude_self=False):
        """embeddings: (N, D) float32, bfloat16, float16 or float64 (L2-normalised here); labels: (N,) integer
        or floating (not NaN) classes, optional with ``indices_tuple``; indices_tuple: a miner's 1-D integer
        tensors, pairs (a1, p, a2, n) or triplets (a, p, n); ref_emb: optional (M, D) references, same dtype and
        device, with ref_labels (M,) (required unless ``indices_tuple`` is given); exclude_self: with ref_emb,
        whose first N rows are then the anchors' own, leave out the pairs (i, i) (not with indices_tuple).
        Returns a 0-d float32 tensor (float64 for float64 embeddings)."""
        return contrastive_loss_pml(embeddings, labels, self.pos_margin, self.neg_margin, indices_tuple=indices_tuple,
                                    ref_emb=ref_emb, ref_labels=ref_labels, exclude_self=exclude_self)


class SelfSupervisedLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SelfSupervisedLoss(loss, symmetric=True)``.

    ``forward(embeddings (N, D), ref_emb (N, D))``: row i of ``ref_emb`` is another view of row i.
    Symmetric: ``loss(cat([embeddings, ref_emb]), cat([arange(N), arange(N)]))``; otherwise
    ``loss(embeddings, arange(N), ref_emb=ref_emb, ref_labels=arange(N))`` (a distinct labels
    object, so the pairs (i, i) stay positives).  ``loss`` is any module with PML's call
    signature, such as this module's ``NTXentLoss`` or ``SupConLoss``.
    """

    def __init__(self, loss: nn.Module, symmetric: bool = True):
        super().__init__()
        _check_wrapped(loss)
        check_flags(symmetric=symmetric)
        self.loss, self.symmetric = loss, symmetric

    def forward(self, embeddings, ref_emb):
        """embeddings, ref_emb: (N, D) float32, bfloat16, float16 or float64, same dtype and device; row i of
        ref_emb is another view of row i (labels ``arange(N)``, int64).  Returns what ``loss`` returns: a 0-d
        float32 tensor (float64 for float64 embeddings) for this module's losses."""
        check_pair("embeddings", embeddings, "ref_emb", ref_emb)
        if ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError(f"ref_emb must have one row per embedding ({embeddings.shape[0]}), got "
                             f"{ref_emb.shape[0]}")
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), torch.cat([labels, labels]))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())


# fastcl's losses of PML's call signature: they take exclude_self (CrossBatchMemory's own slots,
# without a pair list); fastcl.nn.SupConLoss in its 2-D form too
_EXCLUDE_SELF_LOSSES = (NTXentLoss, SupConLoss, TripletMarginLoss, MultiSimilarityLoss, CircleLoss, ContrastiveLoss,
                        SupConForms)


def _all_pairs(labels: torch.Tensor, ref_labels: torch.Tensor):
    """(a1, p, a2, n): every (anchor, reference) pair of equal labels, then of different labels."""
    same = labels[:, None] == ref_labels[None, :]
    return torch.where(same) + torch.where(~same)


def _drop_self_pairs(indices_tuple, slots: torch.Tensor, first: int, last: int, memory_size: int):
    """PML's removal of the anchors' own memory slots from the positive pairs (or triplets):
    anchor i was written to ``slots[i]``.  As in PML, a slot's offset is counted from the first
    slot, plus ``memory_size`` for slots at or before the last one when the batch wrapped, so a
    batch of one sample keeps its self pair (PML's rule, reproduced)."""
    a, p = indices_tuple[0], indices_tuple[1]
    in_batch = torch.isin(p, slots)
    offset = p - first
    if last <= first:
        offset = torch.where(offset <= last - first, offset + memory_size, offset)
    keep = ~(in_batch & (offset == a))
    if len(indices_tuple) == 3:
        return a[keep], p[keep], indices_tuple[2][keep]
    return a[keep], p[keep], indices_tuple[2], indices_tuple[3]


class CrossBatchMemory(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.CrossBatchMemory(loss, embedding_size,
    memory_size=1024, miner=None)``: a first-in first-out memory of past (detached) embeddings
    and labels that serve as the references of ``loss``.

    ``forward(embeddings (N, D), labels (N,), indices_tuple=None, enqueue_mask=None (N,) bool)``
    writes the batch (or the rows ``enqueue_mask`` selects, which then are not anchors; 0 when no
    anchor is left, as PML) into the memory, builds the pairs against it as PML does (every pair,
    or ``miner(embeddings, labels, memory, memory_labels)``; without ``enqueue_mask`` each
    anchor's own slot is no positive, except in a batch of one, PML's rule; ``indices_tuple`` is
    appended, converted to the miner's pairs or triplets as PML converts it), and returns
    ``loss(embeddings, labels, pairs, memory, memory_labels)``.  Without a miner and without
    ``indices_tuple`` this module's losses get no pair list: with ``enqueue_mask`` (MoCo's use:
    queries against a queue of keys) or a batch of one they get the memory as references;
    otherwise the memory with the batch's own slots first and ``exclude_self=True``.  Each then
    runs in its own row blocks.  A miner's pairs go to the loss as PML passes them (this module's
    losses take them as dense (N, memory) masks or matrices, as PML does).  ``loss`` is any
    module with PML's call signature; ``miner`` any callable returning pairs or triplets.
    Arguments are checked before the batch is written, and more rows to write than
    ``memory_size`` are refused (PML would overwrite its own rows).
    """

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int = 1024, miner=None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be a loss module with pytorch-metric-learning's call signature, got "
                            f"{type(loss).__name__}")
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if miner is not None and not callable(miner):
            raise TypeError(f"miner must be callable, got {type(miner).__name__}")
        self.loss, self.miner = loss, miner
        self.embedding_size, self.memory_size = int(embedding_size), int(memory_size)
        self.reset_queue()

    def reset_queue(self) -> None:
        """Empty the memory (zeros, as PML's)."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.has_been_filled, self.queue_idx = False, 0

    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(self.queue_idx, self.queue_idx + embeddings.shape[0], device=labels.device)
        slots = slots % self.memory_size
        self.embedding_memory[slots] = embeddings.detach().to(self.embedding_memory.dtype)
        self.label_memory[slots] = labels.detach().to(self.label_memory.dtype)
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + embeddings.shape[0]) % self.memory_size
        if not self.has_been_filled and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        """embeddings: (N, embedding_size) float32, bfloat16, float16 or float64; labels: (N,) integer or
        floating (not NaN) classes.  The memory takes their device and dtypes (the embeddings' dtype not under
        CUDA autocast).  indices_tuple: optional 1-D integer tensors (a1, p, a2, n) or (a, p, n), anchors into
        the batch and partners into the memory, added to the pairs; enqueue_mask: optional (N,) bool, the rows
        written to the memory (the others are the anchors); not both.  Returns what ``loss`` returns: a 0-d
        float32 tensor (float64 for float64 embeddings) for this module's losses (0 when no anchor is left)."""
        check_embeddings("embeddings", embeddings)
        n = embeddings.shape[0]
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} columns, got "
                             f"{embeddings.shape[1]}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must be a 1-D tensor with one label per embedding ({n}), got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        _check_labels("labels", labels, n, labels.device, allow_float=True)
        if labels.is_floating_point() and bool(torch.isnan(labels).any()):
            raise ValueError("labels must not contain NaN (a NaN label equals no other label)")
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if indices_tuple is not None:
            check_indices_tuple(indices_tuple)  # before the batch is written
        if enqueue_mask is not None:
            if (not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool
                    or enqueue_mask.shape != (n,)):
                raise ValueError(f"enqueue_mask must be a bool tensor of shape ({n},)")
            written = int(enqueue_mask.sum())
        else:
            written = n
        if written > self.memory_size:
            raise ValueError(f"the rows to enqueue ({written}) must not exceed memory_size={self.memory_size}")
        stored = self.has_been_filled or self.queue_idx > 0
        if stored and labels.is_floating_point() != self.label_memory.is_floating_point():
            # Converting the stored labels (as PML does) would truncate float classes into integer ones.
            raise ValueError(f"labels are {labels.dtype}, but the memory holds {self.label_memory.dtype} labels; "
                             "pass labels of one kind (integer or floating) to a CrossBatchMemory, or reset_queue()")
        device = embeddings.device
        labels = labels.to(device)
        self.embedding_memory = self.embedding_memory.to(device=device)
        if not torch.is_autocast_enabled("cuda"):  # PML leaves its memory's dtype alone under CUDA autocast
            self.embedding_memory = self.embedding_memory.to(dtype=embeddings.dtype)
        # Stored labels keep their width: int64 classes must not wrap into an int32 batch's dtype.
        kind = torch.promote_types(self.label_memory.dtype, labels.dtype) if stored else labels.dtype
        self.label_memory = self.label_memory.to(device=device, dtype=kind)
        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)
            self._enqueue(embeddings[enqueue_mask], labels[enqueue_mask])
            anchors, labels, slots = embeddings[~enqueue_mask], labels[~enqueue_mask], None
            if anchors.shape[0] == 0:  # nothing left to compare: PML's zero loss
                return embeddings.sum(dtype=compute_dtype(embeddings.dtype)) * 0
        else:
            anchors, slots = embeddings, self._enqueue(embeddings, labels)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory, memory_labels = self.embedding_memory[:filled], self.label_memory[:filled]
        if memory.dtype != anchors.dtype:  # under CUDA autocast the memory stays as it was (PML's rule)
            memory = memory.to(anchors.dtype)
        # the batch's first slot, known on the host (no wait for the device)
        first = (self.queue_idx - anchors.shape[0]) % self.memory_size
        if self.miner is None and indices_tuple is None and isinstance(self.loss, _EXCLUDE_SELF_LOSSES):
            # Every pair but each anchor's own slot: this module's losses take the memory as
            # references, in their row blocks, instead of PML's listed pairs (the same pairs:
            # memory_labels is not the labels object).  Nothing is left out when the anchors were
            # not enqueued, or for a batch of one (PML's rule).  Other losses get the list: PML's
            # read no pairs otherwise at times (random triplets with an integer triplets_per_anchor).
            if slots is None or anchors.shape[0] == 1:
                return self.loss(anchors, labels, None, memory, memory_labels)
            # the batch's slots first (slot i at row i), so the pairs left out are (i, i)
            order = torch.cat([torch.arange(first, filled), torch.arange(0, first)]).to(memory.device)
            return self.loss(anchors, labels, None, memory[order], memory_labels[order], exclude_self=True)
        pairs = (self.miner(anchors, labels, memory, memory_labels) if self.miner is not None
                 else _all_pairs(labels, memory_labels))
        if slots is not None:
            pairs = _drop_self_pairs(pairs, slots, first, (first + anchors.shape[0] - 1) % self.memory_size,
                                     self.memory_size)
        if indices_tuple is not None:
            if len(indices_tuple) == 3 and len(pairs) == 4:
                indices_tuple = (indices_tuple[0], indices_tuple[1], indices_tuple[0], indices_tuple[2])
            elif len(indices_tuple) == 4 and len(pairs) == 3:
                indices_tuple = pairs_as_triplets(*indices_tuple)
            pairs = tuple(torch.cat([x, y.to(x.device)]) for x, y in zip(pairs, indices_tuple))
        return self.loss(anchors, labels, pairs, memory, memory_labels)


def _gather_own_first(x: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    """PML's gathered order: this rank's rows (``x`` itself, with its gradient), then the other
    ranks' rows in rank order (detached, as ``torch.distributed.all_gather`` returns them)."""
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # bool travels as bytes (not every backend takes it)
    full = all_gather_no_grad(wire, sizes).to(x.dtype)
    off = sum(sizes[:rank])
    return torch.cat([x, full[:off], full[off + sizes[rank]:]])


class DistributedLossWrapper(nn.Module):
    """Drop-in for ``pytorch_metric_learning.utils.distributed.DistributedLossWrapper(loss,
    efficient=False)``, around this module's losses or ``CrossBatchMemory`` (PML's wrapper
    accepts PML's classes only).

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,), enqueue_mask=None (N,) bool)`` on each rank of the default group, as
    PML: the ranks' embeddings (and labels, references, enqueue masks) are gathered, this rank's
    first with their gradient and the others' detached after them in rank order, and the result
    is ``world_size`` times the wrapped loss (DDP's mean of the ranks' gradients then gives the
    gradient of the loss over the gathered batch).  Without ``efficient`` the loss runs over the
    whole gathered batch, in the wrapped loss's bounded memory; with it, this rank's rows are the
    anchors against the gathered references, with PML's pairs (every pair but each anchor with
    itself, a batch of one keeping it, PML's rule): this module's losses take them as
    ``exclude_self`` in their row blocks (with ``ref_emb``, or another loss, the pairs are listed
    as PML lists them, the dense (N, world x N) path).  ``CrossBatchMemory`` enqueues the
    gathered batch (no ``efficient``).

    Unlike PML: the ranks' batches may differ in size, and a rank whose arguments differ from the
    others' in D, dtype or which of them are given, or fail their checks, makes every rank raise,
    where PML's gather would fail or hang; ``ref_emb`` needs ``ref_labels`` (the wrapped losses'
    rule; PML's wrapper would take ``labels`` for them).  Outside torch.distributed it warns and
    returns the loss, as PML does.
    """

    def __init__(self, loss: nn.Module, efficient: bool = False):
        super().__init__()
        _check_wrapped(loss)
        check_flags(efficient=efficient)
        if isinstance(loss, CrossBatchMemory) and efficient:
            raise ValueError("CrossBatchMemory with efficient=True is not supported (as in pytorch-metric-learning)")
        if isinstance(loss, SelfSupervisedLoss):  # its forward takes (embeddings, ref_emb)
            raise TypeError("loss must take pytorch-metric-learning's (embeddings, labels, indices_tuple, ref_emb, "
                            "ref_labels); SelfSupervisedLoss does not (PML's wrapper refuses it too)")
        self.loss, self.efficient = loss, efficient

    def _check_kinds(self, indices_tuple, ref_emb, ref_labels, enqueue_mask) -> None:
        """The arguments the wrapped loss's kind rules out."""
        if isinstance(self.loss, CrossBatchMemory):
            if ref_emb is not None or ref_labels is not None:
                raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
            if indices_tuple is not None and enqueue_mask is not None:
                raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        elif enqueue_mask is not None:
            raise ValueError("enqueue_mask is for a wrapped CrossBatchMemory")

    def _local(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask):
        if isinstance(self.loss, CrossBatchMemory):
            return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
        return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, enqueue_mask=None):
        """embeddings: (N, D) float32, bfloat16, float16 or float64, N may differ between ranks; labels:
        optional (N,) integer or floating classes; indices_tuple: a miner's pairs or triplets, passed on as
        given; ref_emb: optional (M, D), same dtype and device, with ref_labels (M,); enqueue_mask: optional
        (N,) bool, for a wrapped ``CrossBatchMemory`` only.  Returns a 0-d tensor, ``world_size`` times the
        wrapped loss (the loss itself outside torch.distributed or with one rank): float32 (float64 for float64
        embeddings) for this module's losses."""
        memory = isinstance(self.loss, CrossBatchMemory)
        if not (dist.is_available() and dist.is_initialized()):
            self._check_kinds(indices_tuple, ref_emb, ref_labels, enqueue_mask)
            warnings.warn("DistributedLossWrapper is being used in a non-distributed setting. "
                          "Returning the loss as is.")
            return self._local(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask)
        rank, world = group_info()
        if world <= 1:
            self._check_kinds(indices_tuple, ref_emb, ref_labels, enqueue_mask)
            return self._local(embeddings, labels, indices_tuple, ref_emb, ref_labels, enqueue_mask)
        error = None
        try:  # this rank's checks; their failure is published so that no rank waits in the gather
            self._check_kinds(indices_tuple, ref_emb, ref_labels, enqueue_mask)
            check_embeddings("embeddings", embeddings)
            n, device = embeddings.shape[0], embeddings.device
            # on the embeddings' device, as PML moves them (NCCL gathers device tensors only)
            labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels
            enqueue_mask = enqueue_mask.to(device) if isinstance(enqueue_mask, torch.Tensor) else enqueue_mask
            for name, x, rows in (("labels", labels, n), ("enqueue_mask", enqueue_mask, n)):
                if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != 1 or x.shape[0] != rows):
                    raise ValueError(f"{name} must be a 1-D tensor with one entry per embedding ({rows})")
            if enqueue_mask is not None and enqueue_mask.dtype != torch.bool:
                raise ValueError(f"enqueue_mask must be a bool tensor, got {enqueue_mask.dtype}")
            if ref_emb is not None:
                check_pair("embeddings", embeddings, "ref_emb", ref_emb)
            ref_labels = ref_labels.to(device) if isinstance(ref_labels, torch.Tensor) else ref_labels
            if ref_labels is not None and (not isinstance(ref_labels, torch.Tensor) or ref_labels.dim() != 1
                                           or ref_emb is None or ref_labels.shape[0] != ref_emb.shape[0]):
                raise ValueError("ref_labels must be a 1-D tensor with one entry per row of ref_emb")
            if self.efficient and labels is None and indices_tuple is None:
                raise ValueError("efficient=True needs labels or indices_tuple")
        except Exception as e:
            error = e
        given = [("labels", labels), ("ref_emb", ref_emb), ("ref_labels", ref_labels), ("enqueue_mask", enqueue_mask)]
        # first which arguments each rank gives (the second exchange lists exactly those), then their shapes
        (emb_sizes,) = exchange_shapes(
            [("embeddings", embeddings if error is None else None)], local_error=error,
            settings=[("efficient", self.efficient)] + [(f"{k} given", v is not None) for k, v in given],
            like=embeddings if isinstance(embeddings, torch.Tensor) else None)
        present = [("embeddings", embeddings)] + [(k, v) for k, v in given if v is not None]
        sizes = [emb_sizes] + (exchange_shapes(present[1:]) if len(present) > 1 else [])
        gathered = {k: _gather_own_first(v, sz, rank) for (k, v), sz in zip(present, sizes)}
        all_emb, all_labels = gathered["embeddings"], gathered.get("labels")
        if memory:
            return self.loss(all_emb, all_labels, indices_tuple, gathered.get("enqueue_mask")) * world
        all_ref, all_ref_labels = gathered.get("ref_emb"), gathered.get("ref_labels")
        if not self.efficient:
            return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels) * world
        if all_labels is not None and all_ref_labels is not None:
            all_labels = all_ref_labels
        if all_ref is not None:
            all_emb = all_ref
        if indices_tuple is None:
            n = embeddings.shape[0]
            if all_ref is None and isinstance(self.loss, _EXCLUDE_SELF_LOSSES):
                # PML's pairs are every pair but each anchor with its own gathered row (row i, of
                # its label; a batch of one keeps it): the loss's all-pairs form, in its row blocks
                return self.loss(embeddings, labels, None, all_emb, all_labels, exclude_self=n > 1) * world
            indices_tuple = _drop_self_pairs(_all_pairs(labels, all_labels), torch.arange(n, device=labels.device),
                                             0, n - 1, all_labels.shape[0])
        return self.loss(embeddings, labels, indices_tuple, all_emb, all_labels) * world
