"""Functional contrastive losses built on the fused ops."""
from fastcl.losses.clip import clip_loss
from fastcl.losses.info_nce import info_nce

__all__ = ["clip_loss", "info_nce"]
