"""Ring versions of the fused ops: key shards circulate, remote memory stays O(B_local * D).

Each rank holds its queries ``q_r`` and keys ``k_r``.  The keys travel around the ring
(rank r sends to r+1); at every step a rank computes one block ``(q_r, k_t)`` with the fused
kernels while the next shard is already in flight.

``ring_similarity_lse``: the travelling shard carries its partial *column* log-sum-exp, which
every rank merges in, so after one lap the owner has its keys' global column LSE (the
text->image direction of CLIP) while the row LSE (image->text) was merged locally.  The backward
sends the shards round again with their global column statistics; each rank calls the fused
backward per block with the *global* row/column LSE, which yields exactly that block's share of
the gradient, keeps ``Gq`` and adds ``Gk`` to an accumulator that travels home with the shard.

``ring_sigmoid_pair_loss``: SigLIP's pair sum, positives only in the local block; every remote
block is all negatives.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

import fastcl.ops.sigmoid_pair  # noqa: F401  (registers torch.ops.fastcl.sigmoid_pair_*)
import fastcl.ops.similarity_lse  # noqa: F401  (registers torch.ops.fastcl.similarity_lse_*)
from fastcl.distributed import Ring, refuse_graph_backward
from fastcl.ops.dispatch import resolve_backend
from fastcl.ops.reference import apply_function, compute_dtype, reference_logits, scalar_tensor, softmax_mass

Tensor = torch.Tensor


def block_backend(op: str, backend: Optional[str], q: Tensor, sizes) -> str:
    """Concrete backend for the ring's blocks of ``op`` ("similarity_lse" or "sigmoid_pair"):
    "reference" (materialised block), "cpu", "triton" or "cuda".  ``auto`` resolves as for one
    block of the single-device op, ``q`` (n_r, D) against the largest key shard in ``sizes``:
    the measured GPU table decides, and float64 on CUDA goes to the reference."""
    problem = (op, q.shape[0], max(sizes), q.shape[1], q.dtype)
    return resolve_backend(backend, q.device, problem)


# ---- one block (q, k): fused custom ops, or a materialised fallback without the extension ----

def _lse_block_fwd(q, k, scale_t, bias_t, cols: bool, diag: Optional[int], backend: str):
    if backend == "reference":
        s = reference_logits(q, k, scale_t, bias_t, diag)
        col = torch.logsumexp(s, 0) if cols else s.new_empty((0,))
        return torch.logsumexp(s, 1), col
    row, col, _ = torch.ops.fastcl.similarity_lse_fwd(q, k, scale_t, bias_t, True, cols, diag, False, None, backend)
    return row, col


def _lse_block_bwd(q, k, scale_t, bias_t, row_lse, col_lse, g_row, g_col, diag, backend):
    if backend == "reference":
        ct = compute_dtype(q.dtype)
        s = reference_logits(q, k, scale_t, bias_t, diag)
        ds = g_row[:, None] * torch.exp(s - row_lse[:, None])
        if col_lse.numel():
            ds = ds + g_col[None, :] * torch.exp(s - col_lse[None, :])
        return ds @ k.to(ct), ds.T @ q.to(ct)
    # Unscaled fp32 (fp64) Gq, Gk of this block: grad_scale 1, no positive logits.
    ct = compute_dtype(q.dtype)
    gq, gk, _ = torch.ops.fastcl.similarity_lse_bwd(q, k, scale_t, bias_t, row_lse, col_lse, g_row, g_col,
                                                    row_lse.new_empty((0,)), None, diag, torch.ones_like(scale_t), ct,
                                                    True, True, backend)
    return gq, gk


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """Merge two partial log-sum-exps (torch.logaddexp is max-shifted and maps -inf, -inf to -inf)."""
    return torch.logaddexp(a, b)


class _HomewardSum:
    """Sums a travelling key shard's gradient: each rank adds its block's part, then passes the
    running sum on with the shard, so after the last step every shard's sum is back home."""

    def __init__(self, ring: Ring, sizes, home_rows: int, d: int, dtype: torch.dtype):
        self.ring, self.sizes, self.home_rows, self.d, self.dtype = ring, sizes, home_rows, d, dtype
        self.pending, self.incoming, self.total = None, None, None

    def add(self, t: int, part: Tensor) -> None:
        """Adds this rank's part for the shard held at step ``t`` and sends the sum onward."""
        w = self.ring.world
        if t > 0:
            Ring.wait(self.pending)
            part = self.incoming[0] + part
        if w == 1:
            self.total = part
            return
        back = self.sizes[self.ring.origin(t + 1)] if t < w - 1 else self.home_rows
        self.pending, self.incoming = self.ring.exchange([part], [((back, self.d), self.dtype)])

    def home(self) -> Tensor:
        """This rank's own shard's summed gradient, once every step has been added."""
        if self.ring.world > 1:
            Ring.wait(self.pending)
            self.total = self.incoming[0]
        return self.total


class _RingLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale_t, bias_t, cols, exclude_self, backend, ring, sizes):
        ct = compute_dtype(q.dtype)
        n, m, d = q.shape[0], k.shape[0], k.shape[1]
        w = ring.world
        row = torch.full((n,), float("-inf"), dtype=ct, device=q.device)
        shard, col_in, pend_k, pend_c = k.detach(), None, None, None
        col_own = None
        for t in range(w):
            if t < w - 1:  # the next shard travels while this block computes
                nxt = sizes[ring.origin(t + 1)]
                pend_k, recv_k = ring.exchange([shard], [((nxt, d), k.dtype)])
            diag = 0 if (t == 0 and exclude_self) else None
            r_part, c_part = _lse_block_fwd(q, shard, scale_t, bias_t, cols, diag, backend)
            row = _merge(row, r_part)
            if cols:
                if t > 0:
                    Ring.wait(pend_c)
                    c_part = _merge(col_in[0], c_part)
                if w == 1:
                    col_own = c_part
                else:
                    # after the last block the statistics are complete and go home (next rank)
                    back = sizes[ring.origin(t + 1)] if t < w - 1 else m
                    pend_c, col_in = ring.exchange([c_part], [((back,), ct)])
            if t < w - 1:
                Ring.wait(pend_k)
                shard = recv_k[0]
        if cols and w > 1:
            Ring.wait(pend_c)
            col_own = col_in[0]
        if col_own is None:
            col_own = row.new_empty((0,))
        ctx.save_for_backward(q, k, scale_t, bias_t, row, col_own)
        ctx.exclude_self, ctx.backend, ctx.ring, ctx.sizes = exclude_self, backend, ring, sizes
        return row, col_own

    @staticmethod
    def backward(ctx, g_row, g_col):
        refuse_graph_backward("the ring ops (dist_impl='ring')", ctx.ring.world)
        q, k, scale_t, bias_t, row, col = ctx.saved_tensors
        ring, sizes, backend = ctx.ring, ctx.sizes, ctx.backend
        ct, d, w = row.dtype, k.shape[1], ring.world
        cols = col.numel() > 0
        g_row = torch.zeros_like(row) if g_row is None else g_row.to(ct).contiguous()
        g_col = torch.zeros_like(col) if (g_col is None or not cols) else g_col.to(ct).contiguous()
        # A shard travels with its global column statistics: (2, M) = [col LSE; grad of col LSE].
        shard, stats = k.detach(), torch.stack([col, g_col]) if cols else None
        gq = torch.zeros(q.shape, dtype=ct, device=q.device)
        gk_sum = _HomewardSum(ring, sizes, k.shape[0], d, ct)
        for t in range(w):
            if t < w - 1:
                nxt = sizes[ring.origin(t + 1)]
                sends, like = [shard], [((nxt, d), k.dtype)]
                if cols:
                    sends.append(stats)
                    like.append(((2, nxt), ct))
                pend_k, recv = ring.exchange(sends, like)
            diag = 0 if (t == 0 and ctx.exclude_self) else None
            c_lse = stats[0] if cols else col
            c_g = stats[1] if cols else col
            gq_t, gk_t = _lse_block_bwd(q, shard, scale_t, bias_t, row, c_lse, g_row, c_g, diag, backend)
            gq += gq_t
            gk_sum.add(t, gk_t)
            if t < w - 1:
                Ring.wait(pend_k)
                shard = recv[0]
                stats = recv[1] if cols else None
        acc = gk_sum.home()
        s = scale_t.to(ct)
        dq = (gq * s).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (acc * s).to(k.dtype) if ctx.needs_input_grad[1] else None
        dscale = (q.to(ct) * gq).sum().to(scale_t.dtype) if ctx.needs_input_grad[2] else None
        dbias = None
        if ctx.needs_input_grad[3]:
            # Every finite row (column) of the global softmax sums to 1 over all blocks.
            total = softmax_mass(g_row, row)
            if cols:
                total = total + softmax_mass(g_col, col)
            dbias = total.to(bias_t.dtype)
        return dq, dk, dscale, dbias, None, None, None, None, None


def _scalar(value, like: Tensor) -> Tensor:
    return scalar_tensor(value, like.device, compute_dtype(like.dtype))


def ring_similarity_lse(q: Tensor, k: Tensor, scale, bias=None, *, cols: bool = False,
                        exclude_self: bool = False, ring: Ring, sizes, backend: Optional[str] = None
                        ) -> Tuple[Tensor, Tensor]:
    """Row LSE of local ``q`` against every rank's keys, and (optionally) column LSE of local ``k``
    against every rank's queries, of ``S = scale * q @ k.T + bias``, by one ring pass.

    Collective: every rank of ``ring.group`` must call it (and run its backward) with the same
    ``cols``/``exclude_self``.  Memory for remote data: two key shards and one accumulator.

    Args:
        q: (n_r, D) float tensor, this rank's queries.
        k: (m_r, D), same dtype and device, this rank's keys (``m_r == n_r`` if ``exclude_self``).
        scale, bias: float or 0-d tensor (may require grad), the same on every rank.
        cols: also return the global column LSE of this rank's keys.
        exclude_self: leave out the entries (i, i) of the local block (q and k are the same rows).
        ring: ``fastcl.distributed.Ring`` over the group.
        sizes: key rows on every rank of the group, ``sizes[ring.rank] == m_r``.
        backend: see ``fastcl.ops.similarity_lse``; "reference" materialises each block.

    Returns:
        (row (n_r,), col (m_r,) or (0,)) float32 (float64 for float64 inputs), differentiable in
        q, k, scale and bias; the backward sends each key gradient home to its owner.
    """
    be = block_backend("similarity_lse", backend, q, sizes)
    bias_t = _scalar(0.0 if bias is None else bias, q)
    return apply_function(_RingLSE, q, k, _scalar(scale, q), bias_t, cols, exclude_self, be, ring, list(sizes))


# ---- SigLIP pair sum ----

def _sp_block_fwd(q, k, scale_t, bias_t, positives: bool, backend: str) -> Tensor:
    if backend == "reference":
        s = reference_logits(q, k, scale_t, bias_t)
        z = -torch.ones_like(s)
        if positives:
            z.diagonal()[:] = 1.0
        return -F.logsigmoid(z * s).sum()
    total = torch.ops.fastcl.sigmoid_pair_fwd(q, k, scale_t, bias_t, backend)
    if not positives:
        # The op treats (i, i) as positive: softplus(s) = softplus(-s) + s turns it negative.
        total = total + _diag_logits(q, k, scale_t, bias_t).sum()
    return total


def _diag_logits(q, k, scale_t, bias_t) -> Tensor:
    ct = compute_dtype(q.dtype)
    d = min(q.shape[0], k.shape[0])
    return (q[:d].to(ct) * k[:d].to(ct)).sum(-1) * scale_t + bias_t


def _sp_block_bwd(q, k, scale_t, bias_t, positives: bool, backend: str):
    """(Gq, Gk, sum G) with G = dL/ds of the block."""
    ct = compute_dtype(q.dtype)
    if backend == "reference":
        s = reference_logits(q, k, scale_t, bias_t)
        g = torch.sigmoid(s)
        if positives:
            g.diagonal()[:] = -torch.sigmoid(-s.diagonal())
        return g @ k.to(ct), g.T @ q.to(ct), g.sum()
    gq, gk, _, gsum = torch.ops.fastcl.sigmoid_pair_bwd(q, k, scale_t, bias_t, torch.ones_like(scale_t), ct, True, True,
                                                        backend)
    if not positives:
        # sigmoid(s) - (-sigmoid(-s)) = 1 on the diagonal
        d = min(q.shape[0], k.shape[0])
        gq = gq.clone()
        gk = gk.clone()
        gq[:d] += k[:d].to(ct)
        gk[:d] += q[:d].to(ct)
        gsum = gsum + d
    return gq, gk, gsum


class _RingSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale_t, bias_t, backend, ring, sizes):
        d, w = k.shape[1], ring.world
        total = None
        shard = k.detach()
        for t in range(w):
            if t < w - 1:
                pend, recv = ring.exchange([shard], [((sizes[ring.origin(t + 1)], d), k.dtype)])
            part = _sp_block_fwd(q, shard, scale_t, bias_t, t == 0, backend)
            total = part if total is None else total + part
            if t < w - 1:
                Ring.wait(pend)
                shard = recv[0]
        ctx.save_for_backward(q, k, scale_t, bias_t)
        ctx.backend, ctx.ring, ctx.sizes = backend, ring, sizes
        return total

    @staticmethod
    def backward(ctx, g):
        refuse_graph_backward("the ring ops (dist_impl='ring')", ctx.ring.world)
        q, k, scale_t, bias_t = ctx.saved_tensors
        ring, sizes, backend = ctx.ring, ctx.sizes, ctx.backend
        ct, d, w = compute_dtype(q.dtype), k.shape[1], ring.world
        g = g.to(ct)
        shard = k.detach()
        gq = torch.zeros(q.shape, dtype=ct, device=q.device)
        gsum = torch.zeros((), dtype=ct, device=q.device)
        gk_sum = _HomewardSum(ring, sizes, k.shape[0], d, ct)
        for t in range(w):
            if t < w - 1:
                pend_k, recv = ring.exchange([shard], [((sizes[ring.origin(t + 1)], d), k.dtype)])
            gq_t, gk_t, gs_t = _sp_block_bwd(q, shard, scale_t, bias_t, t == 0, backend)
            gq += gq_t
            gsum = gsum + gs_t
            gk_sum.add(t, gk_t * g)  # this rank's upstream gradient, before the block leaves
            if t < w - 1:
                Ring.wait(pend_k)
                shard = recv[0]
        acc = gk_sum.home()
        s = scale_t.to(ct)
        dq = (gq * (g * s)).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (acc * s).to(k.dtype) if ctx.needs_input_grad[1] else None
        dscale = (g * (q.to(ct) * gq).sum()).to(scale_t.dtype) if ctx.needs_input_grad[2] else None
        dbias = (g * gsum).to(bias_t.dtype) if ctx.needs_input_grad[3] else None
        return dq, dk, dscale, dbias, None, None, None


def ring_sigmoid_pair_loss(q: Tensor, k: Tensor, scale, bias, *, ring: Ring, sizes,
                           backend: Optional[str] = None) -> Tensor:
    """Sum of ``softplus(-z_ij * (scale * q_i . k_j + bias))`` over local rows i and every rank's keys j.

    ``z = +1`` only for ``(i, i)`` in the local block (this rank's own pairs) and -1 for all other
    pairs, remote ones included.  Collective over ``ring.group``, like ``ring_similarity_lse``.

    Args:
        q: (n_r, D) float tensor; k: (m_r, D), same dtype and device.
        scale: positive float or 0-d tensor; bias: float or 0-d tensor (may require grad).
        ring, sizes: as in ``ring_similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), differentiable in q, k, scale and bias.
    """
    be = block_backend("sigmoid_pair", backend, q, sizes)
    return apply_function(_RingSigmoid, q, k, _scalar(scale, q), _scalar(bias, q), be, ring, list(sizes))
