"""Plain eager calls of the fused ops skip the torch.library dispatch (fastcl/ops/eager.py).

They must take the eager Function on plain tensors, the custom op under a dispatch mode (and
under torch.compile: tests/test_compile.py), and both paths must give the same bits: values,
gradients with some inputs frozen, and second derivatives."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcl
from conftest import randn
from fastcl._ext import extension_available
from fastcl.ops.dispatch import triton_available

if extension_available():
    BACKEND = "cpu"
elif triton_available():
    BACKEND = "triton"
else:
    BACKEND = None
pytestmark = pytest.mark.skipif(BACKEND is None, reason="needs a fused backend (the extension or Triton)")

LSE = sys.modules["fastcl.ops.similarity_lse"]
SIGMOID = sys.modules["fastcl.ops.sigmoid_pair"]
CUSTOM_OPS = [(LSE, "_lse_fwd"), (LSE, "_lse_bwd"), (SIGMOID, "_sp_fwd"), (SIGMOID, "_sp_bwd")]


def inputs(seed=0, k_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = randn(13, 5, generator=g).requires_grad_()
    k = randn(17, 5, generator=g).requires_grad_(k_grad)
    return q, k, torch.tensor(3.5, requires_grad=True), torch.tensor(-0.5, requires_grad=True)


LOSSES = {
    "clip": lambda q, k, s, b: fastcl.clip_loss(q, k[:13], s, b, backend=BACKEND),
    "lse_rows_cols": lambda q, k, s, b: sum(t.sum() for t in fastcl.ops.similarity_lse(
        q, k, s, b, rows=True, cols=True, backend=BACKEND)),
    "siglip": lambda q, k, s, b: fastcl.siglip_loss(q, k[:13], s, b, backend=BACKEND),
}


REFERENCE = {
    "clip": lambda q, k, s, b: fastcl.clip_loss(q, k[:13], s, b, backend="reference"),
    "lse_rows_cols": lambda q, k, s, b: sum(t.sum() for t in fastcl.ops.similarity_lse(
        q, k, s, b, rows=True, cols=True, backend="reference")),
    "siglip": lambda q, k, s, b: fastcl.siglip_loss(q, k[:13], s, b, backend="reference"),
}


def force_custom_op(monkeypatch):
    for module in (LSE, SIGMOID):
        monkeypatch.setattr(module, "needs_custom_op", lambda *t: True)


def run(loss, k_grad=True, create_graph=False):
    q, k, s, b = inputs(k_grad=k_grad)
    out = LOSSES[loss](q, k, s, b)
    wrt = [t for t in (q, k, s, b) if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, create_graph=create_graph)
    if create_graph:  # a second derivative through the op's graph backward
        grads = grads + torch.autograd.grad(sum((g * g).sum() for g in grads), wrt)
    return [out.detach()] + [g.detach() for g in grads]


@pytest.mark.parametrize("loss", LOSSES)
def test_eager_calls_skip_the_custom_op(loss, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call on plain tensors went through the custom op")
    for module, name in CUSTOM_OPS:
        monkeypatch.setattr(module, name, refuse)
    out = run(loss)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("k_grad", [True, False], ids=["all_grads", "k_frozen"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["first", "second"])
def test_eager_and_custom_op_paths_agree(loss, k_grad, create_graph, monkeypatch):
    eager = run(loss, k_grad, create_graph)
    force_custom_op(monkeypatch)
    custom = run(loss, k_grad, create_graph)
    assert len(eager) == len(custom)
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss, op", [("clip", (LSE, "_lse_fwd")), ("siglip", (SIGMOID, "_sp_fwd"))])
def test_dispatch_modes_get_the_custom_op(loss, op, monkeypatch):
    module, name = op
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(name) or real(*a))
    q, k, s, b = (t.detach() for t in inputs())
    with _Passthrough():
        LOSSES[loss](q, k, s, b)
    assert calls == [name]


def test_vmap_runs_each_sample():
    """vmap takes the eager Function's per-sample rule: the stacked results of single calls."""
    q, k, s, b = (t.detach() for t in inputs())
    qs = torch.stack([q, q.flip(0)])
    batched = torch.func.vmap(lambda x: LOSSES["clip"](x, k, s, b))(qs)
    assert torch.equal(batched, torch.stack([LOSSES["clip"](x, k, s, b) for x in qs]))


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_func_transforms_against_float64_reference(loss):
    """torch.func.grad (the custom op's generated autograd refused it), its nesting (a second
    derivative), and vmap over grad (per-sample gradients) on the fused backend, in float64,
    against the same transforms of the reference backend, for q, k, the scale and the bias."""
    q, k, s, b = (t.detach().double() for t in inputs())

    def loss_of(backend):
        def fn(q, k, s, b):
            return (LOSSES[loss] if backend == BACKEND else REFERENCE[loss])(q, k, s, b)
        return fn

    for backend in (BACKEND, "reference"):
        fn = loss_of(backend)
        grads = torch.func.grad(fn, argnums=(0, 1, 2, 3))(q, k, s, b)
        second = torch.func.grad(lambda q, k, s, b: sum(
            (g * g).sum() for g in torch.func.grad(fn, argnums=(0, 1, 2, 3))(q, k, s, b)), argnums=(0, 2))(q, k, s, b)
        qs = torch.stack([q, q.flip(0), 2 * q])
        per_sample = torch.func.vmap(torch.func.grad(fn, argnums=(0, 2)), in_dims=(0, None, None, None))(qs, k, s, b)
        if backend == BACKEND:
            ours = (grads, second, per_sample)
        else:
            for got, want, what in zip(ours, (grads, second, per_sample), ("grad", "grad of grad", "vmap(grad)")):
                for i, (x, y) in enumerate(zip(got, want)):
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=f"{loss} {what} {i}")
    for i, x in enumerate(qs):  # per-sample gradients are each sample's own
        torch.testing.assert_close(per_sample[0][i], torch.func.grad(loss_of("reference"))(x, k, s, b), rtol=1e-9,
                                   atol=1e-10)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_vectorized_jacobian_keeps_the_custom_op(loss):
    """The batched gradients of jacobian(vectorize=True) reach the backward as legacy batched
    tensors: the backward must take the custom op (its per-sample fallback), as before."""
    q, k, s, b = (t.detach() for t in inputs())
    fn = lambda x: LOSSES[loss](x, k, s, b)  # noqa: E731
    vectorized = torch.autograd.functional.jacobian(fn, q, vectorize=True)
    looped = torch.autograd.functional.jacobian(fn, q, vectorize=False)
    assert torch.equal(vectorized, looped)
