"""The bounded-memory gradient driver (fastcl/ops/strip_grads.py): its plan, its sums against whole
float64 products, and the triton and cuda backends run through it with budgets small enough to
need several column chunks and row strips."""

import pytest
import torch

from conftest import DTYPES, TOL, assert_close, fp32_output_tol, randn
from fastcl.ops import strips
from fastcl.ops.strip_grads import finish_full, plan, scratch_bytes, strip_grads


@pytest.mark.parametrize("n,m,d", [(67, 131, 40), (32768, 32768, 768), (1, 1, 3), (4096, 100000, 1024)])
@pytest.mark.parametrize("itemsize,chunk_acc", [(2, True), (4, True), (4, False)])
@pytest.mark.parametrize("budget", [10_000, 2**20, 64 * 2**20])
def test_plan_fits_the_budget_with_the_fewest_chunks(n, m, d, itemsize, chunk_acc, budget):
    min_rows, align = 16, 16
    rows, cols = plan(n, m, d, itemsize, chunk_acc, budget, min_rows, align, align)
    assert 1 <= rows <= n and 1 <= cols <= m
    assert rows == n or rows % align == 0 or rows == min(n, min_rows)
    fits = scratch_bytes(rows, cols, d, itemsize, chunk_acc) <= budget
    if not fits:  # only when not even the smallest pieces fit
        assert (rows, cols) == (min(n, min_rows), min(m, align))
        assert scratch_bytes(rows, cols, d, itemsize, chunk_acc) > budget
        return
    assert rows >= min(n, min_rows)
    chunks = -(-m // cols)
    if chunks > 1:  # one chunk fewer would not leave room for the minimum strip
        wider = min(m, -(-(-(-m // (chunks - 1))) // align) * align)
        assert scratch_bytes(min(n, min_rows), wider, d, itemsize, chunk_acc) > budget
    if rows < n:  # as many rows as fit
        assert scratch_bytes(rows + align, cols, d, itemsize, chunk_acc) > budget


@pytest.mark.parametrize("align", [16, 64])
def test_plan_keeps_column_tiles_within_the_grid_limit(align):
    """Few rows against millions of columns fit the budget in one chunk, but the Triton tile
    kernels put a chunk's column tiles on the grid's y axis, at most 65535 of them."""
    from fastcl.ops.strip_grads import MAX_GRID_Y
    m = MAX_GRID_Y * 16 + 1
    rows, cols = plan(3, m, 128, 4, False, 64 * 2**20, 64, 64, align)
    # even 16-column tiles (an autotuned shape may be narrower than col_align) stay within the limit
    assert rows == 3 and -(-cols // 16) <= MAX_GRID_Y and -(-m // cols) == 2 and cols % align == 0
    assert plan(3, 0, 128, 4, False, 64 * 2**20, 64, 64, align)[1] == 0


def test_default_budget_at_the_clip_target_shape():
    # N = M = 32768, D = 768, bf16 tiles (triton): the 64 MB default is 0.8% of the 8 GB that the
    # naive loss took there (benchmarks/results/h100_20261127_f6a3808_clip_bench.json).
    rows, cols = plan(32768, 32768, 768, 2, True, 64 * 2**20, 2048, 128, 128)
    assert scratch_bytes(rows, cols, 768, 2, True) <= 64 * 2**20
    assert rows >= 2048 and -(-32768 // cols) == 5
    # The Triton strips' finished tiles need no per-row buffers: 4 chunks of 13 strips (52 tiles
    # against 70 with 64-row alignment), so fewer launches per backward.
    rows, cols = plan(32768, 32768, 768, 2, True, 64 * 2**20, 2048, 64, 128, row_buffers=False)
    assert scratch_bytes(rows, cols, 768, 2, True, row_buffers=False) <= 64 * 2**20
    assert rows >= 2048 and -(-32768 // cols) == 4 and -(-32768 // rows) == 13


def _dense_tile(t):
    """form_tile over a dense float64 tile t (N, M); counts its calls and the blocks it saw."""
    seen = []

    def form_tile(ws, r0, nr, c0, nc):
        seen.append((r0, nr, c0, nc))
        tile = ws[:nr * nc].view(nr, nc)
        tile.copy_(t[r0:r0 + nr, c0:c0 + nc])
        return tile
    return form_tile, seen


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", ["input", "fp32"])
@pytest.mark.parametrize("budget", [10 ** 9, 6000, 8000, 12000, 1])
@pytest.mark.parametrize("pos", [None, "diagonal", "index"])
def test_strip_grads_equals_whole_products(dtype, out, budget, pos):
    """Against the whole float64 products, with one block, with several chunks and strips, and with
    the smallest pieces (budget 1 byte), without positive pairs, with the pairs (i, i) and with an
    index that repeats keys.  Budgets 8000 (fp32) and 12000 (half) give 32-column chunks whose
    3-column rest is widened by 16 columns of the chunk before (``column_chunks``)."""
    from test_similarity_lse import positive_index
    gen = torch.Generator().manual_seed(5)
    n, m, d = 67, 131, 40
    q, k = randn(n, d, generator=gen).to(dtype), randn(m, d, generator=gen).to(dtype)
    t = randn(n, m, generator=gen).to(dtype)  # the tile values, as a kernel would round them
    g_pos = randn(n, generator=gen) if pos else None
    index = positive_index(n, m) if pos == "index" else None
    grad_scale = torch.tensor(1.7)
    out_dtype = dtype if out == "input" else torch.float32
    form_tile, seen = _dense_tile(t)
    dq, dk, qgq = strip_grads(q, k, grad_scale, form_tile, tile_dtype=dtype, out_dtype=out_dtype, g_pos=g_pos,
                              pos_index=index, min_rows=16, row_align=16, col_align=16, budget=budget)
    gq64, gk64 = t.double() @ k.double(), t.double().T @ q.double()
    if pos:
        idx = torch.arange(n) if index is None else index
        gq64 += g_pos.double()[:, None] * k.double()[idx]
        gk64.index_add_(0, idx, g_pos.double()[:, None] * q.double())
    assert dq.dtype == out_dtype and dk.dtype == out_dtype and qgq.dtype == torch.float32
    # A half dq is rounded once per column chunk; the errors are independent, so they add up as
    # sqrt(chunks) (measured: at most 3.8e-3 in bf16 over up to 9 chunks, TOL 2e-2).
    chunks = len({c0 for _, _, c0, _ in seen})
    assert_close(dq, 1.7 * gq64, out_dtype, "dq", factor=chunks ** 0.5)
    assert_close(dk, 1.7 * gk64, out_dtype, "dk")
    assert_close(qgq, (q.double() * gq64).sum(), torch.float32, "qgq")
    # Every (row, column) was covered exactly once.
    covered = torch.zeros(n, m, dtype=torch.int32)
    for r0, nr, c0, nc in seen:
        covered[r0:r0 + nr, c0:c0 + nc] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    if budget == 6000:
        assert chunks > 1 and len(seen) > chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", [10 ** 9, 3200, 1])
@pytest.mark.parametrize("pos", [None, "diagonal", "index"])
@pytest.mark.parametrize("need_dq", [True, False])
@pytest.mark.parametrize("gs", [1.7, 0.0, -2.0])
def test_final_tiles_give_the_same_gradients(dtype, budget, pos, need_dq, gs):
    """``form_final_tile`` (g * (T + positives), g = grad_scale or 1 for a 0 one, as the Triton
    strip kernel forms it with FINAL): dq and dk straight from the tiles, qgq divided back by g,
    against the whole float64 products; the generic tile is never asked for.  A 0 grad_scale (a
    GPU logit scale is not read on the host) still gives the formula: zero dq and dk, and qgq."""
    from test_similarity_lse import positive_index
    gen = torch.Generator().manual_seed(9)
    n, m, d = 67, 131, 40
    q, k = randn(n, d, generator=gen).to(dtype), randn(m, d, generator=gen).to(dtype)
    t = randn(n, m, generator=gen).double()
    g_pos = randn(n, generator=gen) if pos else None
    index = positive_index(n, m) if pos == "index" else None
    full = t.clone()
    if pos:
        full.index_put_((torch.arange(n), torch.arange(n) if index is None else index), g_pos.double(),
                        accumulate=True)
    g = gs if gs != 0 else 1.0
    tiles = (g * full).to(dtype)  # as the kernel rounds them
    final, seen = _dense_tile(tiles)
    full = tiles.double() / g

    def generic(*args):
        raise AssertionError("the generic tile was asked for")
    dq, dk, qgq = strip_grads(q, k, torch.tensor(gs), generic, tile_dtype=dtype, out_dtype=dtype, g_pos=g_pos,
                              pos_index=index, min_rows=16, row_align=16, col_align=16, budget=budget,
                              need_dq=need_dq, form_final_tile=final)
    gq64, gk64 = full @ k.double(), full.T @ q.double()
    chunks = len({c0 for _, _, c0, _ in seen})
    assert dq.shape == ((n, d) if need_dq else (0, d)) and dk.dtype == dtype and qgq.dtype == torch.float32
    if gs == 0:
        assert not dq.any() and not dk.any()
    else:
        if need_dq:
            assert_close(dq, gs * gq64, dtype, "dq", factor=chunks ** 0.5)
        assert_close(dk, gs * gk64, dtype, "dk")
    assert_close(qgq, (q.double() * gq64).sum(), torch.float32, "qgq")
    covered = torch.zeros(n, m, dtype=torch.int32)
    for r0, nr, c0, nc in seen:
        covered[r0:r0 + nr, c0:c0 + nc] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    if budget == 3200:  # several chunks of several strips (no per-row buffers here)
        assert chunks > 1 and len(seen) > chunks


def test_final_tiles_keep_to_the_budget(monkeypatch):
    """What ``_final_tile_grads`` allocates besides its outputs is what ``scratch_bytes`` counts for
    its plan, also when a tile is narrower than one row of qgq's products."""
    import fastcl.ops.strip_grads as sg
    made = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        made.append(t.numel() * t.element_size())
        return t
    monkeypatch.setattr(torch, "empty", empty)
    cases = ((64, 16, 256, 4096), (67, 131, 40, 3200), (67, 131, 40, 10 ** 9), (5, 3, 512, 1), (64, 16, 256, 70000))
    for dtype in (torch.bfloat16, torch.float32):  # an fp32 chunk accumulator, or dk itself
        size, chunk_acc = torch.empty((), dtype=dtype).element_size(), dtype != torch.float32
        for n, m, d, budget in cases:
            q, k = randn(n, d).to(dtype), randn(m, d).to(dtype)
            form, _ = _dense_tile(randn(n, m).to(dtype))
            made.clear()
            strip_grads(q, k, torch.tensor(1.0), None, tile_dtype=dtype, out_dtype=dtype, min_rows=16, row_align=16,
                        col_align=16, budget=budget, form_final_tile=form)
            rows, cols = sg.plan(n, m, d, size, chunk_acc, budget, 16, 16, 16, row_buffers=False)
            outputs = size * (n * d + m * d)
            scratch = sg.scratch_bytes(rows, cols, d, size, chunk_acc, row_buffers=False)
            assert sum(made) - outputs <= scratch + 8, (dtype, n, m, d, budget, made)  # + qgq's 0-d sums


def test_final_tiles_at_a_scale_that_is_zero_in_fp32():
    """A float64 grad_scale that rounds to 0 in fp32 is 0 for the kernel (which reads it as fp32): the
    host takes the same view, so the tiles are unscaled and dq, dk come back zero, qgq finite."""
    q, k = randn(20, 8), randn(30, 8)
    t = randn(20, 30)
    form, _ = _dense_tile(t)  # unscaled, as the kernel forms them at a zero scale
    dq, dk, qgq = strip_grads(q, k, torch.tensor(1e-50, dtype=torch.float64), None, tile_dtype=torch.float32,
                              out_dtype=torch.float32, min_rows=16, row_align=16, col_align=16, form_final_tile=form)
    assert not dq.any() and not dk.any()
    assert_close(qgq, (q.double() * (t.double() @ k.double())).sum(), torch.float32, "qgq")


def test_final_tiles_are_used_only_where_they_give_every_output():
    """No dk asked for (qgq then needs Gq in fp32) or outputs in another dtype than the tiles:
    the generic tiles are formed."""
    q, k = randn(20, 8).bfloat16(), randn(30, 8).bfloat16()
    t = randn(20, 30)
    generic, seen = _dense_tile(t.bfloat16())

    def final(*args):
        raise AssertionError("the final tile was asked for")
    kw = dict(tile_dtype=torch.bfloat16, min_rows=16, row_align=16, col_align=16, form_final_tile=final)
    strip_grads(q, k, torch.tensor(1.0), generic, out_dtype=torch.bfloat16, need_dk=False, **kw)
    strip_grads(q, k, torch.tensor(1.0), generic, out_dtype=torch.float32, **kw)
    assert len(seen) == 2


@pytest.mark.parametrize("pos", ["diagonal", "index"])
def test_positive_term_cancels_before_rounding(pos):
    """A confident CLIP-like tile: dS_{i, pos_i} = g (p_i - 1) nearly cancels the positive term
    -g k_{pos_i}.  Added with the chunk that holds column pos_i, the half dq loses no more than
    with a single chunk; added with another chunk, both large parts would be rounded first."""
    gen = torch.Generator().manual_seed(8)
    n, d = 96, 32
    q = torch.nn.functional.normalize(randn(n, d, generator=gen), dim=1)
    perm = torch.randperm(n, generator=gen) if pos == "index" else torch.arange(n)
    k = torch.empty_like(q)
    k[perm] = q + 0.05 * randn(n, d, generator=gen)  # key pos_i close to query i
    q, k = q.bfloat16(), k.bfloat16()
    s = 30.0 * q.double() @ k.double().T
    g = torch.full((n,), 1.0 / n, dtype=torch.float64)
    t = (g[:, None] * torch.softmax(s, 1)).bfloat16()
    g_pos = -g.float()
    ref = t.double() @ k.double() + g_pos.double()[:, None] * k.double()[perm]
    errs = []
    for budget in (10 ** 9, 4000):
        form_tile, seen = _dense_tile(t)
        dq, _, _ = strip_grads(q, k, torch.tensor(1.0), form_tile, tile_dtype=torch.bfloat16,
                               out_dtype=torch.bfloat16, g_pos=g_pos, pos_index=None if pos == "diagonal" else perm,
                               min_rows=16, row_align=16, col_align=16, budget=budget)
        errs.append(((dq.double() - ref).norm() / ref.norm()).item())
        chunks = len({c0 for _, _, c0, _ in seen})
    assert chunks >= 3
    assert errs[0] <= TOL[torch.bfloat16], errs  # right on its own, not only no worse than one chunk
    assert errs[1] <= 1.5 * errs[0] + 1e-6, errs


@pytest.mark.parametrize("with_index", [False, True])
def test_finish_full_matches_strip_grads(with_index):
    from test_similarity_lse import positive_index
    gen = torch.Generator().manual_seed(6)
    n, m, d = 20, 33, 8
    q, k = randn(n, d, generator=gen), randn(m, d, generator=gen)
    t, g_pos = randn(n, m, generator=gen), randn(n, generator=gen)
    index = positive_index(n, m) if with_index else None
    form_tile, _ = _dense_tile(t)
    a = strip_grads(q, k, torch.tensor(0.5), form_tile, tile_dtype=torch.float32, out_dtype=torch.bfloat16,
                    g_pos=g_pos, pos_index=index, min_rows=8, row_align=8, col_align=8, budget=3000)
    b = finish_full(q, k, t @ k, t.T @ q, torch.tensor(0.5), torch.bfloat16, g_pos, index)
    for x, y, name in zip(a, b, ["dq", "dk", "qgq"]):
        assert_close(x.float(), y.float(), torch.bfloat16 if name != "qgq" else torch.float32, name)


# ---- the backends through the driver, with several chunks and strips ----

@pytest.fixture
def tiny_budget(monkeypatch):
    """A 24 KB budget: at N=67, M=131, D=40 the backward takes several column chunks and strips."""
    monkeypatch.setattr(strips, "WORKSPACE_MB", 24 / 1024)
    return strips.workspace_bytes()


def _triton():
    pytest.importorskip("triton")
    from fastcl.ops.dispatch import triton_available
    if not triton_available():
        pytest.skip("triton interpreter unavailable")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [None, 0, 70, -3])
def test_triton_lse_in_chunks(tiny_budget, monkeypatch, dtype, offset):
    _triton()
    from test_similarity_lse import check_against_reference, positive_index
    monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    # The interpreter's 64-row, 64-column minimum pieces exceed 24 KB: 2 strips x 3 chunks.
    assert plan(67, 131, 40, dtype.itemsize, dtype != torch.float32, tiny_budget, 64, 64, 64) == (64, 64)
    check_against_reference("triton", 67, 131, 40, dtype, bias=-0.5, offset=offset, seed=11,
                            positives=True if offset is None else positive_index(67, 131, offset))


def test_triton_sigmoid_in_chunks(tiny_budget, monkeypatch):
    _triton()
    from test_sigmoid_pair import test_value_and_grads
    monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    test_value_and_grads("triton", torch.float32, 67, 131, 40)
    test_value_and_grads("triton", torch.bfloat16, 67, 131, 40)


@pytest.fixture
def emulated_cuda(tiny_budget, monkeypatch):
    """backend="cuda" on CPU tensors: the real driver with the float64 stand-in epilogues, and
    small strips so that the 24 KB budget is met."""
    from _strip_emulation import TorchEpilogues, route_cuda_backend
    route_cuda_backend(monkeypatch, TorchEpilogues)
    monkeypatch.setattr(strips, "GRAD_MIN_ROWS", 16)
    monkeypatch.setattr(strips, "GRAD_COL_ALIGN", 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [None, 0, 70, -3])
def test_cuda_driver_lse_in_chunks(emulated_cuda, dtype, offset):
    from test_similarity_lse import check_against_reference, positive_index
    check_against_reference("cuda", 67, 131, 40, dtype, bias=-0.5, offset=offset, seed=12,
                            positives=True if offset is None else positive_index(67, 131, offset))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_driver_sigmoid_in_chunks(emulated_cuda, dtype):
    from test_sigmoid_pair import test_value_and_grads
    test_value_and_grads("cuda", dtype, 67, 131, 40)


def test_cuda_driver_really_chunks(emulated_cuda, monkeypatch):
    """The 24 KB budget gives several column chunks and strips at this shape, each block once."""
    from _strip_emulation import TorchEpilogues
    seen = []

    class Recording(TorchEpilogues):
        @staticmethod
        def lse_bwd(scores, *args):
            seen.append(tuple(scores.shape))
            return TorchEpilogues.lse_bwd(scores, *args)
    monkeypatch.setattr(strips, "EPILOGUES", Recording)
    from fastcl.ops import similarity_lse
    q = torch.randn(67, 40).bfloat16().requires_grad_()
    k = torch.randn(131, 40).bfloat16().requires_grad_()
    r, c = similarity_lse(q, k, 2.0, rows=True, cols=True, backend="cuda")
    (r.sum() + c.sum()).backward()
    assert len({m for _, m in seen}) >= 2 and len(seen) > 4
    assert sum(r * m for r, m in seen) == 67 * 131


def test_forward_group_rows():
    pytest.importorskip("triton")
    from fastcl.kernels.similarity_lse import forward_group_rows
    # 64 MB: half holds 32768 partial rows of M=256 fp32 -> every N fits one launch of 64-row blocks.
    assert forward_group_rows(100000, 256, 64, 64, 132) == 100000
    # H100-like: M = N = 131072 gives 64 partial rows (8192 rows) per 32 MB, raised to 2 blocks per SM.
    assert forward_group_rows(131072, 131072, 128, 128, 132) == 2 * 132 * 128
    assert forward_group_rows(32768, 32768, 128, 128, 132) == 32768  # one launch at the target shape


@pytest.mark.parametrize("offset", [None, 0, -5, 70])
def test_triton_forward_in_row_groups(monkeypatch, offset):
    """A workspace too small for one row block's column partials: the forward runs one 64-row group
    at a time and merges the columns in order."""
    _triton()
    from fastcl.kernels.similarity_lse import forward_group_rows
    from test_similarity_lse import check_against_reference
    monkeypatch.setattr(strips, "WORKSPACE_MB", 0.0005)
    assert forward_group_rows(67, 131, 64, 64, 0) == 64
    check_against_reference("triton", 67, 131, 40, torch.float32, bias=0.25, offset=offset, seed=13)


def test_column_partials_merge_as_logsumexp():
    """The in-place merge gives torch.logsumexp's bits: finite columns, a column with no entries
    (-inf), +inf and NaN; a second group is added with logaddexp."""
    pytest.importorskip("triton")
    from fastcl.kernels.similarity_lse import _merge_column_partials
    gen = torch.Generator().manual_seed(4)
    parts = torch.randn(5, 11, generator=gen) * 30
    parts[:, 3] = float("-inf")  # a column with no entries in this group
    parts[2, 5] = float("inf")
    parts[1, 7] = float("nan")
    col = torch.empty(11)
    want = torch.logsumexp(parts, 0)
    _merge_column_partials(parts.clone(), col, first=True)
    assert torch.allclose(col, want, rtol=0, atol=0, equal_nan=True)  # the same bits
    assert torch.isnan(col[7]) and col[5] == float("inf") and col[3] == float("-inf")
    more = torch.randn(4, 11, generator=gen)
    both = torch.logsumexp(torch.cat([parts, more]), 0)
    _merge_column_partials(more.clone(), col, first=False)
    finite = ~torch.isnan(both)
    assert torch.equal(torch.isnan(col), ~finite)
    assert_close(col[finite], both[finite], torch.float32, "merged column LSE", elementwise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_index_sum_and_take_rows_sum_repeated_indices(dtype):
    """index_sum_ adds every row of src into out at its index, repeats included; take_rows gathers,
    and its gradient sums the repeats (checked against float64 loops)."""
    from fastcl.ops.reference import index_sum_, take_rows
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 13, (131,), generator=gen)
    idx[:7] = 4  # a long run of one index
    src = torch.randn(131, 40, generator=gen, dtype=dtype)
    out = torch.randn(13, 40, generator=gen, dtype=dtype)
    want = out.double().clone()
    for i, v in enumerate(idx.tolist()):
        want[v] += src[i].double()
    assert_close(index_sum_(out, idx, src), want, dtype, "index_sum_")

    x = torch.randn(13, 40, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.randn(131, 40, generator=gen, dtype=dtype)
    rows = take_rows(x, idx)
    assert torch.equal(rows, x.detach()[idx])
    (grad,) = torch.autograd.grad(rows, x, g)
    want = torch.zeros(13, 40, dtype=torch.float64)
    for i, v in enumerate(idx.tolist()):
        want[v] += g[i].double()
    assert_close(grad, want, dtype, "take_rows gradient")


def test_forward_column_splits():
    pytest.importorskip("triton")
    from fastcl.kernels.similarity_lse import forward_column_splits
    assert forward_column_splits(64, 132) == 2      # N=8192, 128-row blocks on an H100: one full wave
    assert forward_column_splits(256, 132) == 1     # N=32768: already two waves
    assert forward_column_splits(16, 132) == 8      # capped
    assert forward_column_splits(5, 0) == 1         # the interpreter
    assert all(forward_column_splits(rb, 132) == 1 for rb in range(264, 600))  # two waves or more
    for rb in range(1, 264):
        s = forward_column_splits(rb, 132)
        waves = lambda t: -(-rb * t // 132) / t  # noqa: E731
        assert waves(s) <= min(waves(t) for t in range(1, 9)) * 1.01


@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("offset", [None, 0, -5, 70])
@pytest.mark.parametrize("align", [64, 16])
def test_triton_forward_in_column_ranges(monkeypatch, rows, cols, offset, align):
    """Several column ranges per row block (as on a GPU with few row blocks): the row LSE of each
    range is merged afterwards; with row groups too, and a last group shorter than the others.
    With align 16 the ranges (48 columns) end inside the interpreter's 64-column tiles."""
    _triton()
    import fastcl.kernels.similarity_lse as K
    from test_similarity_lse import check_against_reference
    monkeypatch.setattr(K, "forward_column_splits", lambda row_blocks, sms: 3)
    monkeypatch.setattr(K, "SPLIT_ALIGN", align)
    m = 331 if align == 64 else 131
    check_against_reference("triton", 67, m, 40, torch.float32, bias=0.25, offset=offset, seed=17,
                            rows=rows, cols=cols)
    monkeypatch.setattr(strips, "WORKSPACE_MB", 0.0005)  # 64-row groups: 67 = 64 + 3
    check_against_reference("triton", 67, m, 40, torch.float32, offset=offset, seed=18, rows=rows, cols=cols)


def test_column_chunks_cover_the_columns_without_a_sliver():
    from fastcl.ops.strip_grads import column_chunks
    assert column_chunks(1025, 256, 128) == [(0, 256), (256, 256), (512, 256), (768, 128), (896, 129)]
    assert column_chunks(32768, 6656, 128) == [(i * 6656, 6656) for i in range(4)] + [(26624, 6144)]
    assert column_chunks(1025, 128, 128)[-1] == (1024, 1)  # no chunk can spare 128 columns
    assert column_chunks(100, 100, 16) == [(0, 100)]
    for m in range(1, 700, 7):
        for align in (16, 128):
            for cols in sorted({min(m, align * t) for t in (1, 2, 3, 5)}):
                chunks = column_chunks(m, cols, align)
                assert [c0 for c0, _ in chunks] == [sum(w for _, w in chunks[:i]) for i in range(len(chunks))]
                assert sum(w for _, w in chunks) == m and all(0 < w <= cols for _, w in chunks)
                assert len(chunks) == -(-m // cols)
                if cols >= 2 * align and len(chunks) > 1:
                    assert chunks[-1][1] >= align


@pytest.mark.parametrize("shared_exp", [False, True])
def test_forward_range_writes_only_its_columns(shared_exp):
    """One column range (grid (row blocks, 1), col_span 48) inside 64-column tiles writes the column
    partials of its own 48 columns and nothing past them: on a GPU the ranges run in any order, so
    a write past the end could land after the next range's."""
    _triton()
    import fastcl.kernels.similarity_lse as K
    gen = torch.Generator().manual_seed(9)
    n, m, d = 67, 131, 40
    q, k = randn(n, d, generator=gen), randn(m, d, generator=gen)
    row = torch.full((n,), float("nan"))
    colpart = torch.full((2, m), float("nan"))
    K._lse_fwd_kernel[(2, 1)](q, k, torch.tensor(1.5), torch.tensor(0.0), row, colpart, n, m, d, d, d, 0, 48,
                              ROWS=True, COLS=True, HAS_DIAG=False, MASK_BOUNDS=True, SHARED_EXP=shared_exp, BLOCK_M=64, BLOCK_N=64,
                              BLOCK_D=64, UPCAST=True, IS_FP32=True, PRECISION="ieee", FAST_LOG=False)
    s = 1.5 * q.double() @ k.double().T
    assert torch.isnan(colpart[:, 48:]).all()
    want = torch.stack([torch.logsumexp(s[:64, :48], 0), torch.logsumexp(s[64:, :48], 0)])
    assert_close(colpart[:, :48], want, torch.float32, "column partials")
    assert_close(row, torch.logsumexp(s[:, :48], 1), torch.float32, "row LSE of the range")


FROZEN = {"q frozen": (False, True, True, False), "k frozen": (True, False, True, True),
          "only the scale": (False, False, True, False), "only the bias": (False, False, False, True)}


@pytest.mark.parametrize("backend", ["cpu", "triton strip", "triton fused", "cuda"])
@pytest.mark.parametrize("frozen", list(FROZEN))
def test_a_frozen_side_gets_no_gradient_and_the_rest_is_exact(backend, frozen, monkeypatch, request):
    """A locked tower or a memory bank needs no gradient: the backward skips that side's products
    (strip mode: no GEMM for it at all) and every gradient it does return is the reference's."""
    from fastcl.ops import similarity_lse, sigmoid_pair_loss
    if backend == "cuda":
        request.getfixturevalue("emulated_cuda")
    elif backend.startswith("triton"):
        monkeypatch.setenv("FASTCL_TRITON_BWD", backend.split()[1])
    name = backend.split()[0]
    req_q, req_k, req_s, req_b = FROZEN[frozen]
    g = torch.Generator().manual_seed(6)
    base = (randn(67, 40, generator=g), randn(131, 40, generator=g))
    for op in ("lse", "sigmoid"):
        got, want = {}, {}
        for be, out in ((name, got), ("reference", want)):
            q, k = (t.clone().requires_grad_(r) for t, r in zip(base, (req_q, req_k)))
            s, b = torch.tensor(2.5, requires_grad=req_s), torch.tensor(-0.5, requires_grad=req_b)
            if op == "lse":
                row, col, pos = similarity_lse(q, k, s, b, rows=True, cols=True, positives=True, backend=be)
                loss = row.sum() + 0.3 * col.sum() - pos.sum()
            else:
                loss = sigmoid_pair_loss(q, k, s, b, backend=be)
            loss.backward()
            out.update(q=q.grad, k=k.grad, s=s.grad, b=b.grad)
        for key in ("q", "k", "s", "b"):
            assert (got[key] is None) == (want[key] is None), f"{op} d{key}"
            if want[key] is not None:
                assert_close(got[key], want[key], torch.float32, f"{op} d{key}")


def test_bias_alone_runs_no_backward_product(monkeypatch):
    """dbias of an LSE is the sum of its softmax rows' weights: no tile, no product."""
    import sys
    from fastcl.ops import similarity_lse
    pytest.importorskip("fastcl._C")

    def refuse(*args):
        raise AssertionError("the backward op ran")
    monkeypatch.setattr(sys.modules["fastcl.ops.similarity_lse"], "_lse_bwd", refuse)
    b = torch.tensor(0.5, requires_grad=True)
    row, col = similarity_lse(randn(7, 4), randn(9, 4), 2.0, b, rows=True, cols=True, backend="cpu")
    (row.sum() + col.sum()).backward()
    assert b.grad.item() == 16.0  # 7 rows + 9 columns, each softmax summing to 1


def test_strips_skip_the_frozen_sides_product(monkeypatch):
    """One GEMM per tile instead of two when a side needs no gradient."""
    calls = []
    real = strip_grads.__globals__["mm_f32_into"]
    monkeypatch.setitem(strip_grads.__globals__, "mm_f32_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(12)
    q, k = randn(64, 16, generator=g), randn(96, 16, generator=g)
    tile = randn(64, 96, generator=g)

    def form(ws, r0, nr, c0, nc):
        return tile[r0:r0 + nr, c0:c0 + nc]
    one = torch.ones(())
    kw = dict(tile_dtype=torch.float32, out_dtype=torch.float32, min_rows=16, row_align=16, col_align=16)
    full = strip_grads(q, k, one, form, **kw)
    n_full = len(calls)
    for need_dq, need_dk in ((True, False), (False, True)):
        calls.clear()
        dq, dk, qgq = strip_grads(q, k, one, form, need_dq=need_dq, need_dk=need_dk, **kw)
        assert len(calls) * 2 == n_full
        assert (dq.shape[0] == 64) == need_dq and (dk.shape[0] == 96) == need_dk
        # sum(q * Gq) and sum(k * Gk) are one number summed in two orders: fp32 rounding apart
        assert_close(qgq, full[2], torch.float32, "qgq")
        torch.testing.assert_close(dq if need_dq else dk, full[0] if need_dq else full[1])


def test_cpu_kernels_skip_the_frozen_side():
    """The C++ tile loop forms only the gradients asked for (one GEMM per tile, no Gk per slot)."""
    pytest.importorskip("fastcl._C")
    q, k = randn(37, 8), randn(53, 8)
    row, col = torch.ops.fastcl_C.sim_lse_fwd(q, k, 1.5, 0.0, True, True, None)
    g_row, g_col = torch.rand(37), torch.rand(53)
    gq, gk = torch.ops.fastcl_C.sim_lse_bwd(q, k, 1.5, 0.0, row, col, g_row, g_col, None)
    for need_q, need_k in ((True, False), (False, True)):
        a, b = torch.ops.fastcl_C.sim_lse_bwd(q, k, 1.5, 0.0, row, col, g_row, g_col, None, need_q, need_k)
        assert a.shape == ((37, 8) if need_q else (0, 8)) and b.shape == ((53, 8) if need_k else (0, 8))
        torch.testing.assert_close(a if need_q else b, gq if need_q else gk)
        sa, sb, _ = torch.ops.fastcl_C.sigmoid_pair_bwd(q, k, 1.5, 0.0, need_q, need_k)
        assert sa.shape[0] == (37 if need_q else 0) and sb.shape[0] == (53 if need_k else 0)


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.bfloat16)])
def test_a_zero_scale_keeps_the_scale_gradient(backend, dtype, monkeypatch):
    """scale = 0, which the public check cannot refuse for a GPU logit scale (it is never read on
    the host), through the registered op: every logit is the bias, dq and dk are exactly zero, and
    dscale is still sum(q * Gq), which the Triton strips' finished tiles keep by leaving the tile
    unscaled (g = 1 where grad_scale is 0) and dividing qgq back by g."""
    from test_similarity_lse import oracle_lse, oracle_positives
    if backend == "cpu":
        pytest.importorskip("fastcl._C")
    else:
        _triton()
        monkeypatch.setenv("FASTCL_TRITON_BWD", "strip")
    gen = torch.Generator().manual_seed(23)
    q, k = randn(67, 40, dtype=dtype, generator=gen), randn(131, 40, dtype=dtype, generator=gen)
    w_row, w_col = torch.rand(67, generator=gen) + 0.5, torch.rand(131, generator=gen) + 0.5
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), torch.zeros((), requires_grad=True),
              torch.tensor(-0.75, requires_grad=True)]
    row, col, pos = torch.ops.fastcl.similarity_lse_fwd(*leaves, True, True, None, True, None, backend)
    loss = (row * w_row).sum() + (col * w_col).sum() - 0.5 * pos.sum()
    dq, dk, dscale, dbias = torch.autograd.grad(loss, leaves)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    row64, col64 = oracle_lse(*refs, rows=True, cols=True)
    loss64 = (row64 * w_row.double()).sum() + (col64 * w_col.double()).sum() - 0.5 * oracle_positives(
        refs[0], refs[1], None, refs[2], refs[3]).sum()
    _, _, rscale, rbias = torch.autograd.grad(loss64, refs)
    assert_close(loss, loss64, torch.float32, "loss")
    assert dq.dtype == dk.dtype == dtype and not dq.any() and not dk.any()
    assert_close(dscale, rscale, fp32_output_tol(dtype, backend, from_tiles=True), "dscale")
    assert_close(dbias, rbias, fp32_output_tol(dtype), "dbias")


@pytest.mark.parametrize("offset", [70, -3])
def test_cuda_driver_excludes_the_diagonal_in_later_column_chunks(emulated_cuda, monkeypatch, offset):
    """fp32 tiles with an 8 KB budget: three 48-column chunks of 16-row strips, and the excluded
    entries j == i + offset fall in the chunks that start past column 0, where the epilogue's local
    diagonal is r0 + offset - c0.  In fp32 one entry per row left in dS is far above TOL; the 24 KB
    runs above split the columns only for half inputs (their fp32 Gk chunk), whose TOL hides it."""
    from test_similarity_lse import check_against_reference
    monkeypatch.setattr(strips, "WORKSPACE_MB", 8 / 1024)
    assert plan(67, 131, 40, 4, False, strips.workspace_bytes(), 16, 16, 16) == (16, 48)
    check_against_reference("cuda", 67, 131, 40, torch.float32, bias=-0.5, offset=offset, seed=29)
