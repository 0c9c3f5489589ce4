"""MAE-style token masking: ``random_masking``, ``gather_tokens`` and ``restore_tokens``.

Given the same noise these return exactly what MAE's ``random_masking`` and decoder un-shuffle
return, without the (B, K, D) int64 index that ``torch.gather`` needs and without a dense
zero-then-scatter backward: every pass is one fused gather (``fastcl.ops.masking``).

The index tensors (``ids_restore``, ``ids_keep``, ``mask``) come from ``torch.argsort`` as in MAE,
except on the "triton" and "cuda" backends for rows of 33 to 1024 tokens, where one rank kernel
makes all three (``fastcl.ops.masking.mask_indices``): ties in the noise then keep position
order, which is what torch's CUDA sort gives such rows, so the tensors stay MAE's.  NaN noise
is the exception: the kernel puts NaNs last in position order, where torch's radix sort (rows
of more than 128) orders them by their bits (a NaN with the sign bit set first).

Backends (``backend=`` or ``FASTCL_BACKEND``, see ``fastcl.ops.dispatch.resolve_backend``):
"reference" is plain PyTorch in MAE's form; "cpu" the C++/OpenMP kernel; "triton" the Triton
kernel; "cuda" the CUDA C++ kernel (needs ``fastcl._C`` built with CUDA).  "auto" picks the C++
kernel for CPU tensors and, for CUDA tensors, the GPU kernel the committed dispatch table
(``fastcl/ops/dispatch_table.py``, by B * L tokens and D) says is faster: CUDA at every point
timed on an H200 (2026-11-28).  All dtypes: float32, bfloat16, float16 (and float64); any D; any strides.
"""
import numbers
from typing import Optional, Tuple

import torch

from fastcl.ops.dispatch import resolve_backend
from fastcl.ops.masking import GatherTokens, MaskGather, RestoreTokens, mask_indices
from fastcl.validation import check_float_tensor, check_index

Tensor = torch.Tensor

__all__ = ["random_masking", "gather_tokens", "restore_tokens"]


def _check_tokens(name: str, x) -> None:
    check_float_tensor(name, x, "(B, L, D)", non_empty=False)


def _check_addend(name: str, t: Tensor, x: Tensor, x_name: str) -> torch.dtype:
    """A floating tensor combined with ``x`` on its device; returns the dtype of the result, by
    torch's type promotion (MAE's ``x + pos_embed`` and ``cat([x, mask_tokens])`` under autocast
    meet an fp32 parameter with bf16 tokens and give fp32)."""
    check_float_tensor(name, t, None, non_empty=False)
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x_name}'s device {x.device}, got {t.device}")
    return torch.promote_types(x.dtype, t.dtype)


def _problem(B: int, L: int, D: int, dtype: torch.dtype):
    # What the dispatch table keys masking by: B * L tokens of D features (fastcl.ops.dispatch).
    return ("masking", B * L, B * L, D, dtype)


def check_mask_ratio(mask_ratio) -> float:
    """``mask_ratio`` must be a real number in [0, 1); returned as a float."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"mask_ratio must be a float in [0, 1), got {type(mask_ratio).__name__}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return float(mask_ratio)


def random_masking(x: Tensor, mask_ratio: float, *, noise: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None, pos_embed: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keep a random ``K = int(L * (1 - mask_ratio))`` tokens per sample (MAE's random_masking).

    Args:
        x: (B, L, D) float32, bfloat16, float16 or float64; any strides; may require grad.
        mask_ratio: float in [0, 1), the fraction of tokens removed.
        noise: optional (B, L) floating tensor on ``x``'s device; the K tokens with the smallest
            noise are kept.  Default ``torch.rand(B, L, generator=generator)`` on ``x``'s device.
        generator: optional ``torch.Generator`` for the default noise.
        pos_embed: optional (L, D) or (1, L, D) floating, on ``x``'s device, may require grad.
            It is added to the kept tokens in the same pass (``x + pos_embed`` is never stored).
            Of another dtype, it follows torch's type promotion, as ``x + pos_embed`` does.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (default ``FASTCL_BACKEND``/auto).

    Returns:
        x_kept: (B, K, D), dtype of ``x`` (of ``x + pos_embed``): ``(x + pos_embed)[b, ids_keep[b, k]]``.
        mask: (B, L) in the default float dtype (float32): 1 where the token was removed.
        ids_restore: (B, L) int64, the inverse permutation (``argsort(argsort(noise))``).
        ids_keep: (B, K) int64, the kept token indices in noise order.
    """
    _check_tokens("x", x)
    ratio = check_mask_ratio(mask_ratio)
    B, L, D = x.shape
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if noise is None:
        noise = torch.rand(B, L, device=x.device, generator=generator)
    elif generator is not None:  # it would be ignored: the noise decides
        raise ValueError("give noise or generator, not both (generator only draws the default noise)")
    else:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating tensor, got {noise.dtype}")
        if tuple(noise.shape) != (B, L):
            raise ValueError(f"noise must have shape (B, L) = ({B}, {L}), got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise must be on x's device {x.device}, got {noise.device}")
    if pos_embed is not None:
        out_dtype = _check_addend("pos_embed", pos_embed, x, "x")
        if tuple(pos_embed.shape) not in ((L, D), (1, L, D)):
            raise ValueError(f"pos_embed must have shape (L, D) or (1, L, D) = (1, {L}, {D}), "
                             f"got {tuple(pos_embed.shape)}")
        if out_dtype == x.dtype:
            pos_embed = pos_embed.to(x.dtype)  # exact: a narrower table's values all exist in x's dtype
    name = resolve_backend(backend, x.device, _problem(B, L, D, x.dtype))
    keep = int(L * (1 - ratio))

    ids_restore, ids_keep, mask = mask_indices(noise, keep, name)

    if name == "reference":
        src = x if pos_embed is None else x + pos_embed.reshape(1, L, D)
        x_kept = torch.gather(src, 1, ids_keep[..., None].expand(B, keep, D))
    elif pos_embed is not None and pos_embed.dtype != x.dtype:
        # a wider table: the sum is formed in its dtype, as x + pos_embed forms it, on the kept rows only
        x_kept = MaskGather.apply(x, None, ids_keep, ids_restore, name).to(pos_embed.dtype)
        x_kept = x_kept + pos_embed.reshape(L, D)[ids_keep]
    else:
        x_kept = MaskGather.apply(x, pos_embed, ids_keep, ids_restore, name)
    return x_kept, mask, ids_restore, ids_keep


def gather_tokens(x: Tensor, ids_keep: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Differentiable row gather along dim 1: ``out[b, k] = x[b, ids_keep[b, k]]``.

    The backward accumulates ``index_add``-style, so repeated indices sum their gradients; it
    needs no (B, K, D) index and writes each gradient row once.

    Args:
        x: (B, L, D) float32, bfloat16, float16 or float64; any strides.
        ids_keep: (B, K) integer tensor on ``x``'s device, values in [0, L); repeats allowed.
        backend: as in ``random_masking``.

    Returns:
        (B, K, D), dtype of ``x``.
    """
    _check_tokens("x", x)
    ids = check_index("ids_keep", ids_keep, (x.shape[0], None), x.shape[1], x.device)
    name = resolve_backend(backend, x.device, _problem(*x.shape, x.dtype))
    if name == "reference":
        return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[2]))
    return GatherTokens.apply(x, ids, name)


def restore_tokens(x_kept: Tensor, mask_token: Tensor, ids_restore: Tensor, *,
                   backend: Optional[str] = None) -> Tensor:
    """Un-shuffle for the decoder: kept tokens back in place, ``mask_token`` in removed slots.

    Equal to MAE's ``gather(cat([x_kept, mask_token.repeat(B, L - K, 1)], 1), 1, ids_restore)``.

    Args:
        x_kept: (B, K, D) float32, bfloat16, float16 or float64; any strides; may require grad.
        mask_token: (D,) or (1, 1, D) floating, on ``x_kept``'s device; may require grad.  Of
            another dtype, both follow torch's type promotion, as MAE's ``cat`` does.
        ids_restore: (B, L) integer tensor, L >= K, values in [0, L); slot l takes kept token
            ``ids_restore[b, l]`` if that is < K, else the mask token.

    Returns:
        (B, L, D), dtype of ``x_kept`` (of ``cat([x_kept, mask_token])``).  Differentiable in
        ``x_kept`` and ``mask_token``.
    """
    _check_tokens("x_kept", x_kept)
    B, K, D = x_kept.shape
    out_dtype = _check_addend("mask_token", mask_token, x_kept, "x_kept")
    if tuple(mask_token.shape) not in ((D,), (1, 1, D)):
        raise ValueError(f"mask_token must have shape (D,) or (1, 1, D) with D = {D}, "
                         f"got {tuple(mask_token.shape)}")
    if isinstance(ids_restore, torch.Tensor) and ids_restore.dim() == 2 and ids_restore.shape[1] < K:
        raise ValueError(f"ids_restore must have L >= K = {K} columns, got shape {tuple(ids_restore.shape)}")
    L = ids_restore.shape[1] if isinstance(ids_restore, torch.Tensor) and ids_restore.dim() == 2 else K
    ids = check_index("ids_restore", ids_restore, (B, None), L, x_kept.device)
    x_kept, mask_token = x_kept.to(out_dtype), mask_token.to(out_dtype)  # exact upcasts (no-ops when alike)
    name = resolve_backend(backend, x_kept.device, _problem(B, L, D, x_kept.dtype))  # the output's tokens
    if name == "reference":
        filler = mask_token.reshape(1, 1, D).expand(B, L - K, D)
        full = torch.cat([x_kept, filler], dim=1)
        return torch.gather(full, 1, ids[..., None].expand(B, L, D))
    return RestoreTokens.apply(x_kept, mask_token, ids, name)
