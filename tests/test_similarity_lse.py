"""similarity_lse against the float64 reference: values, gradients, options, edge cases."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DTYPES, LARGE_LOGITS_FACTOR, assert_close, fp32_output_tol, randn
from fastcl.ops import similarity_lse
from fastcl._ext import extension_available

needs_ext = pytest.mark.skipif(not extension_available(), reason="fastcl._C not built")
CPU_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


def oracle_lse(q, k, scale, bias=None, *, rows=True, cols=False, exclude_diagonal=None):
    """Row and column LSE (None where not asked) of the dense logits, written from the definition
    here rather than taken from fastcl.ops.reference, which is itself a backend under test."""
    s = q @ k.T * scale + (0.0 if bias is None else bias)
    if exclude_diagonal is not None:  # entries with j - i == offset
        n, m = s.shape
        band = torch.ones(n, m, dtype=torch.bool).triu(exclude_diagonal).tril(exclude_diagonal)
        s = s.masked_fill(band.to(s.device), float("-inf"))
    return (s.logsumexp(1) if rows else None, s.logsumexp(0) if cols else None)


def oracle_positives(q, k, index, scale, bias=None):
    """(N,) logits of each row's positive column: k[index[i]], or k[i] when index is None."""
    kk = k[: q.shape[0]] if index is None else k[index]
    return (q * kk).sum(-1) * scale + (0.0 if bias is None else bias)


def _inputs(n, m, d, dtype, gen, scale=2.5, bias=None, device="cpu"):
    q = randn(n, d, dtype=dtype, generator=gen, device=device, requires_grad=True)
    k = randn(m, d, dtype=dtype, generator=gen, device=device, requires_grad=True)
    s = torch.tensor(scale, device=device, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, device=device, requires_grad=True)
    return q, k, s, b


def check_against_reference(backend, n, m, d, dtype, *, bias=None, offset=None, rows=True, cols=True,
                            positives=False, scale=2.5, seed=0, qk_factor=1.0, device="cpu"):
    """Compare value and every gradient of a random weighted sum of the outputs with float64.

    The fp32 outputs (LSEs, dscale, dbias) take fp32_output_tol's row of TOL, dq and dk their
    dtype's, norm-wise and element by element, widened by ``qk_factor``."""
    gen = torch.Generator().manual_seed(seed)
    q, k, s, b = _inputs(n, m, d, dtype, gen, scale, bias, device)
    out = similarity_lse(q, k, s, b, rows=rows, cols=cols, exclude_diagonal=offset, positives=positives,
                         backend=backend)
    out = list(out) if isinstance(out, tuple) else [out]
    row = out.pop(0) if rows else None
    col = out.pop(0) if cols else None
    pos = out.pop(0) if positives is not False else None
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    row64, col64 = oracle_lse(q64, k64, s64, b64, rows=rows, cols=cols, exclude_diagonal=offset)
    index = positives if isinstance(positives, torch.Tensor) else None
    pos64 = oracle_positives(q64, k64, index, s64, b64) if positives is not False else None
    loss, loss64 = 0.0, 0.0
    # Positive weights, as a loss gives (minus the positive logits); random signs make dscale
    # cancel to noise.  The positive logits weigh half as much, so that dbias (the row and column
    # weights minus the positives' ones) does not cancel to noise either.
    for o, o64, sign in ((row, row64, 1.0), (col, col64, 1.0), (pos, pos64, -0.5)):
        if o is None:
            continue
        assert o.dtype == torch.float32
        assert_close(o, o64, fp32_output_tol(dtype), "lse")
        w = sign * (torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5).to(device)
        finite = torch.isfinite(o64)
        loss = loss + (o[finite] * w[finite].float()).sum()
        loss64 = loss64 + (o64[finite] * w[finite]).sum()
    wrt = [q, k, s] + ([b] if b is not None else [])
    wrt64 = [q64, k64, s64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    grads64 = torch.autograd.grad(loss64, wrt64)
    for name, g, g64 in zip(["dq", "dk", "dscale", "dbias"], grads, grads64):
        if name in ("dq", "dk"):
            assert g.dtype == dtype
            assert_close(g, g64, dtype, name, qk_factor, elementwise=True)
        else:
            assert g.dtype == torch.float32
            assert_close(g, g64, fp32_output_tol(dtype, backend, from_tiles=name == "dscale"), name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", [(1, 2, 3), (2, 5, 40), (67, 131, 40), (300, 173, 128), (67, 131, 3)])
def test_matches_reference(backend, dtype, n, m, d):
    check_against_reference(backend, n, m, d, dtype, seed=n * 1000 + d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("offset", [0, 3, -2, 200])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_options(backend, offset, rows, cols):
    check_against_reference(backend, 67, 131, 40, torch.float32, bias=-1.25, offset=offset, rows=rows, cols=cols)


def positive_index(n, m, seed=0):
    """(n,) int64 positives into m keys with repeats (several queries share a key)."""
    return torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(seed)) // 3 * 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols,offset", [(True, True, None), (True, False, 0), (False, True, 3)])
@pytest.mark.parametrize("which", ["diagonal", "index"])
def test_positive_logits(backend, dtype, rows, cols, offset, which):
    # The (i, i) or (i, index_i) logits, with their gradient folded into the op's backward.
    positives = True if which == "diagonal" else positive_index(67, 131)
    check_against_reference(backend, 67, 131, 40, dtype, bias=0.5, offset=offset, rows=rows, cols=cols,
                            positives=positives, seed=3)


def test_positives_are_checked():
    q = torch.randn(5, 4)
    with pytest.raises(ValueError, match="positives=True needs k"):
        similarity_lse(q, q[:4], 1.0, positives=True)
    with pytest.raises(ValueError, match="positives must lie in"):
        similarity_lse(q, q, 1.0, positives=torch.tensor([0, 1, 2, 3, 5]))
    with pytest.raises(ValueError, match="positives must have shape"):
        similarity_lse(q, q, 1.0, positives=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="positives must be a bool"):
        similarity_lse(q, q, 1.0, positives=1)
    with pytest.raises(TypeError, match="positives must be an integer tensor"):
        similarity_lse(q, q, 1.0, positives=torch.arange(5.0))


@needs_ext
def test_spans_several_tiles():
    # 2500 columns cross the C++ column-tile edges (1024) and 600 rows the row-tile edge (512).
    check_against_reference("cpu", 600, 2500, 16, torch.float32, bias=0.5, offset=7)


@needs_ext
def test_gradcheck_cpu():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)

    def f(q, k, s, b):
        r, c = similarity_lse(q, k, s, b, rows=True, cols=True, exclude_diagonal=1, backend="cpu")
        return r, c

    assert torch.autograd.gradcheck(f, (q, k, s, b))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_magnitudes_are_finite_and_exact(backend):
    # logit scale 100 on unnormalised features: logits in the thousands.
    check_against_reference(backend, 67, 131, 40, torch.float32, scale=100.0, bias=5.0,
                            qk_factor=LARGE_LOGITS_FACTOR)
    gen = torch.Generator().manual_seed(3)
    q, k = randn(67, 40, generator=gen) * 10, randn(131, 40, generator=gen) * 10
    r, c = similarity_lse(q, k, 100.0, rows=True, cols=True, backend=backend)
    assert torch.isfinite(r).all() and torch.isfinite(c).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows,cols", [(True, True), (False, True)])
def test_columns_far_below_the_tile_maximum(backend, rows, cols):
    # One dominant row lifts the tile maximum hundreds above most columns' maxima, and its LSE
    # far above those columns' LSEs: the C++ kernels share one exp between rows and columns
    # only within 60 of that maximum and must take their exact per-column path elsewhere.
    gen = torch.Generator().manual_seed(11)
    q, k = randn(67, 8, generator=gen), randn(131, 8, generator=gen)
    q[0] = 0.0
    q[0, 0] = 40.0
    k[:3, 0] = torch.tensor([3.0, 2.9, 2.6])  # a few columns near the maximum share the exp
    s = q.double() @ k.double().T * 2.5
    gap = s.max() - s.max(dim=0).values
    assert (gap > 60).any() and (gap <= 60).any(), "the construction must reach both paths"
    _compare_fixed(backend, q, k, 2.5, rows=rows, cols=cols)


def _compare_fixed(backend, q, k, scale, *, rows, cols):
    """Value and gradients of a positive weighted sum of the outputs against float64."""
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    out = similarity_lse(q, k, scale, rows=rows, cols=cols, backend=backend)
    out64 = oracle_lse(q64, k64, scale, None, rows=rows, cols=cols)
    out = out if rows and cols else ((out, None) if rows else (None, out))
    loss, loss64 = 0.0, 0.0
    for i, (o, o64) in enumerate(zip(out, out64)):
        if o is None:
            continue
        assert_close(o, o64, torch.float32, "lse")
        w = torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64)
        loss, loss64 = loss + (o * w.float()).sum(), loss64 + (o64 * w).sum()
    for name, g, g64 in zip(("dq", "dk"), torch.autograd.grad(loss, [q, k]), torch.autograd.grad(loss64, [q64, k64])):
        assert_close(g, g64, torch.float32, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_gives_nan_out(backend):
    gen = torch.Generator().manual_seed(4)
    q, k = randn(67, 40, generator=gen), randn(131, 40, generator=gen)
    q[5, 3] = float("nan")
    r, c = similarity_lse(q, k, 2.0, rows=True, cols=True, backend=backend)
    assert torch.isnan(r[5]) and torch.isfinite(torch.cat([r[:5], r[6:]])).all()
    assert torch.isnan(c).all()
    k2 = k.clone()
    k2[7, 0] = float("nan")
    r = similarity_lse(randn(67, 40, generator=gen), k2, 2.0, backend=backend)
    assert torch.isnan(r).all()
    # the gradients too, the bias's included: it sums each row's softmax, NaN for a NaN row
    bias = torch.tensor(0.5, requires_grad=True)
    q.requires_grad_(True)
    r = similarity_lse(q, k, 2.0, bias, backend=backend)
    dq, db = torch.autograd.grad(r.sum(), [q, bias])
    assert torch.isnan(db) and torch.isnan(dq[5]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bias_gradient_counts_the_rows_that_have_entries(backend):
    # d(sum of LSEs)/d(bias) = number of rows with an entry: a fully excluded row (-inf) adds 0
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    bias = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    r = similarity_lse(q, k, 1.0, bias, exclude_diagonal=0, backend=backend)
    assert r[0] == float("-inf") and torch.autograd.grad(r.sum(), bias)[0] == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_excluded_row_is_neg_inf(backend):
    q, k = torch.randn(1, 4), torch.randn(1, 4)
    r = similarity_lse(q, k, 1.0, exclude_diagonal=0, backend=backend)
    assert r.item() == float("-inf")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_infinite_score(backend):
    """README, non-finite inputs: a +inf term makes the LSE +inf in the reference and NaN in the
    fused kernels; the other rows and columns stay finite either way."""
    q, k = torch.rand(5, 4) + 0.1, torch.randn(7, 4)
    k[3, 0] = float("inf")  # column 3 is +inf in every row
    row, col = similarity_lse(q, k, 1.0, rows=True, cols=True, backend=backend)
    if backend == "reference":
        assert (row == float("inf")).all() and col[3] == float("inf")
    else:
        assert torch.isnan(row).all() and torch.isnan(col[3])
    assert torch.isfinite(col[[0, 1, 2, 4, 5, 6]]).all()


@needs_ext
def test_cpu_is_deterministic():
    gen = torch.Generator().manual_seed(5)
    q = randn(600, 32, generator=gen, requires_grad=True)
    k = randn(2100, 32, generator=gen, requires_grad=True)

    def run():
        r, c = similarity_lse(q, k, 3.0, rows=True, cols=True, backend="cpu")
        return [r, c] + list(torch.autograd.grad(r.sum() + c.sum(), [q, k]))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_ext
def test_cpu_gemm_choices_agree(tmp_path):
    # fp32 tiles use oneDNN's GEMM when libtorch exports it; FASTCL_CPU_GEMM=aten forces ATen's.
    code = ("import torch, fastcl; from fastcl import _ext; g = torch.Generator().manual_seed(9);"
            "q = torch.randn(600, 40, generator=g, requires_grad=True);"
            "k = torch.randn(1100, 40, generator=g, requires_grad=True);"
            "r, c = fastcl.ops.similarity_lse(q, k, 3.0, rows=True, cols=True, backend='cpu');"
            "gq, gk = torch.autograd.grad(r.sum() + 2 * c.sum(), [q, k]);"
            "print(_ext._C.cpu_gemm()); torch.save([r, c, gq, gk], sys.argv[1])")
    choices = ("", "aten", "mkl")
    # The choice is read once per process: one process each, run side by side (mostly start-up).
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; " + code, str(tmp_path / f"gemm_{i}.pt")],
                              env=dict(os.environ, FASTCL_CPU_GEMM=choice), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, choice in enumerate(choices)]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    for ((out, err), code_), choice in zip(results[:2], choices):
        assert code_ == 0, f"FASTCL_CPU_GEMM={choice!r}: {err}"
    names = [out.split()[-1] for (out, _), _ in results[:2]]
    outs = [torch.load(tmp_path / f"gemm_{i}.pt") for i in range(2)]
    assert names[1] == "aten" and names[0] in ("onednn", "aten")
    for a, b in zip(*outs):
        assert_close(a, b, torch.float32, "onednn vs aten")
    (_, bad_err), bad_code = results[2]
    assert bad_code != 0 and "FASTCL_CPU_GEMM must be unset, 'onednn' or 'aten', got 'mkl'" in bad_err


@needs_ext
@pytest.mark.parametrize("threads,n", [(3, 1100), (4, 600)])
def test_cpu_slots_merge_in_order(threads, n):
    # 3 threads, 1100 rows: 3 row strips, one per slot; column statistics and Gk are merged across
    # slots.  4 threads, 600 rows: fewer strips than threads, so one slot with threaded GEMMs.
    # Either way the result must match float64 and repeat bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference("cpu", n, 700, 24, torch.float32, bias=0.25, offset=-5, seed=21)
        gen = torch.Generator().manual_seed(22)
        q, k = randn(n, 24, generator=gen, requires_grad=True), randn(700, 24, generator=gen, requires_grad=True)

        def run():
            r, c = similarity_lse(q, k, 4.0, rows=True, cols=True, backend="cpu")
            return [r, c] + list(torch.autograd.grad(r.sum() + c.sum(), [q, k]))

        for a, b in zip(run(), run()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_index", [False, True])
def test_row_dots_in_blocks(dtype, with_index):
    from fastcl.ops.reference import row_dots
    gen = torch.Generator().manual_seed(2)
    a, b = randn(600, 9, dtype=dtype, generator=gen), randn(700, 9, dtype=dtype, generator=gen)
    index = positive_index(600, 700) if with_index else None
    got = row_dots(a, b, index, block_bytes=1)  # 256-row blocks: three of them
    bb = b[:600] if index is None else b[index]
    assert_close(got, (a.double() * bb.double()).sum(1), torch.float32 if dtype != torch.float64 else dtype)


@pytest.mark.parametrize("used", ["pos", "row", "col", "row+pos", "col+pos", "row+col"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_unused_outputs_stay_out_of_the_gradient(backend, used, monkeypatch):
    """A NaN in k reaches only what autograd's own ops would send it to: an output the loss does
    not use (its gradient is None) is left out of the backward, rather than taken with a zero
    gradient (0 * NaN).  With only the positive logits used, no softmax side is formed at all
    (that case took the C++ backward down with a segfault)."""
    import _cuda_host
    from fastcl._ext import extension_available
    if backend == "cpu" and not extension_available():
        pytest.skip("needs the C++ extension")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter")
    if backend == "cuda":
        if not _cuda_host.compiler():
            pytest.skip("needs g++ for the CUDA emulation")
        _cuda_host.route_to_host(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    q0, k0 = randn(6, 5, generator=gen), randn(7, 5, generator=gen)
    k0[3, 1] = float("nan")
    grads = {}
    for be in ("reference", backend):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
        row, col, pos = similarity_lse(q, k, scale, bias, rows=True, cols=True, positives=True, backend=be)
        out = {"row": row, "col": col, "pos": pos}
        sum(out[u].sum() for u in used.split("+")).backward()
        grads[be] = [q.grad, k.grad, scale.grad, bias.grad]
    for name, got, ref in zip(("q", "k", "scale", "bias"), grads[backend], grads["reference"]):
        assert torch.equal(got.isnan(), ref.isnan()), f"{name}: NaN at {got.isnan().nonzero().tolist()}"
        assert_close(got.nan_to_num(), ref.nan_to_num(), torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", [None, "reference", pytest.param("cpu", marks=needs_ext)])
def test_auto_on_the_cpu_takes_the_fused_kernels(backend, monkeypatch):
    """backend=None (auto, FASTCL_BACKEND unset) on CPU tensors runs the C++ kernels, not the
    reference, which materialises the N x M logits: the values are the same either way, so only
    the path taken tells them apart.  An explicit backend is used as asked."""
    from fastcl.ops import reference
    op = sys.modules["fastcl.ops.similarity_lse"]  # the package exports the function under the same name
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    if backend is None and not extension_available():
        pytest.skip("auto falls back to the reference without fastcl._C")
    taken = []

    def spy(*args, **kwargs):
        taken.append("reference")
        return reference.reference_similarity_lse(*args, **kwargs)
    monkeypatch.setattr(op, "reference_similarity_lse", spy)
    check_against_reference(backend, 67, 131, 40, torch.float32, bias=0.5, offset=3, positives=True, seed=31)
    assert taken == (["reference"] if backend == "reference" else [])


def test_gpu_backend_choice_is_remembered_per_dtype(monkeypatch):
    """auto on CUDA takes the dispatch table's entry for the problem's op and dtype, also when the
    same shape was asked about for another dtype or op before (the answers are cached)."""
    from fastcl.ops import dispatch, dispatch_table
    from fastcl.ops.dispatch import resolve_backend
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch_table, "TABLE", {("similarity_lse", "bfloat16", 4096, 64): "cuda",
                                                  ("similarity_lse", "float32", 4096, 64): "triton",
                                                  ("sigmoid_pair", "bfloat16", 4096, 64): "triton"})
    cuda = torch.device("cuda")
    for _ in range(2):  # the second round is answered from the cache
        assert resolve_backend(None, cuda, ("similarity_lse", 4099, 4093, 67, torch.bfloat16)) == "cuda"
        assert resolve_backend(None, cuda, ("similarity_lse", 4099, 4093, 67, torch.float32)) == "triton"
        assert resolve_backend(None, cuda, ("sigmoid_pair", 4099, 4093, 67, torch.bfloat16)) == "triton"


@pytest.mark.parametrize("m", [128, 192])
def test_triton_rows_end_inside_a_tile_while_columns_are_whole(m):
    """N = 67 ends inside a row tile (the interpreter's 64, a GPU's 128) while M is whole column
    tiles: the forward must still take its bounds select, as the zero rows read past N would add
    logits equal to the bias to every column's LSE (the row LSE is stored masked either way).  A
    small scale keeps the logits of order one, where those terms are not lost under the largest."""
    from fastcl.ops.dispatch import triton_available
    if not triton_available() or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()):
        pytest.skip("needs Triton's interpreter or a GPU")
    check_against_reference("triton", 67, m, 40, torch.float32, scale=0.25, bias=0.75, seed=m,
                            device="cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["triton exact", "triton shared"])
@pytest.mark.parametrize("n,m", [(67, 1), (1, 131)])
def test_a_fully_excluded_row_or_column_gets_no_gradient(backend, n, m, monkeypatch):
    """With exclude_diagonal=0 and one key (or one query) a whole row (or column) is excluded: its
    LSE is -inf, and the backward takes its probabilities as 0 (an LSE of -inf counts as +inf), so
    the gradients stay finite and equal float64's; the other side's statistics are finite."""
    name, _, exp = backend.partition(" ")
    if name == "triton":
        from fastcl.ops.dispatch import triton_available
        if not triton_available() or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs Triton's interpreter")
        monkeypatch.setenv("FASTCL_TRITON_EXP", exp)
    check_against_reference(name, n, m, 40, torch.float32, bias=0.5, offset=0, rows=True, cols=True, seed=n + m)
