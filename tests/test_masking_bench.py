"""Smoke test of the GPU masking report (benchmarks/bench_masking.py) on the CPU.

The timers are stubbed (each calls the timed function once and reports 1 ms) and Triton runs in
the interpreter, so this checks that every row's callable runs and the report has the rows the
GPU suite expects (eager and CUDA-graph timings, kernels-only rows, the index tensors alone, the
launch-shape sweep, an explicit "skipped" row for a backend that cannot run) before a GPU
session spends time on it."""
import pathlib

import pytest
import torch

from conftest import load_module
from fastcl.ops.dispatch import triton_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_bench():
    return load_module("bench_masking", ROOT / "benchmarks" / "bench_masking.py")


@pytest.mark.skipif(torch.cuda.is_available() or not triton_available(),
                    reason="CPU smoke test (needs Triton's interpreter; a GPU runs the real report)")
def test_gpu_report_rows_on_cpu(monkeypatch):
    import triton.testing

    bench = load_bench()
    calls = []

    def fake_timer(fn, *args, **kwargs):
        calls.append(fn)
        fn()
        return 1.0
    monkeypatch.setattr(triton.testing, "do_bench", fake_timer)
    monkeypatch.setattr(bench, "graph_ms", fake_timer)
    rows = bench.gpu_masking_report(B=2, L=8, D=16, dtype=torch.float32, impls=("mae", "triton", "cuda"),
                                    sweep=True, device="cpu")
    timed = {(r["impl"], r["timing"]) for r in rows if "ms" in r}
    for impl in ("mae", "triton", "triton:kernels_only"):
        assert (impl, "eager") in timed and (impl, "cuda_graph") in timed, impl
    assert ("argsort:indices", "cuda_graph") in timed and ("triton:indices", "cuda_graph") in timed
    assert any(r["impl"] == "cuda" and "skipped" in r for r in rows)   # said, not silently dropped
    sweep = [r for r in rows if r["impl"].startswith("triton:kernels_only[")]
    assert len(sweep) == len(bench.SWEEP) and all(r["timing"] == "cuda_graph" for r in sweep)
    for r in rows:
        if "ms" in r and not r["impl"].endswith(":indices"):
            assert r["copy_ratio"] == 1.0 and r["moved_bytes"] == bench.moved_bytes(2, 8, 16, torch.float32)


def test_cpu_report_ratios():
    """The CPU report times MAE and fastcl in turns and derives its ratios from those rounds."""
    from fastcl._ext import extension_available
    bench = load_bench()
    impl = "cpu" if extension_available() else "reference"
    rows = {r["impl"]: r for r in bench.cpu_masking_report(B=2, L=9, D=5, rounds=3, reps=2, impls=("mae", impl))}
    mae, ours = rows["mae"], rows[impl]
    assert len(mae["round_ms"]) == len(ours["round_ms"]) == 3
    assert ours["speedup_vs_mae"] == mae["ms"] / ours["ms"]
    assert ours["min_round_speedup"] == min(m / f for m, f in zip(mae["round_ms"], ours["round_ms"]))
    assert ours["temp_ratio_vs_mae"] == mae["temp_bytes"] / max(ours["temp_bytes"], 1)
    assert "speedup_vs_mae" not in mae


@pytest.mark.parametrize("rounds", ["0", "-2", "two"])
def test_cpu_report_rejects_bad_rounds(rounds, capsys):
    with pytest.raises(SystemExit):
        load_bench().main(["--device", "cpu", "--rounds", rounds])
    assert "--rounds" in capsys.readouterr().err
