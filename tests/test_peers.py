"""fastcl's drop-ins against the peer packages themselves (optional: `pip install .[peers]` and
`pip install --no-deps open-clip-torch==3.3.0`; `make test` installs both).

open_clip's package import pulls in torchvision, so only its loss module is loaded, from file.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import assert_close, load_module, randn
from fastcl._ext import extension_available

BACKENDS = ["reference"] + (["cpu"] if extension_available() else [])


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open-clip-torch==3.3.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    return load_module("_peer_open_clip_loss", path)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _compare(ours, theirs, wrt_ours, wrt_theirs, dtype=torch.float32):
    assert_close(ours, theirs, dtype, "loss")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ours, wrt_ours), torch.autograd.grad(theirs, wrt_theirs))):
        assert_close(a, b, dtype, f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_clip_loss(backend):
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(randn(67, 40, generator=gen), dim=-1)
    txt = F.normalize(randn(67, 40, generator=gen), dim=-1)
    scale = torch.tensor(14.3)
    a = _leaves(img, txt, scale)
    b = _leaves(img, txt, scale)
    ours = fastcl.nn.ClipLoss(backend=backend)(*a)
    theirs = oc.ClipLoss()(*b)
    _compare(ours, theirs, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_siglip_loss(backend):
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(randn(67, 40, generator=gen), dim=-1)
    txt = F.normalize(randn(67, 40, generator=gen), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    a = _leaves(img, txt, scale, bias)
    b = _leaves(img, txt, scale, bias)
    ours = fastcl.nn.SigLipLoss(backend=backend)(*a)
    theirs = oc.SigLipLoss()(*b)
    _compare(ours, theirs, a, b)
    # open_clip adds no bias when logit_bias is None
    a, b = _leaves(img, txt, scale), _leaves(img, txt, scale)
    _compare(fastcl.nn.SigLipLoss(backend=backend)(*a, None), oc.SigLipLoss()(*b, None), a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorch_metric_learning_supcon(backend):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(2)
    emb = randn(67, 40, generator=gen)
    labels = torch.randint(0, 9, (67,), generator=gen)
    labels[0] = 100  # one anchor without positives: pml leaves it out of the mean
    (a,), (b,) = _leaves(emb), _leaves(emb)
    ours = fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(a, labels)
    theirs = pml.SupConLoss(temperature=0.1)(b, labels)
    _compare(ours, theirs, [a], [b])

    # Float labels compare by value, as in PML.
    (a,), (b,) = _leaves(emb), _leaves(emb)
    _compare(fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(a, labels.double() / 2),
             pml.SupConLoss(temperature=0.1)(b, labels.double() / 2), [a], [b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorch_metric_learning_supcon_without_negatives(backend):
    """A batch of one label has no negative pair: PML's loss is 0, with zero gradients."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = randn(11, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels = torch.full((11,), 4)
    assert pml.SupConLoss(temperature=0.1)(emb, labels).item() == 0.0
    ours = fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(emb, labels)
    assert ours.item() == 0.0
    assert torch.autograd.grad(ours, emb)[0].abs().max() == 0.0
    # one differing label makes negatives: a real loss again
    labels[3] = 5
    assert fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(emb, labels).item() > 0.1



@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorch_metric_learning_supcon_with_references(backend):
    """ref_emb / ref_labels (PML's cross-batch form): anchors against other rows, nothing excluded,
    unless ref_labels is the labels object itself (then PML drops the pairs (i, i))."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(4)
    emb, ref = randn(37, 12, generator=gen), randn(53, 12, generator=gen)
    labels, ref_labels = torch.randint(0, 5, (37,), generator=gen), torch.randint(0, 6, (53,), generator=gen)
    labels[0] = 9  # an anchor without positives among the references
    for r, rl in ((ref, ref_labels), (emb * 2 + 1, labels), (emb * 2 + 1, labels.clone())):
        (a, b), (c, d) = _leaves(emb, r), _leaves(emb, r)
        _compare(fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(a, labels, ref_emb=b, ref_labels=rl),
                 pml.SupConLoss(temperature=0.1)(c, labels, ref_emb=d, ref_labels=rl), [a, b], [c, d])
    # no negative among the references: 0
    (a, b), (c, d) = _leaves(emb, ref), _leaves(emb, ref)
    same = torch.zeros(37, dtype=torch.long)
    assert fastcl.nn.SupConLoss(backend=backend)(a, same, ref_emb=b, ref_labels=same[:1].expand(53)).item() == 0.0
