"""The loss family (NT-Xent, SupCon, DCL, SigLIP, InfoNCE/CLIP options) against float64 oracles.

Each oracle materialises the full logit matrix and follows the peer's definition literally
(masks, F.cross_entropy, logsigmoid); the fused losses must match it in value and gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import (COLLAPSED_BATCH_FACTOR, DTYPES, NORMALISED_SCALAR_GRAD_FACTOR, NORMALISED_VALUE_FACTOR,
                      assert_close, fp32_output_tol, randn)
from fastcl._ext import extension_available
from fastcl.losses.clip import clip_loss
from fastcl.losses.dcl import dcl_loss
from fastcl.losses.info_nce import info_nce
from fastcl.losses.ntxent import ntxent_bank_loss, ntxent_loss
from fastcl.losses.siglip import siglip_loss
from fastcl.losses.supcon import supcon_loss, supcon_loss_pml
from fastcl.nn.losses import (ClipLoss, DCLLoss, DCLWLoss, DirectCLRLoss, InfoNCELoss, MACLLoss, NTXentLoss,
                              SigLipLoss, SupConLoss)
from fastcl.ops.dispatch import triton_available

BACKENDS = ["reference"]
if extension_available():
    BACKENDS.append("cpu")
if triton_available():
    BACKENDS.append("triton")


# ----------------------------------------------------------------------------- oracles (float64)
def o_ntxent(a, b, t, reduction="mean"):
    z = torch.cat([F.normalize(a, dim=1), F.normalize(b, dim=1)])
    n2 = z.shape[0]
    logits = (z @ z.T / t).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    target = (torch.arange(n2) + n2 // 2) % n2
    return F.cross_entropy(logits, target, reduction=reduction)


def o_supcon(features, labels=None, mask=None, t=0.07, bt=0.07, mode="all", reduction="mean"):
    """SupContrast's SupConLoss (Dec 2023: a positive weight below 1e-6 divides by 1)."""
    features = features.reshape(features.shape[0], features.shape[1], -1)
    bsz, v = features.shape[:2]
    if mask is None:
        lab = torch.arange(bsz) if labels is None else labels
        mask = (lab[:, None] == lab[None, :]).double()
    contrast = torch.cat(torch.unbind(features, 1))
    anchor = contrast if mode == "all" else features[:, 0]
    a_cnt = v if mode == "all" else 1
    logits = anchor @ contrast.T / t
    not_self = torch.ones_like(logits)
    not_self[range(logits.shape[0]), range(logits.shape[0])] = 0
    pos = mask.double().repeat(a_cnt, v) * not_self
    log_prob = logits - torch.logsumexp(logits.masked_fill(not_self == 0, float("-inf")), 1, keepdim=True)
    n_pos = pos.sum(1)
    mean_lp = torch.where(pos != 0, pos * log_prob, torch.zeros_like(log_prob)).sum(1) / torch.where(n_pos < 1e-6, torch.ones_like(n_pos), n_pos)
    return REDUCE[reduction](-(t / bt) * mean_lp)


def o_supcon_pml(emb, labels, t):
    z = F.normalize(emb, dim=1)
    n = z.shape[0]
    logits = z @ z.T / t
    eye = torch.eye(n, dtype=torch.bool)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), 1, keepdim=True)
    per = -(log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)
    keep = per > 0
    if not (labels[:, None] != labels[None, :]).any():  # no negative pair: PML returns 0
        return per.sum() * 0
    return per[keep].sum() / keep.sum().clamp_min(1)


def o_dcl(a, b, t, weight_fn=None, negatives="union"):
    """lightly >= 1.5.21 ("union": one LSE over both views' negatives) or <= 1.5.20 ("separate")."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)

    def one(x, y):
        n = x.shape[0]
        off = ~torch.eye(n, dtype=torch.bool)
        sxx, sxy = x @ x.T / t, x @ y.T / t
        pos = -sxy.diagonal()
        if weight_fn is not None:
            pos = pos * weight_fn(x, y)
        neg_xx, neg_xy = sxx[off].view(n, n - 1), sxy[off].view(n, n - 1)
        if negatives == "union":
            neg = torch.logsumexp(torch.cat([neg_xx, neg_xy], 1), 1)
        else:
            neg = torch.logsumexp(neg_xx, 1) + torch.logsumexp(neg_xy, 1)
        return (pos + neg).mean()
    return 0.5 * (one(a, b) + one(b, a))


def o_siglip(img, txt, s, b):
    logits = s * img @ txt.T + b
    z = -torch.ones_like(logits)
    z[range(img.shape[0]), range(img.shape[0])] = 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def o_info_nce(q, k, scale, positives, eps, symmetric=False, exclude_self=False, reduction="mean"):
    logits = scale * q @ k.T
    if exclude_self:  # the (i, i) entries leave every denominator, and the smoothing's candidates
        logits = logits.masked_fill(torch.eye(*logits.shape, dtype=torch.bool), float("-inf"))
    loss = _smoothed_ce(logits, positives, eps)
    if symmetric:
        loss = 0.5 * (loss + _smoothed_ce(logits.T[positives], torch.arange(q.shape[0]), eps))
    return REDUCE[reduction](loss)


def _smoothed_ce(logits, target, eps):
    """F.cross_entropy(label_smoothing=eps, reduction="none") with the uniform part over the finite
    entries of each row only (F.cross_entropy would spread it over -inf entries too)."""
    logp = logits.log_softmax(1)
    finite = torch.isfinite(logits)
    uniform = -torch.where(finite, logp, torch.zeros_like(logp)).sum(1) / finite.sum(1)
    return (1 - eps) * -logp.gather(1, target[:, None]).squeeze(1) + eps * uniform


REDUCE = {"mean": torch.mean, "sum": torch.sum, "none": lambda x: x}


def o_clip(img, txt, s, b, labels, eps):
    logits = s * img @ txt.T + (0.0 if b is None else b)
    return 0.5 * (F.cross_entropy(logits, labels, label_smoothing=eps)
                  + F.cross_entropy(logits.T[labels], torch.arange(img.shape[0]), label_smoothing=eps))


# ----------------------------------------------------------------------------- harness
def compare(fast, oracle, tensors, dtype, what, normalised=False, backend=None, biases=()):
    """Run ``fast`` on ``tensors`` (floating ones rounded to ``dtype`` when 2-D/3-D) and ``oracle`` on
    their float64 copies; compare the value and every gradient.  The fp32 value and the gradients
    of 0-d tensors (a temperature or logit scale; a logit bias at the indices ``biases`` of
    ``tensors``) take fp32_output_tol's row of TOL for ``backend``, the other gradients ``dtype``'s.
    ``normalised``: the loss L2-normalises its inputs in their dtype (NORMALISED_VALUE_FACTOR,
    NORMALISED_SCALAR_GRAD_FACTOR)."""
    leaves = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().clone()
            if t.dim() >= 2:
                t = t.to(dtype)
            leaves.append(t.requires_grad_())
        else:
            leaves.append(t)
    out = fast(*leaves)
    ref_leaves = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for t in leaves]
    ref = oracle(*ref_leaves)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The value is an fp32 sum over inputs that are already rounded (the oracle gets the same
    # rounded values): fp32's tolerance, whatever the input dtype.
    assert_close(out, ref, fp32_output_tol(dtype), f"{what} value",
                 NORMALISED_VALUE_FACTOR.get(dtype, 1.0) if normalised else 1.0)
    grads = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_grads = [t for t in ref_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(out, [t for _, t in grads])
    want = torch.autograd.grad(ref, ref_grads)
    for (i, t), g, w in zip(grads, got, want):
        if t.dim() == 0:  # fp32 whatever the input dtype
            row = fp32_output_tol(dtype, backend, from_tiles=i not in biases)
            factor = NORMALISED_SCALAR_GRAD_FACTOR.get(dtype, 1.0) if normalised and row == torch.float32 else 1.0
            assert_close(g, w, row, f"{what} grad {i}", factor)
        else:
            assert_close(g, w, dtype, f"{what} grad {i}")


# ----------------------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent(backend, dtype):
    g = torch.Generator().manual_seed(1)
    a, b = randn(67, 40, generator=g), randn(67, 40, generator=g)
    t = torch.tensor(0.3)
    compare(lambda x, y, tt: ntxent_loss(x, y, tt, backend=backend), o_ntxent, [a, b, t], dtype, "ntxent", normalised=True,
            backend=backend)


def test_ntxent_module_and_degenerate():
    g = torch.Generator().manual_seed(2)
    a, b = randn(1, 5, generator=g), randn(1, 5, generator=g)
    compare(lambda x, y: NTXentLoss(0.5)(x, y), lambda x, y: o_ntxent(x, y, 0.5), [a, b], torch.float32, "N=1")
    # gather_distributed on one process is the plain loss (lightly's behaviour)
    compare(lambda x, y: NTXentLoss(0.5, gather_distributed=True)(x, y), lambda x, y: o_ntxent(x, y, 0.5),
            [a, b], torch.float32, "gather_distributed, one process")
    with pytest.raises(ValueError, match="dist_impl"):
        NTXentLoss(gather_distributed=True, dist_impl="allreduce")
    with pytest.raises(ValueError, match="temperature"):
        ntxent_loss(a, b, 0.0)
    with pytest.raises(ValueError, match="out1"):
        ntxent_loss(randn(3, 5), randn(3, 4))


# ----------------------------------------------------------------------------- SupCon
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["all", "one"])
def test_supcon_labels(backend, dtype, mode):
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(randn(37, 3, 24, generator=g), dim=-1)
    labels = torch.randint(0, 7, (37,), generator=g)
    labels[0] = 99  # a singleton class: anchors of view 0..2 still have the other views
    t = torch.tensor(0.1)
    compare(lambda f, tt: supcon_loss(f, labels, temperature=tt, base_temperature=0.07, contrast_mode=mode,
                                      backend=backend),
            lambda f, tt: o_supcon(f, labels, t=tt, bt=0.07, mode=mode), [feats, t], dtype, f"supcon {mode}",
            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_mask_and_simclr(backend):
    g = torch.Generator().manual_seed(4)
    feats = F.normalize(randn(19, 2, 16, generator=g), dim=-1)
    mask = (torch.rand(19, 19, generator=g) > 0.7).double()
    mask = torch.maximum(mask, mask.T)
    compare(lambda f: supcon_loss(f, mask=mask, backend=backend),
            lambda f: o_supcon(f, mask=mask), [feats], torch.float32, "supcon mask")
    compare(lambda f: supcon_loss(f, backend=backend), lambda f: o_supcon(f), [feats], torch.float32, "simclr")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one_class", "singletons", "one_view", "n1"])
def test_supcon_degenerate(backend, case):
    g = torch.Generator().manual_seed(5)
    bsz, views = {"one_class": (23, 2), "singletons": (23, 2), "one_view": (23, 1), "n1": (1, 1)}[case]
    feats = F.normalize(randn(bsz, views, 12, generator=g), dim=-1)
    labels = torch.zeros(bsz, dtype=torch.long) if case in ("one_class", "one_view") else torch.arange(bsz)
    out = supcon_loss(feats, labels, backend=backend)
    assert torch.isfinite(out)
    if case == "n1":  # the only anchor has no positive: contributes 0, not NaN
        assert float(out) == 0.0
    compare(lambda f: supcon_loss(f, labels, backend=backend), lambda f: o_supcon(f, labels), [feats],
            torch.float32, f"supcon {case}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_pml_form(backend):
    g = torch.Generator().manual_seed(6)
    emb = randn(41, 20, generator=g)
    labels = torch.randint(0, 9, (41,), generator=g)
    labels[:3] = torch.tensor([100, 101, 102])  # anchors without positives are left out of the mean
    compare(lambda e: SupConLoss(temperature=0.1, backend=backend)(e, labels),
            lambda e: o_supcon_pml(e, labels, 0.1), [emb], torch.float32, "pml")
    compare(lambda e: supcon_loss_pml(e, labels, 0.2, backend=backend),
            lambda e: o_supcon_pml(e, labels, 0.2), [emb], torch.bfloat16, "pml bf16", normalised=True)


def test_supcon_module_and_errors():
    g = torch.Generator().manual_seed(7)
    feats = randn(9, 2, 6, generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    assert_close(SupConLoss(0.2, "one", 0.1)(feats, labels),
                 o_supcon(feats.double(), labels, t=0.2, bt=0.1, mode="one"), torch.float32, "module")
    with pytest.raises(ValueError, match="features"):
        supcon_loss(randn(9, 6), labels)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(feats, labels[:4])
    with pytest.raises(TypeError, match="labels"):
        supcon_loss(feats, labels.bool())
    with pytest.raises(ValueError, match="NaN"):
        supcon_loss(feats, labels.float().index_fill(0, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match="contrast_mode"):
        supcon_loss(feats, labels, contrast_mode="some")
    with pytest.raises(ValueError, match="mask"):
        supcon_loss(feats, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="labels"):
        SupConLoss()(randn(9, 6))
    with pytest.raises(ValueError, match="dist_impl"):
        SupConLoss(gather_distributed=True, dist_impl="bidir")


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_as_supcontrast_at_the_edges(backend):
    """Float labels compare by value; (bsz, n_views, ...) features are flattened; a mask's
    positive weight below 1e-6 (tiny, zero or negative) divides by 1; NaN in the mask gives NaN."""
    g = torch.Generator().manual_seed(8)
    feats = randn(9, 2, 2, 3, generator=g)
    labels = torch.randint(0, 3, (9,), generator=g).double() / 4
    compare(lambda f: supcon_loss(f, labels, backend=backend), lambda f: o_supcon(f, labels), [feats],
            torch.float32, "supcon float labels, 4-D features")
    mask = torch.rand(9, 9, generator=g)
    mask[0] = 0.0
    mask[0, 3] = 1e-7   # below 1e-6: divided by 1
    mask[1] = -0.25     # negative total weight: divided by 1 too
    mask[2, 2] = 5.0    # self weight never counts
    compare(lambda f: supcon_loss(f, mask=mask, backend=backend), lambda f: o_supcon(f, mask=mask),
            [feats[:, :, 0]], torch.float32, "supcon weighted mask")
    mask[4, 1] = float("nan")
    assert torch.isnan(supcon_loss(feats, mask=mask, backend=backend))
    # a single label: PML's form has no negatives and returns 0
    assert supcon_loss_pml(feats[:, 0, 0], torch.zeros(9), backend=backend).item() == 0.0


# ----------------------------------------------------------------------------- DCL
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("negatives", ["union", "separate"])
def test_dcl(backend, dtype, negatives):
    g = torch.Generator().manual_seed(8)
    a, b = randn(53, 36, generator=g), randn(53, 36, generator=g)
    t = torch.tensor(0.1)
    compare(lambda x, y, tt: dcl_loss(x, y, tt, negatives=negatives, backend=backend),
            lambda x, y, tt: o_dcl(x, y, tt, negatives=negatives), [a, b, t], dtype, f"dcl {negatives}", normalised=True,
            backend=backend)


def test_dcl_default_is_union():
    g = torch.Generator().manual_seed(10)
    a, b = randn(13, 7, generator=g), randn(13, 7, generator=g)
    compare(lambda x, y: dcl_loss(x, y, 0.3), lambda x, y: o_dcl(x, y, 0.3, negatives="union"),
            [a, b], torch.float32, "dcl default")
    compare(lambda x, y: DCLLoss(0.3)(x, y), lambda x, y: o_dcl(x, y, 0.3, negatives="union"),
            [a, b], torch.float32, "DCLLoss default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["union", "separate"])
def test_dclw(backend, negatives):
    g = torch.Generator().manual_seed(9)
    a, b = randn(31, 16, generator=g), randn(31, 16, generator=g)

    def vmf(x, y, sigma=0.5):  # von Mises-Fisher weighting of the DCLW paper
        return 2 - x.shape[0] * torch.softmax((x * y).sum(1) / sigma, dim=0)
    compare(lambda x, y: DCLLoss(0.2, weight_fn=vmf, negatives=negatives, backend=backend)(x, y),
            lambda x, y: o_dcl(x, y, 0.2, vmf, negatives), [a, b], torch.float32, f"dclw {negatives}")
    # gather_distributed on one process is the plain loss (lightly's behaviour)
    for impl in ("gather", "ring"):
        compare(lambda x, y: DCLLoss(0.2, vmf, True, negatives=negatives, dist_impl=impl, backend=backend)(x, y),
                lambda x, y: o_dcl(x, y, 0.2, vmf, negatives), [a, b], torch.float32,
                f"dclw {negatives} gather_distributed {impl}, one process")
    plain = DCLLoss(0.2, vmf, negatives=negatives, backend=backend)(a, b)
    assert torch.equal(DCLLoss(0.2, vmf, True, negatives=negatives, backend=backend)(a, b), plain)


def test_dcl_bad_arguments():
    a, b = randn(5, 4), randn(5, 4)
    with pytest.raises(TypeError, match="weight_fn"):
        dcl_loss(a, b, 0.1, weight_fn=3)
    with pytest.raises(ValueError, match="weight_fn"):
        dcl_loss(a, b, 0.1, weight_fn=lambda x, y: torch.ones(4))
    for bad in ("sum", "Union", None):
        with pytest.raises(ValueError, match="negatives"):
            dcl_loss(a, b, negatives=bad)
        with pytest.raises(ValueError, match="negatives"):
            DCLLoss(negatives=bad)
    with pytest.raises(ValueError, match="dist_impl"):
        DCLLoss(gather_distributed=True, dist_impl="allreduce")
    with pytest.raises(ValueError, match="temperature"):
        DCLLoss(0.0)
    with pytest.raises(ValueError, match="batch size"):
        dcl_loss(a, randn(4, 4))


# ----------------------------------------------------------------------------- SigLIP
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip(backend, dtype):
    g = torch.Generator().manual_seed(10)
    img = F.normalize(randn(67, 40, generator=g), dim=1)
    txt = F.normalize(randn(67, 40, generator=g), dim=1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    compare(lambda i, t, ss, bb: SigLipLoss(backend=backend)(i, t, ss, bb), o_siglip, [img, txt, s, b], dtype, "siglip",
            backend=backend, biases=(3,))
    out = SigLipLoss(backend=backend)(img, txt, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    with pytest.raises(RuntimeError, match="init_process_group"):
        SigLipLoss(rank=0, world_size=2)(img, txt, s, b)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring2")


# ----------------------------------------------------------------------------- InfoNCE / CLIP options
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps,symmetric", [(0.0, False), (0.1, False), (0.2, True)])
def test_info_nce_hard_negatives_label_smoothing(backend, dtype, eps, symmetric):
    g = torch.Generator().manual_seed(11)
    n, groups, d = 43, 3, 40  # M = N * g keys: the positive plus two hard negatives per query
    q, k = F.normalize(randn(n, d, generator=g), dim=1), F.normalize(randn(n * groups, d, generator=g), dim=1)
    positives = torch.arange(n) * groups
    scale = torch.tensor(14.0)
    compare(lambda a, b, s: info_nce(a, b, logit_scale=s, positives=positives, symmetric=symmetric,
                                     label_smoothing=eps, backend=backend),
            lambda a, b, s: o_info_nce(a, b, s, positives, eps, symmetric), [q, k, scale], dtype, "info_nce",
            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_exclude_self_label_smoothing(backend):
    g = torch.Generator().manual_seed(12)
    x = randn(30, 12, generator=g)
    positives = (torch.arange(30) + 15) % 30

    def oracle(a, s):
        logits = (s * a @ a.T)
        keep = ~torch.eye(30, dtype=torch.bool)
        logits = logits[keep].view(30, 29)  # the excluded entry is not a class
        target = positives - (positives > torch.arange(30)).long()
        return F.cross_entropy(logits, target, label_smoothing=0.15)
    compare(lambda a, s: info_nce(a, a, logit_scale=s, positives=positives, exclude_self=True,
                                  label_smoothing=0.15, backend=backend),
            oracle, [x, torch.tensor(3.0)], torch.float32, "exclude_self")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_symmetric_exclude_self_label_smoothing(backend, symmetric):
    """All three options together: the excluded (i, i) entries leave the column term's
    denominator and its smoothing candidates as well as the row term's."""
    g = torch.Generator().manual_seed(14)
    x = randn(30, 12, generator=g)
    positives = (torch.arange(30) * 7 + 3) % 30  # a permutation that avoids the diagonal
    assert (positives != torch.arange(30)).all()
    compare(lambda a, s: info_nce(a, a, logit_scale=s, positives=positives, exclude_self=True, symmetric=symmetric,
                                  label_smoothing=0.15, backend=backend),
            lambda a, s: o_info_nce(a, a, s, positives, 0.15, symmetric, exclude_self=True),
            [x, torch.tensor(3.0)], torch.float32, "symmetric exclude_self smoothing")


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_exclude_self_label_smoothing_more_queries_than_keys(backend):
    """N > M with exclude_self: only the M diagonal entries (i, i), i < M, exist to leave out, so
    queries past M smooth over all M keys (the other exclude_self tests have N == M)."""
    g = torch.Generator().manual_seed(48)
    n, m = 31, 19
    q, k = randn(n, 12, generator=g), randn(m, 12, generator=g)
    positives = (torch.arange(n) + 5) % m
    assert (positives[:m] != torch.arange(m)).all()
    compare(lambda a, b, s: info_nce(a, b, logit_scale=s, positives=positives, exclude_self=True,
                                     label_smoothing=0.15, backend=backend),
            lambda a, b, s: o_info_nce(a, b, s, positives, 0.15, exclude_self=True),
            [q, k, torch.tensor(2.0)], torch.float32, "exclude_self N > M", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_mean_logit_of_half_inputs(backend):
    """The smoothing's mean logit is summed in fp32 from bf16 inputs, as the LSEs are: rows that
    share a large common direction make the mean logit large, where bf16 sums and products
    would be off by ~1e-2 relative, far past the fp32 value's tolerance."""
    g = torch.Generator().manual_seed(49)
    shared = 2.0 * randn(1, 40, generator=g)
    q, k = randn(37, 40, generator=g) + shared, randn(37, 40, generator=g) + shared
    # (a float scale: its gradient at such logits cancels past bf16's TOL on the tile-rounding backends)
    compare(lambda a, b: info_nce(a, b, logit_scale=0.05, symmetric=True, label_smoothing=0.3, backend=backend),
            lambda a, b: o_info_nce(a, b, 0.05, torch.arange(37), 0.3, symmetric=True),
            [q, k], torch.bfloat16, "bf16 smoothing", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction):
    """reduction= of every loss that takes it: "none" gives the per-anchor losses in the documented
    order (NT-Xent: view 0's anchors, then view 1's; SupCon: view-major), "sum" and "mean" reduce
    them.  A "none" result is compared through a fixed weighting, so its gradients are checked."""
    g = torch.Generator().manual_seed(15)
    a, b, feats = randn(23, 10, generator=g), randn(23, 10, generator=g), randn(17, 2, 10, generator=g)
    bank = F.normalize(randn(31, 10, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (17,), generator=g)
    positives = torch.randperm(29, generator=g)[:23]

    def weighted(f, n):
        w = torch.linspace(0.5, 1.5, n, dtype=torch.float64)

        def run(*t):
            out = f(*t)
            if reduction != "none":
                return out
            assert out.shape == (n,)
            return (out * w.to(out.dtype)).sum()
        return run

    def o_bank(x, y):
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
        logits = torch.cat([(x * y).sum(1, keepdim=True), x @ bank.T], 1) / 0.3
        return REDUCE[reduction](F.cross_entropy(logits, torch.zeros(23, dtype=torch.long), reduction="none"))

    compare(weighted(lambda x, y: ntxent_loss(x, y, 0.3, reduction=reduction, backend=backend), 46),
            weighted(lambda x, y: o_ntxent(x, y, 0.3, reduction), 46), [a, b], torch.float32, "ntxent")
    compare(weighted(lambda x, y: ntxent_bank_loss(x, y, bank.float(), 0.3, reduction=reduction, backend=backend), 23),
            weighted(o_bank, 23), [a, b], torch.float32, "ntxent bank")
    compare(weighted(lambda f: supcon_loss(f, labels, reduction=reduction, backend=backend), 34),
            weighted(lambda f: o_supcon(f, labels, reduction=reduction), 34), [feats], torch.float32, "supcon")
    k = randn(29, 10, generator=g)
    compare(weighted(lambda x, y: info_nce(x, y, temperature=0.5, positives=positives, reduction=reduction,
                                           backend=backend), 23),
            weighted(lambda x, y: o_info_nce(x, y, 2.0, positives, 0.0, reduction=reduction), 23),
            [a, k], torch.float32, "info_nce")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_hard_negatives_label_smoothing(backend, dtype, eps):
    g = torch.Generator().manual_seed(13)
    n, m, d = 29, 87, 24
    img, txt = F.normalize(randn(n, d, generator=g), dim=1), F.normalize(randn(m, d, generator=g), dim=1)
    labels = torch.randperm(m, generator=g)[:n]
    # A bias shifts every logit of a cross-entropy: its true gradient is 0, so it stays a float here.
    s, b = torch.tensor(20.0), -1.5
    compare(lambda i, t, ss: clip_loss(i, t, ss, b, labels=labels, label_smoothing=eps, backend=backend),
            lambda i, t, ss: o_clip(i, t, ss, b, labels, eps), [img, txt, s], dtype, "clip", backend=backend)


def test_modules_label_smoothing():
    g = torch.Generator().manual_seed(14)
    img, txt = randn(11, 8, generator=g), randn(11, 8, generator=g)
    s = torch.tensor(5.0)
    assert_close(ClipLoss(label_smoothing=0.1)(img, txt, s),
                 o_clip(img.double(), txt.double(), 5.0, None, torch.arange(11), 0.1), torch.float32)
    assert_close(InfoNCELoss(0.2, label_smoothing=0.3)(img, txt),
                 o_info_nce(img.double(), txt.double(), 5.0, torch.arange(11), 0.3), torch.float32)
    with pytest.raises(ValueError, match="label_smoothing"):
        info_nce(img, txt, label_smoothing=1.5)
    with pytest.raises(TypeError, match="label_smoothing"):
        clip_loss(img, txt, 1.0, label_smoothing="0.1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_label_smoothing_with_default_positives(backend):
    """reduction="none" with smoothing and the default (diagonal) positives: sample i's column
    term is text (key) i's.  A mean is blind to the column terms being permuted, so the other
    smoothing tests (means, or explicit labels) cannot tell."""
    g = torch.Generator().manual_seed(46)
    n = 23
    x, y = randn(n, 10, generator=g), randn(n, 10, generator=g)
    w = torch.linspace(0.5, 1.5, n, dtype=torch.float64)

    def o_per_sample(a, b, s, bias):
        logits = s * a @ b.T + bias
        per = 0.5 * (F.cross_entropy(logits, torch.arange(n), reduction="none", label_smoothing=0.2)
                     + F.cross_entropy(logits.T, torch.arange(n), reduction="none", label_smoothing=0.2))
        return (per * w).sum()
    compare(lambda a, b, s: (clip_loss(a, b, s, -0.5, reduction="none", label_smoothing=0.2, backend=backend)
                             * w.float()).sum(),
            lambda a, b, s: o_per_sample(a, b, s, -0.5), [x, y, torch.tensor(3.0)], torch.float32,
            "clip per sample", backend=backend)
    compare(lambda a, b, s: (info_nce(a, b, logit_scale=s, symmetric=True, reduction="none", label_smoothing=0.2,
                                      backend=backend) * w.float()).sum(),
            lambda a, b, s: o_per_sample(a, b, s, 0.0), [x, y, torch.tensor(3.0)], torch.float32,
            "info_nce per sample", backend=backend)


# ----------------------------------------------------------------------------- stability, NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_logits(backend):
    g = torch.Generator().manual_seed(15)
    feats = F.normalize(randn(16, 2, 32, generator=g), dim=-1)
    labels = torch.randint(0, 4, (16,), generator=g)
    # temperature 0.01: logits up to 100, far past exp's fp16 range.
    compare(lambda f: supcon_loss(f, labels, temperature=0.01, backend=backend),
            lambda f: o_supcon(f, labels, t=0.01), [feats], torch.float16, "supcon fp16")
    a, b = randn(16, 32, generator=g), randn(16, 32, generator=g)
    compare(lambda x, y: ntxent_loss(x, y, 0.01, backend=backend), lambda x, y: o_ntxent(x, y, 0.01),
            [a, b], torch.float16, "ntxent fp16", normalised=True)
    for negatives in ("union", "separate"):
        compare(lambda x, y: dcl_loss(x, y, 0.01, negatives=negatives, backend=backend),
                lambda x, y: o_dcl(x, y, 0.01, negatives=negatives), [a, b], torch.float16, f"dcl {negatives} fp16", normalised=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    a, b = randn(9, 6), randn(9, 6)
    a[2, 1] = float("nan")
    labels = torch.arange(9) % 3
    assert torch.isnan(ntxent_loss(a, b, backend=backend))
    assert torch.isnan(dcl_loss(a, b, backend=backend))
    assert torch.isnan(supcon_loss(torch.stack([a, b], 1), labels, backend=backend))
    assert torch.isnan(supcon_loss_pml(a, labels, backend=backend))
    assert torch.isnan(siglip_loss(a, b, 10.0, -10.0, backend=backend))
    assert torch.isnan(info_nce(a, b, label_smoothing=0.1, backend=backend))
    assert torch.isnan(clip_loss(a, b, 10.0, label_smoothing=0.1, backend=backend))


# ----------------------------------------------------------------------------- MACL, DCLW, DirectCLR (lightly)
def o_macl(z0, z1, temperature=0.1, alpha=0.5, a_0=0.0):
    """lightly's MACLLoss from its definition: NT-Xent logits over [positive, negatives] with the
    temperature following the mean positive similarity, each term weighted by 1 / (1 - p + 1e-8)."""
    z = torch.cat([F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)])
    n2, n = z.shape[0], z0.shape[0]
    cov = z @ z.T
    partner = (torch.arange(n2) + n) % n2
    pos = cov[torch.arange(n2), partner]
    t = temperature * (1 + alpha * (pos.detach().mean() - a_0))
    keep = ~torch.eye(n2, dtype=torch.bool)
    keep[torch.arange(n2), partner] = False
    logits = torch.cat([pos[:, None], cov[keep].view(n2, n2 - 2)], 1) / t
    log_p = logits.log_softmax(1)[:, 0]
    return (-(1.0 / (1.0 - log_p.exp() + 1e-8)).detach() * log_p).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,a_0", [(0.5, 0.0), (1.0, 0.3), (0.0, 0.0)])
def test_macl(backend, dtype, alpha, a_0):
    g = torch.Generator().manual_seed(16)
    a, b = randn(67, 40, generator=g), randn(67, 40, generator=g)
    b = b + 2 * a  # aligned views, so the temperature moves with A
    compare(lambda x, y: MACLLoss(0.2, alpha, a_0, backend=backend)(x, y),
            lambda x, y: o_macl(x, y, 0.2, alpha, a_0), [a, b], dtype, "macl", normalised=True)


def test_macl_arguments():
    for kw, match in ((dict(temperature=0.0), "temperature must be at least"), (dict(alpha=1.5), "alpha"),
                      (dict(A_0=-0.1), "A_0"), (dict(alpha=True), "alpha must be a real number")):
        with pytest.raises((ValueError, TypeError), match=match):
            MACLLoss(**kw)
    with pytest.raises(ValueError, match="same batch size"):
        fastcl.macl_loss(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_macl_close_to_one_and_non_positive_temperature(backend):
    """Well-aligned positives at a low temperature (p close to 1, weights up to 1e8): the fp32 loss
    and gradients stay at fp32's tolerance of float64 (1 - exp(log p) in fp32 did not).  Settings
    with alpha * (1 + A_0) >= 1 and anti-aligned views make t negative, as lightly allows.  One
    sample has no negatives: 0, with a zero gradient."""
    g = torch.Generator().manual_seed(19)
    a = randn(96, 32, generator=g)
    b = a + 0.01 * randn(96, 32, generator=g)
    compare(lambda x, y: MACLLoss(0.03, backend=backend)(x, y), lambda x, y: o_macl(x, y, 0.03),
            [a, b], torch.float32, "macl p ~ 1")
    c = -a + 0.5 * randn(96, 32, generator=g)
    assert (F.cosine_similarity(a, c).mean() < 0).item()
    compare(lambda x, y: MACLLoss(0.1, 1.0, 1.0, backend=backend)(x, y), lambda x, y: o_macl(x, y, 0.1, 1.0, 1.0),
            [a, c], torch.float32, "macl t < 0")
    one = a[:1].clone().requires_grad_()
    loss = MACLLoss(backend=backend)(one, b[:1])
    assert loss.item() == 0.0 and torch.autograd.grad(loss, one)[0].abs().max() == 0.0
    # NaN in gives NaN out, also where it makes the temperature NaN (and t = 0: an infinite scale)
    bad = a.clone()
    bad[3, 1] = float("nan")
    assert torch.isnan(MACLLoss(backend=backend)(bad, b))
    ortho = torch.eye(2, 4)
    assert torch.isnan(MACLLoss(0.1, 1.0, 1.0, backend=backend)(ortho, ortho.flip(0)))  # A = 0, t = 0
    # lightly accepts any real number: numpy scalars and one-element tensors too
    import numpy as np
    assert torch.isfinite(MACLLoss(np.float32(0.2), torch.tensor(0.5), np.float64(0.1), backend=backend)(a, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["union", "separate"])
def test_dclw_module(backend, negatives):
    """lightly's DCLWLoss: DCL with negative von Mises-Fisher weights of the normalised views, detached."""
    g = torch.Generator().manual_seed(17)
    a, b = randn(45, 24, generator=g), randn(45, 24, generator=g)

    def vmf_detached(x, y, sigma=0.3):
        return (2 - x.shape[0] * torch.softmax((x * y).sum(1) / sigma, dim=0)).detach()
    compare(lambda x, y: DCLWLoss(0.2, 0.3, negatives=negatives, backend=backend)(x, y),
            lambda x, y: o_dcl(x, y, 0.2, vmf_detached, negatives), [a, b], torch.float32, f"dclw {negatives}")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        DCLWLoss(sigma=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_directclr(backend):
    """lightly's DirectCLRLoss: NT-Xent on the first loss_dim features of the flattened outputs."""
    g = torch.Generator().manual_seed(18)
    a, b = randn(21, 4, 5, generator=g), randn(21, 4, 5, generator=g)
    compare(lambda x, y: DirectCLRLoss(loss_dim=7, temperature=0.3, backend=backend)(x, y),
            lambda x, y: o_ntxent(x.flatten(1)[:, :7], y.flatten(1)[:, :7], 0.3), [a, b], torch.float32, "directclr")
    with pytest.raises(ValueError, match="loss_dim must be a positive int"):
        DirectCLRLoss(loss_dim=0)


# ----------------------------------------------------------------------------- Hypersphere (lightly)
def o_hypersphere(za, zb, t=1.0, lam=1.0, alpha=2.0):
    """lightly's HypersphereLoss, literally: pdist for the uniformity."""
    x, y = F.normalize(za), F.normalize(zb)
    align = (x - y).norm(dim=1).pow(alpha).mean()

    def unif(v):
        return torch.pdist(v, p=2).pow(2).mul(-t).exp().mean().log()
    return align + lam * (unif(x) + unif(y)) / 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("t,lam,alpha", [(1.0, 1.0, 2.0), (2.0, 0.5, 1.0), (0.3, 3.0, 3.0)])
def test_hypersphere(backend, dtype, t, lam, alpha):
    """Value and gradients of both views, and of a learnable t (a 0-d tensor), against the literal
    pdist form in float64."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels take no float64")
    g = torch.Generator().manual_seed(31)
    a, b = randn(67, 40, generator=g), randn(67, 40, generator=g)
    b = a + 0.5 * b  # aligned views, as in training: the alignment term is not the whole loss
    compare(lambda x, y, tt: fastcl.hypersphere_loss(x, y, tt, lam, alpha, backend=backend),
            lambda x, y, tt: o_hypersphere(x, y, tt, lam, alpha),
            [a, b, torch.tensor(t, dtype=torch.float64 if dtype == torch.float64 else torch.float32)], dtype, "hypersphere",
            normalised=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hypersphere_zero_rows_and_collapsed_batches(backend):
    """Rows F.normalize leaves at zero (a dead ReLU head) are no unit rows, and a nearly collapsed
    batch has distances far below 1: both against the pdist form in float64 (float64 inputs on the
    reference and cpu backends), and fp32 near lightly's own fp32 accuracy."""
    g = torch.Generator().manual_seed(33)
    a, b = randn(31, 8, generator=g, dtype=torch.float64), randn(31, 8, generator=g, dtype=torch.float64)
    a[[3, 17]] = 0.0
    b[5] = 1e-13 * b[5]
    centre = randn(1, 8, generator=g, dtype=torch.float64)
    tight = centre + 0.01 * randn(31, 8, generator=g, dtype=torch.float64)
    cases = {"zero rows": (a, b), "collapsed": (tight, tight.flip(0))}
    for name, (x, y) in cases.items():
        dtypes = [torch.float32] if backend == "triton" else [torch.float64, torch.float32]
        for dtype in dtypes:
            (p, q), (r, s) = [[t.to(dtype).detach().clone().requires_grad_() for t in (x, y)] for _ in range(2)]
            ours = fastcl.hypersphere_loss(p, q, 2.0, backend=backend)
            ref = o_hypersphere(r.double(), s.double(), 2.0)
            # fp32: the uniformity of a collapsed batch is ~1e-4, so its absolute error counts
            factor = 1.0 if dtype == torch.float64 or name != "collapsed" else COLLAPSED_BATCH_FACTOR
            assert_close(ours, ref, dtype, f"{name} {dtype} value", factor)
            for i, (u, v) in enumerate(zip(torch.autograd.grad(ours, [p, q]), torch.autograd.grad(ref, [r, s]))):
                assert_close(u, v, dtype, f"{name} {dtype} grad {i}")


def test_hypersphere_module_and_edges():
    from fastcl.nn.losses import HypersphereLoss
    g = torch.Generator().manual_seed(32)
    a, b = randn(9, 5, generator=g, dtype=torch.float64), randn(9, 5, generator=g, dtype=torch.float64)
    assert_close(HypersphereLoss()(a, b), o_hypersphere(a, b), torch.float64, "module defaults (1, 1, 2)")
    # one sample: lightly's empty mean is NaN, and so is ours; the alignment's gradient survives
    (p, q), (r, s) = [[t[:1].detach().clone().requires_grad_() for t in (a, b)] for _ in range(2)]
    ours, ref = fastcl.hypersphere_loss(p, q), o_hypersphere(r, s)
    assert torch.isnan(ours) and torch.isnan(ref)
    for u, v in zip(torch.autograd.grad(ours, [p, q]), torch.autograd.grad(ref, [r, s])):
        assert torch.isfinite(u).all()
        assert_close(u, v, torch.float64, "one sample's alignment gradient")
    with pytest.raises(ValueError, match="z_a and z_b must have the same batch size"):
        fastcl.hypersphere_loss(a, b[:8])
    bad = a.clone()
    bad[4, 2] = float("nan")
    assert torch.isnan(fastcl.hypersphere_loss(bad, b))
    for kw, match in ((dict(t=0.0), "t must be"), (dict(alpha=-1.0), "alpha must be"), (dict(lam=float("inf")), "lam")):
        with pytest.raises(ValueError, match=match):
            HypersphereLoss(**kw)
    with pytest.raises(ValueError, match="same batch size"):
        fastcl.hypersphere_loss(a, b[:8])


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_keep_fp32_under_autocast(backend):
    """Under CPU bfloat16 autocast every loss computes its logits in fp32 on every backend (the
    reference's matmuls and row dots included): the value and gradients equal those without it."""
    g = torch.Generator().manual_seed(34)
    a, b = randn(67, 40, generator=g), randn(67, 40, generator=g)
    labels = torch.randint(0, 5, (67,), generator=g)
    losses = {
        "clip": lambda x, y: fastcl.clip_loss(x, y, 10.0, backend=backend),
        "clip labels": lambda x, y: fastcl.clip_loss(x, y, 10.0, labels=torch.arange(67).flip(0), backend=backend),
        "siglip": lambda x, y: fastcl.siglip_loss(x, y, 10.0, -10.0, backend=backend),
        "info_nce": lambda x, y: fastcl.info_nce(x, y, backend=backend),
        "ntxent": lambda x, y: fastcl.ntxent_loss(x, y, backend=backend),
        "dcl": lambda x, y: fastcl.dcl_loss(x, y, backend=backend),
        "macl": lambda x, y: fastcl.macl_loss(x, y, backend=backend),
        "supcon": lambda x, y: fastcl.supcon_loss(torch.stack([x, y], 1), labels, backend=backend),
        "supcon pml": lambda x, y: fastcl.supcon_loss_pml(x, labels, backend=backend),
        "hypersphere": lambda x, y: fastcl.hypersphere_loss(x, y, backend=backend),
        # PML's pair losses have no backend choice; their row blocks run outside autocast
        "ntxent pml": lambda x, y: fastcl.ntxent_loss_pml(x, labels, ref_emb=y, ref_labels=labels),
        "triplet pml": lambda x, y: fastcl.triplet_margin_loss_pml(x, labels, ref_emb=y, ref_labels=labels),
        "multi-similarity pml": lambda x, y: fastcl.multi_similarity_loss_pml(x, labels, ref_emb=y, ref_labels=labels),
        "circle pml": lambda x, y: fastcl.circle_loss_pml(x, labels, ref_emb=y, ref_labels=labels),
        "contrastive pml": lambda x, y: fastcl.contrastive_loss_pml(x, labels, ref_emb=y, ref_labels=labels),
    }
    for name, fn in losses.items():
        results = []
        for autocast in (False, True):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn(x, y)
            results.append([loss, *torch.autograd.grad(loss, [x, y], allow_unused=True, materialize_grads=True)])
        for u, v in zip(*results):
            assert_close(u, v, torch.float32, f"{name} under autocast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hypersphere_large_t_stays_finite(backend):
    """At t = 200 lightly's fp32 pdist form underflows to -inf (NaN gradients); fastcl's LSE form
    stays finite, and its value and gradients equal the float64 pdist form's."""
    from fastcl.baselines import naive_hypersphere
    g = torch.Generator().manual_seed(35)
    a, b = randn(64, 32, generator=g), randn(64, 32, generator=g)
    assert torch.isneginf(naive_hypersphere(a, b, 200.0))
    x, y = (t.clone().requires_grad_() for t in (a, b))
    r, s = (t.double().requires_grad_() for t in (a, b))
    ours = fastcl.hypersphere_loss(x, y, 200.0, backend=backend)
    ref = o_hypersphere(r, s, 200.0)
    assert torch.isfinite(ref)
    assert_close(ours, ref, torch.float32, "t = 200 value")
    for name, u, v in zip(("a", "b"), torch.autograd.grad(ours, [x, y]), torch.autograd.grad(ref, [r, s])):
        assert torch.isfinite(u).all()
        assert_close(u, v, torch.float32, f"t = 200 gradient of {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hypersphere_on_gpu(backend, dtype):
    """CUDA inputs at an odd size: value and gradients against the pdist form in float64."""
    g = torch.Generator().manual_seed(36)
    a, b = randn(2053, 96, generator=g, dtype=dtype), randn(2053, 96, generator=g, dtype=dtype)
    x, y = a.cuda().requires_grad_(), b.cuda().requires_grad_()
    ours = fastcl.hypersphere_loss(x, y, 2.0, backend=backend)
    r, s = a.double().requires_grad_(), b.double().requires_grad_()
    ref = o_hypersphere(r, s, 2.0)
    assert_close(ours.cpu(), ref, torch.float32, "value", NORMALISED_VALUE_FACTOR.get(dtype, 1.0))
    for u, v in zip(torch.autograd.grad(ours, [x, y]), torch.autograd.grad(ref, [r, s])):
        assert_close(u.cpu(), v, dtype, "grad")


# ----------------------------------------------------------------------------- arguments the other tests leave alone
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_more_texts_than_images(backend):
    """M = 131 texts for N = 67 images (texts past N are negatives for every image): the sum is
    divided by the image count N, as open_clip's SigLipLoss (every other test has M == N)."""
    g = torch.Generator().manual_seed(40)
    img = F.normalize(randn(67, 40, generator=g), dim=1)
    txt = F.normalize(randn(131, 40, generator=g), dim=1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    compare(lambda i, t, ss, bb: siglip_loss(i, t, ss, bb, backend=backend), o_siglip, [img, txt, s, b],
            torch.float32, "siglip M > N", backend=backend, biases=(3,))
    compare(lambda i, t, ss, bb: SigLipLoss(backend=backend)(i, t, ss, bb), o_siglip, [img, txt, s, b],
            torch.float32, "SigLipLoss M > N", backend=backend, biases=(3,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip_without_bias(backend):
    """logit_bias=None adds no bias, as open_clip's ``if logit_bias is not None`` (not, say, the
    usual init of -10); every other test passes a bias."""
    g = torch.Generator().manual_seed(47)
    img = F.normalize(randn(29, 16, generator=g), dim=1)
    txt = F.normalize(randn(29, 16, generator=g), dim=1)
    compare(lambda i, t, ss: siglip_loss(i, t, ss, None, backend=backend), lambda i, t, ss: o_siglip(i, t, ss, 0.0),
            [img, txt, torch.tensor(10.0)], torch.float32, "siglip without bias", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["union", "separate"])
def test_dcl_asymmetric_weight_fn(backend, negatives):
    """lightly weights the out0 direction by weight_fn(out0, out1) and the out1 direction by
    weight_fn(out1, out0): a weight_fn that is not symmetric in its arguments tells them apart
    (the vMF weights of the other tests are symmetric)."""
    g = torch.Generator().manual_seed(41)
    a, b = randn(37, 20, generator=g), randn(37, 20, generator=g)

    def w(x, y):
        return 1 + x[:, 0] ** 2
    compare(lambda x, y: dcl_loss(x, y, 0.2, w, negatives=negatives, backend=backend),
            lambda x, y: o_dcl(x, y, 0.2, w, negatives), [a, b], torch.float32, f"dcl asymmetric {negatives}")
    compare(lambda x, y: DCLLoss(0.2, w, negatives=negatives, backend=backend)(x, y),
            lambda x, y: o_dcl(x, y, 0.2, w, negatives), [a, b], torch.float32, f"DCLLoss asymmetric {negatives}")


def test_lightly_defaults():
    """Called without the settings, each lightly drop-in takes lightly's defaults (NTXentLoss:
    temperature 0.5; DCLLoss: 0.1; DCLWLoss: 0.1 and sigma 0.5; MACLLoss: 0.1, alpha 0.5, A_0 0;
    HypersphereLoss: t 1, lam 1, alpha 2), the functional forms too."""
    from fastcl.nn.losses import HypersphereLoss
    g = torch.Generator().manual_seed(42)
    a, b = randn(41, 24, generator=g), randn(41, 24, generator=g)
    b = a + 0.5 * b  # aligned views: the temperature- and weight-dependent terms all matter

    def vmf_detached(x, y, sigma=0.5):
        return (2 - x.shape[0] * torch.softmax((x * y).sum(1) / sigma, dim=0)).detach()
    cases = {
        "ntxent_loss": (ntxent_loss, lambda x, y: o_ntxent(x, y, 0.5)),
        "NTXentLoss": (NTXentLoss(), lambda x, y: o_ntxent(x, y, 0.5)),
        "fastcl.nn.NTXentLoss": (fastcl.nn.NTXentLoss(), lambda x, y: o_ntxent(x, y, 0.5)),
        "dcl_loss": (dcl_loss, lambda x, y: o_dcl(x, y, 0.1)),
        "DCLLoss": (DCLLoss(), lambda x, y: o_dcl(x, y, 0.1)),
        "DCLWLoss": (DCLWLoss(), lambda x, y: o_dcl(x, y, 0.1, vmf_detached)),
        "macl_loss": (fastcl.macl_loss, lambda x, y: o_macl(x, y, 0.1, 0.5, 0.0)),
        "MACLLoss": (MACLLoss(), lambda x, y: o_macl(x, y, 0.1, 0.5, 0.0)),
        "hypersphere_loss": (fastcl.hypersphere_loss, lambda x, y: o_hypersphere(x, y, 1.0, 1.0, 2.0)),
        "HypersphereLoss": (HypersphereLoss(), lambda x, y: o_hypersphere(x, y, 1.0, 1.0, 2.0)),
    }
    for name, (fast, oracle) in cases.items():
        compare(fast, oracle, [a, b], torch.float32, f"{name} defaults", normalised=True)


def test_hypersphere_module_settings():
    """HypersphereLoss(t, lam, alpha) passes all three on (the module is otherwise built with its
    defaults only): t = 2, lam = 0.5, alpha = 1 against the pdist form."""
    from fastcl.nn.losses import HypersphereLoss
    g = torch.Generator().manual_seed(43)
    a, b = randn(67, 40, generator=g), randn(67, 40, generator=g)
    b = a + 0.5 * b
    compare(lambda x, y: HypersphereLoss(2.0, 0.5, 1.0)(x, y), lambda x, y: o_hypersphere(x, y, 2.0, 0.5, 1.0),
            [a, b], torch.float32, "HypersphereLoss(2, 0.5, 1)", normalised=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # N = 1031: too slow interpreted
def test_hypersphere_uniformity_of_collapsed_fp32_batches(backend):
    """The uniformity of nearly collapsed fp32 batches (N = 1031 rows within 0.005 of one point:
    a value near -4e-3, from per-row LSEs near log(N)) at fp32's normal tolerance of float64: the
    final LSE over the rows runs in float64, as fp32's rounding of a result near log(N (N - 1))
    is up to 1e-4 of the small difference (measured: 8e-6 at most here, 2e-5 to 2e-4 in fp32).
    Three batches, as how far fp32 lands off depends on where the value falls between floats."""
    from fastcl.losses.hypersphere import uniformity
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = randn(1, 40, generator=g) + 0.005 * randn(1031, 40, generator=g)
        ref = torch.pdist(x.double(), p=2).pow(2).mul(-2.0).exp().mean().log()
        assert_close(uniformity(x, 2.0, backend), ref, torch.float32, f"collapsed batch {seed}")


def test_hypersphere_one_sample_learnable_t():
    """One sample with a learnable t (a tensor that requires grad): the loss is NaN, as lightly's
    empty mean, and t stays in the graph, so torch.autograd.grad(loss, t) works and gives lightly's
    gradient (0: t multiplies an empty set of distances)."""
    g = torch.Generator().manual_seed(44)
    a, b = randn(1, 8, generator=g), randn(1, 8, generator=g)
    t = torch.tensor(2.0, requires_grad=True)
    loss = fastcl.hypersphere_loss(a, b, t)
    rt = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref = o_hypersphere(a.double(), b.double(), rt)
    assert torch.isnan(loss) and torch.isnan(ref)
    (gt,), (gr,) = torch.autograd.grad(loss, t), torch.autograd.grad(ref, rt)
    assert torch.isfinite(gt) and gt.item() == gr.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_and_clip_full_label_smoothing(backend):
    """label_smoothing = 1.0 is allowed, as in F.cross_entropy (the whole target is the uniform
    part): info_nce against the smoothed cross-entropy with eps = 1, clip_loss against
    F.cross_entropy(label_smoothing=1.0)."""
    g = torch.Generator().manual_seed(45)
    q, k = randn(67, 40, generator=g), randn(131, 40, generator=g)
    positives = torch.randperm(131, generator=g)[:67]
    s = torch.tensor(3.0)
    for symmetric in (False, True):
        compare(lambda x, y, ss: info_nce(x, y, logit_scale=ss, positives=positives, symmetric=symmetric,
                                          label_smoothing=1.0, backend=backend),
                lambda x, y, ss: o_info_nce(x, y, ss, positives, 1.0, symmetric), [q, k, s], torch.float32,
                f"info_nce eps = 1, symmetric={symmetric}", backend=backend)
    compare(lambda x, y, ss: clip_loss(x, y, ss, -0.5, labels=positives, label_smoothing=1.0, backend=backend),
            lambda x, y, ss: o_clip(x, y, ss, -0.5, positives, 1.0), [q, k, s], torch.float32, "clip eps = 1",
            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_macl_zero_temperature_with_nonzero_cosines_is_nan(backend):
    """alpha = 1, a_0 = 0.5 and positive cosines averaging exactly -0.5 (three pairs at -1, one
    at +1) make t = 0.1 * (1 + (-0.5 - 0.5)) = 0 exactly: lightly's logits cos / 0 are +-inf and
    0 / 0, its loss NaN, and so is ours (not the +inf that the -1 pairs give alone)."""
    a = torch.eye(4, 5)
    b = a * torch.tensor([-1.0, -1.0, -1.0, 1.0])[:, None]
    assert torch.isnan(o_macl(a.double(), b.double(), 0.1, 1.0, 0.5))
    assert torch.isnan(MACLLoss(0.1, 1.0, 0.5, backend=backend)(a, b))
    assert torch.isnan(fastcl.macl_loss(a, b, 0.1, 1.0, 0.5, backend=backend))


# ----------------------------------------------------------------------------- mutation audit (losses)
@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_mask_weights_totalling_below_one(backend):
    """SupContrast divides an anchor's weighted positive sum by its total weight, by 1 only where
    that total is below 1e-6: a mask of small weights (totals between 1e-6 and 1) pins the divisor
    (the other mask tests have totals of 1 or more, or below 1e-6, where clamping at 1 agrees)."""
    g = torch.Generator().manual_seed(47)
    feats = F.normalize(randn(11, 2, 6, generator=g), dim=-1)
    mask = 0.01 * torch.rand(11, 11, generator=g)  # each anchor's total about 0.1
    compare(lambda f: supcon_loss(f, mask=mask, backend=backend), lambda f: o_supcon(f, mask=mask), [feats],
            torch.float32, "supcon small mask weights")


def test_negative_mises_fisher_weights_default_sigma():
    """lightly's negative_mises_fisher_weights defaults to sigma = 0.5 (DCLWLoss passes its own
    sigma, so only a direct call reads the default)."""
    from fastcl.losses.dcl import negative_mises_fisher_weights
    g = torch.Generator().manual_seed(48)
    a, b = F.normalize(randn(13, 6, generator=g), dim=1), F.normalize(randn(13, 6, generator=g), dim=1)
    ref = 2 - 13 * torch.softmax((a.double() * b.double()).sum(1) / 0.5, dim=0)
    assert_close(negative_mises_fisher_weights(a, b), ref, torch.float32, "vMF weights, default sigma")


@pytest.mark.parametrize("lam", [0.0, -0.5])
def test_hypersphere_any_real_lam(lam):
    """lightly's lam is any real weight (only t and alpha must be positive): lam = 0 (alignment
    only) and a negative lam against the pdist form."""
    g = torch.Generator().manual_seed(49)
    a, b = randn(23, 8, generator=g), randn(23, 8, generator=g)
    b = a + 0.5 * b
    compare(lambda x, y: fastcl.hypersphere_loss(x, y, 2.0, lam), lambda x, y: o_hypersphere(x, y, 2.0, lam),
            [a, b], torch.float32, f"hypersphere lam={lam}", normalised=True)


def test_directclr_defaults():
    """lightly's DirectCLRLoss defaults: loss_dim 64 and temperature 0.5, on outputs of 80 features
    (test_directclr sets both; test_lightly_defaults' outputs are narrower than 64)."""
    g = torch.Generator().manual_seed(50)
    a, b = randn(19, 80, generator=g), randn(19, 80, generator=g)
    compare(lambda x, y: DirectCLRLoss()(x, y), lambda x, y: o_ntxent(x[:, :64], y[:, :64], 0.5), [a, b],
            torch.float32, "DirectCLRLoss defaults")
