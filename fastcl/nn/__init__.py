"""Drop-in ``torch.nn`` modules."""
from fastcl.nn.losses import ClipLoss, DCLLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss

__all__ = ["ClipLoss", "DCLLoss", "InfoNCELoss", "NTXentLoss", "SigLipLoss", "SupConLoss"]
