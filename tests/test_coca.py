"""open_clip's CoCaLoss (fastcl.nn.CoCaLoss) and its captioning cross-entropy in row blocks
(fastcl.losses.coca.caption_loss): against float64 PyTorch and against open_clip's own class."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import DTYPES, assert_close, load_module, randn
from fastcl.losses.coca import caption_loss
from fastcl.ops import strips


def _oracle(logits, labels, pad_id):
    return F.cross_entropy(logits.double().permute(0, 2, 1), labels, ignore_index=pad_id)


def _case(dtype, gen, b=13, t=7, v=131, pad_id=0):
    logits = randn(b, t, v, generator=gen, dtype=dtype) * 3
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[:, -2:] = pad_id  # padded tails
    labels[3, :] = pad_id  # a fully padded caption
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("pad_id", [0, 5, -100, 131])
def test_caption_loss_against_float64(dtype, blocks, pad_id, monkeypatch):
    """Value and gradient against float64 PyTorch on the same rounded logits; "many" walks the
    91 tokens in blocks of 3 rows of 131 logits.  pad_id 131 = V lies outside the vocabulary (no
    logit to gather for a padded token), as -100 does below it."""
    if blocks == "many":
        monkeypatch.setattr(strips, "WORKSPACE_MB", 3 * 131 * 8 / 2**20)
    logits, labels = _case(dtype, torch.Generator().manual_seed(1), pad_id=pad_id if pad_id >= 0 else 0)
    if pad_id < 0:
        labels[labels == 0] = pad_id
    a, b = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ours, ref = caption_loss(a, labels, pad_id), _oracle(b, labels, pad_id)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ref.item() > 1.0
    assert_close(ours, ref, torch.float32 if dtype != torch.float64 else dtype, "value")
    ga, gb = torch.autograd.grad(ours * 1.7, a)[0], torch.autograd.grad(ref * 1.7, b)[0]
    assert ga.dtype == dtype
    assert gb[3].abs().max() == 0 and ga[3].abs().max() == 0  # padding takes no gradient
    assert_close(ga, gb, dtype, "grad")


def test_caption_loss_edges():
    gen = torch.Generator().manual_seed(2)
    logits, labels = _case(torch.float32, gen)
    # every token padded: NaN, as PyTorch, and no gradient
    a = logits.clone().requires_grad_()
    ours = caption_loss(a, torch.zeros_like(labels))
    assert torch.isnan(ours) and torch.isnan(_oracle(logits, torch.zeros_like(labels), 0))
    assert torch.autograd.grad(ours, a)[0].abs().max() == 0
    # NaN in a padded token's logits gives NaN too (PyTorch skips it)
    bad = logits.clone()
    bad[3, 0, 7] = float("nan")
    assert torch.isnan(caption_loss(bad, labels))
    # non-contiguous logits (a transposed (B, V, T) tensor's view)
    t_logits = logits.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    assert not t_logits.is_contiguous()
    assert_close(caption_loss(t_logits, labels), _oracle(logits, labels, 0), torch.float32, "non-contiguous")
    # errors name the argument
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 131\)"):
        caption_loss(logits, labels.masked_fill(labels == 0, 131), pad_id=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 131\)"):
        caption_loss(logits, labels - 200, pad_id=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(13, 7\)"):
        caption_loss(logits, labels[:, 1:])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        caption_loss(logits, labels.float())
    with pytest.raises(ValueError, match="logits"):
        caption_loss(logits[0], labels[0])
    with pytest.raises(TypeError, match="pad_id must be an int"):
        caption_loss(logits, labels, pad_id=0.0)
    with pytest.raises(ValueError, match="vocabulary of at least one entry"):
        caption_loss(logits[:, :, :0], labels)
    # numpy integer pad ids, as open_clip takes them; empty captions (T = 0) give NaN, as PyTorch
    import numpy as np
    assert_close(caption_loss(logits, labels, pad_id=np.int64(0)), _oracle(logits, labels, 0), torch.float32, "np")
    assert torch.isnan(caption_loss(logits[:, :0], labels[:, :0]))
    with pytest.raises(TypeError, match="caption_loss_weight"):
        fastcl.nn.CoCaLoss("1", 1.0)
    with pytest.raises(TypeError, match="clip_loss_weight"):
        fastcl.nn.CoCaLoss(1.0, "1")
    with pytest.raises(TypeError, match="pad_id must be an int"):
        fastcl.nn.CoCaLoss(1.0, 1.0, pad_id="0")


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open-clip-torch==3.3.0)")
    return load_module("_peer_open_clip_loss", os.path.join(list(spec.submodule_search_locations)[0], "loss.py"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.0)])
def test_open_clip_coca_loss(dtype, weights):
    """Both terms, their dict form, and the gradients of features, logits and scale, against
    open_clip's CoCaLoss; a zero clip weight gives open_clip's tensor(0)."""
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(3)
    img = F.normalize(randn(13, 40, generator=gen, dtype=dtype), dim=-1)
    txt = F.normalize(randn(13, 40, generator=gen, dtype=dtype), dim=-1)
    logits, labels = _case(dtype, gen)
    scale = torch.tensor(10.0, dtype=dtype)
    leaves = [[x.clone().requires_grad_() for x in (img, txt, logits, scale)] for _ in range(2)]
    ours = fastcl.nn.CoCaLoss(*weights)(*leaves[0][:3], labels, leaves[0][3], output_dict=True)
    theirs = oc.CoCaLoss(*weights)(*leaves[1][:3], labels, leaves[1][3], output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss", "caption_loss"}
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert_close(ours[key], theirs[key], dtype, key)
    if not weights[1]:
        assert ours["contrastive_loss"].item() == 0
    total_ours = ours["contrastive_loss"] + ours["caption_loss"]
    total_theirs = theirs["contrastive_loss"] + theirs["caption_loss"]
    wrt = [0, 1, 2, 3] if weights[1] else [2]
    grads = zip(torch.autograd.grad(total_ours, [leaves[0][i] for i in wrt]),
                torch.autograd.grad(total_theirs, [leaves[1][i] for i in wrt]))
    for i, (a, b) in zip(wrt, grads):
        assert_close(a, b, dtype, f"grad {i}")
    # the tuple form
    c, cap = fastcl.nn.CoCaLoss(*weights, pad_id=0)(img, txt, logits, labels, scale)
    assert_close(cap, theirs["caption_loss"], dtype, "tuple form")


def test_caption_loss_second_derivatives(monkeypatch):
    """create_graph=True gives the float64 oracle's second derivative (blocks of 3 rows)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 3 * 131 * 8 / 2**20)
    logits, labels = _case(torch.float64, torch.Generator().manual_seed(4))
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ga = torch.autograd.grad(caption_loss(a, labels), a, create_graph=True)[0]
    gb = torch.autograd.grad(_oracle(b, labels, 0), b, create_graph=True)[0]
    assert_close(ga, gb, torch.float64, "first derivative")
    ha = torch.autograd.grad((ga * ga.detach().sign()).sum() + ga.pow(2).sum(), a)[0]
    hb = torch.autograd.grad((gb * gb.detach().sign()).sum() + gb.pow(2).sum(), b)[0]
    assert_close(ha, hb, torch.float64, "second derivative")



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_caption_loss_scratch(dtype, monkeypatch):
    """The backward's live scratch beyond the gradient it returns stays within the workspace, in
    every dtype (a float64 block holds twice the bytes of an fp32 one; a half block is upcast)."""
    from conftest import LiveBytes
    monkeypatch.setattr(strips, "WORKSPACE_MB", 1.0)
    big = randn(64, 76, 2000, generator=torch.Generator().manual_seed(5), dtype=dtype, requires_grad=True)
    big_labels = torch.randint(0, 2000, (64, 76), generator=torch.Generator().manual_seed(6))
    with LiveBytes() as fwd:
        loss = caption_loss(big, big_labels)
    with LiveBytes() as bwd:
        loss.backward()
    grad_bytes = big.numel() * big.element_size()  # the gradient itself
    bound = strips.workspace_bytes()
    assert fwd.peak <= bound, fwd.peak
    assert grad_bytes <= bwd.peak <= grad_bytes + bound + 2**16, (bwd.peak - grad_bytes, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_caption_loss_on_gpu(dtype, monkeypatch):
    """CUDA logits: value and gradient against float64 on the CPU, and the backward's scratch
    beyond the gradient within the workspace (here 8 MB against 190 MB of fp32 logits)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 8.0)
    logits, labels = _case(dtype, torch.Generator().manual_seed(7), b=32, t=37, v=40003)
    a = logits.cuda().requires_grad_()
    loss = caption_loss(a, labels.cuda())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grad = torch.autograd.grad(loss, a)[0]
    torch.cuda.synchronize()
    scratch = torch.cuda.max_memory_allocated() - base - grad.numel() * grad.element_size()
    assert scratch <= 1.25 * strips.workspace_bytes(), scratch
    b = logits.double().requires_grad_()
    ref = _oracle(b, labels, 0)
    assert_close(loss.cpu(), ref, torch.float32, "value")
    assert_close(grad.cpu(), torch.autograd.grad(ref, b)[0], dtype, "grad")


def test_pad_id_range_is_int64():
    """pad_id is compared with int64 token ids: -2**63 and 2**63 - 1 are taken, one past either
    end is refused by name (past 2**63 - 1 the comparison would otherwise fail unnamed, or not)."""
    logits, labels = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long)
    for pad_id in (-2**63, 2**63 - 1):
        assert_close(caption_loss(logits, labels, pad_id), _oracle(logits, labels, pad_id), torch.float32, str(pad_id))
    for pad_id in (-2**63 - 1, 2**63):
        with pytest.raises(ValueError, match="pad_id must fit in int64"):
            caption_loss(logits, labels, pad_id)


def test_labels_on_another_device_are_named():
    """Labels on another device than the logits (meta stands in for a GPU here) are refused by
    name, not left to an unnamed failure further on."""
    logits, labels = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be on cpu, got meta"):
        caption_loss(logits, labels.to("meta"))
