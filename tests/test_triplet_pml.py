"""pytorch-metric-learning's TripletMarginLoss (fastcl.triplet_margin_loss_pml,
fastcl.nn.pml.TripletMarginLoss): against PML's own class in float64 and float32, and against a
float64 oracle on rounded half-precision inputs."""
import pytest
import torch
import torch.nn.functional as F

import fastcl
from conftest import (NORMALISED_VALUE_FACTOR, LiveBytes, assert_close, check_loss_and_grads, leaves, pml_losses,
                      randn)
from fastcl.ops import strips


def oracle(emb, labels, margin, ref=None, ref_labels=None):
    """Every triplet's relu(d_ap - d_an + margin), the mean of those above 0, float64."""
    q = F.normalize(emb.double(), dim=1)
    k = q if ref is None else F.normalize(ref.double(), dim=1)
    rl = labels if ref_labels is None else ref_labels
    d = torch.cdist(q, k)
    pos = labels[:, None] == rl[None, :]
    if ref_labels is None or ref_labels is labels:
        pos.fill_diagonal_(False)
    a, p, n = torch.where(pos[:, :, None] & ~(labels[:, None] == rl[None, :])[:, None, :])
    losses = torch.relu(d[a, p] - d[a, n] + margin)
    above = losses > 0
    return torch.where(above, losses, 0.0).sum() / above.sum().clamp_min(1) + 0 * q.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_against_pytorch_metric_learning(dtype, blocks, monkeypatch):
    """Labels, references (other labels; the labels object itself), two margins, float labels;
    "many" walks rows of the distance matrix two or three at a time."""
    pml = pml_losses()
    if blocks == "many":
        monkeypatch.setattr(strips, "WORKSPACE_MB", 3 * 71 * 67 / 2**20)
    gen = torch.Generator().manual_seed(21)
    emb, ref = randn(67, 40, generator=gen, dtype=dtype), randn(71, 40, generator=gen, dtype=dtype)
    labels, ref_labels = torch.randint(0, 7, (67,), generator=gen), torch.randint(0, 7, (71,), generator=gen)
    for margin in (0.05, 0.5):
        (a,), (b,) = leaves(emb), leaves(emb)
        ours = fastcl.nn.pml.TripletMarginLoss(margin)(a, labels)
        theirs = pml.TripletMarginLoss(margin)(b, labels)
        assert theirs.item() > 0.01
        check_loss_and_grads(ours, theirs, [a], [b], dtype, f"margin {margin}")
    (a,), (b,) = leaves(emb), leaves(emb)
    check_loss_and_grads(fastcl.nn.pml.TripletMarginLoss()(a, labels.double() / 3),
                         pml.TripletMarginLoss()(b, labels.double() / 3),
                         [a], [b], dtype, "float labels")
    for r, rl in ((ref, ref_labels), (emb * 3, labels), (emb * 3, labels.clone())):
        (a, c), (b, d) = leaves(emb, r), leaves(emb, r)
        check_loss_and_grads(fastcl.nn.pml.TripletMarginLoss()(a, labels, ref_emb=c, ref_labels=rl),
                             pml.TripletMarginLoss()(b, labels, ref_emb=d, ref_labels=rl), [a, c], [b, d], dtype,
                             "references")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_against_float64(dtype):
    gen = torch.Generator().manual_seed(22)
    emb = randn(67, 40, generator=gen, dtype=dtype)
    labels = torch.randint(0, 7, (67,), generator=gen)
    (a,), (b,) = leaves(emb), leaves(emb.double())
    ours = fastcl.triplet_margin_loss_pml(a, labels, 0.2)
    assert ours.dtype == torch.float32
    check_loss_and_grads(ours, oracle(b, labels, 0.2), [a], [b], dtype, "half", NORMALISED_VALUE_FACTOR[dtype])


def test_with_miners():
    """A miner's triplets, a miner's pairs (paired up per anchor, as PML does), one triplet."""
    pml = pml_losses()
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    gen = torch.Generator().manual_seed(23)
    emb = randn(67, 40, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (67,), generator=gen)
    ix = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    cases = [miners.TripletMarginMiner(margin=0.2)(emb, labels), miners.MultiSimilarityMiner(epsilon=0.3)(emb, labels),
             (ix(0), ix(1), ix(2))]
    labels[1], labels[2] = labels[0], labels[0] + 1
    for i, tup in enumerate(cases):
        (a,), (b,) = leaves(emb), leaves(emb)
        ours = fastcl.nn.pml.TripletMarginLoss(0.3)(a, None, tup)
        theirs = pml.TripletMarginLoss(0.3)(b, None, tup)
        if theirs.item() == 0:
            assert ours.item() == 0, i
            continue
        check_loss_and_grads(ours, theirs, [a], [b], torch.float64, f"case {i}")


def test_degenerate_and_nan():
    gen = torch.Generator().manual_seed(24)
    emb = randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    # no triplet (one class, or all distinct), or none violating (a negative margin): 0, no gradient
    for labels, margin in ((torch.zeros(9, dtype=torch.long), 0.05), (torch.arange(9), 0.05),
                           (torch.arange(9) % 3, -5.0)):
        loss = fastcl.triplet_margin_loss_pml(emb, labels, margin)
        assert loss.item() == 0.0
        assert torch.autograd.grad(loss, emb)[0].abs().max() == 0.0
    bad = emb.detach().clone()
    bad[4, 1] = float("nan")
    assert torch.isnan(fastcl.triplet_margin_loss_pml(bad, torch.arange(9) % 3, 0.05))
    assert torch.isnan(fastcl.triplet_margin_loss_pml(bad, torch.arange(9), 0.05)), "PML's zero keeps NaN"
    # duplicated rows: distance 0 takes no gradient, as cdist's
    dup = torch.cat([emb.detach()[:4], emb.detach()[:4]]).requires_grad_()
    ours = fastcl.triplet_margin_loss_pml(dup, torch.arange(8) % 2, 0.5)
    ref_in = dup.detach().clone().requires_grad_()
    ref = oracle(ref_in, torch.arange(8) % 2, 0.5)
    check_loss_and_grads(ours, ref, [dup], [ref_in], torch.float64, "duplicates")


def test_errors_and_scratch(monkeypatch):
    emb = randn(9, 5, generator=torch.Generator().manual_seed(25))
    with pytest.raises(NotImplementedError, match="swap=True"):
        fastcl.nn.pml.TripletMarginLoss(swap=True)
    with pytest.raises(NotImplementedError, match="triplets_per_anchor=10"):
        fastcl.nn.pml.TripletMarginLoss(triplets_per_anchor=10)
    with pytest.raises(ValueError, match="labels is required"):
        fastcl.nn.pml.TripletMarginLoss()(emb)
    with pytest.raises(ValueError, match="margin"):
        fastcl.triplet_margin_loss_pml(emb, torch.arange(9), float("inf"))
    # the scratch of both passes stays within the workspace, beyond a few (N, D) arrays
    monkeypatch.setattr(strips, "WORKSPACE_MB", 2.0)
    n, d = 1500, 8
    big = randn(n, d, generator=torch.Generator().manual_seed(26), requires_grad=True)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(27))
    with LiveBytes() as fwd:
        loss = fastcl.triplet_margin_loss_pml(big, labels, 0.2)
    with LiveBytes() as bwd:
        loss.backward()
    bound, small = strips.workspace_bytes(), 8 * n * d * 4
    assert fwd.peak <= bound + small and bwd.peak <= bound + small, (fwd.peak, bwd.peak, bound)
    assert fwd.peak > bound / 4, "the tracker must see the blocks"


def test_second_derivatives():
    """create_graph=True: the counts are locally constant, so the backward's own ops on q and k
    form the second derivative; against a twice-differentiable float64 oracle."""
    gen = torch.Generator().manual_seed(28)
    emb = randn(23, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (23,), generator=gen)

    def twice_differentiable(x):
        q = F.normalize(x, dim=1)
        d = ((q[:, None] - q[None]) ** 2).sum(-1).clamp_min(1e-300).sqrt()
        pos = labels[:, None] == labels[None, :]
        neg = ~pos
        pos.fill_diagonal_(False)
        a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
        losses = torch.relu(d[a, p] - d[a, n] + 0.3)
        return torch.where(losses > 0, losses, 0.0).sum() / (losses > 0).sum()

    (a,), (b,) = leaves(emb), leaves(emb)
    ga = torch.autograd.grad(fastcl.triplet_margin_loss_pml(a, labels, 0.3), a, create_graph=True)[0]
    gb = torch.autograd.grad(twice_differentiable(b), b, create_graph=True)[0]
    assert_close(ga, gb, torch.float64, "first derivative")
    assert_close(torch.autograd.grad(ga.pow(2).sum(), a)[0], torch.autograd.grad(gb.pow(2).sum(), b)[0],
                 torch.float64, "second derivative")


def test_learnable_margin():
    """A margin tensor that requires grad gets PML's gradient, on both paths."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(29)
    emb = randn(31, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (31,), generator=gen)
    match = labels[:, None] == labels[None, :]
    tup = torch.where(match & ~torch.eye(31, dtype=torch.bool)) + torch.where(~match)
    for indices in (None, tup):
        (a, ma), (b, mb) = leaves(emb, torch.tensor(0.2, dtype=torch.float64)), \
            leaves(emb, torch.tensor(0.2, dtype=torch.float64))
        check_loss_and_grads(fastcl.nn.pml.TripletMarginLoss(ma)(a, labels, indices),
                             pml.TripletMarginLoss(mb)(b, labels, indices),
                             [a, ma], [b, mb], torch.float64, "mined" if indices else "labels")


def test_exact_ties_count_as_pml():
    """A triplet with d_an == d_ap + margin exactly has loss 0, which PML leaves out of the mean
    (it counts losses > 0): unit rows e0, e1, e2 at margin 0 give d_ap = d_an = sqrt(2) to the
    bit for anchors e0 and e1.  Alone they are all ties (0, no gradient); among random rows of
    other classes the tie must not enter the count that divides the other triplets' sum."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(31)
    emb = torch.cat([torch.eye(3, 5, dtype=torch.float64), randn(8, 5, generator=gen, dtype=torch.float64)])
    labels = torch.cat([torch.tensor([0, 0, 1]), torch.randint(2, 5, (8,), generator=gen)])
    for n in (3, 11):
        (a,), (b,) = leaves(emb[:n]), leaves(emb[:n])
        ours = fastcl.nn.pml.TripletMarginLoss(0.0)(a, labels[:n])
        theirs = pml.TripletMarginLoss(0.0)(b, labels[:n])
        assert (theirs.item() == 0.0) == (n == 3)
        check_loss_and_grads(ours, theirs, [a], [b], torch.float64, f"{n} rows")


def test_learnable_margin_without_violations():
    """Well-separated classes and a small learnable margin: triplets exist but none violates it,
    so the loss is 0 and the margin's gradient is PML's, 0 (d loss / d margin is 1 only while a
    triplet counts)."""
    pml = pml_losses()
    gen = torch.Generator().manual_seed(32)
    labels = torch.arange(13) % 3
    emb = torch.eye(3, 7, dtype=torch.float64)[labels] * 10 + 0.1 * randn(13, 7, generator=gen, dtype=torch.float64)
    (a, ma), (b, mb) = leaves(emb, torch.tensor(0.05, dtype=torch.float64)), \
        leaves(emb, torch.tensor(0.05, dtype=torch.float64))
    ours = fastcl.nn.pml.TripletMarginLoss(ma)(a, labels)
    theirs = pml.TripletMarginLoss(mb)(b, labels)
    assert ours.item() == 0.0 and theirs.item() == 0.0
    ga, gm = torch.autograd.grad(ours, [a, ma])
    gb, gmb = torch.autograd.grad(theirs, [b, mb], allow_unused=True)  # PML's zero loss leaves the margin out
    gmb = torch.zeros_like(mb) if gmb is None else gmb
    assert gm.item() == gmb.item() == 0.0
    assert_close(ga, gb, torch.float64, "embeddings' gradient")


def test_nan_in_a_reference_that_is_only_a_negative():
    """NaN in any input gives NaN, the references' included: a NaN row of ref_emb whose class no
    anchor has is only ever a negative, still the loss is NaN (fastcl's rule, as for embeddings)."""
    gen = torch.Generator().manual_seed(33)
    emb, ref = randn(9, 5, generator=gen), randn(11, 5, generator=gen)
    labels, ref_labels = torch.arange(9) % 3, torch.arange(11) % 4
    assert torch.isfinite(fastcl.triplet_margin_loss_pml(emb, labels, 0.05, ref_emb=ref, ref_labels=ref_labels))
    ref[7, 2] = float("nan")
    assert ref_labels[7] not in labels
    assert torch.isnan(fastcl.triplet_margin_loss_pml(emb, labels, 0.05, ref_emb=ref, ref_labels=ref_labels))


def test_module_refuses_smooth_loss_and_checks_margin_up_front():
    """smooth_loss=True (PML's softplus form) is not computed, so it is refused by name, and a
    bad margin fails at construction, not at the first forward."""
    with pytest.raises(NotImplementedError, match="smooth_loss=True"):
        fastcl.nn.pml.TripletMarginLoss(smooth_loss=True)
    with pytest.raises(ValueError, match="margin"):
        fastcl.nn.pml.TripletMarginLoss(margin=float("inf"))
