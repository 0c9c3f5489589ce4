"""Backend choice: ``backend=`` argument, else ``FASTCL_BACKEND``, else ``auto``."""
import importlib.util
import os
from typing import Optional

import torch

from fastcl._ext import extension_available, extension_has_cuda

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when Triton is installed (checked once, at import, so torch.compile can trace this)."""
    return _HAS_TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Concrete backend name for tensors on ``device``; raises a clear error if unusable.

    ``auto`` picks ``triton`` for CUDA tensors and ``cpu`` (the C++ extension) for CPU
    tensors, and falls back to ``reference`` when those are missing.
    """
    name = backend if backend is not None else os.environ.get("FASTCL_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    name = name.lower()
    if name == "auto":
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
