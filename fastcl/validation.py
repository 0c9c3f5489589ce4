"""Argument checks shared by every public entry point.  Each error names the argument."""
import math
import numbers
from typing import Optional, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


# Whether a torch.func transform (vmap, grad, ...) is running: it cannot read a tensor's value.
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _eager() -> bool:
    # Value checks need a device sync and break graphs; skip them while torch.compile traces.
    return not torch.compiler.is_compiling()


def check_dense(name: str, x: torch.Tensor) -> None:
    """``x`` must be an ordinary (strided) tensor: the kernels index memory by strides."""
    if x.is_nested or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if x.is_nested else f'layout {x.layout}'}")


def check_float_tensor(name: str, x, layout: Optional[str], *, non_empty: bool = True) -> None:
    """``x`` must be a dense floating tensor with one dimension per name in ``layout``, e.g. "(B, L, D)"
    (any number of dimensions for ``layout=None``, where the caller checks the shape)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    ndim = None if layout is None else layout.count(",") + 1
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if non_empty and x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def check_embeddings(name: str, x) -> None:
    """``x`` must be a non-empty 2-D floating tensor (N, D)."""
    check_float_tensor(name, x, "(N, D)")


def check_views(out0, out1, names=("out0", "out1")) -> None:
    """The two views of a two-view loss: ``check_pair`` on ``out0`` and ``out1`` (N, D), and the
    same N (row i of each is the other's positive); errors use the caller's argument ``names``."""
    check_pair(names[0], out0, names[1], out1)
    if out0.shape[0] != out1.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size, got {out0.shape[0]} and "
                         f"{out1.shape[0]}")


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Both embeddings valid, with the same D, dtype and device."""
    check_embeddings(name_a, a)
    check_embeddings(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature size D, "
                         f"got {a.shape[1]} and {b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def _check_real(name: str, value, positive: bool, finite: bool) -> None:
    if finite and math.isinf(value):
        # The temperature losses check scale = 1 / temperature; a tiny temperature tensor's is inf.
        where = " (the temperature losses pass scale = 1 / temperature)" if name == "scale" else ""
        raise ValueError(f"{name} must be finite{where}, got {value}")
    if positive and not value > 0:
        hint = " (already exponentiated: open_clip passes logit_scale.exp())" if name == "logit_scale" else ""
        raise ValueError(f"{name} must be > 0{hint}, got {value}")


def as_0d(value):
    """A one-element tensor as 0-d (torch mixes only 0-d CPU tensors into device arithmetic, and a
    (1,) one would make a 0-d loss (1,)); anything else as is."""
    return value.reshape(()) if isinstance(value, torch.Tensor) else value


def check_scalar(name: str, value, *, positive: bool = False, device: Optional[torch.device] = None):
    """A real number (numpy scalars included), not infinite, or a one-element floating tensor;
    optionally > 0 (NaN fails that; a NaN bias passes, and gives NaN out).  A tensor must be on
    ``device`` (the inputs' device, when given) or the CPU, whose scalars the ops move.  Returns
    ``value``, a tensor as 0-d (a (1,) one would make a loss (1,) where it is 0-d).

    A tensor's value (finite, and the sign) is checked only on the CPU: reading a GPU tensor's
    value would wait for the device on every call (a learnable logit_scale is a CUDA tensor in
    every training step, and open_clip's losses never wait).  The ops are defined for any finite
    scale, so a GPU tensor at or below 0 gets the formula's value rather than an error."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:  # (1, 1) would broadcast a (N,) result to (1, N)
            raise ValueError(f"{name} must be a scalar (0-d or shape (1,) tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if device is not None and value.device != device and value.device.type != "cpu":
            also = "" if device.type == "cpu" else " or the CPU"
            raise ValueError(f"{name} must be on the inputs' device ({device}){also}, got {value.device}")
        # The one read: CPU values cost no sync (and none under torch.func, which cannot read one).
        if _eager() and value.device.type == "cpu" and not functorch_active():
            _check_real(name, float(value.detach().reshape(())), positive, finite=True)
        return as_0d(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
        # (a float torch.compile made symbolic has no isinf; its sign is still compared)
        _check_real(name, value, positive, finite=_eager())
        return value
    raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")


def index_range(idx: torch.Tensor):
    """(min, max) of a non-empty integer tensor as Python ints, with one device sync."""
    lo, hi = torch.aminmax(idx)
    return tuple(int(v) for v in torch.stack([lo, hi]).tolist())


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_index(name: str, idx, shape: Tuple[Optional[int], ...], upper: int, device: torch.device, *,
                read_range: bool = True) -> torch.Tensor:
    """``idx`` is an integer tensor of ``shape`` (``None``: any length along that dim) with values
    in [0, upper); returns it as int64.  The range check reads the values back (one device sync);
    ``read_range=False`` skips it, for indices a caller built itself or has checked already."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer indices, got {type(idx).__name__}")
    check_dense(name, idx)
    if idx.dtype not in INDEX_DTYPES:  # (aminmax has no kernels for uint16/32/64)
        raise TypeError(f"{name} must be an integer tensor (int64, int32, int16, int8 or uint8), got {idx.dtype}")
    if idx.dim() != len(shape) or any(want is not None and got != want for got, want in zip(idx.shape, shape)):
        dims = ", ".join("n" if want is None else str(want) for want in shape)
        raise ValueError(f"{name} must have shape ({dims}{',' if len(shape) == 1 else ''}), "
                         f"got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} must be on {device}, got {idx.device}")
    if read_range and _eager() and idx.numel() > 0:
        lo, hi = index_range(idx)
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")
    return idx if idx.dtype == torch.int64 else idx.long()


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_offset(name: str, offset: Optional[int]) -> None:
    """``offset`` is None or an int that fits in int64 (what the kernels take)."""
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"{name} must be None or an int, got {type(offset).__name__}")
    if offset is not None and not -2**63 <= offset < 2**63:
        raise ValueError(f"{name} must fit in int64, got {offset}")


def check_op_inputs(device: torch.device, scalars=(), vectors=()) -> None:
    """Shapes and devices of a directly callable op's (``torch.ops.fastcl``) statistics and
    scalars, checked without reading values (the fake kernels run them too: they run for any
    meta argument, and would hand a CPU caller uninitialised memory).  Each of ``scalars``
    ((name, tensor) pairs) holds one element, on ``device`` or the CPU; each of ``vectors``
    ((name, tensor or None, allowed lengths)) is None or 1-D of an allowed length on ``device``
    (the kernels index them by row and column); "pos_index" must hold int64 or int32."""
    for name, t in scalars:
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a one-element tensor, got {got}")
        if t.device != device and t.device.type != "cpu":
            also = "" if device.type == "cpu" else " or the CPU"
            raise ValueError(f"{name} must be on {device}{also}, got {t.device}")
    for name, t, lengths in vectors:
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] not in lengths:
            want = " or ".join(f"({n},)" for n in dict.fromkeys(lengths))
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
        if name == "pos_index" and t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"pos_index must be an int64 or int32 tensor, got {t.dtype}")


def check_flags(**flags) -> None:
    """Each keyword's value is a bool (a string such as "no" would read as True); TypeError naming it."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            kind = type(value)  # numpy's bool is named "bool" too
            where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
            raise TypeError(f"{name} must be a bool, got {where}{kind.__qualname__}")


def resolve_scale(temperature: Union[float, torch.Tensor, None],
                  logit_scale: Union[float, torch.Tensor, None],
                  default_temperature: Optional[float] = None, device: Optional[torch.device] = None):
    """Exactly one of ``temperature`` (scale = 1/T) and ``logit_scale`` (already exponentiated);
    a tensor on ``device`` or the CPU (``check_scalar``)."""
    if temperature is not None and logit_scale is not None:
        raise ValueError("give either temperature or logit_scale, not both")
    if logit_scale is not None:
        return check_scalar("logit_scale", logit_scale, positive=True, device=device)
    if temperature is None:
        if default_temperature is None:
            raise ValueError("one of temperature or logit_scale is required")
        temperature = default_temperature
    return 1.0 / check_scalar("temperature", temperature, positive=True, device=device)
