"""The cuda backend's strip driver (fastcl/ops/strips.py) on the CPU, with the CUDA epilogues
replaced by a float64 PyTorch stand-in (tests/_strip_emulation.py) and by the CUDA epilogue
kernels themselves compiled for the CPU (tests/_cuda_host.py): strip boundaries, the diagonal
offset per strip, the column merge across strips, the in-place gradient tile and the autograd
formulas, against the float64 reference at odd sizes with a tiny workspace.  Also the workspace
bound, the dispatch table and the errors.  The kernels one by one: tests/test_cuda_host.py (on
the CPU) and tests/test_gpu.py."""
import os
import pathlib
import re
import types

import pytest
import torch

import _cuda_host
from _strip_emulation import TorchEpilogues, route_cuda_backend
from conftest import DTYPES, assert_close, fp32_output_tol, load_module, randn
from fastcl.ops import dispatch, dispatch_table, strips
from fastcl.ops.dispatch import resolve_backend

ROOT = pathlib.Path(__file__).resolve().parents[1]


def counting(base):
    """``base`` with a count of its lse_fwd calls (one per strip)."""
    class Counting(base):
        calls = 0

        @classmethod
        def lse_fwd(cls, *args):
            Counting.calls += 1
            return base.lse_fwd(*args)
    return Counting


EPILOGUE_KINDS = ["stand-in"] + (["kernels"] if _cuda_host.compiler() else [])


@pytest.fixture(params=[(kind, mb) for kind in EPILOGUE_KINDS for mb in (0.01, 0.0015)],
                ids=lambda p: f"{p[0]}-strips{16 if p[1] == 0.01 else 3}")
def emulated(request, monkeypatch):
    """backend="cuda" on CPU tensors runs the real driver with the float64 stand-in epilogues, or
    with the CUDA epilogue kernels compiled for the CPU (tests/_cuda_host.py); the workspace holds
    16 (or 3) rows of 131 columns, so N=67 takes 5 (or 23) strips.  Returns the epilogues class."""
    kind, mb = request.param
    epilogues = counting(TorchEpilogues if kind == "stand-in" else _cuda_host.HostEpilogues)
    route_cuda_backend(monkeypatch, epilogues)
    monkeypatch.setattr(strips, "WORKSPACE_MB", mb)
    epilogues.workspace_mb = mb
    return epilogues


def test_workspace_gives_several_strips(emulated):
    assert strips.strip_rows(67, 131) == (16 if emulated.workspace_mb == 0.01 else 3)
    from test_similarity_lse import check_against_reference
    check_against_reference("cuda", 67, 131, 40, torch.float32, cols=True)
    assert emulated.calls == (5 if emulated.workspace_mb == 0.01 else 23)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", [(67, 131, 40), (1, 2, 3), (300, 17, 8)])
def test_lse_matches_reference(emulated, dtype, n, m, d):
    from test_similarity_lse import check_against_reference
    check_against_reference("cuda", n, m, d, dtype, bias=0.75, seed=n + d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [None, 0, 3, -2, 17, 200])
@pytest.mark.parametrize("rows,cols", [(True, False), (False, True), (True, True)])
def test_lse_options(emulated, dtype, offset, rows, cols):
    from test_similarity_lse import check_against_reference
    check_against_reference("cuda", 67, 131, 40, dtype, offset=offset, rows=rows, cols=cols,
                            bias=None if offset is None else -1.25, seed=7)


def test_lse_fully_excluded_row(emulated):
    from fastcl.ops import similarity_lse
    q = torch.randn(1, 4, requires_grad=True)
    r = similarity_lse(q, torch.randn(1, 4), 1.0, exclude_diagonal=0, backend="cuda")
    assert r.item() == float("-inf")
    r.exp().sum().backward()  # a fully excluded row has zero gradient
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_the_check_catches_a_lost_strip(emulated, monkeypatch):
    """A driver that kept only the first strip's column statistics must fail the comparison."""
    from test_similarity_lse import check_against_reference
    seen = []

    class FirstStripOnly(TorchEpilogues):
        @staticmethod
        def lse_fwd(scores, scale, bias, diag, rows, cols):
            row, col = TorchEpilogues.lse_fwd(scores, scale, bias, diag, rows, cols)
            seen.append(1)
            return row, (col if len(seen) == 1 else torch.full_like(col, float("-inf")))

    monkeypatch.setattr(strips, "EPILOGUES", FirstStripOnly)
    with pytest.raises(AssertionError, match="relative error"):
        check_against_reference("cuda", 67, 131, 40, torch.float32, rows=False, cols=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", [(67, 131, 40), (131, 67, 24), (1, 3, 5)])
def test_sigmoid_matches_oracle(emulated, dtype, n, m, d):
    import torch.nn.functional as F
    from test_sigmoid_pair import _run
    g = torch.Generator().manual_seed(n * 1000 + m)
    q = F.normalize(randn(n, d, generator=g), dim=1).to(dtype)
    k = F.normalize(randn(m, d, generator=g), dim=1).to(dtype)
    outs, refs = _run(q, k, torch.tensor(10.5), torch.tensor(-9.5), "cuda")
    for what, o, r in zip(["loss", "dq", "dk", "dscale", "dbias"], outs, refs):
        if what in ("dq", "dk"):
            assert o.dtype == dtype
            assert_close(o, r, dtype, f"cuda {what}", elementwise=True)
        else:  # fp32: the loss and dbias at fp32's TOL, dscale (from the rounded tiles) at dtype's
            assert o.dtype == torch.float32
            assert_close(o, r, fp32_output_tol(dtype, "cuda", from_tiles=what == "dscale"), f"cuda {what}")


def test_inplace_view_shares_the_strip():
    scores = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    v = strips.inplace_view(scores, torch.bfloat16)
    assert v.shape == (3, 4) and v.stride() == (8, 1) and v.data_ptr() == scores.data_ptr()
    assert strips.inplace_view(scores, torch.float32) is scores


@pytest.mark.parametrize("n,m", [(67, 131), (32768, 32768), (131072, 131072), (5, 3_000_000), (10**6, 1000)])
@pytest.mark.parametrize("mb", [0.01, 1.0, 256.0])
def test_strip_rows_respect_the_budget(n, m, mb):
    budget = int(mb * 2**20)
    rows = strips.strip_rows(n, m, budget)
    assert 1 <= rows <= n
    if strips.workspace_usage(1, m) <= budget:
        assert strips.workspace_usage(rows, m) <= budget
        # and not wastefully small: one more row group would not fit (or all rows are in).
        more = rows + (strips.PARTIAL_ROWS if rows >= strips.PARTIAL_ROWS else 1)
        assert rows == n or strips.workspace_usage(more, m) > budget


def test_workspace_setting(monkeypatch):
    monkeypatch.delenv("FASTCL_WORKSPACE_MB", raising=False)
    assert strips.workspace_mb() == 64.0 and strips.workspace_bytes() == 64 * 2**20
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "200")
    assert strips.workspace_bytes() == 200 * 2**20
    monkeypatch.setattr(strips, "WORKSPACE_MB", 8)
    assert strips.workspace_bytes() == 8 * 2**20
    monkeypatch.setattr(strips, "WORKSPACE_MB", None)
    for bad in ("0", "-3", "lots"):
        monkeypatch.setenv("FASTCL_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match="FASTCL_WORKSPACE_MB must"):
            strips.workspace_bytes()
    monkeypatch.delenv("FASTCL_WORKSPACE_MB")
    monkeypatch.setenv("FASTCL_CUDA_WORKSPACE_MB", "128")  # the old name is refused, not ignored
    with pytest.raises(ValueError, match="renamed FASTCL_WORKSPACE_MB"):
        strips.workspace_bytes()


def test_partial_constants_match_the_kernel():
    header = (ROOT / "csrc/cuda/similarity_strips.cuh").read_text()
    assert int(re.search(r"kFwdRowsPerBlock = (\d+);", header).group(1)) == strips.PARTIAL_ROWS
    assert int(re.search(r"kFwdSplitCols = (\d+);", header).group(1)) == strips.SPLIT_COLS


def test_float64_is_refused_with_a_clear_error():
    q = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="cuda backend supports float32, bfloat16 and float16"):
        strips.lse_forward(q, q, torch.tensor(1.0), torch.tensor(0.0), True, False, None)


def test_backend_cuda_errors_name_the_problem():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        resolve_backend("cuda", torch.device("cpu"))
    from fastcl._ext import extension_has_cuda
    if not extension_has_cuda():
        with pytest.raises(RuntimeError, match="fastcl._C built with CUDA"):
            resolve_backend("cuda", torch.device("cuda"))


def test_dispatch_table_lookup(monkeypatch):
    assert dispatch_table.DEFAULT == "triton"
    # The committed file says whether it was measured, and on what, consistently with its table.
    measured = bool(dispatch_table.TABLE)
    assert (dispatch_table.MEASURED_ON is not None) == measured == ("NOT MEASURED" not in dispatch_table.__doc__)
    assert not measured or dispatch_table.MEASURED_ON in " ".join(dispatch_table.__doc__.split())
    # An unmeasured (empty) table: DEFAULT everywhere.
    monkeypatch.setattr(dispatch_table, "TABLE", {})
    for op in ("similarity_lse", "sigmoid_pair", "masking"):
        assert dispatch.pick_gpu_backend(op, 32768, 32768, 768, torch.bfloat16) == "triton"
    table = {("similarity_lse", "bfloat16", 4096, 64): "triton", ("similarity_lse", "bfloat16", 32768, 2048): "cuda",
             ("sigmoid_pair", "float32", 4096, 64): "cuda"}
    monkeypatch.setattr(dispatch_table, "TABLE", table)
    pick = dispatch.pick_gpu_backend
    assert pick("similarity_lse", 30000, 40000, 4000, torch.bfloat16) == "cuda"
    assert pick("similarity_lse", 1000, 1000, 32, torch.bfloat16) == "triton"
    assert pick("similarity_lse", 1000, 1000, 32, torch.float16) == "triton"  # no entries: DEFAULT
    assert pick("sigmoid_pair", 10, 10, 3, torch.float32) == "cuda"
    # Answers are remembered per table: a repeated question skips the search, a new table
    # (another object) is searched afresh.
    searched = []
    search = dispatch._nearest_entry
    monkeypatch.setattr(dispatch, "_nearest_entry", lambda *a: searched.append(a[1:]) or search(*a))
    assert pick("similarity_lse", 30000, 40000, 4000, torch.bfloat16) == "cuda" and searched == []
    monkeypatch.setattr(dispatch_table, "TABLE", {("similarity_lse", "bfloat16", 32768, 2048): "triton"})
    assert pick("similarity_lse", 30000, 40000, 4000, torch.bfloat16) == "triton" and len(searched) == 1


def test_auto_on_cuda_consults_the_table_only_with_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "pick_gpu_backend", lambda *a: "cuda")
    problem = ("similarity_lse", 8, 8, 4, torch.float32)
    monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: True)
    assert resolve_backend("auto", torch.device("cuda"), problem) == "cuda"
    if dispatch.triton_available():
        assert resolve_backend("auto", torch.device("cuda")) == "triton"  # no problem given: old rule
        monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: False)
        assert resolve_backend("auto", torch.device("cuda"), problem) == "triton"


def test_stand_in_has_the_cuda_signatures():
    import inspect
    for name in ("lse_fwd", "lse_bwd", "sigmoid_fwd", "sigmoid_bwd"):
        assert (inspect.signature(getattr(strips.CudaEpilogues, name))
                == inspect.signature(getattr(TorchEpilogues, name))), name


def test_info_reports_the_workspace_and_the_table(monkeypatch, capsys):
    from fastcl.cli import main
    monkeypatch.setenv("FASTCL_WORKSPACE_MB", "64")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU workspace (triton and cuda strips): 64 MB (FASTCL_WORKSPACE_MB" in out
    assert "auto on CUDA, triton vs cuda: table" in out
    if dispatch.triton_available():
        assert "Triton launch shape (BLOCK_M,BLOCK_N,BLOCK_D,warps,stages[,forward maxnreg] at D=768): half 64,128,64,4,3, fp32 128,64,32,8,3, half row-only forward 128,128,64,8,3" in out
        monkeypatch.setenv("FASTCL_TRITON_TILE", "64,64,32,4,2")
        monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "maybe")  # a bad value is reported, not raised
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "half 64,64,32,4,2, fp32 64,64,32,4,2 (FASTCL_TRITON_TILE)" in out
        assert "FASTCL_TRITON_AUTOTUNE must be 0 or 1" in out


def test_info_says_why_the_cuda_kernels_are_missing(monkeypatch, capsys):
    """A CUDA torch with a CPU-only fastcl._C (the build fell back) gets the way to rebuild."""
    from fastcl import _ext
    from fastcl.cli import main
    if not _ext.extension_available():
        pytest.skip("needs the C++ extension")
    monkeypatch.setattr(_ext, "extension_has_cuda", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert main(["info"]) == 0
    assert "fastcl._C was built without CUDA (rebuild it where nvcc is" in capsys.readouterr().out
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["info"]) == 0
    assert "fastcl._C was built without CUDA (torch has no CUDA)" in capsys.readouterr().out


def _gpu_bench():
    return load_module("gpu_bench", ROOT / "benchmarks/gpu_bench.py")


def test_kernel_profile_ranks_operators_by_their_own_time():
    """The GPU benchmarks' per-kernel profile, run on the CPU (operators instead of kernels)."""
    from fastcl.profiling import kernel_profile
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    prof = kernel_profile(lambda: (a @ b).relu().sum(), steps=3, device="cpu", top=2)
    assert len(prof["top"]) == 2
    first, second = prof["top"]
    assert first["ms_per_step"] >= second["ms_per_step"] > 0
    assert any("mm" in r["name"] for r in prof["top"])
    assert prof["busy_ms_per_step"] >= first["ms_per_step"] + second["ms_per_step"] - 1e-9
    assert prof["wall_ms_per_step"] > 0


def test_host_profile_times_the_issue_and_names_the_functions():
    """The GPU benchmarks' host-time profile, run on the CPU: the slow Python function is found
    by its own time, and host time cannot exceed wall time."""
    from fastcl.profiling import host_profile

    def slow_python():
        total = 0
        for i in range(20000):
            total += i
        return total

    prof = host_profile(lambda: (slow_python(), torch.ones(3).sum()), steps=4, device="cpu", top=3)
    assert len(prof["top"]) == 3 and "slow_python" in prof["top"][0]["function"]
    assert prof["top"][0]["calls_per_step"] == 1.0 and prof["top"][0]["own_ms_per_step"] > 0
    assert 0 < prof["host_ms_per_step"] <= prof["wall_ms_per_step"]
    with pytest.raises(ValueError, match="steps must be a positive int"):
        host_profile(slow_python, steps=0, device="cpu")


def test_gpu_bench_reads_nd_lists_and_names_a_bad_one(capsys, monkeypatch):
    import argparse
    bench = _gpu_bench()
    assert bench.nd_list("32768:768,8192:256") == [(32768, 768), (8192, 256)] and bench.nd_list("") == []
    for bad in ("32768", "32768:0", "a:b", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="N:D"):
            bench.nd_list(bad)
    for option in ("--profile", "--host-profile"):
        monkeypatch.setattr("sys.argv", ["gpu_bench.py", option, "32768x768"])
        with pytest.raises(SystemExit):
            bench.main()
        assert f"argument {option}: expected a comma list of N:D" in capsys.readouterr().err


def test_source_commit_for_benchmark_results(monkeypatch):
    from fastcl.profiling import source_commit
    monkeypatch.setenv("FASTCL_COMMIT", "abc1234")  # a copy without .git, e.g. on a GPU machine
    assert source_commit() == "abc1234"
    monkeypatch.delenv("FASTCL_COMMIT")
    assert source_commit()  # the checkout's short hash, or "unknown" outside a checkout


def test_config_sweep_rows_on_cpu(monkeypatch):
    """The suite's launch-shape sweep, run through the interpreter with the timer stubbed: one row
    per shape and part, and FASTCL_TRITON_TILE unset again afterwards."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter")
    import triton.testing
    bench = _gpu_bench()
    from fastcl.kernels import similarity_lse as K
    seen, exps = [], []

    def fake_bench(fn, *args, **kwargs):
        seen.append(os.environ.get("FASTCL_TRITON_TILE"))
        exps.append(K.exp_mode())
        # What a GPU launch would take (the interpreter keeps its own small tiles).
        assert ",".join(map(str, K.gpu_launch_shape(torch.bfloat16))) == seen[-1]
        fn()
        return 1.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.delenv("FASTCL_TRITON_TILE", raising=False)
    rows = bench.config_sweep(67, 40, torch.float32, 10, device="cpu")
    assert len(rows) == 3 * len(K.TUNE_SHAPES) and all(r["median_ms"] == 1.0 for r in rows)
    assert seen == [",".join(map(str, sh)) for sh in K.TUNE_SHAPES for _ in range(3)]
    assert set(exps) == {"exact"} and {r["exp"] for r in rows} == {"exact"}
    assert "FASTCL_TRITON_TILE" not in os.environ
    # Each exp mode times every shape; the rows say which, and the user's setting comes back.
    monkeypatch.setenv("FASTCL_TRITON_EXP", "exact")
    seen.clear(), exps.clear()
    rows = bench.config_sweep(67, 40, torch.float32, 10, device="cpu", shapes=[(128, 64, 32, 4, 2)],
                              exp_modes=("exact", "shared"))
    assert [r["exp"] for r in rows] == ["exact"] * 3 + ["shared"] * 3 and exps == [r["exp"] for r in rows]
    assert os.environ["FASTCL_TRITON_EXP"] == "exact"
    assert bench.exp_list("exact,shared") == ("exact", "shared")
    with pytest.raises(Exception, match="--sweep-exp"):
        bench.exp_list("exact,fast")
    monkeypatch.setenv("FASTCL_TRITON_TILE", "64,64,64,4,3")  # a user's own shape comes back
    assert len(bench.config_sweep(67, 40, torch.float32, 10, device="cpu", shapes=[(128, 64, 32, 4, 2)])) == 3
    assert os.environ["FASTCL_TRITON_TILE"] == "64,64,64,4,3"
    monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "1")  # the autotuner would override the shapes
    assert bench.config_sweep(67, 40, torch.float32, 10, device="cpu") == []


def test_rendered_dispatch_table_is_what_auto_reads(monkeypatch, tmp_path):
    """The file gpu_bench.py --dispatch-table writes is a valid dispatch_table.py."""
    bench = _gpu_bench()
    table = {("similarity_lse", "bfloat16", 4096, 64): "triton", ("similarity_lse", "bfloat16", 32768, 2048): "cuda",
             ("masking", "bfloat16", 32768, 64): "cuda"}
    timings = {k: (1.0, None if v == "cuda" else 2.0) for k, v in table.items()}
    text = bench.render_dispatch_table("Test GPU, torch x", (4096, 32768), (64, 2048), table, timings)
    path = tmp_path / "dispatch_table.py"
    path.write_text(text)
    rendered = load_module("rendered_table", path)
    assert rendered.MEASURED_ON == "Test GPU, torch x" and rendered.TABLE == table
    assert "NOT MEASURED" not in rendered.__doc__
    for name in ("TABLE", "DEFAULT", "MEASURED_ON"):
        monkeypatch.setattr(dispatch_table, name, getattr(rendered, name))
    assert dispatch.pick_gpu_backend("similarity_lse", 32768, 32768, 1536, torch.bfloat16) == "cuda"
    assert dispatch.pick_gpu_backend("similarity_lse", 8192, 8192, 128, torch.bfloat16) == "triton"
    assert dispatch.pick_gpu_backend("masking", 50176, 50176, 768, torch.bfloat16) == "cuda"
    assert "random_masking" in rendered.__doc__


def test_dispatch_table_timings_run_every_op(monkeypatch):
    """The --dispatch-table step's timed call, for each op (masking included), on CPU tensors with
    the timer stubbed: the step runs and its gradients exist."""
    pytest.importorskip("triton")
    import triton.testing
    bench = _gpu_bench()
    ran = []

    def fake_bench(fn, *args, **kwargs):
        grads = fn()
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        ran.append(len(grads))
        return 1.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    for op in bench.OPS:
        assert bench.time_op(op, "reference", 400, 8, torch.float32, 10, device="cpu") == 1.0
    assert ran == [2, 2, 1]


def test_auto_never_sends_float64_to_the_cuda_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda"), ("similarity_lse", 8, 8, 4, torch.float64)) == "reference"
    assert resolve_backend("auto", torch.device("cuda"), ("similarity_lse", 8, 8, 4, torch.float32)) == "cuda"


def test_auto_sends_float64_on_cuda_to_the_reference(monkeypatch):
    """Neither GPU backend takes float64 (the Triton kernels raise a TypeError for it)."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    for op in ("similarity_lse", "sigmoid_pair"):
        assert resolve_backend("auto", cuda, (op, 8, 8, 4, torch.float64)) == "reference"
        assert resolve_backend("auto", cuda, (op, 8, 8, 4, torch.float32)) in ("triton", "cuda")
    # The ring's blocks (fastcl/ring.py) resolve through the same function, with their block's problem.
    from fastcl.ring import block_backend
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    seen = []
    monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(dispatch, "pick_gpu_backend", lambda *problem: seen.append(problem) or "cuda")
    def cuda_q(dtype):  # block_backend reads only shape, device and dtype
        return types.SimpleNamespace(shape=(8, 4), device=cuda, dtype=dtype)
    for op in ("similarity_lse", "sigmoid_pair"):
        assert block_backend(op, None, cuda_q(torch.float64), [8, 8]) == "reference"
        q = cuda_q(torch.bfloat16)
        assert block_backend(op, "auto", q, [8, 16, 5]) == "cuda"  # the measured table's answer
        assert seen[-1] == (op, 8, 16, 4, torch.bfloat16)  # q against the largest shard
        assert block_backend(op, "triton", q, [8]) == "triton"  # asked for: used as is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_f32_into(dtype, accumulate):
    # out (+)= a @ b in fp32 for every input dtype; on the CPU half inputs take the fp32-copy path.
    from fastcl.ops.strips import mm_f32_into
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 53, generator=gen).to(dtype), torch.randn(53, 29, generator=gen).to(dtype)
    out = torch.randn(37, 29, generator=gen)
    expected = (out.double() if accumulate else 0) + a.double() @ b.double()
    mm_f32_into(out, a, b.T.contiguous().T, accumulate)
    assert out.dtype == torch.float32
    # fp32 products and sums of inputs that float64 gets rounded alike: fp32's TOL, element by element too
    assert_close(out, expected, torch.float32, f"mm_f32_into {dtype}", elementwise=True)
