"""``torch.nn`` modules for MAE-style token masking (thin wrappers over ``fastcl.masking``)."""
import numbers
from typing import Optional, Tuple

import torch
from torch import nn

from fastcl.masking import check_mask_ratio, random_masking, restore_tokens


class RandomMasking(nn.Module):
    """Keeps ``int(L * (1 - mask_ratio))`` random tokens per sample; see ``fastcl.random_masking``.

    ``forward(x, noise=None, pos_embed=None, generator=None, *, mask_ratio=None)`` takes x (B, L,
    D) float, optional noise (B, L) float and pos_embed (L, D) or (1, L, D), and returns
    ``(x_kept (B, K, D), mask (B, L) in the default float dtype (float32 unless changed),
    ids_restore (B, L) int64, ids_keep (B, K) int64)``: MAE's three values, then ``ids_keep``.
    ``mask_ratio`` overrides the module's for one call (MAE's ``forward_encoder(x, mask_ratio)``).
    """

    def __init__(self, mask_ratio: float = 0.75, backend: Optional[str] = None):
        super().__init__()
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.backend = backend

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, *,
                mask_ratio: Optional[float] = None) -> Tuple[torch.Tensor, ...]:
        """x: (B, L, D) float32, bfloat16, float16 or float64; noise: optional (B, L) floating tensor on x's
        device (the K smallest are kept; default ``torch.rand`` drawn from ``generator``, which is then not
        given with noise); pos_embed: optional (L, D) or (1, L, D) floating, added to the kept tokens (with
        torch's type promotion, as ``x + pos_embed``); mask_ratio: optional float in [0, 1), this call's
        instead of the module's.  Returns ``(x_kept (B, K, D) in the promoted dtype (x's), mask (B, L) in
        the default float dtype (float32), 1 = removed, ids_restore (B, L) int64, ids_keep (B, K) int64)``
        with ``K = int(L * (1 - mask_ratio))``."""
        if isinstance(noise, numbers.Number):  # MAE's random_masking(x, mask_ratio) call
            raise TypeError(f"RandomMasking's second argument is noise, got {type(noise).__name__} {noise!r}; "
                            "give the mask ratio to the constructor, RandomMasking(mask_ratio), or per call "
                            "as forward(x, mask_ratio=...)")
        ratio = self.mask_ratio if mask_ratio is None else check_mask_ratio(mask_ratio)
        return random_masking(x, ratio, noise=noise, generator=generator, pos_embed=pos_embed,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}"


class RestoreTokens(nn.Module):
    """Decoder un-shuffle that owns the learnable mask token, shape (1, 1, dim), float32,
    initialised N(0, 0.02^2); see ``fastcl.restore_tokens``.

    ``forward(x_kept, ids_restore)`` takes x_kept (B, K, dim) float and ids_restore (B, L) int and
    returns (B, L, dim) in the promoted dtype of x_kept and the token, as MAE's ``cat`` gives it:
    bf16 tokens under autocast meet the float32 token and give float32.
    """

    def __init__(self, dim: int, backend: Optional[str] = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        self.dim = int(dim)
        self.backend = backend
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x_kept: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x_kept: (B, K, dim) float32, bfloat16, float16 or float64; ids_restore: (B, L) int64, int32, int16,
        int8 or uint8, L >= K, values in [0, L): slot l takes kept token ``ids_restore[b, l]`` if it is < K,
        else the mask token.  Returns (B, L, dim) in the promoted dtype of x_kept and the token (float32
        for a float32 token and bf16/fp16 tokens)."""
        if isinstance(x_kept, torch.Tensor) and x_kept.dim() == 3 and x_kept.shape[2] != self.dim:
            raise ValueError(f"x_kept must have feature size dim = {self.dim}, got shape {tuple(x_kept.shape)}")
        return restore_tokens(x_kept, self.mask_token, ids_restore, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
