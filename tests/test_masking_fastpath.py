"""The Triton row-copy fast path of the masking segment gather (``_row_copy_kernel``: no ``count``).

Every forward of the masking ops and the backward of ``random_masking`` take this path, so each
test compares it bit for bit with MAE's recipe (or with the general CSR kernel) at sizes chosen
to hit its edges: D that is not a multiple of the column block (3, 129), D = 768 (three full
column blocks), flat row counts B * R that are not a multiple of ROWS, empty and full masks,
every dtype, strided input, and launch shapes forced small so that several row and column
blocks meet in one call.  Runs on CUDA tensors when there is a GPU, else in the interpreter."""
import pytest
import torch

from conftest import DTYPES, randn
from fastcl.masking import random_masking, restore_tokens
from fastcl.ops.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def km():
    from fastcl.kernels import masking
    return masking


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN payloads and the sign of zero included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def assert_same_fwd_bwd(kept, r_kept, x1, x2, g):
    """``kept`` equals MAE's ``r_kept`` bit for bit, and so do the gradients they send back to
    their leaves ``x1`` and ``x2`` for one random upstream gradient drawn from ``g``."""
    assert bits_equal(kept, r_kept)
    up = randn(*kept.shape, dtype=kept.dtype, device=DEV, generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert bits_equal(x1.grad, x2.grad)


def mae_masking(x, ratio, noise):
    """MAE's random_masking: argsort the noise, gather with a repeated (B, K, D) int64 index."""
    B, L, D = x.shape
    keep = int(L * (1 - ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = torch.gather(x, 1, shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
    return kept, restore, shuffle[:, :keep]


def mae_restore(kept, token, restore):
    B, K, D = kept.shape
    full = torch.cat([kept, token.reshape(1, 1, D).repeat(B, restore.shape[1] - K, 1)], dim=1)
    return torch.gather(full, 1, restore.unsqueeze(-1).repeat(1, 1, D))


def make_x(B, L, D, dtype, layout, g):
    """(B, L, D) tensor of ``dtype`` on DEV; "contiguous", "row_stride" (every other token),
    "batch_slice" (offset storage, batch stride) or "feature_stride" (D not unit-stride)."""
    if layout == "contiguous":
        return randn(B, L, D, dtype=dtype, device=DEV, generator=g)
    if layout == "row_stride":
        return randn(B, 2 * L, D, dtype=dtype, device=DEV, generator=g)[:, ::2]
    if layout == "batch_slice":
        return randn(2 * B, L, D + 3, dtype=dtype, device=DEV, generator=g)[1::2, :, 2:D + 2]
    return randn(B, D, L, dtype=dtype, device=DEV, generator=g).transpose(1, 2)


# ---- through the public ops, against MAE ---------------------------------------------------------

# (B, L, ratio): B * K and B * L are odd, so no flat row count is a multiple of any ROWS.
SHAPES = [(3, 37, 0.75), (5, 13, 0.0), (3, 41, 0.999), (1, 1, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 129, 768])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_L%d_r%g" % s)
def test_random_masking_fast_path_matches_mae(dtype, D, shape):
    B, L, ratio = shape
    g = gen(D * 31 + L)
    x = make_x(B, L, D, dtype, "contiguous", g)
    noise = torch.rand(B, L, generator=g).to(DEV)
    x1, x2 = leaf(x), leaf(x)
    kept, _, restore, ids_keep = random_masking(x1, ratio, noise=noise, backend="triton")
    r_kept, r_restore, r_keep = mae_masking(x2, ratio, noise)
    assert torch.equal(restore, r_restore) and torch.equal(ids_keep, r_keep)
    assert_same_fwd_bwd(kept, r_kept, x1, x2, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_stride", "batch_slice", "feature_stride"])
@pytest.mark.parametrize("D", [3, 129, 768])
def test_random_masking_fast_path_non_contiguous(dtype, layout, D):
    g = gen(D + len(layout))
    x = make_x(3, 29, D, dtype, layout, g)
    assert not x.is_contiguous()
    noise = torch.rand(3, 29, generator=g).to(DEV)
    x1, x2 = leaf(x), leaf(x)
    kept = random_masking(x1, 0.75, noise=noise, backend="triton")[0]
    r_kept = mae_masking(x2, 0.75, noise)[0]
    assert_same_fwd_bwd(kept, r_kept, x1, x2, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 129, 768])
def test_fast_path_pos_embed_rounds_once(dtype, D):
    # With pos_embed the kernel adds in fp32 and rounds once: equal to rounding x + pos.
    g = gen(D)
    B, L = 3, 23
    x = make_x(B, L, D, dtype, "contiguous", g)
    pos = randn(L, D, dtype=dtype, device=DEV, generator=g)
    noise = torch.rand(B, L, generator=g).to(DEV)
    x1, x2 = leaf(x), leaf(x)
    kept = random_masking(x1, 0.6, noise=noise, pos_embed=pos, backend="triton")[0]
    r_kept = mae_masking(x2 + pos, 0.6, noise)[0]
    assert_same_fwd_bwd(kept, r_kept, x1, x2, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 129, 768])
@pytest.mark.parametrize("keep", [0, 1, 7])
def test_restore_tokens_fast_path_fill(dtype, D, keep):
    g = gen(D + keep)
    B, L = 3, 19
    restore = torch.argsort(torch.rand(B, L, generator=g), dim=1).to(DEV)
    kept = randn(B, keep, D, dtype=dtype, device=DEV, generator=g)
    token = randn(D, dtype=dtype, device=DEV, generator=g)
    out = restore_tokens(kept, token, restore, backend="triton")
    assert bits_equal(out, mae_restore(kept, token, restore))


def test_copy_keeps_nan_payloads_and_negative_zero():
    # The pure copy moves bits: -0.0 and every NaN payload survive, in every dtype.
    for dtype, nan_bits in ((torch.bfloat16, 0x7F81), (torch.float16, 0x7C01), (torch.float32, 0x7F800001)):
        as_int = {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
        x = torch.zeros(2, 6, 5, dtype=dtype)
        x.view(as_int)[0, :, 0] = nan_bits
        x[1, :, 1] = -0.0
        x = x.to(DEV)
        noise = torch.rand(2, 6, generator=gen(0)).to(DEV)
        kept, _, _, ids_keep = random_masking(x, 0.5, noise=noise, backend="triton")
        # The oracle gathers integer views: torch.gather itself may canonicalise NaNs.
        want = torch.gather(x.view(as_int), 1, ids_keep[..., None].repeat(1, 1, 5))
        assert torch.equal(kept.view(as_int), want), dtype


def test_forward_and_masking_backward_use_the_fast_path(monkeypatch):
    # A forward or a random_masking backward that reached the CSR kernel would not test the fast path.
    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the CSR kernel ran where the row-copy kernel should")
    monkeypatch.setattr(km(), "_segment_gather_kernel", Refuse())
    x = leaf(randn(2, 9, 768, dtype=torch.bfloat16, device=DEV, generator=gen(1)))
    kept, _, restore, _ = random_masking(x, 0.75, noise=torch.rand(2, 9, generator=gen(2)).to(DEV),
                                         backend="triton")
    kept.sum().backward()
    restore_tokens(kept.detach(), torch.zeros(768, dtype=torch.bfloat16, device=DEV), restore, backend="triton")


# ---- the launcher directly: forced launch shapes, order, fp32 output, the CSR kernel as oracle -----

def reference_row_copy(src, start, order=None, fill=None, pos=None, out_fp32=False):
    """Python form of the no-count segment gather (module docstring of kernels/masking.py)."""
    B, S, D = src.shape
    J = order.shape[1] if order is not None else S
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    out_t = acc if out_fp32 else src.dtype
    out = torch.empty(B, start.shape[1], D, dtype=out_t, device=src.device)
    for b in range(B):
        for r in range(start.shape[1]):
            s = int(start[b, r])
            if 0 <= s < J:
                row = int(order[b, s]) if order is not None else s
                v = src[b, row]
                if pos is not None:
                    v = (v.to(acc) + pos[row].to(acc)).to(out_t)
                out[b, r] = v.to(out_t)
            elif fill is not None:
                out[b, r] = fill.to(out_t)
            else:
                out[b, r] = 0
    return out


CONFIGS = [None, {"ROWS": 1, "BLOCK_D": 128, "num_warps": 1}, {"ROWS": 4, "BLOCK_D": 64, "num_warps": 2},
           {"ROWS": 2, "BLOCK_D": 256, "num_warps": 4}, {"ROWS": 32, "BLOCK_D": 128, "num_warps": 4}]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "default" if c is None else "r%d_d%d" % (c["ROWS"], c["BLOCK_D"]))
@pytest.mark.parametrize("D", [3, 129, 768])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_launch_shapes_agree_with_reference(config, D, dtype):
    km_ = km()
    g = gen(D)
    B, S, R = 3, 11, 7                      # B * R = 21: a partial last row block for every ROWS > 1
    src = make_x(B, S, D, dtype, "row_stride", g)
    start = torch.randint(-2, S + 2, (B, R), generator=g).to(DEV)   # some out of range: fill
    fill = randn(D, dtype=dtype, device=DEV, generator=g)
    pos = randn(S, D, dtype=dtype, device=DEV, generator=g)
    for kw in ({}, {"fill": fill}, {"pos": pos, "fill": fill}, {"out_fp32": True}):
        out = km_.segment_gather(src, start, config=config, **kw)
        assert bits_equal(out, reference_row_copy(src, start, **kw)), kw


@pytest.mark.parametrize("D", [3, 129, 768])
def test_fast_path_with_order_and_against_csr_kernel(D):
    km_ = km()
    g = gen(D + 1)
    B, S, J, R = 2, 9, 6, 13
    src = randn(B, S, D, dtype=torch.bfloat16, device=DEV, generator=g)
    order = torch.randint(0, S, (B, J), generator=g).to(DEV)
    start = torch.randint(-1, J + 1, (B, R), generator=g).to(DEV)
    out = km_.segment_gather(src, start, order=order)
    assert bits_equal(out, reference_row_copy(src, start, order=order))
    # The CSR kernel with counts in {0, 1} computes the same thing by its own route.
    count = ((start >= 0) & (start < J)).long()
    assert bits_equal(out, km_.segment_gather(src, start.clamp(0, J - 1), count, order))


@pytest.mark.parametrize("D", [1, 2, 3, 16, 129, 200, 768, 1000, 1024, 4096])
@pytest.mark.parametrize("elem", [2, 4, 8])
def test_row_copy_config(D, elem):
    cfg = km().row_copy_config(D, elem)
    rows, bd = cfg["ROWS"], cfg["BLOCK_D"]
    assert rows & (rows - 1) == 0 and bd & (bd - 1) == 0 and 1 <= cfg["num_warps"] <= 4
    assert bd <= 512 and rows * bd * elem <= max(km().ROW_COPY_TILE_BYTES, bd * elem)
    if D >= 16:
        assert 8 * (-(-D // bd) * bd - D) <= -(-D // bd) * bd   # at most 1/8 of the lanes idle
    if D == 768:
        assert bd == 256   # three full blocks, no idle lanes


# ---- GPU only: the same edges for both GPU backends, the CUDA row-copy kernel included ----------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 129, 768, 776])
def test_gpu_row_copy_edges(backend, dtype, D):
    from fastcl._ext import extension_has_cuda
    if backend == "cuda" and not extension_has_cuda():
        pytest.skip("fastcl._C built without CUDA")
    g = gen(D)
    B, S, R = 3, 37, 29                    # B * R = 87: partial last block for every rows-per-block
    src = make_x(B, S, D, dtype, "row_stride", g)
    start = torch.randint(-2, S + 2, (B, R), generator=g).to(DEV)
    order = torch.randint(0, S, (B, S), generator=g).to(DEV)
    fill = randn(D, dtype=dtype, device=DEV, generator=g)
    pos = randn(S, D, dtype=dtype, device=DEV, generator=g)
    for kw in ({}, {"fill": fill}, {"pos": pos}, {"order": order, "fill": fill}, {"out_fp32": True}):
        if backend == "cuda":
            out = torch.ops.fastcl_C.masking_segment_gather(src, start, None, kw.get("order"), kw.get("fill"),
                                                            kw.get("pos"), kw.get("out_fp32", False))
        else:
            out = km().segment_gather(src, start, **kw)
        assert bits_equal(out, reference_row_copy(src, start, **kw)), kw
    for ratio in (0.0, 0.75, 0.999):
        x = make_x(B, S, D, dtype, "contiguous", g)
        noise = torch.rand(B, S, generator=g).to(DEV)
        x1, x2 = leaf(x), leaf(x)
        kept, _, restore, _ = random_masking(x1, ratio, noise=noise, backend=backend)
        r_kept = mae_masking(x2, ratio, noise)[0]
        assert_same_fwd_bwd(kept, r_kept, x1, x2, g)
        token = randn(D, dtype=dtype, device=DEV, generator=g)
        assert bits_equal(restore_tokens(kept.detach(), token, restore, backend=backend),
                          mae_restore(kept.detach(), token, restore))
