"""benchmarks/gpu_suite.sh's own control flow, run here with a stand-in nvidia-smi: it must parse,
skip steps once SUITE_BUDGET_S is spent, and leave its results in OUTDIR as a tarball plus the
main files (a lent GPU machine sends back at most 8 files)."""
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_suite(tmp_path, tools=None, **env_extra):
    """Run the suite with stand-ins on PATH: nvidia-smi, python3, and ``tools`` (name: script)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "nvidia-smi").write_text("#!/bin/sh\necho 'Stand-in GPU, 0, 0 MiB'\n")
    (shim / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for name, script in (tools or {}).items():
        (shim / name).write_text(script)
    for f in shim.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PATH=f"{shim}:{env['PATH']}", SUITE_WORK=str(tmp_path / "work"), **env_extra)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    return proc, out


def test_suite_packs_its_results(tmp_path):
    # Only the masking step, with no time left: it is skipped, and the call still packs what it has.
    proc, out = _run_suite(tmp_path, SUITE_STEPS="masking", SUITE_BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "skipped, SUITE_BUDGET_S=0 spent: python3 benchmarks/bench_masking.py" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu.txt", "suite_results.tar.gz"] and len(names) <= 8
    assert "Stand-in GPU" in (out / "gpu.txt").read_text()
    with tarfile.open(out / "suite_results.tar.gz") as tar:
        assert "./gpu.txt" in tar.getnames()


def test_suite_names_a_bad_budget(tmp_path):
    proc, out = _run_suite(tmp_path, SUITE_STEPS="masking", SUITE_BUDGET_S="9m")
    assert proc.returncode == 2
    assert "SUITE_BUDGET_S must be a whole number of seconds, got '9m'" in proc.stderr


@pytest.mark.slow  # 15-17 s each of suite runs on 2 cores
def test_gpu_tests_stop_at_their_own_cap(tmp_path):
    # SUITE_TESTS_S caps the test step below what SUITE_BUDGET_S leaves, and says so.
    proc, out = _run_suite(tmp_path, SUITE_STEPS="tests", SUITE_TESTS_S="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu tests exit code: 124 (stopped at SUITE_TESTS_S=1" in proc.stdout
    with tarfile.open(out / "suite_results.tar.gz") as tar:
        assert "./gpu_tests.log" in tar.getnames()
    (tmp_path / "again").mkdir()
    proc, _ = _run_suite(tmp_path / "again", SUITE_STEPS="tests", SUITE_TESTS_S="3m")
    assert proc.returncode == 2 and "SUITE_TESTS_S must be a whole number of seconds, got '3m'" in proc.stderr


@pytest.mark.slow  # 15-17 s each of suite runs on 2 cores
def test_sanitize_step_runs_each_tool(tmp_path):
    # A stand-in compute-sanitizer records its arguments; the step runs memcheck, racecheck and
    # synccheck over the epilogue tests, then memcheck over the CUDA masking test.
    calls = tmp_path / "calls.txt"
    stand_in = f'#!/bin/sh\necho "$@" >> "{calls}"\necho "ERROR SUMMARY: 0"\n'
    proc, out = _run_suite(tmp_path, tools={"compute-sanitizer": stand_in}, SUITE_STEPS="sanitize")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = calls.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["memcheck", "racecheck", "synccheck", "memcheck"]
    assert all("--error-exitcode 9" in line for line in lines)
    assert "tests/test_gpu.py -k epilogue" in lines[0] and "tests/test_masking.py" in lines[3]
    with tarfile.open(out / "suite_results.tar.gz") as tar:
        assert {"./sanitize_memcheck.log", "./sanitize_masking.log"} <= set(tar.getnames())


@pytest.mark.slow  # 15-17 s each of suite runs on 2 cores
def test_named_test_files_run_last(tmp_path):
    # The suite's test step sets FASTCL_TESTS_LAST=test_gpu.py: the other files' few GPU tests
    # come first, so SUITE_TESTS_S cuts into test_gpu.py's option matrix, not into them.
    env = {**os.environ, "FASTCL_TESTS_LAST": "test_gpu.py,test_masking.py"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                           "no:cacheprovider", "tests"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    files = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    order = [f for i, f in enumerate(files) if i == 0 or f != files[i - 1]]
    assert order[-2:] == ["tests/test_gpu.py", "tests/test_masking.py"], order  # in the order named
    assert len(order) == len(set(order)) >= 4
