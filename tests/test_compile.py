"""torch.compile(fullgraph=True) over fastcl losses: no graph break, gradients equal eager."""
import sys

import pytest
import torch

import fastcl
from conftest import assert_close
from fastcl._ext import extension_available
from fastcl.losses.euclidean import euclidean_distances
from fastcl.ops.dispatch import env_setting
from fastcl.ops.reference import apply_function


def _run(fn, img, txt, scale):
    img, txt, scale = (t.detach().clone().requires_grad_() for t in (img, txt, scale))
    loss = fn(img, txt, scale)
    loss.backward()
    return [loss, img.grad, txt.grad, scale.grad]


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_clip_loss_compiles_without_graph_break_cpu(compiler):
    torch._dynamo.reset()

    labels = torch.randperm(67, generator=torch.Generator().manual_seed(1))

    def f(img, txt, scale):
        # Positive logits from the op: the diagonal (clip_loss, info_nce) and by index (labels, NT-Xent).
        return (fastcl.clip_loss(img, txt, scale, backend="cpu") + 0.5 * fastcl.info_nce(img, txt, logit_scale=scale)
                + fastcl.clip_loss(img, txt, scale, labels=labels, backend="cpu")
                + fastcl.ntxent_loss(img, txt, temperature=0.5, backend="cpu"))

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(67, 40, generator=gen), torch.randn(67, 40, generator=gen), torch.tensor(3.0))
    eager = _run(f, *args)
    compiled = _run(torch.compile(f, fullgraph=True, backend=compiler), *args)
    for a, b in zip(compiled, eager):
        assert_close(a, b, torch.float32)


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
def test_loss_family_compiles_without_graph_break_cpu():
    torch._dynamo.reset()
    float_labels = torch.tensor([0.5, 1.0, 0.5, 2.0, 1.0] * 13 + [2.0, 0.5])  # compared by value

    def f(img, txt, scale):
        return (fastcl.siglip_loss(img, txt, scale, None, backend="cpu")
                + fastcl.dcl_loss(img, txt, 1.0 / scale, backend="cpu")
                + fastcl.dcl_loss(img, txt, 1.0 / scale, negatives="separate", backend="cpu")
                + fastcl.supcon_loss(torch.stack([img, txt], 1), float_labels, temperature=1.0 / scale, backend="cpu"))

    gen = torch.Generator().manual_seed(2)
    args = (torch.randn(67, 40, generator=gen), torch.randn(67, 40, generator=gen), torch.tensor(3.0))
    eager = _run(f, *args)
    compiled = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), *args)
    for a, b in zip(compiled, eager):
        assert_close(a, b, torch.float32)


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
def test_python_float_temperatures_compile_as_symbols():
    """A temperature schedule passes a new float each step: dynamo makes it symbolic, which the
    argument checks must accept without a graph break."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, t: fastcl.ntxent_loss(a, b, t, backend="cpu") + fastcl.clip_loss(a, b, 1 / t),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(67, 40, generator=gen), torch.randn(67, 40, generator=gen)
    for t in (0.5, 0.7, 0.3):
        want = fastcl.ntxent_loss(a, b, t, backend="cpu") + fastcl.clip_loss(a, b, 1 / t)
        assert_close(f(a, b, t), want, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", None], ids=["triton", "auto"])
def test_clip_loss_compiles_without_graph_break_gpu(backend):
    # auto: the choice between triton and cuda is traced too (fastcl._C.has_cuda() broke it)
    torch._dynamo.reset()

    def f(img, txt, scale):
        return fastcl.clip_loss(img, txt, scale, backend=backend)

    gen = torch.Generator().manual_seed(0)
    args = tuple(t.cuda() for t in (torch.randn(1000, 256, generator=gen).bfloat16(),
                                    torch.randn(1000, 256, generator=gen).bfloat16(), torch.tensor(3.0)))
    eager = _run(f, *args)
    compiled = _run(torch.compile(f, fullgraph=True), *args)
    for a, b in zip(compiled, eager):
        assert_close(a, b, torch.bfloat16)


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
def test_masking_compiles_to_the_custom_op_and_matches_eager():
    """random_masking, restore_tokens and gather_tokens under torch.compile(fullgraph=True): the
    gathers are the opaque custom op fastcl::masking_segment_gather (eager mode calls the kernel
    directly), and values and gradients equal eager mode."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    x0, noise, tok0 = torch.randn(3, 9, 5, generator=gen), torch.rand(3, 9, generator=gen), torch.randn(5, generator=gen)

    def f(x, tok):
        kept, mask, ids_restore, ids_keep = fastcl.random_masking(x, 0.5, noise=noise, backend="cpu")
        full = fastcl.restore_tokens(kept * 2, tok, ids_restore, backend="cpu")
        return full.square().sum() + fastcl.gather_tokens(full, ids_keep, backend="cpu").sum() + mask.sum()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    ops = []

    def record(gm, example_inputs):  # the forward and backward graphs after AOT autograd
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm)
    recording = aot_autograd(fw_compiler=record, bw_compiler=record)

    def run(fn):
        x, tok = x0.clone().requires_grad_(), tok0.clone().requires_grad_()
        out = fn(x, tok)
        out.backward()
        return [out, x.grad, tok.grad]

    eager = run(f)
    compiled = run(torch.compile(f, fullgraph=True, backend=recording))
    # Three forward gathers, four backward ones (restore_tokens has one for each input).
    assert sum("masking_segment_gather" in op for op in ops) == 7, ops
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
def test_masking_runs_under_fake_tensors():
    """Fake tensors (shape and memory estimates) go through the custom op's fake kernel.
    (restore_tokens and gather_tokens read their indices' range in eager mode, which fake tensors
    cannot give; random_masking makes its own indices.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(3, 9, 5, requires_grad=True)
        pos = torch.randn(9, 5, requires_grad=True)
        kept, mask, ids_restore, ids_keep = fastcl.random_masking(x, 0.5, noise=torch.rand(3, 9), pos_embed=pos,
                                                                  backend="cpu")
        kept.square().sum().backward()
        assert kept.shape == (3, 4, 5) and ids_restore.shape == (3, 9)
        assert x.grad.shape == x.shape and pos.grad.shape == pos.shape


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_row_block_losses_compile(compiler):
    """The caption cross-entropy, the hypersphere loss and the cdist wrapper (q as k) compile
    without a graph break; PML's losses compile with breaks (class ids from torch.unique); all
    give eager's values and gradients.  The PML forms pass their embeddings as q and k: under
    torch 2.11's compile that dropped q's gradient (``apply_function``)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    emb, labels = torch.randn(33, 8, generator=gen), torch.randint(0, 5, (33,), generator=gen)
    logits, tokens = torch.randn(3, 4, 11, generator=gen), torch.randint(0, 11, (3, 4), generator=gen)
    za, zb = torch.randn(17, 8, generator=gen), torch.randn(17, 8, generator=gen)
    cases = [(lambda x: fastcl.caption_loss(x[0], tokens), [logits], True),
             (lambda x: fastcl.hypersphere_loss(x[0], x[1], 2.0, backend="reference"), [za, zb], True),
             (lambda x: euclidean_distances(x[0], x[0]).sum(), [za], True)]
    cases += [(lambda x, f=f: f(x[0], labels), [emb], False)
              for f in (lambda e, y: fastcl.ntxent_loss_pml(e, y, 0.1), fastcl.triplet_margin_loss_pml,
                        fastcl.multi_similarity_loss_pml, fastcl.circle_loss_pml, fastcl.contrastive_loss_pml)]
    for fn, inputs, fullgraph in cases:
        # The PML cases share one lambda's code: without a reset, dynamo's recompile limit would
        # quietly leave the last ones eager.
        torch._dynamo.reset()
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            results = []
            for f in (fn, torch.compile(fn, fullgraph=fullgraph, backend=compiler)):
                leaves = [t.clone().requires_grad_() for t in inputs]
                loss = f(leaves)
                results.append([loss, *torch.autograd.grad(loss, leaves)])
            for a, b in zip(*results):
                assert_close(a, b, torch.float32)
            with torch.no_grad():  # no grad: torch 2.11 bound _RowStats's *params forward wrongly here
                compiled = torch.compile(fn, fullgraph=fullgraph, backend=compiler)(inputs)
                assert_close(compiled, fn(inputs), torch.float32)


def test_apply_function_passes_a_repeated_tensor_as_a_distinct_alias():
    """A tensor given twice reaches the Function as two objects, and its gradient sums both
    places', eager and compiled."""
    seen = []

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            seen.append((a is b, a is c))
            ctx.save_for_backward(a, b)
            return a * b * c

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            return g * b * 3.0, g * a * 3.0, None

    def f(x):
        return apply_function(Product, x, x, 3.0).sum()

    x = torch.randn(5, generator=torch.Generator().manual_seed(4))
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf), leaf)
        assert_close(grad, 6.0 * x, torch.float32)
    assert seen and all(s == (False, False) for s in seen)


@pytest.mark.parametrize("labels", [[3, 1, 3, 2, 1, 1], [0.5, -0.0, 0.0, 2.5, 0.5], [7], []],
                         ids=["int", "float", "one", "empty"])
def test_class_ids_under_compile_give_the_eager_partition(labels, monkeypatch):
    """Under torch.compile the class ids come from a sort, with the label count as their bound
    (static shapes); equal labels (-0.0 and 0.0 too) must share an id exactly when they do in eager."""
    from fastcl.losses.supcon import class_counts, class_ids
    t = torch.tensor(labels)
    eager, n_eager = class_ids(t)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ids, bound = class_ids(t)
    assert bound == len(labels) and n_eager <= bound
    assert ids.dtype == torch.long and (ids < max(bound, 1)).all() and (ids >= 0).all()
    assert torch.equal(ids[:, None] == ids[None, :], eager[:, None] == eager[None, :])
    counts = class_counts(ids, bound, torch.float32)
    assert torch.equal(counts.index_select(0, ids), (t[:, None] == t[None, :]).sum(1).float())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_backend_choice_traces_without_graph_break(device):
    """``auto`` reads the extension's CUDA flag and the environment as constants: on a CUDA machine
    every op asks for them, and fastcl._C.has_cuda() is a call dynamo cannot trace."""
    from fastcl.ops.dispatch import resolve_backend
    torch._dynamo.reset()
    problem = ("similarity_lse", 67, 131, 40, torch.float32)
    choose = torch.compile(lambda x: x + len(resolve_backend(None, torch.device(device), problem)),
                           fullgraph=True, backend="eager")
    assert choose(torch.zeros(())) == len(resolve_backend(None, torch.device(device), problem))


def test_constant_mark_before_dynamo_is_torchs(monkeypatch):
    """Before torch._dynamo is imported (half of ``import fastcl``'s time), fastcl marks its
    environment reader as a constant itself: the mark must be the one torch's decorator sets."""
    from fastcl.ops import dispatch

    def ours():
        return 0

    def torchs():
        return 0
    torch.compiler.assume_constant_result(torchs)
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    assert dispatch.assume_constant_result(ours) is ours
    assert vars(ours) == vars(torchs) and vars(torchs)


def test_compiled_settings_replace_no_global():
    """torch.compile keeps an environment setting as a global of the compiled function's module,
    named after the function that read it: under a name that neither this module nor the
    dispatcher binds."""
    from fastcl.ops import dispatch
    torch._dynamo.reset()
    before = dict(globals())
    torch.compile(dispatch.requested_backend, fullgraph=True, backend="eager")(None)
    torch.compile(lambda x: x * len(dispatch.requested_backend(None)), fullgraph=True, backend="eager")(torch.ones(()))
    assert callable(dispatch.env_setting) and callable(dispatch.requested_backend)
    assert [k for k, v in before.items() if globals()[k] is not v] == []
    assert env_setting("FASTCL_SURELY_UNSET", "d") == "d"  # this module's own binding of the name
