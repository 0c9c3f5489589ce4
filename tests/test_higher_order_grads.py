"""Higher-order gradients (``create_graph=True``) through the fused ops: their backward then runs
as differentiable PyTorch ops, checked against finite differences and the reference backend; a
plain backward keeps the fused kernels."""
import sys

import pytest
import torch

import fastcl
from conftest import assert_close, randn
from fastcl.ops import sigmoid_pair_loss, similarity_lse

N, M, D = 5, 7, 3
# The triton kernels take no float64: they run in float32 against the float64 reference.
FUSED = [("cpu", torch.float64), ("triton", torch.float32)]


def _inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = randn(N, D, dtype=dtype, generator=g, requires_grad=True)
    k = randn(M, D, dtype=dtype, generator=g, requires_grad=True)
    scale = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-0.3, dtype=dtype, requires_grad=True)
    return q, k, scale, bias


INDEX = torch.tensor([6, 0, 2, 2, 5])
OPS = {
    "rows+cols+bias": lambda q, k, s, b, be: sum(t.sum() * w for t, w in zip(
        similarity_lse(q, k, s, b, rows=True, cols=True, backend=be), (1.0, 0.4))),
    "cols only": lambda q, k, s, b, be: similarity_lse(q, k, s, b, rows=False, cols=True, backend=be).sum(),
    "diag offset + positive index": lambda q, k, s, b, be: (lambda r, p: (r - p).mean())(
        *similarity_lse(q, k, s, b, exclude_diagonal=1, positives=INDEX, backend=be)),
    "clip": lambda q, k, s, b, be: fastcl.clip_loss(q, k[:N], s, b, backend=be),
    "sigmoid pair": lambda q, k, s, b, be: sigmoid_pair_loss(q, k, s, b, backend=be),
    # q and k one tensor: each must still get its own gradient
    "self pairs": lambda q, k, s, b, be: similarity_lse(q, q, s, b, rows=True, cols=True, exclude_diagonal=0,
                                                        backend=be)[1].sum(),
    "sigmoid self": lambda q, k, s, b, be: sigmoid_pair_loss(q, q, s, b, backend=be),
    # the incoming gradient depends on the op's own output
    "squared LSE": lambda q, k, s, b, be: similarity_lse(q, k, s, b, backend=be).pow(2).sum(),
    "squared sigmoid": lambda q, k, s, b, be: sigmoid_pair_loss(q, k, s, b, backend=be) ** 2,
    "ntxent": lambda q, k, s, b, be: fastcl.ntxent_loss(q, k[:N], s, backend=be),
    "dcl": lambda q, k, s, b, be: fastcl.dcl_loss(q, k[:N], s, backend=be),
    "supcon": lambda q, k, s, b, be: fastcl.supcon_loss(torch.stack([q, k[:N]], 1), temperature=s, backend=be),
}


def _grad(out, inputs, create_graph=False):
    # zeros for the inputs an op does not use (k of the self-pair ops, the bias of some losses)
    found = torch.autograd.grad(out, inputs, create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found))


def _penalty_grads(op, backend, seed, dtype=torch.float64):
    """d/d(inputs) of the squared norm of the first-order gradients (a gradient penalty)."""
    inputs = _inputs(seed, dtype)
    first = _grad(op(*inputs, backend), inputs, create_graph=True)
    penalty = sum((g * g).sum() for g in first)
    return first, _grad(penalty, inputs)


@pytest.mark.parametrize("backend,dtype", FUSED)
@pytest.mark.parametrize("name", list(OPS))
def test_gradient_penalty_matches_the_reference(name, backend, dtype):
    ref_first, ref_second = _penalty_grads(OPS[name], "reference", 3)
    first, second = _penalty_grads(OPS[name], backend, 3, dtype)
    # dbias is 0 in exact arithmetic for several of these (an LSE ignores a shift), so each order's
    # gradients are compared as one vector: relative to its norm, not to a zero.
    flat = lambda grads: torch.cat([g.reshape(-1).double() for g in grads])  # noqa: E731
    assert_close(flat(first), flat(ref_first), dtype, f"{name} first order")
    assert_close(flat(second), flat(ref_second), dtype, f"{name} second order")
    # the first-order gradients of a plain backward (fused kernels) agree with the graph's
    inputs = _inputs(3, dtype)
    plain = _grad(OPS[name](*inputs, backend), inputs)
    assert_close(flat(plain), flat(ref_first), dtype, f"{name} plain backward")


@pytest.mark.parametrize("name", list(OPS))
def test_second_derivatives_match_finite_differences(name):
    # The oracle independent of fastcl's reference backend, which the create_graph path reuses.
    q, k, s, b = _inputs(5)
    assert torch.autograd.gradgradcheck(lambda *t: OPS[name](*t, "cpu"), (q, k, s, b))


def test_plain_backward_keeps_the_fused_kernels(monkeypatch):
    """The differentiable recompute materialises the N x M logits: only create_graph may take it."""
    lse_mod, sp_mod = sys.modules["fastcl.ops.similarity_lse"], sys.modules["fastcl.ops.sigmoid_pair"]

    def refuse(*args, **kwargs):
        raise AssertionError("a plain backward took the materialised path")

    monkeypatch.setattr(lse_mod, "reference_similarity_lse", refuse)
    monkeypatch.setattr(sp_mod, "reference_sigmoid_pair_loss", refuse)
    for name in ("rows+cols+bias", "clip", "sigmoid pair"):
        inputs = _inputs(7)
        OPS[name](*inputs, "cpu").backward()
        assert all(t.grad is not None for t in inputs)
    inputs = _inputs(7)
    with pytest.raises(AssertionError, match="materialised"):
        torch.autograd.grad(OPS["clip"](*inputs, "cpu"), inputs, create_graph=True)


def test_ring_ops_refuse_create_graph_by_name():
    """The ring's backward is not built from differentiable ops: create_graph=True raises a clear
    error (it failed later, naming fastcl's internal backward op); a plain backward still works."""
    from fastcl.distributed import Ring
    from fastcl.ring import ring_sigmoid_pair_loss, ring_similarity_lse
    q, k = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    calls = {"lse": lambda: sum(t.sum() for t in ring_similarity_lse(q, k, 2.0, cols=True, ring=Ring(), sizes=[5])),
             "sigmoid": lambda: ring_sigmoid_pair_loss(q, k, 2.0, -1.0, ring=Ring(), sizes=[5])}
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"ring ops \(dist_impl='ring'\) have no second derivative, .* on one "
                                               r"process dist_impl='gather'"):
            torch.autograd.grad(call(), [q, k], create_graph=True)
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(call(), [q, k])), name


def test_euclidean_distances_twice_differentiable():
    """The PML-form losses' distances: cdist's values, and a backward of differentiable ops whose
    own derivative (in q, k and the incoming gradient) passes gradgradcheck, also with one of q, k
    not requiring grad."""
    from fastcl.losses.euclidean import euclidean_distances
    g = torch.Generator().manual_seed(11)
    q = randn(N, D, dtype=torch.float64, generator=g, requires_grad=True)
    k = randn(M, D, dtype=torch.float64, generator=g, requires_grad=True)
    d = euclidean_distances(q, k)
    assert_close(d, (q[:, None] - k[None]).pow(2).sum(-1).sqrt(), torch.float64, "distances")
    assert torch.autograd.gradgradcheck(euclidean_distances, (q, k))
    # bit for bit cdist's (its GEMM form beyond 25 rows), whose rounding decides PML's ties
    a, b = randn(40, 8, generator=g), randn(30, 8, generator=g)
    assert torch.equal(euclidean_distances(a, b), torch.cdist(a, b))
    assert torch.autograd.gradgradcheck(lambda a: euclidean_distances(a, k.detach()).pow(2).sum(), (q,))
    assert torch.autograd.gradgradcheck(lambda b: euclidean_distances(q.detach(), b).exp().sum(), (k,))
    # a near-duplicate pair (distance 1e-6) still gets the unit-vector gradient; only 0 gets none
    u = torch.tensor([[0.6, 0.0, 0.8]], dtype=torch.float64)
    near = (k[:1].detach() + 1e-6 * u).requires_grad_()
    (gn,) = torch.autograd.grad(euclidean_distances(near, k.detach())[0, 0], near)
    assert_close(gn, u, torch.float64, "near-duplicate gradient", factor=1e4)
    same = k[:1].detach().clone().requires_grad_()
    (gs,) = torch.autograd.grad(euclidean_distances(same, k.detach())[0, 0], same)
    assert torch.equal(gs, torch.zeros_like(gs))
