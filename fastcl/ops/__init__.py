"""Fused ops with autograd and backend dispatch."""
from fastcl.ops.dispatch import BACKENDS, resolve_backend
from fastcl.ops.reference import reference_logits, reference_similarity_lse
from fastcl.ops.sigmoid_pair import reference_sigmoid_pair_loss, sigmoid_pair_loss
from fastcl.ops.similarity_lse import similarity_lse, similarity_lse_with_index

__all__ = ["BACKENDS", "resolve_backend", "similarity_lse", "similarity_lse_with_index", "reference_logits",
           "reference_similarity_lse", "sigmoid_pair_loss", "reference_sigmoid_pair_loss"]
