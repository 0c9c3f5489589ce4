"""Triton backend vs the float64 reference.  On a CPU-only machine the kernels run in the
Triton interpreter (conftest sets TRITON_INTERPRET=1), at small odd sizes."""
import pytest
import torch

from conftest import assert_close, fp32_output_tol
from fastcl.ops.dispatch import triton_available
from test_similarity_lse import check_against_reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["exact", "shared"])
def exp_mode(request, monkeypatch):
    monkeypatch.setenv("FASTCL_TRITON_EXP", request.param)
    return request.param


@pytest.fixture(params=[("fused", "exact"), ("strip", "exact"), ("fused", "shared"), ("strip", "shared")],
                ids=lambda p: "-".join(p))
def bwd_mode(request, monkeypatch):
    monkeypatch.setenv("FASTCL_TRITON_BWD", request.param[0])
    monkeypatch.setenv("FASTCL_TRITON_EXP", request.param[1])
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [3, 40])
def test_matches_reference(bwd_mode, dtype, d):
    check_against_reference("triton", 67, 131, d, dtype, bias=0.75, seed=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [None, 0, 5, -3])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_options(bwd_mode, dtype, offset, rows, cols):
    check_against_reference("triton", 67, 131, 40, dtype, offset=offset, rows=rows, cols=cols,
                            bias=None if offset is None else -0.5, seed=7)


@pytest.mark.parametrize("offset", [None, 0, 7])
@pytest.mark.parametrize("rows,cols", [(True, True), (False, True)])
def test_whole_tiles_skip_the_bounds_select(bwd_mode, offset, rows, cols, monkeypatch):
    """Sizes that are whole tiles (the interpreter's are 64 x 64) compile the forward without the
    bounds select, and the dS strips never have one; both must still match the reference."""
    from fastcl.kernels import similarity_lse as K
    seen = []
    kernel = K._lse_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def call(*args, **kwargs):
                seen.append(kwargs["MASK_BOUNDS"])
                return kernel[grid](*args, **kwargs)
            return call
    monkeypatch.setattr(K, "_lse_fwd_kernel", Spy())
    check_against_reference("triton", 128, 192, 40, torch.float32, offset=offset, rows=rows, cols=cols, bias=0.25,
                            seed=4)
    check_against_reference("triton", 128, 150, 40, torch.float32, offset=offset, rows=rows, cols=cols, bias=0.25,
                            seed=5)
    assert seen == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["diagonal", "index"])
def test_positive_logits(bwd_mode, dtype, which):
    from test_similarity_lse import positive_index
    positives = True if which == "diagonal" else positive_index(67, 131, 2)
    check_against_reference("triton", 67, 131, 40, dtype, bias=0.5, offset=0, positives=positives, seed=9)


def test_small_and_fully_excluded(exp_mode):
    check_against_reference("triton", 1, 2, 3, torch.float32)
    from fastcl.ops import similarity_lse
    r = similarity_lse(torch.randn(1, 4), torch.randn(1, 4), 1.0, exclude_diagonal=0, backend="triton")
    assert r.item() == float("-inf")


def test_nan_in_gives_nan_out(exp_mode):
    from fastcl.ops import similarity_lse
    q, k = torch.randn(67, 40), torch.randn(131, 40)
    q[5, 3] = float("nan")
    r, c = similarity_lse(q, k, 2.0, rows=True, cols=True, backend="triton")
    assert torch.isnan(r[5]) and torch.isfinite(torch.cat([r[:5], r[6:]])).all()
    assert torch.isnan(c).all()


def test_rejects_float64():
    from fastcl.ops import similarity_lse
    with pytest.raises(TypeError, match="float64"):
        similarity_lse(torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 1.0,
                       backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_loss_triton_matches_float64_oracle(dtype):
    """The CLIP loss on the triton backend against its definition in float64 (the mean of half the
    row and column LSEs minus the positive logit): value and the gradients of both towers and of
    the scale."""
    import fastcl
    from test_similarity_lse import oracle_lse, oracle_positives
    gen = torch.Generator().manual_seed(3)
    img, txt = torch.randn(67, 40, generator=gen).to(dtype), torch.randn(67, 40, generator=gen).to(dtype)
    scale = torch.tensor(4.0)
    ours = [t.clone().requires_grad_() for t in (img, txt, scale)]
    refs = [t.double().requires_grad_() for t in (img, txt, scale)]
    loss = fastcl.clip_loss(*ours, backend="triton")
    row, col = oracle_lse(*refs, rows=True, cols=True)
    ref = (0.5 * (row + col) - oracle_positives(refs[0], refs[1], None, refs[2])).mean()
    assert_close(loss, ref, fp32_output_tol(dtype), "value")
    d_img, d_txt, d_scale = torch.autograd.grad(loss, ours)
    r_img, r_txt, r_scale = torch.autograd.grad(ref, refs)
    assert_close(d_img, r_img, dtype, "d img", elementwise=True)
    assert_close(d_txt, r_txt, dtype, "d txt", elementwise=True)
    assert_close(d_scale, r_scale, fp32_output_tol(dtype, "triton", from_tiles=True), "d scale")


@pytest.mark.parametrize("rows,cols", [(True, True), (False, True)])
def test_columns_far_below_the_tile_maximum(bwd_mode, rows, cols):
    # The shared-exp kernels must fall back to the exact form where one dominant row puts the
    # tile maximum (and its LSE) hundreds above most columns' (see the same test for the cpu).
    from test_similarity_lse import _compare_fixed
    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(67, 8, generator=gen), torch.randn(131, 8, generator=gen)
    q[0] = 0.0
    q[0, 0] = 40.0
    k[:3, 0] = torch.tensor([3.0, 2.9, 2.6])
    _compare_fixed("triton", q, k, 2.5, rows=rows, cols=cols)


@pytest.mark.parametrize("offset", [None, 3])
def test_autotuned_launches_match_reference(monkeypatch, offset):
    # FASTCL_TRITON_AUTOTUNE=1: the forward and strip kernels pick among launch shapes (two in
    # the interpreter, BLOCK_M 64 and 32); whichever wins, results must be right.
    from fastcl.kernels import similarity_lse as K
    monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    check_against_reference("triton", 67, 131, 40, torch.float32, offset=offset, bias=0.5, seed=31)
    tuned = [K._TUNED[key] for key in K._TUNED if key[1]]
    assert len(tuned) == 2 and all(t.best_config.kwargs["BLOCK_M"] in (32, 64) for t in tuned)
    monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="FASTCL_TRITON_AUTOTUNE must be 0 or 1"):
        K.autotune_enabled()


def test_tile_override_sets_the_gpu_launch_shape(monkeypatch):
    """FASTCL_TRITON_TILE replaces the fixed GPU launch shape (a meta tensor stands in for a CUDA
    one); the interpreter keeps its small tiles; bad values raise an error naming the variable."""
    from fastcl.kernels import similarity_lse as K
    gpu_like = torch.empty(4, 768, dtype=torch.bfloat16, device="meta")
    default = K._config(gpu_like)
    assert (default["BLOCK_M"], default["BLOCK_N"], default["BLOCK_D"]) == K.HALF_SHAPES["lse"][:3] == (64, 128, 64)
    assert default["launch"] == {"num_warps": 4, "num_stages": 3}
    for role in ("lse_rows", "sigmoid"):  # the row-only forward and the sigmoid strips keep 128 x 128
        assert K.gpu_launch_shape(torch.bfloat16, role=role) == (128, 128, 64, 8, 3)
    assert K.gpu_launch_shape(torch.float32, role="lse_rows") == K.gpu_launch_shape(torch.float32)
    with pytest.raises(ValueError, match="role must be one of"):
        K.gpu_launch_shape(torch.bfloat16, role="rows")
    monkeypatch.setenv("FASTCL_TRITON_TILE", "64,128,32,4,2")
    cfg = K._config(gpu_like)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"]) == (64, 128, 32)
    assert cfg["launch"] == {"num_warps": 4, "num_stages": 2}
    assert K._config(torch.empty(4, 3, dtype=torch.bfloat16, device="meta"))["BLOCK_D"] == 16  # D=3
    assert K._config(torch.empty(4, 768))["BLOCK_M"] == 64  # the interpreter's shape
    assert not K._config(torch.empty(4, 768))["FAST_LOG"]
    # A sixth value caps the forward's registers per thread (ptxas .maxnreg).
    monkeypatch.setenv("FASTCL_TRITON_TILE", "128,128,32,8,3,128")
    assert K._config(gpu_like)["fwd_launch"] == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert K.gpu_launch_shape(torch.bfloat16) == (128, 128, 32, 8, 3, 128)
    for bad in ("64,128,32,4", "64,100,32,4,2", "64,128,32,3,2", "64,128,32,4,0", "a,b,c,d,e", "8,128,32,4,2",
                "128,128,32,8,3,16", "128,128,32,8,3,256", "128,128,32,8,3,128,1"):
        monkeypatch.setenv("FASTCL_TRITON_TILE", bad)
        with pytest.raises(ValueError, match="FASTCL_TRITON_TILE"):
            K._config(gpu_like)


def test_register_cap_reaches_the_forward_only(monkeypatch):
    """FASTCL_TRITON_TILE's sixth value and the autotuner's capped shape cap the forward's registers;
    the dS kernel (and the sigmoid strips, which share ``launch``) would spill under the cap."""
    from fastcl.kernels import similarity_lse as K
    gpu_like = torch.empty(4, 768, dtype=torch.bfloat16, device="meta")
    monkeypatch.setenv("FASTCL_TRITON_TILE", "128,128,32,8,3,128")
    cfg = K._config(gpu_like)
    assert cfg["fwd_launch"] == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert cfg["launch"] == {"num_warps": 8, "num_stages": 3}
    monkeypatch.setattr(K, "_TUNED", {})
    capped = [c.maxnreg for c in K._tuned(K._lse_fwd_kernel, ["N"], False).configs]
    uncapped = [c.maxnreg for c in K._tuned(K._dscore_strip_kernel, ["N_STRIP"], False).configs]
    assert capped == [sh[5] if len(sh) > 5 else None for sh in K.TUNE_SHAPES] and 128 in capped
    assert uncapped == [None] * len(K.TUNE_SHAPES)


def test_hardware_log_is_off_whenever_interpreting(monkeypatch):
    # libdevice.fast_log2f does not exist in the interpreter, also when it runs CUDA tensors.
    from fastcl.kernels import similarity_lse as K
    gpu_like = torch.empty(4, 768, dtype=torch.bfloat16, device="meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not K._config(gpu_like)["FAST_LOG"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K._config(gpu_like)["FAST_LOG"]


def test_exp_mode_env_is_checked(monkeypatch):
    from fastcl.kernels.similarity_lse import exp_mode
    monkeypatch.setenv("FASTCL_TRITON_EXP", "bogus")
    with pytest.raises(ValueError, match="FASTCL_TRITON_EXP must be exact or shared"):
        exp_mode()
    monkeypatch.delenv("FASTCL_TRITON_EXP")
    assert exp_mode() == "exact"


def test_backward_mode_env_is_checked(monkeypatch):
    from fastcl.kernels.similarity_lse import backward_mode
    monkeypatch.setenv("FASTCL_TRITON_BWD", "bogus")
    with pytest.raises(ValueError, match="FASTCL_TRITON_BWD must be auto, fused or strip"):
        backward_mode(64)
    monkeypatch.setenv("FASTCL_TRITON_BWD", "fused")
    with pytest.raises(ValueError, match="FASTCL_TRITON_BWD=fused supports D <= 256"):
        backward_mode(512)
    monkeypatch.setenv("FASTCL_TRITON_BWD", "auto")
    assert backward_mode(64) == "strip"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strip_backward_holds_a_large_scaled_gradient(dtype):
    """Logit scale 100 times a loss-scaled upstream gradient of 700 per row: the scaled tile's
    largest entries (about 7e4) overflow fp16 (65504) while dq itself fits, so fp16 keeps the
    generic tiles (the scale goes on in fp32 afterwards); bf16 tiles take the scale in the kernel.
    Both match the float64 formula."""
    gen = torch.Generator().manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen), dim=1).to(dtype)
    scale, bias = torch.tensor(100.0), torch.tensor(0.0)
    row, col, _ = torch.ops.fastcl.similarity_lse_fwd(q, k, scale, bias, True, False, None, False, None, "triton")
    g_row = torch.full((20,), 700.0)
    dq, dk, qgq = torch.ops.fastcl.similarity_lse_bwd(q, k, scale, bias, row, col, g_row, torch.zeros(0),
                                                      torch.empty(0), None, None, scale, dtype, True, True, "triton")
    q64, k64, s64 = (t.double().requires_grad_() for t in (q, k, scale))
    total = 700.0 * torch.logsumexp(s64 * q64 @ k64.T, 1).sum()
    rq, rk, rs = torch.autograd.grad(total, (q64, k64, s64))
    assert (100 * 700 * torch.softmax(100 * q64 @ k64.T, 1)).max() > 65504 > max(rq.abs().max(), rk.abs().max())
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(qgq)
    assert_close(dq, rq, dtype, "dq")
    assert_close(dk, rk, dtype, "dk")
    assert_close(qgq, rs, dtype, "qgq")
