"""Functional contrastive losses built on the fused ops."""
from fastcl.losses.clip import clip_loss
from fastcl.losses.coca import caption_loss
from fastcl.losses.dcl import dcl_loss
from fastcl.losses.distill import distill_clip_loss
from fastcl.losses.hypersphere import hypersphere_loss
from fastcl.losses.info_nce import info_nce
from fastcl.losses.macl import macl_loss
from fastcl.losses.ntxent import ntxent_loss
from fastcl.losses.ntxent_pml import ntxent_loss_pml
from fastcl.losses.pair_pml import circle_loss_pml, contrastive_loss_pml, multi_similarity_loss_pml
from fastcl.losses.siglip import siglip_loss
from fastcl.losses.supcon import supcon_loss, supcon_loss_pml
from fastcl.losses.triplet_pml import triplet_margin_loss_pml

__all__ = ["caption_loss", "circle_loss_pml", "clip_loss", "contrastive_loss_pml", "dcl_loss", "distill_clip_loss",
           "hypersphere_loss", "info_nce", "macl_loss", "multi_similarity_loss_pml", "ntxent_loss", "ntxent_loss_pml",
           "siglip_loss", "supcon_loss", "supcon_loss_pml", "triplet_margin_loss_pml"]
