"""Supervised contrastive loss (Khosla et al.), fused: SupContrast and pytorch-metric-learning forms.

Per anchor i with positives P(i) (same label, not itself) the loss needs
``mean_{p in P(i)} log_softmax_i(p) = (sum_{p in P(i)} s_ip) / |P(i)| - LSE_{j != i} s_ij``.
The LSE comes from ``similarity_lse`` with the diagonal excluded; the positive sum is
``scale * a_i . (class_sum[y_i] - c_i)`` with class sums from one scatter-add, so the cost is
O(N * D) beyond the fused op and no N x N matrix or mask exists.
"""
from typing import Optional, Sequence, Tuple

import torch

from fastcl.losses.ntxent import l2_normalize
from fastcl.ops.reference import autocast_off, compute_dtype
from fastcl.ops.similarity_lse import similarity_lse
from fastcl.validation import (_eager, check_dense, check_embeddings, check_flags, check_float_tensor, check_index,
                               check_pair, check_reduction, check_scalar)

CONTRAST_MODES = ("all", "one")


def _check_labels(name: str, labels, n: int, device: torch.device, *, allow_float: bool = False) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    check_dense(name, labels)
    if (labels.is_floating_point() and not allow_float) or labels.is_complex() or labels.dtype == torch.bool:
        kinds = "an integer or floating" if allow_float else "an integer"
        raise TypeError(f"{name} must be {kinds} tensor, got {labels.dtype}")
    if labels.reshape(-1).shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per sample), got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device}, got {labels.device}")


def cpu_to(x, device: torch.device):
    """A CPU tensor moved to ``device``, as SupContrast and PML move labels and masks to the
    features' device (any other argument as given, for the checks to name)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.device != device:
        return x.to(device)
    return x


def class_ids(labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(compact class ids (n,) int64 in [0, C), C) of integer or floating ``labels``: equal labels,
    equal ids.  NaN labels (equal to no label, themselves included) are refused in eager mode."""
    labels = labels.reshape(-1)
    meta = labels.device.type == "meta"  # shapes only (a dry run): no values to read
    if labels.is_floating_point() and _eager() and not meta and bool(torch.isnan(labels).any()):
        raise ValueError("labels must not contain NaN (a NaN label equals no other label)")
    if torch.compiler.is_compiling() or meta:
        # Static shapes: ids by sorting, and n as the bound on their number (torch.compile before
        # torch 2.11 cannot trace unique's data-dependent size under fullgraph=True).
        srt, order = labels.sort()
        new = torch.cat([torch.zeros(min(1, srt.shape[0]), dtype=torch.long, device=srt.device),
                         (srt[1:] != srt[:-1]).long()])
        return torch.empty_like(new).scatter_(0, order, new.cumsum(0)), labels.shape[0]
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse, uniq.numel()


def class_counts(ids: torch.Tensor, n_cls: int, dtype: torch.dtype) -> torch.Tensor:
    """(n_cls,) how many of ``ids`` (int64 in [0, n_cls)) fall in each class: bincount with a
    size known without reading the ids (a static shape under torch.compile)."""
    return torch.zeros(n_cls, dtype=dtype, device=ids.device).index_add_(0, ids, torch.ones_like(ids, dtype=dtype))


def _positive_stats(anchors: torch.Tensor, anchor_classes: torch.Tensor, contrasts: torch.Tensor,
                    contrast_classes: torch.Tensor, n_cls: int, self_pairs: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum over positives of a_i . c_p, |P(i)|) per anchor: the contrasts of the anchor's class,
    less contrast i itself when ``self_pairs`` (anchor i is contrast i).

    Class ids are in [0, n_cls), shared by anchors and contrasts."""
    ct = compute_dtype(contrasts.dtype)
    cf = contrasts.to(ct)
    # index_add_, not the ordered index_sum_: a class is a long run of one index, which the ordered
    # CUDA sum takes serially (10 classes in a batch of 65536 would be runs of 6554 rows).
    sums = torch.zeros(n_cls, cf.shape[1], dtype=ct, device=cf.device).index_add_(0, contrast_classes, cf)
    counts = class_counts(contrast_classes, n_cls, ct)
    af = anchors.to(ct)
    own = sums.index_select(0, anchor_classes)
    count = counts.index_select(0, anchor_classes)
    if self_pairs:  # subtracting contrast i (when of i's class) from its class sum leaves the positives
        same = (anchor_classes == contrast_classes[:anchors.shape[0]]).to(ct)
        own, count = own - cf[:anchors.shape[0]] * same[:, None], count - same
    return (af * own).sum(-1), count


def _mask_stats(anchors: torch.Tensor, features: torch.Tensor, mask: torch.Tensor,
                n_anchor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same as ``_positive_stats`` for a user (bsz, bsz) weight mask: O(bsz^2 * D) on that mask."""
    ct = compute_dtype(features.dtype)
    n_views = features.shape[1]
    m = mask.to(ct)
    view_sum = features.to(ct).sum(1)                       # (bsz, D)
    weighted = (m @ view_sum).repeat(n_views, 1)[:n_anchor]  # anchor (v, b) -> row v * bsz + b
    af = anchors.to(ct)
    self_w = m.diagonal().repeat(n_views)[:n_anchor]
    pos_dot = (af * weighted).sum(-1) - self_w * (af * af).sum(-1)
    count = (m.sum(1) * n_views).repeat(n_views)[:n_anchor] - self_w
    return pos_dot, count


def anchor_losses(lse: torch.Tensor, pos_dot: torch.Tensor, count: torch.Tensor, scale) -> torch.Tensor:
    """Per-anchor ``-sum_p w_p log_softmax(p) / W`` from the anchor's LSE (self excluded), its
    positive sum ``pos_dot = sum_p w_p a . c_p`` and weight ``count = sum_p w_p``: SupContrast's
    formula, which divides by W, or by 1 where W < 1e-6 (so an anchor without positives gives 0)."""
    denom = torch.where(count < 1e-6, torch.ones_like(count), count)
    # A row with every entry excluded (-inf) has no positives either: 0, not -inf * 0.
    return (lse.masked_fill(torch.isneginf(lse), 0.0) * count - pos_dot * scale) / denom


def _supcon_core(anchors, contrasts, scale, pos_dot, count, backend, self_pairs: bool = True):
    lse = similarity_lse(anchors, contrasts, scale, rows=True, exclude_diagonal=0 if self_pairs else None,
                         backend=backend)
    return anchor_losses(lse, pos_dot, count, scale)


def supcon_loss(features: torch.Tensor, labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                temperature=0.07, base_temperature: float = 0.07, contrast_mode: str = "all", *,
                reduction: str = "mean", backend: Optional[str] = None) -> torch.Tensor:
    """SupCon loss in the layout of the SupContrast reference ``SupConLoss``.

    Features are not normalised here.  The contrast set is every view of every sample,
    ordered view-major (index ``v * bsz + b``); anchors are all of them (``"all"``) or view 0
    (``"one"``).  Positives share the label (or have ``mask[b, b'] != 0``) and are not the anchor
    itself; self is also left out of the denominator.  Per anchor the loss is
    ``-(temperature / base_temperature) * mean_{p in P(i)} log_softmax_i(p)``, 0 when P(i) is
    empty; the result is the mean over anchors.  With neither labels nor mask it is SimCLR.

    Args:
        features: (bsz, n_views, D) float32, bfloat16, float16 or float64; (bsz, n_views, ...)
            is flattened to that, as SupContrast does.
        labels: optional (bsz,) integer (or floating, not NaN) class of each sample.
        mask: optional (bsz, bsz) float/bool contrast mask (mask[b, b'] weights the pair as a
            positive); exclusive with ``labels``.  As in SupContrast, an anchor's sum over its
            weighted positives is divided by their total weight, or by 1 where that is below
            1e-6.  It costs O(bsz^2 * D), still no N x N matrix.
        temperature: positive float or 0-d tensor.
        base_temperature: positive float.
        contrast_mode: "all" or "one".
        reduction: "mean" (default), "sum" or "none" (per-anchor losses, view-major).
        backend: see ``fastcl.ops.similarity_lse``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs), or (n_anchor,) for ``reduction="none"``.
    """
    if isinstance(features, torch.Tensor) and features.dim() > 3:  # [bsz, n_views, ...], as SupContrast
        features = features.reshape(features.shape[0], features.shape[1], -1)
    check_float_tensor("features", features, "(bsz, n_views, D)")
    temperature = check_scalar("temperature", temperature, positive=True, device=features.device)
    base_temperature = check_scalar("base_temperature", base_temperature, positive=True, device=features.device)
    if contrast_mode not in CONTRAST_MODES:
        raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
    check_reduction(reduction)
    if labels is not None and mask is not None:
        raise ValueError("give labels or mask, not both")
    bsz, n_views = features.shape[0], features.shape[1]
    labels, mask = cpu_to(labels, features.device), cpu_to(mask, features.device)  # SupContrast's .to(device)
    contrasts = features.transpose(0, 1).reshape(bsz * n_views, features.shape[2])
    n_anchor = bsz * n_views if contrast_mode == "all" else bsz
    anchors = contrasts[:n_anchor]
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        check_dense("mask", mask)
        if mask.is_complex():  # its real part would be used with only a warning
            raise TypeError(f"mask must be a real (float, integer or bool) tensor, got {mask.dtype}")
        if mask.shape != (bsz, bsz):
            raise ValueError(f"mask must have shape ({bsz}, {bsz}), got {tuple(mask.shape)}")
        if mask.device != features.device:
            raise ValueError(f"mask must be on {features.device}, got {mask.device}")
        pos_dot, count = _mask_stats(anchors, features, mask, n_anchor)
    else:
        if labels is None:
            classes, n_cls = torch.arange(bsz, device=features.device), bsz  # SimCLR: each sample its own class
        else:
            _check_labels("labels", labels, bsz, features.device, allow_float=True)
            classes, n_cls = class_ids(labels)
        cls_rep = classes.repeat(n_views)
        pos_dot, count = _positive_stats(anchors, cls_rep[:n_anchor], contrasts, cls_rep, n_cls, self_pairs=True)
    scale = 1.0 / temperature
    per_anchor = _supcon_core(anchors, contrasts, scale, pos_dot, count, backend)
    per_anchor = per_anchor * (temperature / base_temperature)
    if reduction == "mean":
        return per_anchor.mean()
    return per_anchor.sum() if reduction == "sum" else per_anchor


def check_pml_args(embeddings, labels, temperature, indices_tuple, ref_emb, ref_labels, exclude_self=False):
    """The arguments of a pytorch-metric-learning-form loss, checked; returns ``(labels,
    ref_labels)``, each moved to the embeddings' device when it is a CPU tensor, as PML moves them."""
    check_embeddings("embeddings", embeddings)
    temperature = check_scalar("temperature", temperature, positive=True, device=embeddings.device)
    device = embeddings.device
    # Each is moved on its own, as PML moves them: a labels object given as ref_labels too is then
    # two objects, and PML keeps the pairs (i, i) (it leaves them out only for one object).
    labels, ref_labels = cpu_to(labels, device), cpu_to(ref_labels, device)
    for name, lab in (("labels", labels), ("ref_labels", ref_labels)):
        if isinstance(lab, torch.Tensor) and lab.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one class per row), got shape {tuple(lab.shape)}")
    if labels is not None:  # with indices_tuple unused for the pairs, as in PML, but still checked
        _check_labels("labels", labels, embeddings.shape[0], device, allow_float=True)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels needs ref_emb")
    else:
        check_pair("embeddings", embeddings, "ref_emb", ref_emb)
        if ref_labels is not None:
            _check_labels("ref_labels", ref_labels, ref_emb.shape[0], device, allow_float=True)
    if indices_tuple is None:
        if labels is None:
            raise ValueError("labels is required unless indices_tuple is given (pytorch-metric-learning form)")
        if ref_emb is not None and ref_labels is None:
            raise ValueError("ref_emb needs ref_labels, the (M,) classes of its rows")
    check_flags(exclude_self=exclude_self)
    if exclude_self and (indices_tuple is not None or ref_emb is None or ref_emb.shape[0] < embeddings.shape[0]):
        raise ValueError("exclude_self=True needs ref_emb with at least as many rows as embeddings (its first N "
                         "rows are the anchors' own) and no indices_tuple")
    return labels, ref_labels


def pml_classes(labels: torch.Tensor, ref_labels: Optional[torch.Tensor], exclude_self: bool = False):
    """Compact class ids of a PML-form loss's anchors and contrasts: ``(classes (N,), ref_classes
    (M,), number of classes, self_pairs)``.  Without references the contrasts are the anchors
    themselves (``self_pairs``); with them, ``self_pairs`` holds when ``ref_labels`` is the very
    ``labels`` object, as PML reads it, or with ``exclude_self`` (the first N contrasts are the
    anchors' own: the pairs (i, i) are left out)."""
    if ref_labels is None:
        classes, n_cls = class_ids(labels)
        return classes, classes, n_cls, True
    n = labels.reshape(-1).shape[0]
    both, n_cls = class_ids(torch.cat([labels.reshape(-1), ref_labels.reshape(-1)]))
    return both[:n], both[n:], n_cls, ref_labels is labels or exclude_self


def pair_counts(classes: torch.Tensor, ref_classes: torch.Tensor, n_cls: int, self_pairs: bool):
    """(number of positive pairs, number of negative pairs), 0-d int64, of PML's all-pairs form:
    same class and different class, less the pairs (i, i) when ``self_pairs``."""
    n = classes.shape[0]
    per_class = class_counts(ref_classes, n_cls, torch.long).index_select(0, classes)
    n_pos, n_neg = per_class.sum(), ref_classes.shape[0] * n - per_class.sum()
    if self_pairs:
        same = (classes == ref_classes[:n]).sum()
        n_pos, n_neg = n_pos - same, n_neg - (n - same)
    return n_pos, n_neg


def supcon_loss_pml(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, temperature=0.1, *,
                    indices_tuple: Optional[Sequence[torch.Tensor]] = None,
                    ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
                    exclude_self: bool = False,
                    backend: Optional[str] = None) -> torch.Tensor:
    """SupCon in pytorch-metric-learning's form: ``SupConLoss(temperature)(embeddings, labels,
    ref_emb=..., ref_labels=...)``.

    Embeddings are L2-normalised (cosine similarity).  Anchors are the N rows; contrasts are the
    same rows with self excluded, or the rows of ``ref_emb`` (normalised too) with nothing
    excluded, as PML does, unless ``ref_labels`` is the very ``labels`` object, which makes PML
    leave out the pairs (i, i) (not after moving CPU labels to the device: PML moves each on its
    own, making two objects).  No base-temperature factor; the mean runs over anchors whose
    loss is non-zero (anchors without positives give 0 and are left out); 0 when there are none,
    and 0 when no anchor has a negative (a single label), as PML returns.

    With ``indices_tuple`` (a miner's output) the pairs are those it names, as in PML: per anchor
    the denominator runs over its mined pairs only, so the (N, M) similarity matrix is formed, as
    PML forms it (``backend`` is then unused).

    Args:
        embeddings: (N, D) float32, bfloat16, float16 or float64.
        labels: (N,) integer (or floating, not NaN) class of each row; optional with ``indices_tuple``.
            CPU labels are moved to the embeddings' device, as PML moves them (so are ref_labels).
        temperature: positive float or 0-d tensor.
        indices_tuple: optional mined pairs, 1-D integer tensors: ``(a1, p, a2, n)`` (positive
            pairs (a1[i], p[i]), negative pairs (a2[j], n[j])) or triplets ``(a, p, n)``; anchors
            index the N embeddings, p and n the contrasts (``ref_emb`` when given).
        ref_emb: optional (M, D) reference embeddings, same dtype and device (PML's cross-batch form).
        ref_labels: (M,) classes of ``ref_emb``; required with it unless ``indices_tuple`` is given.
        backend: see ``fastcl.ops.similarity_lse``.
        exclude_self: with ``ref_emb``, leave out the pairs (i, i): its first N rows are the
            anchors' own (as CrossBatchMemory's slots of the batch); not with ``indices_tuple``.

    Returns:
        0-d float32 tensor (float64 for float64 inputs).
    """
    labels, ref_labels = check_pml_args(embeddings, labels, temperature, indices_tuple, ref_emb, ref_labels,
                                        exclude_self)
    if indices_tuple is not None:
        return _supcon_pml_mined(embeddings, temperature, indices_tuple, ref_emb)
    z = l2_normalize(embeddings)
    r = z if ref_emb is None else l2_normalize(ref_emb)
    classes, ref_classes, n_cls, self_pairs = pml_classes(labels, None if ref_emb is None else ref_labels,
                                                          exclude_self)
    pos_dot, count = _positive_stats(z, classes, r, ref_classes, n_cls, self_pairs)
    per_anchor = _supcon_core(z, r, 1.0 / temperature, pos_dot, count, backend, self_pairs)
    # PML's loss is 0 when no pair is a negative (one label throughout), not the positives' term,
    # and when there is at most one positive and at most one negative pair (its pair losses' rule).
    n_pos, n_neg = pair_counts(classes, ref_classes, n_cls, self_pairs)
    return _mean_nonzero(per_anchor, (n_neg > 0) & ((n_pos > 1) | (n_neg > 1)))


def _mean_nonzero(per_anchor: torch.Tensor, has_pairs) -> torch.Tensor:
    """PML's AvgNonZeroReducer over per-anchor losses (N,): the mean of those > 0 (0 when none),
    except that NaN is kept; 0 with zero gradient where ``has_pairs`` (0-d bool) is False."""
    nonzero = per_anchor > 0
    n_nonzero = nonzero.sum()
    total = torch.where(nonzero, per_anchor, torch.zeros_like(per_anchor)).sum()
    # NaN anywhere must survive: a NaN loss is not > 0, so add it back explicitly.
    total = total + torch.where(torch.isnan(per_anchor), per_anchor, torch.zeros_like(per_anchor)).sum()
    loss = total / n_nonzero.clamp_min(1).to(total.dtype)
    return torch.where(has_pairs, loss, torch.zeros_like(loss))


def check_indices_tuple(indices_tuple) -> Tuple[str, ...]:
    """PML's ``indices_tuple`` must be a tuple of 4 tensors (pairs) or 3 (triplets); returns the
    names of its entries.  Values are checked where they are read (``mined_pairs``)."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError("indices_tuple must be a tuple (a1, p, a2, n) of pairs or (a, p, n) of triplets, got "
                        f"{type(indices_tuple).__name__}"
                        + (f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else ""))
    names = ("a1", "p", "a2", "n") if len(indices_tuple) == 4 else ("a", "p", "n")
    for i, (nm, t) in enumerate(zip(names, indices_tuple)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"indices_tuple[{i}] ({nm}) must be a torch.Tensor of integer indices, got "
                            f"{type(t).__name__}")
    return names


def mined_pairs(indices_tuple, n: int, m: int, device: torch.device, *, zero_if_tiny: bool = True):
    """PML's ``indices_tuple`` as checked index tensors ``(a1, p, a2, neg)`` on ``device`` (int64):
    pairs ``(a1, p, a2, n)``, or triplets ``(a, p, n)`` read as ``(a, p, a, n)``; anchors index
    the n embeddings, partners the m contrasts.  None when every index tensor has at most one
    entry, where PML's pair losses return a zero loss before they read the indices
    (``zero_if_tiny``; its triplet loss has no such rule)."""
    names = check_indices_tuple(indices_tuple)
    # Checked before the zero-loss rule too: a float, 2-D or out-of-range index is an error even
    # where PML would not read it; an empty 1-D tensor of any dtype (torch.tensor([])) holds no
    # index and stays PML's "nothing mined".  A miner's CPU indices into GPU embeddings index them
    # as PML's masks do.
    idx = [check_index(f"indices_tuple[{i}] ({nm})",
                       (t.long() if t.numel() == 0 and t.dim() == 1 else t).to(device) if t.device.type == "cpu" else t,
                       (None,), n if nm[0] == "a" else m, device)
           for i, (nm, t) in enumerate(zip(names, indices_tuple))]
    if zero_if_tiny and all(t.numel() <= 1 for t in idx):
        return None
    a1, p, a2, neg = idx if len(idx) == 4 else (idx[0], idx[1], idx[0], idx[2])
    for (x, y), what in (((a1, p), "positive"), ((a2, neg), "negative")):
        if x.shape != y.shape:
            raise ValueError(f"indices_tuple's {what} pairs need as many anchors as partners, got "
                             f"{x.numel()} and {y.numel()}")
    return a1, p, a2, neg


def mined_pair_masks(indices_tuple, n: int, m: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pos (n, m) bool, neg (n, m) bool) of the pairs ``mined_pairs`` reads; both empty where it
    returns None (PML's zero loss)."""
    pairs = mined_pairs(indices_tuple, n, m, device)
    pos = torch.zeros(n, m, dtype=torch.bool, device=device)
    negm = torch.zeros(n, m, dtype=torch.bool, device=device)
    if pairs is None:
        return pos, negm
    a1, p, a2, neg = pairs
    pos[a1, p] = True
    negm[a2, neg] = True
    if _eager() and bool((pos & negm).any()):
        raise ValueError("indices_tuple names a pair both as a positive and as a negative")
    return pos, negm


def _supcon_pml_mined(embeddings, temperature, indices_tuple, ref_emb) -> torch.Tensor:
    """``supcon_loss_pml`` over a miner's pairs (arguments checked by it): the (N, M) cosine
    matrix with an LSE per anchor over its mined pairs (PML's GenericPairLoss mask form), in the
    compute dtype."""
    ref_emb = embeddings if ref_emb is None else ref_emb
    pos, neg = mined_pair_masks(indices_tuple, embeddings.shape[0], ref_emb.shape[0], embeddings.device)
    ct = compute_dtype(embeddings.dtype)
    z = l2_normalize(embeddings).to(ct)
    r = z if ref_emb is embeddings else l2_normalize(ref_emb).to(ct)
    with autocast_off(z.device):  # the matrix stays in the compute dtype
        scores = (z @ r.T) / temperature
    kept = pos | neg
    lse = scores.masked_fill(~kept, float("-inf")).logsumexp(dim=1)
    lse = lse.masked_fill(~kept.any(dim=1), 0.0)  # an anchor with no pairs: PML's 0
    pos_f = pos.to(ct)
    count = pos_f.sum(dim=1)
    # sum over positives of log_softmax; unpaired entries are excluded, not multiplied (0 * -inf)
    pos_sum = torch.where(pos, scores, torch.zeros_like(scores)).sum(dim=1) - count * lse
    per_anchor = -pos_sum / (count + torch.finfo(ct).tiny)
    has_pairs = pos.any() & neg.any()
    loss = _mean_nonzero(per_anchor, has_pairs)
    # NaN anywhere gives NaN (PML instead drops NaN anchors from its mean, and returns NaN only
    # when the embeddings hold one); without this, the masks would hide a NaN outside the mined
    # pairs from the value while the backward still spread it to every row.
    return torch.where(torch.isnan(scores).any(), torch.full_like(loss, float("nan")), loss)
