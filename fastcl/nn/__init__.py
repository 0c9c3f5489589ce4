"""Drop-in ``torch.nn`` modules."""
from fastcl.nn.losses import ClipLoss, DCLLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss
from fastcl.nn.masking import RandomMasking, RestoreTokens

__all__ = ["ClipLoss", "DCLLoss", "InfoNCELoss", "NTXentLoss", "SigLipLoss", "SupConLoss", "RandomMasking",
           "RestoreTokens"]
