"""The fastcl command line: a tiny demo run, argument errors, info, and bench --quick."""
import csv
import json
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


def test_train_resumes_from_a_checkpoint(tmp_path, capsys):
    """--max-steps stops a run with a checkpoint; --resume continues it to --epochs, and the
    metrics file then holds every step once."""
    assert main(TINY + ["--out", str(tmp_path), "--max-steps", "1"]) == 0
    assert "1 steps" in capsys.readouterr().out
    assert main(TINY + ["--out", str(tmp_path), "--resume", str(tmp_path / "checkpoint.pt")]) == 0
    assert "3 steps" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == 4
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["global_step"] == 4


def test_train_under_torchrun_uses_distributed_loss(tmp_path):
    """Two CPU ranks under torchrun: the process group comes up, the all-gather NT-Xent runs,
    and both ranks finish the tiny run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastcl"] + TINY + ["--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 alone prints: one table, and a line saying how the training images were shared.
    assert proc.stdout.count("  trained encoder") == 1
    assert proc.stdout.count("total wall time") == 1
    assert "2 processes, each training on its 1/2 share of the 64 training images" in proc.stdout


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
    (["train", "--limit", "100"], "--batch-size"),  # the default batch of 256 > 100 images
    (["train", "--backend", "triton", "--device", "cpu"], "--backend"),
    (["train", "--batch-size", "8", "--chunk-size", "16"], "--chunk-size"),
    (["train", "--loss", "triplet"], "--loss"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--temperature", "0"], "--temperature"),
    (["train", "--device", "tpu"], "--device"),
    (["bench", "--cases", "nope"], "--cases"),
    (["bench", "--backends", "magic"], "--backends"),
    (["bench", "--sizes", "8,x"], "--sizes"),
    (["bench", "--backends", "triton", "--device", "cpu", "--cases", "clip", "--sizes", "8"], "--backends"),
    (["train", "--resume", "/nonexistent/checkpoint.pt"], "--resume"),
    (["bench", "--threads", "0"], "--threads"),
])
def test_argument_errors_name_the_flag(argv, flag, capsys, monkeypatch):
    """Mistakes end before any slow work, with the subcommand's usage and an error naming the flag."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton on the CPU must stay unusable
    monkeypatch.delenv("FASTCL_BACKEND", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: fastcl {argv[0]} " in err and f"fastcl {argv[0]}: error: " in err
    assert flag in err.splitlines()[-1]


def test_train_checks_fastcl_backend_up_front(capsys, monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "gpu")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--device", "cpu"])
    assert exc.value.code == 2
    assert "FASTCL_BACKEND" in capsys.readouterr().err


def test_help_shows_defaults_and_version(capsys):
    import fastcl
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: 256)" in out and "(default: ntxent)" in out and "(default: 320)" in out
    assert "BatchNorm" in out and "changes the objective" in out  # --chunk-size is not only about memory
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert "--threads" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastcl {fastcl.__version__}"


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2  # argparse's usage error, not --help's 0
    assert "usage:" in capsys.readouterr().err


def test_info_marks_invalid_settings(capsys, monkeypatch):
    """Bad environment settings are reported as invalid, each on its line, never as a traceback."""
    from fastcl import _ext
    from fastcl.ops.dispatch import triton_available
    monkeypatch.setenv("FASTCL_CPU_GEMM", "bogus")
    monkeypatch.setenv("FASTCL_BACKEND", "gpu")
    monkeypatch.setenv("FASTCL_TRITON_BWD", "sideways")
    monkeypatch.setenv("FASTCL_TRITON_EXP", "approx")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "FASTCL_BACKEND=gpu: invalid (" in out
    if _ext.extension_available():
        assert "invalid (FASTCL_CPU_GEMM must be" in out
    if triton_available():
        assert "FASTCL_TRITON_BWD invalid (" in out and "FASTCL_TRITON_EXP invalid (" in out


def test_info_follows_fastcl_backend(capsys, monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "reference")
    assert main(["info"]) == 0
    assert "FASTCL_BACKEND=reference: cpu tensors -> reference" in capsys.readouterr().out
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")
    assert main(["info"]) == 0
    assert "cpu tensors -> unusable (" in capsys.readouterr().out


def test_info_into_a_closed_pipe_exits_quietly():
    """`fastcl info | head -1`: the reader goes away; no BrokenPipeError traceback, status 141."""
    proc = subprocess.Popen([sys.executable, "-m", "fastcl", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc.stdout.close()  # before the child's first write: that write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_python_m_fastcl_info():
    out = subprocess.run([sys.executable, "-m", "fastcl", "info"], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "reference" in out.stdout and torch.__version__ in out.stdout


def test_bench_quick_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    # The reference backend keeps this test independent of whether fastcl._C is built.
    assert main(["bench", "--quick", "--cases", "clip", "--sizes", "16,64", "--reps", "1", "--device", "cpu",
                 "--backends", "reference", "--threads", "2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    methods = {r["method"] for r in rows}
    assert "naive" in methods and any(m.startswith("fastcl:") for m in methods)
    assert {int(r["n"]) for r in rows} == {16, 64}
    # Every sweep (each its own process) ran with the threads asked for, and says so.
    assert {r["threads"] for r in rows} == {"2"}
    assert json.load(open(tmp_path / "bench.json"))["meta"]["threads"] == 2
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


@pytest.mark.parametrize("case", ["clip", "info_nce", "ntxent", "siglip", "dcl", "hypersphere", "supcon", "masking"])
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
