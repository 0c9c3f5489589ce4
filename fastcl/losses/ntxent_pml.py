"""pytorch-metric-learning's ``NTXentLoss``, in bounded memory.

PML gives each positive pair (i, j) the loss ``-log(e^s_ij / (e^s_ij + sum_{n in N(i)} e^s_in) + tiny)``,
N(i) the negatives of anchor i and ``tiny`` the smallest normal number of the embeddings' dtype,
and averages over the positive pairs.  It holds a (positive pairs x negative pairs) matrix.
With ``L_i = LSE_{n in N(i)} s_in`` the pair's loss is ``-log(sigmoid(s_ij - L_i) + tiny)``, so
one LSE per anchor and one term per positive pair suffice.  With labels, ``_LabelPairs`` walks
row blocks of the cosine matrix within the workspace bound (memory O(block x M)); a miner's pairs
take the dense (N, M) matrix, as PML's own ``mat`` is.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastcl.losses.ntxent import l2_normalize
from fastcl.losses.supcon import check_pml_args, mined_pairs, pair_counts, pml_classes
from fastcl.ops.eager import per_sample_vmap
from fastcl.ops.reference import apply_function, autocast_off, check_fits, compute_dtype, graph_grads, scalar_tensor
from fastcl.ops.strips import row_blocks
from fastcl.validation import _eager, functorch_active


def _block_bytes(ct: torch.dtype) -> int:
    """Scratch per entry of a row block: the scores and at most five temporaries of the compute
    dtype alive at once, plus three masks."""
    return 6 * torch.finfo(ct).bits // 8 + 3


def _softplus(d: torch.Tensor) -> torch.Tensor:
    # PyTorch's softplus returns d itself above d = 20, dropping log1p(e^-d) ~ 2e-9, which float64 keeps.
    return F.softplus(d, threshold=40.0)


def pair_losses(d: torch.Tensor, tiny: float) -> torch.Tensor:
    """``-log(sigmoid(-d) + tiny)`` for ``d = L_i - s_ij``, without forming the sigmoid's ratio;
    clamped at 0, where PML's rounding puts the -tiny of an anchor without negatives."""
    log_tiny = torch.full((), math.log(tiny), dtype=d.dtype, device=d.device)
    return (-torch.logaddexp(-_softplus(d), log_tiny)).clamp_min(0.0)


def _pair_grads(d: torch.Tensor, tiny: float) -> torch.Tensor:
    """d/dd of ``pair_losses``: sigmoid(d) * r / (r + tiny) with r = sigmoid(-d), the ratio taken
    as sigmoid(log r - log tiny) so that r may lie far below fp32's normal range."""
    w = _softplus(d).neg_().sub_(math.log(tiny)).sigmoid_()
    return w.mul_(torch.sigmoid(d))


def _block(q, kc, scale, classes, ref_classes, self_pairs: bool, r0: int, r1: int, ct):
    """Scores (rows, M) of anchors [r0, r1), their positive and negative masks."""
    s = (q[r0:r1].to(ct) @ kc.T) * scale
    same = classes[r0:r1, None] == ref_classes[None, :]
    neg = ~same
    if self_pairs:  # anchor i is contrast i: neither positive nor negative
        same.diagonal(offset=r0).fill_(False)
        neg.diagonal(offset=r0).fill_(False)
    return s, same, neg


def _label_pairs_sum(q, k, scale, classes, ref_classes, self_pairs: bool, tiny: float):
    """(sum over positive pairs of ``pair_losses(L_i - s_ij)``, L (N,)), walking row blocks;
    differentiable PyTorch (the forward, and the backward under create_graph=True)."""
    ct = scale.dtype
    kc = k.to(ct)
    total, lses = torch.zeros((), dtype=ct, device=q.device), []
    for r0, r1 in row_blocks(q.shape[0], k.shape[0], _block_bytes(ct)):
        s, pos, neg = _block(q, kc, scale, classes, ref_classes, self_pairs, r0, r1, ct)
        lse = s.masked_fill(~neg, float("-inf")).logsumexp(dim=1)  # -inf for a row without negatives
        total = total + torch.where(pos, pair_losses(lse[:, None] - s, tiny), 0.0).sum()
        lses.append(lse)
        del s, pos, neg
    return total, torch.cat(lses)


class _LabelPairs(torch.autograd.Function):
    """(sum over positive pairs of ``pair_losses(L_i - s_ij)``, L (N,)), s = scale * q k^T, pairs
    and negatives from class ids; the sum 0-d in the compute dtype, differentiable in q, k and
    scale (twice too: under create_graph=True the backward differentiates a recomputed graph,
    O(N x M)).  L, the negatives' LSE per anchor, is for the backward (non-differentiable): an
    output rather than a ctx attribute, so that torch.func transforms (setup_context style, a
    per-sample vmap rule) take the Function.  It runs outside autocast so both passes keep the
    compute dtype."""

    @staticmethod
    def forward(q, k, scale, classes, ref_classes, self_pairs, tiny):
        with autocast_off(q.device):
            return _label_pairs_sum(q, k, scale, classes, ref_classes, self_pairs, tiny)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, scale, classes, ref_classes, self_pairs, tiny = inputs
        lse = output[1]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, scale, classes, ref_classes, lse)
        ctx.self_pairs, ctx.tiny = self_pairs, tiny

    @staticmethod
    def backward(ctx, grad, _):
        q, k, scale, classes, ref_classes, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs = (q.view_as(q), k.view_as(k), scale.view_as(scale))
            with autocast_off(q.device):
                total = _label_pairs_sum(*inputs, classes, ref_classes, ctx.self_pairs, ctx.tiny)[0]
            return graph_grads([total], [grad], inputs, ctx.needs_input_grad, 7)
        ct = scale.dtype
        need_q, need_k, need_scale = ctx.needs_input_grad[:3]
        gq = torch.empty(q.shape, dtype=ct, device=q.device) if need_q else None
        gk = torch.zeros(k.shape, dtype=ct, device=k.device) if need_k else None
        gs = torch.zeros((), dtype=ct, device=q.device)
        with autocast_off(q.device):
            kc = k.to(ct)
            for r0, r1 in row_blocks(q.shape[0], k.shape[0], _block_bytes(ct)):
                s, pos, neg = _block(q, kc, scale, classes, ref_classes, ctx.self_pairs, r0, r1, ct)
                row_lse = lse[r0:r1, None]
                g = torch.where(pos, _pair_grads(row_lse - s, ctx.tiny), 0.0).mul_(grad)
                del pos
                # d/ds of L_i spreads each anchor's summed pair weight over its negatives' softmax;
                # where, not a product, so a row without negatives (L = -inf) gives 0, not NaN.
                ds = torch.where(neg, (s - row_lse).exp_(), 0.0).mul_(g.sum(1, keepdim=True)).sub_(g)
                del g, neg
                qb = q[r0:r1].to(ct)
                gq_b = ds @ kc
                if need_q:
                    gq[r0:r1] = gq_b * scale
                if need_k:
                    gk += (ds.T @ qb) * scale
                if need_scale:
                    # sum(ds * s) / scale with each row centred (ds's rows sum to 0): the products
                    # then carry no cancellation of logits near the row's largest.
                    gs += (ds * s.sub_(s.amax(dim=1, keepdim=True))).sum() / scale
                del s, ds, gq_b
        return (None if gq is None else gq.to(q.dtype), None if gk is None else gk.to(k.dtype),
                gs if need_scale else None, None, None, None, None)


_LabelPairs.vmap = staticmethod(per_sample_vmap(_LabelPairs))


def ntxent_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, temperature=0.07, *,
                    indices_tuple: Optional[Sequence[torch.Tensor]] = None,
                    ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
                    exclude_self: bool = False) -> torch.Tensor:
    """NT-Xent in pytorch-metric-learning's form: ``NTXentLoss(temperature)(embeddings, labels,
    indices_tuple, ref_emb, ref_labels)`` with its default cosine similarity and mean reducer.

    Each positive pair (i, j) (same label; j != i unless ``ref_emb`` is given with other
    ``ref_labels``) has the loss ``-log(e^s_ij / (e^s_ij + sum_n e^s_in) + tiny)`` over the
    anchor's negatives n (other labels), ``s = cos / temperature`` and ``tiny`` the smallest
    normal number of the embeddings' dtype (PML's ``small_val``: it caps a pair's loss, at 9.70
    for float16).  The result is the mean over positive pairs; 0 when there is no positive or no
    negative pair, or at most one of each, as PML returns.  With ``indices_tuple`` (a miner's
    output) the pairs are those it names, a negative pair counted as often as it is named; the
    (N, M) matrix is then formed, as in PML.  Without it memory is O(block x M) within the
    workspace bound (``FASTCL_WORKSPACE_MB``), not PML's (pairs x pairs).  Both paths keep the
    compute dtype under autocast.  Second derivatives (``create_graph=True``) differentiate a
    recomputed graph of O(N x M) memory.  NaN in any embedding gives NaN.

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) class of each row; optional with ``indices_tuple``.
            CPU labels are moved to the embeddings' device, as PML moves them (so are ref_labels).
        temperature: positive float or 0-d tensor (may require grad).
        indices_tuple: optional mined pairs, 1-D integer tensors ``(a1, p, a2, n)`` or triplets
            ``(a, p, n)``; anchors index the N embeddings, p and n the contrasts (``ref_emb`` when given).
        ref_emb: optional (M, D) reference embeddings, same dtype and device.
        ref_labels: (M,) classes of ``ref_emb``; required with it unless ``indices_tuple`` is given.
            Passing the very ``labels`` object (M == N) leaves out the pairs (i, i), as PML does,
            unless the labels are moved from the CPU, which makes them two objects (in PML too).
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    labels, ref_labels = check_pml_args(embeddings, labels, temperature, indices_tuple, ref_emb, ref_labels,
                                        exclude_self)
    ct = compute_dtype(embeddings.dtype)
    tiny = torch.finfo(embeddings.dtype).tiny
    # A subnormal temperature would give an infinite scale (a CPU tensor's value costs no sync).
    if not isinstance(temperature, torch.Tensor) or (temperature.device.type == "cpu" and _eager()
                                                     and not functorch_active()):
        # detach: float() of a tensor requiring grad warns
        inverse = 1.0 / float(temperature.detach() if isinstance(temperature, torch.Tensor) else temperature)
        if math.isinf(inverse):  # (float64's smallest subnormals: beyond every range)
            raise ValueError(f"1 / temperature = inf is outside the {ct} range the loss computes in")
        check_fits("1 / temperature", inverse, ct)
    scale = 1.0 / scalar_tensor(temperature, embeddings.device, ct, "temperature")
    q = l2_normalize(embeddings)
    k = q if ref_emb is None else l2_normalize(ref_emb)
    # NaN (or inf) in any input, temperature included, gives NaN, also where the loss is PML's 0.
    poison = (q.sum(dtype=ct) + k.sum(dtype=ct)) * 0 + scale * 0
    if indices_tuple is not None:
        return _mined(q, k, scale, indices_tuple, tiny) + poison
    classes, ref_classes, n_cls, self_pairs = pml_classes(labels, None if ref_emb is None else ref_labels, exclude_self)
    n_pos, n_neg = pair_counts(classes, ref_classes, n_cls, self_pairs)
    valid = (n_pos > 0) & (n_neg > 0) & ((n_pos > 1) | (n_neg > 1))
    total = apply_function(_LabelPairs, q, k, scale, classes, ref_classes, self_pairs, tiny)[0]
    loss = total / n_pos.clamp_min(1).to(ct)
    return torch.where(valid, loss, torch.zeros_like(loss)) + poison


def _mined(q, k, scale, indices_tuple, tiny) -> torch.Tensor:
    """The mean of ``pair_losses`` over a miner's positive pairs, negatives counted with multiplicity."""
    n, m = q.shape[0], k.shape[0]
    ct = scale.dtype
    pairs = mined_pairs(indices_tuple, n, m, q.device)
    zero = torch.zeros((), dtype=ct, device=q.device)
    if pairs is None:
        return zero
    a1, p, a2, neg = pairs
    if a1.numel() == 0 or a2.numel() == 0:
        return zero
    with autocast_off(q.device):  # the matrix stays in the compute dtype
        s = (q.to(ct) @ k.to(ct).T) * scale
        counts = torch.zeros(n, m, dtype=ct, device=q.device).index_put_((a2, neg), torch.ones_like(a2, dtype=ct),
                                                                         accumulate=True)
        has_neg = counts.any(dim=1)
        # Rows without negatives take a finite stand-in, then L = -inf: logsumexp over a row of -inf
        # would give NaN gradients.
        lse = torch.where(has_neg[:, None], s + counts.log(), torch.zeros_like(s)).logsumexp(dim=1)
        lse = torch.where(has_neg, lse, torch.full_like(lse, float("-inf")))
        return pair_losses(lse[a1] - s[a1, p], tiny).mean()
