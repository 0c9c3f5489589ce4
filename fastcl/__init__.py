"""fastcl: fused contrastive-learning losses that never store the similarity matrix."""
from fastcl import _ext  # noqa: F401  (loads fastcl._C and its ops when built)
from fastcl import distributed, models, nn, ops, train
from fastcl.masking import gather_tokens, random_masking, restore_tokens
from fastcl.losses import (caption_loss, circle_loss_pml, clip_loss, contrastive_loss_pml, dcl_loss,
                           distill_clip_loss, hypersphere_loss, info_nce, macl_loss, multi_similarity_loss_pml,
                           ntxent_loss, ntxent_loss_pml, siglip_loss, supcon_loss, supcon_loss_pml,
                           triplet_margin_loss_pml)

__version__ = "0.1.0"

__all__ = ["caption_loss", "circle_loss_pml", "clip_loss", "contrastive_loss_pml", "dcl_loss", "distill_clip_loss",
           "hypersphere_loss", "info_nce", "macl_loss", "multi_similarity_loss_pml", "ntxent_loss", "ntxent_loss_pml",
           "siglip_loss", "supcon_loss", "supcon_loss_pml", "triplet_margin_loss_pml", "random_masking",
           "gather_tokens", "restore_tokens", "distributed", "models", "nn", "train", "ops", "__version__"]
