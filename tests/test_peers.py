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
from conftest import ZERO_ATOL, assert_close, leaves, load_module, randn
from fastcl._ext import extension_available

BACKENDS = ["reference"] + (["cpu"] if extension_available() else [])


def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open-clip-torch==3.3.0)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    return load_module("_peer_open_clip_loss", path)


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
    a = leaves(img, txt, scale)
    b = leaves(img, txt, scale)
    ours = fastcl.nn.ClipLoss(backend=backend)(*a)
    theirs = oc.ClipLoss()(*b)
    _compare(ours, theirs, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_open_clip_distill_clip_loss(backend, dtype, blocks, monkeypatch):
    """open_clip's DistillClipLoss: both losses and the student's gradients (features and scale),
    a teacher of another width; "many" walks the teacher's softmax in row blocks of 5."""
    oc = _open_clip_loss_module()
    if blocks == "many":
        from fastcl.ops import strips
        monkeypatch.setattr(strips, "WORKSPACE_MB", 5 * 131 * 4 / 2**20)  # 5 rows of 131 fp32
    gen = torch.Generator().manual_seed(5)
    img, txt = randn(131, 40, generator=gen, dtype=dtype), randn(131, 40, generator=gen, dtype=dtype)
    t_img, t_txt = randn(131, 24, generator=gen, dtype=dtype), randn(131, 24, generator=gen, dtype=dtype)
    scale, t_scale = torch.tensor(3.5, dtype=dtype), torch.tensor(2.0, dtype=dtype)
    a, b = leaves(img, txt, scale), leaves(img, txt, scale)
    ours = fastcl.nn.DistillClipLoss(backend=backend)(*a, t_img, t_txt, t_scale, output_dict=True)
    theirs = oc.DistillClipLoss()(*b, t_img, t_txt, t_scale, output_dict=True)
    assert set(ours) == set(theirs) == {"contrastive_loss", "distill_loss"}
    for key in ours:
        assert ours[key].item() > 0.1
        assert_close(ours[key], theirs[key], dtype, key)
    # gradients of a weighting of the two (they share one graph)
    _compare(ours["contrastive_loss"] + 0.7 * ours["distill_loss"],
             theirs["contrastive_loss"] + 0.7 * theirs["distill_loss"], a, b, dtype)
    # and of the distillation term alone
    a, b = leaves(img, txt, scale), leaves(img, txt, scale)
    _compare(fastcl.distill_clip_loss(*a, t_img, t_txt, t_scale, backend=backend)[1],
             oc.DistillClipLoss()(*b, t_img, t_txt, t_scale)[1], a, b, dtype)


def test_distill_clip_loss_second_derivatives(monkeypatch):
    """create_graph=True through the teacher-weighted blocks (5 rows each) against open_clip's loss."""
    oc = _open_clip_loss_module()
    from fastcl.ops import strips
    monkeypatch.setattr(strips, "WORKSPACE_MB", 5 * 23 * 4 / 2**20)
    gen = torch.Generator().manual_seed(7)
    img, txt = randn(23, 6, generator=gen, dtype=torch.float64), randn(23, 6, generator=gen, dtype=torch.float64)
    t_img, t_txt = randn(23, 4, generator=gen, dtype=torch.float64), randn(23, 4, generator=gen, dtype=torch.float64)
    a, b = leaves(img, txt), leaves(img, txt)
    ours = fastcl.distill_clip_loss(*a, 3.0, t_img, t_txt, 2.0, backend="reference")[1]
    theirs = oc.DistillClipLoss()(*b, torch.tensor(3.0, dtype=torch.float64), t_img, t_txt,
                                  torch.tensor(2.0, dtype=torch.float64))[1]
    g_ours = torch.autograd.grad(ours, a, create_graph=True)
    g_theirs = torch.autograd.grad(theirs, b, create_graph=True)
    h_ours = torch.autograd.grad(sum(g.pow(2).sum() for g in g_ours), a)
    h_theirs = torch.autograd.grad(sum(g.pow(2).sum() for g in g_theirs), b)
    for x, y in zip(g_ours + h_ours, g_theirs + h_theirs):
        assert_close(x, y, torch.float64, "derivatives")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_distill_clip_loss_half_inputs(dtype):
    """Half student and teacher features against open_clip in float64 on the same rounded values."""
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(6)
    img, txt = (randn(67, 40, generator=gen).to(dtype) for _ in range(2))
    t_img, t_txt = (randn(67, 24, generator=gen).to(dtype) for _ in range(2))
    a = leaves(img, txt)
    b = leaves(img.double(), txt.double())
    c, d = fastcl.distill_clip_loss(*a, 3.0, t_img, t_txt, 2.0)
    rc, rd = oc.DistillClipLoss()(*b, 3.0, t_img.double(), t_txt.double(), 2.0)
    assert c.dtype == d.dtype == torch.float32
    assert_close(c, rc, torch.float32, "contrastive")
    assert_close(d, rd, torch.float32, "distill")
    for i, (g, r) in enumerate(zip(torch.autograd.grad(c + d, a), torch.autograd.grad(rc + rd, b))):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"grad {i}")


def test_distill_clip_loss_cancels_exactly_and_ignores_autocast():
    """A student equal to its teacher at scale 100: the distill term is the (tiny) contrastive one,
    with no rounding step of the largest logit left over; and under autocast (open_clip's training
    loop) the value and its gradient stay at fp32 accuracy together."""
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(7)
    img, txt = randn(33, 16, generator=gen) * 3, randn(33, 16, generator=gen) * 3
    c, d = fastcl.distill_clip_loss(img, txt, 100.0, img, txt, 100.0)
    rc, rd = oc.DistillClipLoss()(img.double(), txt.double(), 100.0, img.double(), txt.double(), 100.0)
    assert abs(d.item() - rd.item()) <= ZERO_ATOL["value"] * max(1.0, abs(c.item()))
    a, b = leaves(img, txt), leaves(img.double(), txt.double())
    t_img, t_txt = randn(33, 8, generator=gen), randn(33, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = fastcl.distill_clip_loss(*a, 14.0, t_img, t_txt, 10.0)[1]
    rd = oc.DistillClipLoss()(*b, 14.0, t_img.double(), t_txt.double(), 10.0)[1]
    _compare(d, rd, a, b)


def test_distill_clip_loss_arguments():
    x, t = torch.randn(6, 8), torch.randn(6, 5)
    with pytest.raises(ValueError, match="dist_image_features must not require grad"):
        fastcl.distill_clip_loss(x, x, 2.0, t.requires_grad_(), t, 1.0)
    with pytest.raises(ValueError, match="same number of rows"):
        fastcl.distill_clip_loss(x, x, 2.0, t[:5], t[:5], 1.0)
    with pytest.raises(ValueError, match="same feature size D"):
        fastcl.distill_clip_loss(x, x, 2.0, t.detach(), x, 1.0)
    with pytest.raises(ValueError, match="dist_logit_scale must be > 0"):
        fastcl.distill_clip_loss(x, x, 2.0, t.detach(), t.detach(), 0.0)
    with pytest.raises(NotImplementedError, match="world_size > 1"):
        fastcl.nn.DistillClipLoss(rank=0, world_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_siglip_loss(backend):
    oc = _open_clip_loss_module()
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(randn(67, 40, generator=gen), dim=-1)
    txt = F.normalize(randn(67, 40, generator=gen), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    a = leaves(img, txt, scale, bias)
    b = leaves(img, txt, scale, bias)
    ours = fastcl.nn.SigLipLoss(backend=backend)(*a)
    theirs = oc.SigLipLoss()(*b)
    _compare(ours, theirs, a, b)
    # open_clip adds no bias when logit_bias is None
    a, b = leaves(img, txt, scale), leaves(img, txt, scale)
    _compare(fastcl.nn.SigLipLoss(backend=backend)(*a, None), oc.SigLipLoss()(*b, None), a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pytorch_metric_learning_supcon(backend):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(2)
    emb = randn(67, 40, generator=gen)
    labels = torch.randint(0, 9, (67,), generator=gen)
    labels[0] = 100  # one anchor without positives: pml leaves it out of the mean
    (a,), (b,) = leaves(emb), leaves(emb)
    ours = fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(a, labels)
    theirs = pml.SupConLoss(temperature=0.1)(b, labels)
    _compare(ours, theirs, [a], [b])

    # Float labels compare by value, as in PML.
    (a,), (b,) = leaves(emb), leaves(emb)
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
        (a, b), (c, d) = leaves(emb, r), leaves(emb, r)
        _compare(fastcl.nn.SupConLoss(temperature=0.1, backend=backend)(a, labels, ref_emb=b, ref_labels=rl),
                 pml.SupConLoss(temperature=0.1)(c, labels, ref_emb=d, ref_labels=rl), [a, b], [c, d])
    # no negative among the references: 0
    (a, b), (c, d) = leaves(emb, ref), leaves(emb, ref)
    same = torch.zeros(37, dtype=torch.long)
    assert fastcl.nn.SupConLoss(backend=backend)(a, same, ref_emb=b, ref_labels=same[:1].expand(53)).item() == 0.0


def _pml_mined_cases(gen, n=67, m=None, d=40):
    """(embeddings, labels, ref, ref_labels, indices tuples) with a pairs miner, a triplets miner
    and hand-made pairs that repeat some (PML sets each mask entry once)."""
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    emb = randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (n,), generator=gen)
    ref, ref_labels = (emb, labels) if m is None else (randn(m, d, generator=gen, dtype=torch.float64),
                                                      torch.randint(0, 6, (m,), generator=gen))
    kw = {} if m is None else dict(ref_emb=ref, ref_labels=ref_labels)
    pairs = miners.MultiSimilarityMiner(epsilon=0.3)(emb, labels, **kw)
    triplets = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(emb, labels, **kw)
    a1, p, a2, neg = pairs
    repeated = (torch.cat([a1, a1[:5]]), torch.cat([p, p[:5]]), a2[::2], neg[::2])
    return emb, labels, ref, ref_labels, [pairs, triplets, repeated]


@pytest.mark.parametrize("cross", [False, True], ids=["self", "ref_emb"])
def test_pytorch_metric_learning_supcon_with_a_miner(cross):
    """indices_tuple (a miner's pairs or triplets): each anchor's denominator runs over its mined
    pairs only, as PML's mask form; by keyword, as PML's third positional argument, without labels."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb, labels, ref, ref_labels, cases = _pml_mined_cases(torch.Generator().manual_seed(8), m=53 if cross else None)
    for i, tup in enumerate(cases):
        assert min(t.numel() for t in tup) > 1, "the miner found too few pairs for a meaningful check"
        if cross:
            (a, b), (c, e) = leaves(emb, ref), leaves(emb, ref)
            ours = fastcl.nn.SupConLoss(temperature=0.1)(a, labels, indices_tuple=tup, ref_emb=b, ref_labels=ref_labels)
            theirs = pml.SupConLoss(temperature=0.1)(c, labels, tup, ref_emb=e, ref_labels=ref_labels)
            _compare(ours, theirs, [a, b], [c, e], torch.float64)
        else:
            (a,), (c,) = leaves(emb), leaves(emb)
            ours = fastcl.nn.SupConLoss(temperature=0.1)(a, labels, tup)  # PML's positional order
            theirs = pml.SupConLoss(temperature=0.1)(c, labels, tup)
            _compare(ours, theirs, [a], [c], torch.float64)
            (a,), (c,) = leaves(emb), leaves(emb)
            _compare(fastcl.supcon_loss_pml(a, None, 0.1, indices_tuple=tup),
                     pml.SupConLoss(temperature=0.1)(c, None, tup), [a], [c], torch.float64)
        assert ours.item() > 0.1, f"case {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_supcon_with_a_miner_in_low_precision(dtype):
    """Lower-precision embeddings against PML in float64 on the same (rounded) values."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb, labels, _, _, cases = _pml_mined_cases(torch.Generator().manual_seed(9))
    low = emb.to(dtype)
    for tup in cases:
        (a,), (c,) = leaves(low), leaves(low.double())
        ours = fastcl.nn.SupConLoss(temperature=0.1)(a, labels, indices_tuple=tup)
        assert ours.dtype == torch.float32
        _compare(ours, pml.SupConLoss(temperature=0.1)(c, labels, tup), [a], [c], dtype)


def test_supcon_miner_edge_cases():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    emb = randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    ix = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    crit, theirs = fastcl.nn.SupConLoss(temperature=0.1), pml.SupConLoss(temperature=0.1)
    # every index tensor of at most one entry, or no negatives: PML's zero loss, zero gradient
    for tup in ((ix(0), ix(1), ix(0), ix(2)), (ix(0, 1), ix(1, 0), ix(), ix())):
        ours = crit(emb, None, tup)
        assert ours.item() == 0.0 == theirs(emb, None, tup).item()
        assert torch.autograd.grad(ours, emb)[0].abs().max() == 0.0
    # one anchor's pairs only; the others have none and are left out of the mean
    tup = (ix(3, 3), ix(4, 5), ix(3, 3), ix(6, 7))
    assert_close(crit(emb, None, tup), theirs(emb, None, tup), torch.float64, "one anchor")
    # NaN in a mined pair gives NaN (PML's filter would drop that anchor silently), and so does NaN
    # in a row no pair names (NaN in, NaN out; PML's loss is NaN here too, as the NaN is in embeddings)
    for row in (5, 8):
        bad = emb.detach().clone()
        bad[row] = float("nan")
        assert torch.isnan(crit(bad, None, tup)), row
    assert torch.isnan(theirs(bad, None, tup))
    # PML's zero loss comes before it reads the indices: empty tensors of any dtype mean nothing
    # mined (a float index with an entry is an error even there: tests/test_validation.py)
    empty = torch.tensor([])
    assert crit(emb, None, (empty, empty, empty, empty)).item() == 0.0 == theirs(emb, None, (empty,) * 4).item()
    # (each case has a tensor of two entries: with at most one everywhere PML returns 0 first)
    errors = [((ix(0, 3), ix(1, 4), ix(0, 5), ix(1, 6)), ValueError, "both as a positive and as a negative"),
              ((ix(0, 3), ix(9, 4), ix(0, 5), ix(2, 6)), ValueError, r"indices_tuple\[1\] \(p\) must lie in \[0, 9\)"),
              ((ix(0, 1), ix(1), ix(0), ix(2)), ValueError, "as many anchors as partners"),
              ((ix(0), ix(1)), TypeError, "of length 2"),
              ((ix(0, 1), ix(1, 2), torch.tensor([2.0, 3.0])), TypeError,
               r"indices_tuple\[2\] \(n\) must be an integer tensor"),
              ((ix(0, 1), [1, 2], ix(2, 3)), TypeError, r"indices_tuple\[1\] \(p\) must be a torch.Tensor")]
    for tup, exc, match in errors:
        with pytest.raises(exc, match=match):
            crit(emb, None, tup)
    with pytest.raises(ValueError, match="indices_tuple given twice"):
        crit(emb, None, (ix(0), ix(1), ix(2)), indices_tuple=(ix(0), ix(1), ix(2)))
    with pytest.raises(ValueError, match="go with 2-D embeddings"):
        crit(emb[:, None], None, indices_tuple=(ix(0), ix(1), ix(2)))
    with pytest.raises(ValueError, match="unless indices_tuple is given"):
        crit(emb)
