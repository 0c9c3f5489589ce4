"""tests/_background.py: checks run beside the session hand their results, or their errors, to the
tests that read them."""
import os
import shutil
import sys
import threading

import pytest

import _background


def test_an_unstarted_check_runs_when_read():
    calls = []
    _background.job("t:sync", lambda: calls.append(threading.current_thread().name) or 42)
    assert _background.result("t:sync") == 42 and _background.result("t:sync") == 42
    assert calls == [threading.current_thread().name]  # once, here


def test_started_checks_run_once_in_order_on_another_thread():
    order, finished = [], threading.Event()

    def record(name):
        def fn():
            order.append((name, threading.current_thread().name))
            if name == "second":
                finished.set()
            return name
        return fn

    _background.job("t:first", record("first"))
    _background.job("t:second", record("second"))
    _background.start(["t:first", "t:missing", "t:second", "t:first"])
    assert finished.wait(10)
    assert _background.result("t:second") == "second" and _background.result("t:first") == "first"
    assert order == [("first", "fastcl-background-checks"), ("second", "fastcl-background-checks")]


def test_a_failed_check_fails_every_reader():
    def boom():
        raise ValueError("compiler said no")
    _background.job("t:boom", boom)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="t:boom") as info:
            _background.result("t:boom")
        assert isinstance(info.value.__cause__, ValueError)


def test_run_captures_output_at_lower_priority():
    proc = _background.run([sys.executable, "-c", "import os, sys; print(os.nice(0)); sys.exit(3)"])
    assert proc.returncode == 3
    assert int(proc.stdout) == min(19, os.nice(0) + (10 if shutil.which("nice") else 0))


def test_a_timeout_kills_what_the_command_started():
    """Compilers fork (g++ -> cc1plus): the timeout kills the whole process group, and does not
    wait for a grandchild that holds the output pipes."""
    import subprocess
    import time
    t0 = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        _background.run(["sh", "-c", "sleep 30 & sleep 30"], timeout=1)
    assert time.perf_counter() - t0 < 10
