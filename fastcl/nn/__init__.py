"""Drop-in ``torch.nn`` modules."""
from fastcl.nn.losses import (ClipLoss, CoCaLoss, DCLLoss, DCLWLoss, DirectCLRLoss, DistillClipLoss, HypersphereLoss,
                              InfoNCELoss, MACLLoss, NTXentLoss, SigLipLoss, SupConLoss)
from fastcl.nn.masking import RandomMasking, RestoreTokens
from fastcl.nn.memory_bank import MemoryBank
from fastcl.nn import pml

__all__ = ["ClipLoss", "CoCaLoss", "DCLLoss", "DCLWLoss", "DirectCLRLoss", "DistillClipLoss", "HypersphereLoss",
           "InfoNCELoss", "MACLLoss", "MemoryBank", "NTXentLoss", "SigLipLoss", "SupConLoss", "RandomMasking",
           "RestoreTokens", "pml"]
