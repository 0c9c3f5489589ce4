"""Autograd layer of the token-masking ops, over one fused primitive, the *segment gather*:

    out[b, r] = sum_{j < n} (src[b, row_j] + pos[row_j])  if n > 0,  else fill (or 0)
    row_j = order[b, start[b, r] + j]  (or start[b, r] + j);  n = count[b, r]  (or 1 if start < J)

Forward gathers, the un-shuffle with a mask token, and every backward (a scatter written as a
gather by the output's owner: no dense index, no atomics, deterministic) are single calls of it.
The primitive is a ``torch.library`` custom op, so ``torch.compile`` sees it as one opaque node.
User-facing validation lives in ``fastcl.masking``; these functions assume checked inputs.
"""
from typing import Optional, Tuple

import torch

from fastcl.ops.dispatch import on_device_of
from fastcl.ops.eager import needs_custom_op, per_sample_vmap
from fastcl.ops.reference import compute_dtype

Tensor = torch.Tensor


def _unit_last(t: Optional[Tensor]) -> Optional[Tensor]:
    # Kernels take any batch/row strides but need unit stride along the feature dim.  Under
    # torch.compile, contiguous: torch 2.4's compile cannot read a stride in the op's backward.
    if t is None or (not torch.compiler.is_compiling() and t.stride(-1) == 1):
        return t
    return t.contiguous()


def segment_gather(src: Tensor, start: Tensor, count: Optional[Tensor], order: Optional[Tensor],
                   fill: Optional[Tensor], pos: Optional[Tensor], out_fp32: bool, backend: str) -> Tensor:
    """The fused primitive (module docstring); ``backend`` is "cpu", "triton" or "cuda".

    src (B, S, D) float; start/count (B, R) int64; order (B, J) int64; fill (D,) and pos (S, D)
    in ``src.dtype``.  Returns (B, R, D) in ``src.dtype`` (fp32/fp64 if ``out_fp32``).
    Under ``torch.compile``, a dispatch mode (FakeTensorMode, ...) or a tensor subclass this is the
    custom op ``fastcl::masking_segment_gather`` (one opaque node with a fake kernel); on plain
    tensors in eager mode the kernel is called directly, without the custom op's dispatch, which
    costs more than the whole kernel launch at MAE's sizes."""
    if needs_custom_op(src):
        return segment_gather_op(src, start, count, order, fill, pos, out_fp32, backend)
    return _segment_gather(src, start, count, order, fill, pos, out_fp32, backend)


def _segment_gather(src, start, count, order, fill, pos, out_fp32, backend):
    src, pos = _unit_last(src), _unit_last(pos)
    fill = fill.reshape(-1).contiguous() if fill is not None else None
    if backend in ("cpu", "cuda"):
        return torch.ops.fastcl_C.masking_segment_gather(src, start, count, order, fill, pos, out_fp32)
    if backend == "triton":
        from fastcl.kernels.masking import segment_gather as triton_segment_gather
        with on_device_of(src):
            return triton_segment_gather(src, start, count, order, fill, pos, out_fp32)
    raise ValueError(f"masking has no fused {backend!r} backend")


@torch.library.custom_op("fastcl::masking_segment_gather", mutates_args=())
def segment_gather_op(src: Tensor, start: Tensor, count: Optional[Tensor], order: Optional[Tensor],
                      fill: Optional[Tensor], pos: Optional[Tensor], out_fp32: bool, backend: str) -> Tensor:
    """``segment_gather`` as a custom op, for ``torch.compile``."""
    return _segment_gather(src, start, count, order, fill, pos, out_fp32, backend)


@segment_gather_op.register_fake
def _(src, start, count, order, fill, pos, out_fp32, backend):
    return src.new_empty((src.shape[0], start.shape[1], src.shape[2]),
                         dtype=compute_dtype(src.dtype) if out_fp32 else src.dtype)


# Rows whose index tensors come from the rank kernel.  Above 32 tokens torch's CUDA sort of a row
# is stable, as ranks are (at 32 or fewer it is an unstable bitonic sort, so MAE's order of tied
# noise there is the sort's own); up to 1024 the kernel's L * L compares stay under a sort's time
# (an estimate: unmeasured on a GPU).
RANK_MIN_L, RANK_MAX_L = 33, 1024


def mask_indices(noise: Tensor, keep: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """MAE's index tensors for keeping ``keep`` tokens of each row of ``noise`` (B, L).

    Returns ``ids_restore`` (B, L) int64 (``argsort(argsort(noise))``), ``ids_keep`` (B, K) int64
    (``argsort(noise)[:, :keep]``) and ``mask`` (B, L) in the default float dtype (1 = removed).
    The "triton" and "cuda" backends make all three in one launch of a rank kernel for rows of
    ``RANK_MIN_L`` to ``RANK_MAX_L`` tokens (float32/64 masks, plain tensors, eager mode); ties
    in the noise then keep their positions' order, as torch's CUDA sort does for such rows
    (NaNs go last in position order; torch's radix sort, above 128 tokens, orders them by their
    bits).  Otherwise ``torch.argsort``, as MAE does."""
    L = noise.shape[1]
    mask_dtype = torch.get_default_dtype()
    if (backend in ("triton", "cuda") and RANK_MIN_L <= L <= RANK_MAX_L
            and mask_dtype in (torch.float32, torch.float64)
            and noise.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            and not needs_custom_op(noise)):
        return _mask_indices(noise, keep, mask_dtype, backend)
    ids_shuffle = torch.argsort(noise, dim=1)
    # The inverse of a permutation by one scatter: equal to argsort(ids_shuffle), without a sort.
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(L, device=noise.device).expand_as(ids_shuffle))
    mask = (ids_restore >= keep).to(mask_dtype)
    return ids_restore, ids_shuffle[:, :keep], mask


def _mask_indices(noise: Tensor, keep: int, mask_dtype: torch.dtype, backend: str):
    noise = noise.detach()  # the op has no autograd kernel: a noise requiring grad would taint the mask
    if backend == "cuda":
        return torch.ops.fastcl_C.masking_indices(noise, keep, mask_dtype)
    from fastcl.kernels.masking import mask_indices as triton_mask_indices
    with on_device_of(noise):
        return triton_mask_indices(noise, keep, mask_dtype)


def csr_segments(idx: Tensor, buckets: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Group the positions k of ``idx`` (B, K) int64 by value in [0, buckets).

    Returns ``start`` and ``count`` (B, buckets) int64 and ``order`` (B, K) int64: the k with
    ``idx[b, k] == v`` are ``order[b, start[b, v] : start[b, v] + count[b, v]]``, ascending."""
    order = torch.argsort(idx, dim=1, stable=True)
    count = torch.zeros((idx.shape[0], buckets), dtype=torch.int64, device=idx.device)
    count.scatter_add_(1, idx, torch.ones_like(idx))
    start = torch.cumsum(count, dim=1) - count
    return start, count, order


class MaskGather(torch.autograd.Function):
    """x_kept = (x + pos)[b, ids_keep[b, k]] where ids_keep is part of a permutation whose
    inverse is ids_restore; the backward is one owner-computes gather through ids_restore."""

    @staticmethod
    def forward(x, pos, ids_keep, ids_restore, backend):
        pos2d = None if pos is None else pos.reshape(pos.shape[-2], pos.shape[-1])
        return segment_gather(x, ids_keep, None, None, None, pos2d, False, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, pos, _, ids_restore, backend = inputs
        ctx.save_for_backward(ids_restore)
        ctx.backend, ctx.pos_shape = backend, None if pos is None else pos.shape

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        # dx[b, l] = g[b, ids_restore[b, l]] when that slot was kept (< K), else 0.
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops (the kernel has no derivative)
            B, L = ids_restore.shape
            full = torch.cat([g, g.new_zeros(B, L - g.shape[1], g.shape[2])], 1)
            dx = torch.gather(full, 1, ids_restore[..., None].expand(B, L, g.shape[2]))
        else:
            dx = segment_gather(_unit_last(g), ids_restore, None, None, None, None, False, ctx.backend)
        dpos = dx.sum(0).reshape(ctx.pos_shape) if ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None), dpos, None, None, None


class GatherTokens(torch.autograd.Function):
    """out[b, k] = x[b, idx[b, k]]; backward dx[b, l] = sum_{k: idx[b, k] = l} g[b, k]."""

    @staticmethod
    def forward(x, idx, backend):
        return segment_gather(x, idx, None, None, None, None, False, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, idx, backend = inputs
        ctx.save_for_backward(idx)
        ctx.backend, ctx.L = backend, x.shape[1]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            B, K, D = g.shape
            return g.new_zeros(B, ctx.L, D).scatter_add(1, idx[..., None].expand(B, K, D), g), None, None
        start, count, order = csr_segments(idx, ctx.L)
        return segment_gather(_unit_last(g), start, count, order, None, None, False, ctx.backend), None, None


class RestoreTokens(torch.autograd.Function):
    """out[b, l] = x_kept[b, r] if r = ids_restore[b, l] < K else mask_token.

    Backward: the slots are grouped by r (K + 1 buckets, the last one all r >= K), so d x_kept
    and d mask_token are each one gather-sum; this stays right even if ids_restore repeats."""

    @staticmethod
    def forward(x_kept, mask_token, ids_restore, backend):
        return segment_gather(x_kept, ids_restore, None, None, mask_token.reshape(-1), None, False, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_kept, mask_token, ids_restore, backend = inputs
        ctx.save_for_backward(ids_restore)
        ctx.backend, ctx.K, ctx.token_shape = backend, x_kept.shape[1], mask_token.shape

    @staticmethod
    def backward(ctx, g):
        (ids_restore,) = ctx.saved_tensors
        K = ctx.K
        dx = dtok = None
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            B, L, D = g.shape
            slot = ids_restore.clamp(max=K)[..., None].expand(B, L, D)
            if ctx.needs_input_grad[0]:
                dx = g.new_zeros(B, K + 1, D).scatter_add(1, slot, g)[:, :K]
            if ctx.needs_input_grad[1]:
                removed = (ids_restore >= K)[..., None]
                dtok = (g.to(compute_dtype(g.dtype)) * removed).sum((0, 1)).to(g.dtype).reshape(ctx.token_shape)
            return dx, dtok, None, None
        g = _unit_last(g)
        start, count, order = csr_segments(ids_restore.clamp(max=K), K + 1)
        if ctx.needs_input_grad[0]:
            dx = segment_gather(g, start[:, :K], count[:, :K], order, None, None, False, ctx.backend)
        if ctx.needs_input_grad[1]:
            part = segment_gather(g, start[:, K:], count[:, K:], order, None, None, True, ctx.backend)
            dtok = part.sum((0, 1)).to(g.dtype).reshape(ctx.token_shape)
        return dx, dtok, None, None


# torch.func transforms (vmap, and vmap over grad) run each sample through the Function
for _function in (MaskGather, GatherTokens, RestoreTokens):
    _function.vmap = staticmethod(per_sample_vmap(_function))
