"""sigmoid_pair_loss on every backend against a float64 oracle that materialises the matrix."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, ELEMENT_TOL, MATH_RTOL_EXACT_EXP, assert_close, randn
from fastcl._ext import extension_available
from fastcl.ops.dispatch import triton_available
from fastcl.ops.sigmoid_pair import sigmoid_pair_loss

if triton_available():  # called by the elementwise test kernel, which looks them up in this module
    from fastcl.kernels.sigmoid_pair import _sigmoid, _softplus

BACKENDS = ["reference"]
if extension_available():
    BACKENDS.append("cpu")
if triton_available():
    BACKENDS.append("triton")


def oracle(q, k, scale, bias):
    """-logsigmoid(z * s) summed, z = +1 on the diagonal, in float64, written from the definition."""
    s = q.double() @ k.double().T * scale + bias
    z = torch.full_like(s, -1.0)
    n = min(s.shape)
    z[range(n), range(n)] = 1.0
    return -F.logsigmoid(z * s).sum()


def _run(q, k, scale, bias, backend):
    """Loss and gradients (q, k, scale, bias) from ``backend`` and from the oracle on the same inputs."""
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(),
              scale.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    out = sigmoid_pair_loss(*leaves, backend=backend)
    out.backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = oracle(*ref_leaves)
    ref.backward()
    return (out, *[t.grad for t in leaves]), (ref, *[t.grad for t in ref_leaves])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", [(67, 131, 40), (33, 17, 24)])
def test_value_and_grads(backend, dtype, n, m, d):
    g = torch.Generator().manual_seed(n * 1000 + m)
    q = F.normalize(randn(n, d, generator=g), dim=1).to(dtype)
    k = F.normalize(randn(m, d, generator=g), dim=1).to(dtype)
    scale = torch.tensor(10.0 + torch.rand(1, generator=g).item())
    bias = torch.tensor(-10.0 + torch.rand(1, generator=g).item())
    outs, refs = _run(q, k, scale, bias, backend)
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        if what in ("dq", "dk"):
            assert o.dtype == dtype
        # fp32 results from inputs already rounded (the oracle has the same values): fp32's TOL.
        # dq and dk come back in the input dtype and take its TOL, and so does the GPU backends'
        # dscale, formed from gradient tiles multiplied in the input dtype.
        half = what in ("dq", "dk") or (what == "dscale" and backend in ("triton", "cuda"))
        assert_close(o, r, dtype if half else torch.float32, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (100.0, -50.0), (1e4, 5e3), (300.0, 0.0)])
def test_extreme_values_stay_finite(backend, scale, bias):
    g = torch.Generator().manual_seed(7)
    q, k = randn(29, 20, generator=g), randn(37, 20, generator=g)
    outs, refs = _run(q, k, torch.tensor(scale), torch.tensor(bias), backend)
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        assert torch.isfinite(o).all(), f"{backend} {what} not finite"
        assert_close(o, r, torch.float32, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_terms_keep_relative_precision(backend):
    # Every pair far on its correct side: each term ~exp(-30); a naive log(1 + e) gives 0.
    q = torch.eye(8, 16)
    outs, refs = _run(q, q.clone(), torch.tensor(60.0), torch.tensor(-30.0), backend)
    assert float(outs[0].detach()) > 0
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        assert_close(o, r, torch.float32, f"{backend} {what}")


@pytest.mark.skipif(not extension_available(), reason="needs the C++ extension")
def test_gradcheck_cpu_fp64():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: sigmoid_pair_loss(*a, backend="cpu"), (q, k, scale, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_matches_oracle(backend):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(21, 12, generator=g, dtype=torch.float64)
    k = torch.randn(19, 12, generator=g, dtype=torch.float64)
    if backend == "triton":  # the Triton kernels take no float64 (kernels/sigmoid_pair.py)
        with pytest.raises(TypeError, match="got float64; use backend='reference'"):
            _run(q, k, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64), backend)
        return
    outs, refs = _run(q, k, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64), backend)
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        assert o.dtype == torch.float64
        assert_close(o, r, torch.float64, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_logits(backend):
    g = torch.Generator().manual_seed(11)
    q, k = (randn(20, 16, generator=g) * 4).half(), (randn(20, 16, generator=g) * 4).half()
    outs, refs = _run(q, k, torch.tensor(30.0), torch.tensor(-5.0), backend)
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        assert torch.isfinite(o).all(), f"{backend} {what}"
        assert_close(o, r, torch.float32 if what in ("loss", "dbias") else torch.float16, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_nan_out(backend):
    q, k = randn(10, 8), randn(12, 8)
    q[3, 2] = float("nan")
    q.requires_grad_()
    out = sigmoid_pair_loss(q, k, 10.0, -10.0, backend=backend)
    assert torch.isnan(out)
    out.backward()
    assert torch.isnan(q.grad).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pair(backend):
    q, k = randn(1, 3), randn(1, 3)
    outs, refs = _run(q, k, torch.tensor(2.0), torch.tensor(0.5), backend)
    for o, r in zip(outs, refs):
        assert_close(o, r, torch.float32)


def test_bad_inputs_name_the_argument():
    q, k = randn(4, 3), randn(5, 3)
    with pytest.raises(ValueError, match="scale"):
        sigmoid_pair_loss(q, k, -1.0, 0.0)
    with pytest.raises(TypeError, match="bias"):
        sigmoid_pair_loss(q, k, 1.0, "x")
    with pytest.raises(ValueError, match="bias"):
        sigmoid_pair_loss(q, k, 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match="k"):
        sigmoid_pair_loss(q, randn(5, 4), 1.0, 0.0)
    with pytest.raises(TypeError, match="q"):
        sigmoid_pair_loss(q.long(), k, 1.0, 0.0)
    with pytest.raises(ValueError, match="backend"):
        sigmoid_pair_loss(q, k, 1.0, 0.0, backend="nope")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [200, 771])  # fused kernels, then the D-chunked strip mode
def test_cuda_triton_large(dtype, d):
    """Larger odd sizes on the GPU; outputs of the kernels are checked against poisoned buffers."""
    from fastcl.kernels.sigmoid_pair import sigmoid_pair_backward, sigmoid_pair_forward
    g = torch.Generator().manual_seed(17)
    n, m = 1031, 2053
    q = F.normalize(randn(n, d, generator=g), dim=1).to(dtype).cuda()
    k = F.normalize(randn(m, d, generator=g), dim=1).to(dtype).cuda()
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    # Poison the allocator: freed NaN blocks would leak into any output not fully written.
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk
    outs, refs = _run(q, k, scale, bias, "triton")
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        assert_close(o.cpu(), r.cpu(), dtype, f"cuda {what}")
    torch.cuda.synchronize()
    loss = sigmoid_pair_forward(q, k, scale, bias)
    dq, dk, qgq, gsum = sigmoid_pair_backward(q, k, scale, bias, scale, dtype)
    assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.isfinite(qgq) and torch.isfinite(gsum)


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@needs_triton
@pytest.mark.parametrize("check,args", [
    (test_value_and_grads, (torch.float32, 67, 131, 40)),
    (test_value_and_grads, (torch.bfloat16, 67, 131, 40)),
    (test_value_and_grads, (torch.float16, 33, 17, 24)),
    (test_extreme_values_stay_finite, (100.0, -50.0)),
    (test_extreme_values_stay_finite, (1e4, 5e3)),
    (test_tiny_terms_keep_relative_precision, ()),
    (test_fp16_large_logits, ()),
    (test_nan_in_nan_out, ()),
    (test_single_pair, ()),
], ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("mode", ["strip", "fused"])
def test_triton_forced_modes(monkeypatch, check, args, mode):
    # FASTCL_TRITON_BWD=strip: D-chunked forward and the cuBLAS strip backward (auto above D=256
    # and for fp32); =fused: the whole-D kernels (auto for bf16/fp16 up to D=256).
    monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
    check("triton", *args)


@needs_triton
def test_triton_sigmoid_mode(monkeypatch):
    from fastcl.kernels.sigmoid_pair import sigmoid_mode
    q = torch.empty(4, 257, dtype=torch.bfloat16)
    assert sigmoid_mode(q) == "strip" and sigmoid_mode(q[:, :256]) == "fused"
    assert sigmoid_mode(q[:, :256].half()) == "fused"
    assert sigmoid_mode(q[:, :64].float()) == "strip"  # fp32 fused kernels spill on sm_90
    monkeypatch.setenv("FASTCL_TRITON_BWD", "fused")
    assert sigmoid_mode(q) == "fused" and sigmoid_mode(torch.empty(4, 1024)) == "fused"
    with pytest.raises(ValueError, match="D <= 1024"):  # whole-D blocks would not fit shared memory
        sigmoid_mode(torch.empty(4, 1025, dtype=torch.bfloat16))
    monkeypatch.setenv("FASTCL_TRITON_BWD", "nope")
    with pytest.raises(ValueError, match="FASTCL_TRITON_BWD"):
        sigmoid_mode(q)


@needs_triton
def test_triton_strip_mode_several_strips(monkeypatch):
    # A 64 KB budget holds one 64-row strip of all 131 columns (17 KB tile, 20 KB of fp32 rows of
    # D, 21 KB of Gk): 67 rows take two strips.
    from fastcl.ops import strips
    monkeypatch.setattr(strips, "WORKSPACE_MB", 1 / 16)
    monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    test_value_and_grads("triton", torch.float32, 67, 131, 40)


@needs_triton
def test_triton_strip_forward_in_column_ranges(monkeypatch):
    # Few row blocks on a GPU split the columns into ranges; each (row block, range) program adds
    # its own partial sum.  Forced here: three ranges for M = 131, of 64 columns (whole tiles) and
    # of 48 (ending inside the interpreter's 64-column tiles).
    from fastcl.kernels import similarity_lse as K
    monkeypatch.setattr(K, "forward_column_splits", lambda row_blocks, sms: 3)
    monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    for align in (64, 16):
        monkeypatch.setattr(K, "SPLIT_ALIGN", align)
        test_value_and_grads("triton", torch.float32, 67, 131, 40)
        test_value_and_grads("triton", torch.bfloat16, 67, 131, 40)


def _elementwise_kernel():
    """A Triton kernel applying the sigmoid kernels' ``_softplus`` and ``_sigmoid`` to a vector (a
    jit function finds its callees in its module's globals: imported at the top)."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(t_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs, mask=offs < n, other=0.0)
        tl.store(sp_ptr + offs, _softplus(t), mask=offs < n)
        tl.store(sg_ptr + offs, _sigmoid(t), mask=offs < n)
    return apply


@needs_triton
def test_triton_softplus_and_sigmoid_elementwise():
    """The Triton kernels' softplus (a series for log1p, no libdevice log) and sigmoid, one score at
    a time against float64, over every magnitude: relative precision for the tiny terms too (an
    absolute floor would hide a lost exp(-60)), exact zero for the masked -inf, NaN kept."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter or a GPU")
    import triton
    apply = _elementwise_kernel()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mag = torch.cat([torch.logspace(-6, 2, 3001, dtype=torch.float64), torch.linspace(0, 100, 3001, dtype=torch.float64)])
    t = torch.cat([mag, -mag, torch.tensor([0.0, -0.0], dtype=torch.float64)]).float().to(dev)
    sp, sg = torch.empty_like(t), torch.empty_like(t)
    apply[(triton.cdiv(t.numel(), 1024),)](t, sp, sg, t.numel(), BLOCK=1024)
    ref_sp, ref_sg = F.softplus(t.double().cpu()), torch.sigmoid(t.double().cpu())
    tol = ELEMENT_TOL[torch.float32]["rtol"] if dev == "cuda" else MATH_RTOL_EXACT_EXP
    normal = torch.finfo(torch.float32).tiny  # below it (t < -87) fp32 has only subnormals
    for what, out, ref in (("softplus", sp, ref_sp), ("sigmoid", sg, ref_sg)):
        err = (out.double().cpu() - ref).abs()
        rel = (err / ref)[ref >= normal].max().item()
        assert rel <= tol, f"{what}: max relative error {rel:.2e} > {tol:.0e}"
        assert (err[ref < normal] <= normal).all(), f"{what}: more than fp32's smallest normal off below it"
    special = torch.tensor([float("-inf"), float("inf"), float("nan")], device=dev)
    sp, sg = torch.empty_like(special), torch.empty_like(special)
    apply[(1,)](special, sp, sg, 3, BLOCK=16)
    assert sp[0].item() == 0.0 and sg[0].item() == 0.0
    assert sp[1].item() == float("inf") and sg[1].item() == 1.0
    assert torch.isnan(sp[2]) and torch.isnan(sg[2])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["strip", "fused"])
def test_triton_whole_tiles_skip_the_bounds_select(monkeypatch, dtype, mode):
    """At sizes in whole tiles (the interpreter's 64 x 64) the kernels run without the bounds
    select, at ragged ones with it; both match the oracle."""
    from fastcl.kernels import sigmoid_pair as S
    monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
    seen = []

    def spy(name):
        kernel = getattr(S, name)

        class Spy:
            def __getitem__(self, grid):
                def call(*args, **kwargs):
                    seen.append((name, kwargs["MASK_BOUNDS"]))
                    return kernel[grid](*args, **kwargs)
                return call
        monkeypatch.setattr(S, name, Spy())
    names = ["_fwd_chunked_kernel", "_grad_strip_kernel"] if mode == "strip" else ["_fwd_kernel", "_bwd_rows_kernel"]
    for name in names:
        spy(name)
    test_value_and_grads("triton", dtype, 128, 192, 40)
    assert seen == [(name, False) for name in names] + ([] if mode == "strip" else [(names[1], False)])
    seen.clear()
    test_value_and_grads("triton", dtype, 128, 150, 40)
    # Fused: the row kernel also runs on (k, q) for G^T @ q, whose tile sums are discarded.
    assert seen == [(name, True) for name in names] + ([] if mode == "strip" else [(names[1], False)])


@needs_triton
@pytest.mark.parametrize("mode", ["fused", "strip"])
def test_triton_rows_end_inside_a_tile_while_columns_are_whole(monkeypatch, mode):
    """N = 67 ends inside the interpreter's 64-row tiles while M = 128 is whole column tiles: the
    forward must still mask the rows past N, whose zero rows would add softplus(+-bias) per column."""
    monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
    test_value_and_grads("triton", torch.float32, 67, 128, 40)
    test_value_and_grads("triton", torch.bfloat16, 67, 128, 40)
