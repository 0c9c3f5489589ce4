"""Drop-ins for pytorch-metric-learning's losses, with its defaults and call signature.

``from fastcl.nn.pml import NTXentLoss, SupConLoss, SelfSupervisedLoss`` replaces the PML
imports of the same names.  Only PML's default distance (cosine) and reducer are offered; other
``distance=``/``reducer=`` keywords are refused by the constructors.
"""
from typing import Optional

import torch
from torch import nn

from fastcl.losses.ntxent_pml import ntxent_loss_pml
from fastcl.losses.supcon import supcon_loss_pml
from fastcl.validation import check_pair, check_scalar


class NTXentLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.NTXentLoss(temperature=0.07)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over positive pairs (see
    ``fastcl.losses.ntxent_pml.ntxent_loss_pml``), without PML's (pairs x pairs) matrix.
    """

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        self.temperature = temperature

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return ntxent_loss_pml(embeddings, labels, self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                               ref_labels=ref_labels)


class SupConLoss(nn.Module):
    """Drop-in for ``pytorch_metric_learning.losses.SupConLoss(temperature=0.1)``.

    ``forward(embeddings (N, D), labels=None (N,), indices_tuple=None, ref_emb=None (M, D),
    ref_labels=None (M,))`` returns the 0-d mean over anchors with a non-zero loss (see
    ``fastcl.losses.supcon.supcon_loss_pml``); the fused op serves it unless a miner's pairs are given.
    """

    def __init__(self, temperature: float = 0.1, *, backend: Optional[str] = None):
        super().__init__()
        check_scalar("temperature", temperature, positive=True)
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        return supcon_loss_pml(embeddings, labels, self.temperature, indices_tuple=indices_tuple, ref_emb=ref_emb,
                               ref_labels=ref_labels, backend=self.backend)


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
        if not callable(loss):
            raise TypeError(f"loss must be a loss module with pytorch-metric-learning's call signature, got "
                            f"{type(loss).__name__}")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        self.loss, self.symmetric = loss, symmetric

    def forward(self, embeddings, ref_emb):
        check_pair("embeddings", embeddings, "ref_emb", ref_emb)
        if ref_emb.shape[0] != embeddings.shape[0]:
            raise ValueError(f"ref_emb must have one row per embedding ({embeddings.shape[0]}), got "
                             f"{ref_emb.shape[0]}")
        labels = torch.arange(embeddings.shape[0], device=embeddings.device)
        if self.symmetric:
            return self.loss(torch.cat([embeddings, ref_emb]), torch.cat([labels, labels]))
        return self.loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels.clone())
