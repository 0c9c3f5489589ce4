"""Drop-in ``torch.nn`` modules."""
from fastcl.nn.losses import ClipLoss, InfoNCELoss

__all__ = ["ClipLoss", "InfoNCELoss"]
