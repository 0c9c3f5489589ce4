"""pytorch-metric-learning's ``MultiSimilarityLoss``, ``CircleLoss`` and ``ContrastiveLoss``, in
bounded memory.

PML forms the (N, M) similarity or distance matrix, two (N, M) masks, and for the contrastive
loss lists every positive and negative pair (four int64 tensors of up to N x M entries).  Each
of these losses is a sum of per-anchor terms over that anchor's positives and negatives, so
``_RowStats`` walks row blocks of the matrix within the workspace bound, keeps a few numbers
per anchor, and recomputes each block in the backward (memory O(block x M)).  A miner's
``indices_tuple`` becomes dense (N, M) masks (pair counts for the contrastive loss), as PML's
own, while the scores still go in row blocks.
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from fastcl.losses.euclidean import distance_grads, euclidean_distances
from fastcl.losses.ntxent import l2_normalize
from fastcl.losses.supcon import _mean_nonzero, check_pml_args, mined_pair_masks, mined_pairs, pair_counts, pml_classes
from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import apply_function, autocast_off, compute_dtype, graph_grads, scalar_tensor
from fastcl.ops.strips import row_blocks
from fastcl.validation import check_scalar


class _Rows:
    """One row-block loss: the score form (cosine or Euclidean distance of unit rows), the pairs
    (class ids, or a miner's dense (N, M) masks or pair counts), ``stats(x, pos, neg, *params) ->
    (rows, K)`` (differentiable PyTorch in the compute dtype; params are 0-d tensors), its
    derivative ``grads(x, pos, neg, g, params, need) -> (dx (rows, M), [d param or None])`` of
    ``sum(g * stats)`` for g (rows, K) (a parameter's only where ``need`` says so), and the
    scratch bytes per matrix entry: the scores and the temporaries of ``stats`` (with those
    autograd keeps, under create_graph) in units of the compute dtype, ``temporaries``."""

    def __init__(self, stats: Callable, grads: Callable, distance: bool, temporaries: int, *, classes=None,
                 ref_classes=None, self_pairs: bool = False, masks=None):
        self.stats, self.grads, self.distance, self.temporaries = stats, grads, distance, temporaries
        self.classes, self.ref_classes, self.self_pairs, self.masks = classes, ref_classes, self_pairs, masks

    def block_bytes(self, ct: torch.dtype) -> int:
        # plus three bool masks, or the block's views of the dense ones
        return self.temporaries * torch.finfo(ct).bits // 8 + 3

    def scores(self, qb: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.distance:
            return euclidean_distances(qb, k)
        return qb @ k.T

    def pairs(self, r0: int, r1: int):
        """(pos, neg) of anchors [r0, r1): bool masks, or counts (a miner's repeated pairs)."""
        if self.masks is not None:
            return self.masks[0][r0:r1], self.masks[1][r0:r1]
        pos = self.classes[r0:r1, None] == self.ref_classes[None, :]
        neg = ~pos
        if self.self_pairs:  # anchor i is contrast i: neither positive nor negative
            pos.diagonal(offset=r0).fill_(False)
            neg.diagonal(offset=r0).fill_(False)
        return pos, neg

    def block(self, qb: torch.Tensor, k: torch.Tensor, params, r0: int, r1: int) -> torch.Tensor:
        return self.stats(self.scores(qb, k), *self.pairs(r0, r1), *params)

    def all_rows(self, q: torch.Tensor, k: torch.Tensor, params) -> torch.Tensor:
        """(N, K) statistics of every anchor, block by block."""
        return torch.cat([self.block(q[r0:r1], k, params, r0, r1)
                          for r0, r1 in row_blocks(q.shape[0], k.shape[0], self.block_bytes(q.dtype))])


_MAX_PARAMS = 3


class _RowStats(torch.autograd.Function):
    """(N, K) per-anchor statistics of a ``_Rows`` loss of unit rows q (N, D) and k (M, D) and
    0-d parameters, differentiable in all of them.  The backward recomputes each row block and
    takes each loss's own derivative (O(block x M)); under create_graph=True it differentiates a
    recomputed graph of the whole matrix.  It runs outside autocast so both passes keep the
    compute dtype.  The parameters come as three arguments, the unused ones None (``_row_stats``):
    torch.compile of torch 2.7 to 2.11 binds a ``*params`` forward wrongly without grad.
    setup_context style with a per-sample vmap rule, so torch.func transforms (grad, vmap and their
    nestings) take it; the tensors inside ``rows`` (class ids, a miner's masks) are shared by every
    sample, not batched."""

    @staticmethod
    def forward(q, k, rows, p0, p1, p2):
        params = tuple(p for p in (p0, p1, p2) if p is not None)
        with autocast_off(q.device):
            return rows.all_rows(q, k, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, rows, *params = inputs
        ctx.save_for_backward(q, k, *(p for p in params if p is not None))
        ctx.rows = rows

    @staticmethod
    def backward(ctx, grad):
        q, k, *params = ctx.saved_tensors
        rows, needs = ctx.rows, ctx.needs_input_grad
        n_grads = 3 + _MAX_PARAMS
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (q.view_as(q), k.view_as(k), None) + tuple(t.view_as(t) for t in params)
            with autocast_off(q.device):
                out = rows.all_rows(inputs[0], inputs[1], inputs[3:])
            return graph_grads([out], [grad], inputs, needs, n_grads)
        grads = [None] * n_grads
        if needs[0]:
            grads[0] = torch.empty_like(q)
        if needs[1]:
            grads[1] = torch.zeros_like(k)
        param_grads = [torch.zeros_like(t) for t in params]
        with autocast_off(q.device):
            for r0, r1 in row_blocks(q.shape[0], k.shape[0], rows.block_bytes(q.dtype)):
                qb = q[r0:r1]
                x = rows.scores(qb, k)
                dx, dps = rows.grads(x, *rows.pairs(r0, r1), grad[r0:r1], params, needs[3:])
                if rows.distance:
                    gq_b, gk_b = distance_grads(dx, x, qb, k, needs[0], needs[1])
                else:
                    gq_b = dx @ k if needs[0] else None
                    gk_b = dx.T @ qb if needs[1] else None
                if needs[0]:
                    grads[0][r0:r1] = gq_b
                if needs[1]:
                    grads[1] += gk_b
                for acc, dp in zip(param_grads, dps):
                    if dp is not None:
                        acc += dp
                del x, dx, gq_b, gk_b
        for i, acc in enumerate(param_grads):
            if needs[3 + i]:
                grads[3 + i] = acc
        return tuple(grads)


_RowStats.vmap = staticmethod(per_sample_vmap(_RowStats))


def _row_stats(q: torch.Tensor, k: torch.Tensor, rows: _Rows, params) -> torch.Tensor:
    """``_RowStats`` of q (N, D), k (M, D) and up to three 0-d parameters: (N, K)."""
    return apply_function(_RowStats, q, k, rows, *params, *(None,) * (_MAX_PARAMS - len(params)))


def _lse_parts(x: torch.Tensor, keep: torch.Tensor, plus_one: bool):
    """(e^{x - top} on ``keep`` (rows, M), their sum (rows,) with e^{-top} added for the ``+ 1``,
    top (rows,)): the pieces of ``log(sum_{keep} e^x [+ 1])`` shifted by ``top``, the row's
    largest kept x (and 0 with ``plus_one``, whose 1 is e^0); top is detached.  A row with nothing
    kept sums to 1 without ``plus_one`` (log 1 = 0, not log 0's infinite gradient)."""
    x = torch.where(keep, x, float("-inf"))
    top = x.amax(dim=1, keepdim=True).detach()
    if plus_one:
        top = top.clamp_min(0.0)
        e = (x - top).exp_()
        return e, e.sum(dim=1) + (-top[:, 0]).exp(), top[:, 0]
    has = keep.any(dim=1, keepdim=True)
    top = torch.where(has, top, 0.0)
    e = (x - top).exp()
    return e, torch.where(has[:, 0], e.sum(dim=1), 1.0), top[:, 0]


def _lse(x: torch.Tensor, keep: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Per row ``log(sum_{keep} e^x [+ 1])`` (rows, M) -> (rows,): PML's ``logsumexp(keep_mask,
    add_one)``, 0 (with zero gradient) for a row with nothing kept."""
    _, total, top = _lse_parts(x, keep, plus_one)
    return total.log() + top  # log 1 + 0 for a row with nothing kept


def _lse_weights(x: torch.Tensor, keep: torch.Tensor, plus_one: bool):
    """(d lse / d x (rows, M): the softmax weights, 0 off ``keep``; lse (rows,)) of ``_lse``."""
    e, total, top = _lse_parts(x, keep, plus_one)
    return e / total[:, None], total.log() + top


def _ms_stats(s, pos, neg, alpha, beta, base):
    return (_lse(alpha * (base - s), pos, True) / alpha + _lse(beta * (s - base), neg, True) / beta)[:, None]


def _ms_grads(s, pos, neg, g, params, need):
    alpha, beta, base = params
    wp, lp = _lse_weights(alpha * (base - s), pos, True)
    wn, ln = _lse_weights(beta * (s - base), neg, True)
    g = g[:, 0]
    d_alpha = d_beta = d_base = None
    if need[0]:  # d(lp / alpha) / d alpha, with d lp / d alpha = sum_p w_p (base - s_p)
        d_alpha = (g * ((wp * (base - s)).sum(dim=1) / alpha - lp / alpha ** 2)).sum()
    if need[1]:
        d_beta = (g * ((wn * (s - base)).sum(dim=1) / beta - ln / beta ** 2)).sum()
    if need[2]:
        d_base = (g * (wp.sum(dim=1) - wn.sum(dim=1))).sum()
    return (wn - wp).mul_(g[:, None]), [d_alpha, d_beta, d_base]


def _circle_logits(s, m, gamma):
    """(lp, ln, a_p, a_n): the positive and negative logits and their weights, the similarities
    in the weights detached as PML's (m is not)."""
    sd = s.detach()
    ap, an = torch.relu(1.0 + m - sd), torch.relu(sd + m)
    return -gamma * ap * (s - (1.0 - m)), gamma * an * (s - m), ap, an


def _circle_stats(s, pos, neg, m, gamma):
    lp, ln, _, _ = _circle_logits(s, m, gamma)
    loss = F.softplus(_lse(lp, pos, False) + _lse(ln, neg, False))
    return torch.where(pos.any(dim=1) & neg.any(dim=1), loss, 0.0)[:, None]


def _softplus_grad(x: torch.Tensor) -> torch.Tensor:
    """d softplus / dx as PyTorch's softplus takes it: sigmoid, and exactly 1 above 20, where
    softplus returns x."""
    return torch.where(x > 20.0, 1.0, torch.sigmoid(x))


def _circle_grads(s, pos, neg, g, params, need):
    m, gamma = params
    lp, ln, ap, an = _circle_logits(s, m, gamma)
    wp, lse_p = _lse_weights(lp, pos, False)
    wn, lse_n = _lse_weights(ln, neg, False)
    # softplus', for the anchors with a positive and a negative (the others are 0)
    sig = torch.where(pos.any(dim=1) & neg.any(dim=1), _softplus_grad(lse_p + lse_n), 0.0) * g[:, 0]
    d_m = d_gamma = None
    if need[0]:  # d/dm of each logit, the weights' relu' included (0 at the kink, as relu's)
        dlp_dm = -gamma * ((1.0 + m - s > 0) * (s - (1.0 - m)) + ap)
        dln_dm = gamma * ((s + m > 0) * (s - m) - an)
        d_m = (sig * ((wp * dlp_dm).sum(dim=1) + (wn * dln_dm).sum(dim=1))).sum()
    if need[1]:  # the logits are linear in gamma
        d_gamma = (sig * ((wp * lp).sum(dim=1) + (wn * ln).sum(dim=1))).sum() / gamma
    return (wn * an - wp * ap).mul_(gamma * sig[:, None]), [d_m, d_gamma]


def _contrastive_stats(d, pos, neg, pos_margin, neg_margin):
    """Per anchor: (sum of positive pairs' losses, how many are above 0, the same for negative
    pairs); ``pos`` and ``neg`` are masks, or counts of a miner's pairs (a pair named twice counts twice)."""
    out = []
    for pairs, loss in ((pos, torch.relu(d - pos_margin)), (neg, torch.relu(neg_margin - d))):
        loss = torch.where(pairs != 0, loss, 0.0)
        if pairs.dtype == torch.bool:
            out += [loss.sum(dim=1), (loss > 0).sum(dim=1).to(d.dtype)]
        else:
            out += [(loss * pairs).sum(dim=1), torch.where(loss > 0, pairs, 0.0).sum(dim=1)]
    return torch.stack(out, dim=1)


def _contrastive_grads(d, pos, neg, g, params, need):
    pos_margin, neg_margin = params
    # relu' is 1 where the loss is above 0 (0 at the kink, as relu's); the counts take none
    dp = torch.where(d - pos_margin > 0, pos.to(d.dtype), 0.0)
    dn = torch.where(neg_margin - d > 0, neg.to(d.dtype), 0.0)
    gp, gn = g[:, 0], g[:, 2]
    return dp * gp[:, None] - dn * gn[:, None], [-(gp * dp.sum(dim=1)).sum() if need[0] else None,
                                                 (gn * dn.sum(dim=1)).sum() if need[1] else None]


def _prepare(embeddings, labels, ref_emb, ref_labels, indices_tuple, params, exclude_self: bool = False):
    """Checked arguments as ``(q, k, labels, ref_labels, poison, params)``: unit rows and 0-d
    parameters (a learnable one keeps its graph) in the compute dtype, and a 0-d zero that is NaN
    when any embedding or parameter holds NaN or inf (PML's zero loss too)."""
    labels, ref_labels = check_pml_args(embeddings, labels, 1.0, indices_tuple, ref_emb, ref_labels, exclude_self)
    for name, value, positive in params:
        check_scalar(name, value, positive=positive, device=embeddings.device)
    ct = compute_dtype(embeddings.dtype)
    q = l2_normalize(embeddings).to(ct)
    k = q if ref_emb is None else l2_normalize(ref_emb).to(ct)
    values = tuple(scalar_tensor(value, q.device, ct, name) for name, value, _ in params)
    # a NaN parameter gives NaN too, also where the formula would drop it (a NaN margin fails
    # every "loss above 0" test)
    poison = (q.sum() + k.sum() + sum(v.detach() for v in values)) * 0
    return q, k, labels, ref_labels, poison, values


def _label_rows(q, k, labels, ref_emb, ref_labels, loss, distance: bool, temporaries: int, params,
                exclude_self: bool):
    """(per-anchor statistics (N, K), number of positive pairs, of negative pairs) over every pair."""
    classes, ref_classes, n_cls, self_pairs = pml_classes(labels, None if ref_emb is None else ref_labels, exclude_self)
    n_pos, n_neg = pair_counts(classes, ref_classes, n_cls, self_pairs)
    rows = _Rows(*loss, distance, temporaries, classes=classes, ref_classes=ref_classes, self_pairs=self_pairs)
    return _row_stats(q, k, rows, params), n_pos, n_neg


def _mined_rows(q, k, masks, loss, distance: bool, temporaries: int, params):
    """Per-anchor statistics (N, K) over a miner's pairs, given as dense (N, M) masks or counts
    (as PML's matrices); the scores still go in row blocks."""
    return _row_stats(q, k, _Rows(*loss, distance, temporaries, masks=masks), params)


def multi_similarity_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, alpha=2.0,
                              beta=50.0, base=0.5, *, indices_tuple: Optional[Sequence[torch.Tensor]] = None,
                              ref_emb: Optional[torch.Tensor] = None,
                              ref_labels: Optional[torch.Tensor] = None, exclude_self: bool = False) -> torch.Tensor:
    """Multi-similarity loss in pytorch-metric-learning's form: ``MultiSimilarityLoss(alpha, beta,
    base)(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` with its cosine similarity
    and mean reducer.

    Anchor i's loss is ``log(1 + sum_{p} e^{alpha (base - s_ip)}) / alpha + log(1 + sum_{n}
    e^{beta (s_in - base)}) / beta`` over its positives p (same label; p != i unless ``ref_emb``
    comes with other ``ref_labels``) and negatives n; the result is the mean over all N anchors,
    and 0 when there is at most one positive and at most one negative pair, as PML returns.
    Without ``indices_tuple`` memory is O(block x M) within the workspace bound; a miner's pairs
    become PML's dense (N, M) bool masks (a pair named twice counts once; one named positive and
    negative is refused, where PML asserts), the scores still in row blocks.  Computed in fp32
    for half inputs, outside autocast.  NaN in any embedding or parameter gives NaN.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) classes; optional with ``indices_tuple``.
        alpha, beta: positive (PML's defaults 2 and 50); base: (0.5).  Each a float or a 0-d
            tensor, which may require grad.
        indices_tuple: optional mined pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``.
        ref_emb: optional (M, D) reference embeddings; ref_labels: their (M,) classes.
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    q, k, labels, ref_labels, poison, params = _prepare(
        embeddings, labels, ref_emb, ref_labels, indices_tuple,
        (("alpha", alpha, True), ("beta", beta, True), ("base", base, False)), exclude_self)
    if indices_tuple is not None:
        masks = mined_pair_masks(indices_tuple, q.shape[0], k.shape[0], q.device)
        return _mined_rows(q, k, masks, (_ms_stats, _ms_grads), False, 10, params).mean() + poison
    out, n_pos, n_neg = _label_rows(q, k, labels, ref_emb, ref_labels, (_ms_stats, _ms_grads), False, 10, params,
                                    exclude_self)
    loss = out.mean()
    return torch.where((n_pos > 1) | (n_neg > 1), loss, torch.zeros_like(loss)) + poison


def circle_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, m=0.4, gamma=80.0, *,
                    indices_tuple: Optional[Sequence[torch.Tensor]] = None, ref_emb: Optional[torch.Tensor] = None,
                    ref_labels: Optional[torch.Tensor] = None, exclude_self: bool = False) -> torch.Tensor:
    """Circle loss in pytorch-metric-learning's form: ``CircleLoss(m, gamma)(embeddings, labels,
    indices_tuple, ref_emb, ref_labels)`` with its cosine similarity and AvgNonZeroReducer.

    Anchor i's loss is ``softplus(LSE_p(-gamma a_p (s_ip - (1 - m))) + LSE_n(gamma a_n (s_in -
    m)))`` with the weights ``a_p = relu(1 + m - s_ip)`` and ``a_n = relu(s_in + m)`` (the
    similarities in them detached, as PML's), over its positives and negatives; 0 for an anchor
    lacking either.  The result is the mean over anchors whose loss is above 0, and 0 when there
    is at most one positive and at most one negative pair, as PML returns.  Memory, miners and
    dtypes as ``multi_similarity_loss_pml``.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) classes; optional with ``indices_tuple``.
        m: the relaxation (PML's default 0.4); gamma: positive, the scale (80).  Each a float
            or a 0-d tensor, which may require grad.
        indices_tuple: optional mined pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``.
        ref_emb: optional (M, D) reference embeddings; ref_labels: their (M,) classes.
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    q, k, labels, ref_labels, poison, params = _prepare(embeddings, labels, ref_emb, ref_labels, indices_tuple,
                                                        (("m", m, False), ("gamma", gamma, True)), exclude_self)
    # 14: its weights and LSEs keep more temporaries alive (measured 1.2x the bound at 10 with
    # learnable parameters)
    if indices_tuple is not None:
        masks = mined_pair_masks(indices_tuple, q.shape[0], k.shape[0], q.device)
        out = _mined_rows(q, k, masks, (_circle_stats, _circle_grads), False, 14, params)
        return _mean_nonzero(out[:, 0], masks[0].any() | masks[1].any()) + poison
    out, n_pos, n_neg = _label_rows(q, k, labels, ref_emb, ref_labels, (_circle_stats, _circle_grads), False, 14,
                                    params, exclude_self)
    return _mean_nonzero(out[:, 0], (n_pos > 1) | (n_neg > 1)) + poison


def _mean_above_zero(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """PML's AvgNonZeroReducer from a sum of losses and the number above 0: 0 when none is."""
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def contrastive_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, pos_margin=0.0,
                         neg_margin=1.0, *, indices_tuple: Optional[Sequence[torch.Tensor]] = None,
                         ref_emb: Optional[torch.Tensor] = None,
                         ref_labels: Optional[torch.Tensor] = None, exclude_self: bool = False) -> torch.Tensor:
    """Contrastive (pair margin) loss in pytorch-metric-learning's form: ``ContrastiveLoss(pos_margin,
    neg_margin)(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` with its Euclidean
    distance of L2-normalised rows and AvgNonZeroReducer.

    Positive pairs take ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``; each
    kind is averaged over its pairs with a loss above 0 (0 when none is) and the two are added.
    0 when there is at most one positive and at most one negative pair, as PML returns.  Without
    ``indices_tuple`` no pair list exists (PML lists every pair): row blocks within the workspace
    bound keep four numbers per anchor.  A miner's pairs (triplets read as pairs) become dense
    (N, M) pair counts, a pair named twice counting twice, as in PML.  Distances come from
    ``torch.cdist``, as PML's: whether the distance of duplicate rows rounds to 0 or to a few ulps
    (a loss above 0 at ``pos_margin`` 0, counted) is PML's decision too, except where row blocks
    split the matrix (cdist's GEMM may then round a few ulps differently).  A distance of 0 takes
    no gradient.  NaN in any embedding or margin gives NaN (PML drops a NaN margin's pairs).

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) classes; optional with ``indices_tuple``.
        pos_margin, neg_margin: floats or 0-d tensors, which may require grad (PML's defaults 0
            and 1).
        indices_tuple: optional mined pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``.
        ref_emb: optional (M, D) reference embeddings; ref_labels: their (M,) classes.
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    q, k, labels, ref_labels, poison, params = _prepare(
        embeddings, labels, ref_emb, ref_labels, indices_tuple,
        (("pos_margin", pos_margin, False), ("neg_margin", neg_margin, False)), exclude_self)
    if indices_tuple is not None:
        pairs = mined_pairs(indices_tuple, q.shape[0], k.shape[0], q.device)
        if pairs is None:
            return poison + 0.0  # + 0.0: not -0.0
        a1, p, a2, neg = pairs
        counts = []
        for a, c in ((a1, p), (a2, neg)):
            counts.append(torch.zeros(q.shape[0], k.shape[0], dtype=q.dtype, device=q.device).index_put_(
                (a, c), torch.ones_like(a, dtype=q.dtype), accumulate=True))
        total = _mined_rows(q, k, counts, (_contrastive_stats, _contrastive_grads), True, 10, params).sum(dim=0)
        return _mean_above_zero(total[0], total[1]) + _mean_above_zero(total[2], total[3]) + poison
    out, n_pos, n_neg = _label_rows(q, k, labels, ref_emb, ref_labels, (_contrastive_stats, _contrastive_grads),
                                    True, 10, params, exclude_self)
    total = out.sum(dim=0)
    loss = _mean_above_zero(total[0], total[1]) + _mean_above_zero(total[2], total[3])
    return torch.where((n_pos > 1) | (n_neg > 1), loss, torch.zeros_like(loss)) + poison


__all__ = ["multi_similarity_loss_pml", "circle_loss_pml", "contrastive_loss_pml"]
