"""GPU checks (skipped without CUDA): the Triton backend at larger odd sizes, every option,
both backward modes, and a poisoned-memory check that every output element is written."""
import pytest
import torch

from conftest import assert_close
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
    from conftest import LARGE_LOGITS_FACTOR
    check_against_reference("triton", 1000, 1000, 128, torch.float32, scale=100.0, bias=-10.0,
                            factor=LARGE_LOGITS_FACTOR, device="cuda")


@pytest.mark.parametrize("mode", ["fused", "strip"])
def test_every_output_element_is_written(mode, monkeypatch):
    """Fill the caching allocator's free memory with NaN first: an unwritten element shows up."""
    from fastcl.kernels.similarity_lse import lse_backward, lse_forward
    monkeypatch.setenv("FASTCL_TRITON_BWD", mode)
    q = torch.randn(1003, 200, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2007, 200, device="cuda", dtype=torch.bfloat16)
    scale, bias = torch.tensor(3.0, device="cuda"), torch.tensor(0.0, device="cuda")
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del poison
    row, col = lse_forward(q, k, scale, bias, True, True, 4)
    assert torch.isfinite(row).all() and torch.isfinite(col).all()
    poison = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del poison
    gq, gk = lse_backward(q, k, scale, bias, row, col, torch.rand_like(row), torch.rand_like(col), 4)
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()


def test_clip_loss_triton_vs_cpu_backend():
    import fastcl
    gen = torch.Generator().manual_seed(5)
    img, txt = torch.randn(1500, 512, generator=gen), torch.randn(1500, 512, generator=gen)
    scale = torch.tensor(10.0)
    cpu = fastcl.clip_loss(img, txt, scale, backend="cpu")
    gpu = fastcl.clip_loss(img.cuda(), txt.cuda(), scale.cuda(), backend="triton")
    assert_close(gpu.cpu(), cpu, torch.float32)
    assert fastcl.ops.resolve_backend("auto", torch.device("cuda")) == "triton"
