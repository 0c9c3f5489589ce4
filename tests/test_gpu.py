"""GPU checks (skipped without CUDA): the Triton and cuda backends at larger odd sizes, every
option, both Triton backward modes, the cuda epilogues one by one against a float64 stand-in,
cuda against triton, and poisoned-memory checks that every output element is written."""
import pytest
import torch

from conftest import assert_close, fp32_output_tol
from test_similarity_lse import check_against_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["fused", "strip"])
def bwd_mode(request, monkeypatch):
    monkeypatch.setenv("FASTCL_TRITON_BWD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1000, 3001, 40), (2053, 1031, 256), (777, 1500, 3)])
def test_triton_matches_reference(bwd_mode, dtype, n, m, d):
    check_against_reference("triton", n, m, d, dtype, bias=0.3, seed=n, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_large_d_strip(dtype):
    check_against_reference("triton", 1501, 2003, 768, dtype, bias=-0.2, seed=1, device="cuda")


@pytest.mark.parametrize("offset", [None, 0, 17, -5])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_triton_options(bwd_mode, offset, rows, cols):
    check_against_reference("triton", 1000, 1337, 64, torch.bfloat16, offset=offset, rows=rows, cols=cols,
                            bias=None if offset is None else 1.5, seed=3, device="cuda")


def test_triton_large_logits():
    from conftest import GPU_LARGE_LOGITS_FACTOR
    check_against_reference("triton", 1000, 1000, 128, torch.float32, scale=100.0, bias=-10.0,
                            qk_factor=GPU_LARGE_LOGITS_FACTOR, device="cuda")


@pytest.mark.parametrize("mode,workspace_mb", [("fused", None), ("strip", None), ("strip", 1.0)])
def test_every_output_element_is_written(mode, workspace_mb, monkeypatch):
    """Fill the caching allocator's free memory with NaN first: an unwritten element shows up.
    A 1 MB workspace makes the strip backward take several column chunks."""
    from fastcl.kernels.similarity_lse import lse_forward, lse_grads
    from fastcl.ops import strips
    monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
    monkeypatch.setattr(strips, "WORKSPACE_MB", workspace_mb)
    q = torch.randn(1003, 200, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2007, 200, device="cuda", dtype=torch.bfloat16)
    scale, bias = torch.tensor(3.0, device="cuda"), torch.tensor(0.0, device="cuda")
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del poison
    row, col = lse_forward(q, k, scale, bias, True, True, 4)
    assert torch.isfinite(row).all() and torch.isfinite(col).all()
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del poison
    one = torch.ones((), device="cuda")
    dq, dk, qgq = lse_grads(q, k, scale, bias, row, col, torch.rand_like(row), torch.rand_like(col),
                            torch.rand_like(row), None, 4, one, q.dtype)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(qgq)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_clip_loss_gpu_vs_cpu_backend(backend, request):
    import fastcl
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    gen = torch.Generator().manual_seed(5)
    img, txt = torch.randn(1500, 512, generator=gen), torch.randn(1500, 512, generator=gen)
    scale = torch.tensor(10.0)
    cpu = fastcl.clip_loss(img, txt, scale, backend="cpu")
    gpu = fastcl.clip_loss(img.cuda(), txt.cuda(), scale.cuda(), backend=backend)
    assert_close(gpu.cpu(), cpu, torch.float32)
    assert fastcl.ops.resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gradient_penalty_on_gpu(backend, request):
    """create_graph=True through the GPU backends (their backward recomputes with PyTorch ops):
    first- and second-order gradients equal the reference's."""
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    import fastcl
    g = torch.Generator(device="cuda").manual_seed(9)
    base = [torch.randn(301, 48, device="cuda", generator=g) for _ in range(2)]
    got = {}
    for be in (backend, "reference"):
        q, k = (t.clone().requires_grad_() for t in base)
        scale = torch.tensor(7.0, device="cuda", requires_grad=True)
        bias = torch.tensor(-2.0, device="cuda", requires_grad=True)
        loss = fastcl.clip_loss(q, k, scale, bias, backend=be) + fastcl.siglip_loss(q, k, scale, bias, backend=be)
        first = torch.autograd.grad(loss, (q, k, scale, bias), create_graph=True)
        got[be] = first + torch.autograd.grad(sum((f * f).sum() for f in first), (q, k, scale, bias))
    flat = lambda grads: torch.cat([t.reshape(-1) for t in grads])  # noqa: E731
    assert_close(flat(got[backend][:4]), flat(got["reference"][:4]), torch.float32, f"{backend} first order")
    assert_close(flat(got[backend][4:]), flat(got["reference"][4:]), torch.float32, f"{backend} second order")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("frozen", ["image", "text"])
def test_frozen_tower_on_gpu(backend, frozen, request):
    """A locked tower (LiT) takes no gradient: the other side's and the scale's equal the reference's."""
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    import fastcl
    g = torch.Generator(device="cuda").manual_seed(4)
    base = [torch.randn(1031, 256, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2)]
    got = {}
    for be in (backend, "reference"):
        img, txt = (t.clone().requires_grad_(side != frozen) for t, side in zip(base, ("image", "text")))
        scale = torch.tensor(10.0, device="cuda", requires_grad=True)
        (fastcl.clip_loss(img, txt, scale, backend=be) + fastcl.siglip_loss(img, txt, scale, -5.0, backend=be)).backward()
        got[be] = [t.grad for t in (img, txt, scale)]
    for name, a, b in zip(("dimage", "dtext", "dscale"), got[backend], got["reference"]):
        assert (a is None) == (b is None), name
        if b is not None:
            tol = fp32_output_tol(torch.bfloat16, backend, from_tiles=True) if name == "dscale" else torch.bfloat16
            assert_close(a.float(), b.float(), tol, f"{backend} {name}, {frozen} frozen")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_another_gpu_than_the_current_one(backend, request):
    """Tensors on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 (Triton launches
    on the current device unless the op switches to the tensors' one)."""
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    import fastcl
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 8, 32, generator=g)
    img, txt = torch.randn(333, 64, generator=g), torch.randn(333, 64, generator=g)
    ref = fastcl.clip_loss(img.double(), txt.double(), 10.0, backend="reference")
    out = fastcl.clip_loss(img.to("cuda:1"), txt.to("cuda:1"), 10.0, backend=backend)
    assert out.device == torch.device("cuda", 1)
    assert_close(out.cpu().double(), ref, torch.float32, "clip loss on cuda:1")
    noise = torch.rand(96, 8, generator=g)
    kept = fastcl.random_masking(x.to("cuda:1"), 0.5, noise=noise.to("cuda:1"), backend=backend)[0]
    assert kept.device == torch.device("cuda", 1)
    assert torch.equal(kept.cpu(), fastcl.random_masking(x, 0.5, noise=noise, backend="reference")[0])


# ---------------------------------------------------------------------------------------------
# The cuda backend (cuBLAS score strips + the fused epilogues of csrc/cuda/similarity_strips.cu)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=[None, 1.0], ids=["ws_default", "ws_1MB"])
def workspace(request, monkeypatch, cuda_ext):
    """The default workspace, and 1 MB so that every problem below takes several strips."""
    from fastcl.ops import strips
    monkeypatch.setattr(strips, "WORKSPACE_MB", request.param)
    return request.param


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unchecked_gpu_scale_gives_the_formula(backend, request):
    """A CUDA tensor scale is not read on the host (no device sync), so 0 or a negative one reaches
    the kernels: value and gradients must still be the formula's, as in reference."""
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    import fastcl
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k = (torch.randn(333, 64, device="cuda", generator=g) for _ in range(2))
    for value in (0.0, -3.0):
        outs = {}
        for be in (backend, "reference"):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            scale = torch.tensor(value, device="cuda", requires_grad=True)
            loss = fastcl.clip_loss(qq, kk, scale, backend=be)
            loss.backward()
            outs[be] = (loss, qq.grad, kk.grad, scale.grad)
        for what, o, r in zip(("loss", "dq", "dk", "dscale"), outs[backend], outs["reference"]):
            assert_close(o, r, torch.float32, f"{backend} {what} at scale {value}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(1000, 3001, 40), (2053, 1031, 256), (777, 1500, 3), (67, 131, 40), (1, 2, 3)])
def test_cuda_matches_reference(workspace, dtype, n, m, d):
    check_against_reference("cuda", n, m, d, dtype, bias=0.3, seed=n, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_d(cuda_ext, dtype):
    check_against_reference("cuda", 1501, 2003, 768, dtype, bias=-0.2, seed=1, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [None, 0, 17, -5, 5000])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_cuda_options(workspace, dtype, offset, rows, cols):
    check_against_reference("cuda", 1000, 1337, 64, dtype, offset=offset, rows=rows, cols=cols,
                            bias=None if offset is None else 1.5, seed=3, device="cuda")


def test_cuda_large_logits(cuda_ext):
    from conftest import GPU_LARGE_LOGITS_FACTOR
    check_against_reference("cuda", 1000, 1000, 128, torch.float32, scale=100.0, bias=-10.0,
                            qk_factor=GPU_LARGE_LOGITS_FACTOR, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [None, 3])
def test_cuda_agrees_with_triton(cuda_ext, dtype, offset):
    """Two independent GPU implementations: outputs and gradients within the dtype's tolerance."""
    from fastcl.ops import similarity_lse
    gen = torch.Generator().manual_seed(9)
    q0 = torch.randn(1531, 96, generator=gen).to(dtype)
    k0 = torch.randn(2011, 96, generator=gen).to(dtype)
    res = {}
    for backend in ("triton", "cuda"):
        q, k = q0.cuda().requires_grad_(), k0.cuda().requires_grad_()
        s = torch.tensor(4.0, device="cuda", requires_grad=True)
        r, c = similarity_lse(q, k, s, 0.5, rows=True, cols=True, exclude_diagonal=offset, backend=backend)
        loss = r.sum() + 0.5 * c.sum()
        res[backend] = [r, c, *torch.autograd.grad(loss, [q, k, s])]
    for what, a, b in zip(["row", "col", "dq", "dk", "dscale"], res["cuda"], res["triton"]):
        tol = dtype if what in ("dq", "dk") else fp32_output_tol(dtype, "cuda", from_tiles=what == "dscale")
        assert_close(a, b, tol, f"cuda vs triton {what}")


def test_cuda_is_deterministic(cuda_ext):
    from fastcl.ops import similarity_lse
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3000, 64, generator=gen).cuda().requires_grad_()
    k = torch.randn(2100, 64, generator=gen).cuda().requires_grad_()

    def run():
        r, c = similarity_lse(q, k, 3.0, rows=True, cols=True, backend="cuda")
        return [r, c] + list(torch.autograd.grad(r.sum() + c.sum(), [q, k]))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_cuda_nan_and_fully_excluded(cuda_ext):
    from fastcl.ops import similarity_lse
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(67, 40, generator=gen).cuda(), torch.randn(131, 40, generator=gen).cuda()
    q[5, 3] = float("nan")
    r, c = similarity_lse(q, k, 2.0, rows=True, cols=True, backend="cuda")
    assert torch.isnan(r[5]) and torch.isfinite(torch.cat([r[:5], r[6:]])).all()
    assert torch.isnan(c).all()
    qe = torch.randn(1, 4, device="cuda", requires_grad=True)
    r = similarity_lse(qe, torch.randn(1, 4, device="cuda"), 1.0, exclude_diagonal=0, backend="cuda")
    assert r.item() == float("-inf")
    (g,) = torch.autograd.grad(r.exp().sum(), [qe])
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_every_output_element_is_written(cuda_ext, dtype, monkeypatch):
    """Poison the caching allocator's free memory with NaN, small strips so the workspace is
    reused: an element the kernels or the driver leave unwritten shows up as NaN."""
    from fastcl.ops import strips
    monkeypatch.setattr(strips, "WORKSPACE_MB", 2.0)
    for m in (2007, 2008):  # odd M: 4-byte path; M % 4 == 0: 16-byte path
        q = torch.randn(1003, 200, device="cuda", dtype=dtype)
        k = torch.randn(m, 200, device="cuda", dtype=dtype)
        scale, bias = torch.tensor(3.0, device="cuda"), torch.tensor(0.0, device="cuda")
        for rows, cols in ((True, True), (True, False), (False, True)):
            poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
            del poison
            row, col = strips.lse_forward(q, k, scale, bias, rows, cols, 4)
            assert torch.isfinite(row).all() and torch.isfinite(col).all()
            poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
            del poison
            g_row, g_col = torch.rand_like(row), torch.rand_like(col)
            g_pos = torch.rand(q.shape[0], device="cuda") if m >= q.shape[0] else None
            dq, dk, qgq = strips.lse_grads(q, k, scale, bias, row, col, g_row, g_col, g_pos, None, 4, scale, dtype)
            assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(qgq)
        poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
        del poison
        loss = strips.sigmoid_forward(q, k, scale, bias)
        dq, dk, qgq, gsum = strips.sigmoid_grads(q, k, scale, bias, scale, dtype)
        assert torch.isfinite(loss) and torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert torch.isfinite(qgq) and torch.isfinite(gsum)


# Each epilogue against the float64 stand-in, on strips whose padding columns [M, ld) hold NaN
# (a read past column M would show) and whose shapes reach both load paths, several row groups
# and column splits, and a row stride that breaks 16-byte alignment.
STRIP_SHAPES = [(37, 1028, 1028), (37, 1031, 1031), (5, 12, 13), (300, 4100, 4104), (1, 1, 1), (40, 3, 3)]


def _strip(r, m, ld, seed):
    gen = torch.Generator().manual_seed(seed)
    buf = torch.full((r, ld), float("nan"))
    buf[:, :m] = torch.randn(r, m, generator=gen) * 3
    return buf.cuda()[:, :m]


@pytest.mark.parametrize("r,m,ld", STRIP_SHAPES)
@pytest.mark.parametrize("diag", [None, 0, 3, -2, 5000])
def test_epilogue_lse_fwd(cuda_ext, r, m, ld, diag):
    from _strip_emulation import TorchEpilogues
    from fastcl.ops.strips import CudaEpilogues
    scores = _strip(r, m, ld, r + m)
    scale, bias = torch.tensor(1.7, device="cuda"), torch.tensor(-0.4, device="cuda")
    for rows, cols in ((True, True), (True, False), (False, True)):
        out = CudaEpilogues.lse_fwd(scores, scale, bias, diag, rows, cols)
        ref = TorchEpilogues.lse_fwd(scores, scale, bias, diag, rows, cols)
        for what, o, e in zip(("row", "col"), out, ref):
            assert o.shape == e.shape
            if o.numel():
                assert_close(o, e, torch.float32, f"lse_fwd {what} rows={rows} cols={cols}")


@pytest.mark.parametrize("r,m,ld", STRIP_SHAPES)
@pytest.mark.parametrize("diag", [None, 0, -2])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_epilogue_lse_bwd_in_place(cuda_ext, r, m, ld, diag, out_dtype):
    from _strip_emulation import TorchEpilogues
    from fastcl.ops.strips import CudaEpilogues, inplace_view
    scale, bias = torch.tensor(1.7, device="cuda"), torch.tensor(-0.4, device="cuda")
    base = _strip(r, m, ld, 7 * r + m)
    row, col = TorchEpilogues.lse_fwd(base, scale, bias, diag, True, True)
    if r > 2:  # a fully excluded row / column (LSE = -inf) must give zero terms
        row[1], col[0] = float("-inf"), float("-inf")
    g_row, g_col = torch.rand_like(row) + 0.1, torch.rand_like(col) + 0.1
    for stats in ((row, g_row, col, g_col), (row, g_row, None, None), (None, None, col, g_col)):
        # A fresh strip with the same padded layout (NaN padding) for each call.
        got = torch.as_strided(torch.full((r * ld,), float("nan"), device="cuda"), (r, m), (ld, 1)).copy_(base)
        want = got.clone()
        CudaEpilogues.lse_bwd(got, scale, bias, diag, *stats, out_dtype)
        TorchEpilogues.lse_bwd(want, scale, bias, diag, *stats, out_dtype)
        a, b = inplace_view(got, out_dtype), inplace_view(want, out_dtype)
        assert torch.isfinite(a).all(), "an element of the gradient tile was not written"
        assert_close(a, b, out_dtype, f"lse_bwd in place ({out_dtype})")


@pytest.mark.parametrize("r,m,ld", STRIP_SHAPES)
@pytest.mark.parametrize("diag", [0, 3, 5000])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_epilogue_sigmoid(cuda_ext, r, m, ld, diag, out_dtype):
    from _strip_emulation import TorchEpilogues
    from fastcl.ops.strips import CudaEpilogues, inplace_view
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    got = _strip(r, m, ld, r * m + 1)
    want = torch.empty((r, m), device="cuda").copy_(got)
    assert_close(CudaEpilogues.sigmoid_fwd(got, scale, bias, diag),
                 TorchEpilogues.sigmoid_fwd(want, scale, bias, diag), torch.float32, "sigmoid_fwd")
    s_got = CudaEpilogues.sigmoid_bwd(got, scale, bias, diag, out_dtype)
    s_want = TorchEpilogues.sigmoid_bwd(want, scale, bias, diag, out_dtype)
    assert_close(s_got, s_want, torch.float32, "sigmoid_bwd row sums")
    a, b = inplace_view(got, out_dtype), inplace_view(want, out_dtype)
    assert torch.isfinite(a).all()
    assert_close(a, b, out_dtype, "sigmoid_bwd in place")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sigmoid_matches_oracle_and_triton(workspace, dtype):
    import torch.nn.functional as F

    from test_sigmoid_pair import _run
    g = torch.Generator().manual_seed(17)
    n, m, d = 1031, 2053, 200
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).cuda()
    k = F.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype).cuda()
    scale, bias = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    outs, refs = _run(q, k, scale, bias, "cuda")
    touts, _ = _run(q, k, scale, bias, "triton")
    for what, o, r, t in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs, touts):
        # dq, dk in their dtype; the fp32 loss, dscale and dbias at fp32_output_tol's row (the input
        # dtype's for dscale, summed from gradient tiles on both GPU backends)
        tol = dtype if what in ("dq", "dk") else fp32_output_tol(dtype, "cuda", from_tiles=what == "dscale")
        assert_close(o.cpu(), r.cpu(), tol, f"cuda {what}")
        assert_close(o, t, tol, f"cuda vs triton {what}")



@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("labels", [False, True])
def test_clip_memory_stays_within_the_workspace(backend, labels, request, monkeypatch):
    """fwd + bwd of the CLIP loss at N=16384, D=512, bf16 with a 16 MB workspace: beyond the inputs
    and their gradients, the peak is the workspace plus O(N) statistics and small blocks (the
    naive loss needs about 2 GB here).  Several column chunks are taken in the backward."""
    import fastcl
    from fastcl.ops import strips
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    monkeypatch.setattr(strips, "WORKSPACE_MB", 16.0)
    n, d = 16384, 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).bfloat16()
    txt = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=gen), dim=1).bfloat16()
    img.requires_grad_()
    txt.requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    lab = torch.randperm(n, device="cuda") if labels else None

    def step():
        return torch.autograd.grad(fastcl.clip_loss(img, txt, scale, labels=lab, backend=backend), [img, txt, scale])

    step()  # compile the kernels and create cuBLAS's workspace first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(g.numel() * g.element_size() for g in grads)
    # 16 MB of scratch, 4 MB of row_dots blocks, O(N) statistics (a few 64 KB vectors) and slack.
    assert extra <= 24 * 2**20, f"{extra / 2**20:.1f} MB beyond inputs and gradients"
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_losses_with_repeated_indices_are_deterministic(backend, request):
    """Repeated positive columns (CLIP labels, InfoNCE positives) add up in a fixed order: two runs
    give the same bits, and the values and gradients match the cpu backend."""
    import fastcl
    if backend == "cuda":
        request.getfixturevalue("cuda_ext")
    gen = torch.Generator().manual_seed(11)
    n, m, d = 3001, 1200, 96
    img = (torch.randn(n, d, generator=gen) / d ** 0.5).bfloat16()  # logits of order scale
    txt = (torch.randn(m, d, generator=gen) / d ** 0.5).bfloat16()
    lab = torch.randint(0, 40, (n,), generator=gen)  # many rows share a column

    def run(device, be):
        i = img.to(device).requires_grad_()
        t = txt.to(device).requires_grad_()
        s = torch.tensor(10.0, device=device, requires_grad=True)
        lb = lab.to(device)
        out = []
        for loss, inputs in ((fastcl.clip_loss(i, t, s, labels=lb, backend=be), [i, t, s]),
                             (fastcl.info_nce(i, t, positives=lb, symmetric=True, backend=be), [i, t])):
            out += [loss, *torch.autograd.grad(loss, inputs)]
        return out

    first, second = run("cuda", backend), run("cuda", backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    names = ["clip", "clip d_img", "clip d_txt", "clip d_scale", "info_nce", "info_nce d_query", "info_nce d_keys"]
    for what, a, r in zip(names, first, run("cpu", "cpu")):
        # Losses to fp32's tolerance; gradients pass through a bf16 gradient tile on the GPU.
        assert_close(a.cpu(), r, torch.bfloat16 if " d_" in what else torch.float32, f"{backend} vs cpu: {what}")
