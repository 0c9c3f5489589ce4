"""clip_loss / info_nce / their modules against open_clip-style float64 oracles."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import DTYPES, LARGE_LOGITS_FACTOR, ZERO_ATOL, assert_close, randn
from fastcl._ext import extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


def open_clip_loss(img, txt, scale, bias=None):
    """open_clip ClipLoss, single process, written out literally."""
    logits_per_image = scale * img @ txt.T
    logits_per_text = scale * txt @ img.T
    if bias is not None:
        logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 40), (67, 40), (300, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_matches_open_clip(backend, dtype, n, d, with_bias):
    gen = torch.Generator().manual_seed(n + d)
    img = F.normalize(randn(n, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(randn(n, d, generator=gen), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    bias = torch.tensor(-0.7, requires_grad=True) if with_bias else None
    loss = fastcl.clip_loss(img, txt, scale, bias, backend=backend)
    wrt = [img, txt, scale] + ([bias] if with_bias else [])
    ref_leaves = _leaves(*wrt)
    ref = open_clip_loss(*ref_leaves[:3], ref_leaves[3] if with_bias else None)
    if n == 1:  # one class: the loss and its gradients are exactly zero
        assert abs(loss.item()) < ZERO_ATOL["value"]
    else:
        assert_close(loss, ref, torch.float32, "loss")
    for name, g, gr in zip(["d_image", "d_text", "d_scale", "d_bias"], torch.autograd.grad(loss, wrt),
                           torch.autograd.grad(ref, ref_leaves)):
        if name == "d_bias" or n == 1:  # softmax is shift-invariant: the exact value is 0
            assert g.abs().max().item() < ZERO_ATOL["grad"], f"{name} = {g}"
        else:
            assert_close(g, gr, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip_loss_labels_and_reduction(backend, reduction):
    # Hard-negative layout: 67 images, 131 texts, a random positive text per image.
    gen = torch.Generator().manual_seed(7)
    img, txt = randn(67, 40, generator=gen, requires_grad=True), randn(131, 40, generator=gen, requires_grad=True)
    labels = torch.randperm(131, generator=gen)[:67]
    loss = fastcl.clip_loss(img, txt, 3.0, 0.25, labels=labels, reduction=reduction, backend=backend)
    i64, t64 = _leaves(img, txt)
    logits = 3.0 * i64 @ t64.T + 0.25
    i2t = F.cross_entropy(logits, labels, reduction="none")
    t2i = F.cross_entropy(logits.T[labels], torch.arange(67), reduction="none")
    ref = {"mean": lambda x: x.mean(), "sum": lambda x: x.sum(), "none": lambda x: x}[reduction]((i2t + t2i) / 2)
    assert loss.shape == ref.shape
    assert_close(loss, ref, torch.float32, "loss")
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for g, gr in zip(torch.autograd.grad((loss * w.float()).sum(), [img, txt]),
                     torch.autograd.grad((ref * w).sum(), [i64, t64])):
        assert_close(g, gr, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_info_nce(backend, symmetric, exclude_self):
    gen = torch.Generator().manual_seed(11)
    n, m = 67, 131
    q, k = randn(n, 40, generator=gen, requires_grad=True), randn(m, 40, generator=gen, requires_grad=True)
    positives = (torch.arange(n) + 1 + torch.randint(0, 60, (n,), generator=gen)) % m
    temp = torch.tensor(0.5, requires_grad=True)
    loss = fastcl.info_nce(q, k, temperature=temp, positives=positives, symmetric=symmetric,
                           exclude_self=exclude_self, backend=backend)
    q64, k64, t64 = _leaves(q, k, temp)
    logits = q64 @ k64.T / t64
    if exclude_self:
        logits = logits.masked_fill(torch.eye(n, m, dtype=torch.bool), float("-inf"))
    per = F.cross_entropy(logits, positives, reduction="none")
    if symmetric:
        per = (per + F.cross_entropy(logits.T[positives], torch.arange(n), reduction="none")) / 2
    ref = per.mean()
    assert_close(loss, ref, torch.float32, "loss")
    for g, gr in zip(torch.autograd.grad(loss, [q, k, temp]), torch.autograd.grad(ref, [q64, k64, t64])):
        assert_close(g, gr, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_narrow_integer_labels_give_the_int64_result(backend):
    """labels / positives of any accepted integer dtype (uint8 ... int32) are widened to int64
    before they reach the ops, which index with int64 or int32 only."""
    gen = torch.Generator().manual_seed(21)
    img, txt = randn(9, 8, generator=gen), randn(13, 8, generator=gen)
    labels = torch.randperm(13, generator=gen)[:9]
    want_clip = fastcl.clip_loss(img, txt, 2.0, labels=labels, reduction="none", label_smoothing=0.1, backend=backend)
    want_nce = fastcl.info_nce(img, txt, positives=labels, symmetric=True, reduction="none", backend=backend)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        narrow = labels.to(dtype)
        assert torch.equal(fastcl.clip_loss(img, txt, 2.0, labels=narrow, reduction="none", label_smoothing=0.1,
                                            backend=backend), want_clip), dtype
        assert torch.equal(fastcl.info_nce(img, txt, positives=narrow, symmetric=True, reduction="none",
                                           backend=backend), want_nce), dtype


def test_info_nce_default_is_diagonal_at_t007():
    gen = torch.Generator().manual_seed(2)
    q, k = randn(67, 40, generator=gen), randn(67, 40, generator=gen)
    ref = F.cross_entropy(q.double() @ k.double().T / 0.07, torch.arange(67))
    assert_close(fastcl.info_nce(q, k), ref, torch.float32)
    assert_close(fastcl.info_nce(q, k, logit_scale=1 / 0.07), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_large_scale_unnormalised(backend):
    gen = torch.Generator().manual_seed(9)
    img, txt = randn(67, 40, generator=gen) * 3, randn(67, 40, generator=gen) * 3
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    a64, b64 = _leaves(img, txt)
    loss = fastcl.clip_loss(a, b, 100.0, backend=backend)
    ref = open_clip_loss(a64, b64, 100.0)
    assert torch.isfinite(loss)
    # logits in the thousands: fp32 rounding of |s| * eps each moves the gradients (measured 1.1x
    # TOL: LARGE_LOGITS_FACTOR); the loss stays within TOL (measured 0.003x)
    assert_close(loss, ref, torch.float32, "loss")
    for name, g, g64 in zip(("d img", "d txt"), torch.autograd.grad(loss, [a, b]), torch.autograd.grad(ref, [a64, b64])):
        assert_close(g, g64, torch.float32, name, LARGE_LOGITS_FACTOR)


def test_clip_nan_propagates():
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    img[2, 2] = float("nan")
    assert torch.isnan(fastcl.clip_loss(img, txt, 10.0))


def test_modules():
    gen = torch.Generator().manual_seed(4)
    img, txt = randn(67, 40, generator=gen), randn(67, 40, generator=gen)
    crit = fastcl.nn.ClipLoss()
    ref = open_clip_loss(img.double(), txt.double(), 10.0, 1.0)
    assert_close(crit(img, txt, torch.tensor(10.0), torch.tensor(1.0)), ref, torch.float32)
    out = crit(img, txt, torch.tensor(10.0), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    mod = fastcl.nn.InfoNCELoss(temperature=0.2, learnable_temperature=True)
    assert_close(mod.log_scale.detach(), torch.tensor(math.log(5.0), dtype=torch.float64), torch.float32,
                 "log(1/T)")
    loss = mod(img, txt)
    loss.backward()
    # float64 oracle in the same parameterisation, scale = exp(log_scale), from the definition
    log_scale = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(img.double() @ txt.double().T * log_scale.exp(), torch.arange(67))
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(mod.log_scale.grad, log_scale.grad, torch.float32, "d log_scale")
    # A tensor temperature keeps its graph (it used to be turned into a float, dropping the gradient).
    temp = torch.tensor(0.2, requires_grad=True)
    loss = fastcl.nn.InfoNCELoss(temperature=temp)(img, txt)
    loss.backward()
    ref_temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(img.double() @ txt.double().T / ref_temp, torch.arange(67))
    ref.backward()
    assert_close(loss, ref, torch.float32)
    assert_close(temp.grad, ref_temp.grad, torch.float32, "d temperature")


def test_learnable_log_scale_is_a_float32_scalar_parameter():
    """InfoNCELoss(learnable_temperature=True) holds log(1/T) as a 0-d parameter in the default
    dtype (float32, as CLIP's logit_scale), not float64: its optimiser state and the scale it
    feeds stay fp32."""
    mod = fastcl.nn.InfoNCELoss(temperature=0.2, learnable_temperature=True)
    assert isinstance(mod.log_scale, torch.nn.Parameter)
    assert mod.log_scale.shape == () and mod.log_scale.dtype == torch.float32
    assert_close(mod.log_scale.detach(), torch.tensor(math.log(5.0), dtype=torch.float64), torch.float32, "log(1/T)")
