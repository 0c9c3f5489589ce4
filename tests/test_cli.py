"""The fastcl command line: a tiny demo run, argument errors, info, and bench --quick."""
import csv
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import assert_close
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


def test_resume_needs_the_same_schedule_length(tmp_path, capsys):
    """The checkpoint's LR schedule has a fixed length: resuming with another --epochs stepped it
    past its end (a traceback from the scheduler) or cut it short silently; now a parser error."""
    assert main(TINY + ["--out", str(tmp_path), "--max-steps", "1"]) == 0
    capsys.readouterr()
    epochs = TINY[TINY.index("--epochs") + 1]
    more = [v if i != TINY.index("--epochs") + 1 else str(int(epochs) + 1) for i, v in enumerate(TINY)]
    with pytest.raises(SystemExit):
        main(more + ["--out", str(tmp_path), "--resume", str(tmp_path / "checkpoint.pt")])
    assert "the checkpoint's learning-rate schedule spans" in capsys.readouterr().err


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
    # Non-finite and out-of-range numbers: parser errors, not tracebacks (or silence) later on.
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--lr", "-1e-3"], "--lr"),
    (["train", "--lr", "1e300"], "--lr"),  # finite, but AdamW's float32 update overflows
    (["train", "--lr", "fast"], "--lr"),
    (["train", "--temperature", "inf"], "--temperature"),
    (["train", "--temperature", "nan"], "--temperature"),
    (["train", "--temperature", "-0.5"], "--temperature"),
    (["train", "--temperature", "1e-45"], "--temperature"),  # 1/temperature overflows float32
    (["train", "--seed", "99999999999999999999"], "--seed"),
    (["train", "--seed", str(2**63)], "--seed"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--threads", "100000"], "--threads"),
    (["bench", "--threads", "100000"], "--threads"),
    (["train", "--limit", "0"], "--limit"),
    (["train", "--max-steps", "0"], "--max-steps"),
    (["train", "--probe-repeats", "0"], "--probe-repeats"),
    (["train", "--chunk-size", "0"], "--chunk-size"),
    # A chunk of one sample: BatchNorm cannot normalise it.
    (["train", "--limit", "64", "--batch-size", "32", "--chunk-size", "1"], "--chunk-size"),
    (["train", "--limit", "66", "--batch-size", "33", "--chunk-size", "16"], "--chunk-size"),
    # An empty list after splitting at the commas: an error, not the defaults or a naive-only run.
    (["bench", "--sizes", ","], "--sizes"),
    (["bench", "--sizes", ""], "--sizes"),
    (["bench", "--backends", ","], "--backends"),
    (["bench", "--cases", ","], "--cases"),
    (["bench", "--sizes", "0"], "--sizes"),
    (["bench", "--cases", "clip", "--sizes", "99999999999999999999", "--device", "cpu"], "--sizes"),
    (["bench", "--cases", "clip", "--sizes", "8", "--dim", str(2**63), "--device", "cpu"], "--dim"),
    (["bench", "--dim", "0"], "--dim"),
    (["bench", "--reps", "0"], "--reps"),
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


def _usage_error(argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's usage error (status 2), return stderr's last line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: fastcl {argv[0]} " in err and "Traceback" not in err
    return err.splitlines()[-1]


def test_valid_edge_values_still_parse():
    """The new bounds reject only what cannot run: values at their edges parse unchanged."""
    from fastcl.cli import build_parser
    args = build_parser().parse_args(["train", "--seed", str(2**63 - 1), "--lr", "1e-12", "--temperature", "1e-30",
                                      "--threads", str(os.cpu_count() or 1)])
    assert (args.seed, args.lr, args.temperature, args.threads) == (2**63 - 1, 1e-12, 1e-30, os.cpu_count() or 1)
    args = build_parser().parse_args(["train", "--temperature", "1e300"])  # 1/T is tiny, not an overflow
    assert args.temperature == 1e300
    args = build_parser().parse_args(["bench", "--sizes", "8,,16,"])  # empty items between commas are skipped
    assert args.sizes == [8, 16]
    defaults = build_parser().parse_args(["train"])
    assert (defaults.seed, defaults.lr, defaults.temperature, defaults.threads) == (0, 3e-3, 0.5, 1)


@pytest.mark.parametrize("command", ["train", "bench"])
def test_out_must_not_be_a_file(command, tmp_path, capsys):
    afile = tmp_path / "results"
    afile.write_text("not a directory")
    extra = ["--device", "cpu", "--cases", "clip", "--sizes", "8"] if command == "bench" else ["--limit", "64"] + TINY[5:]
    line = _usage_error([command, "--out", str(afile)] + extra, capsys)
    assert "--out" in line and str(afile) in line and "not a directory" in line
    line = _usage_error([command, "--out", str(afile / "sub")] + extra, capsys)  # under a file: not creatable
    assert "--out" in line and str(afile / "sub") in line
    assert afile.read_text() == "not a directory"


def _fake_checkpoint(**changes):
    """What Trainer.state_dict holds for the mlp encoder, seed 0 and batch size 32, with ``changes``."""
    from fastcl.train import CHECKPOINT_KEYS
    from fastcl.demo import ENCODERS
    state = dict.fromkeys(CHECKPOINT_KEYS)
    state.update(seed=0, batch_size=32, world_size=1,
                 model={f"encoder.{k}": v for k, v in ENCODERS["mlp"]().state_dict().items()})
    state.update(changes)
    return state


@pytest.mark.parametrize("content, words", [
    (b"this is no checkpoint\n", "not a checkpoint"),  # UnpicklingError
    (b"", "not a checkpoint"),  # EOFError
    ("truncated", "not a checkpoint"),  # a real torch.save archive, cut short
    ([1, 2, 3], "not a checkpoint"),  # loads, but is no checkpoint dict
    ({"model": {}}, "not a checkpoint"),  # a dict missing the Trainer's keys
    (_fake_checkpoint(seed=7), "--seed 7"),
    (_fake_checkpoint(world_size=2), "written by 2 process(es), not 1"),
    (_fake_checkpoint(batch_size=16), "--batch-size 16"),
    (_fake_checkpoint(model={"encoder.0.weight": torch.zeros(3, 3)}), "--encoder mlp"),
])
def test_resume_must_be_a_matching_checkpoint(content, words, tmp_path, capsys):
    """A --resume file that is no checkpoint, or one written with another seed, batch size or
    encoder: an error naming --resume and the path, up front, never an UnpicklingError traceback."""
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save(_fake_checkpoint(), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save(content, path)
    line = _usage_error(TINY + ["--resume", str(path), "--device", "cpu"], capsys)
    assert "--resume" in line and str(path) in line and words in line


def test_resume_accepts_its_fake_checkpoint(tmp_path, monkeypatch):
    """The fake checkpoint above passes the up-front check: its failures are the ones tested."""
    import argparse

    from fastcl import cli
    path = tmp_path / "checkpoint.pt"
    torch.save(_fake_checkpoint(), path)
    args = cli.build_parser().parse_args(TINY + ["--resume", str(path)])
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(parser, "error", lambda message: pytest.fail(message))
    cli._check_resume(parser, args, 1)


def test_resume_accepts_an_earlier_fastcl_checkpoint(tmp_path, monkeypatch):
    """A checkpoint of an earlier fastcl (RNG states, no world_size) passes the up-front check."""
    import argparse

    from fastcl import cli
    old = {k: v for k, v in _fake_checkpoint().items() if k != "world_size"}
    old.update(torch_rng=None, cuda_rng=None, generator=None, python_rng=None)
    path = tmp_path / "old.pt"
    torch.save(old, path)
    args = cli.build_parser().parse_args(TINY + ["--resume", str(path)])
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(parser, "error", lambda message: pytest.fail(message))
    assert cli._check_resume(parser, args, 2)["world_size"] == 2


def test_device_index_beyond_the_devices(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = _usage_error(["train", "--device", "cuda:1"], capsys)
    assert "--device cuda:1" in line


def test_diverging_run_ends_with_an_error_not_a_traceback(capsys):
    """A temperature the losses accept but whose logits overflow: the Trainer's non-finite loss
    check stops the run, reported as an error naming --lr and --temperature (status 1)."""
    with pytest.raises(SystemExit) as exc:
        main(TINY + ["--temperature", "3e-39", "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "fastcl train: error: training diverged: non-finite loss" in err
    assert "--lr" in err and "--temperature" in err and "Traceback" not in err


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
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastcl", "info"], capture_output=True,
                         text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "reference" in out.stdout and torch.__version__ in out.stdout
    # torch._dynamo (about half of the start-up time) waits for torch.compile or a MemoryBank.
    imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "fastcl.nn" in imported and not any(m.startswith("torch._dynamo") for m in imported)


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
        assert_close(a, b, torch.float64, case, elementwise=True)


def test_checkpoint_keys_are_what_the_trainer_writes():
    """The --resume check and Trainer.load_state_dict read CHECKPOINT_KEYS: it must be exactly
    what Trainer.state_dict writes, and a state without one of them is refused by name."""
    import pytest
    import torch

    from fastcl.train import CHECKPOINT_KEYS, Trainer
    model = torch.nn.Linear(3, 2)
    trainer = Trainer(model, lambda z0, z1: (z0 - z1).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1),
                      batch_size=4, progress=False)
    state = trainer.state_dict()
    assert tuple(state) == CHECKPOINT_KEYS
    for key, other in (("seed", 1), ("batch_size", 8), ("world_size", 2)):  # the data order must be the one saved
        with pytest.raises(ValueError, match=f"checkpoint was written with {key}={other}, but this trainer has"):
            trainer.load_state_dict(dict(state, **{key: other}))
    del state["world_size"]
    with pytest.raises(ValueError, match=r"not a Trainer checkpoint: missing \['world_size'\]"):
        trainer.load_state_dict(state)


def test_cpu_allocation_failures_count_as_out_of_memory():
    """A bench row whose CPU allocation fails is an "oom" row, not a traceback: the CPU allocator
    raises a plain RuntimeError saying it can't allocate memory."""
    import torch

    from fastcl.profiling import _is_oom
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert _is_oom(exc)
    assert not _is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("flag", ["--batch", "--dim", "--steps"])
def test_distributed_example_refuses_sizes_below_one(flag, monkeypatch, capsys):
    """examples/distributed_clip.py names a size below 1 (--batch -3 was a torch traceback, and
    --steps 0 printed nothing)."""
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "distributed_clip.py")
    monkeypatch.setattr(sys, "argv", [script, flag, "0"])
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(script, run_name="__main__")
    assert exc.value.code == 2 and f"{flag} must be >= 1, got 0" in capsys.readouterr().err
