"""The fastcl command line: a tiny demo run, argument errors, info, and bench --quick."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from fastcl.cli import main

@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # `fastcl train` sets torch's thread count for its process; keep the test process unchanged.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["train", "--limit", "64", "--epochs", "2", "--batch-size", "32", "--probe-repeats", "1", "--no-progress",
        "--encoder", "mlp"]


def test_tiny_train_run_prints_probe_table(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path), "--chunk-size", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("raw pixels", "untrained encoder", "trained encoder"):
        assert name in out
    assert "4 steps" in out
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["global_step"] == 4


def test_train_under_torchrun_uses_distributed_loss(tmp_path):
    """Two CPU ranks under torchrun: the process group comes up, the all-gather NT-Xent runs,
    and both ranks finish the tiny run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastcl"] + TINY + ["--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("  trained encoder") == 2  # one probe table per rank


def test_make_loss_switches_to_distributed(monkeypatch):
    from fastcl import demo
    from fastcl.losses import distributed as dl
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dl, "ntxent_loss_distributed", lambda *a, **k: calls.append("ntxent") or torch.zeros(()))
    demo.make_loss("ntxent", 0.5, None)(torch.randn(4, 3), torch.randn(4, 3))
    assert calls == ["ntxent"]


@pytest.mark.parametrize("argv, flag", [
    (["train", "--batch-size", "1"], "--batch-size"),
    (["train", "--batch-size", "8", "--chunk-size", "16"], "--chunk-size"),
    (["train", "--loss", "triplet"], "--loss"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--temperature", "0"], "--temperature"),
    (["train", "--device", "tpu"], "--device"),
    (["bench", "--cases", "nope"], "--cases"),
    (["bench", "--backends", "magic"], "--backends"),
    (["bench", "--sizes", "8,x"], "--sizes"),
])
def test_argument_errors_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main([])


def test_python_m_fastcl_info():
    out = subprocess.run([sys.executable, "-m", "fastcl", "info"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "reference" in out.stdout and torch.__version__ in out.stdout


def test_bench_quick_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # The reference backend keeps this test independent of whether fastcl._C is built.
    assert main(["bench", "--quick", "--cases", "clip", "--sizes", "16,64", "--reps", "1", "--device", "cpu",
                 "--backends", "reference", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    methods = {r["method"] for r in rows}
    assert "naive" in methods and any(m.startswith("fastcl:") for m in methods)
    assert {int(r["n"]) for r in rows} == {16, 64}
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 for r in rows)
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "speed-up" in capsys.readouterr().out


def test_bench_plot_marks_out_of_memory(tmp_path):
    pytest.importorskip("matplotlib")
    from fastcl.profiling import plot
    rows = [dict(case="clip", method="naive", n=n, time_ms=float(n), peak_mem_mb=float(n), status="ok")
            for n in (8, 16)] + [dict(case="clip", method="naive", n=32, time_ms=None, peak_mem_mb=None, status="oom")]
    assert plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["clip", "info_nce", "ntxent", "siglip", "dcl", "supcon", "masking"])
def test_bench_baselines_compute_the_fused_loss(case):
    """A speed ratio means something only when both sides compute the same thing: each case's
    naive PyTorch baseline equals the fused op, in value and gradient (float64, odd size)."""
    from fastcl.profiling import CASES
    make, methods = CASES[case]()
    outs = {}
    for name in ("naive", "fused"):
        x = make(37, 12, "cpu", torch.float64, torch.Generator().manual_seed(5))
        out = methods[name](x, "reference")
        outs[name] = (out.detach(), torch.autograd.grad(out.sum(), x[0])[0])
    for a, b in zip(outs["naive"], outs["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
