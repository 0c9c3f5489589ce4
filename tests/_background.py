"""Slow subprocess checks (nvcc and Triton's sm_90 compiles) run beside the test session.

The test run keeps about 1.15 of this machine's 2 cores busy, so these compiles (two to three
minutes in all) run on one background thread, one at a time and at a lower priority, while the
other tests run.  A test module registers a check with ``job(name, fn)`` and marks the tests that
read it ``@pytest.mark.background(name)``; conftest starts the checks that the selected tests
need, in the order they are needed, and ``result(name)`` waits for one, or runs it there and then
when nothing started it (a test run on its own).
"""
import os
import shutil
import signal
import subprocess
import tempfile
import threading

_JOBS = {}
_lock = threading.Lock()
_procs = set()
_state = {"stopping": False, "workdir": None}


class _Job:
    def __init__(self, fn):
        self.fn = fn
        self.claimed = False
        self.done = threading.Event()
        self.value = None
        self.error = None

    def claim(self) -> bool:
        with _lock:
            if self.claimed:
                return False
            self.claimed = True
            return True

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the test that reads it
            self.error = e
        finally:
            self.done.set()


def job(name: str, fn) -> None:
    """Registers ``fn`` (no arguments; its return value is the result) as check ``name``."""
    _JOBS.setdefault(name, _Job(fn))


def start(names) -> None:
    """Runs the registered checks among ``names`` (first need first) on one background thread."""
    queue = [_JOBS[n] for n in dict.fromkeys(names) if n in _JOBS]
    if not queue:
        return

    def worker():
        for j in queue:
            if _state["stopping"]:
                return
            if j.claim():
                j.run()

    threading.Thread(target=worker, name="fastcl-background-checks", daemon=True).start()


def result(name: str):
    """Check ``name``'s result: waits for it, or runs it now if it was not started."""
    j = _JOBS[name]
    if j.claim():
        j.run()
    j.done.wait()
    if j.error is not None:
        raise RuntimeError(f"background check {name!r} failed") from j.error
    return j.value


def workdir() -> str:
    """A folder for the checks' outputs, removed when the session ends."""
    with _lock:
        if _state["workdir"] is None:
            _state["workdir"] = tempfile.mkdtemp(prefix="fastcl-checks-")
        return _state["workdir"]


def _kill_group(proc: subprocess.Popen) -> None:
    # The compilers fork (g++ -> cc1plus, nvcc -> cicc, ptxas): the whole process group goes.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(argv, env=None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` at a lower priority (nice 10), so
    the foreground tests keep their core, in its own process group: on a timeout or when the
    session ends, it and every process it started are killed."""
    if _state["stopping"]:
        raise RuntimeError("the test session is ending")
    nice = shutil.which("nice")
    cmd = [nice, "-n", "10", *argv] if nice else list(argv)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    with _lock:
        _procs.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate(timeout=30)
        raise
    finally:
        with _lock:
            _procs.discard(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def stop() -> None:
    """Ends the session's checks: no new ones start, running ones are killed (with the processes
    they started), outputs removed."""
    _state["stopping"] = True
    with _lock:
        procs = list(_procs)
    for p in procs:
        _kill_group(p)
    if _state["workdir"] is not None:
        shutil.rmtree(_state["workdir"], ignore_errors=True)
