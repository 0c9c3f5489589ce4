"""pytorch-metric-learning's MultiSimilarityLoss, CircleLoss and ContrastiveLoss
(fastcl.losses.pair_pml, fastcl.nn.pml): against PML's own classes in float64 and float32, in
one row block and many, with labels, references, miners and learnable parameters; half inputs
against PML's class run in float64 on the rounded inputs."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import (NORMALISED_VALUE_FACTOR, LiveBytes, assert_close, check_loss_and_grads, leaves, pml_losses,
                      randn)
from fastcl.ops import strips

LOSSES = ["MultiSimilarityLoss", "CircleLoss", "ContrastiveLoss"]
# non-default parameters of each, as PML's keyword arguments
OTHER_PARAMS = {"MultiSimilarityLoss": dict(alpha=3.0, beta=20.0, base=0.3), "CircleLoss": dict(m=0.25, gamma=128.0),
                "ContrastiveLoss": dict(pos_margin=0.2, neg_margin=1.2)}
FUNCTIONAL = {"MultiSimilarityLoss": fastcl.multi_similarity_loss_pml, "CircleLoss": fastcl.circle_loss_pml,
              "ContrastiveLoss": fastcl.contrastive_loss_pml}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_against_pytorch_metric_learning(name, dtype, blocks, monkeypatch):
    """Labels (defaults and other parameters), float labels, and references: other labels, the
    labels object itself (PML leaves out the pairs (i, i)) and a copy of it (it keeps them).
    "many" walks rows of the matrix two or three at a time."""
    pml = pml_losses()
    if blocks == "many":
        monkeypatch.setattr(strips, "WORKSPACE_MB", 3 * 71 * 25 / 2**20)
    gen = torch.Generator().manual_seed(31)
    emb, ref = randn(67, 40, generator=gen, dtype=dtype), randn(71, 40, generator=gen, dtype=dtype)
    labels, ref_labels = torch.randint(0, 7, (67,), generator=gen), torch.randint(0, 7, (71,), generator=gen)
    ours_cls, theirs_cls = getattr(fastcl.nn.pml, name), getattr(pml, name)
    for params in ({}, OTHER_PARAMS[name]):
        (a,), (b,) = leaves(emb), leaves(emb)
        theirs = theirs_cls(**params)(b, labels)
        assert theirs.item() > 0.01
        check_loss_and_grads(ours_cls(**params)(a, labels), theirs, [a], [b], dtype, f"labels {params}")
    (a,), (b,) = leaves(emb), leaves(emb)
    check_loss_and_grads(ours_cls()(a, labels.double() / 3),
                         theirs_cls()(b, labels.double() / 3), [a], [b], dtype, "float labels")
    # exact copies (as rows, after normalising): in one block, whether a pair (i, i) counts at
    # pos_margin 0 is cdist's rounding, as in PML; in many, its GEMM may round differently
    near = emb * 3 if blocks == "one" else emb * 3 + 0.05 * randn(67, 40, generator=gen, dtype=dtype)
    for r, rl, what in ((ref, ref_labels, "other"), (near, labels, "same object"), (near, labels.clone(), "copy")):
        (a, c), (b, d) = leaves(emb, r), leaves(emb, r)
        check_loss_and_grads(ours_cls()(a, labels, ref_emb=c, ref_labels=rl),
                             theirs_cls()(b, labels, ref_emb=d, ref_labels=rl),
                             [a, c], [b, d], dtype, f"references ({what})")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_against_float64(name, dtype):
    pml = pml_losses()
    gen = torch.Generator().manual_seed(32)
    emb = randn(67, 40, generator=gen, dtype=dtype)
    labels = torch.randint(0, 7, (67,), generator=gen)
    (a,), (b,) = leaves(emb), leaves(emb.double())
    ours = FUNCTIONAL[name](a, labels)
    assert ours.dtype == torch.float32
    check_loss_and_grads(ours, getattr(pml, name)()(b, labels), [a], [b], dtype, "half", NORMALISED_VALUE_FACTOR[dtype])


@pytest.mark.parametrize("name", LOSSES)
def test_learnable_parameters(name):
    """Every parameter as a tensor that requires grad gets PML's gradient, on the labels path (in
    row blocks) and on a miner's pairs."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(33)
    emb = randn(31, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (31,), generator=gen)
    match = labels[:, None] == labels[None, :]
    tup = torch.where(match & ~torch.eye(31, dtype=torch.bool)) + torch.where(~match)
    params = OTHER_PARAMS[name]
    for indices in (None, tup):
        ours_p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
        theirs_p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
        (a,), (b,) = leaves(emb), leaves(emb)
        check_loss_and_grads(getattr(fastcl.nn.pml, name)(**ours_p)(a, labels, indices),
                             getattr(pml, name)(**theirs_p)(b, labels, indices),
                             [a, *ours_p.values()], [b, *theirs_p.values()], torch.float64,
                             "mined" if indices else "labels")


@pytest.mark.parametrize("name", LOSSES)
def test_with_miners(name):
    """A miner's pairs, a miner's triplets, pairs named twice (the mask losses count them once,
    the contrastive loss twice, as PML), and a pair named positive and negative (PML asserts)."""
    pml = pml_losses()
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    gen = torch.Generator().manual_seed(34)
    emb = randn(67, 40, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (67,), generator=gen)
    ix = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    same = [j for j in range(1, 67) if labels[j] == labels[0]]
    diff = [j for j in range(1, 67) if labels[j] != labels[0]]
    cases = [miners.MultiSimilarityMiner(epsilon=0.3)(emb, labels), miners.TripletMarginMiner(margin=0.2)(emb, labels),
             (ix(0, 0, 0, 3), ix(same[0], same[0], same[1], same[0]), ix(0, 0, 5), ix(diff[0], diff[0], diff[1])),
             (ix(0), ix(same[0]), ix(0), ix(diff[0]))]  # one pair of each: PML's zero loss
    for i, tup in enumerate(cases):
        (a,), (b,) = leaves(emb), leaves(emb)
        ours = getattr(fastcl.nn.pml, name)()(a, labels, tup)
        theirs = getattr(pml, name)()(b, labels, tup)
        if theirs.item() == 0:
            assert ours.item() == 0, i
            continue
        check_loss_and_grads(ours, theirs, [a], [b], torch.float64, f"case {i}")
    clash = (ix(0), ix(same[0]), ix(0, 1), ix(same[0], 2))
    if name == "ContrastiveLoss":  # pair-based in PML: no clash check there
        (a,), (b,) = leaves(emb), leaves(emb)
        check_loss_and_grads(fastcl.contrastive_loss_pml(a, labels, indices_tuple=clash),
                             pml.ContrastiveLoss()(b, labels, clash),
                             [a], [b], torch.float64, "clash")
    else:
        with pytest.raises(AssertionError):
            getattr(pml, name)()(emb, labels, clash)
        with pytest.raises(ValueError, match="both as a positive and as a negative"):
            FUNCTIONAL[name](emb, labels, indices_tuple=clash)


@pytest.mark.parametrize("name", LOSSES)
def test_degenerate_and_nan(name):
    """One label (no negative pair), all labels distinct (no positive pair), two samples (at most
    one pair of each: PML's 0), one sample; NaN in any embedding gives NaN, PML's zero included."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(35)
    emb = randn(9, 5, generator=gen, dtype=torch.float64)
    for labels in (torch.zeros(9, dtype=torch.long), torch.arange(9), torch.tensor([0, 1] + [2] * 7)):
        (a,), (b,) = leaves(emb), leaves(emb)
        ours, theirs = getattr(fastcl.nn.pml, name)()(a, labels), getattr(pml, name)()(b, labels)
        assert_close(ours, theirs, torch.float64, f"labels {labels.tolist()}")
        ga = torch.autograd.grad(ours, a)[0]
        gb = torch.autograd.grad(theirs, b)[0] if theirs.requires_grad else torch.zeros_like(ga)
        assert_close(ga, gb, torch.float64, "grad") if gb.abs().max() > 0 else None
        assert torch.equal(ga == 0, gb == 0) or gb.abs().max() > 0
    # one sample (no pair), and one positive with one negative pair (PML's zero)
    one = torch.zeros(1, dtype=torch.long)
    for kw in ({}, dict(ref_emb=emb[1:3], ref_labels=torch.tensor([0, 1]))):
        (x,), (y,) = leaves(emb[:1]), leaves(emb[:1])
        loss = FUNCTIONAL[name](x, one, **kw)
        assert loss.item() == 0.0 and torch.autograd.grad(loss, x)[0].abs().max() == 0.0
        assert getattr(pml, name)()(y, one, **kw).item() == 0.0
    bad = emb.clone()
    bad[4, 1] = float("nan")
    assert torch.isnan(FUNCTIONAL[name](bad, torch.arange(9) % 3))
    assert torch.isnan(FUNCTIONAL[name](bad[4:5], one)), "PML's zero keeps NaN"
    assert torch.isnan(FUNCTIONAL[name](emb[:1], one, ref_emb=bad[3:5], ref_labels=torch.tensor([0, 1])))


@pytest.mark.parametrize("name", LOSSES)
def test_second_derivatives(name, monkeypatch):
    """create_graph=True through the row blocks: the derivative of a gradient's square against
    PML's class in float64 (the contrastive loss against its formula with explicit differences:
    cdist has no second derivative), in many row blocks."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(36)
    emb = randn(23, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (23,), generator=gen)
    monkeypatch.setattr(strips, "WORKSPACE_MB", 3 * 23 * 25 / 2**20)

    def contrastive(x):
        q = F.normalize(x, dim=1)
        d = ((q[:, None] - q[None]) ** 2).sum(-1).clamp_min(1e-300).sqrt()
        pos = labels[:, None] == labels[None, :]
        neg = ~pos
        pos.fill_diagonal_(False)
        pl, nl = torch.relu(d[pos]), torch.relu(1.0 - d[neg])
        return pl.sum() / (pl > 0).sum() + nl.sum() / (nl > 0).sum()

    theirs = contrastive if name == "ContrastiveLoss" else getattr(pml, name)()
    (a,), (b,) = leaves(emb), leaves(emb)
    ga = torch.autograd.grad(getattr(fastcl.nn.pml, name)()(a, labels), a, create_graph=True)[0]
    gb = torch.autograd.grad(theirs(b) if name == "ContrastiveLoss" else theirs(b, labels), b, create_graph=True)[0]
    assert_close(ga, gb, torch.float64, "first derivative")
    assert_close(torch.autograd.grad(ga.pow(2).sum(), a)[0], torch.autograd.grad(gb.pow(2).sum(), b)[0],
                 torch.float64, "second derivative")
    if name == "ContrastiveLoss":
        return
    # references, learnable parameters and a miner's pairs, against PML's class
    ref, ref_labels = randn(19, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (19,), generator=gen)
    match = labels[:, None] == ref_labels[None, :]
    for indices in (None, torch.where(match) + torch.where(~match)):
        ours_p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in OTHER_PARAMS[name].items()}
        theirs_p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in OTHER_PARAMS[name].items()}
        (a, c), (b, d) = leaves(emb, ref), leaves(emb, ref)
        found = []
        for x, r, p, cls in ((a, c, ours_p, getattr(fastcl.nn.pml, name)), (b, d, theirs_p, getattr(pml, name))):
            g = torch.autograd.grad(cls(**p)(x, labels, indices, r, ref_labels), [x, r], create_graph=True)
            found.append(torch.autograd.grad(g[0].pow(2).sum() + g[1].pow(3).sum(), [x, r, *p.values()]))
        for i, (u, v) in enumerate(zip(*found)):
            assert_close(u, v, torch.float64, f"second derivative {i}, {'mined' if indices else 'labels'}")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("learnable", [False, True])
def test_scratch_within_workspace(name, dtype, learnable, monkeypatch):
    """Both passes keep their scratch within the workspace bound plus a few (N, D) arrays, with
    fixed and learnable parameters, where PML holds (N, N) matrices (and the contrastive loss
    every pair's indices)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 2.0)
    n, d = 1500, 8
    big = randn(n, d, generator=torch.Generator().manual_seed(37), dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(38))
    params = {k: torch.tensor(v, dtype=dtype, requires_grad=learnable) for k, v in OTHER_PARAMS[name].items()}
    with LiveBytes() as fwd:
        loss = FUNCTIONAL[name](big, labels, **params)
    with LiveBytes() as bwd:
        loss.backward()
    bound, small = strips.workspace_bytes(), 8 * n * d * dtype.itemsize
    assert fwd.peak <= bound + small and bwd.peak <= bound + small, (fwd.peak, bwd.peak, bound)
    assert fwd.peak > bound / 4, "the tracker must see the blocks"
    assert bwd.peak < n * n * 4, "far below one (N, N) fp32 matrix"


@pytest.mark.parametrize("name", LOSSES)
def test_parameters_nan_and_mined_pairs_under_autocast(name):
    """A NaN parameter gives NaN on both paths (PML's contrastive loss drops a NaN margin's pairs,
    a silent wrong value), or an error naming it where it must be positive; a miner's pairs, with
    the backward run inside CPU bf16 autocast too, keep fp32 (their row blocks run outside
    autocast)."""
    gen = torch.Generator().manual_seed(41)
    emb = randn(67, 40, generator=gen)
    labels = torch.randint(0, 5, (67,), generator=gen)
    match = labels[:, None] == labels[None, :]
    tup = torch.where(match & ~torch.eye(67, dtype=torch.bool)) + torch.where(~match)
    for key in OTHER_PARAMS[name]:
        for indices in (None, tup):
            if key in ("alpha", "beta", "gamma"):  # must be > 0: NaN is refused by name
                with pytest.raises(ValueError, match=f"{key} must be > 0"):
                    FUNCTIONAL[name](emb, labels, indices_tuple=indices, **{key: float("nan")})
                continue
            loss = FUNCTIONAL[name](emb, labels, indices_tuple=indices, **{key: float("nan")})
            assert torch.isnan(loss), (key, indices is None)
    results = []
    for autocast in (False, True):
        x = emb.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = FUNCTIONAL[name](x, labels, indices_tuple=tup)
            results.append((loss, torch.autograd.grad(loss, x)[0]))
    for u, v in zip(*results):
        assert_close(u, v, torch.float32, "under autocast")


def test_argument_errors():
    emb = randn(9, 5, generator=torch.Generator().manual_seed(39))
    labels = torch.arange(9) % 3
    for ctor, kw, match in ((fastcl.nn.pml.MultiSimilarityLoss, dict(alpha=0.0), "alpha"),
                            (fastcl.nn.pml.MultiSimilarityLoss, dict(beta=-1.0), "beta"),
                            (fastcl.nn.pml.MultiSimilarityLoss, dict(base=float("inf")), "base"),
                            (fastcl.nn.pml.CircleLoss, dict(gamma=0), "gamma"),
                            (fastcl.nn.pml.CircleLoss, dict(m=float("inf")), "m"),
                            (fastcl.nn.pml.ContrastiveLoss, dict(neg_margin="1"), "neg_margin"),
                            (fastcl.nn.pml.ContrastiveLoss, dict(pos_margin=torch.ones(2)), "pos_margin")):
        with pytest.raises((ValueError, TypeError), match=match):
            ctor(**kw)
    for fn in FUNCTIONAL.values():
        with pytest.raises(ValueError, match="labels is required"):
            fn(emb)
        with pytest.raises(ValueError, match="labels must be 1-D"):
            fn(emb, labels[:, None])
        with pytest.raises(ValueError, match="ref_emb needs ref_labels"):
            fn(emb, labels, ref_emb=emb)
        with pytest.raises(ValueError, match="embeddings"):
            fn(emb[0], labels)
        with pytest.raises(TypeError, match="indices_tuple"):
            fn(emb, labels, indices_tuple=(labels, labels))
        with pytest.raises((ValueError, IndexError), match=r"indices_tuple\[1\]"):
            fn(emb, labels, indices_tuple=(labels, labels + 9, labels))
    with pytest.raises(ValueError, match="gamma"):
        fastcl.circle_loss_pml(emb, labels, gamma=torch.tensor(-1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("name", LOSSES)
def test_on_gpu_in_bounded_memory(name, monkeypatch):
    """CUDA embeddings with CPU labels: value and gradient against the CPU run in float64, and the
    scratch within the workspace bound plus a few (N, D) copies (one (N, N) fp32 matrix is 67 MB)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 8.0)
    n, d = 4099, 96
    labels = torch.arange(n) % 500
    emb = randn(n, d, generator=torch.Generator().manual_seed(40), device="cuda", requires_grad=True)
    torch.autograd.grad(FUNCTIONAL[name](emb, labels), emb)  # unmeasured: cuBLAS's workspaces are not scratch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = FUNCTIONAL[name](emb, labels)
    grad = torch.autograd.grad(loss, emb)[0]
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.5 * 8 * 2**20 + 8 * n * d * 4, f"{peak / 2**20:.1f} MB"
    (ref_emb,) = leaves(emb.detach().cpu().double())
    ref = FUNCTIONAL[name](ref_emb, labels)
    assert_close(loss.cpu(), ref, torch.float32, "value")
    assert_close(grad.cpu(), torch.autograd.grad(ref, ref_emb)[0], torch.float32, "grad")


def test_distributed_wrapper_outside_torch_distributed():
    """Without a process group the wrapper warns and returns the wrapped loss, as PML's; a wrapped
    CrossBatchMemory gets its enqueue mask.  (Across ranks: tests/_dist_worker.py, against PML.)"""
    gen = torch.Generator().manual_seed(42)
    emb, labels = randn(9, 5, generator=gen), torch.arange(9) % 3
    wrapped = fastcl.nn.pml.DistributedLossWrapper(fastcl.nn.pml.MultiSimilarityLoss())
    with pytest.warns(UserWarning, match="non-distributed setting"):
        assert torch.equal(wrapped(emb, labels), fastcl.multi_similarity_loss_pml(emb, labels))
    memory = fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.ContrastiveLoss(), 5, 20)
    with pytest.warns(UserWarning):
        fastcl.nn.pml.DistributedLossWrapper(memory)(emb, labels, enqueue_mask=torch.arange(9) < 4)
    assert memory.queue_idx == 4
    with pytest.raises(ValueError, match="efficient=True is not supported"):
        fastcl.nn.pml.DistributedLossWrapper(memory, efficient=True)
    with pytest.raises(TypeError, match="efficient must be a bool"):
        fastcl.nn.pml.DistributedLossWrapper(fastcl.nn.pml.NTXentLoss(), efficient="yes")
    with pytest.raises(TypeError, match="loss must be a loss module"):
        fastcl.nn.pml.DistributedLossWrapper("NTXentLoss")
    with pytest.raises(ValueError, match="not compatible with ref_emb"):
        fastcl.nn.pml.DistributedLossWrapper(memory)(emb, labels, ref_emb=emb, ref_labels=labels)
    with pytest.raises(ValueError, match="enqueue_mask is for a wrapped CrossBatchMemory"):
        wrapped(emb, labels, enqueue_mask=labels > 0)
    with pytest.raises(TypeError, match="SelfSupervisedLoss does not"):
        fastcl.nn.pml.DistributedLossWrapper(fastcl.nn.pml.SelfSupervisedLoss(fastcl.nn.pml.NTXentLoss()))


def test_cross_batch_memory_passes_references_not_pairs():
    """Without a miner or indices_tuple, CrossBatchMemory hands this module's losses the memory as
    references and no pair list (enqueue_mask: MoCo's form; otherwise the batch's own slots first,
    with exclude_self), so each runs in its row blocks; another loss gets PML's pair list.
    Values: tests/test_ntxent_pml.py runs the same steps against PML's CrossBatchMemory for every
    loss."""
    seen = []

    class Recorder(fastcl.nn.pml.MultiSimilarityLoss):
        def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, **kw):
            seen.append((indices_tuple, ref_emb, ref_labels, kw))
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels, **kw)

    class Plain(torch.nn.Module):  # PML's call signature, not this module's class
        def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
            seen.append((indices_tuple, ref_emb, ref_labels, {}))
            return fastcl.multi_similarity_loss_pml(embeddings, labels, indices_tuple=indices_tuple, ref_emb=ref_emb,
                                                    ref_labels=ref_labels)

    gen = torch.Generator().manual_seed(43)
    emb, labels = randn(12, 5, generator=gen), torch.arange(12) % 4
    memory = fastcl.nn.pml.CrossBatchMemory(Recorder(), 5, 20)
    memory(emb, labels, enqueue_mask=torch.arange(12) >= 6)
    assert seen[-1][0] is None and seen[-1][1].shape == (6, 5) and seen[-1][3] == {}
    memory(emb, labels)  # slots 6..17: the batch's own rows come first
    pairs, ref, ref_labels, kw = seen[-1]
    assert pairs is None and kw == {"exclude_self": True} and torch.equal(ref[:12], emb)
    assert torch.equal(ref_labels[:12], labels) and torch.equal(ref[12:], memory.embedding_memory[:6])
    memory(emb[:5], labels[:5])  # wraps around: slots 18, 19, 0, 1, 2
    assert torch.equal(seen[-1][1][:5], emb[:5]) and seen[-1][3] == {"exclude_self": True}
    plain = fastcl.nn.pml.CrossBatchMemory(Plain(), 5, 32)
    plain(emb, labels, enqueue_mask=torch.arange(12) >= 6)
    assert seen[-1][0] is not None  # PML's list of every pair
    plain(emb, labels)
    assert seen[-1][0] is not None  # a pair list, each anchor's own slot left out


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss", "TripletMarginLoss"] + LOSSES)
def test_exclude_self_against_pml_pairs(name, monkeypatch):
    """exclude_self=True (references whose first N rows are the anchors' own, as CrossBatchMemory
    passes them) equals PML's class given every pair but (i, i) as indices_tuple, in one row block
    and in many; its misuse is refused by name."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(44)
    emb, extra = randn(23, 6, generator=gen, dtype=torch.float64), randn(9, 6, generator=gen, dtype=torch.float64)
    labels, extra_labels = torch.randint(0, 4, (23,), generator=gen), torch.randint(0, 4, (9,), generator=gen)
    ref, ref_labels = torch.cat([emb + 0.01 * randn(23, 6, generator=gen, dtype=torch.float64), extra]), \
        torch.cat([labels, extra_labels])
    # the first references' labels differ from the anchors' in a few rows: (i, i) is left out
    # whatever its labels (CrossBatchMemory's own slots always share them)
    ref_labels[:3] = (labels[:3] + 1) % 4
    same, other = labels[:, None] == ref_labels[None, :], labels[:, None] != ref_labels[None, :]
    same[torch.arange(23), torch.arange(23)] = False
    other[torch.arange(23), torch.arange(23)] = False
    pairs = torch.where(same) + torch.where(other)
    for blocks in (64.0, 3 * 32 * 40 / 2**20):
        monkeypatch.setattr(strips, "WORKSPACE_MB", blocks)
        (a, c), (b, d) = leaves(emb, ref), leaves(emb, ref)
        ours = getattr(fastcl.nn.pml, name)()(a, labels, None, c, ref_labels, exclude_self=True)
        theirs = getattr(pml, name)()(b, labels, pairs, d, ref_labels)
        check_loss_and_grads(ours, theirs, [a, c], [b, d], torch.float64, f"{name}, {blocks} MB")
    fn = getattr(fastcl.nn.pml, name)()
    with pytest.raises(ValueError, match="exclude_self=True needs ref_emb"):
        fn(emb, labels, pairs, ref, ref_labels, exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self=True needs ref_emb"):
        fn(emb, labels, None, extra, extra_labels, exclude_self=True)
    with pytest.raises(TypeError, match="exclude_self must be a bool"):
        fn(emb, labels, None, ref, ref_labels, exclude_self=1)


def test_zero_rule_and_foreign_losses_in_cross_batch_memory():
    """PML's zero for at most one positive and one negative pair holds for SupCon's all-pairs form
    too (a batch of one against a memory of two), and a loss that is not fastcl's (PML's triplet
    loss with random triplets reads no pairs as 'sample') still gets PML's pair list."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(45)
    x, lab = randn(3, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 0, 1])
    mask = torch.tensor([False, True, True])
    for name in ("SupConLoss", "NTXentLoss", "MultiSimilarityLoss"):
        ours = fastcl.nn.pml.CrossBatchMemory(getattr(fastcl.nn.pml, name)(), 4, 8)(x, lab, enqueue_mask=mask)
        theirs = pml.CrossBatchMemory(getattr(pml, name)(), 4, 8)(x, lab, enqueue_mask=mask)
        assert theirs.item() == 0.0 and ours.item() == 0.0, name
    assert fastcl.supcon_loss_pml(x[:1], lab[:1], ref_emb=x[1:], ref_labels=lab[1:]).item() == 0.0
    emb, labels = randn(12, 4, generator=gen, dtype=torch.float64), torch.arange(12) % 3
    for kw in (dict(enqueue_mask=torch.arange(12) >= 6), {}):
        ours = fastcl.nn.pml.CrossBatchMemory(pml.TripletMarginLoss(0.5, triplets_per_anchor=1), 4, 16)
        theirs = pml.CrossBatchMemory(pml.TripletMarginLoss(0.5, triplets_per_anchor=1), 4, 16)
        ours(emb, labels, **kw)
        theirs(emb, labels, **kw)
        for step in range(2):  # PML's pair list makes its triplets all triplets, not random ones
            assert_close(ours(emb[:1] * 2, labels[:1]), theirs(emb[:1] * 2, labels[:1]), torch.float64,
                         f"{kw} step {step}")


def test_circle_gradient_where_softplus_turns_linear():
    """Above 20 PyTorch's softplus is the identity, slope exactly 1: the Circle loss's own
    derivative takes it so (sigmoid there differs by up to e^-20 relative)."""
    pml = pml_losses()
    c = 0.3585
    emb = torch.tensor([[1.0, 0.0], [c, (1 - c * c) ** 0.5], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    (a,), (b,) = leaves(emb), leaves(emb)
    ga = torch.autograd.grad(fastcl.circle_loss_pml(a, labels), a)[0]
    gb = torch.autograd.grad(pml.CircleLoss()(b, labels), b)[0]
    # A thousandth of float64's TOL: the sigmoid slope would be off by up to e^-20 relative.
    assert_close(ga, gb, torch.float64, "d embeddings", factor=1e-3, elementwise=True)


def test_labelled_losses_run_on_meta_tensors():
    """A shapes-only dry run (meta embeddings and labels) gives a meta 0-d loss: the class ids
    take the sort path torch.compile uses, as unique has no meta kernel, and no value is read."""
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")
    labels = meta(6, dtype=torch.long)
    for call in (lambda: fastcl.supcon_loss_pml(meta(6, 8), labels),
                 lambda: fastcl.supcon_loss_pml(meta(6, 8), meta(6)),
                 lambda: fastcl.supcon_loss(meta(6, 2, 8), labels=labels),
                 lambda: fastcl.ntxent_loss_pml(meta(6, 8), labels),
                 lambda: fastcl.contrastive_loss_pml(meta(6, 8), labels),
                 lambda: fastcl.multi_similarity_loss_pml(meta(6, 8), labels),
                 lambda: fastcl.circle_loss_pml(meta(6, 8), labels),
                 lambda: fastcl.triplet_margin_loss_pml(meta(6, 8), labels)):
        out = call()
        assert out.shape == () and out.device.type == "meta"


_PML_NAMES = ["NTXentLoss", "SupConLoss", "TripletMarginLoss", "MultiSimilarityLoss", "CircleLoss", "ContrastiveLoss"]


@pytest.mark.parametrize("name", _PML_NAMES)
def test_pml_base_keywords_at_their_defaults(name):
    """PML's base-class keywords: the default distance and reducer passed explicitly (as written
    in many training scripts), collect_stats and a regularizer weight are accepted; another
    distance, reducer or a regularizer is refused by name, an unknown keyword by TypeError.  The
    table of defaults is checked against PML's own losses."""
    pml = pml_losses()
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    reducers = pytest.importorskip("pytorch_metric_learning.reducers")
    regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")
    theirs = getattr(pml, name)()
    ours_cls = getattr(fastcl.nn.pml, name)
    gen = torch.Generator().manual_seed(29)
    emb, labels = torch.randn(11, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (11,), generator=gen)
    reducer = theirs.reducer  # a loss of several terms (ContrastiveLoss) holds one reducer per term
    kinds = {type(r) for r in reducer.reducers.values()} if hasattr(reducer, "reducers") else {type(reducer)}
    assert len(kinds) == 1
    ours = ours_cls(distance=type(theirs.distance)(), reducer=kinds.pop()(), collect_stats=True,
                    embedding_regularizer=None, embedding_reg_weight=0.5)
    assert_close(ours(emb, labels), theirs(emb, labels), torch.float64, name)
    other_distance = (distances.LpDistance() if isinstance(theirs.distance, distances.CosineSimilarity)
                      else distances.CosineSimilarity())
    for kw, word in ((dict(distance=other_distance), "distance"), (dict(distance=distances.LpDistance(power=2)),
                     "distance"), (dict(distance=distances.LpDistance(normalize_embeddings=False)), "distance"),
                     (dict(reducer=reducers.SumReducer()), "reducer"), (dict(reducer=reducers.ThresholdReducer(high=1)),
                     "reducer"), (dict(embedding_regularizer=regularizers.LpRegularizer()), "embedding_regularizer")):
        with pytest.raises(NotImplementedError, match=f"{name}\\({word}="):
            ours_cls(**kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'margin_typo'"):
        ours_cls(margin_typo=1)
    with pytest.raises(TypeError, match="collect_stats must be a bool"):
        ours_cls(collect_stats="yes")


def test_pml_default_distance_and_reducer_settings_are_checked():
    """Only the default settings of PML's default classes are computed: LpDistance with p=1 and
    AvgNonZeroReducer with an upper threshold are refused, though their class names match."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, reducers
    for name in ("TripletMarginLoss", "ContrastiveLoss"):
        getattr(fastcl.nn.pml, name)(distance=distances.LpDistance(p=2))  # the default, spelt out
        with pytest.raises(NotImplementedError, match=f"{name}\\(distance=LpDistance"):
            getattr(fastcl.nn.pml, name)(distance=distances.LpDistance(p=1))
    for name in ("SupConLoss", "CircleLoss", "TripletMarginLoss"):
        with pytest.raises(NotImplementedError, match=f"{name}\\(reducer=AvgNonZeroReducer"):
            getattr(fastcl.nn.pml, name)(reducer=reducers.AvgNonZeroReducer(high=1.0))


@pytest.mark.parametrize("name", _PML_NAMES)
def test_cross_batch_memory_with_no_more_negative_pairs_than_anchors(name):
    """A batch of one class against a memory holding a single row of another: the batch's own
    slots are left out (exclude_self), N = 5 anchors have exactly N negative pairs.  PML's loss is
    not its zero there; SupCon's and NT-Xent's 'any negative pair' rules count the negative pairs
    less the left-out (i, i) pairs of another class (none here), not less N."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(51)
    first, x = randn(1, 6, generator=gen, dtype=torch.float64), randn(5, 6, generator=gen, dtype=torch.float64)
    ours = fastcl.nn.pml.CrossBatchMemory(getattr(fastcl.nn.pml, name)(), 6, 16)
    theirs = pml.CrossBatchMemory(getattr(pml, name)(), 6, 16)
    ours(first, torch.tensor([1]))
    theirs(first, torch.tensor([1]))
    (a,), (b,) = leaves(x), leaves(x)
    labels = torch.zeros(5, dtype=torch.long)
    check_loss_and_grads(ours(a, labels), theirs(b, labels), [a], [b], torch.float64, name)
