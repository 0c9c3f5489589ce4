"""pytorch-metric-learning's NTXentLoss (fastcl.ntxent_loss_pml, fastcl.nn.pml): against a float64
oracle written from PML's definition, and against PML's own classes when it is installed."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import (DTYPES, NORMALISED_VALUE_FACTOR, TOL, LiveBytes, assert_close, check_loss_and_grads, leaves,
                      pml_losses, randn)
from fastcl.ops import strips


def oracle(emb, labels, temperature, ref=None, ref_labels=None, *, tiny):
    """PML's NTXentLoss in float64 from its definition: per positive pair (i, j),
    -log(e^s_ij / (e^s_ij + sum over i's negatives of e^s_in) + tiny), s = cos / temperature,
    averaged over the positive pairs; 0 without positive or negative pairs, or with at most one of each."""
    q = F.normalize(emb.double(), dim=1)
    k = q if ref is None else F.normalize(ref.double(), dim=1)
    rl = labels if ref_labels is None else ref_labels
    s = q @ k.T / temperature
    match = labels[:, None] == rl[None, :]
    diff = ~match
    if ref_labels is None or ref_labels is labels:
        match.fill_diagonal_(False)
    a1, p = torch.where(match)
    a2, _ = torch.where(diff)
    if (len(a1) <= 1 and len(a2) <= 1) or len(a1) == 0 or len(a2) == 0:
        return (q.sum() + k.sum()) * 0
    neg_lse = s.masked_fill(~diff, float("-inf")).logsumexp(dim=1)
    pos = s[a1, p]
    ratio = torch.exp(pos - torch.logaddexp(pos, neg_lse[a1]))
    return -torch.log(ratio + tiny).mean()


def _check(ours, ref, wrt_ours, wrt_ref, dtype, what):
    value_factor = NORMALISED_VALUE_FACTOR.get(dtype, 1.0)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(ours, ref, torch.float32 if dtype != torch.float64 else dtype, f"{what} value", value_factor)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ours, wrt_ours), torch.autograd.grad(ref, wrt_ref))):
        assert_close(a, b, dtype, f"{what} grad {i}")


@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES)
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_against_float64_oracle(dtype, blocks, monkeypatch):
    """Labels, references (other labels; the labels object itself), learnable temperature; "many"
    walks the cosine matrix in row blocks of 2."""
    if blocks == "many":
        monkeypatch.setattr(strips, "WORKSPACE_MB", 2 * 131 * 27 / 2**20)
    gen = torch.Generator().manual_seed(11)
    emb, ref = randn(67, 40, generator=gen, dtype=dtype), randn(131, 40, generator=gen, dtype=dtype)
    labels, ref_labels = torch.randint(0, 7, (67,), generator=gen), torch.randint(0, 9, (131,), generator=gen)
    labels[0] = 50  # an anchor without positives
    temp = torch.tensor(0.13, dtype=torch.float64)
    tiny = torch.finfo(dtype).tiny
    cases = {"self": lambda e, r, t: (e, labels, t, None, None),
             "ref": lambda e, r, t: (e, labels, t, r, ref_labels),
             "ref is labels": lambda e, r, t: (e, labels, t, e * 2 + 1, labels)}
    for name, make in cases.items():
        a, b = leaves(emb, ref, temp), leaves(emb.double(), ref.double(), temp)
        ea, ra, ta, rea, rla = make(*a)
        ours = fastcl.ntxent_loss_pml(ea, labels, ta, ref_emb=rea, ref_labels=rla)
        eb, rb, tb, reb, rlb = make(*b)
        theirs = oracle(eb, labels, tb, reb, rlb, tiny=tiny)
        assert theirs.item() > 1.0
        wrt = [0, 1, 2] if name == "ref" else [0, 2]
        _check(ours, theirs, [a[i] for i in wrt], [b[i] for i in wrt], dtype, name)


def test_float64_keeps_the_far_tail_of_softplus():
    """Pairs with L_i - s_ij in (20, 37), where PyTorch's default softplus drops log1p(e^-d)
    (2e-9): float64 value and gradient to float64 precision."""
    gen = torch.Generator().manual_seed(13)
    centre = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    emb = (centre.repeat(6, 1) + 0.05 * torch.randn(12, 3, generator=gen, dtype=torch.float64))
    labels = torch.arange(12) // 2 % 2  # each class in both clusters: positives across, negatives within
    q = F.normalize(emb, dim=1)
    s = q @ q.T / 0.1
    same = labels[:, None] == labels[None, :]
    d = (s.masked_fill(same, float("-inf")).logsumexp(1)[:, None] - s)[same & ~torch.eye(12, dtype=torch.bool)]
    assert ((d > 20) & (d < 37)).sum() >= 4, "the data must reach the softplus tail"
    tup = (torch.where(same & ~torch.eye(12, dtype=torch.bool)) + torch.where(~same))
    for indices in (None, tup):
        (a,), (b,) = leaves(emb), leaves(emb)
        _check(fastcl.ntxent_loss_pml(a, labels, 0.1, indices_tuple=indices),
               oracle(b, labels, 0.1, tiny=torch.finfo(torch.float64).tiny), [a], [b], torch.float64,
               "mined" if indices else "labels")


def test_second_derivatives():
    """create_graph=True (a gradient penalty): the gradient of |grad|^2 against the float64 oracle,
    labels path (one block and many) and a miner's pairs; learnable temperature included."""
    gen = torch.Generator().manual_seed(14)
    emb = randn(23, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (23,), generator=gen)
    match = labels[:, None] == labels[None, :]
    tup = torch.where(match & ~torch.eye(23, dtype=torch.bool)) + torch.where(~match)
    for indices, mb in ((None, None), (None, 3 * 23 * 51 / 2**20), (tup, None)):
        temp = torch.tensor(0.2, dtype=torch.float64)
        a, b = leaves(emb, temp), leaves(emb, temp)
        old = strips.WORKSPACE_MB
        strips.WORKSPACE_MB = mb
        try:
            ours = fastcl.ntxent_loss_pml(a[0], labels, a[1], indices_tuple=indices)
            g_ours = torch.autograd.grad(ours, a, create_graph=True)
        finally:
            strips.WORKSPACE_MB = old
        ref = oracle(b[0], labels, b[1], tiny=torch.finfo(torch.float64).tiny)
        g_ref = torch.autograd.grad(ref, b, create_graph=True)
        for x, y in zip(g_ours, g_ref):
            assert_close(x, y, torch.float64, "first derivative")
        h_ours = torch.autograd.grad(g_ours[0].pow(2).sum() + g_ours[1] ** 2, a)
        h_ref = torch.autograd.grad(g_ref[0].pow(2).sum() + g_ref[1] ** 2, b)
        for x, y in zip(h_ours, h_ref):
            assert_close(x, y, torch.float64, f"second derivative ({'mined' if indices else mb})")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scratch_stays_within_the_workspace(dtype, monkeypatch):
    """Row blocks of 1500 x 1500 in a 2 MB workspace: the live scratch of the forward and of the
    backward stays within it, beyond a few (N, D) arrays (the whole matrix is 9 or 18 MB)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 2.0)
    n, d = 1500, 8
    emb = randn(n, d, generator=torch.Generator().manual_seed(15), dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(16))
    small = 8 * n * d * torch.finfo(dtype).bits // 8
    with LiveBytes() as fwd:
        loss = fastcl.ntxent_loss_pml(emb, labels, 0.1)
    with LiveBytes() as bwd:
        loss.backward()
    bound = strips.workspace_bytes()
    assert fwd.peak <= bound + small and bwd.peak <= bound + small, (fwd.peak, bwd.peak, bound)
    assert fwd.peak > bound / 4, "the tracker must see the blocks"


def test_autocast_keeps_the_compute_dtype():
    """Under CPU bfloat16 autocast both paths keep fp32 matrices: the same value as without it."""
    gen = torch.Generator().manual_seed(17)
    emb = randn(67, 40, generator=gen)
    labels = torch.randint(0, 7, (67,), generator=gen)
    match = labels[:, None] == labels[None, :]
    tup = torch.where(match & ~torch.eye(67, dtype=torch.bool)) + torch.where(~match)
    for indices in (None, tup):
        plain = fastcl.ntxent_loss_pml(emb, labels, 0.1, indices_tuple=indices)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fastcl.ntxent_loss_pml(emb, labels, 0.1, indices_tuple=indices)
        assert_close(auto, plain, torch.float32, "autocast")


def test_fp16_cap_of_tiny():
    """PML adds the dtype's smallest normal number inside the log: in float16 a pair's loss stops at
    -log(2^-14) = 9.70, with no gradient beyond it; in float32 it goes on to 87.3."""
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.05], [1.0, 0.02], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])  # each row's positive points away, its negative along it
    for dtype, t in ((torch.float16, 0.05), (torch.float32, 0.05), (torch.float32, 0.02)):
        (a,), (b,) = leaves(emb.to(dtype)), leaves(emb.double())
        ours = fastcl.ntxent_loss_pml(a, labels, t)
        theirs = oracle(b, labels, t, tiny=torch.finfo(dtype).tiny)
        assert_close(ours, theirs, torch.float32, f"{dtype} t={t}")
        ga, gb = torch.autograd.grad(ours, a)[0], torch.autograd.grad(theirs, b)[0]
        if dtype == torch.float16:  # past the cap: no gradient (the float64 form's is ~1e-13, rounding)
            assert not ga.any() and gb.abs().max() <= TOL[torch.float64]
        else:
            assert_close(ga, gb, dtype, f"{dtype} t={t} grad")
    capped = fastcl.ntxent_loss_pml(emb.half(), labels, 0.05)
    cap = -torch.log(torch.tensor(torch.finfo(torch.float16).tiny, dtype=torch.float64))
    assert_close(capped, cap, torch.float32, "the float16 cap, -log(2^-14)")
    assert fastcl.ntxent_loss_pml(emb, labels, 0.05).item() > 39.0


def test_degenerate_cases():
    """PML's zero loss (no positive pair, no negative pair, at most one of each) with zero
    gradient; anchors without negatives give 0 terms that still count in the mean."""
    gen = torch.Generator().manual_seed(3)
    emb = randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    for labels in (torch.zeros(9, dtype=torch.long), torch.arange(9)):
        loss = fastcl.ntxent_loss_pml(emb, labels, 0.1)
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, emb)[0].abs().max() == 0.0
    # one anchor against two references: one positive pair and one negative pair -> PML's 0
    ref = randn(2, 5, generator=gen, dtype=torch.float64)
    assert fastcl.ntxent_loss_pml(emb[:1], torch.tensor([0]), 0.1, ref_emb=ref, ref_labels=torch.tensor([0, 1])) == 0
    # ... and with a second negative it is a real loss
    ref3 = randn(3, 5, generator=gen, dtype=torch.float64)
    one = fastcl.ntxent_loss_pml(emb[:1], torch.tensor([0]), 0.1, ref_emb=ref3, ref_labels=torch.tensor([0, 1, 2]))
    assert_close(one, oracle(emb[:1], torch.tensor([0]), 0.1, ref3, torch.tensor([0, 1, 2]), tiny=2.2e-308),
                 torch.float64, "one anchor")
    # anchors of a class that covers every reference have no negatives: their pairs give 0
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    ref_labels = torch.tensor([0, 0, 1, 2])
    ref = randn(4, 5, generator=gen, dtype=torch.float64)
    (a, b), (c, d) = leaves(emb, ref), leaves(emb, ref)
    _check(fastcl.ntxent_loss_pml(a, labels, 0.1, ref_emb=b, ref_labels=ref_labels),
           oracle(c, labels, 0.1, d, ref_labels, tiny=torch.finfo(torch.float64).tiny), [a, b], [c, d],
           torch.float64, "partial negatives")


def test_nan_in_nan_out():
    gen = torch.Generator().manual_seed(4)
    emb = randn(9, 5, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    for row in (0, 8):  # in a positive pair; in a row that only serves as a negative
        bad = emb.clone()
        bad[row, 1] = float("nan")
        assert torch.isnan(fastcl.ntxent_loss_pml(bad, labels, 0.1)), row
        assert torch.isnan(fastcl.ntxent_loss_pml(bad, torch.arange(9), 0.1)), "PML's zero loss keeps NaN"
        tup = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 3]))
        assert torch.isnan(fastcl.ntxent_loss_pml(bad, None, 0.1, indices_tuple=tup)), row


def test_errors():
    emb = randn(9, 5, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(9) % 3
    crit = fastcl.nn.pml.NTXentLoss()
    with pytest.raises(ValueError, match="labels must have 9 entries"):
        crit(emb, labels[:8])
    with pytest.raises(ValueError, match="labels is required"):
        crit(emb)
    with pytest.raises(ValueError, match="ref_emb needs ref_labels"):
        crit(emb, labels, ref_emb=emb)
    with pytest.raises(ValueError, match="ref_labels needs ref_emb"):
        crit(emb, labels, ref_labels=labels)
    with pytest.raises(ValueError, match="embeddings"):
        crit(emb[0], labels)
    with pytest.raises(TypeError, match="labels must be an integer or floating tensor"):
        crit(emb, labels.bool())
    with pytest.raises(ValueError, match="temperature"):
        fastcl.nn.pml.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fastcl.ntxent_loss_pml(emb, labels, -1.0)
    fastcl.nn.pml.NTXentLoss(distance=None, reducer=None)  # PML's "the default"
    with pytest.raises(NotImplementedError, match=r"NTXentLoss\(distance=str"):
        fastcl.nn.pml.NTXentLoss(distance="dot")
    with pytest.raises(ValueError, match="must lie in"):
        crit(emb, None, (torch.tensor([0, 1]), torch.tensor([1, 9]), torch.tensor([0, 1]), torch.tensor([2, 3])))
    with pytest.raises(ValueError, match="ref_emb must have one row per embedding"):
        fastcl.nn.pml.SelfSupervisedLoss(crit)(emb, emb[:8])
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        fastcl.nn.pml.SelfSupervisedLoss(crit, symmetric=1)


# ---- against pytorch-metric-learning itself --------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pytorch_metric_learning_ntxent(dtype):
    """Labels (float labels compare by value), references, the labels object as ref_labels."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(6)
    emb, ref = randn(67, 40, generator=gen, dtype=dtype), randn(131, 40, generator=gen, dtype=dtype)
    labels, ref_labels = torch.randint(0, 9, (67,), generator=gen), torch.randint(0, 9, (131,), generator=gen)
    for t in (0.07, 0.5):
        (a,), (b,) = leaves(emb), leaves(emb)
        _check(fastcl.nn.pml.NTXentLoss(t)(a, labels), pml.NTXentLoss(t)(b, labels), [a], [b], dtype, f"t={t}")
    (a,), (b,) = leaves(emb), leaves(emb)
    _check(fastcl.nn.pml.NTXentLoss()(a, labels.double() / 2), pml.NTXentLoss()(b, labels.double() / 2), [a], [b],
           dtype, "float labels")
    for r, rl in ((ref, ref_labels), (emb * 3, labels), (emb * 3, labels.clone())):
        (a, c), (b, d) = leaves(emb, r), leaves(emb, r)
        _check(fastcl.nn.pml.NTXentLoss()(a, labels, ref_emb=c, ref_labels=rl),
               pml.NTXentLoss()(b, labels, ref_emb=d, ref_labels=rl), [a, c], [b, d], dtype, "references")


@pytest.mark.parametrize("cross", [False, True], ids=["self", "ref_emb"])
def test_pytorch_metric_learning_ntxent_with_a_miner(cross):
    """A miner's pairs or triplets, and hand-made pairs with repeats: a repeated positive pair is
    two losses, a repeated negative pair counts twice in its anchor's denominator, as in PML.
    (31 rows: PML holds a (positive pairs x negative pairs) matrix, 11 GB for all triplets of 67.)"""
    pml = pml_losses()
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    gen = torch.Generator().manual_seed(8)
    emb = randn(31, 40, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (31,), generator=gen)
    kw = {}
    if cross:
        kw = dict(ref_emb=randn(37, 40, generator=gen, dtype=torch.float64),
                  ref_labels=torch.randint(0, 6, (37,), generator=gen))
    pairs = miners.MultiSimilarityMiner(epsilon=0.3)(emb, labels, **kw)
    triplets = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(emb, labels, **kw)
    a1, p, a2, neg = pairs
    repeated = (torch.cat([a1, a1[:5]]), torch.cat([p, p[:5]]), torch.cat([a2, a2[:40]]), torch.cat([neg, neg[:40]]))
    for i, tup in enumerate((pairs, triplets, repeated)):
        assert min(t.numel() for t in tup) > 1, "the miner found too few pairs for a meaningful check"
        if cross:
            (a, c), (b, d) = leaves(emb, kw["ref_emb"]), leaves(emb, kw["ref_emb"])
            ours = fastcl.nn.pml.NTXentLoss(0.1)(a, labels, tup, ref_emb=c, ref_labels=kw["ref_labels"])
            theirs = pml.NTXentLoss(0.1)(b, labels, tup, ref_emb=d, ref_labels=kw["ref_labels"])
            _check(ours, theirs, [a, c], [b, d], torch.float64, f"case {i}")
        else:
            (a,), (b,) = leaves(emb), leaves(emb)
            ours = fastcl.nn.pml.NTXentLoss(0.1)(a, None, tup)
            _check(ours, pml.NTXentLoss(0.1)(b, None, tup), [a], [b], torch.float64, f"case {i}")
        assert ours.item() > 0.1
    # a learnable temperature, as a tensor in PML too
    temp = torch.tensor(0.2, dtype=torch.float64)
    (a, t_a), (b, t_b) = leaves(emb, temp), leaves(emb, temp)
    _check(fastcl.nn.pml.NTXentLoss(t_a)(a, None, pairs, **kw), pml.NTXentLoss(t_b)(b, None, pairs, **kw), [a, t_a],
           [b, t_b], torch.float64, "temperature tensor")
    # PML's zero losses: at most one entry per tensor; no negative pairs
    ix = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    (a,), (b,) = leaves(emb), leaves(emb)
    for tup in ((ix(0), ix(1), ix(0), ix(2)), (ix(0, 1), ix(1, 0), ix(), ix()), (ix(), ix(), ix(0, 1), ix(2, 3))):
        ours = fastcl.nn.pml.NTXentLoss()(a, None, tup)
        assert ours.item() == 0.0 == pml.NTXentLoss()(b, None, tup).item()
        assert torch.autograd.grad(ours, a)[0].abs().max() == 0.0
    # an anchor whose positive has no mined negative: a 0 term that counts in the mean
    tup = (ix(0, 3), ix(1, 4), ix(0, 0), ix(5, 6))
    (a,), (b,) = leaves(emb), leaves(emb)
    _check(fastcl.nn.pml.NTXentLoss()(a, None, tup), pml.NTXentLoss()(b, None, tup), [a], [b], torch.float64,
           "anchor without negatives")


@pytest.mark.parametrize("symmetric", [True, False])
def test_pytorch_metric_learning_self_supervised(symmetric):
    """SelfSupervisedLoss around NTXentLoss and SupConLoss (PML's defaults: 0.07 and 0.1)."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(9)
    emb, ref = randn(67, 40, generator=gen), randn(67, 40, generator=gen)
    for ours_cls, theirs_cls in ((fastcl.nn.pml.NTXentLoss, pml.NTXentLoss),
                                 (fastcl.nn.pml.SupConLoss, pml.SupConLoss)):
        (a, c), (b, d) = leaves(emb, ref), leaves(emb, ref)
        ours = fastcl.nn.pml.SelfSupervisedLoss(ours_cls(), symmetric=symmetric)(a, c)
        theirs = pml.SelfSupervisedLoss(theirs_cls(), symmetric=symmetric)(b, d)
        _check(ours, theirs, [a, c], [b, d], torch.float32, ours_cls.__name__)


def test_defaults_match_pml():
    pml = pml_losses()
    assert fastcl.nn.pml.NTXentLoss().temperature == pml.NTXentLoss().temperature == 0.07
    assert fastcl.nn.pml.SupConLoss().temperature == pml.SupConLoss().temperature == 0.1



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_gpu_in_bounded_memory(dtype, monkeypatch):
    """CUDA embeddings with CPU labels (PML moves them): the value and gradient against float64,
    and the scratch within the workspace bound plus a few (N, D) copies, far below one N x N
    matrix (67 MB of fp32 here; PML would hold N^2 (N - 2) numbers)."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 8.0)
    n, d = 4099, 96
    labels = torch.arange(n) % 2000  # pairs, and a few triples
    emb = randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(12), device="cuda", requires_grad=True)
    # an unmeasured run first: cuBLAS's workspaces (32 MB each on sm_90) are not the loss's scratch
    torch.autograd.grad(fastcl.ntxent_loss_pml(emb, labels, 0.1), emb)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fastcl.ntxent_loss_pml(emb, labels, 0.1)
    grad = torch.autograd.grad(loss, emb)[0]
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.5 * 8 * 2**20 + 8 * n * d * 4, f"{peak / 2**20:.1f} MB"
    (ref_emb,) = leaves(emb.detach().cpu().double())
    ref = oracle(ref_emb, labels, 0.1, tiny=torch.finfo(dtype).tiny)
    assert_close(loss.cpu(), ref, torch.float32, "value", NORMALISED_VALUE_FACTOR.get(dtype, 1.0))
    assert_close(grad.cpu(), torch.autograd.grad(ref, ref_emb)[0], dtype, "grad")


@pytest.mark.parametrize("loss_name", ["NTXentLoss", "SupConLoss", "TripletMarginLoss", "MultiSimilarityLoss",
                                       "CircleLoss", "ContrastiveLoss", "fastcl.nn.SupConLoss"])
@pytest.mark.parametrize("mode", ["plain", "enqueue_mask", "miner", "indices_tuple", "triplet miner",
                                  "triplet miner, pairs given"])
def test_pytorch_metric_learning_cross_batch_memory(loss_name, mode):
    """CrossBatchMemory around each PML-form loss against PML's, step by step: the memory
    fills, wraps around (batches of 13, then of 1, in a memory of 40), and every step's loss,
    gradient and memory agree."""
    pml = pml_losses()
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    gen = torch.Generator().manual_seed(18)
    d, size = 6, 40
    miner_ours = miner_theirs = (miners.MultiSimilarityMiner(epsilon=0.5) if mode == "miner"
                                 else miners.TripletMarginMiner(margin=0.5) if mode.startswith("triplet") else None)
    # fastcl.nn.SupConLoss (SupContrast's module, with PML's 2-D form) must take the wrapper's positional call
    inner = (fastcl.nn.SupConLoss(temperature=0.1) if loss_name == "fastcl.nn.SupConLoss"
             else getattr(fastcl.nn.pml, loss_name)())
    ours = fastcl.nn.pml.CrossBatchMemory(inner, d, size, miner=miner_ours)
    theirs = pml.CrossBatchMemory(getattr(pml, loss_name.rpartition(".")[2])(), d, size, miner=miner_theirs)
    sizes = [13, 13, 13, 13, 1, 13, 1, 13, size, 13]
    if loss_name == "NTXentLoss" and mode.startswith("triplet"):
        # PML's NT-Xent over mined triplets grows as the cube of the rows (5 s for a batch of 40;
        # a memory-sized batch is tested with every other pairing): smaller batches, still wrapping.
        sizes = [9, 9, 9, 9, 1, 9, 1, 9, 20, 9]
    for step, n in enumerate(sizes):
        emb = randn(n, d, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 4, (n,), generator=gen)
        kw = {}
        if mode == "enqueue_mask" and n > 1:
            kw["enqueue_mask"] = torch.arange(n) % 3 == 0 if step != 5 else torch.ones(n, dtype=torch.bool)
        if mode in ("indices_tuple", "triplet miner, pairs given") and n > 1:
            # anchors 0 and 1 against their own slots (positives the memory leaves out) and against
            # a slot of another label: extra pairs consistent with the labels, some repeated
            slot = [(theirs.queue_idx + j) % size for j in range(n)]
            other = [next((j for j in range(n) if labels[j] != labels[i]), None) for i in (0, 1)]
            if None not in other:
                kw["indices_tuple"] = (torch.tensor([0, 1]), torch.tensor(slot[:2]), torch.tensor([0, 1]),
                                       torch.tensor([slot[other[0]], slot[other[1]]]))
        (a,), (b,) = leaves(emb), leaves(emb)
        ref = theirs(b, labels, **kw)
        mine = ours(a, labels, **kw)
        assert_close(mine, ref, torch.float64, f"step {step} value")
        if ref.requires_grad and ref.item() != 0:
            assert_close(torch.autograd.grad(mine, a)[0], torch.autograd.grad(ref, b)[0], torch.float64,
                         f"step {step} grad")
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)


def test_supcon_module_takes_pml_positional_call():
    """fastcl.nn.SupConLoss in PML's 2-D form, called as PML's wrappers call a loss (embeddings,
    labels, indices_tuple, ref_emb, ref_labels all positional), alone and inside the
    DistributedLossWrapper outside torch.distributed, against PML's SupConLoss."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(23)
    emb, ref = randn(9, 5, generator=gen, dtype=torch.float64), randn(13, 5, generator=gen, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, 3, (9,), generator=gen), torch.randint(0, 3, (13,), generator=gen)
    (a, ra), (b, rb) = leaves(emb, ref), leaves(emb, ref)
    want = pml.SupConLoss(temperature=0.1)(b, labels, None, rb, ref_labels)
    check_loss_and_grads(fastcl.nn.SupConLoss(temperature=0.1)(a, labels, None, ra, ref_labels), want, (a, ra),
                         (b, rb), torch.float64, "positional")
    with pytest.warns(UserWarning, match="non-distributed"):
        wrapped = fastcl.nn.pml.DistributedLossWrapper(fastcl.nn.SupConLoss(temperature=0.1))(a, labels)
    (b,) = leaves(emb)
    check_loss_and_grads(wrapped, pml.SupConLoss(temperature=0.1)(b, labels), (a,), (b,), torch.float64, "wrapped")
    with pytest.raises(ValueError, match="go with 2-D embeddings"):
        fastcl.nn.SupConLoss()(emb.view(9, 1, 5), labels, None, ref)
    with pytest.raises(ValueError, match="go with 2-D embeddings"):
        fastcl.nn.SupConLoss()(emb.view(9, 1, 5), labels, exclude_self=True)
    with pytest.raises(TypeError, match="exclude_self must be a bool, got str"):
        fastcl.nn.SupConLoss()(emb, labels, None, ref, ref_labels, exclude_self="yes")


def test_cross_batch_memory_errors():
    crit = fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6, memory_size=8)
    emb, labels = torch.randn(5, 6), torch.arange(5)
    # arguments are checked before the batch is written
    for args, kw, exc, match in (((labels.bool(),), {}, TypeError, "labels must be an integer or floating"),
                                 ((labels.double().masked_fill(labels == 2, float("nan")),), {}, ValueError, "NaN"),
                                 ((labels,), dict(indices_tuple=(labels, labels)), TypeError, "got tuple of length 2")):
        with pytest.raises(exc, match=match):
            crit(emb, *args, **kw)
        assert crit.queue_idx == 0 and not crit.has_been_filled and crit.embedding_memory.abs().sum() == 0
    with pytest.raises(ValueError, match=r"rows to enqueue \(9\) must not exceed memory_size=8"):
        crit(torch.randn(12, 6), torch.arange(12), enqueue_mask=torch.arange(12) < 9)
    with pytest.raises(ValueError, match="embedding_size=6"):
        crit(torch.randn(5, 7), labels)
    with pytest.raises(ValueError, match="labels must be a 1-D tensor"):
        crit(emb, labels[:4])
    with pytest.raises(ValueError, match="mutually exclusive"):
        crit(emb, labels, indices_tuple=(labels, labels, labels), enqueue_mask=labels > 2)
    with pytest.raises(ValueError, match="enqueue_mask must be a bool tensor"):
        crit(emb, labels, enqueue_mask=labels)
    with pytest.raises(ValueError, match="must not exceed memory_size=8"):
        crit(torch.randn(9, 6), torch.arange(9))
    import numpy as np
    assert fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), np.int64(6), np.int64(8)).memory_size == 8
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6, memory_size=0)
    with pytest.raises(ValueError, match="embedding_size must be a positive int"):
        fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 2.5)
    with pytest.raises(TypeError, match="loss must be a loss module"):
        fastcl.nn.pml.CrossBatchMemory("NTXentLoss", 6)
    with pytest.raises(TypeError, match="miner must be callable"):
        fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6, miner="MultiSimilarityMiner")
    with pytest.raises(TypeError, match="loss must be a loss module"):
        fastcl.nn.pml.SelfSupervisedLoss(0.07)


def test_anchors_without_negatives_give_exactly_zero():
    """Every anchor with positives lacks negatives (its class covers every reference) and the one
    anchor with negatives lacks positives: each pair's -log(1 + tiny) rounds to 0 in PML and in the
    oracle, so the loss is exactly 0, not -tiny (the pair losses are clamped at 0)."""
    gen = torch.Generator().manual_seed(52)
    labels, ref_labels = torch.tensor([0, 1, 0]), torch.tensor([0, 0])
    for dtype in (torch.float32, torch.float64):
        emb, ref = randn(3, 5, generator=gen, dtype=dtype), randn(2, 5, generator=gen, dtype=dtype)
        ours = fastcl.ntxent_loss_pml(emb, labels, 0.1, ref_emb=ref, ref_labels=ref_labels)
        theirs = oracle(emb, labels, 0.1, ref, ref_labels, tiny=torch.finfo(dtype).tiny)
        assert ours.item() == 0.0 and theirs.item() == 0.0, dtype


def test_temperature_gradient_at_logits_near_a_thousand():
    """The temperature's gradient centres each row's logits before the products sum(ds * s): at
    temperature 1/1024 and rows nearly alike (logits 1024 * cos within ~100 of each other) the
    uncentred products would lose the small result to their rounding.  The rows are dyadic unit
    vectors, (7, +-3, +-2, +-1, +-1) / 8 permuted, so every cosine and logit is exact in fp32 and
    TOL[float32] applies without LARGE_LOGITS_FACTOR (whose rounding of the logits is absent)."""
    import itertools
    vecs = sorted({(7,) + tuple(p * s for p, s in zip(perm, signs))
                   for perm in itertools.permutations([3, 2, 1, 1]) for signs in itertools.product([1, -1], repeat=4)})
    rows = torch.tensor(vecs, dtype=torch.float32) / 8
    gen = torch.Generator().manual_seed(0)
    emb = rows[torch.randint(0, len(rows), (67,), generator=gen)]
    labels = torch.randint(0, 3, (67,), generator=gen)
    (t,), (rt,) = leaves(torch.tensor(1 / 1024)), leaves(torch.tensor(1 / 1024, dtype=torch.float64))
    ours = torch.autograd.grad(fastcl.ntxent_loss_pml(emb, labels, t), t)[0]
    ref = torch.autograd.grad(oracle(emb.double(), labels, rt, tiny=torch.finfo(torch.float32).tiny), rt)[0]
    assert_close(ours, ref, torch.float32, "d temperature at logits near 1024")


def test_nan_in_a_reference_where_pml_gives_zero():
    """NaN in ref_emb gives NaN also where PML's rule makes the loss 0 (no positive pair: every
    reference of another class); test_nan_in_nan_out puts the NaN in the embeddings only."""
    gen = torch.Generator().manual_seed(53)
    emb, ref = randn(9, 5, generator=gen), randn(7, 5, generator=gen)
    assert fastcl.ntxent_loss_pml(emb, torch.arange(9), 0.1, ref_emb=ref, ref_labels=torch.arange(7) + 9).item() == 0
    ref[4, 2] = float("nan")
    assert torch.isnan(fastcl.ntxent_loss_pml(emb, torch.arange(9), 0.1, ref_emb=ref, ref_labels=torch.arange(7) + 9))


def test_wrapper_defaults_match_pml():
    """SelfSupervisedLoss is symmetric and CrossBatchMemory holds 1024 rows unless told otherwise,
    as PML's (a script relying on them must get the same loss)."""
    pml = pml_losses()
    ours = fastcl.nn.pml.SelfSupervisedLoss(fastcl.nn.pml.NTXentLoss())
    assert ours.symmetric is pml.SelfSupervisedLoss(pml.NTXentLoss()).symmetric is True
    assert (fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6).memory_size
            == pml.CrossBatchMemory(pml.NTXentLoss(), 6).memory_size == 1024)


def test_module_argument_checks_by_name():
    """The SupCon module checks its temperature at construction; CrossBatchMemory refuses a bool
    size and an enqueue_mask of the wrong length before writing anything."""
    for bad in (0.0, -0.1, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fastcl.nn.pml.SupConLoss(temperature=bad)
    with pytest.raises(ValueError, match="embedding_size must be a positive int"):
        fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), True)
    with pytest.raises(ValueError, match="memory_size must be a positive int"):
        fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6, memory_size=True)
    crit = fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 6, memory_size=8)
    with pytest.raises(ValueError, match=r"enqueue_mask must be a bool tensor of shape \(5,\)"):
        crit(torch.randn(5, 6), torch.arange(5), enqueue_mask=torch.ones(4, dtype=torch.bool))
    assert crit.queue_idx == 0 and crit.embedding_memory.abs().sum() == 0
    with pytest.raises(TypeError, match="ref_emb must have the same dtype"):  # not promoted by the cat
        fastcl.nn.pml.SelfSupervisedLoss(fastcl.nn.pml.NTXentLoss())(torch.randn(5, 4), torch.randn(5, 4).double())


def test_supcon_module_passes_its_backend():
    emb, labels = torch.randn(6, 4), torch.arange(6) % 2
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.nn.pml.SupConLoss(backend="nope")(emb, labels)
