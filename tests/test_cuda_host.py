"""The CUDA kernels of csrc/cuda run on the CPU (tests/_cuda_host.py), one by one.

The strip epilogues against the float64 stand-in (tests/_strip_emulation.py) on strips whose
padding columns hold NaN, so a read past column M shows; the 16-byte and the scalar paths; the
partial buffers and merges of the forward; the in-place gradient tile in every output dtype;
both thread orders.  The masking kernel against the C++ CPU kernel, bit for bit.  And the
emulation itself: it must catch a kernel with a barrier taken out, and a misaligned vector
access (a launch failure here).  The driver and the masking ops with these kernels:
tests/test_cuda_strips.py and tests/test_masking.py."""
import pytest
import torch

import _cuda_host
from _strip_emulation import TorchEpilogues
from conftest import ELEMENT_TOL, assert_close
from fastcl._ext import extension_available
from fastcl.ops.masking import csr_segments
from fastcl.ops.strips import inplace_view

pytestmark = pytest.mark.skipif(_cuda_host.compiler() is None, reason="needs a C++ compiler")

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (R, M, layout): "vec" has 16-byte aligned rows (the vector path), "pad" a row stride of M + 3,
# "shift" a base one float off alignment; both of those take the scalar path.
STRIPS = [(67, 131, "pad"), (64, 132, "vec"), (33, 1029, "shift"), (40, 2100, "vec"), (5, 3, "pad"),
          (1, 1, "pad")]
SCALE, BIAS = torch.tensor(2.5), torch.tensor(-0.75)


@pytest.fixture(autouse=True, params=[False, True], ids=["ascending", "descending"])
def thread_order(request):
    _cuda_host.set_reverse(request.param)
    yield request.param
    _cuda_host.set_reverse(False)


def strip(r, m, layout, seed=0):
    """(R, M) fp32 scores in a NaN-padded buffer, laid out as ``layout`` says."""
    g = torch.Generator().manual_seed(seed + r * 7 + m)
    ld = m + 3 if layout == "pad" else m
    shift = 1 if layout == "shift" else 0
    buf = torch.full((r * ld + shift + 8,), float("nan"))
    view = buf[shift:shift + r * ld].view(r, ld)[:, :m]
    view.copy_(torch.randn(r, m, generator=g) * 3)
    return view, buf


def assert_tile_close(got, ref, dtype, what):
    """The norm check of every test, then element by element: a stale or skipped element fails."""
    assert_close(got, ref, dtype, what)
    torch.testing.assert_close(got.float(), ref.float(), **ELEMENT_TOL[dtype], msg=lambda m: f"{what}: {m}")


def diag_of(r, m):
    return [None, 0, min(r, m) // 2, -1]


@pytest.mark.parametrize("r,m,layout", STRIPS)
@pytest.mark.parametrize("sm_count", [1, 64])
def test_lse_fwd(r, m, layout, sm_count, monkeypatch):
    monkeypatch.setattr(_cuda_host.HostEpilogues, "sm_count", sm_count)
    scores, _ = strip(r, m, layout)
    for diag in diag_of(r, m):
        for rows, cols in ((True, True), (True, False), (False, True)):
            got = _cuda_host.HostEpilogues.lse_fwd(scores, SCALE, BIAS, diag, rows, cols)
            ref = TorchEpilogues.lse_fwd(scores, SCALE, BIAS, diag, rows, cols)
            for what, g, e in zip(("row", "col"), got, ref):
                assert_close(g, e, torch.float32, f"{what} lse, diag {diag}")


def test_lse_fwd_partials_are_exercised():
    """The shapes above reach both merges: several column splits and several row groups."""
    plans = {}
    for r, m, _ in STRIPS:
        for sms in (1, 64):
            plan = torch.zeros(3, dtype=torch.int64)
            _cuda_host.library().host_lse_fwd_plan(r, m, sms, plan.data_ptr())
            plans[r, m, sms] = plan.tolist()
    assert any(groups > 1 and splits > 1 for groups, splits, _ in plans.values()), plans


def test_lse_fwd_nan_and_excluded():
    scores, _ = strip(20, 37, "pad")
    scores[3, 5] = float("nan")
    scores[4, 4] = float("nan")  # on the excluded diagonal: ignored
    row, col = _cuda_host.HostEpilogues.lse_fwd(scores, SCALE, BIAS, 0, True, True)
    assert torch.isnan(row[3]) and torch.isnan(col[5])
    rest_rows, rest_cols = torch.ones(20, dtype=torch.bool), torch.ones(37, dtype=torch.bool)
    rest_rows[3], rest_cols[5] = False, False
    assert torch.isfinite(row[rest_rows]).all() and torch.isfinite(col[rest_cols]).all()
    # A single excluded entry: the empty set, -inf.
    one, _ = strip(1, 1, "pad")
    row, col = _cuda_host.HostEpilogues.lse_fwd(one, SCALE, BIAS, 0, True, True)
    assert row.item() == float("-inf") and col.item() == float("-inf")


@pytest.mark.parametrize("r,m,layout", STRIPS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_lse_bwd(r, m, layout, out_dtype):
    g = torch.Generator().manual_seed(r + m)
    for diag in diag_of(r, m):
        scores, buf = strip(r, m, layout)
        row_lse, col_lse = TorchEpilogues.lse_fwd(scores, SCALE, BIAS, diag, True, True)
        g_row, g_col = torch.randn(r, generator=g), torch.randn(m, generator=g)
        for sides in ("rows", "cols", "both"):
            stats = (row_lse, g_row) if sides != "cols" else (None, None)
            stats += (col_lse, g_col) if sides != "rows" else (None, None)
            got, ref = scores.clone(), scores.clone()  # clone: contiguous, the vector path
            if layout != "vec":  # keep the layout under test: work in the buffer itself
                got = scores
                buf_before = buf.clone()
            _cuda_host.HostEpilogues.lse_bwd(got, SCALE, BIAS, diag, *stats, out_dtype)
            TorchEpilogues.lse_bwd(ref, SCALE, BIAS, diag, *stats, out_dtype)
            assert_tile_close(inplace_view(got, out_dtype), inplace_view(ref, out_dtype), out_dtype, f"dS {sides}")
            if layout != "vec":
                if out_dtype == torch.float32:  # nothing outside the tile was written
                    outside = torch.isnan(buf_before) & ~torch.isnan(buf)
                    assert not outside.any()
                scores.copy_(strip(r, m, layout)[0])


def test_lse_bwd_fully_excluded_row_is_zero():
    scores, _ = strip(1, 1, "pad")
    _cuda_host.HostEpilogues.lse_bwd(scores, SCALE, BIAS, 0, torch.tensor([float("-inf")]), torch.ones(1),
                                     None, None, torch.float32)
    assert scores.item() == 0.0


@pytest.mark.parametrize("r,m,layout", STRIPS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_sigmoid(r, m, layout, out_dtype):
    for diag in (0, min(r, m) - 1, -2, m + 5):
        scores, buf = strip(r, m, layout, seed=diag)
        fwd = _cuda_host.HostEpilogues.sigmoid_fwd(scores, SCALE, BIAS, diag)
        assert_close(fwd, TorchEpilogues.sigmoid_fwd(scores, SCALE, BIAS, diag), torch.float32, "loss rows")
        ref, buf_before = scores.clone(), buf.clone()
        rs = _cuda_host.HostEpilogues.sigmoid_bwd(scores, SCALE, BIAS, diag, out_dtype)
        ref_rs = TorchEpilogues.sigmoid_bwd(ref, SCALE, BIAS, diag, out_dtype)
        assert_close(rs, ref_rs, torch.float32, "grad row sums")
        assert_tile_close(inplace_view(scores, out_dtype), inplace_view(ref, out_dtype), out_dtype, "G")
        if out_dtype == torch.float32 and layout != "vec":  # nothing outside the tile was written
            assert not (torch.isnan(buf_before) & ~torch.isnan(buf)).any()


def test_bad_arguments_are_an_error_not_a_crash():
    scores, _ = strip(3, 5, "pad")
    with pytest.raises(RuntimeError, match="lse_bwd launch failed: invalid argument"):  # LSE without gradient
        _cuda_host.HostEpilogues.lse_bwd(scores, SCALE, BIAS, None, torch.zeros(3), None, None, None, torch.float32)


# ---- the masking kernel against the C++ CPU kernel --------------------------------------------

needs_cpu_kernel = pytest.mark.skipif(not extension_available(), reason="needs the C++ extension")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [3, 8, 129, 768])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "shifted"])
def test_segment_gather_matches_the_cpu_kernel(dtype, D, layout):
    op = torch.ops.fastcl_C.masking_segment_gather
    g = torch.Generator().manual_seed(D)
    B, L, K = 3, 13, 6
    extra = {"contiguous": 0, "row-strided": 1, "shifted": 1}[layout]
    base = torch.randn(B, L, D + extra, generator=g).to(dtype)
    x = base[..., 1:] if layout == "shifted" else base[..., :D]  # shifted: every row off alignment
    idx = torch.randint(0, L, (B, K), generator=g)
    pos = torch.randn(L, D, generator=g).to(dtype)
    fill = torch.randn(D, generator=g).to(dtype)
    restore = torch.argsort(torch.rand(B, L, generator=g), dim=1)
    grad = torch.randn(B, K, D, generator=g).to(dtype)
    start, count, order = csr_segments(idx, L)
    calls = [(x, idx, None, None, None, None, False),         # gather (row copy)
             (x, idx, None, None, None, pos, False),          # gather + pos embedding
             (x[:, :K], restore, None, None, fill, None, False),  # un-shuffle with a fill token
             (x, idx, None, None, None, None, True),          # wider output
             (grad, start, count, order, None, None, True),   # segment sums (repeated indices)
             (grad, start, count, order, None, None, False)]
    for args in calls:
        got, ref = _cuda_host.host_segment_gather(*args), op(*args)
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_segment_gather_bad_index_gives_the_fill():
    """The host validates indices; a bad one reaching the kernel gives the fill, not a wild read."""
    x = torch.randn(1, 4, 8)
    fill = torch.full((8,), 7.0)
    out = _cuda_host.host_segment_gather(x, torch.tensor([[1, 4, -1, 2]]), None, None, fill, None, False)
    assert torch.equal(out[0, [0, 3]], x[0, [1, 2]]) and (out[0, [1, 2]] == 7.0).all()
    order = torch.tensor([[0, 9, 1]])
    out = _cuda_host.host_segment_gather(x, torch.tensor([[0]]), torch.tensor([[3]]), order, None, None, False)
    assert torch.equal(out[0, 0], x[0, 0] + x[0, 1])  # a bad row of a segment is left out
    out = _cuda_host.host_segment_gather(x, torch.tensor([[1]]), torch.tensor([[3]]), order, None, None, False)
    assert (out == 0).all()  # a segment reaching past the order is dropped whole


def test_routed_masking_runs_the_kernel(monkeypatch):
    """backend="cuda" on CPU tensors really reaches the compiled kernel (tests/test_masking.py)."""
    from fastcl.masking import random_masking
    _cuda_host.route_to_host(monkeypatch)
    before = _cuda_host.launches()
    x = torch.randn(2, 9, 5, requires_grad=True)
    kept = random_masking(x, 0.5, backend="cuda")[0]
    kept.sum().backward()
    assert _cuda_host.launches() - before == 2


# ---- the emulation catches what a GPU would get wrong ------------------------------------------

def test_emulation_catches_a_missing_barrier(tmp_path):
    """Without the __syncwarp between its loads and its in-place narrower stores, the backward
    tile goes wrong; without the __syncthreads before the warp partials merge, the row LSE does."""
    src = (_cuda_host.CUDA_DIR / "similarity_strips.cu").read_text()
    for barrier in ("if (WRITE) __syncwarp();", "__syncthreads();"):
        assert src.count(barrier) == 1
        src = src.replace(barrier, "")
    lib = _cuda_host.load(_cuda_host.build({"similarity_strips.cu": src}))
    r, m = 67, 1024  # every warp of a forward block holds columns of each row
    scores, _ = strip(r, m, "vec")
    ref = scores.clone()
    row_lse, col_lse = TorchEpilogues.lse_fwd(scores, SCALE, BIAS, None, True, True)
    stats = (row_lse, torch.ones(r), col_lse, torch.ones(m))
    with _cuda_host.using(lib):
        lib.host_set_reverse(0)  # ascending: the order in which the missing __syncthreads shows
        row, _ = _cuda_host.HostEpilogues.lse_fwd(scores, SCALE, BIAS, None, True, False)
        _cuda_host.HostEpilogues.lse_bwd(scores, SCALE, BIAS, None, *stats, torch.bfloat16)
    TorchEpilogues.lse_bwd(ref, SCALE, BIAS, None, *stats, torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close(row, row_lse, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(inplace_view(scores, torch.bfloat16), inplace_view(ref, torch.bfloat16), torch.bfloat16)


def test_emulation_enforces_launch_bounds():
    """A block bigger than the kernel's __launch_bounds__ does not launch on a GPU, nor here."""
    src = (_cuda_host.CUDA_DIR / "similarity_strips.cu").read_text()
    launch = "lse_fwd_kernel<VEC, ROWS, COLS><<<grid, kFwdThreads, 0, stream>>>"
    assert launch in src
    lib = _cuda_host.load(_cuda_host.build({"similarity_strips.cu": src.replace(
        launch, "lse_fwd_kernel<VEC, ROWS, COLS><<<grid, 2 * kFwdThreads, 0, stream>>>")}))
    scores, _ = strip(20, 37, "pad")
    with _cuda_host.using(lib), pytest.raises(RuntimeError, match="lse_fwd launch failed: invalid configuration"):
        _cuda_host.HostEpilogues.lse_fwd(scores, SCALE, BIAS, None, True, True)


def test_emulation_catches_a_misaligned_vector_access():
    """A 16-byte load from an address that is not 16-byte aligned faults on a GPU; here the
    alignment check fails the launch."""
    src = (_cuda_host.CUDA_DIR / "similarity_strips.cu").read_text()
    always = "inline bool can_vectorise(const StripArgs& a) { return true || "
    src = src.replace("inline bool can_vectorise(const StripArgs& a) { return ", always)
    assert always in src
    lib = _cuda_host.load(_cuda_host.build({"similarity_strips.cu": src}))
    scores, _ = strip(33, 1028, "shift")
    with _cuda_host.using(lib), pytest.raises(RuntimeError, match="lse_fwd launch failed: misaligned address"):
        _cuda_host.HostEpilogues.lse_fwd(scores, SCALE, BIAS, None, True, True)
