"""Backend choice: ``backend=`` argument, else ``FASTCL_BACKEND``, else ``auto``."""
import contextlib
import importlib.util
import math
import os
import sys
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from fastcl._ext import extension_available, extension_has_cuda

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed (checked once, at import, so torch.compile can trace this)."""
    return _HAS_TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_gpu_backend(op: str, n: int, m: int, d: int, dtype: torch.dtype) -> str:
    """"triton" or "cuda" for one problem, from the committed table in ``dispatch_table.py``.

    op: "similarity_lse" or "sigmoid_pair" (q is (n, d), k is (m, d) of ``dtype``), or "masking"
    (n = m = B * L tokens of d features, the masking ops' input (B, L, d)).  The nearest
    measured grid point (log2 of sqrt(n * m) and of d) for the op and dtype decides; the table's
    DEFAULT answers where it has no entry (everywhere, until it is measured).
    """
    from fastcl.ops import dispatch_table as t
    plain = all(type(v) is int for v in (n, m, d))  # SymInts under torch.compile are not cached
    if plain:
        if _picked["table"] is not t.TABLE or _picked["default"] != t.DEFAULT:  # a new table (tests)
            _picked.update(table=t.TABLE, default=t.DEFAULT, answers={})
        key = (op, n, m, d, dtype)
        if key in _picked["answers"]:
            return _picked["answers"][key]
    choice = _nearest_entry(t, op, n, m, d, dtype)
    if plain:
        if len(_picked["answers"]) >= 4096:  # many shapes (variable batches): start over
            _picked["answers"].clear()
        _picked["answers"][key] = choice
    return choice


# pick_gpu_backend's answers for the table they came from: every op call on CUDA asks, and the
# nearest-point search took 18 us in Python on a 2-core CPU, about an eager torch op's cost.
_picked = {"table": None, "default": None, "answers": {}}


def _nearest_entry(t, op: str, n, m, d, dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    points = [(key[2], key[3]) for key in t.TABLE if key[0] == op and key[1] == name]
    if not points:
        return t.DEFAULT
    size = math.log2(max(1.0, math.sqrt(n * m)))
    gn, gd = min(points, key=lambda p: (math.log2(p[0]) - size) ** 2 + (math.log2(p[1]) - math.log2(max(d, 1))) ** 2)
    return t.TABLE[(op, name, gn, gd)]


def on_device_of(t: torch.Tensor):
    """Context making ``t``'s GPU the current one (a no-op for other tensors).  Triton launches on
    the current device and its stream, not on the device of the tensors it is given: tensors on
    cuda:1 while cuda:0 is current would otherwise meet a kernel on the wrong GPU."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def fused_kernel(op: str, backend: str, kernels: Dict[str, Union[str, Callable]]) -> Callable:
    """The fused kernel of ``op`` for ``backend``: ``kernels[backend]`` is a callable, or a
    "module:function" path imported on first use (so Triton and the CUDA driver load lazily).
    The returned function runs on the device of its first argument (``on_device_of``)."""
    entry = kernels.get(backend)
    if entry is None:
        raise ValueError(f"{op} has no fused {backend!r} backend")
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = getattr(importlib.import_module(module), name)

    def on_its_device(first, *args):
        with on_device_of(first):
            return entry(first, *args)
    return on_its_device


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` when
    nothing has yet: that import is about half of ``import fastcl`` (2.4 of 5.3 s here), and
    torch.compile, which imports it, reads the decorator's mark only when it traces ``fn``.
    tests/test_compile.py checks that the mark is the decorator's."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


class _Env:
    # torch.compile stores an assumed-constant result as a global of the compiled function's
    # module, named after the function: this name replaces nothing there (env_setting would).
    @staticmethod
    @assume_constant_result
    def _fastcl_env_value(name: str, default: Optional[str]) -> Optional[str]:
        return os.environ.get(name, default)


def env_setting(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, read as a constant under torch.compile (whose torch 2.4
    to 2.10 versions fail on reading an unset variable; the value is that of the first trace)."""
    return _Env._fastcl_env_value(name, default)


def requested_backend(backend: Optional[str]) -> str:
    """The backend asked for, lower case: ``backend``, else ``FASTCL_BACKEND``, else "auto"."""
    name = backend if backend is not None else env_setting("FASTCL_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else "the FASTCL_BACKEND environment variable"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


# Ops whose fused GPU kernels (Triton and CUDA) take no float64: ``auto`` sends it to reference.
NO_GPU_FLOAT64 = ("similarity_lse", "sigmoid_pair")


def resolve_backend(backend: Optional[str], device: torch.device,
                    problem: Optional[Tuple[str, int, int, int, torch.dtype]] = None) -> str:
    """Concrete backend name for tensors on ``device``; raises a clear error if unusable.

    ``auto`` picks ``cpu`` (the C++ extension) for CPU tensors and ``triton`` for CUDA tensors,
    falling back to ``reference`` when those are missing.  Ops with a ``cuda`` backend pass
    ``problem = (op, n, m, d, dtype)``: then ``auto`` on CUDA asks ``pick_gpu_backend`` when
    both triton and the CUDA kernels are there, and uses whichever one is there otherwise, and
    ``reference`` for float64 for the ops in ``NO_GPU_FLOAT64``.
    """
    name = requested_backend(backend)
    try:
        return _usable(name, device, problem)
    except (ValueError, RuntimeError) as e:
        if backend is None and name != "auto":  # the user passed none: say where it came from
            raise type(e)(f"{e} (the backend was set by FASTCL_BACKEND={name!r})") from None
        raise


def _usable(name: str, device: torch.device, problem) -> str:
    if name == "auto":
        if (device.type == "cuda" and problem is not None and problem[0] in NO_GPU_FLOAT64
                and problem[4] == torch.float64):
            return "reference"
        if device.type == "cuda" and problem is not None and extension_has_cuda():
            if not triton_available():
                return "cuda"
            return pick_gpu_backend(*problem)
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and extension_available():
            return "cpu"
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not extension_available():
            raise RuntimeError("backend='cpu' needs the C++ extension fastcl._C, which is not built; "
                               "run `pip install --no-build-isolation -e .`")
    elif name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs Triton (pip install triton)")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError("backend='triton' got CPU tensors; set TRITON_INTERPRET=1 to run the Triton "
                             "kernels in the interpreter, or move the tensors to a CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA tensors, got tensors on {device}")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if not extension_has_cuda():
            raise RuntimeError("backend='cuda' needs fastcl._C built with CUDA, which this install lacks")
    return name
