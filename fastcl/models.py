"""Thin, standard PyTorch models for contrastive learning: heads and wrappers, no losses.

Every model returns L2-normalised embeddings so any fastcl loss can consume them directly.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# open_clip caps the exponentiated logit scale at 100 (temperature >= 0.01).
MAX_LOGIT_SCALE = 100.0


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_module(name: str, value) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


class ProjectionHead(nn.Module):
    """The SimCLR/MoCo projection MLP: ``num_layers`` linear layers with BN + ReLU in between.

    Args:
        in_dim: feature size of the encoder output.
        hidden_dim: width of the hidden layers.
        out_dim: projection size.
        num_layers: number of linear layers (>= 1); 1 gives a single linear map.
        batch_norm: BatchNorm1d after each hidden linear layer.  Note that batch statistics make
            per-sample outputs depend on the rest of the batch, so gradient caching with
            ``chunk_size`` is then no longer equal to the unchunked step.

    ``forward(x)``: x (B, in_dim) float -> (B, out_dim), same dtype (not normalised).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                            ("num_layers", num_layers)):
            _check_positive_int(name, value)
        layers = []
        dim = in_dim
        for _ in range(num_layers - 1):
            # The bias is redundant before BatchNorm.
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (B, {self.in_dim}), got {tuple(x.shape)}")
        return self.net(x)


class SimCLR(nn.Module):
    """Encoder + projection head returning L2-normalised projections of one or two views.

    Args:
        encoder: module mapping a batch of inputs (B, ...) to features (B, F).
        head: module mapping (B, F) to projections (B, D), e.g. ``ProjectionHead``.

    ``forward(x0, x1=None)``: views of shape (B, ...) -> z0 (B, D), or the pair (z0, z1);
    float, unit L2 norm per row, dtype of the head output.  ``embed(x)`` returns the
    encoder features (B, F) used for linear probes.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        _check_module("encoder", encoder)
        _check_module("head", head)
        self.encoder, self.head = encoder, head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features (B, F) of inputs (B, ...), before the head."""
        return self.encoder(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised projections (B, D) of inputs (B, ...)."""
        return F.normalize(self.head(self.encoder(x)), dim=-1)

    def forward(self, x0: torch.Tensor, x1: Optional[torch.Tensor] = None):
        if x1 is None:
            return self.project(x0)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"x0 and x1 must hold the same number of samples, got {x0.shape[0]} and {x1.shape[0]}")
        return self.project(x0), self.project(x1)


class TwoTower(nn.Module):
    """CLIP/SigLIP-style dual encoder following open_clip's output conventions.

    Args:
        image_encoder: module (B, ...) -> (B, embed_dim).
        text_encoder: module (B, ...) -> (B, embed_dim).
        embed_dim: the shared embedding size both encoders must output (checked in forward).
        init_logit_scale: initial value of the learnable ``logit_scale`` parameter, stored as a
            log (default ``log(1/0.07)``, CLIP's).
        init_logit_bias: initial learnable ``logit_bias`` (SigLIP uses -10), or None for no bias.

    ``forward(image, text)`` returns ``(image_features (B, D), text_features (B, D), logit_scale)``
    plus ``logit_bias`` when the model has one.  Features are L2-normalised; ``logit_scale`` is the
    0-d ``exp(self.logit_scale)`` clamped at 100 (float32 parameter dtype), ready for
    ``fastcl.clip_loss``.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int,
                 init_logit_scale: float = math.log(1 / 0.07), init_logit_bias: Optional[float] = None):
        super().__init__()
        _check_module("image_encoder", image_encoder)
        _check_module("text_encoder", text_encoder)
        _check_positive_int("embed_dim", embed_dim)
        if not isinstance(init_logit_scale, (int, float)) or not math.isfinite(init_logit_scale):
            raise ValueError(f"init_logit_scale must be a finite float (a log scale), got {init_logit_scale!r}")
        if init_logit_bias is not None and (not isinstance(init_logit_bias, (int, float))
                                            or not math.isfinite(init_logit_bias)):
            raise ValueError(f"init_logit_bias must be None or a finite float, got {init_logit_bias!r}")
        self.image_encoder, self.text_encoder, self.embed_dim = image_encoder, text_encoder, embed_dim
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))

    def _check_features(self, name: str, f: torch.Tensor) -> torch.Tensor:
        if f.dim() != 2 or f.shape[1] != self.embed_dim:
            raise ValueError(f"{name} must output (B, embed_dim={self.embed_dim}), got {tuple(f.shape)}")
        return f

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) image features, L2-normalised unless ``normalize=False``."""
        f = self._check_features("image_encoder", self.image_encoder(image))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) text features, L2-normalised unless ``normalize=False``."""
        f = self._check_features("text_encoder", self.text_encoder(text))
        return F.normalize(f, dim=-1) if normalize else f

    def scale(self) -> torch.Tensor:
        """0-d ``exp(logit_scale)`` clamped at 100 (gradient is zero while clamped)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image and text must hold the same number of samples, "
                             f"got {image.shape[0]} and {text.shape[0]}")
        out = (self.encode_image(image), self.encode_text(text), self.scale())
        return out + (self.logit_bias,) if self.logit_bias is not None else out


class MaskedTokenEncoder(nn.Module):
    """Drops a random ``mask_ratio`` of tokens (``fastcl.masking.random_masking``) and encodes the rest.

    Args:
        encoder: module mapping kept tokens (B, L_keep, D) to (B, L_keep, D_out) (e.g. a
            transformer), as in MAE.
        mask_ratio: fraction of tokens dropped, in [0, 1).

    ``forward(x, *, noise=None, generator=None, pos_embed=None)``:
        x: (B, L, D) float tokens.  noise: optional (B, L) float ranking the tokens (lowest kept).
        generator: optional ``torch.Generator`` for the noise (not with ``noise``).  pos_embed:
        optional (L, D) or (1, L, D) positional embedding, x's dtype and device, added to the kept
        tokens in the masking pass (``random_masking``).
        Returns ``(latent (B, L_keep, D_out), mask (B, L) with 1 = dropped, ids_restore (B, L) int64)``.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75):
        super().__init__()
        _check_module("encoder", encoder)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r}")
        self.encoder, self.mask_ratio = encoder, float(mask_ratio)

    def forward(self, x: torch.Tensor, *, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, pos_embed: Optional[torch.Tensor] = None):
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D tokens (B, L, D), got shape {tuple(x.shape)}")
        # Imported here so this module imports even while fastcl.masking is being changed.
        from fastcl.masking import random_masking
        x_kept, mask, ids_restore, _ = random_masking(x, self.mask_ratio, noise=noise, generator=generator,
                                                      pos_embed=pos_embed)
        return self.encoder(x_kept), mask, ids_restore
