"""Contrastive losses whose negatives come from every rank of a process group.

Each function returns this rank's loss.  The convention is the one DDP expects: the mean over
ranks of the per-rank losses is the loss of the global batch (for equal shard sizes), and after
DDP averages the parameter gradients they equal those of one process computing the global-batch
loss.  Two implementations, chosen by ``dist_impl``:

* ``"gather"``: all-gather the keys with a gradient-carrying all-gather (reduce-scatter backward),
  then run the fused single-process op on local rows x global columns.  O(B_global * D) memory.
* ``"ring"``: key shards circulate (``fastcl.ring``); O(B_local * D) memory for remote data and
  the sends overlap the block computations.

Both are collective: every rank of ``group`` must call the loss and run its backward.  Argument
errors that could differ between ranks (D, dtype, empty shards, an unusable backend) are exchanged
first and raised on every rank, and so is any difference in the settings every rank must share
(scale, bias, temperature, ``dist_impl`` and the loss's flags): those would otherwise give wrong
gradients or leave ranks waiting in different collectives.
"""
from typing import Optional, Sequence

import torch

from fastcl.distributed import (Ring, all_gather_no_grad, all_reduce_checked, exchange_shapes, gather_with_sizes,
                                group_info, replicated_mean_grad)
from fastcl.losses._common import check_label_smoothing, mean_logits, smoothed_ce
from fastcl.losses.clip import clip_loss
from fastcl.losses.dcl import check_dcl_args, dcl_from_lse, dcl_weights
from fastcl.losses.ntxent import l2_normalize
from fastcl.losses.supcon import CONTRAST_MODES, _check_labels, anchor_losses, class_counts, class_ids, cpu_to
from fastcl.ops.reference import compute_dtype, positive_logits
from fastcl.ops.sigmoid_pair import sigmoid_pair_loss
from fastcl.ops.dispatch import resolve_backend
from fastcl.ops.similarity_lse import similarity_lse, similarity_lse_with_index
from fastcl.ring import ring_sigmoid_pair_loss, ring_similarity_lse
from fastcl.validation import as_0d, check_float_tensor, check_pair, check_scalar, check_views

Tensor = torch.Tensor

DIST_IMPLS = ("gather", "ring")
# open_clip's SigLIP names: its neighbour exchanges are rings; 'reduce' computes what 'gather' does.
SIGLIP_ALIASES = {"bidir": "ring", "shift": "ring", "reduce": "gather", None: "ring"}


def resolve_dist_impl(dist_impl, aliases=None) -> str:
    """``"gather"`` or ``"ring"`` from ``dist_impl`` (or one of ``aliases``); ValueError otherwise."""
    aliases = aliases or {}
    if dist_impl in aliases:
        return aliases[dist_impl]
    if dist_impl not in DIST_IMPLS:
        names = DIST_IMPLS + tuple(a for a in aliases if a is not None)
        raise ValueError(f"dist_impl must be one of {names}, got {dist_impl!r}")
    return dist_impl


def _checked_sizes(named, group, checks, settings=(), local_error: Optional[BaseException] = None) -> list:
    """Run this rank's argument checks (unless the caller's own failed: ``local_error``), then the
    collective exchange of shapes, dtypes and ``settings`` (raises on every rank)."""
    err = local_error
    if err is None:
        try:
            checks()
        except Exception as e:  # published to the other ranks, then re-raised here (a user's weight_fn may raise anything)
            err = e
    return exchange_shapes(named, group, err, settings)


def _check_backend(backend, x) -> None:
    """The backend is usable for ``x``'s device on this rank (else it would fail after the exchange,
    leaving the other ranks waiting)."""
    resolve_backend(backend, x.device)


def _impl_setting(dist_impl, aliases=None):
    """``dist_impl`` resolved (open_clip's aliases of one implementation agree), as every rank
    compares it and as the loss then uses it; ``repr`` of it when invalid, for which the checks
    raise, so past the exchange it is always resolved."""
    try:
        return resolve_dist_impl(dist_impl, aliases)
    except (ValueError, TypeError):
        return repr(dist_impl)


def _offset(sizes: Sequence[int], rank: int) -> int:
    return sum(sizes[:rank])


def clip_loss_distributed(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
                          local_loss: bool = True, gather_with_grad: bool = True, dist_impl: str = "gather",
                          group=None, label_smoothing: float = 0.0, backend: Optional[str] = None,
                          local_error: Optional[BaseException] = None) -> Tensor:
    """CLIP loss with negatives from every rank, as open_clip's ``ClipLoss`` under torch.distributed.

    * ``local_loss=True``: this rank's images against all texts and its texts against all images,
      labels ``arange(n) + offset(rank)``; the loss averages over local rows.
    * ``local_loss=False``: every rank's value is the global-batch loss, and (both
      implementations) every rank's ``logit_scale`` gradient that of the global loss.
    * ``gather_with_grad=False`` (gather only) reproduces open_clip's gradient-free gather: the
      gathered copies carry no gradient (with ``local_loss=False`` the local shard is spliced in).

    Args:
        image_features: (n_r, D) float tensor, this rank's rows; n_r may differ between ranks.
        text_features: (n_r, D), same dtype and device.
        logit_scale: positive float or 0-d tensor (exponentiated), the same on every rank.
        logit_bias: optional float or 0-d tensor.
        local_loss, gather_with_grad: open_clip's flags; ``dist_impl="ring"`` needs
            ``gather_with_grad=True`` (the ring always sends gradients home).
        dist_impl: "gather" or "ring".
        group: process group, default the world; without torch.distributed it is one process.
        label_smoothing: in [0, 1], as ``F.cross_entropy``.
        backend: see ``fastcl.ops.similarity_lse``.
        local_error: an exception from the caller's own argument checks (a module's), or None;
            it is published so that every rank raises, and re-raised here.

    Every setting above but ``backend`` must be the same on every rank (checked).

    Returns:
        0-d float32 tensor (float64 for float64 inputs), this rank's loss.
    """
    impl, opts = _impl_setting(dist_impl), {}

    def checks():
        resolve_dist_impl(dist_impl)
        if impl == "ring" and not gather_with_grad:
            raise ValueError("dist_impl='ring' always propagates gradients to the remote shards; use "
                             "gather_with_grad=True, or dist_impl='gather' for open_clip's gradient-free gather")
        opts["eps"] = check_label_smoothing(label_smoothing)
        check_pair("image_features", image_features, "text_features", text_features)
        check_scalar("logit_scale", logit_scale, positive=True, device=image_features.device)
        if logit_bias is not None:
            check_scalar("logit_bias", logit_bias, device=image_features.device)
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"image_features and text_features must have the same number of rows, "
                             f"got {image_features.shape[0]} and {text_features.shape[0]}")
        _check_backend(backend, image_features)

    settings = [("dist_impl", impl), ("local_loss", local_loss),
                ("gather_with_grad", gather_with_grad), ("label_smoothing", label_smoothing),
                ("logit_scale", logit_scale), ("logit_bias", 0.0 if logit_bias is None else logit_bias)]
    sizes = _checked_sizes([("image_features", image_features), ("text_features", text_features)],
                           group, checks, settings, local_error)[0]
    logit_scale, logit_bias = as_0d(logit_scale), as_0d(logit_bias)
    eps = opts["eps"]
    rank, _ = group_info(group)
    n, total = image_features.shape[0], sum(sizes)
    s, b = logit_scale, logit_bias
    if impl == "gather":
        off = _offset(sizes, rank)
        if gather_with_grad:
            all_i = gather_with_sizes(image_features, sizes, group)
            all_t = gather_with_sizes(text_features, sizes, group)
        else:
            all_i = all_gather_no_grad(image_features, sizes, group)
            all_t = all_gather_no_grad(text_features, sizes, group)
            if not local_loss and len(sizes) > 1:  # only the local shard carries a gradient
                all_i = torch.cat([all_i[:off], image_features, all_i[off + n:]])
                all_t = torch.cat([all_t[:off], text_features, all_t[off + n:]])
        if not local_loss:
            return clip_loss(all_i, all_t, s, b, label_smoothing=eps, backend=backend)
        labels = torch.arange(n, device=image_features.device) + off
        # labels are built here (this rank's rows), in range by construction: not read back.
        lse_i, pos_i = similarity_lse_with_index(image_features, all_t, s, b, rows=True, index=labels,
                                                 backend=backend)
        lse_t, pos_t = similarity_lse_with_index(text_features, all_i, s, b, rows=True, index=labels,
                                                 backend=backend)
        mean_i = mean_t = None
        if eps > 0.0:
            mean_i = mean_logits(image_features, all_t, s, b)
            mean_t = mean_logits(text_features, all_i, s, b)
        return 0.5 * (smoothed_ce(lse_i, pos_i, mean_i, eps).mean() + smoothed_ce(lse_t, pos_t, mean_t, eps).mean())

    # Ring: rows = images x all texts, columns = local texts x all images, one pass for both.
    ring = Ring(group)
    if not local_loss:
        # The ring hands each rank the scale gradient of the blocks of its rows, not of the whole
        # loss that every rank computes here (summed over ranks they are the same): averaged, each
        # rank reads open_clip's value, the gradient of the global loss.
        s, b = replicated_mean_grad(s, group), replicated_mean_grad(b, group)
    lse_i, lse_t = ring_similarity_lse(image_features, text_features, s, b, cols=True, ring=ring, sizes=sizes,
                                       backend=backend)
    pos = positive_logits(image_features, text_features, torch.arange(n, device=image_features.device), s, b)
    mean_i = mean_t = None
    if eps > 0.0:
        ct = compute_dtype(image_features.dtype)
        # Mean logit over all columns = scale * q . (sum of every rank's rows) / total + bias.
        sum_t = all_reduce_checked(text_features.to(ct).sum(0), group)
        sum_i = all_reduce_checked(image_features.to(ct).sum(0), group)
        mean_i = image_features.to(ct) @ sum_t / total * s
        mean_t = text_features.to(ct) @ sum_i / total * s
        if b is not None:
            mean_i, mean_t = mean_i + b, mean_t + b
    per_row = 0.5 * (smoothed_ce(lse_i, pos, mean_i, eps) + smoothed_ce(lse_t, pos, mean_t, eps))
    if local_loss:
        return per_row.mean()
    # Global loss on every rank; its backward hands each rank the W-fold gradient of its rows,
    # exactly what open_clip's full-matrix loss with a gradient all-gather produces.
    return all_reduce_checked(per_row.sum(), group) / total


def siglip_loss_distributed(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, *,
                            dist_impl: Optional[str] = "ring", group=None, backend: Optional[str] = None,
                            local_error: Optional[BaseException] = None) -> Tensor:
    """SigLIP loss of this rank's images against every rank's texts, as open_clip's ``SigLipLoss``.

    ``sum over local images i and all texts j of -logsigmoid(z_ij * (s * I_i . T_j + b)) / n_r``
    with ``z = +1`` only for the local pairs (i, i).  Not divided by the world size: DDP's
    gradient averaging makes it the global mean.

    Args:
        image_features: (n_r, D) float tensor; text_features: (n_r, D), same dtype and device.
        logit_scale: positive float or 0-d tensor (exponentiated); logit_bias: float, 0-d tensor
            or None (no bias).
        dist_impl: "ring" (also "bidir", "shift", None) or "gather" (also "reduce").
        group: process group, default the world.
        backend: see ``fastcl.ops.sigmoid_pair_loss``.
        local_error: an exception from the caller's own argument checks (a module's), or None;
            it is published so that every rank raises, and re-raised here.

    ``logit_scale``, ``logit_bias`` and ``dist_impl`` must be the same on every rank (checked).

    Returns:
        0-d float32 tensor (float64 for float64 inputs), this rank's loss.
    """
    impl = _impl_setting(dist_impl, SIGLIP_ALIASES)

    def checks():
        resolve_dist_impl(dist_impl, SIGLIP_ALIASES)
        check_pair("image_features", image_features, "text_features", text_features)
        check_scalar("logit_scale", logit_scale, positive=True, device=image_features.device)
        if logit_bias is not None:
            check_scalar("logit_bias", logit_bias, device=image_features.device)
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"image_features and text_features must have the same number of rows, "
                             f"got {image_features.shape[0]} and {text_features.shape[0]}")
        _check_backend(backend, image_features)

    settings = [("dist_impl", impl), ("logit_scale", logit_scale),
                ("logit_bias", 0.0 if logit_bias is None else logit_bias)]  # no bias is a bias of 0
    sizes = _checked_sizes([("image_features", image_features), ("text_features", text_features)],
                           group, checks, settings, local_error)[0]
    logit_scale, logit_bias = as_0d(logit_scale), as_0d(logit_bias)
    rank, _ = group_info(group)
    n = image_features.shape[0]
    if logit_bias is None:
        logit_bias = 0.0
    if impl == "gather":
        all_t = gather_with_sizes(text_features, sizes, group)
        off = _offset(sizes, rank)
        # Own shard first: the op's positives are the diagonal of the first n columns.
        rotated = torch.cat([all_t[off:], all_t[:off]]) if off else all_t
        return sigmoid_pair_loss(image_features, rotated, logit_scale, logit_bias, backend=backend) / n
    return ring_sigmoid_pair_loss(image_features, text_features, logit_scale, logit_bias, ring=Ring(group),
                                  sizes=sizes, backend=backend) / n


def ntxent_loss_distributed(out0: Tensor, out1: Tensor, temperature=0.5, *, dist_impl: str = "gather",
                            group=None, backend: Optional[str] = None,
                            local_error: Optional[BaseException] = None) -> Tensor:
    """NT-Xent with negatives from every rank, as lightly's ``NTXentLoss(gather_distributed=True)``.

    Each of the 2 n_r local anchors (both views, L2-normalised here) is contrasted with both views
    of every rank's samples except itself; its positive is the same sample in the other view.  The
    loss is the mean over the local anchors.

    Args:
        out0, out1: (n_r, D) float tensors, same dtype and device; n_r may differ between ranks.
        temperature: positive float or 0-d tensor, the same on every rank.
        dist_impl: "gather" or "ring".
        group: process group, default the world.
        backend: see ``fastcl.ops.similarity_lse``.
        local_error: an exception from the caller's own argument checks (a module's), or None;
            it is published so that every rank raises, and re-raised here.

    ``temperature`` and ``dist_impl`` must be the same on every rank (checked).

    Returns:
        0-d float32 tensor (float64 for float64 inputs), this rank's loss.
    """
    impl = _impl_setting(dist_impl)

    def checks():
        resolve_dist_impl(dist_impl)
        check_views(out0, out1)
        check_scalar("temperature", temperature, positive=True, device=out0.device)
        _check_backend(backend, out0)

    sizes = _checked_sizes([("out0", out0), ("out1", out1)], group, checks,
                           [("dist_impl", impl), ("temperature", temperature)], local_error)[0]
    temperature = as_0d(temperature)
    rank, _ = group_info(group)
    n = out0.shape[0]
    z = torch.cat([l2_normalize(out0), l2_normalize(out1)], dim=0)  # rank-local block [view 0; view 1]
    scale = 1.0 / temperature
    partner = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    z_sizes = [2 * m for m in sizes]
    if impl == "gather":
        off = _offset(z_sizes, rank)
        all_z = gather_with_sizes(z, z_sizes, group)
        lse, pos = similarity_lse_with_index(z, all_z, scale, rows=True, exclude_diagonal=off, index=partner + off,
                                             backend=backend)
    else:
        lse, _ = ring_similarity_lse(z, z, scale, exclude_self=True, ring=Ring(group), sizes=z_sizes,
                                     backend=backend)
        pos = positive_logits(z, z, partner, scale)
    return (lse - pos).mean()


def dcl_loss_distributed(out0: Tensor, out1: Tensor, temperature=0.1, weight_fn=None, *, negatives: str = "union",
                         dist_impl: str = "gather", group=None, backend: Optional[str] = None,
                         local_error: Optional[BaseException] = None) -> Tensor:
    """DCL with negatives from every rank, as lightly's ``DCLLoss(gather_distributed=True)``.

    The local anchors a_i, b_i (L2-normalised here) are contrasted with both views of every
    rank's samples except sample i itself (its own-view self pair and its positive); the positive
    term and ``weight_fn`` use the local views only, so a weighting that depends on the whole
    batch (e.g. DCLW's von Mises-Fisher) sees this rank's shard, as in lightly.  The loss is
    ``0.5 * (mean_i l(a_i) + mean_i l(b_i))`` over the local anchors; ``negatives`` as in
    ``fastcl.losses.dcl.dcl_loss`` ("union": lightly >= 1.5.21, "separate": lightly <= 1.5.20).

    Args:
        out0, out1: (n_r, D) float tensors, same dtype and device; n_r may differ between ranks.
        temperature: positive float or 0-d tensor, the same on every rank.
        weight_fn: optional callable ``(a (n_r, D), b (n_r, D)) -> (n_r,)`` weights of the positive term.
        negatives: "union" (default) or "separate".
        dist_impl: "gather" or "ring".
        group: process group, default the world.
        backend: see ``fastcl.ops.similarity_lse``.
        local_error: an exception from the caller's own argument checks (a module's), or None;
            it is published so that every rank raises, and re-raised here.

    ``temperature``, ``negatives`` and ``dist_impl`` must be the same on every rank (checked).

    Returns:
        0-d float32 tensor (float64 for float64 inputs), this rank's loss.
    """
    impl, local = _impl_setting(dist_impl), {}

    def checks():
        resolve_dist_impl(dist_impl)
        check_dcl_args(out0, out1, temperature, weight_fn, negatives)
        _check_backend(backend, out0)
        # weight_fn sees only local data: run it here so a bad return shape raises on every rank.
        a, b = l2_normalize(out0), l2_normalize(out1)
        local.update(a=a, b=b, w=dcl_weights(weight_fn, a, b))

    settings = [("dist_impl", impl), ("temperature", temperature), ("negatives", negatives)]
    sizes = _checked_sizes([("out0", out0), ("out1", out1)], group, checks, settings, local_error)[0]
    temperature = as_0d(temperature)
    rank, _ = group_info(group)
    a, b = local["a"], local["b"]
    scale = 1.0 / temperature
    if impl == "gather":
        off = _offset(sizes, rank)
        all_a = gather_with_sizes(a, sizes, group)
        all_b = gather_with_sizes(b, sizes, group)
        lse_aa = similarity_lse(a, all_a, scale, rows=True, exclude_diagonal=off, backend=backend)
        lse_ab = similarity_lse(a, all_b, scale, rows=True, exclude_diagonal=off, backend=backend)
        lse_bb = similarity_lse(b, all_b, scale, rows=True, exclude_diagonal=off, backend=backend)
        lse_ba = similarity_lse(b, all_a, scale, rows=True, exclude_diagonal=off, backend=backend)
    else:
        ring = Ring(group)
        lse_aa, _ = ring_similarity_lse(a, a, scale, exclude_self=True, ring=ring, sizes=sizes, backend=backend)
        lse_bb, _ = ring_similarity_lse(b, b, scale, exclude_self=True, ring=ring, sizes=sizes, backend=backend)
        # rows: local a against every b; columns: local b against every a.
        lse_ab, lse_ba = ring_similarity_lse(a, b, scale, cols=True, exclude_self=True, ring=ring, sizes=sizes,
                                             backend=backend)
    return dcl_from_lse(lse_aa, lse_ab, lse_bb, lse_ba, a, b, scale, local["w"], negatives)


def _label_values(labels: Tensor) -> Tensor:
    """(bsz,) labels as every rank gathers them: float64 for floating labels, int64 otherwise
    (the shape exchange then refuses ranks that mix the two)."""
    flat = labels.reshape(-1)
    return flat.double() if flat.is_floating_point() else flat.long()


def _global_classes(labels: Optional[Tensor], bsz: int, sizes: Sequence[int], rank: int, group, device):
    """(local class ids (bsz,), number of classes) in one id space shared by every rank."""
    if labels is None:  # SimCLR: each sample its own class, ids unique across ranks
        return torch.arange(bsz, device=device) + _offset(sizes, rank), sum(sizes)
    all_labels = all_gather_no_grad(_label_values(labels), sizes, group)
    inverse, n_classes = class_ids(all_labels)
    off = _offset(sizes, rank)
    return inverse[off:off + bsz], n_classes


def supcon_loss_distributed(features: Tensor, labels: Optional[Tensor] = None, temperature=0.07,
                            base_temperature: float = 0.07, contrast_mode: str = "all", *, dist_impl: str = "gather",
                            group=None, backend: Optional[str] = None,
                            local_error: Optional[BaseException] = None) -> Tensor:
    """SupCon (SupContrast form) with contrasts from every rank; anchors are this rank's.

    The contrast set is every view of every rank's samples; positives share the label (or, with
    ``labels=None``, are the other views of the same sample) and exclude the anchor itself, which
    is also left out of the denominator.  Per anchor
    ``-(temperature / base_temperature) * mean_{p in P(i)} log_softmax_i(p)`` (0 without
    positives); the loss is the mean over the local anchors.  Labels are gathered (no gradient) to
    build one class-id space; the ring sums the per-class feature sums with one all-reduce
    (O(C * D), C = classes in the global batch) instead of gathering features.

    Args:
        features: (bsz_r, n_views, D) float tensor ((bsz_r, n_views, ...) is flattened to it);
            bsz_r may differ between ranks.
        labels: optional (bsz_r,) integer or floating (not NaN) classes, the same kind on every rank;
            give them on every rank or on none.
        temperature: positive float or 0-d tensor; base_temperature: positive float.
        contrast_mode: "all" (every view anchors) or "one" (view 0 anchors).
        dist_impl: "gather" or "ring".
        group: process group, default the world.
        backend: see ``fastcl.ops.similarity_lse``.
        local_error: an exception from the caller's own argument checks (a module's), or None;
            it is published so that every rank raises, and re-raised here.

    ``temperature``, ``base_temperature``, ``contrast_mode`` and ``dist_impl`` must be the same on
    every rank (checked).

    Returns:
        0-d float32 tensor (float64 for float64 inputs), this rank's loss.
    """
    if isinstance(features, Tensor) and features.dim() > 3:  # [bsz, n_views, ...], as SupContrast
        features = features.reshape(features.shape[0], features.shape[1], -1)
    impl = _impl_setting(dist_impl)
    if isinstance(features, Tensor):
        labels = cpu_to(labels, features.device)  # SupContrast's .to(device)

    def checks():
        resolve_dist_impl(dist_impl)
        check_float_tensor("features", features, "(bsz, n_views, D)", non_empty=False)
        check_scalar("temperature", temperature, positive=True, device=features.device)
        check_scalar("base_temperature", base_temperature, positive=True, device=features.device)
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
        if labels is not None:
            _check_labels("labels", labels, features.shape[0], features.device, allow_float=True)
        _check_backend(backend, features)

    # labels=None is published as a bool placeholder so a rank that omits labels is caught.
    lab_meta = _label_values(labels) if isinstance(labels, Tensor) else torch.zeros(
        features.shape[0] if isinstance(features, Tensor) and features.dim() else 1, dtype=torch.bool)
    settings = [("dist_impl", impl), ("temperature", temperature),
                ("base_temperature", base_temperature), ("contrast_mode", contrast_mode)]
    sizes, _ = _checked_sizes([("features", features), ("labels (give them on every rank or none)", lab_meta)],
                              group, checks, settings, local_error)
    temperature, base_temperature = as_0d(temperature), as_0d(base_temperature)
    rank, _ = group_info(group)
    bsz, n_views, d = features.shape
    ct = compute_dtype(features.dtype)
    contrasts = features.transpose(0, 1).reshape(bsz * n_views, d)  # view-major, as supcon_loss
    n_anchor = bsz * n_views if contrast_mode == "all" else bsz
    anchors = contrasts[:n_anchor]
    if impl == "ring" and labels is None:
        # positives are the sample's own views, all local: local ids keep the sums O(bsz * D)
        classes, n_cls = torch.arange(bsz, device=features.device), bsz
    else:
        classes, n_cls = _global_classes(labels, bsz, sizes, rank, group, features.device)
    cls_rep = classes.repeat(n_views)
    scale = 1.0 / temperature
    c_sizes = [n_views * m for m in sizes]
    if impl == "gather":
        off = _offset(c_sizes, rank)
        all_c = gather_with_sizes(contrasts, c_sizes, group)
        all_cls = all_gather_no_grad(cls_rep, c_sizes, group)
        sums = torch.zeros(n_cls, d, dtype=ct, device=features.device).index_add_(0, all_cls, all_c.to(ct))
        counts = class_counts(all_cls, n_cls, ct)
        lse = similarity_lse(anchors, all_c, scale, rows=True, exclude_diagonal=off, backend=backend)
    else:
        local_sums = torch.zeros(n_cls, d, dtype=ct, device=features.device).index_add_(0, cls_rep, contrasts.to(ct))
        counts = class_counts(cls_rep, n_cls, ct)
        if labels is None:
            sums = local_sums
        else:
            sums = all_reduce_checked(local_sums, group)
            counts = all_reduce_checked(counts, group)
        lse, _ = ring_similarity_lse(anchors, contrasts, scale, exclude_self=True, ring=Ring(group),
                                     sizes=c_sizes, backend=backend)
    own = cls_rep[:n_anchor]
    a = anchors.to(ct)
    pos_dot = (a * (sums.index_select(0, own) - a)).sum(-1)  # class sum minus self = the positives
    count = counts.index_select(0, own) - 1
    per_anchor = anchor_losses(lse, pos_dot, count, scale)
    return (per_anchor * (temperature / base_temperature)).mean()
