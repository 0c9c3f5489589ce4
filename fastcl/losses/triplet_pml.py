"""pytorch-metric-learning's ``TripletMarginLoss`` (all triplets, its defaults), in bounded memory.

PML builds every (anchor, positive, negative) triplet from the labels, an (N, M, M) mask, and
averages ``relu(d_ap - d_an + margin)`` over the triplets whose loss is above 0, with d the
Euclidean distance of L2-normalised rows.  Per anchor, with its negatives' distances y sorted
and their prefix sums S, a positive at x has ``c = #{y < x + margin}`` violating negatives and
the loss sum ``c (x + margin) - S[c]``; the gradient of ``d_ap`` is c and that of ``d_an`` minus
the number of positives with ``x + margin > y``.  ``_AllTriplets`` walks row blocks of the
distance matrix within the workspace bound, sorting each row: O(N M log M) time, O(block x M)
memory.  A miner's triplets (or pairs, converted as PML converts them) take the dense matrix.
"""
from typing import Optional, Sequence

import torch

from fastcl.losses.euclidean import distance_grads, euclidean_distances
from fastcl.losses.ntxent import l2_normalize
from fastcl.losses.supcon import check_pml_args, mined_pairs, pml_classes
from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import apply_function, autocast_off, compute_dtype
from fastcl.ops.strips import row_blocks
from fastcl.validation import check_scalar


def _block_bytes(ct: torch.dtype) -> int:
    """Scratch per entry of a row block: distances and their temporaries, sorted copies with int64
    sort indices, int64 counts, float64 prefix sums and products, and masks."""
    return 6 * torch.finfo(ct).bits // 8 + 6 * 8 + 4


def _block(q, k, classes, ref_classes, self_pairs: bool, margin: float, r0: int, r1: int):
    """Distances of anchors [r0, r1), their positives' thresholds t = d + margin (+inf off the
    positives) and negatives' distances (+inf off the negatives), and the masks."""
    d = euclidean_distances(q[r0:r1], k)
    pos = classes[r0:r1, None] == ref_classes[None, :]
    neg = ~pos
    if self_pairs:  # anchor i is contrast i: neither positive nor negative
        pos.diagonal(offset=r0).fill_(False)
        neg.diagonal(offset=r0).fill_(False)
    inf = float("inf")
    return d, pos, neg, torch.where(pos, d + margin, inf), torch.where(neg, d, inf)


def _violations(t: torch.Tensor, y: torch.Tensor):
    """Per entry of t (rows, M): (#{y < t}, sum of those y in float64), y sorted per row."""
    ys = y.sort(dim=1).values
    count = torch.searchsorted(ys, t.contiguous())
    prefix = torch.cat([torch.zeros_like(ys[:, :1], dtype=torch.float64),
                        torch.where(torch.isinf(ys), 0.0, ys.double()).cumsum(dim=1)], dim=1)
    return count, prefix.gather(1, count)


class _AllTriplets(torch.autograd.Function):
    """(sum of the violating triplets' losses, their number) over all triplets of the class ids;
    the sum differentiable in q, k (unit rows), the int64 count not.  It runs outside autocast, in
    the compute dtype.  setup_context style with a per-sample vmap rule, so torch.func transforms
    (grad, vmap and their nestings) take it."""

    @staticmethod
    def forward(q, k, classes, ref_classes, self_pairs, margin):
        ct = q.dtype
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        count = torch.zeros((), dtype=torch.int64, device=q.device)
        with autocast_off(q.device):
            for r0, r1 in row_blocks(q.shape[0], k.shape[0], _block_bytes(ct)):
                d, pos, neg, t, y = _block(q, k, classes, ref_classes, self_pairs, margin, r0, r1)
                c, below = _violations(t, y)
                c = torch.where(pos, c, 0)
                total += (torch.where(pos, c * t.double() - below, 0.0)).sum()
                count += c.sum()
                del d, pos, neg, t, y, c, below
        return total.to(ct), count

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, classes, ref_classes, self_pairs, margin = inputs
        count = output[1]
        ctx.save_for_backward(q, k, classes, ref_classes, count)
        ctx.self_pairs, ctx.margin = self_pairs, margin
        ctx.mark_non_differentiable(count)

    @staticmethod
    def backward(ctx, grad, _):
        q, k, classes, ref_classes, count = ctx.saved_tensors
        ct = q.dtype
        # Out of place: under vmap(grad) these are batched tensors, which cannot be written into a
        # plain buffer.
        gq, gk = [], torch.zeros_like(k)
        with autocast_off(q.device):
            for r0, r1 in row_blocks(q.shape[0], k.shape[0], _block_bytes(ct)):
                d, pos, neg, t, y = _block(q, k, classes, ref_classes, ctx.self_pairs, ctx.margin, r0, r1)
                c_pos = torch.where(pos, _violations(t, y)[0], 0)
                # negative n: the positives with t > y_n, = P - #{t <= y_n} (t is +inf off the positives)
                n_pos = pos.sum(dim=1, keepdim=True)
                c_neg = torch.where(neg, n_pos - torch.searchsorted(t.sort(dim=1).values, y.contiguous(), right=True),
                                    0)
                gq_b, gk_b = distance_grads((c_pos - c_neg).to(ct) * grad, d, q[r0:r1], k)
                gq.append(gq_b)
                gk = gk + gk_b
                del d, pos, neg, t, y, gq_b, gk_b
        return torch.cat(gq) if gq else torch.zeros_like(q), gk, None, None, None, None


_AllTriplets.vmap = staticmethod(per_sample_vmap(_AllTriplets))


def pairs_as_triplets(a1: torch.Tensor, p: torch.Tensor, a2: torch.Tensor, n: torch.Tensor):
    """PML's triplets from pairs (a1, p, a2, n): every positive pair (a, p) with every negative
    pair of the same anchor (a, n) gives (a, p, n)."""
    pi, ni = torch.where(a1[:, None] == a2[None, :])
    return a1[pi], p[pi], n[ni]


def triplet_margin_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, margin=0.05, *,
                            indices_tuple: Optional[Sequence[torch.Tensor]] = None,
                            ref_emb: Optional[torch.Tensor] = None,
                            ref_labels: Optional[torch.Tensor] = None, exclude_self: bool = False) -> torch.Tensor:
    """Triplet margin loss in pytorch-metric-learning's form: ``TripletMarginLoss(margin)(embeddings,
    labels, indices_tuple, ref_emb, ref_labels)`` with its defaults (Euclidean distance of
    L2-normalised rows, every triplet, no swap, no smoothing, the mean over triplets with a loss
    above 0).

    Every triplet (a, p, n) with ``labels[p] == labels[a]`` (p != a unless ``ref_emb`` comes with
    other ``ref_labels``) and ``labels[n] != labels[a]`` has the loss ``relu(d_ap - d_an +
    margin)``; the result is the mean of those above 0, and 0 when there are none.  Without
    ``indices_tuple`` no triplet list exists: per anchor the negatives' distances are sorted, in
    row blocks within the workspace bound, O(N M log M) time and O(block x M) memory (PML holds an
    (N, M, M) mask).  A miner's triplets (pairs are paired up per anchor, as PML does) take the
    dense (N, M) distances.  NaN in any embedding gives NaN.  Distances come from
    ``torch.cdist``, as PML's, so near-duplicate rows carry its Gram-formula rounding (about 3e-4
    in fp32); split into row blocks, its GEMM may round a few ulps differently, so a triplet whose
    loss PML rounds to about 1e-16 (a tie of ``d_an`` with ``d_ap + margin`` to the last bit) may
    then count differently.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) class of each row; optional with ``indices_tuple``.
        margin: float or 0-d tensor (a learnable one gets its gradient), PML's default 0.05.
        indices_tuple: optional mined triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)``.
        ref_emb: optional (M, D) reference embeddings; ref_labels: their (M,) classes.
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    labels, ref_labels = check_pml_args(embeddings, labels, 0.1, indices_tuple, ref_emb, ref_labels, exclude_self)
    margin = check_scalar("margin", margin, device=embeddings.device)
    learnable = margin if isinstance(margin, torch.Tensor) and margin.requires_grad else None
    margin = float(margin.detach() if isinstance(margin, torch.Tensor) else margin)  # the counts need its value
    ct = compute_dtype(embeddings.dtype)
    n = embeddings.shape[0]
    q = l2_normalize(embeddings).to(ct)
    k = q if ref_emb is None else l2_normalize(ref_emb).to(ct)
    poison = (q.sum() + k.sum()) * 0  # NaN in any embedding gives NaN, PML's zero loss included
    if indices_tuple is not None:
        a1, p, a2, neg = mined_pairs(indices_tuple, n, k.shape[0], q.device, zero_if_tiny=False)
        a, p, neg = pairs_as_triplets(a1, p, a2, neg) if len(indices_tuple) == 4 else (a1, p, neg)
        if a.numel() == 0:
            return poison
        with autocast_off(q.device):
            d = euclidean_distances(q, k)
            losses = torch.relu(d[a, p] - d[a, neg] + (margin if learnable is None else learnable.reshape(()).to(ct)))
        above = losses > 0
        return torch.where(above, losses, 0.0).sum() / above.sum().clamp_min(1) + poison
    classes, ref_classes, _, self_pairs = pml_classes(labels, None if ref_emb is None else ref_labels, exclude_self)
    total, count = apply_function(_AllTriplets, q, k, classes, ref_classes, self_pairs, margin)
    loss = total / count.clamp_min(1).to(ct) + poison
    if learnable is not None:  # d loss / d margin = 1 while any triplet violates it
        m = learnable.reshape(()).to(ct)
        loss = loss + (m - m.detach()) * (count > 0).to(ct)
    return loss
