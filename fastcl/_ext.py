"""Loads the compiled extension ``fastcl._C`` once; the package works without it."""
import importlib
import warnings

import torch  # noqa: F401  (the extension links against libtorch/libc10, loaded by torch)

_C = None
_error = None

try:  # importing the module also registers the torch.ops.fastcl_C operators
    _C = importlib.import_module("fastcl._C")
except ImportError as exc:  # pragma: no cover - exercised only when the build is missing
    _error = exc
    warnings.warn(
        f"fastcl: the C++ extension fastcl._C is not built ({exc}); "
        "falling back to the pure-PyTorch reference backend on the CPU.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    """True when ``fastcl._C`` imported (the ``cpu`` backend is usable)."""
    return _C is not None


# Read once: torch.compile cannot trace the extension's own function (a graph break on CUDA,
# where `auto` asks it for every op).
_HAS_CUDA = _C is not None and bool(_C.has_cuda())


def extension_has_cuda() -> bool:
    """True when ``fastcl._C`` was built with its CUDA kernels."""
    return _HAS_CUDA
